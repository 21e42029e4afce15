"""The objective nodes of the models as op pairs: how the likelihood, the KL and the
codebook terms combine into one loss, and how an array read twice gathers its gradients.

Each is a ``name_forward(...) -> (out, cache)`` / ``name_backward(dout, cache)`` pair like
the other ops, so that :mod:`npvae.tour` can check it node by node. Letters: N batch,
Z latent size, R = N M rows handed to the quantizer.
"""
from __future__ import annotations

import numpy as np


def fanout_forward(x, ways: int = 2):
    """One array read by several nodes: x -> (x, x, ...). Backward adds their gradients."""
    return (x,) * ways, ways


def fanout_backward(douts, ways):
    """(dx_1, ..., dx_ways) -> dx = their sum: every path into x contributes."""
    total = douts[0]
    for d in douts[1:]:
        total = total + d
    return total


def split_forward(enc_out, z_dim: int):
    """enc_out (N, 2Z) -> (mu, logvar, mu, logvar): each half feeds z (REP.1) and the KL (KL.1)."""
    mu, logvar = enc_out[:, :z_dim], enc_out[:, z_dim:]  # (N, Z) each  (VAE.1)
    return (mu, logvar, mu, logvar), z_dim


def split_backward(douts, z_dim):
    """The two paths into mu and into logvar add, then [dmu, dlogvar] -> denc_out (N, 2Z)."""
    dmu_z, dlogvar_z, dmu_kl, dlogvar_kl = douts
    dmu = dmu_z + dmu_kl  # (N, Z)  from z (REP.2) and from the KL (KL.2)
    dlogvar = dlogvar_z + dlogvar_kl  # (N, Z)  from z (REP.3) and from the KL (KL.3)
    return np.concatenate([dmu, dlogvar], axis=1)  # (N, 2Z)


def vae_objective_forward(logp, kl, w: float, free_bits: float = 0.0):
    """loss () from logp (N,) and the per-dimension KL (N, Z).

    mean_n(-logp_n) + w mean_n(sum_j KL_nj)  (OBJ.1); with free bits lambda > 0 the KL
    term is sum_j max(lambda, mean_n KL_nj)  (OBJ.3).
    """
    if free_bits > 0:
        kl_mean = kl.mean(axis=0)  # (Z,)
        kl_term = np.maximum(kl_mean, free_bits).sum()
        active = kl_mean > free_bits  # (Z,) the dimensions that still get a gradient
    else:
        kl_term = kl.sum(axis=1).mean()
        active = None
    return np.asarray(-logp.mean() + w * kl_term), (logp.shape[0], kl.shape, w, active)


def vae_objective_backward(dloss, cache):
    """dloss () -> dlogp (N,) = -dloss / N, dkl (N, Z) = dloss w / N (zero where flat, OBJ.3)."""
    n, kl_shape, w, active = cache
    dlogp = np.full(n, -dloss / n)  # (N,)
    dkl = np.full(kl_shape, dloss * w / n)  # (N, Z)
    if active is not None:
        dkl *= active  # (N, Z)  no gradient below lambda  (OBJ.3)
    return dlogp, dkl


def ae_objective_forward(logp, l2, w: float):
    """loss () = mean_n(-logp_n) + w mean_n(l2_n), logp and l2 (N,)  (AE.2)."""
    return np.asarray(-logp.mean() + w * l2.mean()), (logp.shape[0], w)


def ae_objective_backward(dloss, cache):
    """dloss () -> dlogp (N,) = -dloss / N, dl2 (N,) = dloss w / N."""
    n, w = cache
    return np.full(n, -dloss / n), np.full(n, dloss * w / n)


def l2_penalty_forward(code):
    """l2 (N,) = ||code_n||^2 / 2, the KL of (AE.1). code (N, Z)."""
    return 0.5 * np.einsum("nz,nz->n", code, code), code


def l2_penalty_backward(dl2, code):
    """dl2 (N,) -> dcode (N, Z) = dl2 code, the penalty's part of (AE.3)."""
    return dl2[:, None] * code


def vq_objective_forward(logp, cb, cm, ema: bool = False):
    """loss () = mean_n(-logp_n) + sum_r cb_r / N + sum_r cm_r / N  (VQVAE.2).

    logp (N,), the codebook and commitment losses cb, cm (R,). Under EMA the codebook
    term is left out (VQ.6).
    """
    n = logp.shape[0]
    codebook_term = 0.0 if ema else cb.sum() / n
    return np.asarray(-logp.mean() + codebook_term + cm.sum() / n), (n, cb.shape[0], ema)


def vq_objective_backward(dloss, cache):
    """dloss () -> dlogp (N,), dcb (R,), dcm (R,)."""
    n, rows, ema = cache
    dcb = np.zeros(rows) if ema else np.full(rows, dloss / n)
    return np.full(n, -dloss / n), dcb, np.full(rows, dloss / n)
