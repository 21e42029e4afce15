"""What the subcommands of the command line share: messages and the usage error, the
argument types, help formatting, the backend option, and finding a run, its checkpoint
and its data. :mod:`npvae.cli` and :mod:`npvae.prior_cli` both build on it.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import textwrap
from pathlib import Path

import numpy as np

# Settings of `npvae train` when an option is not given.
DEFAULTS = dict(
    model="vae-bernoulli", hidden="400", activation="relu", latent=20, epochs=30,
    batch_size=128, lr=1e-3, optimizer="adam", beta=None, warmup="0", free_bits=0.0,
    binarize=None, dataset="mnist", data_dir=None, seed=0, backend=None, dtype="float32",
    out=None, clip=None, sigma2=1.0, sampled=False, likelihood=None, codes=128, code_dim=16,
    code_vectors=4, metric="euclidean", ema=False, restart_after=0, kmeans_init=False,
    limit=None, val=5000, progress=True, schedule="constant", objective="elbo", k=5,
)

BACKENDS = ("numba", "numpy")
EVAL_BATCH = 1000  # test images evaluated at a time: npvae train's test ELBO, npvae eval



class UsageError(Exception):
    """A problem with what the user asked for; printed without a traceback, exit 2."""



def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)



def _hidden(text: str) -> str:
    if text.strip().lower() == "none":
        return "none"  # no hidden layer: linear encoder and decoder
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "expected layer sizes like 400 or 512,256, got an empty value; "
            "for no hidden layer at all, write --hidden none")
    return _int_list(text, "layer sizes like 400 or 512,256", "layer sizes")



def _int_list(text, example: str, what: str) -> str:
    """'512,256' -> '512,256': positive integers separated by commas, or an argparse error
    that gives ``example`` of what is expected and says what the numbers are (``what``)."""
    try:
        sizes = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {example}, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{what} must be positive integers, got {text!r}")
    return ",".join(map(str, sizes))



def _number(kind, lowest, what: str):
    """An argparse type: text -> kind (int or float), finite and >= lowest, or a clear error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and value >= lowest):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse



_positive_int = _number(int, 1, "a positive integer")

_non_negative_int = _number(int, 0, "an integer >= 0")

_positive_float = _number(float, math.ulp(0.0), "a positive number")

_non_negative_float = _number(float, 0.0, "a number >= 0")



def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=30)



def _wrap(text: str) -> str:
    """A description as a paragraph of at most 79 columns (the epilogs keep their layout)."""
    return textwrap.fill(" ".join(text.split()), width=79)



def add_command(sub, name: str, help: str, description: str, **kwargs):
    """The parser of subcommand ``name``: its ``description`` one wrapped paragraph, its
    epilog (in ``kwargs``) kept as written."""
    return sub.add_parser(name, help=help, description=_wrap(description),
                          formatter_class=_formatter, **kwargs)



def _add_backend(parser) -> None:
    parser.add_argument("--backend", choices=BACKENDS,
                        help="compiled kernels (numba, default) or their NumPy twins")



_announced = {"registered": False, "said": False}



def _announce_compilation() -> None:
    """Print one line the first time a compiled kernel is prepared in this process."""
    if _announced["registered"]:
        return
    from .backend import on_first_compile

    import threading

    def say():
        if not _announced["said"]:
            _announced["said"] = True
            from tqdm import tqdm

            tqdm.write("npvae: compiling kernels (this happens on the first run only; "
                       "they are cached on disk afterwards)…", file=sys.stderr)

    def tell(_kernel_name):
        # loading a cached kernel takes milliseconds: speak only if this one takes longer
        timer = threading.Timer(0.5, say)
        timer.daemon = True
        timer.start()
        return timer.cancel

    on_first_compile(tell)
    _announced["registered"] = True



def _set_backend(name) -> None:
    if name:
        from .backend import set_backend

        set_backend(name)



def _load_split(dataset, split, data_dir, dtype):
    from . import data

    images, labels = data.load(dataset, split, data_dir=data_dir,
                               progress=lambda msg: _say(f"npvae: {msg}"))
    return data.to_unit(images, np.dtype(dtype)), labels



def validation_size(n: int, val: int, given: bool) -> int:
    """How many of n training images to hold out: ``val``, when at most half of them.

    A --val the user gave that leaves fewer training than validation images is an error;
    the default (5000) falls back to a tenth of a small dataset.
    """
    if 2 * val <= n:
        return val
    if given:
        raise UsageError(f"--val {val} would hold out more images than are left to train on: "
                         f"the training set has {n:,} images, so --val can be at most {n // 2:,}")
    return max(1, n // 10)



def load_training_data(settings: dict, val_given: bool = False, packed: bool = False):
    """(x_train, x_val) for a run's settings: split off the validation images, then --limit.

    ``val_given``: the user chose --val (then it must fit; see :func:`validation_size`).
    ``packed``: x_train as :class:`~npvae.data.packed.PackedImages` (for MNIST a third of
    the bytes; the training loop expands a batch at a time), else a uint8 (N, D) array.
    """
    from . import data

    images, y = data.load(settings["dataset"], "train", data_dir=settings["data_dir"],
                          progress=lambda msg: _say(f"npvae: {msg}"))
    x = images.reshape(len(images), -1)  # uint8 (N, D): the loop scales each batch
    n_val = validation_size(len(x), settings["val"], val_given)
    (x_tr, _), (x_va, _) = data.train_val_split(x, y, n_val, seed=0)  # the same split for every seed
    if settings["limit"]:
        x_tr, x_va = x_tr[: settings["limit"]], x_va[: settings["limit"]]
    x_va = data.to_unit(x_va, np.dtype(settings["dtype"]))
    if packed:
        return data.PackedImages.pack(x_tr, width=images.shape[2]), np.ascontiguousarray(x_va)
    return np.ascontiguousarray(x_tr), np.ascontiguousarray(x_va)



def _hidden_list(text) -> list:
    """"400" -> [400]; "200,200" -> [200, 200]; "" or "none" -> [] (no hidden layer)."""
    text = str(text).strip()
    if text.lower() in ("", "none"):
        return []
    return [int(h) for h in text.split(",")]



def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Make sure a new run does not mix its files with another run's (hold the run's lock).

    An empty or new folder is used as it is. A folder holding a run is refused, with the
    way to continue it, unless ``overwrite``: then that run's files are deleted, with its
    learned prior (fitted to codes the new run will change). Files npvae did not write are
    never deleted, and make it refuse. Call it once every option, the data and the model
    have been checked (after :func:`check_run_dir`), so that a mistake never costs the old run.
    """
    ours = check_run_dir(run_dir, overwrite)
    for path in ours:  # a prior's files before its folder
        path.rmdir() if path.is_dir() else path.unlink()


def nearest_folder(path: Path) -> Path:
    """``path`` if it is a folder, else its nearest existing ancestor (where it would be made)."""
    path = Path(path).absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def check_run_dir(run_dir: Path, overwrite: bool, fix: str | None = None) -> list:
    """The refusals of :func:`prepare_run_dir`, deleting nothing: the files of the run that
    ``overwrite`` would replace. ``fix``: what to do about a file or foreign files in the
    way, for a command whose folder is not chosen with --out (``npvae train-prior``)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} is a file, not a directory; "
                         + (fix or "choose another --out"))
    from .checkpoint import FILENAME
    from .runs import is_temp_file, run_files

    ours, others = run_files(run_dir) if run_dir.exists() else ([], [])
    if others:
        names = ", ".join(p.name for p in others[:5]) + (", ..." if len(others) > 5 else "")
        raise UsageError(f"{run_dir} holds files that are not part of an npvae run ({names}); "
                         + (fix or "choose a new or empty directory with --out"))
    # a killed writer's temporary files alone are no run: the new run removes them
    kept = [p for p in ours if not is_temp_file(p.name)]
    if kept and not overwrite:
        names = ", ".join(p.name for p in kept[:4]) + (", ..." if len(kept) > 4 else "")
        if (run_dir / FILENAME).exists():
            raise UsageError(f"{run_dir} already holds a run ({names}). Continue it with "
                             f"npvae train --resume {shlex.quote(str(run_dir))}, pass "
                             f"--overwrite to replace it, or choose another --out")
        raise UsageError(f"{run_dir} holds files of a run that saved no checkpoint ({names}), "
                         f"so it cannot be continued; pass --overwrite to replace them, or "
                         f"choose another --out")
    return ours



def _test_set(settings, data_dir=None):
    """Grey test images (for figures) and the fixed binary sample the ELBO is measured on."""
    from .train import binarize_for_eval

    x, y = _load_split(settings["dataset"], "test", data_dir or settings.get("data_dir"),
                       settings["dtype"])
    return x, y, binarize_for_eval(x, settings["binarize"], settings["seed"], "test")



def _run_dir_of(run) -> Path:
    """The run folder of RUN: the folder itself, or the folder holding a checkpoint file."""
    from .checkpoint import checkpoint_path

    return checkpoint_path(run).parent



def _load_run(run):
    from . import pretrained
    from .checkpoint import load_checkpoint

    if pretrained.is_pretrained(run):  # a model shipped inside the package
        return pretrained.load(run)
    ck = refuse_prior(load_checkpoint(run))
    missing = [k for k in ("dataset", "dtype", "binarize", "seed") if k not in ck.args]
    if missing:
        raise UsageError(f"{ck.path}: was not written by `npvae train` (its settings lack {missing})")
    problem = _bad_setting(ck.args) or _bad_history(ck.history)
    if problem:
        raise UsageError(f"{ck.path}: {problem}; the file was damaged or not written by npvae")
    return ck


def refuse_prior(ck):
    """``ck``, unless it is the learned prior of a VQ-VAE run (RUN/prior/), which the
    commands take through its VQ-VAE's folder."""
    if ck.model.config.get("kind") == "made":
        raise UsageError(f"{ck.path} holds the learned prior of a VQ-VAE run, not a run of its "
                         f"own; give the VQ-VAE's folder instead, e.g. npvae sample "
                         f"{shlex.quote(str(ck.path.parent.parent))}")
    return ck


def _bad_setting(args: dict) -> str | None:
    """What is wrong with a checkpoint's stored settings (the ones later commands use), or None."""
    from ._validate import is_integer, is_positive_real
    from .data import DATASETS
    from .train import BINARIZE

    rules = {
        "dataset": (lambda v: v in DATASETS, f"one of {DATASETS}"),
        "dtype": (lambda v: v in ("float32", "float64"), "float32 or float64"),
        "binarize": (lambda v: v in BINARIZE, f"one of {BINARIZE}"),
        "seed": (lambda v: is_integer(v) and v >= 0, "an integer >= 0"),
        "batch_size": (lambda v: is_integer(v) and v >= 1, "an integer >= 1"),
        "epochs": (lambda v: is_integer(v) and v >= 0, "an integer >= 0"),
        "lr": (lambda v: is_positive_real(v), "a positive number"),
        "optimizer": (lambda v: v in ("adam", "sgd"), "adam or sgd"),
        "clip": (lambda v: v is None or (is_positive_real(v)), "null or a positive number"),
        "val": (lambda v: is_integer(v) and v >= 0, "an integer >= 0"),
        "limit": (lambda v: v is None or (is_integer(v) and v >= 1), "null or an integer >= 1"),
        "data_dir": (lambda v: v is None or isinstance(v, str), "null or a path"),
        "schedule": (lambda v: isinstance(v, str), "a schedule name"),
    }
    for key, (ok, wanted) in rules.items():
        if key in args and not ok(args[key]):
            return f"its setting {key} is {args[key]!r}, not {wanted}"
    return None


def _bad_history(history: list) -> str | None:
    """What is wrong with a checkpoint's per-epoch metrics, or None: each row has an integer
    epoch >= 1, and its other entries are numbers, null or (for a resume's changes) objects."""
    from ._validate import is_integer

    for i, row in enumerate(history):
        if not (is_integer(row.get("epoch")) and row["epoch"] >= 1):
            return f"row {i} of its history has epoch {row.get('epoch')!r}, not an integer >= 1"
        for key, value in row.items():
            if not (value is None or isinstance(value, dict) or is_integer(value)
                    or isinstance(value, float)):
                return f"row {i} of its history has {key} = {value!r}, not a number"
    return None
