"""The training loop, meant to be read top to bottom.

    for each epoch:
        draw this epoch's binary sample of the data (dynamic binarization) and its order
        for each batch:
            copy the batch into one preallocated array
            fwd = model.forward(batch, rng=rng, step=step)    the loss, its terms, caches
            grads = model.backward(fwd)
            clip the gradient norm, stop if the loss or gradient is NaN/inf
            optimizer step; model.after_step(fwd, rng) (VQ-VAE moving averages)
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

The run folder (:mod:`npvae.runs`): :func:`run_lock` keeps a second process out of it for the whole run,
stale temporary files of a killed writer are removed when a run starts, and a folder
that cannot be written to is reported before the first step. metrics.jsonl appears with
the first finished epoch.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import sys
import time
import warnings
import zlib
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import data as npdata
from . import schedule as schedules
from .atomic import write_text_atomic
from .checkpoint import (
    FILENAME, Checkpoint, CheckpointError, NonFiniteState, checkpoint_path, load_checkpoint,
    non_finite, rng_state, save_checkpoint, saved_progress,
)
from ._validate import is_integer, is_positive_real
from .data.packed import PackedImages
from .data.rows import bernoulli_rows, nonzero_in_rows
from .optim import clip_grad_norm
from .runs import (  # noqa: F401  (the run folder's names stay importable from here)
    METRICS_FILE, RunInUse, _DeferredInterrupt, check_writable, clean_temp_files, is_run_file,
    is_temp_file, remove_run_files, run_lock, signal_name, stop_on_signals,
)
from .threads import blas_threads, blas_threads_for

OPTIMIZERS = ("adam", "sgd")
BINARIZE = ("none", "static", "dynamic")
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
    saved (or None), ``signum`` which signal it was (the exit status is 128 + signum).
    ``finished``: the stop came after the last epoch's steps, so the run is complete."""

    def __init__(self, message, *, checkpoint, epoch, step, signum=signal.SIGINT,
                 finished=False):
        super().__init__(message)
        self.message, self.checkpoint, self.epoch, self.step = message, checkpoint, epoch, step
        self.signum, self.finished = signum, finished

    def __str__(self):
        return self.message


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


def fingerprint(x) -> dict:
    """Shape, dtype and CRC-32 of an array: enough to notice different training data.

    Packed images (:class:`~npvae.data.packed.PackedImages`) give the fingerprint of the
    dense bytes they hold, so a run may resume from either form of the same images.
    """
    if isinstance(x, PackedImages):
        crc = 0
        for _, block in x.blocks():
            crc = zlib.crc32(block.data, crc)
    else:
        crc = zlib.crc32(np.ascontiguousarray(x).data)
    return {"shape": list(x.shape), "dtype": x.dtype.name, "crc32": crc & 0xFFFFFFFF}


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


def _static_sample(x, dtype, rng, rows: int = 4096):
    """One Bernoulli sample of every pixel, as uint8 0/1, drawn a block of rows at a time
    (packed again when ``x`` is packed: the sample is zero wherever the image is)."""
    def sampled():
        blocks = x.blocks(rows) if isinstance(x, PackedImages) else \
            ((start, x[start:start + rows]) for start in range(0, len(x), rows))
        for _, block in blocks:
            p = npdata.to_unit(block, dtype) if block.dtype == np.uint8 else block
            yield npdata.binarize_static(p, "sample", rng=rng).astype(np.uint8)  # 0/1 bytes

    if isinstance(x, PackedImages):
        return PackedImages.from_blocks(sampled(), x.shape[1], x.width)
    out = np.empty(x.shape, dtype=np.uint8)
    for start, block in zip(range(0, len(x), rows), sampled()):
        out[start:start + rows] = block
    return out


def _check_inputs(model, x_train, x_val, epochs, batch_size, lr, optimizer, clip, binarize,
                  schedule, seed=0, log_every=1, args=None):
    """Every argument of :func:`train`, and every value of the data, before any work: each
    mistake is named, with the row of the caller's array where the data is at fault."""
    for name, x in (("x_train", x_train), ("x_val", x_val)):
        if name == "x_train" and isinstance(x, PackedImages):
            pass  # bytes, packed: (N, D) uint8 by construction
        elif isinstance(x, PackedImages):
            raise ValueError(f"{name} must be a numpy array: pass {name}.unpack() (only "
                             f"x_train may be packed)")
        elif not isinstance(x, np.ndarray) or x.ndim != 2:
            raise ValueError(f"{name} must be a 2-D numpy array (N, D), got {type(x).__name__}"
                             f"{'' if not isinstance(x, np.ndarray) else ' of shape ' + str(x.shape)}")
        if x.dtype != model.dtype and x.dtype != np.uint8:
            raise ValueError(f"{name} must have the model's dtype {model.dtype} (values in [0, 1]) "
                             f"or be uint8 images (values 0-255), got {x.dtype}")
        if x.shape[0] < 1:
            raise ValueError(f"{name} must hold at least one example")
        if x.dtype == np.uint8:  # bytes are read as v / 255: in [0, 1] by construction
            width = model.config.get("data_dim")
            if width is not None and x.shape[1] != width:
                raise ValueError(f"{name} must have {width} features per example, got {x.shape}")
        else:
            model.check_x(x, name)  # the width, NaN and inf, [0, 1] for a Bernoulli decoder
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("log_every", log_every)):
        if not (is_integer(value) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not (is_integer(seed) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0 (the run's streams derive from it), "
                         f"got {seed!r}")
    if not is_positive_real(lr):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if clip is not None and not is_positive_real(clip):
        raise ValueError(f"clip must be a positive number or None, got {clip!r}")
    if binarize not in BINARIZE:
        raise ValueError(f"binarize must be one of {BINARIZE}, got {binarize!r}")
    schedules.parse(schedule)  # a clear error for an unknown schedule, before any work
    try:
        json.dumps(args or {})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"args must be JSON-friendly (it is stored in checkpoints): {exc}") from None


def _check_run_dir(run_dir, resume_from, overwrite: bool) -> Path:
    """A call must not silently replace another run: a folder holding a checkpoint or
    metrics is refused unless the call continues that very run (``resume_from`` is its
    checkpoint as it is on disk now) or asks to overwrite it."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise ValueError(f"run_dir must be a folder path (it receives metrics.jsonl and "
                         f"checkpoint.npz), got {run_dir!r}")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir {run_dir} is a file, not a folder")
    held = [name for name in (FILENAME, METRICS_FILE) if (run_dir / name).exists()]
    if not held or overwrite:
        return run_dir
    if resume_from is None:
        raise ValueError(f"{run_dir} already holds a run ({', '.join(held)}); pass "
                         f"resume_from={str(run_dir)!r} to continue it, overwrite=True to "
                         f"replace it, or another run_dir")
    problem = _not_continued_by(run_dir, resume_from)
    if problem:
        raise ValueError(f"{run_dir} already holds a run ({', '.join(held)}), and {problem}. "
                         f"Pass resume_from={str(run_dir)!r} to continue the run in it, "
                         f"overwrite=True to replace it, or a new or empty run_dir to branch off")
    return run_dir


def _not_continued_by(run_dir: Path, resume_from) -> str | None:
    """Why training on from ``resume_from`` would not continue the run in ``run_dir``
    (it would replace that run, or roll it back), or None when it continues it."""
    ours = run_dir / FILENAME
    is_ck = isinstance(resume_from, Checkpoint)
    source = resume_from.path if is_ck else checkpoint_path(resume_from)
    if source is None or not ours.exists() or os.path.realpath(source) != os.path.realpath(ours):
        return f"resume_from is another checkpoint ({source}): training on from it would replace that run"
    epoch, step = saved_progress(ours) if is_ck else (None, None)
    if is_ck and (epoch, step) != (resume_from.epoch, resume_from.step):
        return (f"resume_from is its checkpoint as loaded at step {resume_from.step} (epoch "
                f"{resume_from.epoch}), but the run has since reached step {step} (epoch "
                f"{epoch}): training on from it would roll the run back")
    return None


# How dynamic binarization draws its uniforms, saved with each run's settings: one per
# non-zero byte of a batch, in reading order (BIN.1). Runs saved before the setting
# existed drew one per pixel.
DRAWS = "one per non-zero byte"
_OLD_DRAWS = ("{path}: this run was saved by an earlier npvae, whose dynamic binarization "
              "drew one uniform per pixel; from here on it draws one per non-zero pixel "
              "(each pixel is still a Bernoulli draw of its grey level). The run goes on "
              "validly, but no longer as the earlier npvae would have continued it, bit "
              "for bit")


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
    if settings["binarize"] == "dynamic" and ck.args.get("draws") != DRAWS:
        warnings.warn(_OLD_DRAWS.format(path=ck.path), RuntimeWarning, stacklevel=5)  # at the call of train
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
    from .kinds import is_vq

    rng = side_rng(seed, "val-noise")  # the same draws every epoch
    res = evaluate.elbo(model, x_val, rng, batch_size=batch_size)
    row = {f"val_{k}": float(res[k]) for k in ("loss", "elbo", "recon", "kl") if k in res}
    if model.config.get("kind") == "iwae":  # its objective is -L_k (IWAE.1): val as train
        row["val_loss"] = sum(model.loss(x_val[start:stop], rng=rng) * (stop - start)
                              for start, stop in evaluate._batches(len(x_val), batch_size)
                              ) / len(x_val)
    if is_vq(model):
        cb = evaluate.codebook_stats(model, x_val, batch_size=batch_size)
        row["val_perplexity"] = float(cb["perplexity"])
        row["val_used_fraction"] = float(cb["used_fraction"])
    return row


def _summary(row, epochs, elbo_name: str = "ELBO") -> str:
    """One line per epoch. ``elbo_name``: what val_elbo is for the model (a learned prior's
    is the exact log p(c), not a bound)."""
    text = (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.3f}  "
            f"val loss {row.get('val_loss', float('nan')):.3f}  "
            f"val {elbo_name} {row.get('val_elbo', float('nan')):.3f}")
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


# ----------------------------------------------------------------------------- the loop


class Position(NamedTuple):
    """Where a run stands between two steps, as a checkpoint saved now would record it.

    ``batch`` None: at an epoch boundary, ``epoch`` epochs done. Otherwise inside epoch
    ``epoch`` (from 0) after ``batch`` batches, with the epoch's starting stream
    ``epoch_rng``, the example-weighted ``sums`` of the stats over ``seen`` examples and
    ``seconds`` of training so far. ``rng``: the run's stream at this point.
    """

    epoch: int
    batch: int | None
    epoch_rng: dict | None
    sums: dict | None
    seen: int
    seconds: float
    rng: dict


class _Batches:
    """The training images as a source of batches in the model's dtype.

    uint8 images stay uint8 (a quarter of the memory) and are scaled one batch at a time;
    packed images (:mod:`npvae.data.packed`) are turned into a batch straight from their
    spans.
    "static" binarization draws one fixed binary sample up front (as 0/1 bytes), "dynamic"
    a fresh one of every batch from the run's stream. One batch array is reused by every step.
    """

    def __init__(self, x, dtype, batch_size, binarize, seed):
        self.n, d = x.shape
        self.per_epoch = -(-self.n // batch_size)
        self.x, self.scale = x, (255 if x.dtype == np.uint8 else None)
        if binarize == "static":  # one fixed binary sample, as 0/1 bytes
            self.x, self.scale = _static_sample(x, dtype, side_rng(seed, "static")), 1
        self.dynamic = binarize == "dynamic"
        self.batch = np.empty((min(batch_size, self.n), d), dtype=dtype)
        self.from_bytes = self.dynamic and self.scale == 255  # sampled straight from the bytes
        self.packed = isinstance(self.x, PackedImages)
        self.raw = np.empty((min(batch_size, self.n), d), dtype=np.uint8) \
            if self.scale and not (self.from_bytes or self.packed) else None
        self.uniform = np.empty(self.batch.size, self.batch.dtype) if self.from_bytes else None
        if self.from_bytes:  # count the non-zero bytes of a batch, and sample it
            x = self.x
            self.count, self.sample = (x.nonzero_in_rows, x.bernoulli_rows) if self.packed \
                else (partial(nonzero_in_rows, x), partial(bernoulli_rows, x))

    def fill(self, idx, rng) -> np.ndarray:
        """The examples ``idx`` as a (B, D) batch in [0, 1] (a view of the reused array)."""
        xb = self.batch[:idx.size]
        x = self.x
        if self.from_bytes:  # count the non-zero bytes, draw, then gather, scale and sample
            u = self.uniform[:self.count(idx)]  # (M,): one per non-zero byte
            return self.sample(idx, rng.random(dtype=xb.dtype, out=u), xb)
        if self.scale is None:
            np.take(x, idx, axis=0, out=xb)  # (B, D), contiguous
        elif self.packed:
            x.scaled_rows(idx, xb, self.scale)  # to [0, 1], from the spans  (BIN.2)
        else:
            np.take(x, idx, axis=0, out=self.raw[:idx.size])  # (B, D) bytes
            np.divide(self.raw[:idx.size], xb.dtype.type(self.scale), out=xb)  # to [0, 1]
        if self.dynamic:  # a fresh Bernoulli sample, every visit
            npdata.binarize_dynamic(xb, rng, out=xb)
        return xb


def _open_run(run_dir: Path) -> tuple:
    """Ready a locked run folder for writing: (checkpoint path, metrics path)."""
    clean_temp_files(run_dir)  # leftovers of a killed writer: no live one holds the lock
    check_writable(run_dir)  # fail now, not after the first epoch
    return run_dir / FILENAME, run_dir / METRICS_FILE


def _resume(ck, model, opt, rng, settings, n_batches, lr, clip):
    """Restore checkpoint ``ck`` into this run, if there is one: (start epoch,
    step, history, position inside an epoch or None, changes for the first epoch's row).

    The changes are None, or {"lr": [before, now], ..., "step": where the resume happened},
    with the changes of an earlier resume stopped inside the same epoch first (their
    "then": these).
    """
    if ck is None:
        return 0, 0, [], None, None
    _restore(model, opt, ck, settings)
    rng.bit_generator.state = rng_state(ck.rng)
    resume, earlier = None, None
    if ck.position is not None:
        p = ck.position
        if p["batch"] > n_batches:
            raise CheckpointError(f"{ck.path}: its position, batch {p['batch']}, "
                                  f"lies beyond the {n_batches} batches of an epoch")
        resume = Position(ck.epoch, p["batch"], p["epoch_rng"], p["sums"], p["seen"],
                          p["seconds"], rng_state(ck.rng))
        earlier = p.get("changed")  # a resume into this epoch that was stopped in it
    changes = _setting_changes(opt, ck, lr, clip)
    changed = _then(earlier, dict(changes, step=ck.step) if changes else None)
    return ck.epoch, ck.step, list(ck.history), resume, changed


def _then(earlier, later):
    """Two resumes' changes within one epoch, in order: ``earlier`` with "then": ``later``."""
    if earlier is None or later is None:
        return earlier or later
    return dict(earlier, then=_then(earlier.get("then"), later))


def _as_unit(x, dtype) -> np.ndarray:
    """uint8 images as floats in [0, 1]; anything else as it is."""
    return npdata.to_unit(x, dtype) if x.dtype == np.uint8 else x


def _start_epoch(rng, n, epoch, resume) -> tuple:
    """(order of the n examples, Position at the epoch's first step), drawn from the run's
    stream ``rng``, or as a checkpoint stopped inside this epoch (``resume``)."""
    epoch_rng = resume.epoch_rng if resume else rng_state(rng)
    rng.bit_generator.state = epoch_rng
    order = rng.permutation(n)
    here = resume or Position(epoch, 0, epoch_rng, {}, 0, 0.0, rng_state(rng))
    rng.bit_generator.state = here.rng  # where the checkpoint's stream stood, if resuming
    return order, here


def _between_epochs(epochs_done, rng) -> Position:
    """The position after ``epochs_done`` whole epochs, with the run's stream as it is now."""
    return Position(epochs_done, None, None, None, 0, 0.0, rng_state(rng))


def _progress_bar(n_batches, done, epoch, epochs, progress):
    """A tqdm bar over an epoch's batches on stderr, from batch ``done`` (off when not on a
    terminal, or when ``progress`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=n_batches, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                disable=None if progress else True, leave=False, dynamic_ncols=True,
                file=sys.stderr)


def _forward_backward(model, xb, rng, step, out, clip, measure) -> tuple:
    """One batch through the model and back: (the forward record, grads written into
    ``out``, gradient norm before clipping to ``clip``).

    The norm is a pass over every gradient, so it is measured only when ``measure`` (steps
    that clip or log), else 0.0; Adam counts non-finite gradients in its own pass.
    """
    model.on_batch_start(xb, rng)
    fwd = model.forward(xb, rng=rng, step=step)
    grads = model.backward(fwd, out)
    grad_norm = clip_grad_norm(grads, clip) if measure else 0.0
    return fwd, grads, grad_norm


def _show_loss(bar, sums, seen, log: bool) -> None:
    """One step done on the bar; on steps that ``log``, the epoch's mean loss so far."""
    bar.update(1)
    if log:
        bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", refresh=False)


def _add_stats(sums: dict, stats: dict, m: int, grad_norm) -> int:
    """Add a step's stats, weighted by its ``m`` examples, to the epoch's ``sums``; returns m."""
    for k, v in stats.items():
        sums[k] = sums.get(k, 0.0) + float(v) * m
    if grad_norm is not None:  # measured on this step
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm * m
        sums["grad_norm_seen"] = sums.get("grad_norm_seen", 0) + m
    return m


def _epoch_row(epoch, step, opt, clip, sums, seen, changed=None) -> dict:
    """An epoch's line of metrics.jsonl before validation: means of the training stats.

    ``changed``: the settings a resume in this epoch changed (lr, clip), recorded in the row.
    """
    row = {"epoch": epoch + 1, "step": step, "lr": float(opt.lr), "clip": clip}
    if changed:  # {"lr": [before, now], ..., "step": where the resume happened}
        row["changed"] = changed
    row.update({f"train_{k}": v / seen for k, v in sums.items()
                if k not in ("kl_weight", "grad_norm", "grad_norm_seen")})
    if "kl_weight" in sums:  # an epoch mean that is not a loss term
        row["kl_weight"] = sums["kl_weight"] / seen
    if sums.get("grad_norm_seen"):  # mean over the steps that measured it
        row["grad_norm"] = sums["grad_norm"] / sums["grad_norm_seen"]
    return row


def _validated(row, model, x_val, seed, train_seconds) -> dict:
    """The epoch's row with the validation metrics and the time each part took."""
    t1 = time.perf_counter()
    row.update(validation_metrics(model, x_val, seed, min(EVAL_BATCH, len(x_val))))
    row["seconds"], row["val_seconds"] = train_seconds, time.perf_counter() - t1
    return row


def _report(row, metrics_path, epochs, verbose, on_epoch_end, elbo_name="ELBO") -> None:
    """Tell of a finished epoch: a line of metrics.jsonl, a summary, the caller's callback."""
    _append_metrics(metrics_path, row)
    if verbose:
        print(_summary(row, epochs, elbo_name), flush=True)
    if on_epoch_end is not None:
        on_epoch_end(row)


def _check_state(model, opt, step, epoch, ckpt_path, epochs) -> None:
    """NaN or inf in the parameters or optimizer state the loss did not show: stop now."""
    bad = non_finite(model, opt)
    if bad is not None:
        raise _diverged_state(bad, step, epoch, ckpt_path, epochs)


def _save(ckpt_path, model, opt, rng, epochs_done, step, history, settings, position=None):
    """save_checkpoint, with non-finite state reported as a divergence."""
    try:
        return save_checkpoint(ckpt_path, model, opt, rng, epochs_done, step, history,
                               settings, position=position)
    except NonFiniteState as exc:  # NaN that the loss and gradient did not show
        raise _diverged_state(exc.detail, step, epochs_done - 1, ckpt_path,
                              settings["epochs"]) from None
    except OSError as exc:  # a full disk, a folder gone: the file written before is intact
        ckpt_path = Path(ckpt_path)
        kept = (f"the checkpoint saved before is kept; continue from it with npvae train "
                f"--resume {shlex.quote(str(ckpt_path.parent))} once the cause is fixed"
                if ckpt_path.exists() else "no checkpoint had been saved yet")
        raise OSError(exc.errno, f"could not save {ckpt_path} (epochs done: {epochs_done}): "
                                 f"{exc.strerror or exc}; {kept}") from exc


def _save_position(here, ckpt_path, model, opt, rng, epochs_done, step, history, settings,
                   n_batches, changed=None) -> tuple:
    """Save the state at ``here`` after a stop: (the file, where in the run), or (None, "").

    ``changed``: a resume's changes to record in the row of the epoch stopped in.
    """
    saved, where = None, ""
    try:
        if here is not None and here.batch is not None:  # between two steps
            rng.bit_generator.state = here.rng  # undo draws of a step cut short
            position = dict(batch=here.batch, epoch_rng=here.epoch_rng, sums=here.sums,
                            seen=here.seen, seconds=here.seconds)
            if changed:  # until the epoch's row records it
                position["changed"] = changed
            done = [row for row in history if row["epoch"] <= here.epoch]  # not this epoch's
            saved = save_checkpoint(ckpt_path, model, opt, rng, here.epoch, step, done,
                                    settings, position=position)
            where = f"in epoch {here.epoch + 1} after {here.batch} of {n_batches} batches"
        elif here is not None:  # between epochs
            rng.bit_generator.state = here.rng  # undo the next epoch's draws, if any
            saved = save_checkpoint(ckpt_path, model, opt, rng, epochs_done, step, history,
                                    settings)
            where = f"after epoch {epochs_done}"
    except NonFiniteState:  # the state to save holds NaN: keep the last good file
        saved = None
    if saved is None and ckpt_path.exists():  # stopped mid-update, or NaN: keep the last one
        saved, where = ckpt_path, _saved_state(ckpt_path)[0]
    return saved, where


def _save_on_stop(exc, stop, here, ckpt_path, model, opt, rng, start_epoch, step, history,
                  settings, n_batches, epochs, changed) -> TrainingInterrupted:
    """Ctrl-C, SIGTERM or SIGHUP stopped the loop at ``here``: save that state, and return
    what :func:`train` raises, saying where the state was saved, if anywhere."""
    signum = getattr(exc, "signum", None) or stop.signum or signal.SIGINT
    epochs_done = history[-1]["epoch"] if history else start_epoch
    pending = changed if here is not None and here.epoch == start_epoch else None
    saved, where = _save_position(here, ckpt_path, model, opt, rng, epochs_done, step, history,
                                  settings, n_batches, pending)
    name = signal_name(signum)
    finished = saved is not None and here is not None and here.batch is None \
        and here.epoch == epochs
    if finished:  # during the last epoch's validation or save: the run is complete
        msg = f"stopped by {name} once training was complete; the state {where} is saved in {saved}"
    elif saved:
        msg = f"stopped by {name}; the state {where} is saved in {saved}"
    else:
        msg = f"stopped by {name} before anything could be saved"
    return TrainingInterrupted(msg, checkpoint=saved, epoch=epochs_done, step=step,
                               signum=signum, finished=finished)


def train(model, x_train, x_val, *, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
          optimizer: str = "adam", clip: float | None = None, seed: int = 0,
          binarize: str = "none", run_dir, log_every: int = 10, progress: bool = True,
          verbose: bool = True, resume_from=None, checkpoint_every_epoch: bool = True,
          on_epoch_end=None, on_first_step=None, args: dict | None = None,
          schedule: str = "constant", overwrite: bool = False) -> list:
    """Train ``model`` in place for ``epochs`` epochs in total; returns the metrics history.

    x_train (N, D), x_val (V, D): the model's dtype with values in [0, 1], or uint8 images
        (read as v / 255, kept as bytes and scaled a batch at a time); x_train may also be
        :class:`~npvae.data.packed.PackedImages` (the same bytes in about a third of the
        memory for MNIST, the same run bit for bit). ``binarize``
        "static" draws one binary sample of the training set, "dynamic" a fresh one of
        every batch. optimizer "adam" or "sgd" (momentum 0.9); clip: max gradient norm.
    run_dir: receives metrics.jsonl and checkpoint.npz; locked for the whole call
        (:class:`RunInUse`), cleared of stale temporary files, checked to be writable. A
        folder that already holds a run is refused unless ``resume_from`` continues it (is
        that folder's checkpoint, as it is on disk now) or ``overwrite`` replaces it: the
        old run's files (checkpoint, metrics, eval.json, figures, learned prior) are then
        deleted before the first step; files npvae did not write stay.
    log_every: steps between progress-bar updates; progress: a tqdm bar (on a terminal);
        verbose: a summary line per epoch; on_epoch_end(row) and on_first_step() callbacks.
    resume_from: a checkpoint path, run directory or :class:`Checkpoint` of the same run
        (``epochs`` may grow, ``lr`` and ``clip`` change, recorded in the metrics): the
        run in ``run_dir``, or any run when ``run_dir`` is new or empty (a branch).
    args: extra JSON-friendly settings stored in checkpoints (a resumed run keeps the
        stored ones ``args`` does not give). schedule: the learning-rate
        schedule (:mod:`npvae.schedule`): "constant", "burda" or "burda:P" (SCHED.1).

    Every argument and the data's values are checked before the folder is made or touched.
    """
    _check_inputs(model, x_train, x_val, epochs, batch_size, lr, optimizer, clip, binarize,
                  schedule, seed, log_every, args)
    run_dir = _check_run_dir(run_dir, resume_from, overwrite)
    with run_lock(run_dir):
        return _train(model, x_train, x_val, epochs=epochs, batch_size=batch_size, lr=lr,
                      optimizer=optimizer, clip=clip, seed=seed, binarize=binarize,
                      run_dir=run_dir, log_every=log_every, progress=progress, verbose=verbose,
                      resume_from=resume_from, checkpoint_every_epoch=checkpoint_every_epoch,
                      on_epoch_end=on_epoch_end, on_first_step=on_first_step, args=args,
                      schedule=schedule, overwrite=overwrite)


def _train(model, x_train, x_val, *, epochs, batch_size, lr, optimizer, clip, seed, binarize,
           run_dir, log_every, progress, verbose, resume_from, checkpoint_every_epoch,
           on_epoch_end, on_first_step, args, schedule, overwrite) -> list:
    """:func:`train` once its arguments are checked and its run folder is locked."""
    ckpt_path, metrics_path = _open_run(Path(run_dir))
    ck = resume_from if isinstance(resume_from, Checkpoint) or resume_from is None \
        else load_checkpoint(resume_from)
    if overwrite and (ck is None or _not_continued_by(Path(run_dir), ck)):
        remove_run_files(run_dir)  # the old run goes whole, not its metrics alone
    # a resumed run keeps the stored settings this call does not give (dataset, model, ...)
    settings = dict({**(ck.args if ck else {}), **(args or {})}, epochs=int(epochs),
                    batch_size=int(batch_size), lr=float(lr), optimizer=optimizer, clip=clip,
                    seed=int(seed), binarize=binarize, data=fingerprint(x_train),
                    schedule=schedule, **({"draws": DRAWS} if binarize == "dynamic" else {}))
    batches = _Batches(x_train, model.dtype, batch_size, binarize, seed)
    x_val = binarize_for_eval(_as_unit(x_val, model.dtype), binarize, seed, "val")
    n_batches = batches.per_epoch

    # ---- state: fresh, or as a checkpoint left it
    rng = np.random.default_rng(seed)
    opt = make_optimizer(optimizer, model.params, lr, eps=schedules.adam_eps(schedule))
    start_epoch, step, history, resume, changed = _resume(
        ck, model, opt, rng, settings, n_batches, lr, clip)
    _write_metrics(metrics_path, history)  # forget epochs the checkpoint does not hold
    # What a checkpoint written now would hold (None while the parameters change)
    here = _between_epochs(start_epoch, rng) if resume is None else None
    step_at_start, stop = step, _DeferredInterrupt()
    try:
        grad_buf = model.params.empty_like()  # backward writes here on every step
        with stop, blas_threads(blas_threads_for(model.params, batch_size)):
            for epoch in range(start_epoch, epochs):
                opt.lr = schedules.lr_at(schedule, lr, epoch)  # (SCHED.1)
                # -- the epoch's order, drawn from the run's stream, or where a checkpoint stopped
                order, here, resume = *_start_epoch(rng, batches.n, epoch, resume), None
                epoch_rng, sums, seen = here.epoch_rng, dict(here.sums), here.seen
                t0 = time.perf_counter() - here.seconds

                # overflow on the way to a divergence is reported by the checks below, once,
                # with what to do: NumPy's warnings for each overflowing op would only precede it
                with _progress_bar(n_batches, here.batch, epoch, epochs, progress) as bar, \
                        np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    for b in range(here.batch, n_batches):
                        if stop.requested:
                            raise KeyboardInterrupt
                        # -- forward and backward on one batch
                        xb = batches.fill(order[b * batch_size:(b + 1) * batch_size], rng)
                        measure = clip is not None or step % log_every == 0 or b + 1 == n_batches
                        fwd, grads, grad_norm = _forward_backward(
                            model, xb, rng, step, grad_buf, clip, measure)
                        if not (math.isfinite(fwd.loss) and math.isfinite(grad_norm)):
                            raise _diverged(fwd.loss, grad_norm, step, epoch, b, n_batches,
                                            ckpt_path, epochs)
                        # -- update (no consistent state to save until the step is counted)
                        here = None
                        if opt.step(grads):  # non-finite gradient entries: the update is spoilt
                            raise _diverged(fwd.loss, math.nan, step, epoch, b, n_batches,
                                            ckpt_path, epochs, applied=True)
                        model.after_step(fwd, rng)  # the VQ-VAE's moving averages, from fwd's codes
                        step += 1
                        if step == step_at_start + 1 and on_first_step is not None:
                            on_first_step()
                        seen += _add_stats(sums, fwd.stats, len(xb), grad_norm if measure else None)
                        here = Position(epoch, b + 1, epoch_rng, dict(sums), seen,
                                        time.perf_counter() - t0, rng_state(rng))
                        _show_loss(bar, sums, seen, step % log_every == 0 or b + 1 == n_batches)

                # -- end of epoch: validation, metrics, checkpoint
                train_seconds = time.perf_counter() - t0
                row = _epoch_row(epoch, step, opt, clip, sums, seen,  # with a resume's changes
                                 changed=changed if epoch == start_epoch else None)
                _check_state(model, opt, step, epoch, ckpt_path, epochs)
                history.append(_validated(row, model, x_val, seed, train_seconds))
                if checkpoint_every_epoch or epoch + 1 == epochs:
                    _save(ckpt_path, model, opt, rng, epoch + 1, step, history, settings)
                here = _between_epochs(epoch + 1, rng)
                _report(row, metrics_path, epochs, verbose, on_epoch_end,
                        "log p(c)" if model.config.get("kind") == "made" else "ELBO")
                if stop.requested:  # in the last epoch too: the caller must hear of it
                    raise KeyboardInterrupt
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP: save the last consistent state
        raise _save_on_stop(exc, stop, here, ckpt_path, model, opt, rng, start_epoch, step,
                            history, settings, n_batches, epochs, changed) from None
    return history


def _saved_state(path) -> tuple:
    """('after epoch E', the epochs its run was set to train for) for the checkpoint at
    ``path``, or ('as it was on disk', None) when it cannot be read."""
    try:
        ck = load_checkpoint(path)
    except CheckpointError:
        return "as it was on disk", None
    return f"after epoch {ck.epoch}", ck.args.get("epochs")


def _what_next(ckpt_path: Path, epochs: int) -> str:
    """What a diverged run can do: what is kept, and how to go on with a smaller step
    towards ``epochs`` (named when the kept checkpoint was saved with fewer)."""
    if ckpt_path.exists():
        saved, planned = _saved_state(ckpt_path)
        more = f" --epochs {epochs}" if planned is not None and planned < epochs else ""
        return (f"the last good checkpoint, {ckpt_path} ({saved}), is kept. "
                f"Continue from it with a smaller learning rate or gradient clipping: "
                f"npvae train --resume {shlex.quote(str(ckpt_path.parent))}{more} --lr LR "
                f"--clip NORM (in Python: train(..., resume_from=run_dir, lr=..., clip=...))")
    return ("no checkpoint had been saved yet. Start again with a smaller learning rate "
            "(--lr) or gradient clipping (--clip NORM)")


def _diverged(loss, grad_norm, step, epoch, b, n_batches, ckpt_path, epochs,
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
        f"{_what_next(ckpt_path, epochs)}.",
        step=step, epoch=epoch + 1, checkpoint=ckpt_path if ckpt_path.exists() else None)


def _diverged_state(detail: str, step, epoch, ckpt_path, epochs) -> TrainingDiverged:
    """The model or optimizer state holds NaN or inf at the end of an epoch: not saved."""
    return TrainingDiverged(
        f"training diverged: at the end of epoch {epoch + 1} (step {step}) the {detail}; "
        f"that state was not saved and {_what_next(ckpt_path, epochs)}.",
        step=step, epoch=epoch + 1, checkpoint=ckpt_path if ckpt_path.exists() else None)
