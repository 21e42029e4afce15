"""Decoder likelihoods log p(x|z), per example, with gradients w.r.t. the decoder output.

Gaussian with fixed variance s2 (tutorial eqs. 9-10) (T.9-10), keeping the constant so the
value is a true log-density:

    log N(x; m, s2 I) = -||x - m||^2 / (2 s2) - (D/2) log(2 pi s2)           (LIK.1)
    d/dm              = (x - m) / s2                                          (LIK.2)

Bernoulli from logits l (tutorial eq. 12) (T.12), with Dec(z) = sigmoid(l):

    log p(x|l) = sum_d x_d l_d - softplus(l_d)                                (LIK.3)
    d/dl       = x - sigmoid(l)                                               (LIK.4)

written with softplus(l) = max(l, 0) + log1p(exp(-|l|)), which never takes log(0) and
never overflows, even for |l| = 1e4.

Letters: N batch, D data size. docs/derivations.md, section LIK.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import _validate as v
from ..backend import dispatch, numba_kernel
from .activations import EXP_CUT, _neg_clamp_numba, exp_neg_abs
from .poly32 import CONSTANTS

# ----------------------------------------------------------------------------------
# Gaussian log-density per example and its local gradient: NumPy alone (a compiled twin
# gained 1.2x on 23 us, benchmarks/RESULTS.md, M1).


def _gaussian(mean, x, inv_s2, const):
    """logp (N,) = -inv_s2/2 * sum (x - mean)^2 + const;  g (N, D) = (x - mean) * inv_s2."""
    r = x - mean  # (N, D) residual
    logp = -0.5 * inv_s2 * np.einsum("nd,nd->n", r, r) + const  # (N,)  (LIK.1)
    g = r * inv_s2  # (N, D)  (LIK.2)
    return logp, g


# ----------------------------------------------------------------------------------
# Kernel pair: Bernoulli log-probability per example and its local gradient.


def _bernoulli_numpy(logits, x):
    """logp (N,) = sum x l - softplus(l);  g (N, D) = x - sigmoid(l).

    Both are written so that a well-predicted pixel (x = 1 with l >> 0, or x = 0 with
    l << 0) gives its small value to full relative precision: for l > 0,
    x l - softplus(l) = (x - 1) l - log1p(exp(-l)) and x - sigmoid(l) = (x - 1) +
    exp(-l) / (1 + exp(-l)), so no two numbers near l or near 1 are subtracted.
    """
    e = exp_neg_abs(logits)  # (N, D)  exp(-|l|), 0 in the far tail (FTZ.2)
    pos = logits > 0
    lin = np.where(pos, (x - 1) * logits, x * logits)  # (N, D)  x l - max(l, 0)
    logp = np.sum(lin - np.log1p(e), axis=1)  # (N,)  (LIK.3)
    s = e / (1 + e)  # (N, D)  sigmoid(-|l|)
    g = np.where(pos, (x - 1) + s, x - s)  # (N, D)  x - sigmoid(l)  (LIK.4)
    return logp.astype(logits.dtype, copy=False), g.astype(logits.dtype, copy=False)


@numba_kernel
def _bernoulli_loop(logits, x, e, terms, g, cut):
    """Given e = exp(max(-|l|, cut)) and terms = log(1 + e): terms <- x l - softplus(l),
    g <- x - sigmoid(l), with exp(-|l|) taken as 0 where -|l| < cut (FTZ.2), in the
    arrangement of :func:`_bernoulli_numpy` that keeps small values precise.

    log1p(e) is taken as log(u) - ((u - 1) - e) / u with u = 1 + e: (u - 1) - e is, exactly,
    the rounding error of 1 + e, and the correction restores what it lost, so a tiny e
    keeps full relative precision (u = 1 gives log1p(e) = e). NumPy has SIMD code for log
    on every x86 build but for log1p only with AVX-512; this agrees with log1p to a few
    units in the last place.

    Both branches of the twin's ``where`` are written with one xm = x - [l > 0], so the
    loop body has no branch and is vectorized; g is the twin's, operation for operation.
    Constants have the arrays' dtype. Under the numba backend this loop serves float64;
    float32 takes _bernoulli_poly_loop.
    """
    n, d = x.shape
    zero, one = g.dtype.type(0.0), g.dtype.type(1.0)
    for i in range(n):
        for j in range(d):
            l = logits[i, j]
            tail = -abs(l) < cut  # exp(-|l|) would be subnormal: it is 0  (FTZ.2)
            eij = zero if tail else e[i, j]
            u = one + eij  # as NumPy rounded it for terms
            sp = zero if tail else terms[i, j] - ((u - one) - eij) / u  # log1p(exp(-|l|))
            s = eij / u  # sigmoid(-|l|)
            pos = l > zero  # for l > 0, nothing near l or near 1 is subtracted:
            xm = x[i, j] - one if pos else x[i, j]  # x l - softplus(l) = (x - 1) l - log1p(exp(-l))
            terms[i, j] = xm * l - sp  # (LIK.3)
            g[i, j] = xm + s if pos else xm - s  # x - sigmoid(l) = (x - 1) + sigmoid(-l)  (LIK.4)
    return terms, g


@numba_kernel
def _bernoulli_poly_loop(logits, x, terms, g, cut, consts):
    """float32: terms <- x l - softplus(l), g <- x - sigmoid(l), as _bernoulli_loop
    arranges them, with e = exp(-|l|) and log1p(e) evaluated by polynomials (LIK.5)
    instead of NumPy's exp and log: one pass, no call, vectorized on every CPU.
    ``consts`` is poly32.CONSTANTS.

    With t = |l| (taken as -cut for NaN and beyond the cut, where e is 0, FTZ.2):
      e = 2^-m e^g, m = round(t log2 e) in 0..63, g = (m LN2_HI - t) + m LN2_LO, e^g by
          its Taylor series to g^7; 2^-m = 2^-m1 2^-m2 2^-m3 with each part at most 30,
          an integer shift each, so that e keeps its full relative precision down to
          the cut (about 1e-19);
      log1p(e) = 2 atanh(s), s = e / (2 + e), the series to s^13: relative precision for
          a tiny e too (a well-predicted pixel); the series' s^2 is taken of max(s, 2^-40),
          which changes nothing (1 + s^2 (...) rounds to 1 below it) and keeps s^2 and the
          terms after it normal numbers where |l| nears the cut (s about 1e-19 there);
      sigmoid(-|l|) = e / (1 + e).
    No multiply-add is fused: a gradient passes through this loop (its twin is checked
    against finite differences in float64; this loop runs for float32 only).
    """
    n, d = x.shape
    zero, one, two, half = np.float32(0.0), np.float32(1.0), np.float32(2.0), np.float32(0.5)
    (log2e, _, ln2_hi, ln2_lo), taylor, series = consts
    e2, e3, e4, e5, e6, e7 = taylor  # 1/2!, ..., 1/7!
    a3, a5, a7, a9, a11, a13 = series  # 1/3, ..., 1/13
    t_max, p30, i30 = -cut, np.float32(2.0 ** -30), np.int32(30)
    s_min = np.float32(2.0 ** -40)  # below it 1 + s^2 (...) is 1: s^2 is never subnormal
    for i in range(n):
        for j in range(d):
            l = logits[i, j]
            a = abs(l)
            t = a if a < t_max else t_max  # NaN too: the shifts below stay defined
            m = np.floor(t * log2e + half)  # 0..63
            gm = (m * ln2_hi - t) + m * ln2_lo  # e^-t = 2^-m e^gm, |gm| <= log(2)/2
            eg = one + gm * (one + gm * (e2 + gm * (e3 + gm * (e4 + gm * (e5 + gm * (e6 + gm * e7))))))
            k = np.int32(m)
            k1 = min(k, i30)
            k2 = min(k - k1, i30)
            k3 = k - k1 - k2
            p2 = (np.float32(np.int32(1) << (i30 - k1)) * p30) * (np.float32(np.int32(1) << (i30 - k2)) * p30) \
                * (np.float32(np.int32(1) << (i30 - k3)) * p30)  # 2^-m, exact
            e = zero if a > t_max else eg * p2  # exp(-|l|), 0 beyond the cut  (FTZ.2)
            e = l if l != l else e  # NaN stays NaN
            s = e / (two + e)  # log1p(e) = 2 atanh(s)
            sq = s if s > s_min else s_min  # (a NaN s stays in sp below)
            z = sq * sq
            sp = two * s * (one + z * (a3 + z * (a5 + z * (a7 + z * (a9 + z * (a11 + z * a13))))))
            sig = e / (one + e)  # sigmoid(-|l|)
            pos = l > zero  # for l > 0, nothing near l or near 1 is subtracted:
            xm = x[i, j] - one if pos else x[i, j]  # x l - softplus(l) = (x - 1) l - log1p(exp(-l))
            terms[i, j] = xm * l - sp  # (LIK.3)
            g[i, j] = xm + sig if pos else xm - sig  # x - sigmoid(l) = (x - 1) + sigmoid(-l)  (LIK.4)
    return terms, g


def _bernoulli_numba(logits, x):
    """Same as _bernoulli_numpy, in seven passes over (N, D) instead of about ten.

    |l| and the two transcendental functions come from NumPy's SIMD ufuncs (a compiled
    loop would call the scalar C library for exp and log, ~15 ns an element); the clamp
    and the rest are two compiled, branch-free passes; the row sums go to NumPy's
    pairwise sum. The exponent is clamped at the cut first, so exp never produces a
    subnormal number (FTZ.2). log1p(e) is computed from log(1 + e) (see _bernoulli_loop):
    with NumPy's AVX-512 code switched off, as on an AVX2 CPU, np.log1p took 0.59-0.62 ms
    on a (128, 784) batch, ten times its AVX-512 time (benchmarks/RESULTS.md).

    For float32 the whole computation is one compiled pass instead (_bernoulli_poly_loop,
    LIK.5): with AVX2 code NumPy's exp and log made this kernel about twice as slow as
    with AVX-512 (benchmarks/RESULTS.md).
    """
    cut = logits.dtype.type(EXP_CUT[logits.dtype])
    if logits.dtype == np.float32:
        terms, g = _bernoulli_poly_loop(logits, x, np.empty_like(x), np.empty_like(x), cut, CONSTANTS)
        return terms.sum(axis=1), g
    e = np.abs(logits)  # (N, D)  |l|, a new array
    _neg_clamp_numba(e, cut)  # (N, D)  max(-|l|, cut), in place
    np.exp(e, out=e)  # (N, D)  e = exp(max(-|l|, cut)), in (0, 1]: never overflows
    terms = e + e.dtype.type(1.0)  # (N, D)  u = 1 + e
    np.log(terms, out=terms)  # (N, D)  log(u), corrected to log1p(e) in the loop
    terms, g = _bernoulli_loop(logits, x, e, terms, np.empty_like(x), cut)
    return terms.sum(axis=1), g


bernoulli_kernel = dispatch(_bernoulli_numpy, _bernoulli_numba)


# ----------------------------------------------------------------------------------
# Kernel pair: the backward step of both likelihoods, each row of the local gradient
# times the upstream gradient of its example.


def _scale_rows_numpy(g, dlogp):
    """g (N, D) * dlogp (N,) row by row: dlogp_n * d log p_n / d out_n, a new array."""
    return g * dlogp[:, None]


@numba_kernel
def _scale_rows_numba(g, dlogp):
    """Same as _scale_rows_numpy, one compiled pass (NumPy's broadcast product took
    about three times as long at (128, 784)). g and dlogp have the same dtype."""
    out = np.empty_like(g)
    n, d = g.shape
    for i in range(n):
        scale = dlogp[i]
        for j in range(d):
            out[i, j] = g[i, j] * scale
    return out


scale_rows_kernel = dispatch(_scale_rows_numpy, _scale_rows_numba)


# ----------------------------------------------------------------------------------
# Public op pairs


class LikelihoodCache(NamedTuple):
    g: np.ndarray  # (N, D) d log p / d(decoder output), computed with the value


def _check_pair(name, pred, x):
    v.array(name, pred, 2), v.array("x", x, 2)
    v.same_shape(name, pred, "x", x)
    v.same_dtype(name, pred, "x", x)
    v.finite(name, pred), v.finite("x", x)


def gaussian_loglik_forward(mean, x, sigma2: float = 1.0):
    """log N(x; mean, sigma2 I) per example.  mean, x (N, D) -> logp (N,)  (LIK.1)."""
    _check_pair("mean", mean, x)
    s2 = v.variance("sigma2", sigma2, mean.dtype)
    d = x.shape[1]
    const = -0.5 * d * math.log(2.0 * math.pi * s2)  # the constant of (LIK.1)
    inv = mean.dtype.type(1.0 / s2)
    logp, g = _gaussian(mean, x, inv, mean.dtype.type(const))
    return logp, LikelihoodCache(g)


def gaussian_loglik_backward(dlogp, cache: LikelihoodCache):
    """dlogp (N,) -> dmean (N, D) = dlogp * (x - mean) / sigma2  (LIK.2)."""
    return scale_rows_kernel(cache.g, dlogp.astype(cache.g.dtype, copy=False))  # (N, D)  (LIK.2)


def bernoulli_loglik_forward(logits, x):
    """log Bernoulli(x; sigmoid(logits)) per example.  logits, x (N, D) -> logp (N,)  (LIK.3).

    x may hold any value in [0, 1] (grey-level targets give the usual cross-entropy).
    """
    _check_pair("logits", logits, x)
    v.in_unit_interval("x", x)
    logp, g = bernoulli_kernel(logits, x)
    return logp, LikelihoodCache(g)


def bernoulli_loglik_backward(dlogp, cache: LikelihoodCache):
    """dlogp (N,) -> dlogits (N, D) = dlogp * (x - sigmoid(logits))  (LIK.4)."""
    return scale_rows_kernel(cache.g, dlogp.astype(cache.g.dtype, copy=False))  # (N, D)  (LIK.4)
