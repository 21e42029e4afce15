"""``npvae eval``, ``npvae sample`` and ``npvae plot``: what a trained run gives.

Each reads a run's checkpoint (or a model shipped with the package, pretrained:NAME):
eval measures it on the test set and writes RUN/eval.json, sample decodes draws from
its prior into a PNG, plot redraws its figures. While one of them writes into a run,
the run is locked (:func:`npvae.runs.run_lock`). :mod:`npvae.cli` registers them.
"""
from __future__ import annotations

import json
import math
import textwrap
import time
from pathlib import Path

import numpy as np

from .cli_common import (
    EVAL_BATCH, UsageError, _add_backend, _announce_compilation, _load_run, _non_negative_int,
    _positive_float, _positive_int, _run_dir_of, _set_backend, _test_set, add_command,
    refuse_prior,
)
from .kinds import is_vq

MAX_SAMPLES = 400  # npvae sample: a 20 x 20 grid is the most one readable image holds


def add_result_commands(sub) -> None:
    """Register ``npvae eval``, ``sample`` and ``plot`` on the subparsers of the main command."""
    _add_eval(sub)
    _add_sample(sub)
    _add_plot(sub)


def _add_eval(sub) -> None:
    p = add_command(
        sub, "eval", "evaluate a trained run on the test set",
        "Evaluate a run's checkpoint on the test set: the ELBO and its terms, the "
        "importance-weighted log-likelihood estimate log p(x) with K samples, the KL of each "
        "latent dimension, the number of active latent units and, for a VQ-VAE, codebook "
        "statistics. Prints a table and writes RUN/eval.json (refused while another npvae "
        "process writes into RUN).",
        epilog="examples:\n  npvae eval runs/vae-bernoulli-20250101-120000\n"
               "  npvae eval RUN --k 0            ELBO only (fast)\n"
               "  npvae eval RUN --k 5000 --limit 1000\n")
    p.add_argument("run", metavar="RUN", help="a run directory or checkpoint.npz file, or "
                   "pretrained:NAME for a shipped model (vae-bernoulli, vae-k1, iwae-k5), "
                   "printed only")
    p.add_argument("--k", type=_non_negative_int, default=100,
                   help="importance samples per image for log p(x) (default 100; 0 skips it; "
                        "more is tighter but slower)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="use only the first N test images")
    p.add_argument("--seed", type=_non_negative_int, default=None,
                   help="seed of the evaluation noise (default: the run's seed)")
    p.add_argument("--data-dir", metavar="DIR", help="where datasets are cached")
    _add_backend(p)
    p.set_defaults(func=cmd_eval)


def _add_sample(sub) -> None:
    p = add_command(
        sub, "sample", "draw samples from a trained model into a PNG",
        "Decode draws from the prior of a trained model and save them as a grid.",
        epilog="examples:\n  npvae sample runs/vae-bernoulli-20250101-120000\n"
               "  npvae sample RUN --n 100 --seed 3 --out digits.png\n")
    p.add_argument("run", metavar="RUN", help="a run directory or checkpoint.npz file, or "
                   "pretrained:NAME for a shipped model (vae-bernoulli, vae-k1, iwae-k5)")
    p.add_argument("--n", type=_positive_int, default=64,
                   help=f"number of samples (default 64, at most {MAX_SAMPLES}: a 20 x 20 grid)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="default 0")
    p.add_argument("--out", metavar="PNG", help="output file (default RUN/samples-seed<SEED>.png)")
    p.add_argument("--temperature", type=_positive_float, metavar="T",
                   help="VQ-VAE with a learned prior (npvae train-prior): divide its logits by T "
                        "> 0 (default 1; below 1 sharper, above 1 more varied)")
    _add_backend(p)
    p.set_defaults(func=cmd_sample)


def _add_plot(sub) -> None:
    p = add_command(
        sub, "plot", "remake a run's figures from its checkpoint and metrics",
        "Redraw every figure of a run (reconstructions, samples, loss curves, latent "
        "scatter, interpolation, manifold for a 2-D latent space, codebook usage and "
        "perplexity for a VQ-VAE) from its checkpoint and the test set.",
        epilog="example:\n  npvae plot runs/vae-bernoulli-20250101-120000\n")
    p.add_argument("run", metavar="RUN", help="a run directory or checkpoint.npz file")
    p.add_argument("--data-dir", metavar="DIR", help="where datasets are cached")
    _add_backend(p)
    p.set_defaults(func=cmd_plot)


def _is_pretrained(run) -> bool:
    """RUN names a model shipped with npvae: pretrained:NAME (npvae.pretrained)."""
    return str(run).startswith("pretrained:")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _kl_per_dim_lines(kl) -> str:
    """The KL of each latent dimension (EVAL.2), in nats per image: in order, then sorted."""
    def row(label, values):
        return textwrap.fill(" ".join(f"{v:.2f}" for v in values), width=92,
                             initial_indent=f"  {label:<15}", subsequent_indent=" " * 17)

    collapsed = sum(v < 0.01 for v in kl)
    return "\n".join([
        f"KL per latent dimension, nats per image (EVAL.2; they sum to kl; {collapsed} of "
        f"{len(kl)} below 0.01):",
        row("dimension 0..", kl), row("largest first", sorted(kl, reverse=True))])


def cmd_eval(ns) -> int:
    from .train import run_lock

    _set_backend(ns.backend)
    _announce_compilation()
    if _is_pretrained(ns.run):  # nothing is written: the package's folder is only read
        return _eval_run(ns)
    with run_lock(_run_dir_of(ns.run), create=False):  # eval.json is written into the run
        return _eval_run(ns)


def _eval_run(ns) -> int:
    from . import evaluate
    from .atomic import write_text_atomic
    from .train import side_rng

    ck = _load_run(ns.run)
    s = ck.args
    _, _, x_test = _test_set(s, ns.data_dir)
    if ns.limit:
        x_test = x_test[: ns.limit]
    seed = s["seed"] if ns.seed is None else ns.seed
    t0 = time.perf_counter()
    res = evaluate.evaluate_all(ck.model, x_test, side_rng(seed, "test-noise"), k=ns.k,
                                batch_size=EVAL_BATCH)
    if is_vq(ck.model):  # the learned prior's numbers, or the uniform one's
        from .prior_cli import prior_eval
        res.update(prior_eval(ck, x_test, res["recon"], seed))
    if evaluate.family(ck.model) in ("vae", "ae", "ae-sampled"):  # a Gaussian q(z|x)
        res["kl_per_dim"] = evaluate.kl_per_dimension(ck.model, x_test,
                                                      batch_size=EVAL_BATCH)  # (Z,)  (EVAL.2)
    res = _jsonable(res)
    k = {"k": ns.k} if "iw_k" in res else {}  # only where an importance-weighted estimate ran
    report = {"run": str(ck.path.parent), "checkpoint": str(ck.path), "epochs": ck.epoch,
              "model": ck.model.config["kind"], "test_images": len(x_test), **k,
              "seconds": time.perf_counter() - t0, **res}
    out = None if _is_pretrained(ns.run) else write_text_atomic(
        ck.path.parent / "eval.json", json.dumps(report, indent=2) + "\n")
    width = max(len(k) for k in report)
    print(f"{'metric':<{width}}  value")
    for key, value in report.items():
        if isinstance(value, (list, dict)):
            continue  # e.g. per-code counts: in eval.json
        print(f"{key:<{width}}  {_fmt(value)}")
    if "kl_per_dim" in report:
        print(_kl_per_dim_lines(report["kl_per_dim"]))
    if out is not None:
        print(f"written to {out}")
    return 0


def cmd_sample(ns) -> int:
    from .train import run_lock

    if ns.n > MAX_SAMPLES:
        raise UsageError(f"--n {ns.n} is more samples than one readable image holds (at most "
                         f"{MAX_SAMPLES}, a 20 x 20 grid); for more, run npvae sample again with "
                         f"other --seed values")
    if ns.out and Path(ns.out).suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {ns.out}")
    _set_backend(ns.backend)
    _announce_compilation()
    if ns.out or _is_pretrained(ns.run):  # written elsewhere: the run is only read
        return _sample_run(ns)
    with run_lock(_run_dir_of(ns.run), create=False):  # the PNG goes into the run
        return _sample_run(ns)


def _sample_run(ns) -> int:
    from . import plots
    from .checkpoint import load_checkpoint

    # a checkpoint from the Python API needs no run settings to be sampled: loaded as it is
    ck = _load_run(ns.run) if _is_pretrained(ns.run) else refuse_prior(load_checkpoint(ns.run))
    prior = "the prior"
    if is_vq(ck.model):  # a learned prior if the run has one (npvae train-prior)
        from .prior_cli import sample_images
        images, prior = sample_images(ck, ns.n, np.random.default_rng(ns.seed), ns.temperature)
    elif ns.temperature is not None:
        raise UsageError("--temperature is for a VQ-VAE with a learned prior (npvae train-prior)")
    else:
        images = ck.model.sample(ns.n, np.random.default_rng(ns.seed))
    out = Path(ns.out) if ns.out else ck.path.parent / f"samples-seed{ns.seed}.png"
    if _is_pretrained(ns.run) and not ns.out:  # into the current folder, not the package
        out = Path(f"samples-{ck.path.stem}-seed{ns.seed}.png")
    plots.save_samples(out, np.clip(images, 0.0, 1.0), ncols=math.ceil(math.sqrt(ns.n)),
                       title=f"{ns.n} samples from {prior} (seed {ns.seed})")
    print(f"wrote {out}")
    return 0


def cmd_plot(ns) -> int:
    from .figures import make_figures
    from .train import run_lock, side_rng

    if _is_pretrained(ns.run):
        raise UsageError(f"npvae plot redraws a run's figures from its checkpoint and metrics; "
                         f"{ns.run} is a model shipped with npvae, with no run folder or "
                         f"metrics: use npvae sample {ns.run} or npvae eval {ns.run}")
    _set_backend(ns.backend)
    _announce_compilation()
    with run_lock(_run_dir_of(ns.run), create=False):  # the figures are written into the run
        ck = _load_run(ns.run)
        x_grey, y_test, _ = _test_set(ck.args, ns.data_dir)
        figures = make_figures(ck.model, ck.path.parent, x_grey, y_test, ck.history,
                               side_rng(ck.args["seed"], "figures"))
    for path in figures.values():
        print(f"wrote {path}")
    return 0
