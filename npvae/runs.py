"""The run folder and how a run stops: the folder's lock, its files, and signals.

- :func:`run_lock` keeps a second process out of a run folder while one writes into it
  (an exclusive ``flock``, released by the kernel however the process ends);
- the files npvae writes there (:func:`is_run_file`) and the hidden temporary files it
  writes them through (:func:`is_temp_file`), which :func:`clean_temp_files` removes
  when a run starts;
- Ctrl-C, SIGTERM and SIGHUP: :func:`stop_on_signals` makes the last two stop like
  Ctrl-C, and the training loop defers all three to the end of a step
  (:class:`_DeferredInterrupt`), so it stops on a consistent state.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: runs are not locked
    fcntl = None

from .atomic import temp_target
from .checkpoint import FILENAME

METRICS_FILE = "metrics.jsonl"


class RunInUse(RuntimeError):
    """Another process holds the run folder's lock (it is training, or writing into the run)."""


class SignalStop(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C; ``signum`` says which (exit status 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


# ----------------------------------------------------------------------------- signals

# Signals that stop a run the way Ctrl-C does: save, say so, exit with 128 + signum.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def signal_name(signum: int) -> str:
    """'Ctrl-C' for SIGINT, else the signal's name ('SIGTERM')."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def _raise_signal_stop(signum, frame):
    raise SignalStop(signum)


@contextlib.contextmanager
def stop_on_signals():
    """While active, SIGTERM and SIGHUP raise :class:`SignalStop` (a KeyboardInterrupt).

    Only in the main thread, and only for signals left at their default action (an
    ignored SIGHUP, as under ``nohup``, stays ignored); the previous handlers come back
    on exit. The training loop defers them to the end of a step, as it does Ctrl-C; the
    command line uses this so that they also stop evaluation cleanly.
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_DFL:
                previous[signum] = signal.signal(signum, _raise_signal_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------- the run folder

# Files npvae writes into a run folder, and the hidden temporary files it writes them through
# (".checkpoint.npz.<random>.tmp", from tempfile.mkstemp, then renamed over the file).
FIGURES = ("reconstructions.png", "samples.png", "loss_curves.png", "latent_scatter.png",
           "interpolation.png", "manifold.png", "codebook_usage.png", "perplexity.png")
RUN_FILES = (FILENAME, METRICS_FILE, "eval.json") + FIGURES
_SAMPLES = re.compile(r"samples-seed\d+\.png")
_held = {}  # real path of a run folder -> [fd, depth, thread]: this process's locks
_held_guard = threading.Lock()  # for _held, which every thread of the process shares


def is_run_file(name: str) -> bool:
    """True for a file npvae writes into a run folder (not a temporary file)."""
    return name in RUN_FILES or bool(_SAMPLES.fullmatch(name))


def is_temp_file(name: str) -> bool:
    """True for a hidden temporary file through which npvae writes one of its run files."""
    target = temp_target(name)
    return target is not None and is_run_file(target)


def run_files(run_dir: Path) -> tuple[list, list]:
    """(paths npvae wrote, anything else) in ``run_dir``, by name.

    A VQ-VAE run's learned prior, RUN/prior/, counts as the run's own when it holds only
    run files: its files come first in the list, then the folder itself.
    """
    from .codeprior import PRIOR_DIR

    ours, others = [], []
    for path in sorted(Path(run_dir).iterdir()):
        if path.is_dir() and path.name == PRIOR_DIR and not path.is_symlink():
            inner, foreign = run_files(path)
            if not foreign:
                ours += inner + [path]
                continue
        mine = path.is_file() and (is_run_file(path.name) or is_temp_file(path.name))
        (ours if mine else others).append(path)
    return ours, others


def remove_run_files(run_dir) -> None:
    """Delete the files npvae wrote in ``run_dir`` (a prior's files before its folder);
    anything else stays. Call it only while holding :func:`run_lock`."""
    for path in run_files(run_dir)[0]:
        path.rmdir() if path.is_dir() else path.unlink()


@contextlib.contextmanager
def run_lock(run_dir, create: bool = True):
    """Hold an exclusive ``flock`` on the run folder while writing into it.

    Raises :class:`RunInUse` at once if another process, or another thread of this
    process, holds it. The kernel releases the lock when the process ends, however it
    ends (``kill -9`` included), so a crash never leaves a run locked. Re-entrant within
    a thread (the command line holds it around ``train``, which takes it too). Creates
    the folder if needed; with ``create=False`` a missing folder is not locked (there is
    nothing in it to protect, and nothing is made).
    """
    run_dir = Path(run_dir)
    if not create and not run_dir.is_dir():
        yield run_dir
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    me = threading.get_ident()
    with _held_guard:
        if key in _held:
            if _held[key][2] != me:
                raise RunInUse(
                    f"{run_dir} is in use: another thread of this process is training or "
                    f"writing into it. Wait for it to finish, or choose another run directory")
            _held[key][1] += 1
        else:
            _held[key] = [_lock_folder(run_dir), 1, me]
    try:
        yield run_dir
    finally:
        with _held_guard:
            _held[key][1] -= 1
            fd = _held.pop(key)[0] if _held[key][1] == 0 else None
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock_folder(run_dir: Path):
    """An open descriptor of ``run_dir`` holding its exclusive lock (None where flock is missing)."""
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunInUse(
            f"{run_dir} is in use: another npvae process is training or writing into it. "
            f"Wait for it to finish (or stop it), or choose another run directory") from None
    return fd


def clean_temp_files(run_dir) -> list:
    """Remove the hidden temporary files a killed writer left in ``run_dir``; returns them.

    Call it only while holding :func:`run_lock`: then no live npvae process is writing
    there, and every such file is a leftover of one that was killed (``kill -9``).
    """
    removed = []
    for path in Path(run_dir).iterdir():
        if is_temp_file(path.name) and path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def check_writable(run_dir) -> None:
    """Fail now, with a clear OSError, if files cannot be created in ``run_dir``."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=run_dir)
    except OSError as exc:
        raise PermissionError(
            exc.errno, f"cannot write into the run directory {run_dir} ({exc.strerror}); "
                       f"make it writable or choose another one") from None
    os.close(fd)
    os.unlink(probe)


class _DeferredInterrupt:
    """While active in the main thread, the first Ctrl-C, SIGTERM or SIGHUP only sets
    ``requested`` (and ``signum``).

    The loop checks the flag between steps, so it stops on a consistent state. A second
    one raises KeyboardInterrupt (:class:`SignalStop` for SIGTERM or SIGHUP) at once.
    Handlers someone else installed are left alone, and restored ones on exit.
    """

    def __enter__(self):
        self.requested, self.signum = False, None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            ours = {signal.SIGINT: (signal.default_int_handler,)}
            ours.update({s: (signal.SIG_DFL, _raise_signal_stop) for s in STOP_SIGNALS})
            for signum, defaults in ours.items():
                if signal.getsignal(signum) in defaults:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt if signum == signal.SIGINT else SignalStop(signum)
        self.requested, self.signum = True, signum

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False
