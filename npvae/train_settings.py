"""What the options of ``npvae train`` become: a run's settings, its model config, and the
checks made before any model is built (options the model does not take, its size).

:mod:`npvae.cli` parses the options; this module decides what they mean for each kind of
model. Which options a kind takes is asked of its class (:mod:`npvae.kinds`), so a new
kind of VAE or VQ-VAE, MLP or convolutional, gets the right options without a new entry.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from .cli_common import DEFAULTS, UsageError, _hidden_list, _say
from .kinds import is_conv, is_vq, model_class

# Kinds whose name fixes the decoder's likelihood.
LIKELIHOOD = {"vae-gaussian": "gaussian", "vae-bernoulli": "bernoulli"}


def _mlp_vae(kind) -> bool:
    """The MLP VAE, which also trains on the IWAE bound and takes free bits."""
    from .models import VAE

    return issubclass(model_class(kind), VAE) and not is_conv(kind)


def _autoencoder(kind) -> bool:
    from .models import Autoencoder

    return issubclass(model_class(kind), Autoencoder)


# Options that only some models take: {option: which kinds take it}.
ONLY_FOR = {
    "hidden": lambda k: not is_conv(k), "activation": lambda k: not is_conv(k),
    "channels": is_conv,
    "latent": lambda k: not is_vq(k), "warmup": lambda k: not is_vq(k),
    "free_bits": _mlp_vae, "objective": _mlp_vae, "k": _mlp_vae,
    "sigma2": lambda k: LIKELIHOOD.get(k, "gaussian") == "gaussian",
    "likelihood": lambda k: k not in LIKELIHOOD,
    "sampled": _autoencoder,
    "codes": is_vq, "code_dim": is_vq, "metric": is_vq, "ema": is_vq, "restart_after": is_vq,
    "kmeans_init": is_vq,
    "code_vectors": lambda k: is_vq(k) and not is_conv(k),  # a conv map fixes M
}


def kinds_taking(option: str) -> list:
    """The kinds of ``npvae train --model`` that take ``option``."""
    from .models import KINDS

    return [k for k in KINDS if ONLY_FOR[option](k)]


# ----------------------------------------------------------------------------- argument types


def parse_warmup(text: str) -> tuple[int, str]:
    """'2000' or '2000steps' -> (2000, 'steps'); '3epochs' or '3ep' -> (3, 'epochs')."""
    t = str(text).strip().lower()
    for suffix, unit in (("epochs", "epochs"), ("epoch", "epochs"), ("ep", "epochs"),
                         ("steps", "steps"), ("step", "steps")):
        if t.endswith(suffix):
            t = t[: -len(suffix)].strip()
            break
    else:
        unit = "steps"
    try:
        value = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of steps (2000) or epochs (3epochs), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"warm-up must be >= 0, got {text!r}")
    return value, unit


def _warmup(text: str) -> str:
    parse_warmup(text)  # validate now, convert once the number of steps per epoch is known
    return text


def _schedule(text: str) -> str:
    """--schedule: checked by npvae.schedule.parse, kept as written (lower case)."""
    from . import schedule

    try:
        schedule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip().lower()


# ----------------------------------------------------------------------------- settings


def new_run_settings(given: dict) -> dict:
    """The settings of a new run: the options given, then the kind's defaults, then DEFAULTS."""
    from . import schedule
    from .cli_conv import kind_defaults

    kind = given.get("model", DEFAULTS["model"])
    s = {**DEFAULTS, **kind_defaults(kind), **given}
    if "epochs" not in given and schedule.epochs_of(s["schedule"]):
        s["epochs"] = schedule.epochs_of(s["schedule"])
    wrong = [k for k, takes in ONLY_FOR.items() if k in given and not takes(kind)]
    if wrong:
        k = wrong[0]
        raise UsageError(f"--{k.replace('_', '-')} is for --model {' or '.join(kinds_taking(k))}, "
                         f"not {kind}; see npvae train --help")
    if "k" in given and s["objective"] != "iwae":
        raise UsageError("--k is the number of importance samples of --objective iwae")
    elbo_only = [k for k in ("beta", "warmup", "free_bits") if k in given]
    if s["objective"] == "iwae" and elbo_only:
        raise UsageError(f"--{elbo_only[0].replace('_', '-')} is an option of the ELBO, not of "
                         f"--objective iwae")
    s["likelihood"] = LIKELIHOOD.get(kind) or s["likelihood"] or "bernoulli"
    if s["beta"] is None:
        s["beta"] = 0.25 if is_vq(kind) else 1.0  # the commitment cost, or the KL weight
    if s["binarize"] is None:
        s["binarize"] = "dynamic" if s["likelihood"] == "bernoulli" else "none"
    if s["binarize"] != "none" and s["likelihood"] != "bernoulli":
        _say(f"npvae: note: --binarize {s['binarize']} with a Gaussian decoder")
    return s


def model_config(s: dict, data_dim: int, steps_per_epoch: int) -> dict:
    """The model config for a run's settings (warm-up converted to steps)."""
    value, unit = parse_warmup(s["warmup"])
    warmup_steps = value * steps_per_epoch if unit == "epochs" else value
    kind = s["model"]
    if is_conv(kind):
        from .cli_conv import conv_config
        return conv_config(s, data_dim, warmup_steps)
    cfg = dict(kind=kind, data_dim=data_dim, hidden=_hidden_list(s["hidden"]),
               activation=s["activation"], dtype=s["dtype"])
    if is_vq(kind):
        cfg.update(num_codes=s["codes"], code_dim=s["code_dim"], num_vectors=s["code_vectors"],
                   likelihood=s["likelihood"], sigma2=s["sigma2"], metric=s["metric"],
                   beta=s["beta"], ema=s["ema"], restart_after=s["restart_after"],
                   kmeans_init=s["kmeans_init"])
    elif _autoencoder(kind):
        cfg.update(latent=s["latent"], likelihood=s["likelihood"], sigma2=s["sigma2"],
                   sampled=s["sampled"], beta=s["beta"], warmup_steps=warmup_steps)
    else:
        cfg.update(latent=s["latent"], beta=s["beta"], warmup_steps=warmup_steps,
                   free_bits=s["free_bits"])
        if LIKELIHOOD.get(kind) == "gaussian":
            cfg["sigma2"] = s["sigma2"]
        if s.get("objective") == "iwae":  # the same networks, trained on L_k (IWAE.2)
            cfg.update(kind="iwae", likelihood=s["likelihood"], k=s["k"])
    return cfg


# ----------------------------------------------------------------------------- model size


def _physical_memory() -> int | None:
    """This machine's memory in bytes, where the platform says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


def _bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000


def check_model_size(config: dict, batch_size: int) -> None:
    """Refuse, before allocating anything, a model whose training cannot fit in memory.

    Training keeps the parameters, the gradient and Adam's two moments (four copies, and
    a fifth for slack) and, per batch, a few activations of the widest layer.
    """
    from .checkpoint import param_count

    n = param_count(config)
    if n is None:
        return  # a malformed config, or one param_count does not know: building explains
    itemsize = np.dtype(config["dtype"]).itemsize
    widest = max([config["data_dim"], *config.get("hidden", []), *_conv_widths(config)])
    need = itemsize * (5 * n + 8 * batch_size * widest)
    memory = _physical_memory()
    if memory and need > memory:
        sizes = "--channels" if "channels" in config else "--hidden sizes"
        raise UsageError(
            f"this model has {n:,} parameters ({_bytes(n * itemsize)}), and training it needs "
            f"about {_bytes(need)}, more than this machine's {_bytes(memory)} of memory; "
            f"choose smaller {sizes} (or a smaller --latent, --codes or --batch-size)")


def _conv_widths(config: dict) -> list:
    """Values per example of each convolution's windows laid out as rows (im2col):
    16 C_in per output position of a 4 x 4 kernel."""
    if "channels" not in config:
        return []
    c, h, w = (int(s) for s in config["image_shape"])
    ins = [c, *(int(k) for k in config["channels"])]
    return [16 * k * (h >> (i + 1)) * (w >> (i + 1)) for i, k in enumerate(ins[:-1])]
