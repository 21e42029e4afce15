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

:func:`save_checkpoint` refuses parameters, buffers or optimizer state holding NaN or
inf (:class:`NonFiniteState`), then writes through :func:`npvae.atomic.write_atomic`, so
a crash, Ctrl-C or ``kill -9`` while saving leaves the previous checkpoint intact.
:func:`load_checkpoint` checks everything it reads (finite parameters, buffers and
optimizer state; a config no larger than the file; a well-formed position) and reports
any problem as a :class:`CheckpointError` that names the file and what is wrong with it.
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._validate import is_integer
from .atomic import write_atomic

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


def checkpoint_path(path) -> Path:
    """``path`` itself, or ``path/checkpoint.npz`` when ``path`` is a run directory."""
    p = Path(os.fspath(path))
    return p / FILENAME if p.is_dir() else p


# ----------------------------------------------------------------------------- saving


def _plain(value):
    """A NumPy scalar or array as the Python number(s) json can write (json's default hook)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-friendly")


def _json_array(value, name: str) -> np.ndarray:
    """``value`` as JSON in a 0-d unicode array; NumPy numbers are written as Python ones."""
    try:
        return np.array(json.dumps(value, allow_nan=True, default=_plain))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must hold only JSON-friendly values (dicts, lists, strings, "
                         f"numbers, booleans, None): {exc}") from None


def _count(value, name: str) -> int:
    """``value`` as an int, or a ValueError naming ``name`` unless it is an integer >= 0."""
    if not (is_integer(value) and value >= 0):
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


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

    ``path`` is a file, or a run directory (then ``path/checkpoint.npz``, as
    :func:`load_checkpoint` reads it). ``optimizer`` is an optimizer (its ``state_dict()``
    is saved), a state dict, or None. ``rng`` is the run's numpy Generator. ``epoch`` and
    ``step`` are integers >= 0. ``history`` and ``args`` must be JSON-friendly; NumPy
    numbers in them are saved as Python numbers. Bad arguments raise ValueError before
    anything is written.
    """
    path = checkpoint_path(path)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be the run's numpy.random.Generator (its state is saved, so "
                         f"a resumed run draws what it would have drawn), got {type(rng).__name__}")
    epoch, step = _count(epoch, "epoch"), _count(step, "step")
    optimizer_state = _optimizer_state(optimizer)
    _check_finite_state(path, model, optimizer_state)
    arrays = {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "config": _json_array(model.config, "the model's config"),
        "rng": _json_array(rng_state(rng), "rng"),
        "epoch": np.array(epoch, dtype=np.int64),
        "step": np.array(step, dtype=np.int64),
        "history": _json_array(list(history), "history"),
        "args": _json_array(dict(args), "args"),
        "position": _json_array(position, "position"),
    }
    arrays.update({f"param/{k}": np.asarray(v) for k, v in model.params.items()})
    arrays.update({f"optim/{k}": v for k, v in optimizer_state.items()})
    arrays.update({f"buffer/{k}": np.asarray(v) for k, v in _buffers(model).items()})

    return write_atomic(path, lambda fh: np.savez(fh, **arrays))


class NonFiniteState(CheckpointError):
    """The state to save holds NaN or inf: it is not written, the previous file is kept.

    ``detail`` names the array and the index, e.g. "parameter dec.0.W holds nan at index (1, 2)".
    """

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def first_non_finite(value: np.ndarray):
    """The index of the first NaN or inf in ``value`` (a tuple), or None if all are finite.

    Arrays that cannot hold NaN (integers, booleans, strings) are finite by definition.
    """
    value = np.asarray(value)
    if value.dtype.kind not in "fc" or np.isfinite(value).all():
        return None
    return tuple(int(i) for i in np.argwhere(~np.isfinite(value))[0])


def _non_finite_entries(model, optimizer_state: dict):
    """(what, name, index, value) for each parameter, buffer or optimizer array with NaN/inf."""
    groups = (("parameter", model.params.items()), ("model buffer", _buffers(model).items()),
              ("optimizer state", optimizer_state.items()))
    for what, items in groups:
        for name, value in items:
            bad = first_non_finite(value)
            if bad is not None:
                yield what, name, bad, np.asarray(value)[bad]


def non_finite(model, optimizer=None) -> str | None:
    """What first holds NaN or inf among the parameters, buffers and optimizer state, e.g.
    "parameter dec.0.W holds nan at index (1, 2)"; None when everything is finite."""
    state = optimizer if isinstance(optimizer, dict) else _optimizer_state(optimizer)
    for what, name, index, value in _non_finite_entries(model, state):
        return f"{what} {name} holds {value} at index {index}"
    return None


def _check_finite_state(path: Path, model, optimizer_state: dict) -> None:
    """Refuse to save NaN or inf: a checkpoint must always be one that training can go on from."""
    detail = non_finite(model, optimizer_state)
    if detail is not None:
        kept = "the previous checkpoint is kept" if path.exists() else "nothing was written"
        raise NonFiniteState(
            f"{path}: not saved: {detail}, and a checkpoint must hold finite values ({kept})",
            detail)


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
    _check_zip_magic(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            members = {name: npz[name] for name in npz.files}
    except _READ_ERRORS as exc:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (damaged, truncated, or not an .npz "
            f"archive): {_reason(exc)}"
        ) from None
    if not isinstance(members, dict) or not members:
        raise CheckpointError(f"{path}: an empty archive, not a checkpoint")
    return _parse(path, members)


def saved_progress(path) -> tuple:
    """(epoch, step) of the checkpoint at ``path``, read without building its model."""
    path = checkpoint_path(path)
    _check_zip_magic(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            members = {name: npz[name] for name in ("epoch", "step")}
    except _READ_ERRORS as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint: {_reason(exc)}") from None
    return _int_member(path, members, "epoch"), _int_member(path, members, "step")


# How every .npz (a zip archive) begins: a local file header, or an empty archive's end record.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _check_zip_magic(path: Path) -> None:
    """Refuse a file that is not a zip archive before NumPy guesses what else it might be."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if head not in _ZIP_MAGIC:
        raise CheckpointError(
            f"{path}: not a readable checkpoint: not an .npz archive (it begins with {head!r}, "
            f"not a zip header); a checkpoint is the checkpoint.npz that npvae train writes")


def _reason(exc: BaseException) -> str:
    """An exception as text for a message, without NumPy's advice to load pickles unsafely."""
    text = str(exc)
    if "pickle" in text.lower():
        return ("it holds a pickled (object) member, which npvae never loads: "
                "a checkpoint holds plain arrays only")
    return f"{type(exc).__name__}: {text}"


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
    model = _build(path, config, members)
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
    if position is not None:
        _check_position(path, position)

    optimizer_state = {k[len("optim/"):]: v for k, v in members.items() if k.startswith("optim/")}
    _check_finite_members(path, "optimizer state", optimizer_state)
    _fill_buffers(path, model, members)
    return Checkpoint(path=path, model=model, optimizer_state=optimizer_state, rng=rng,
                      epoch=epoch, step=step, history=history, args=args, position=position)


# What a position inside an epoch holds (see npvae.train), and what each entry must be.
_POSITION_KEYS = ("batch", "epoch_rng", "sums", "seen", "seconds")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_position(path, position) -> None:
    """A position must say where in the epoch the run stopped, in the form npvae.train wrote."""
    if not isinstance(position, dict):
        _fail(path, f"member 'position' must be null or a JSON object, got {type(position).__name__}")
    missing = [k for k in _POSITION_KEYS if k not in position]
    if missing:
        _fail(path, f"member 'position' lacks {', '.join(missing)}: it does not say where in the "
                    f"epoch the run stopped, so the run cannot be resumed from it")
    problems = []
    if not _is_count(position["batch"]) or not _is_count(position["seen"]):
        problems.append("batch and seen must be integers >= 0")
    if not (_is_number(position["seconds"]) and position["seconds"] >= 0):
        problems.append("seconds must be a number >= 0")
    sums = position["sums"]
    if not (isinstance(sums, dict) and all(_is_number(v) for v in sums.values())):
        problems.append("sums must map names to finite numbers")
    try:
        rng_from_state(position["epoch_rng"])
    except (TypeError, KeyError, ValueError, AttributeError):
        problems.append("epoch_rng must be a numpy bit generator state")
    if not isinstance(position.get("changed", {}), dict):
        problems.append("changed must be a JSON object")
    if problems:
        _fail(path, f"member 'position' is malformed: {'; '.join(problems)}")


def _check_finite_members(path, what: str, arrays: dict) -> None:
    """Fail, naming the entry and the index, if any floating array holds NaN or inf."""
    for name, value in arrays.items():
        bad = first_non_finite(value)
        if bad is not None:
            _fail(path, f"{what} {name} holds {np.asarray(value)[bad]} at index {bad}; "
                        f"a checkpoint must hold finite values")


def _buffers(model) -> dict:
    """State a model keeps outside its parameters (e.g. the VQ-VAE's moving averages)."""
    buffers = getattr(model, "buffers", None)
    return dict(buffers) if isinstance(buffers, dict) else {}


def _fill_buffers(path, model, members) -> None:
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
    _check_finite_members(path, "model buffer", saved)
    for name, arr in expected.items():
        arr[...] = saved[name]


def param_count(config: dict) -> int | None:
    """How many parameters the model described by ``config`` has, computed without building it.

    Python integers, so an absurd config gives an absurd number, not an overflow or an
    allocation. None when the config is too malformed to say (building it then explains).
    """
    from .ops.mlp import mlp_shapes

    def mlp(sizes):
        return sum(math.prod(shape) for shape in mlp_shapes("", sizes).values())

    try:
        if "channels" in config:  # conv-vae, conv-vqvae
            return _conv_param_count(config)
        kind, d = config["kind"], int(config["data_dim"])
        hidden = [int(h) for h in config["hidden"]]
        if kind == "vqvae":
            width = int(config["num_vectors"]) * int(config["code_dim"])
            codebook = int(config["num_codes"]) * int(config["code_dim"])
            return mlp([d, *hidden, width]) + mlp([width, *hidden[::-1], d]) + codebook
        latent = int(config["latent"])
        if kind in ("vae", "vae-gaussian", "vae-bernoulli", "iwae", "ae"):
            code = latent if kind == "ae" else 2 * latent  # a VAE's encoder gives [mu, logvar]
            return mlp([d, *hidden, code]) + mlp([latent, *hidden[::-1], d])
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    return None


def _conv_param_count(config: dict) -> int | None:
    """param_count of a convolutional model (npvae.models.conv_vae, conv_vqvae): 4 x 4
    stride-2 convolutions and their transposes, and the layers between them."""
    c, h, w = (int(s) for s in config["image_shape"])
    chans = [int(k) for k in config["channels"]]
    ks = [c, *chans]
    convs = sum(16 * a * b + b for a, b in zip(ks[:-1], ks[1:]))  # enc.conv{i}
    convts = sum(16 * a * b + b for a, b in zip(ks[:0:-1], ks[-2::-1]))  # dec.convT{i}
    cells = (h >> len(chans)) * (w >> len(chans))  # positions of the last map
    if config["kind"] == "conv-vae":
        z, flat = int(config["latent"]), chans[-1] * cells
        return convs + convts + (flat + 1) * 2 * z + (z + 1) * flat  # + enc.fc, dec.fc
    if config["kind"] == "conv-vqvae":
        k, dz = int(config["num_codes"]), int(config["code_dim"])
        # enc.out (1 x 1 to Dz), dec.in (3 x 3 from Dz), the codebook
        return convs + convts + (chans[-1] + 1) * dz + (9 * dz + 1) * chans[-1] + k * dz
    return None


def _build(path, config, members):
    """The model a checkpoint's config describes, if the file holds that many parameters."""
    from .models import build  # here, so that importing this module stays light

    expected = param_count(config)
    held = sum(int(v.size) for k, v in members.items() if k.startswith("param/"))
    # Building allocates: refuse a config far larger than the file before it can exhaust
    # memory (a small difference is left to the parameter-by-parameter checks, which say more).
    if expected is not None and expected > 2 * held + 2**20:
        _fail(path, f"its config calls for {expected:,} parameters but the file holds {held:,}; "
                    f"config = {json.dumps(config)}")
    try:
        return build(config, rng=0)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        problem = f"its config does not describe a model ({exc}); config = {json.dumps(config)}"
    except MemoryError:
        problem = f"its config describes a model too large for this machine; config = {json.dumps(config)}"
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
        bad = first_non_finite(value)
        if bad is not None:
            _fail(path, f"parameter {name} holds {value[bad]} at index {bad}; "
                        "a checkpoint must hold finite parameters")
        view[...] = value
