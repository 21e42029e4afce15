"""The ``npvae`` command: train, eval, sample, plot, gradcheck, tour.

Every subcommand has ``--help`` with examples. User errors (missing data, a bad
checkpoint, arguments that do not fit together, a run folder in use) print one clear
message to stderr and exit with status 2; a diverged run, a file system error or
running out of memory exits with 1. Ctrl-C, SIGTERM and SIGHUP save a checkpoint when
training and exit with 128 + the signal's number: 130, 143 and 129.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path

from .cli_common import (  # noqa: F401  (_hidden_list: importable from here, as it was)
    DEFAULTS, EVAL_BATCH, UsageError, _add_backend, _announce_compilation, _formatter, _hidden,
    _hidden_list, _load_run, _non_negative_float, _non_negative_int, _positive_float,
    _positive_int, _run_dir_of, _say, _set_backend, _test_set, _wrap, add_command,
    check_run_dir, load_training_data, nearest_folder, prepare_run_dir,
)
from .cli_conv import add_channels_option
from .cli_results import add_result_commands
from .kinds import is_vq
from .train_settings import _schedule, _warmup, check_model_size, model_config, new_run_settings

_STARTED = time.perf_counter()  # for the "first step ... s after start" report

# What may be given together with --resume: everything else comes from the checkpoint.
# A smaller --lr or a --clip is what a diverged run needs; the change goes into metrics.jsonl.
RESUME_OK = {"resume", "epochs", "progress", "backend", "data_dir", "lr", "clip"}


# ----------------------------------------------------------------------------- parser

_MAIN_EPILOG = """\
examples:
  npvae train                          Bernoulli VAE on MNIST, a minute or two
  npvae train --model vqvae --epochs 5
  npvae eval runs/vae-bernoulli-20250101-120000
  npvae sample RUN --n 64 --seed 1
  npvae gradcheck vae-bernoulli        check the hand-written gradients
  npvae tour vqvae                     follow one backward pass node by node
  npvae train --model conv-vae         a convolutional VAE, a few minutes
  npvae train-prior RUN                fit a learned prior to a VQ-VAE's codes

A run directory (RUN) holds checkpoint.npz, metrics.jsonl and the figures.
Set NPVAE_DATA to choose where datasets are cached; NPVAE_BACKEND=numpy runs
the NumPy twins of the compiled kernels.
"""

_TRAIN_DESCRIPTION = """
Train a VAE, autoencoder or VQ-VAE on MNIST or Fashion-MNIST. With no options: a Bernoulli
VAE on MNIST that finishes in a few minutes on two cores. Afterwards it prints the test
ELBO and where the metrics, the checkpoint and the figures are."""

_TRAIN_EPILOG = """\
examples:
  npvae train
      Bernoulli VAE 784-400-20 on MNIST: 30 epochs, batch 128, Adam 1e-3,
      dynamic binarization, 5000 training images held out for validation;
      about 1.5 minutes on two idle cores, test ELBO near -100 nats.
  npvae train --model vae-gaussian --latent 2 --epochs 20
      a 2-D latent space, so the run also draws the decoded manifold.
  npvae train --hidden 512,256 --beta 4 --warmup 2epochs
  npvae train --model ae --beta 0            a plain autoencoder
  npvae train --model vqvae --codes 256 --code-vectors 8 --ema --restart-after 100
  npvae train --model conv-vae
      a convolutional encoder and decoder (4x4 stride-2 layers, 28 -> 14 -> 7),
      channels 16,32, 8 epochs: a few minutes on two cores.
  npvae train --model conv-vqvae --channels 32,64 --epochs 2
      a 7x7 map of codes (M = 49); channels 32,64 cost about ten times as much.
  npvae train --limit 2000 --epochs 2 --no-progress      a quick try
  npvae train --resume runs/vae-bernoulli-20250101-120000 --epochs 20
      continue a stopped run (Ctrl-C, SIGTERM and SIGHUP save one) exactly where
      it stopped; after a divergence add a smaller --lr or a --clip NORM.
  npvae train --out runs/mine --overwrite   replace the run in runs/mine

Binarization (Bernoulli models): "dynamic" draws a fresh binary sample of every
image each epoch, "static" draws one and keeps it, "none" trains on grey levels.
Validation and test images are binarized once, with a fixed seed.

The run directory (default runs/<model>-<date>-<time>) receives metrics.jsonl
(one JSON line per epoch), checkpoint.npz (after every epoch) and PNG figures.
While a command writes into a run, the run is locked: a second npvae train, eval,
sample or plot of the same run refuses at once.
"""


def _add_train(sub, kinds) -> None:
    p = add_command(sub, "train", "train a model and write a run directory", _TRAIN_DESCRIPTION,
                    epilog=_TRAIN_EPILOG, argument_default=argparse.SUPPRESS)
    _add_model_options(p.add_argument_group("model"), kinds)
    _add_objective_options(p.add_argument_group("objective"))
    _add_vq_options(p.add_argument_group("VQ-VAE"))
    _add_training_options(p.add_argument_group("training"))
    _add_data_options(p.add_argument_group("data and output"))
    p.set_defaults(func=cmd_train)


def _add_model_options(m, kinds) -> None:
    """npvae train: which model, its networks and its decoder."""
    m.add_argument("--model", choices=kinds,
                   help="vae-gaussian, vae-bernoulli (default), ae (autoencoder as a VAE with "
                        "fixed encoder variance), vqvae, or a convolutional conv-vae or "
                        "conv-vqvae")
    m.add_argument("--hidden", type=_hidden, metavar="SIZES",
                   help="hidden layer sizes of the encoder (the decoder mirrors them), e.g. 400 "
                        "or 512,256, or none for a single linear layer each way (default 400)")
    m.add_argument("--activation", choices=("relu", "leaky_relu", "tanh", "sigmoid", "softplus"),
                   help="hidden-layer activation (default relu)")
    add_channels_option(m)
    m.add_argument("--latent", type=_positive_int, metavar="Z",
                   help="latent dimensions (default 20; 2 also draws the manifold)")
    m.add_argument("--likelihood", choices=("bernoulli", "gaussian"),
                   help="decoder distribution for ae, vqvae and the conv kinds (default "
                        "bernoulli)")
    m.add_argument("--sigma2", type=_positive_float,
                   help="variance of a Gaussian decoder (default 1.0)")
    m.add_argument("--sampled", action="store_true",
                   help="ae: add N(0, I) noise to the code, as the derivation does (default off)")
    m.add_argument("--dtype", choices=("float32", "float64"), help="default float32")


def _add_objective_options(o) -> None:
    """npvae train: the terms of the loss and their weights."""
    o.add_argument("--beta", type=_non_negative_float,
                   help="VAE/AE: weight of the KL term (default 1, the ELBO); "
                        "VQ-VAE: commitment cost (default 0.25)")
    o.add_argument("--warmup", type=_warmup, metavar="N[steps|epochs]",
                   help="raise the KL weight linearly from 0 to beta over N optimizer steps "
                        "(2000) or N epochs (3epochs); default 0, no warm-up")
    o.add_argument("--free-bits", type=_non_negative_float, metavar="NATS",
                   help="VAE: each latent dimension's KL costs at least this much (default 0)")
    o.add_argument("--objective", choices=("elbo", "iwae"),
                   help="VAE: elbo (default), or iwae, the importance-weighted bound of Burda "
                        "et al. (2015) with --k samples per example")
    o.add_argument("--k", type=_positive_int, metavar="K",
                   help="--objective iwae: importance samples per example (default 5)")


def _add_vq_options(q) -> None:
    """npvae train: the codebook of a VQ-VAE and how it learns."""
    q.add_argument("--codes", type=_positive_int, metavar="K",
                   help="codebook size (default 128; 256 for conv-vqvae)")
    q.add_argument("--code-dim", type=_positive_int, metavar="DZ",
                   help="size of each code vector (default 16)")
    q.add_argument("--code-vectors", type=_positive_int, metavar="M",
                   help="code vectors per image (default 4; conv-vqvae has one per position "
                        "of its 7x7 map, 49)")
    q.add_argument("--metric", choices=("euclidean", "dot"),
                   help="nearest code (euclidean, default) or largest dot product")
    q.add_argument("--ema", action=argparse.BooleanOptionalAction,
                   help="learn the codebook by moving averages instead of its loss (default "
                        "off; on for conv-vqvae, --no-ema turns it off)")
    q.add_argument("--restart-after", type=_non_negative_int, metavar="STEPS",
                   help="move a code unused for this many steps onto a random encoder output "
                        "(default 0: never; 100 for conv-vqvae)")
    q.add_argument("--kmeans-init", action=argparse.BooleanOptionalAction,
                   help="start the codebook from k-means on the first batch (default off; on "
                        "for conv-vqvae)")


def _add_training_options(t) -> None:
    """npvae train: the optimizer, its steps and the run's randomness."""
    t.add_argument("--epochs", type=_positive_int, metavar="N",
                   help="passes over the training set (default 30; 8 for conv-vae, 6 for "
                        "conv-vqvae)")
    t.add_argument("--batch-size", type=_positive_int, metavar="N", help="default 128")
    t.add_argument("--lr", type=_positive_float, help="learning rate (default 0.001)")
    t.add_argument("--optimizer", choices=("adam", "sgd"),
                   help="adam (default) or sgd with momentum 0.9")
    t.add_argument("--clip", type=_positive_float, metavar="NORM",
                   help="clip the global gradient norm to NORM (default: no clipping)")
    t.add_argument("--schedule", type=_schedule, metavar="NAME",
                   help="learning-rate schedule: constant (default); burda, the IWAE paper's "
                        "3,280 epochs in 8 stages with the rate falling by 10^(1/7) each "
                        "(Adam epsilon 1e-4); burda:P, the same stages in P epochs. "
                        "--epochs defaults to the schedule's length")
    t.add_argument("--seed", type=_non_negative_int,
                   help="seed of initialization, data order and noise (default 0); the same seed "
                        "gives identical results on the same backend and thread count")
    _add_backend(t)
    t.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (one line per epoch is still printed)")


def _add_data_options(d) -> None:
    """npvae train: the images, and the run directory the results go to."""
    d.add_argument("--dataset", choices=("mnist", "fashion-mnist"), help="default mnist")
    d.add_argument("--data-dir", metavar="DIR",
                   help="where datasets are cached (default $NPVAE_DATA, else "
                        "$XDG_CACHE_HOME/npvae, else ~/.cache/npvae)")
    d.add_argument("--binarize", choices=("none", "static", "dynamic"),
                   help="dynamic for Bernoulli decoders, none for Gaussian (default)")
    d.add_argument("--limit", type=_positive_int, metavar="N",
                   help="train on the first N training images only, and validate on at most "
                        "N (quick tries)")
    d.add_argument("--val", type=_positive_int, metavar="N",
                   help="training images held out for validation (default 5000, at most a "
                        "tenth of a small dataset)")
    d.add_argument("--out", metavar="RUN",
                   help="run directory (default runs/<model>-<date>-<time>); one that already "
                        "holds a run is refused, unless --overwrite is given")
    d.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out: its checkpoint, metrics, eval.json "
                        "and figures are deleted once the new run's options, data and model "
                        "have passed their checks (files npvae did not write are never "
                        "touched, and make it refuse)")
    d.add_argument("--resume", metavar="RUN",
                   help="continue the run in folder RUN (or RUN/checkpoint.npz) from its "
                        "checkpoint, with its saved settings "
                        "(only --epochs, --lr, --clip, --backend, --data-dir and --no-progress "
                        "may be given; a new --lr or --clip is recorded in metrics.jsonl)")


def _add_gradcheck(sub, kinds) -> None:
    p = add_command(
        sub, "gradcheck", "compare a model's gradients with finite differences",
        "Build a small float64 model of the given kind, a random batch and fixed noise, and "
        "compare every parameter's hand-written gradient with central differences. Prints one "
        "row per parameter; exits with 1 if any relative error exceeds the tolerance.",
        epilog="examples:\n  npvae gradcheck vae-bernoulli\n"
               "  npvae gradcheck vqvae --seed 3\n  NPVAE_BACKEND=numpy npvae gradcheck ae\n")
    _add_model_argument(p, kinds)
    p.add_argument("--seed", type=_non_negative_int, default=0, help="default 0")
    p.add_argument("--batch", type=_positive_int, default=5, help="batch size (default 5)")
    p.add_argument("--tol", type=_positive_float, default=1e-6,
                   help="largest relative error that passes (default 1e-6)")
    _add_backend(p)
    p.set_defaults(func=cmd_gradcheck)


_TOUR_EPILOG = """\
examples:
  npvae tour vae-bernoulli             the Bernoulli VAE, 4 random 8x8 images
  npvae tour vqvae                     see where the straight-through copy happens
  npvae tour ae --batch 2 --seed 3
  npvae tour conv-vae                  the convolutional VAE: 1x8x8 images, each
                                       convolution and transposed convolution a node
  npvae tour conv-vqvae                its map of codes read as rows and back (CVQ)
  npvae tour vae-gaussian --data-dim 784      MNIST-sized inputs (slower checks)

the tutorial's own models:
  npvae tour vae-gaussian                          the Gaussian VAE
  npvae tour ae --sampled --likelihood gaussian    the noisy autoencoder (eq. 14)
  npvae tour vqvae --metric dot --likelihood gaussian
                                the VQ-VAE, largest dot product, Gaussian decoder

Read it from the top: the loss, the likelihood, the decoder's layers from the last
to the first, the latent nodes, then the encoder. docs/derivations.md derives every
tag shown in parentheses.
"""


def _add_tour(sub, kinds) -> None:
    p = add_command(
        sub, "tour", "follow one backward pass node by node, each node checked",
        "Run one training step of a small float64 model on a tiny random batch and print its "
        "backward pass in the order it runs, from the loss back to the first layer. Each node "
        "shows its local equations, forward and backward, with their tags in "
        "docs/derivations.md, the value its forward pass computed (the reconstruction term, "
        "the KL and the ELBO where they appear), the shapes of its inputs and gradients, the "
        "gradients' 2-norms, and a finite-difference check of that node alone with the "
        "gradient that really reached it. The tour's parameter gradients are then compared "
        "with the model's own. Exits with 1 if any derived node's relative error exceeds 1e-6 "
        "or the gradients differ.",
        epilog=_TOUR_EPILOG)
    _add_model_argument(p, kinds)
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed of the weights, the batch and the noise (default 0)")
    p.add_argument("--batch", type=_positive_int, default=4, help="examples (default 4)")
    p.add_argument("--data-dim", type=_positive_int, default=64,
                   help="values per example (default 64, an 8x8 image; the conv kinds take a "
                        "square image whose side is divisible by 4)")
    p.add_argument("--likelihood", choices=("bernoulli", "gaussian"),
                   help="decoder distribution for ae, vqvae and the conv kinds (default "
                        "bernoulli)")
    p.add_argument("--sampled", action="store_true",
                   help="ae: add N(0, I) noise to the code, z = code + eps, as eq. 14 does")
    p.add_argument("--metric", choices=("euclidean", "dot"),
                   help="vqvae, conv-vqvae: nearest code (euclidean, default) or largest dot "
                        "product")
    _add_backend(p)
    p.set_defaults(func=cmd_tour)


def _add_model_argument(p, kinds) -> None:
    """MODEL, named as an argument (npvae tour vqvae) or, as train takes it, with --model."""
    p.add_argument("kind", metavar="MODEL", nargs="?", choices=kinds, help=" | ".join(kinds))
    p.add_argument("--model", dest="model", choices=kinds, metavar="MODEL",
                   help="MODEL given as an option, as npvae train takes it (--model conv-vae)")


def _kind_of(ns) -> str:
    """The MODEL of npvae tour or gradcheck, however it was given."""
    if ns.kind and ns.model and ns.kind != ns.model:
        raise UsageError(f"two models named: {ns.kind} and --model {ns.model}; name one")
    if not (ns.kind or ns.model):
        raise UsageError(f"name a model: npvae {ns.command} MODEL (or --model MODEL), e.g. "
                         f"npvae {ns.command} vae-bernoulli")
    return ns.kind or ns.model


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are the message and where to read the options, not
    the whole usage block (the subcommands' parsers are made of the same class)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="npvae",
        description=_wrap("Variational autoencoders in NumPy with hand-written gradients: train them "
                    "on MNIST, evaluate, sample, plot, and check their gradients."),
        epilog=_MAIN_EPILOG, formatter_class=_formatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"npvae {__version__}")
    from .models import KINDS

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub, KINDS)
    add_result_commands(sub)  # eval, sample, plot
    _add_gradcheck(sub, KINDS)
    _add_tour(sub, (*KINDS, "made"))  # made: the learned prior of a VQ-VAE (npvae train-prior)
    from .prior_cli import add_train_prior_command  # `npvae train-prior`: a VQ-VAE's learned prior
    add_train_prior_command(sub)
    from .exercises.cli import add_exercises_command  # `npvae exercises`: new, check, solutions
    add_exercises_command(sub)
    return parser


# ----------------------------------------------------------------------------- shared steps


def _default_run_dir(kind: str) -> Path:
    """runs/KIND-YYYYmmdd-HHMMSS, or the first of -2, -3 ... after it not taken yet."""
    base = Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    run, i = base, 2
    while run.exists():
        run, i = base.with_name(f"{base.name}-{i}"), i + 1
    return run


def _claim_default_run_dir(run: Path, kind: str) -> Path:
    """Make the default folder ``run`` for this command alone, or the next free one.

    Commands started in the same second pick the same default name; the name chosen before
    the checks may have been taken since. ``mkdir`` succeeds for one process only, so each
    command that loses the race takes the next free name instead of another's folder.
    """
    while True:
        run.parent.mkdir(parents=True, exist_ok=True)
        try:
            run.mkdir()
            return run
        except FileExistsError:
            run = _default_run_dir(kind)


# ----------------------------------------------------------------------------- commands


def _report_first_step() -> None:
    _say(f"npvae: first step done {time.perf_counter() - _STARTED:.1f} s after start")


def cmd_train(ns) -> int:
    from .train import run_lock

    given = {k: v for k, v in vars(ns).items() if k not in ("command", "func")}
    if "resume" in given:
        _check_resume_options(given)
        run_dir = _resume_dir(given["resume"])
    elif given.get("out"):
        run_dir = Path(given["out"])
    else:
        run_dir = _default_run_dir(given.get("model", DEFAULTS["model"]))
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} is a file, not a run directory; choose another --out")
    # An existing folder is locked at once, so that a command already using it refuses
    # this one before any work; a new folder is made only once the options, the data and
    # the model have passed their checks, so that a mistake leaves nothing behind.
    with run_lock(run_dir, create=False):
        return _train_run(given, run_dir)


def _resume_dir(resume) -> Path:
    """The folder `train --resume RESUME` writes into: the run folder, or the folder of
    its ``checkpoint.npz``. Any other file is refused, since training on from it would
    replace that folder's own checkpoint, metrics and figures."""
    from . import pretrained
    from .checkpoint import FILENAME, checkpoint_path

    if pretrained.is_pretrained(resume):
        raise UsageError(f"--resume takes a run folder; {resume} is a model shipped with npvae, "
                         f"which has no training state to continue. Start a run with npvae train")
    if not Path(resume).exists():
        raise UsageError(f"--resume {resume}: no such run folder or checkpoint file; give the "
                         f"folder a run was written into (by default under runs/)")
    path = checkpoint_path(resume)
    if path.name != FILENAME:
        raise UsageError(f"--resume takes a run folder or its {FILENAME}, not {path}: training "
                         f"on from it would replace the files of {path.parent}. To branch from "
                         f"it, copy it into a new folder: mkdir NEW && cp "
                         f"{shlex.quote(str(path))} NEW/{FILENAME} && npvae train --resume NEW")
    return path.parent


def _check_resume_options(given: dict) -> None:
    if given.get("overwrite"):
        raise UsageError("--overwrite and --resume exclude each other: --resume continues the "
                         "run, --overwrite (with --out) replaces it")
    not_allowed = sorted(set(given) - RESUME_OK)
    if not_allowed:
        flags = ", ".join("--" + k.replace("_", "-") for k in not_allowed)
        raise UsageError(f"{flags} cannot be changed when resuming: --resume continues with "
                         f"the run's saved settings (only --epochs, --lr, --clip, --backend, "
                         f"--data-dir and --no-progress may be given)")


def _train_run(given: dict, run_dir: Path) -> int:
    """`npvae train`: the settings, the run folder, the data and the model are checked first,
    deleting and creating nothing; then, in the locked folder, training, the ELBO, figures."""
    from .models import build
    from .train import check_writable, run_lock

    if "resume" in given:
        ck = _load_run(given["resume"])
        s = {**DEFAULTS, **ck.args, **{k: v for k, v in given.items() if k != "resume"}}
        model = ck.model
    else:
        s = new_run_settings(given)
        ck = None
        check_run_dir(run_dir, s.get("overwrite", False))  # refuses now; deletes nothing yet
    check_writable(nearest_folder(run_dir))  # before loading data and building the model
    _set_backend(s["backend"])
    _announce_compilation()

    x_train, x_val = load_training_data(s, val_given=ck is None and "val" in given, packed=True)
    steps_per_epoch = -(-len(x_train) // s["batch_size"])
    if ck is None:
        config = model_config(s, x_train.shape[1], steps_per_epoch)
        check_model_size(config, s["batch_size"])
        try:
            model = build(config, rng=s["seed"])
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if "resume" not in given and not given.get("out"):  # the default folder: this run's alone
        run_dir = _claim_default_run_dir(run_dir, given.get("model", DEFAULTS["model"]))
    with run_lock(run_dir):  # made now if new, and held until the figures are written
        if ck is None:  # every check passed: only now may an old run's files go (--overwrite)
            prepare_run_dir(run_dir, s.get("overwrite", False))
        check_writable(run_dir)
        return _train_and_report(given, run_dir, s, ck, model, x_train, x_val)


def _train_and_report(given, run_dir, s, ck, model, x_train, x_val) -> int:
    """`npvae train` in its locked run folder: training, the test ELBO, the figures."""
    from . import evaluate
    from .figures import make_figures
    from .train import side_rng, train

    run = shlex.quote(str(run_dir))  # pasted into a shell as it is
    if ck is not None and ck.epoch >= s["epochs"]:
        done = f"{ck.epoch} epochs"
        if ck.position is not None:  # stopped inside the epoch after them
            done += f" and {ck.position['batch']} batches of epoch {ck.epoch + 1}"
        _say(f"npvae: {run_dir} has already trained for {done}; nothing to do. "
             f"Pass --epochs N with N > {ck.epoch} to train further; for the test ELBO and "
             f"figures of the model as it is: npvae eval {run} && npvae plot {run}")
        return 0
    if ck is not None:
        for key in ("lr", "clip"):
            if key in given and ck.args.get(key) != s[key]:
                _say(f"npvae: --{key} {s[key]} from here on (it was {ck.args.get(key)}); "
                     f"metrics.jsonl records the change")
    stored = {k: v for k, v in s.items() if k not in ("progress", "out", "resume", "overwrite")}
    stale_prior = ck is not None and is_vq(model) and _has_prior(run_dir)
    if stale_prior:  # a prior fitted to another state of the VQ-VAE is not used afterwards
        _say(f"npvae: {run_dir}/prior was fitted to this VQ-VAE as it was before this training; "
             f"afterwards npvae sample refuses it and npvae eval reports the uniform prior's "
             f"bound until it is fitted again: npvae train-prior {run} --overwrite")
    what = "continuing" if ck is not None else "training"
    objective = f" (objective iwae, k = {s['k']})" if s.get("objective") == "iwae" else ""
    _say(f"npvae: {what} {s['model']}{objective} ({model.num_params():,} parameters) on "
         f"{len(x_train):,} "
         f"{s['dataset']} images ({len(x_val):,} held out for validation) for {s['epochs']} "
         f"epochs; run directory {run_dir}")
    history = train(model, x_train, x_val, epochs=s["epochs"], batch_size=s["batch_size"],
                    lr=s["lr"], optimizer=s["optimizer"], clip=s["clip"], seed=s["seed"],
                    binarize=s["binarize"], run_dir=run_dir, progress=s["progress"],
                    resume_from=ck, args=stored, on_first_step=_report_first_step,
                    schedule=s.get("schedule", "constant"))

    x_grey, y_test, x_test = _test_set(s)
    res = evaluate.elbo(model, x_test, side_rng(s["seed"], "test-noise"), batch_size=EVAL_BATCH)
    figures = make_figures(model, run_dir, x_grey, y_test, history, side_rng(s["seed"], "figures"))
    seconds = sum(r.get("seconds", 0.0) for r in history)
    print(f"test ELBO {res['elbo']:.2f} nats per image (reconstruction {res['recon']:.2f}, "
          f"KL {res['kl']:.2f}) on {len(x_test):,} test images; {len(history)} epochs in "
          f"{seconds:.0f} s of training")
    print(f"run directory: {run_dir}")
    print(f"  {Path(run_dir) / 'metrics.jsonl'}   one JSON line of metrics per epoch")
    print(f"  {Path(run_dir) / 'checkpoint.npz'}  model, optimizer and RNG state")
    print(f"  figures: {', '.join(Path(p).name for p in figures.values())}")
    if stale_prior:
        print(f"next: npvae train-prior {run} --overwrite   (its prior fits the VQ-VAE before "
              f"this training), then npvae eval {run}")
    else:
        print(f"next: npvae eval {run}   |   npvae sample {run}")
    return 0


def _has_prior(run_dir) -> bool:
    """Whether the run folder holds a learned prior's checkpoint (RUN/prior)."""
    from .checkpoint import FILENAME
    from .codeprior import prior_dir

    return (prior_dir(run_dir) / FILENAME).is_file()


def _small_model(ns, **options) -> tuple:
    """npvae gradcheck and tour: (model, x, eps), the small float64 model of the MODEL named,
    on the backend asked for (:func:`npvae.tour.tour_model`)."""
    from .tour import tour_model

    _set_backend(ns.backend)
    _announce_compilation()
    ns.kind = _kind_of(ns)
    try:
        return tour_model(ns.kind, batch=ns.batch, seed=ns.seed, **options)
    except ValueError as exc:  # an option the model does not take, e.g. --sampled on a VAE
        raise UsageError(str(exc)) from None


def cmd_gradcheck(ns) -> int:
    from .gradcheck import H, check_model

    model, x, eps = _small_model(ns)
    if is_vq(model):
        # The VQ loss is piecewise constant in the encoder output: check_model takes finite
        # differences of the straight-through objective, valid while no code can change.
        margin = model.assignment_margin(x)
        if margin < 1e-4:
            raise UsageError(f"seed {ns.seed} puts an encoder output almost exactly between two "
                             f"codes (margin {margin:.1e}); try another --seed")
    rows = check_model(model, x, eps=eps)
    header = f"{'parameter':<12} {'entries':>7}  {'|analytic|':>11}  {'|numeric|':>11}  {'rel. error':>10}"
    print(f"gradient check: {ns.kind}, float64, batch {ns.batch}, seed {ns.seed}, central "
          f"differences at h = {H:g} and h/2 combined by Richardson extrapolation (GC.4)")
    print(header)
    print("-" * len(header))
    failed = []
    for r in rows:
        mark = "" if r.rel_error <= ns.tol else "  FAIL"
        if mark:
            failed.append(r.name)
        print(f"{r.name:<12} {r.entries:>7}  {r.analytic_norm:>11.4e}  {r.numeric_norm:>11.4e}  "
              f"{r.rel_error:>10.2e}{mark}")
    worst = max(r.rel_error for r in rows)
    if failed:
        print(f"FAILED: {len(failed)} of {len(rows)} parameters above {ns.tol:g}: {', '.join(failed)}")
        return 1
    print(f"ok: all {len(rows)} parameters agree (largest relative error {worst:.1e} <= {ns.tol:g})")
    return 0


def cmd_tour(ns) -> int:
    from .tour import format_tour, tour

    model, x, eps = _small_model(ns, data_dim=ns.data_dim, likelihood=ns.likelihood,
                                 sampled=ns.sampled, metric=ns.metric)
    nodes = tour(model, x, eps)
    given = ((f" --likelihood {ns.likelihood}" if ns.likelihood else "")
             + (" --sampled" if ns.sampled else "") + (f" --metric {ns.metric}" if ns.metric else ""))
    print(f"npvae tour {ns.kind}{given}, seed {ns.seed}")
    print(format_tour(nodes))
    return 0 if nodes.ok else 1


# ----------------------------------------------------------------------------- entry point


# what to make smaller when a command runs out of memory, in that command's own options
_MEMORY_HINTS = {
    "train": "choose a smaller model (--hidden, --latent) or a smaller --batch-size",
    "train-prior": "choose a smaller prior (--hidden) or a smaller --batch-size",
    "eval": "choose a smaller --k or --limit",
    "sample": "choose a smaller --n",
    "gradcheck": "choose a smaller --batch",
    "tour": "choose a smaller --batch",
}


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    from .backend import check_environment
    from .checkpoint import CheckpointError
    from .memory import keep_freed_memory
    from .data import DataUnavailableError
    from .train import RunInUse, TrainingDiverged, TrainingInterrupted, stop_on_signals

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        check_environment()
        keep_freed_memory()  # each step's large temporaries reuse mapped pages (npvae/memory.py)
        with stop_on_signals():  # SIGTERM and SIGHUP stop like Ctrl-C
            return int(ns.func(ns) or 0)
    except TrainingInterrupted as exc:
        _say(f"npvae: {exc}")
        run = exc.checkpoint and shlex.quote(str(Path(exc.checkpoint).parent))
        if run and exc.finished:  # stopped before the test ELBO and the figures
            _say(f"npvae: training is complete; for its test ELBO and figures: npvae eval {run} "
                 f"&& npvae plot {run}")
        elif run:
            _say(f"npvae: continue with: npvae train --resume {run}")
        return 128 + exc.signum
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except SystemError as exc:  # Ctrl-C inside a Numba dispatcher (compiling, say) surfaces so
        stop = _keyboard_interrupt_behind(exc)
        if stop is None:
            raise
        return _interrupted(stop)
    except TrainingDiverged as exc:
        _say(f"npvae: {exc}")
        return 1
    except (UsageError, CheckpointError, DataUnavailableError, RunInUse) as exc:
        _say(f"npvae: error: {exc}")
        return 2
    except ValueError as exc:  # NPVAE_BACKEND names no backend
        if "NPVAE_BACKEND" not in str(exc):
            raise
        _say(f"npvae: error: {exc}")
        return 2
    except MemoryError:
        _say(f"npvae: error: out of memory; {_MEMORY_HINTS.get(ns.command, _MEMORY_HINTS['train'])}")
        return 1
    except OSError as exc:
        _say(f"npvae: error: {exc}")
        return 1


def _interrupted(exc: KeyboardInterrupt) -> int:
    """Ctrl-C, SIGTERM or SIGHUP outside a training loop: say so; 128 + the signal number."""
    signum = getattr(exc, "signum", signal.SIGINT)
    _say("npvae: interrupted" if signum == signal.SIGINT else f"npvae: stopped by {exc}")
    return 128 + signum


def _keyboard_interrupt_behind(exc: BaseException):
    """The KeyboardInterrupt that ``exc`` was raised from or while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
