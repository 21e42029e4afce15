"""Closed-form KL divergences between diagonal Gaussians (tutorial eqs. 7-8).

    KL( N(mu, diag s2) || N(0, I) ) per dimension = (mu^2 + s2 - log s2 - 1) / 2     (KL.1) (T.7)
    KL( N(m1, diag v1) || N(m2, diag v2) ) per dim
        = (log v2 - log v1 + (v1 + (m1 - m2)^2) / v2 - 1) / 2                        (KL.4) (T.8)

Both take log-variances, as an encoder produces them. Outputs are *per latent
dimension*, (N, Z); sum over axis 1 for the per-example KL (free bits need the
per-dimension values). Letters: N batch, Z latent size. docs/derivations.md, section KL.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate as v
from ..backend import dispatch, numba_kernel

# ----------------------------------------------------------------------------------
# Kernel pair: the standard-normal KL and the variance backward needs, in one pass.


def _kl_numpy(mu, logvar):
    """Per-dimension KL to N(0, I) and the variance exp(logvar); both (N, Z)."""
    var = np.exp(logvar)  # (N, Z)
    kl = 0.5 * (mu * mu + var - logvar - 1.0)  # (N, Z)  (KL.1)
    return kl, var


@numba_kernel
def _kl_loop(mu, logvar, var, kl):
    """kl <- (mu^2 + var - logvar - 1) / 2, with constants of the arrays' dtype (float32
    stays float32, as in the twin)."""
    n, z = mu.shape
    half, one = kl.dtype.type(0.5), kl.dtype.type(1.0)
    for i in range(n):
        for j in range(z):
            kl[i, j] = half * (mu[i, j] * mu[i, j] + var[i, j] - logvar[i, j] - one)
    return kl


def _kl_numba(mu, logvar):
    """Same as _kl_numpy: NumPy's SIMD exp for the variance, then one compiled pass."""
    var = np.exp(logvar)  # (N, Z)
    return _kl_loop(mu, logvar, var, np.empty_like(mu)), var


kl_kernel = dispatch(_kl_numpy, _kl_numba)


def _kl_grad_numpy(dkl, mu, var):
    """dmu = dkl * mu (KL.2); dlogvar = dkl * (var - 1) / 2 (KL.3). All (N, Z)."""
    return dkl * mu, 0.5 * dkl * (var - 1.0)


@numba_kernel
def _kl_grad_numba(dkl, mu, var):
    """Same as _kl_grad_numpy, one loop (constants of the arrays' dtype)."""
    n, z = mu.shape
    dmu = np.empty_like(mu)
    dlv = np.empty_like(mu)
    half, one = mu.dtype.type(0.5), mu.dtype.type(1.0)
    for i in range(n):
        for j in range(z):
            dmu[i, j] = dkl[i, j] * mu[i, j]
            dlv[i, j] = half * dkl[i, j] * (var[i, j] - one)
    return dmu, dlv


kl_grad_kernel = dispatch(_kl_grad_numpy, _kl_grad_numba)


class KLCache(NamedTuple):
    mu: np.ndarray  # (N, Z)
    var: np.ndarray  # (N, Z) exp(logvar)


def gaussian_kl_forward(mu, logvar):
    """KL( N(mu, diag exp(logvar)) || N(0, I) ) per dimension.

    mu, logvar (N, Z) -> kl (N, Z); ``kl.sum(1)`` is the per-example KL.
    """
    v.array("mu", mu, 2), v.array("logvar", logvar, 2)
    v.same_shape("mu", mu, "logvar", logvar)
    v.same_dtype("mu", mu, "logvar", logvar)
    v.finite("mu", mu), v.finite("logvar", logvar)
    kl, var = kl_kernel(mu, logvar)  # (N, Z)  (KL.1)
    return kl, KLCache(mu, var)


def gaussian_kl_backward(dkl, cache: KLCache):
    """dkl (N, Z) -> dmu (N, Z), dlogvar (N, Z)  (KL.2, KL.3)."""
    mu, var = cache
    return kl_grad_kernel(np.ascontiguousarray(dkl, dtype=mu.dtype), mu, var)


class KL2Cache(NamedTuple):
    diff: np.ndarray  # (N, Z) m1 - m2
    ratio: np.ndarray  # (N, Z) v1 / v2
    inv_v2: np.ndarray  # (N, Z) 1 / v2
    scaled: np.ndarray  # (N, Z) (m1 - m2)^2 / v2


def gaussian_kl2_forward(mu1, logvar1, mu2, logvar2):
    """KL( N(mu1, diag exp(logvar1)) || N(mu2, diag exp(logvar2)) ) per dimension.

    All inputs (N, Z) -> kl (N, Z)  (KL.4). A variance so small or so large that
    exp(logvar) over- or underflows gives the limit (+inf, or the exact 0 of equal
    distributions), never NaN.
    """
    names = ("mu1", "logvar1", "mu2", "logvar2")
    arrays = (mu1, logvar1, mu2, logvar2)
    for name, a in zip(names, arrays):
        v.array(name, a), v.finite(name, a)
    for name, a in zip(names[1:], arrays[1:]):
        v.same_shape("mu1", mu1, name, a)
    with np.errstate(all="ignore"):  # over- and underflow here have the limits we want
        diff = mu1 - mu2  # (N, Z)
        inv_v2 = np.exp(-logvar2)  # (N, Z)  1 / v2
        log_ratio = logvar1 - logvar2  # (N, Z)  log(v1 / v2)
        ratio = np.exp(log_ratio)  # (N, Z)  v1 / v2
        scaled = diff * np.exp(-0.5 * logvar2)  # (N, Z)  (m1 - m2) / sqrt(v2)
        scaled *= scaled  # (N, Z)  (m1 - m2)^2 / v2, squared last so it overflows only if it must
        kl = 0.5 * (logvar2 - logvar1 + ratio + scaled - 1.0)  # (N, Z)  (KL.4)
        bad = np.isnan(kl)
        if bad.any():
            _kl2_limits(kl, bad, diff, logvar2, log_ratio, ratio, scaled)
    return kl, KL2Cache(diff, ratio, inv_v2, scaled)


def _kl2_limits(kl, bad, diff, logvar2, log_ratio, ratio, scaled):
    """Where (KL.4) met 0 * inf or inf - inf, put its limit into kl (and scaled), in place.

    With finite inputs NaN has two sources: (m1 - m2)^2 * exp(-logvar2) when the square
    is 0 (or overflows) and exp(-logvar2) overflows (or underflows), taken here in logs,
    exp(2 log|m1 - m2| - logvar2), which is 0 for m1 = m2; and -log r + r with log r
    overflowing to +inf, where the KL grows without bound.
    """
    sq = np.exp(2.0 * np.log(np.abs(diff[bad])) - logvar2[bad])  # (m1 - m2)^2 / v2
    part = np.where(np.isposinf(log_ratio[bad]), np.inf, ratio[bad] - log_ratio[bad])
    scaled[bad] = sq
    kl[bad] = 0.5 * (part + sq - 1.0)  # (KL.4) in the limit


def gaussian_kl2_backward(dkl, cache: KL2Cache):
    """dkl (N, Z) -> dmu1, dlogvar1, dmu2, dlogvar2, each (N, Z)  (KL.5)."""
    diff, ratio, inv_v2, scaled = cache
    with np.errstate(invalid="ignore", over="ignore"):
        dmu1 = dkl * diff * inv_v2  # (N, Z)  (KL.5)
    if not np.isfinite(inv_v2).all():
        dmu1[(diff == 0) & np.isinf(inv_v2)] = 0.0  # the limit of 0 / v2 as v2 -> 0
    dmu2 = -dmu1  # (N, Z)  (KL.5)
    dlogvar1 = 0.5 * dkl * (ratio - 1.0)  # (N, Z)  (KL.5)
    dlogvar2 = 0.5 * dkl * (1.0 - ratio - scaled)  # (N, Z)  (KL.5)
    return dmu1, dlogvar1, dmu2, dlogvar2
