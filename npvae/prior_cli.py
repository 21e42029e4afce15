"""``npvae train-prior RUN``, and what ``npvae eval`` and ``npvae sample`` do with a learned prior.

    npvae train-prior RUN              fit a MADE prior to the codes of the VQ-VAE in RUN,
                                       into RUN/prior/ (checkpoint.npz, metrics.jsonl,
                                       samples.png: uniform-prior samples beside learned ones)
    npvae train-prior RUN --resume     continue a stopped prior exactly where it stopped
    npvae train-prior RUN --overwrite  replace the prior (after the VQ-VAE has changed)

The command line's other rules hold: errors exit with 2 and write nothing, Ctrl-C,
SIGTERM and SIGHUP save a checkpoint, and the run folder is locked while it is written.
"""
from __future__ import annotations

import math
import shlex
import time
from pathlib import Path

import numpy as np

# Settings of `npvae train-prior` when an option is not given: about a minute of training
# on two cores for the default VQ-VAE (M = 4, K = 128). direct "auto" gives the output layer
# MADE's direct connection from the codes unless it would dwarf the hidden path
# (npvae.models.prior.direct_by_default): kept for M = 4, K = 128, left out for a 7x7 map.
DEFAULTS = dict(hidden="512", epochs=10, batch_size=128, lr=1e-3, seed=0, direct="auto")
RESUME_OK = {"run", "resume", "epochs", "lr", "progress", "backend", "data_dir"}
FIGURE = "samples.png"  # RUN/prior/samples.png: uniform-prior samples beside learned-prior ones

_EPILOG = """\
examples:
  npvae train --model vqvae --out runs/vq && npvae train-prior runs/vq
      a VQ-VAE, then its prior: RUN/prior/ receives checkpoint.npz, metrics.jsonl
      and samples.png (uniform-prior samples beside learned-prior ones)
  npvae sample runs/vq --temperature 0.8      digits drawn through the prior
  npvae eval runs/vq                          adds prior_nats and the two bounds
  npvae train-prior runs/vq --resume --epochs 20
  npvae train-prior runs/vq --overwrite --hidden 1024,1024
  npvae train-prior runs/conv --epochs 2      a conv-vqvae run's 7x7 map of 256 codes:
      without MADE's direct connection, which would hold (49 x 256)^2 weights (left out
      by default there; --direct keeps it); 12.9 million parameters, an epoch takes
      about a minute on 2 idle cores (up to 5 on busy ones), and 4 epochs give 121 nats
      per image against 272 for the uniform prior

The training images are encoded once by the VQ-VAE (binarized as its evaluation
binarizes them) and the prior learns the distribution of their code tuples. The
prior records which VQ-VAE it was fitted to: after the VQ-VAE trains further, its
codes mean something else, and the prior must be fitted again (--overwrite).
"""


def add_train_prior_command(sub) -> None:
    """Register ``npvae train-prior`` on the subparsers of the main command."""
    from . import cli_common as cli

    p = sub.add_parser(
        "train-prior", help="fit a learned prior over the codes of a VQ-VAE run",
        description=cli._wrap(
            "Fit an autoregressive prior (MADE, a masked MLP) to the codes that the VQ-VAE in "
            "RUN gives the training images, so that `npvae sample RUN` draws digits rather "
            "than noise. The prior is a run of its own in RUN/prior/, with metrics, "
            "checkpoints after every epoch and exact resume."),
        epilog=_EPILOG, formatter_class=cli._formatter, argument_default=None)
    p.add_argument("run", metavar="RUN", help="a VQ-VAE run directory (or its checkpoint.npz)")
    p.add_argument("--hidden", type=cli._hidden, metavar="SIZES",
                   help=f"hidden layer sizes of the masked MLP (default {DEFAULTS['hidden']})")
    direct = p.add_mutually_exclusive_group()
    direct.add_argument("--direct", dest="direct", action="store_const", const="yes",
                        help="give the output layer MADE's direct connection from the codes, "
                             "(M K)^2 weights. Default: only when that is at most 4 times the "
                             "parameters of the hidden path, so yes for the MLP VQ-VAE "
                             "(M = 4, K = 128) and no for a conv-vqvae's 7x7 map of codes")
    direct.add_argument("--no-direct", dest="direct", action="store_const", const="no",
                        help="leave the direct connection out: the logits read the last hidden "
                             "layer alone")
    p.add_argument("--epochs", type=cli._positive_int, metavar="N",
                   help=f"passes over the training codes (default {DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=cli._positive_int, metavar="N",
                   help=f"default {DEFAULTS['batch_size']}")
    p.add_argument("--lr", type=cli._positive_float, help=f"Adam's learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--seed", type=cli._non_negative_int, help="seed of init and data order (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue the prior in RUN/prior from its checkpoint (only --epochs, "
                        "--lr, --backend, --data-dir and --no-progress may be given)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the prior already in RUN/prior")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar")
    p.add_argument("--data-dir", metavar="DIR", help="where datasets are cached")
    cli._add_backend(p)
    p.set_defaults(func=cmd_train_prior)


def cmd_train_prior(ns) -> int:
    from . import cli_common as cli
    from .train import run_lock

    given = {k: v for k, v in vars(ns).items()
             if k not in ("command", "func") and v not in (None, False) and not (k == "progress" and v)}
    if ns.resume:
        if ns.overwrite:
            raise cli.UsageError("--overwrite and --resume exclude each other: --resume continues "
                                 "the prior, --overwrite replaces it")
        not_allowed = sorted(set(given) - RESUME_OK)
        if not_allowed:
            flags = ", ".join("--" + k.replace("_", "-") for k in not_allowed)
            raise cli.UsageError(f"{flags} cannot be changed when resuming a prior: it continues "
                                 f"with its saved settings")
    run_dir = cli._run_dir_of(ns.run)
    _one_prior_per_folder(ns.run)
    with run_lock(run_dir, create=False):  # the VQ-VAE must not change while its codes are read
        return _train_prior(ns, run_dir)


def _one_prior_per_folder(run) -> None:
    """RUN/prior belongs to RUN/checkpoint.npz: a checkpoint file of another name would
    share that folder (and replace its prior) with every other checkpoint beside it."""
    from . import cli_common as cli
    from . import pretrained
    from .checkpoint import FILENAME, checkpoint_path

    if pretrained.is_pretrained(run) or not Path(run).exists():
        return  # _vq_run names what is wrong with these
    path = checkpoint_path(run)
    if path.name != FILENAME:
        raise cli.UsageError(
            f"train-prior takes a run folder or its {FILENAME}, not {path}: the prior is "
            f"written to {path.parent / 'prior'}, which belongs to {path.parent / FILENAME}. "
            f"Copy the checkpoint into a folder of its own: mkdir NEW && cp "
            f"{shlex.quote(str(path))} NEW/{FILENAME} && npvae train-prior NEW")


def _vq_run(run):
    """The VQ-VAE run's checkpoint, refusing anything else."""
    from . import cli_common as cli
    from .codeprior import PriorError, require_vqvae

    ck = cli._load_run(run)
    try:
        require_vqvae(ck.model, ck.path)
    except PriorError as exc:
        raise cli.UsageError(str(exc)) from None
    return ck


def _prior_of(run_dir, vq_ck, allow_stale: bool = False):
    """The run's prior checkpoint (checked against its VQ-VAE) or None; PriorError ->
    UsageError, except that with ``allow_stale`` a StalePriorError is raised as it is."""
    from . import cli_common as cli
    from .codeprior import PriorError, StalePriorError, load_prior

    try:
        return load_prior(run_dir, vq_ck)
    except PriorError as exc:
        if allow_stale and isinstance(exc, StalePriorError):
            raise
        raise cli.UsageError(str(exc)) from None


def _train_prior(ns, run_dir: Path) -> int:
    from . import cli_common as cli
    from .checkpoint import FILENAME
    from .codeprior import encode_codes, prior_dir, vqvae_identity
    from .models import MADEPrior
    from .models.prior import direct_by_default
    from .train import (
        METRICS_FILE, TrainingDiverged, TrainingInterrupted, binarize_for_eval, check_writable,
        read_metrics, side_rng, train,
    )

    vq_ck = _vq_run(ns.run)
    vq = vq_ck.model
    if vq.K < 2:  # before any data is loaded
        raise cli.UsageError(f"{run_dir} is a VQ-VAE with one code (--codes 1): every image "
                             f"has the same codes, so the prior is exact and there is nothing "
                             f"to fit; npvae eval and sample use it as it is")
    vs = {**cli.DEFAULTS, **vq_ck.args, "data_dir": ns.data_dir or vq_ck.args.get("data_dir")}
    pdir = prior_dir(run_dir)
    held = [p for p in (pdir / FILENAME, pdir / METRICS_FILE) if p.exists()]
    if ns.resume:
        ck = _prior_of(run_dir, vq_ck)
        if ck is None:
            raise cli.UsageError(f"{run_dir} has no prior to resume ({pdir / FILENAME} does not "
                                 f"exist); start one with npvae train-prior {run_dir}")
        s = {**DEFAULTS, **ck.args}
        s.update({k: getattr(ns, k) for k in ("epochs", "lr") if getattr(ns, k) is not None})
        if ck.epoch >= s["epochs"]:  # nothing to train: the report alone, figure included
            cli._say(f"npvae: the prior of {run_dir} has already trained for {ck.epoch} "
                     f"epochs; nothing to train (pass --epochs N with N > {ck.epoch} to train "
                     f"it further). Its test numbers and {FIGURE}:")
            cli._set_backend(ns.backend)
            _report_prior(ns, vs, vq, ck.model, read_metrics(pdir), run_dir, pdir)
            return 0
    else:
        ck = None
        if held and not ns.overwrite:
            raise cli.UsageError(f"{run_dir} already has a prior ({', '.join(p.name for p in held)} "
                                 f"in {pdir}). Continue it with npvae train-prior {run_dir} "
                                 f"--resume, or replace it with --overwrite")
        s = dict(DEFAULTS)
        s.update({k: getattr(ns, k) for k in DEFAULTS if getattr(ns, k) is not None})
        hidden = cli._hidden_list(s["hidden"])
        if s["direct"] == "auto":
            direct = direct_by_default(vq.M, vq.K, hidden)
        else:
            direct = s["direct"] == "yes"
        if not direct and not hidden:
            raise cli.UsageError("--no-direct needs hidden layers: without them the direct "
                                 "connection is the whole prior")
        cli.check_run_dir(pdir, overwrite=True,  # refuses foreign files now; deletes nothing yet
                          fix=f"move or delete what is in the way: the prior is written to {pdir}")
    check_writable(cli.nearest_folder(pdir))
    cli._set_backend(ns.backend)
    cli._announce_compilation()

    # ---- the codes of the training and validation images, encoded once
    x_train, x_val = cli.load_training_data(vs)
    binarize, seed = vs["binarize"], vs["seed"]
    t0 = time.perf_counter()
    codes_train = encode_codes(vq, x_train, binarize, side_rng(seed, "static"))  # (N, M)
    codes_val = encode_codes(vq, binarize_for_eval(x_val, binarize, seed, "val"), "none", None)
    cli._say(f"npvae: encoded {len(codes_train):,} training and {len(codes_val):,} validation "
             f"images to {vq.M} codes each in {time.perf_counter() - t0:.1f} s")

    if ck is None:
        prior = MADEPrior(num_codes=vq.K, num_vectors=vq.M, hidden=hidden, direct=direct,
                          dtype=vq.dtype, rng=s["seed"])
        pdir.mkdir(exist_ok=True)  # the data and the prior are ready: only now may a former
        cli.prepare_run_dir(pdir, overwrite=True)  # prior's files go (nothing else is deleted)
        check_writable(pdir)
    else:
        prior = ck.model
    x1_train, x1_val = prior.one_hot(codes_train), prior.one_hot(codes_val)  # (N, M K)
    stored = dict(hidden=s["hidden"], direct=s["direct"], vqvae=vqvae_identity(vq_ck),
                  vqvae_run=str(run_dir),
                  dataset=vs["dataset"], vq_binarize=binarize)
    what = "continuing" if ck is not None else "fitting"
    cli._say(f"npvae: {what} a prior over M = {vq.M} codes of K = {vq.K} "
             f"({prior.num_params():,} parameters, hidden {s['hidden']}, "
             f"{'with' if prior.direct else 'without'} the direct connection) for {s['epochs']} "
             f"epochs; uniform prior: M log K = {vq.M * math.log(vq.K):.2f} nats; run directory {pdir}")
    try:
        history = train(prior, x1_train, x1_val, epochs=s["epochs"], batch_size=s["batch_size"],
                        lr=s["lr"], seed=s["seed"], binarize="none", run_dir=pdir,
                        progress=ns.progress, resume_from=ck, args=stored)
    except TrainingInterrupted as exc:  # the hint must name this command, not npvae train
        run = shlex.quote(str(run_dir))  # pasted into a shell as it is
        hint = (f"the prior is trained; for its test cross-entropy: npvae eval {run}"
                if exc.finished else f"continue with: npvae train-prior {run} --resume")
        raise TrainingInterrupted(f"{exc.message}; {hint}", checkpoint=None, epoch=exc.epoch,
                                  step=exc.step, signum=exc.signum, finished=exc.finished) from None
    except TrainingDiverged as exc:
        raise TrainingDiverged(f"{exc} (for this prior: npvae train-prior "
                               f"{shlex.quote(str(run_dir))} --resume "
                               f"--lr LR)", step=exc.step, epoch=exc.epoch) from None

    try:
        _report_prior(ns, vs, vq, prior, history, run_dir, pdir)
    except KeyboardInterrupt:  # the prior is saved; only its numbers and figure are missing
        cli._say(f"npvae: the prior is trained and saved; for its test numbers and {FIGURE}: "
                 f"npvae train-prior {shlex.quote(str(run_dir))} --resume")
        raise
    return 0


def _report_prior(ns, vs, vq, prior, history, run_dir: Path, pdir: Path) -> None:
    """Print the prior's test cross-entropy and save uniform-prior samples beside
    learned-prior ones."""
    from . import cli_common as cli
    from .codeprior import evaluate_prior

    _, _, x_test = cli._test_set(vs, ns.data_dir)
    recon = _recon(vq, x_test)
    res = evaluate_prior(vq, prior, x_test, recon, np.random.default_rng(0))
    figure = save_comparison(pdir / FIGURE, vq, prior, np.random.default_rng(0))
    seconds = sum(r.get("seconds", 0.0) for r in history)
    print(f"prior test cross-entropy {res['prior_nats']:.2f} nats per image, against "
          f"{res['uniform_prior_nats']:.2f} for the uniform prior (perplexity per code "
          f"{res['prior_perplexity']:.1f} of {vq.K}); {len(history)} epochs in {seconds:.0f} s "
          f"of training")
    print(f"bound on -log p(x): {res['nll_bound_learned_prior']:.2f} nats with the learned prior, "
          f"{res['nll_bound_uniform_prior']:.2f} with the uniform one")
    print(f"prior run directory: {pdir} (checkpoint.npz, metrics.jsonl, {figure.name})")
    print(f"next: npvae sample {run_dir}   |   npvae eval {run_dir}")


def _recon(vq, x) -> float:
    from . import evaluate

    return float(evaluate.elbo(vq, x, batch_size=1000)["recon"])


def save_comparison(path, vq, prior, rng, n: int = 64, temperature: float = 1.0):
    """Decoded codes from the uniform prior (left) beside codes from the learned prior (right)."""
    from . import plots
    from .codeprior import decode_codes, sample_codes

    uniform = decode_codes(vq, sample_codes(vq, None, n, rng))
    learned = decode_codes(vq, sample_codes(vq, prior, n, rng, temperature))
    ncols = math.ceil(math.sqrt(n))
    return plots.save_side_by_side(
        path, uniform, learned, ncols=ncols,
        titles=("uniform prior: codes drawn at random", f"learned prior (T = {temperature:g})"))


# ----------------------------------------------------------------------------- eval and sample


def prior_eval(ck, x_test, recon: float, seed: int) -> dict:
    """The prior's entries of eval.json for the run of checkpoint ``ck`` (a VQ-VAE).

    A stale prior (fitted to other codes) is not used: the uniform prior's bound is
    reported, with ``stale_prior`` saying why, and a note on stderr.
    """
    from . import cli_common as cli
    from .codeprior import StalePriorError, evaluate_prior

    vq = ck.model
    uniform = vq.M * math.log(vq.K)
    uniform_entries = {"prior": "uniform", "uniform_prior_nats": uniform,
                       "nll_bound_uniform_prior": recon + uniform}
    try:
        prior_ck = _prior_of(ck.path.parent, ck, allow_stale=True)
    except StalePriorError as exc:  # the VQ-VAE's own numbers still hold: report them
        cli._say(f"npvae: the learned prior is not used, and the bound below is the uniform "
                 f"prior's: {exc}")
        return {**uniform_entries, "stale_prior": str(exc)}
    if prior_ck is None:
        return uniform_entries
    res = evaluate_prior(vq, prior_ck.model, x_test, recon, np.random.default_rng(seed))
    return {"prior": "learned", **res}


def sample_images(ck, n: int, rng, temperature):
    """Images (n, D) for ``npvae sample`` of a VQ-VAE run, and a title saying which prior drew them.

    ``temperature`` None means 1 with a learned prior; given without one, it is an error.
    """
    from . import cli_common as cli
    from .codeprior import decode_codes, sample_codes

    vq = ck.model
    prior_ck = _prior_of(ck.path.parent, ck)
    if prior_ck is None:
        if temperature is not None:
            raise cli.UsageError(f"--temperature needs a learned prior, and {ck.path.parent} has "
                                 f"none; fit one with npvae train-prior {ck.path.parent}")
        cli._say(f"npvae: {ck.path.parent} has no learned prior, so these codes are drawn "
                 f"uniformly, and most decode to smeared strokes rather than digits; fit a prior with npvae train-prior "
                 f"{ck.path.parent}")
        return decode_codes(vq, sample_codes(vq, None, n, rng)), "the uniform prior"
    t = 1.0 if temperature is None else temperature
    images = decode_codes(vq, sample_codes(vq, prior_ck.model, n, rng, t))
    return images, f"the learned prior, T = {t:g}"
