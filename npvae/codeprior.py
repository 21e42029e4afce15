"""A VQ-VAE run's learned prior: the codes it is fitted to, where it lives, its numbers, its samples.

Where it lives. The prior of the run in RUN is a run of its own in ``RUN/prior/``:
``checkpoint.npz`` and ``metrics.jsonl``, written by :func:`npvae.train.train` exactly as
for any model (atomic checkpoints, exact resume, Ctrl-C). Its checkpoint's settings
name the VQ-VAE it was fitted to (``vqvae``: K, M, the epoch, and a CRC-32 of the
parameters), so a prior is never used with a VQ-VAE whose codes mean something else.

What it is fitted to. The VQ-VAE encodes every training image once, with the same
binarization the VQ-VAE's evaluation uses (one fixed Bernoulli sample per image, or the
grey levels when the run did not binarize); the prior (:class:`npvae.models.MADEPrior`)
learns the distribution of the resulting code tuples c(x) (N, M).

What it changes (PRIOR.1): with the point mass q(c|x) on c(x), KL(q || p) = -log p(c(x)),
so the bound is log p(x|z_q) + log p_prior(c(x)) in place of log p(x|z_q) - M log K.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np

from .models.base import positive_int

PRIOR_DIR = "prior"  # RUN/prior/ holds the prior's checkpoint.npz and metrics.jsonl
EVAL_SAMPLES = 10_000  # code tuples drawn from the prior for its usage statistics (PRIOR.2)


class PriorError(ValueError):
    """A prior that cannot be used here: not a VQ-VAE run, K or M differ, or a stale prior."""


class StalePriorError(PriorError):
    """The run's prior was fitted to other codes: K or M differ, or the VQ-VAE has trained
    since. ``npvae eval`` then reports the uniform prior's bound; ``sample`` refuses."""


def prior_dir(run_dir) -> Path:
    """RUN/prior: the prior's own run folder."""
    return Path(run_dir) / PRIOR_DIR


def require_vqvae(model, where) -> None:
    """Refuse, by name, a model that has no codes to fit a prior to."""
    from .kinds import is_vq

    kind = model.config.get("kind")
    if not is_vq(model):
        raise PriorError(f"{where} holds a {kind} model, not a VQ-VAE: a learned prior is fitted "
                         f"to the codes of a VQ-VAE (train one with npvae train --model vqvae)")


def vqvae_identity(ck) -> dict:
    """What a prior records of its VQ-VAE: K, M, epoch, step and a CRC-32 of the parameters."""
    model = ck.model
    return {"num_codes": int(model.config["num_codes"]), "num_vectors": int(model.config["num_vectors"]),
            "epoch": int(ck.epoch), "step": int(ck.step),
            "crc32": zlib.crc32(np.ascontiguousarray(model.params.flat).data) & 0xFFFFFFFF}


def encode_codes(vq, images, binarize: str, rng, batch_size: int = 1000) -> np.ndarray:
    """The codes c(x) (N, M) int64 of ``images`` (N, D), uint8 0-255 or floats in [0, 1].

    With ``binarize`` other than "none" each image is first replaced by one Bernoulli
    sample of its pixels, drawn from ``rng`` batch after batch (so the result does not
    depend on ``batch_size``).
    """
    batch_size = positive_int("batch_size", batch_size)
    out = np.empty((len(images), vq.M), dtype=np.int64)
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        x = x.astype(vq.dtype) / vq.dtype.type(255) if x.dtype == np.uint8 else x.astype(vq.dtype)
        if binarize != "none":
            x = (rng.random(x.shape, dtype=vq.dtype) < x).astype(vq.dtype)
        out[start:start + len(x)] = vq.assign(x)  # (B, M)  (VQ.1)
    return out


def load_prior(run_dir, vq_ck):
    """The prior checkpoint of the run in ``run_dir``, checked against its VQ-VAE; None if none.

    Raises :class:`StalePriorError` when the prior's K or M differ from the VQ-VAE's, or
    when the VQ-VAE has changed since the prior was fitted (its codes mean something else),
    and :class:`PriorError` when the file holds no prior at all.
    """
    from .checkpoint import FILENAME, load_checkpoint

    path = prior_dir(run_dir) / FILENAME
    if not path.exists():
        return None
    ck = load_checkpoint(path)
    cfg, vq_cfg = ck.model.config, vq_ck.model.config
    if cfg.get("kind") != "made":
        raise PriorError(f"{path}: holds a {cfg.get('kind')} model, not a prior over codes")
    again = f"fit a new one with npvae train-prior {run_dir} --overwrite"
    if (cfg["num_codes"], cfg["num_vectors"]) != (vq_cfg["num_codes"], vq_cfg["num_vectors"]):
        raise StalePriorError(
            f"{path}: this prior is over M = {cfg['num_vectors']} codes of K = {cfg['num_codes']}, "
            f"but the VQ-VAE in {run_dir} has M = {vq_cfg['num_vectors']} code vectors of "
            f"K = {vq_cfg['num_codes']} codes; {again}")
    fitted, now = ck.args.get("vqvae", {}), vqvae_identity(vq_ck)
    if fitted.get("crc32") != now["crc32"]:
        raise StalePriorError(
            f"{path}: this prior was fitted to the VQ-VAE as it was after epoch "
            f"{fitted.get('epoch', '?')}, and the VQ-VAE has changed since (now epoch "
            f"{now['epoch']}), so its codes mean something else; {again}")
    return ck


def evaluate_prior(vq, prior, x, recon: float, rng, batch_size: int = 1000,
                   n_samples: int = EVAL_SAMPLES) -> dict:
    """The prior's numbers on test images ``x`` (N, D), as ``npvae eval`` reports them.

    ``recon`` is the VQ-VAE's -log p(x|z_q) on the same x (nats per image). Returns
    prior_nats (cross-entropy of the prior on c(x)), uniform_prior_nats (M log K), the
    two negative bounds (PRIOR.1), the perplexity under the prior, and the codes used and
    their usage perplexity in ``n_samples`` code tuples drawn from the prior (PRIOR.2).
    """
    from .ops.vq import perplexity

    batch_size = positive_int("batch_size", batch_size)
    n_samples = positive_int("n_samples", n_samples)
    M, K = vq.M, vq.K
    idx = np.concatenate([vq.assign(x[s:s + batch_size]) for s in range(0, len(x), batch_size)])
    logp = prior.log_prob(idx, batch_size=batch_size)  # (N,)  log p_prior(c(x))  (MADE.1)
    prior_nats = float(-logp.mean())
    uniform = M * math.log(K)  # (T.15)
    drawn = np.concatenate([prior.sample(min(batch_size, n_samples - s), rng)
                            for s in range(0, n_samples, batch_size)])  # (S, M)  (MADE.6)
    counts = np.bincount(drawn.reshape(-1), minlength=K)  # (K,)
    return {
        "prior_nats": prior_nats,
        "uniform_prior_nats": uniform,
        "nll_bound_learned_prior": recon + prior_nats,  # -(log p(x|z_q) + log p(c))  (PRIOR.1)
        "nll_bound_uniform_prior": recon + uniform,  # -(log p(x|z_q) - M log K)  (VQVAE.1)
        "elbo_learned_prior": -(recon + prior_nats),  # (PRIOR.1)
        "prior_gain_nats": uniform - prior_nats,
        "prior_perplexity": math.exp(prior_nats / M),  # per position, K if uniform  (PRIOR.2)
        "prior_samples": int(n_samples),
        "prior_sample_used_fraction": float((counts > 0).mean()),  # (PRIOR.2)
        "prior_sample_perplexity": perplexity(counts),  # (EVAL.5) of the sampled codes  (PRIOR.2)
    }


def sample_codes(vq, prior, n: int, rng, temperature: float = 1.0) -> np.ndarray:
    """n code tuples (n, M): from the learned prior (MADE.6), or uniform when ``prior`` is None."""
    if prior is None:
        n = positive_int("n", n)
        return np.asarray(rng.integers(vq.K, size=(n, vq.M)), dtype=np.int64)
    return prior.sample(n, rng, temperature=temperature)


def decode_codes(vq, idx) -> np.ndarray:
    """Images E[x|z_q] (n, D) in [0, 1] of code tuples idx (n, M)."""
    return np.clip(vq.decode_indices(idx), 0.0, 1.0)
