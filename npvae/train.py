"""The training loop, meant to be read top to bottom.

    for each epoch:
        draw this epoch's binary sample of the data (dynamic binarization) and its order
        for each batch:
            copy the batch into one preallocated array
            loss, grads, stats = model.loss_and_grads(batch, rng=rng, step=step)
            clip the gradient norm, stop if the loss or gradient is NaN/inf
            optimizer step; the model's after_step hook (VQ-VAE moving averages)
        validation ELBO, one line of metrics.jsonl, checkpoint.npz

Randomness: one ``numpy.random.Generator``, seeded with ``seed``, supplies the epoch's
order, the dynamic binarization and the model's noise, in that order, and is saved in
every checkpoint. The same seed therefore gives bit-identical parameters on the same
backend and thread count, and a resumed run continues exactly where it stopped.
Data that must not change during a run (a static binary sample, the binary samples of
the validation and test images) and the noise used for validation come from separate
fixed streams, ``side_rng(seed, purpose)``, so that evaluation never moves the
training stream and every epoch is validated on the same draws.

Stopping:
- Ctrl-C: the current step finishes, a checkpoint is saved with the position inside
  the epoch, and :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) is raised.
  ``train(..., resume_from=run_dir)`` then ends with exactly the parameters an
  uninterrupted run would have had. A second Ctrl-C stops at once.
- SIGTERM and SIGHUP: the same as Ctrl-C (:class:`TrainingInterrupted` says which
  signal; the command line exits with 128 + its number).
- A NaN or inf loss or gradient: :class:`TrainingDiverged` names the step; the bad
  update is not applied and the last checkpoint on disk is left as it was. NaN or inf
  in the parameters or optimizer state at the end of an epoch is refused the same way
  (a checkpoint never holds it). Resume with a smaller ``lr`` or with ``clip``.

The run folder: :func:`run_lock` keeps a second process out of it for the whole run,
stale temporary files of a killed writer are removed when a run starts, and a folder
that cannot be written to is reported before the first step. metrics.jsonl appears with
the first finished epoch.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: runs are not locked
    fcntl = None

import numpy as np

from . import data as npdata
from . import schedule as schedules
from .atomic import write_text_atomic
from .checkpoint import (
    FILENAME, Checkpoint, CheckpointError, NonFiniteState, load_checkpoint, non_finite,
    rng_state, save_checkpoint,
)
from .threads import blas_threads, blas_threads_for

OPTIMIZERS = ("adam", "sgd")
BINARIZE = ("none", "static", "dynamic")
METRICS_FILE = "metrics.jsonl"
SGD_MOMENTUM = 0.9
EVAL_BATCH = 1000

# Fixed side streams, np.random.default_rng([seed, k]), one per purpose.
_SIDE_STREAMS = {"static": 1, "val-data": 2, "test-data": 3, "val-noise": 4,
                 "test-noise": 5, "figures": 6}


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN or inf; ``step`` and ``epoch`` say where."""

    def __init__(self, message, *, step, epoch, checkpoint=None):
        super().__init__(message)
        self.step, self.epoch, self.checkpoint = step, epoch, checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP stopped training; ``checkpoint`` is where the state was
    saved (or None), ``signum`` which signal it was (the exit status is 128 + signum)."""

    def __init__(self, message, *, checkpoint, epoch, step, signum=signal.SIGINT):
        super().__init__(message)
        self.message, self.checkpoint, self.epoch, self.step = message, checkpoint, epoch, step
        self.signum = signum

    def __str__(self):
        return self.message


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
_TEMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp")
_held = {}  # real path of a run folder -> [fd, depth]: this process's locks


def is_run_file(name: str) -> bool:
    """True for a file npvae writes into a run folder (not a temporary file)."""
    return name in RUN_FILES or bool(_SAMPLES.fullmatch(name))


def is_temp_file(name: str) -> bool:
    """True for a hidden temporary file through which npvae writes one of its run files."""
    m = _TEMP.fullmatch(name)
    return bool(m) and is_run_file(m.group("name"))


@contextlib.contextmanager
def run_lock(run_dir, create: bool = True):
    """Hold an exclusive ``flock`` on the run folder while writing into it.

    Raises :class:`RunInUse` at once if another process holds it. The kernel releases the
    lock when the process ends, however it ends (``kill -9`` included), so a crash never
    leaves a run locked. Re-entrant within a process (the command line holds it around
    ``train``, which takes it too). Creates the folder if needed; with ``create=False`` a
    missing folder is not locked (there is nothing in it to protect, and nothing is made).
    """
    run_dir = Path(run_dir)
    if not create and not run_dir.is_dir():
        yield run_dir
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key][1] += 1
    else:
        _held[key] = [_lock_folder(run_dir), 1]
    try:
        yield run_dir
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            fd = _held.pop(key)[0]
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


# ----------------------------------------------------------------------------- helpers


def side_rng(seed: int, purpose: str) -> np.random.Generator:
    """A fresh Generator for one fixed purpose, independent of the training stream."""
    return np.random.default_rng([int(seed), _SIDE_STREAMS[purpose]])


def binarize_for_eval(x, binarize: str, seed: int, split: str = "val") -> np.ndarray:
    """The fixed images a run is evaluated on: one Bernoulli sample when training binarizes.

    ``split`` is "val" or "test"; each has its own fixed stream.
    """
    if binarize == "none":
        return x
    return npdata.binarize_static(x, "sample", rng=side_rng(seed, f"{split}-data"))


def make_optimizer(name: str, params, lr: float, eps: float = 1e-8):
    """Adam (betas 0.9, 0.999, epsilon ``eps``) or SGD with momentum 0.9 over ``params``."""
    from . import optim

    if name == "adam":
        return optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=eps)
    if name == "sgd":
        return optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def fingerprint(x: np.ndarray) -> dict:
    """Shape, dtype and CRC-32 of an array: enough to notice different training data."""
    return {"shape": list(x.shape), "dtype": x.dtype.name,
            "crc32": zlib.crc32(np.ascontiguousarray(x).data) & 0xFFFFFFFF}


def read_metrics(run_dir) -> list:
    """The per-epoch rows of ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_metrics(path: Path, history) -> None:
    """Replace ``path`` with one line per row, atomically; no rows: no file at all."""
    if not history:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in history))


def _append_metrics(path: Path, row) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


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


def _static_sample(x, dtype, rng, rows: int = 4096) -> np.ndarray:
    """One Bernoulli sample of every pixel, as uint8 0/1, drawn a block of rows at a time."""
    out = np.empty(x.shape, dtype=np.uint8)
    for start in range(0, len(x), rows):
        block = x[start:start + rows]
        p = npdata.to_unit(block, dtype) if block.dtype == np.uint8 else block
        out[start:start + rows] = npdata.binarize_static(p, "sample", rng=rng)
    return out


def _check_inputs(model, x_train, x_val, epochs, batch_size, lr, optimizer, clip, binarize):
    for name, x in (("x_train", x_train), ("x_val", x_val)):
        if not isinstance(x, np.ndarray) or x.ndim != 2:
            raise ValueError(f"{name} must be a 2-D numpy array (N, D), got {type(x).__name__}"
                             f"{'' if not isinstance(x, np.ndarray) else ' of shape ' + str(x.shape)}")
        if x.dtype != model.dtype and x.dtype != np.uint8:
            raise ValueError(f"{name} must have the model's dtype {model.dtype} (values in [0, 1]) "
                             f"or be uint8 images (values 0-255), got {x.dtype}")
        if x.shape[0] < 1:
            raise ValueError(f"{name} must hold at least one example")
    if int(epochs) < 1 or int(batch_size) < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not (float(lr) > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if clip is not None and not float(clip) > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if binarize not in BINARIZE:
        raise ValueError(f"binarize must be one of {BINARIZE}, got {binarize!r}")


def _restore(model, opt, ck: Checkpoint, settings: dict) -> None:
    """Put a checkpoint's parameters, buffers and optimizer state into this run."""
    if ck.model.config != model.config:
        raise CheckpointError(
            f"{ck.path}: holds a model with config {json.dumps(ck.model.config)}, "
            f"not the model being trained ({json.dumps(model.config)})"
        )
    for key in ("batch_size", "optimizer", "binarize", "seed", "data", "schedule"):
        if ck.args.get(key, "constant" if key == "schedule" else None) != settings[key] \
                and (key in ck.args or key == "schedule"):
            what = "the training data differ" if key == "data" else (
                f"{key} was {ck.args[key]!r} and is now {settings[key]!r}")
            raise CheckpointError(
                f"{ck.path}: cannot continue this run: {what}; a resumed run must use "
                f"the same {key.replace('_', ' ')}"
            )
    if ck.model is not model:
        model.params.flat[...] = ck.model.params.flat
        for name, arr in getattr(model, "buffers", {}).items():
            arr[...] = ck.model.buffers[name]
    try:
        opt.load_state_dict(ck.optimizer_state)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ck.path}: its optimizer state does not fit: {exc}") from None


def validation_metrics(model, x_val, seed, batch_size) -> dict:
    """Validation ELBO and its terms; for a VQ-VAE also codebook perplexity and usage."""
    from . import evaluate

    rng = side_rng(seed, "val-noise")  # the same draws every epoch
    res = evaluate.elbo(model, x_val, rng, batch_size=batch_size)
    row = {f"val_{k}": float(res[k]) for k in ("loss", "elbo", "recon", "kl") if k in res}
    if model.config["kind"] == "vqvae":
        cb = evaluate.codebook_stats(model, x_val, batch_size=batch_size)
        row["val_perplexity"] = float(cb["perplexity"])
        row["val_used_fraction"] = float(cb["used_fraction"])
    return row


def _summary(row, epochs) -> str:
    text = (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.3f}  "
            f"val loss {row.get('val_loss', float('nan')):.3f}  "
            f"val ELBO {row.get('val_elbo', float('nan')):.3f}")
    if "val_kl" in row:
        text += f" (recon {row['val_recon']:.2f}, KL {row['val_kl']:.2f})"
    if "val_perplexity" in row:
        text += f"  perplexity {row['val_perplexity']:.1f}"
    return text + f"  {row['seconds']:.1f}s"


def _setting_changes(opt, ck: Checkpoint, lr: float, clip) -> dict:
    """Put ``lr`` into the restored optimizer; {name: [before, now]} for lr and clip if changed.

    A resumed run may lower the learning rate or add clipping (what a diverged run needs);
    the change is recorded in the metrics of the epoch in which it happened.
    """
    changes = {}
    before = float(ck.args.get("lr", opt.lr))  # the run's base rate (a schedule scales it)
    if before != float(lr):
        changes["lr"] = [before, float(lr)]
    if "clip" in ck.args and ck.args["clip"] != clip:
        changes["clip"] = [ck.args["clip"], clip]
    return changes


def _holding_run_lock(fn):
    """Run ``fn`` while holding :func:`run_lock` on its ``run_dir`` argument."""
    import functools

    @functools.wraps(fn)
    def locked(*args, run_dir, **kwargs):
        with run_lock(run_dir):
            return fn(*args, run_dir=run_dir, **kwargs)

    return locked


# ----------------------------------------------------------------------------- the loop


@_holding_run_lock
def train(model, x_train, x_val, *, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
          optimizer: str = "adam", clip: float | None = None, seed: int = 0,
          binarize: str = "none", run_dir, log_every: int = 10, progress: bool = True,
          verbose: bool = True, resume_from=None, checkpoint_every_epoch: bool = True,
          on_epoch_end=None, on_first_step=None, args: dict | None = None,
          schedule: str = "constant") -> list:
    """Train ``model`` in place for ``epochs`` epochs in total; returns the metrics history.

    x_train (N, D), x_val (V, D): arrays of the model's dtype, values in [0, 1] (grey
        levels), or uint8 images with values 0-255 (read as v / 255; kept as bytes and
        scaled one batch at a time, which saves three quarters of the memory).
        ``binarize`` "static" draws one binary sample of the training set; "dynamic"
        draws a fresh one for every batch, so each image is resampled on every visit.
    optimizer: "adam" or "sgd" (momentum 0.9); clip: max global gradient norm, or None.
    run_dir: receives metrics.jsonl (one JSON line per epoch) and checkpoint.npz. It is
        locked for the whole call (:class:`RunInUse` if another process holds it), its
        stale temporary files are removed, and it must be writable before training starts.
    log_every: steps between updates of the progress bar's loss; progress: show a
        tqdm bar (only on a terminal); verbose: print one summary line per epoch.
    resume_from: a checkpoint path, run directory or :class:`Checkpoint` to continue
        from; the other arguments must describe the same run, except that ``epochs`` may
        grow and ``lr`` and ``clip`` may change (recorded in that epoch's metrics).
    on_epoch_end: called as ``on_epoch_end(row)`` with each epoch's metrics dict.
    on_first_step: called with no arguments once the first step of this call is done.
    args: extra JSON-friendly settings stored in checkpoints (the command line keeps
        everything it needs to rebuild the run there).
    schedule: the learning-rate schedule by name (:mod:`npvae.schedule`): "constant",
        "burda" (Burda et al.'s 3,280 epochs, Adam epsilon 1e-4) or "burda:P" (the same
        stages in P epochs); the rate of each epoch follows from its index (SCHED.1).
    """
    from tqdm.auto import tqdm

    from .optim import clip_grad_norm

    _check_inputs(model, x_train, x_val, epochs, batch_size, lr, optimizer, clip, binarize)
    run_dir = Path(run_dir)  # created and locked by _holding_run_lock
    clean_temp_files(run_dir)  # leftovers of a killed writer: no live one holds the lock
    check_writable(run_dir)  # fail now, not after the first epoch
    ckpt_path, metrics_path = run_dir / FILENAME, run_dir / METRICS_FILE
    schedules.parse(schedule)  # a clear error for an unknown schedule, before any work
    settings = dict(args or {}, epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
                    optimizer=optimizer, clip=clip, seed=int(seed), binarize=binarize,
                    data=fingerprint(x_train), schedule=schedule)

    # ---- data: kept as given (uint8 images stay uint8: a quarter of the memory) and
    # turned into a float batch of the model's dtype one batch at a time
    n, d = x_train.shape
    x_base, scale = x_train, (255 if x_train.dtype == np.uint8 else None)
    if binarize == "static":  # one fixed binary sample, as 0/1 bytes
        x_base, scale = _static_sample(x_train, model.dtype, side_rng(seed, "static")), 1
    if x_val.dtype == np.uint8:
        x_val = npdata.to_unit(x_val, model.dtype)
    x_val = binarize_for_eval(x_val, binarize, seed, "val")
    n_batches = -(-n // batch_size)
    batch = np.empty((min(batch_size, n), d), dtype=model.dtype)  # reused by every step
    raw = np.empty((min(batch_size, n), d), dtype=np.uint8) if scale else None

    # ---- state: fresh, or as a checkpoint left it
    rng = np.random.default_rng(seed)
    opt = make_optimizer(optimizer, model.params, lr, eps=schedules.adam_eps(schedule))
    start_epoch, step, history, resume, changes = 0, 0, [], None, {}
    if resume_from is not None:
        ck = resume_from if isinstance(resume_from, Checkpoint) else load_checkpoint(resume_from)
        _restore(model, opt, ck, settings)
        start_epoch, step, history = ck.epoch, ck.step, list(ck.history)
        rng.bit_generator.state = rng_state(ck.rng)
        if ck.position is not None:
            if ck.position["batch"] > n_batches:
                raise CheckpointError(f"{ck.path}: its position, batch {ck.position['batch']}, "
                                      f"lies beyond the {n_batches} batches of an epoch")
            resume = dict(ck.position, rng=rng_state(ck.rng))
        changes = _setting_changes(opt, ck, lr, clip)
    _write_metrics(metrics_path, history)  # forget epochs the checkpoint does not hold
    before_batch = getattr(model, "on_batch_start", None)  # e.g. k-means codebook init
    after_step = getattr(model, "after_step", None)  # e.g. moving-average codebook

    # What a checkpoint written now would hold: "boundary" between epochs, a dict
    # (the position inside an epoch) between steps, None while parameters change.
    here = "boundary" if resume is None else None
    boundary_rng = rng_state(rng)
    step_at_start = step
    stop = _DeferredInterrupt()
    try:
        grad_buf = model.params.empty_like()  # backward writes here on every step
        with stop, blas_threads(blas_threads_for(model.params, batch_size)):
            for epoch in range(start_epoch, epochs):
                opt.lr = schedules.lr_at(schedule, lr, epoch)  # (SCHED.1)
                # -- the epoch's binary sample and order, drawn from the run's stream
                epoch_rng = resume["epoch_rng"] if resume else rng_state(rng)
                rng.bit_generator.state = epoch_rng
                order = rng.permutation(n)
                first, sums, seen, seconds = 0, {}, 0, 0.0
                if resume:  # continue inside this epoch, where the checkpoint stopped
                    first, sums, seen = resume["batch"], resume["sums"], resume["seen"]
                    seconds = resume["seconds"]
                    rng.bit_generator.state = resume["rng"]
                    resume = None
                t0 = time.perf_counter() - seconds
                here = dict(epoch=epoch, batch=first, epoch_rng=epoch_rng, sums=dict(sums),
                            seen=seen, seconds=seconds, rng=rng_state(rng))

                with tqdm(total=n_batches, initial=first, desc=f"epoch {epoch + 1}/{epochs}",
                          unit="batch", disable=None if progress else True, leave=False,
                          dynamic_ncols=True, file=sys.stderr) as bar:
                    for b in range(first, n_batches):
                        if stop.requested:
                            raise KeyboardInterrupt
                        # -- forward and backward on one batch
                        idx = order[b * batch_size:(b + 1) * batch_size]
                        xb = batch[:idx.size]
                        if scale is None:
                            np.take(x_base, idx, axis=0, out=xb)  # (B, D), contiguous
                        else:
                            np.take(x_base, idx, axis=0, out=raw[:idx.size])  # (B, D) bytes
                            np.divide(raw[:idx.size], xb.dtype.type(scale), out=xb)  # to [0, 1]
                        if binarize == "dynamic":  # a fresh Bernoulli sample, every visit
                            npdata.binarize_dynamic(xb, rng, out=xb)
                        if before_batch is not None:
                            before_batch(xb, rng)
                        loss, grads, stats = model.loss_and_grads(xb, rng=rng, step=step, out=grad_buf)
                        # the gradient norm: on steps that clip or log (a pass over every
                        # gradient); Adam counts non-finite gradients in its own pass
                        measure = clip is not None or step % log_every == 0 or b + 1 == n_batches
                        grad_norm = clip_grad_norm(grads, clip) if measure else 0.0  # before clipping
                        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                            raise _diverged(loss, grad_norm, step, epoch, b, n_batches, ckpt_path)
                        # -- update (no consistent state to save until the step is counted)
                        here = None
                        if opt.step(grads):  # non-finite gradient entries: the update is spoilt
                            raise _diverged(loss, math.nan, step, epoch, b, n_batches, ckpt_path,
                                            applied=True)
                        if after_step is not None:
                            after_step(rng)
                        step += 1
                        if on_first_step is not None:
                            on_first_step()
                            on_first_step = None
                        # -- bookkeeping: example-weighted sums of every stat
                        m = idx.size
                        for k, v in stats.items():
                            sums[k] = sums.get(k, 0.0) + float(v) * m
                        if measure:
                            sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm * m
                            sums["grad_norm_seen"] = sums.get("grad_norm_seen", 0) + m
                        seen += m
                        here = dict(epoch=epoch, batch=b + 1, epoch_rng=epoch_rng, sums=dict(sums),
                                    seen=seen, seconds=time.perf_counter() - t0, rng=rng_state(rng))
                        bar.update(1)
                        if step % log_every == 0 or b + 1 == n_batches:
                            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", refresh=False)

                # -- end of epoch: validation, metrics, checkpoint
                train_seconds = time.perf_counter() - t0
                t1 = time.perf_counter()
                row = {"epoch": epoch + 1, "step": step, "lr": float(opt.lr), "clip": clip}
                if changes:  # a resume in (or before) this epoch changed lr or clip
                    row["changed"] = dict(changes, step=step_at_start)
                    changes = {}
                row.update({f"train_{k}": v / seen for k, v in sums.items()
                            if k not in ("kl_weight", "grad_norm", "grad_norm_seen")})
                if "kl_weight" in sums:  # an epoch mean that is not a loss term
                    row["kl_weight"] = sums["kl_weight"] / seen
                if sums.get("grad_norm_seen"):  # mean over the steps that measured it
                    row["grad_norm"] = sums["grad_norm"] / sums["grad_norm_seen"]
                bad = non_finite(model, opt)  # NaN the loss did not show: stop before using it
                if bad is not None:
                    raise _diverged_state(bad, step, epoch, ckpt_path)
                row.update(validation_metrics(model, x_val, seed, min(EVAL_BATCH, len(x_val))))
                row["seconds"] = train_seconds
                row["val_seconds"] = time.perf_counter() - t1
                history.append(row)
                if checkpoint_every_epoch or epoch + 1 == epochs:
                    try:
                        save_checkpoint(ckpt_path, model, opt, rng, epoch + 1, step, history,
                                        settings)
                    except NonFiniteState as exc:  # NaN that the loss and gradient did not show
                        raise _diverged_state(exc.detail, step, epoch, ckpt_path) from None
                here, boundary_rng = "boundary", rng_state(rng)
                _append_metrics(metrics_path, row)
                if verbose:
                    print(_summary(row, epochs), flush=True)
                if on_epoch_end is not None:
                    on_epoch_end(row)
                if stop.requested and epoch + 1 < epochs:
                    raise KeyboardInterrupt
    except KeyboardInterrupt as exc:
        # -- Ctrl-C, SIGTERM or SIGHUP: save the last consistent state, then stop
        signum = getattr(exc, "signum", None) or stop.signum or signal.SIGINT
        epochs_done = history[-1]["epoch"] if history else start_epoch
        saved, where = None, ""
        try:
            if isinstance(here, dict):  # between two steps (or inside a step that changed nothing)
                rng.bit_generator.state = here["rng"]  # undo draws of a step cut short
                position = {k: here[k] for k in ("batch", "epoch_rng", "sums", "seen", "seconds")}
                saved = save_checkpoint(ckpt_path, model, opt, rng, here["epoch"], step,
                                        history, settings, position=position)
                where = f"in epoch {here['epoch'] + 1} after {here['batch']} of {n_batches} batches"
            elif here == "boundary":  # between epochs
                rng.bit_generator.state = boundary_rng  # undo the next epoch's draws, if any
                saved = save_checkpoint(ckpt_path, model, opt, rng, epochs_done, step, history,
                                        settings)
                where = f"after epoch {epochs_done}"
        except NonFiniteState:  # the state to save holds NaN: keep the last good file
            here = None
        if saved is None and ckpt_path.exists():  # stopped mid-update, or NaN: keep the last one
            saved, where = ckpt_path, _saved_epoch(ckpt_path)
        name = signal_name(signum)
        msg = (f"stopped by {name}; the state {where} is saved in {saved}" if saved
               else f"stopped by {name} before anything could be saved")
        raise TrainingInterrupted(msg, checkpoint=saved, epoch=epochs_done, step=step,
                                  signum=signum) from None
    return history


def _saved_epoch(path) -> str:
    """'after epoch E' for the checkpoint at ``path``, as far as it can be read."""
    try:
        return f"after epoch {load_checkpoint(path).epoch}"
    except CheckpointError:
        return "as it was on disk"


def _what_next(ckpt_path: Path) -> str:
    """What a diverged run can do: what is kept, and how to go on with a smaller step."""
    if ckpt_path.exists():
        return (f"the last good checkpoint, {ckpt_path} ({_saved_epoch(ckpt_path)}), is kept. "
                f"Continue from it with a smaller learning rate or gradient clipping: "
                f"npvae train --resume {ckpt_path.parent} --lr LR --clip NORM "
                f"(in Python: train(..., resume_from=run_dir, lr=..., clip=...))")
    return ("no checkpoint had been saved yet. Start again with a smaller learning rate "
            "(--lr) or gradient clipping (--clip NORM)")


def _diverged(loss, grad_norm, step, epoch, b, n_batches, ckpt_path,
              applied: bool = False) -> TrainingDiverged:
    """``applied``: the optimizer found the non-finite gradient while making the update,
    so the parameters in memory are spoilt (they are never saved)."""
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    if applied:
        what, value, fate = "gradient", "non-finite", "the spoilt parameters were not saved"
    else:
        fate = "that update was not applied"
    return TrainingDiverged(
        f"training diverged: the {what} became {value} at step {step} (epoch {epoch + 1}, "
        f"batch {b + 1} of {n_batches}); {fate} and "
        f"{_what_next(ckpt_path)}.",
        step=step, epoch=epoch + 1, checkpoint=ckpt_path if ckpt_path.exists() else None)


def _diverged_state(detail: str, step, epoch, ckpt_path) -> TrainingDiverged:
    """The model or optimizer state holds NaN or inf at the end of an epoch: not saved."""
    return TrainingDiverged(
        f"training diverged: at the end of epoch {epoch + 1} (step {step}) the {detail}; "
        f"that state was not saved and {_what_next(ckpt_path)}.",
        step=step, epoch=epoch + 1, checkpoint=ckpt_path if ckpt_path.exists() else None)
