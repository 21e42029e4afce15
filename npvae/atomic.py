"""Every file npvae writes goes through :func:`write_atomic`: a reader sees the old file
or the new one, never half of one.

The content goes to a hidden temporary file in the same folder (``.<name>.<random>.tmp``),
is flushed and fsynced, may be checked, and is then renamed over the file (``os.replace``)
and the rename made durable. Any failure, Ctrl-C included, removes the temporary file and
leaves the old file as it was; a ``kill -9`` leaves at most the temporary file, which
``npvae.train`` removes from a run folder when a run next starts, and
:func:`npvae.data.load` from a dataset's cache folder once it is an hour old.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable


_TEMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp")  # mkstemp's random part: [A-Za-z0-9_]


def temp_target(name: str) -> str | None:
    """The name of the file that the temporary file ``name`` was written for
    (``.<name>.<random>.tmp``), or None if ``name`` is no such temporary file."""
    m = _TEMP.fullmatch(name)
    return m.group("name") if m else None


def write_atomic(path, write: Callable, verify: Callable | None = None) -> Path:
    """Fill ``path`` by ``write(binary file)``, atomically; returns the path.

    ``verify(temporary path)`` may raise to reject the content before it replaces ``path``.
    """
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _file_mode())  # mkstemp makes owner-only files
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if verify is not None:
            verify(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` with :func:`write_atomic`."""
    return write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def _file_mode() -> int:
    """The permissions an ordinary new file gets under the current umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)
