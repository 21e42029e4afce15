"""The importance-weighted bound of Burda, Grosse and Salakhutdinov (2015), as op pairs.

With k draws z_i = mu + sigma * eps_i from q(z|x) per example:

    log w_i = log p(x|z_i) + [log p(z_i) - log q(z_i|x)]                         (IWAE.1)
    L_k     = log (1/k) sum_i w_i                                                (IWAE.2)
    dL_k / dlog w_i = w~_i = w_i / sum_j w_j     (a softmax over the k samples)  (IWAE.3)

and, because z_i = mu + sigma * eps_i makes (z_i - mu) / sigma = eps_i exactly,

    log p(z_i) - log q(z_i|x) = -||z_i||^2 / 2 + ||eps_i||^2 / 2 + sum_j logvar_j / 2   (IWAE.4)

(the two (Z/2) log 2 pi cancel). As a function of (z_i, logvar) with eps_i fixed, its
gradients are dz_i = -z_i and dlogvar_j = 1/2 per sample.

Letters: N batch, k samples per example, Z latent size. docs/derivations.md, section IWAE.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import _validate as v


class IWBoundCache(NamedTuple):
    weights: np.ndarray  # (N, k) the normalised weights w~, constants of the backward pass


def iw_bound_forward(log_w):
    """L_k = log (1/k) sum_i exp(log_w_i) per row.  log_w (N, k) -> bound (N,)  (IWAE.2).

    Taken as m + log sum_i exp(log_w_i - m) - log k with m the row maximum, so weights of
    e^-500 or e^+500 neither underflow nor overflow; the normalised weights come from the
    same shifted exponentials.
    """
    v.array("log_w", log_w, 2), v.finite("log_w", log_w)
    k = log_w.shape[1]
    m = log_w.max(axis=1, keepdims=True)  # (N, 1)
    e = np.exp(log_w - m)  # (N, k)  in (0, 1], the largest exactly 1
    total = e.sum(axis=1, keepdims=True)  # (N, 1)  in [1, k]
    bound = (m + np.log(total))[:, 0] - log_w.dtype.type(math.log(k))  # (N,)  (IWAE.2)
    return bound, IWBoundCache(e / total)  # w~ (N, k)  (IWAE.3)


def iw_bound_backward(dbound, cache: IWBoundCache):
    """dbound (N,) -> dlog_w (N, k) = dbound * w~  (IWAE.3)."""
    return dbound[:, None] * cache.weights  # (N, k)  (IWAE.3)


class PriorRatioCache(NamedTuple):
    z: np.ndarray  # (N, k, Z) the samples


def prior_ratio_forward(z, eps, logvar):
    """log p(z_i) - log q(z_i|x) at z_i = mu + sigma eps_i  (IWAE.4).

    z, eps (N, k, Z); logvar (N, Z) -> r (N, k). The noise eps is data: it gets no gradient.
    """
    v.array("z", z, 3), v.array("eps", eps, 3), v.array("logvar", logvar, 2)
    v.same_shape("z", z, "eps", eps)
    if logvar.shape != (z.shape[0], z.shape[2]):
        raise ValueError(f"logvar must have shape {(z.shape[0], z.shape[2])}, got {logvar.shape}")
    half = z.dtype.type(0.5)
    sq_z = np.einsum("nkz,nkz->nk", z, z)  # (N, k)  ||z_i||^2
    sq_eps = np.einsum("nkz,nkz->nk", eps, eps)  # (N, k)  ||eps_i||^2 = ||(z_i - mu) / sigma||^2
    r = half * (sq_eps - sq_z) + half * logvar.sum(axis=1)[:, None]  # (N, k)  (IWAE.4)
    return r, PriorRatioCache(z)


def prior_ratio_backward(dr, cache: PriorRatioCache):
    """dr (N, k) -> dz (N, k, Z), None for eps (data), dlogvar (N, Z)  (IWAE.4)."""
    z = cache.z
    dz = -dr[:, :, None] * z  # (N, k, Z)  d/dz of -||z||^2 / 2  (IWAE.4)
    dlogvar = np.repeat(0.5 * dr.sum(axis=1, keepdims=True), z.shape[2], axis=1)  # (N, Z)  (IWAE.4)
    return dz, None, dlogvar.astype(z.dtype, copy=False)
