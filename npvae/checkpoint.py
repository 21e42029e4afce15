"""Training checkpoints: one ``.npz`` file that holds everything needed to go on training.

A checkpoint is an ordinary NumPy archive, read with ``allow_pickle=False`` (so loading
one never runs code), whose members are

    format_version   int, FORMAT_VERSION
    config           the model's config as JSON (0-d unicode array)
    param/<name>     one array per parameter, e.g. param/enc.0.W
    optim/<name>     the optimizer's state_dict(), e.g. optim/m, optim/t
    buffer/<name>    state a model keeps outside its parameters, if it has any
    rng              the numpy Generator's bit_generator.state as JSON
    epoch, step      completed epochs and optimizer steps (ints)
    history          the per-epoch metrics so far (JSON list of dicts)
    args             the run's training arguments (JSON dict)
    position         JSON: null at an epoch boundary; for a run stopped inside an
                     epoch, where in that epoch it stopped (see npvae.train)

:func:`save_checkpoint` writes to a temporary file in the same folder, flushes and
fsyncs it, then renames it over the old file (``os.replace``), so a crash or Ctrl-C
while saving leaves the previous checkpoint intact. :func:`load_checkpoint` checks
everything it reads and reports any problem as a :class:`CheckpointError` that names
the file and what is wrong with it.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
FILENAME = "checkpoint.npz"
REQUIRED = ("format_version", "config", "rng", "epoch", "step", "history", "args")


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or does not match the model it describes."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` restores.

    model            a new model built from the saved config, saved parameters filled in
    optimizer_state  the dict to pass to ``optimizer.load_state_dict`` (empty if none saved)
    rng              a numpy Generator in exactly the saved state
    epoch, step      completed epochs and optimizer steps
    history          per-epoch metric dicts
    args             the training arguments the run was started with
    position         None, or where inside an unfinished epoch the run stopped
    """

    path: Path
    model: object
    optimizer_state: dict
    rng: np.random.Generator
    epoch: int
    step: int
    history: list
    args: dict
    position: dict | None = None
    format_version: int = FORMAT_VERSION
    buffers: dict = field(default_factory=dict)


def checkpoint_path(path) -> Path:
    """``path`` itself, or ``path/checkpoint.npz`` when ``path`` is a run directory."""
    p = Path(os.fspath(path))
    return p / FILENAME if p.is_dir() else p


# ----------------------------------------------------------------------------- saving


def _json_array(value) -> np.ndarray:
    return np.array(json.dumps(value, allow_nan=True))


def rng_state(rng: np.random.Generator) -> dict:
    """The Generator's bit_generator state: a JSON-serialisable dict of ints and strings."""
    return rng.bit_generator.state


def rng_from_state(state: dict) -> np.random.Generator:
    """A new Generator whose bit generator is in ``state`` (as from :func:`rng_state`)."""
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def _optimizer_state(optimizer) -> dict:
    if optimizer is None:
        return {}
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    return {k: np.asarray(v) for k, v in state.items()}


def save_checkpoint(path, model, optimizer, rng, epoch: int, step: int, history, args,
                    *, position: dict | None = None) -> Path:
    """Write a checkpoint to ``path`` atomically; returns the path.

    ``optimizer`` is an optimizer (its ``state_dict()`` is saved), a state dict, or None.
    ``rng`` is the run's numpy Generator. ``history`` and ``args`` must be JSON-friendly.
    """
    path = Path(os.fspath(path))
    arrays = {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "config": _json_array(model.config),
        "rng": _json_array(rng_state(rng)),
        "epoch": np.array(int(epoch), dtype=np.int64),
        "step": np.array(int(step), dtype=np.int64),
        "history": _json_array(list(history)),
        "args": _json_array(dict(args)),
        "position": _json_array(position),
    }
    arrays.update({f"param/{k}": np.asarray(v) for k, v in model.params.items()})
    arrays.update({f"optim/{k}": v for k, v in _optimizer_state(optimizer).items()})
    arrays.update({f"buffer/{k}": np.asarray(v) for k, v in _buffers(model).items()})

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _file_mode())  # mkstemp makes owner-only files
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _file_mode() -> int:
    """The permissions an ordinary new file gets under the current umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


# ----------------------------------------------------------------------------- loading

# What a damaged archive can raise from np.load or from reading one member.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile,
                zipfile.LargeZipFile, RuntimeError, NotImplementedError)


def load_checkpoint(path) -> Checkpoint:
    """Read and check a checkpoint (a file, or a run directory holding checkpoint.npz).

    Raises :class:`CheckpointError` naming the file and the problem: missing file,
    not an npz archive, truncated, missing members, another format version, a config
    that does not build a model, or parameters of the wrong names, shapes or dtype or
    holding NaN/inf.
    """
    path = checkpoint_path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            members = {name: npz[name] for name in npz.files}
    except _READ_ERRORS as exc:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (damaged, truncated, or not an .npz "
            f"archive): {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(members, dict) or not members:
        raise CheckpointError(f"{path}: an empty archive, not a checkpoint")
    return _parse(path, members)


def _fail(path, what):
    raise CheckpointError(f"{path}: {what}")


def _json_member(path, members, key):
    value = members[key]
    if value.shape != () or value.dtype.kind != "U":
        _fail(path, f"member {key!r} must be a JSON string, got {value.dtype} {value.shape}")
    try:
        return json.loads(str(value))
    except ValueError as exc:
        problem = f"member {key!r} is not valid JSON ({exc})"
    _fail(path, problem)


def _int_member(path, members, key) -> int:
    value = members[key]
    if value.shape != () or value.dtype.kind not in "iu" or int(value) < 0:
        _fail(path, f"member {key!r} must be a non-negative integer, got {value!r}")
    return int(value)


def _parse(path: Path, members: dict) -> Checkpoint:
    missing = [k for k in REQUIRED if k not in members]
    if missing:
        _fail(path, f"missing {', '.join(missing)} (not an npvae checkpoint, or cut short)")
    version = members["format_version"]
    if version.shape != () or version.dtype.kind not in "iu":
        _fail(path, f"format_version must be an integer, got {version!r}")
    if int(version) != FORMAT_VERSION:
        _fail(path, f"format version {int(version)}, but this npvae reads version {FORMAT_VERSION}")

    config = _json_member(path, members, "config")
    if not isinstance(config, dict):
        _fail(path, f"config must be a JSON object, got {type(config).__name__}")
    model = _build(path, config)
    _fill_params(path, model, members)

    rng_json = _json_member(path, members, "rng")
    try:
        rng, problem = rng_from_state(rng_json), None
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        problem = f"rng state is not a numpy bit generator state ({type(exc).__name__}: {exc})"
    if problem:
        _fail(path, problem)
    epoch = _int_member(path, members, "epoch")
    step = _int_member(path, members, "step")
    history = _json_member(path, members, "history")
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        _fail(path, "history must be a JSON list of per-epoch objects")
    args = _json_member(path, members, "args")
    if not isinstance(args, dict):
        _fail(path, "args must be a JSON object")
    position = _json_member(path, members, "position") if "position" in members else None
    if position is not None and not isinstance(position, dict):
        _fail(path, "position must be null or a JSON object")

    optimizer_state = {k[len("optim/"):]: v for k, v in members.items() if k.startswith("optim/")}
    buffers = _fill_buffers(path, model, members)
    return Checkpoint(path=path, model=model, optimizer_state=optimizer_state, rng=rng,
                      epoch=epoch, step=step, history=history, args=args, position=position,
                      format_version=FORMAT_VERSION, buffers=buffers)


def _buffers(model) -> dict:
    """State a model keeps outside its parameters (e.g. the VQ-VAE's moving averages)."""
    buffers = getattr(model, "buffers", None)
    return dict(buffers) if isinstance(buffers, dict) else {}


def _fill_buffers(path, model, members) -> dict:
    """Copy buffer/<name> into model.buffers, with the same checks as parameters."""
    saved = {k[len("buffer/"):]: v for k, v in members.items() if k.startswith("buffer/")}
    expected = _buffers(model)
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    if missing or extra:
        _fail(path, f"model buffers do not match its config ({model.config.get('kind')}): "
                    f"missing {missing}, unexpected {extra}")
    for name, arr in expected.items():
        value = saved[name]
        if value.shape != arr.shape or value.dtype != arr.dtype:
            _fail(path, f"model buffer {name} is {value.dtype} {value.shape}, "
                        f"but the model keeps {arr.dtype} {arr.shape}")
        arr[...] = value
    return saved


def _build(path, config):
    from .models import build  # here, so that importing this module stays light

    try:
        return build(config, rng=0)
    except (ValueError, TypeError, KeyError) as exc:
        problem = f"its config does not describe a model ({exc}); config = {json.dumps(config)}"
    _fail(path, problem)


def _fill_params(path, model, members) -> None:
    """Copy param/<name> into model.params, checking names, shapes, dtype and finiteness."""
    saved = {k[len("param/"):]: v for k, v in members.items() if k.startswith("param/")}
    expected = model.params
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing parameters {missing}")
        if extra:
            parts.append(f"unexpected parameters {extra}")
        _fail(path, f"{' and '.join(parts)} for its config ({model.config.get('kind')})")
    for name, view in expected.items():
        value = saved[name]
        if value.shape != view.shape:
            _fail(path, f"parameter {name} has shape {value.shape}, but the config calls for {view.shape}")
        if value.dtype != view.dtype:
            _fail(path, f"parameter {name} has dtype {value.dtype}, but the config says {view.dtype}")
        if not np.isfinite(value).all():
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(value))[0])
            _fail(path, f"parameter {name} holds {value[bad]} at index {bad}; "
                        "a checkpoint must hold finite parameters")
        view[...] = value
