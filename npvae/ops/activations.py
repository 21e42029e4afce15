"""Elementwise activations and the fused bias + activation step of a dense layer.

Every activation's derivative is written in terms of its *output* h (docs/derivations.md,
section ACT), so the backward pass keeps only h:

    relu        h = max(a, 0)              dh/da = [h > 0]                 (ACT.1)
    leaky_relu  h = a if a > 0 else s a    dh/da = 1 if h > 0 else s       (ACT.2)
    tanh        h = tanh(a)                dh/da = 1 - h^2                 (ACT.3)
    sigmoid     h = 1 / (1 + e^-a)         dh/da = h (1 - h)               (ACT.4)
    softplus    h = log(1 + e^a)           dh/da = sigmoid(a) = 1 - e^-h   (ACT.5)
    identity    h = a                      dh/da = 1

Shapes: any; a dense layer uses (N, H).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate as v
from ..backend import dispatch, numba_kernel

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "softplus", "identity")
_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
RELU, LEAKY_RELU, TANH, SIGMOID, SOFTPLUS, IDENTITY = range(len(ACTIVATIONS))  # the codes
# The tag of each activation's derivative in docs/derivations.md
TAGS = {"relu": "ACT.1", "leaky_relu": "ACT.2", "tanh": "ACT.3", "sigmoid": "ACT.4",
        "softplus": "ACT.5"}
LEAKY_SLOPE = 0.01


def activation_code(name: str) -> int:
    if name not in _CODE:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return _CODE[name]


# ----------------------------------------------------------------------------------
# Stable scalar helpers (used by the NumPy twins; the Numba loops inline the same maths)


# exp(s) for s below EXP_CUT[dtype] is taken as exactly 0 (FTZ.2). The cut is
# log(sqrt(tiny)), tiny the smallest normal number: exp(cut) ~ 1e-19 in float32, so a
# value kept can still be multiplied by factors down to ~1e-19 (an upstream 1/N, a small
# activation) without the product becoming subnormal, while everything cut is far below
# the precision of any sum or Adam step it enters.
EXP_CUT = {np.dtype(t): 0.5 * float(np.log(np.finfo(t).tiny)) for t in (np.float32, np.float64)}

# Where exp(s) only enters 1 + exp(s) and nothing multiplies it (the importance-weighted
# estimate, IW.6), a lower cut does: exp(s) must only stay a normal number. log(tiny) + 1
# leaves a factor e of margin for exp's rounding (-86.3 in float32, -707.4 in float64).
# Every exp(s) from -86.3 to -43.7 is below half a unit in the last place of 1, so the
# result is the same as with EXP_CUT, and a trained decoder's logits (down to about -61
# on MNIST) need no clamp pass at all.
NORMAL_EXP_CUT = {np.dtype(t): float(np.log(np.finfo(t).tiny)) + 1.0
                  for t in (np.float32, np.float64)}


def exp_neg_abs(a):
    """exp(-|a|), with 0 where -|a| is below the cut, log(sqrt(tiny)) (FTZ.2).

    NaN stays NaN. The same rule as the compiled loops: exp(max(-|a|, cut)), then 0
    where -|a| < cut.
    """
    cut = a.dtype.type(EXP_CUT[a.dtype])
    s = -np.abs(a)
    e = np.exp(np.maximum(s, cut))  # never a subnormal result
    e[s < cut] = 0  # (FTZ.2)
    return e


def _neg_clamp_numpy(a, cut):
    """a <- max(-a, cut) in place, NaN kept: the argument of exp(-|l|) for a = |l| (FTZ.2)."""
    np.negative(a, out=a)
    np.maximum(a, cut, out=a)
    return a


@numba_kernel
def _neg_clamp_numba(a, cut):
    """Same as _neg_clamp_numpy, one vectorized pass for a contiguous a (NumPy's maximum
    pays for its NaN handling; here ``t < cut`` is False for NaN, which is kept)."""
    flat = a.reshape(-1)
    for i in range(flat.shape[0]):
        t = -flat[i]
        flat[i] = cut if t < cut else t
    return a


neg_clamp_kernel = dispatch(_neg_clamp_numpy, _neg_clamp_numba)


def _clamp_below_numpy(a, cut):
    """a <- max(a, cut) in place, NaN kept: exp(a) is then never subnormal (FTZ.2)."""
    np.maximum(a, cut, out=a)
    return a


@numba_kernel
def _clamp_below_numba(a, cut):
    """Same as _clamp_below_numpy, one vectorized pass for a contiguous a; ``t < cut`` is
    False for NaN, which is kept."""
    flat = a.reshape(-1)
    for i in range(flat.shape[0]):
        t = flat[i]
        flat[i] = cut if t < cut else t
    return a


clamp_below_kernel = dispatch(_clamp_below_numpy, _clamp_below_numba)


def _neg_abs_bias_numpy(a, b, cut, out):
    """out = -|a + b| for a (N, D), b (D,); True when no entry is below ``cut`` (so
    exp(out) is never subnormal, FTZ.2), False when one is, or is NaN."""
    np.add(a, b, out=out)
    np.abs(out, out=out)
    np.negative(out, out=out)
    return bool(np.all(out >= cut))


@numba_kernel
def _neg_abs_bias_numba(a, b, cut, out):
    """Same as _neg_abs_bias_numpy, in one pass instead of four. The test against the
    cut is an AND on a flag, which vectorizes with the rest of the loop; NaN fails it."""
    n, d = a.shape
    within = True
    for i in range(n):
        for j in range(d):
            t = -abs(a[i, j] + b[j])
            within &= t >= cut
            out[i, j] = t
    return within


neg_abs_bias_kernel = dispatch(_neg_abs_bias_numpy, _neg_abs_bias_numba)


def stable_sigmoid(a):
    """1 / (1 + exp(-a)) without overflow for any finite a; exactly 0 far below 0 (FTZ.2)."""
    e = exp_neg_abs(a)
    return np.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(a.dtype, copy=False)


def stable_softplus(a):
    """log(1 + exp(a)) = max(a, 0) + log1p(exp(-|a|)), never overflows; exactly 0 far
    below 0 (FTZ.2)."""
    return np.maximum(a, 0) + np.log1p(exp_neg_abs(a))


# ----------------------------------------------------------------------------------
# Kernel pair 1: h = act(a + b), written into ``out`` (which may be ``a`` itself).


def _bias_act_numpy(a, b, code, slope, out):
    """out = act(a + b) for a (N, H), b (H,); reference twin of _bias_act_numba."""
    np.add(a, b, out=out)
    if code == RELU:
        np.maximum(out, 0, out=out)
    elif code == LEAKY_RELU:
        np.multiply(out, np.where(out > 0, 1.0, slope).astype(out.dtype), out=out)
    elif code == TANH:
        np.tanh(out, out=out)
    elif code == SIGMOID:
        out[...] = stable_sigmoid(out)
    elif code == SOFTPLUS:
        out[...] = stable_softplus(out)
    return out


@numba_kernel
def _bias_act_loop(a, b, code, slope, out, cut):
    """The compiled part of _bias_act_numba: one branch-free loop per activation.

    The branch on ``code`` sits outside the loops, so each inner loop is simple enough
    for the compiler to vectorize. tanh is left as a + b here; see _bias_act_numba.
    Every comparison is written so that NaN takes the branch that keeps it, as NumPy's
    twin does: ``0.0 if t <= 0 else t`` is NaN for NaN (``t if t > 0 else 0.0`` is 0).
    Constants have the arrays' dtype, so float32 stays float32 throughout, overflowing
    and rounding where the twin does (a float64 literal would promote the arithmetic).
    """
    n, h = a.shape
    zero, one = out.dtype.type(0.0), out.dtype.type(1.0)
    if code == RELU:
        for i in range(n):
            for j in range(h):
                t = a[i, j] + b[j]
                out[i, j] = zero if t <= 0 else t  # NaN stays NaN, as np.maximum keeps it
    elif code == LEAKY_RELU:
        for i in range(n):
            for j in range(h):
                t = a[i, j] + b[j]
                out[i, j] = t if t > 0 else slope * t
    elif code == SIGMOID or code == SOFTPLUS:  # both from exp(-|t|); the inner test is
        sigmoid = code == SIGMOID  # loop-invariant, so the compiler hoists it out
        for i in range(n):
            for j in range(h):
                t = a[i, j] + b[j]
                s = -abs(t)
                e = zero if s < cut else np.exp(s)  # exp(-|t|), 0 below the cut  (FTZ.2)
                if sigmoid:
                    out[i, j] = (one if t >= 0 else e) / (one + e)
                else:
                    out[i, j] = max(t, zero) + np.log1p(e)
    else:
        for i in range(n):
            for j in range(h):
                out[i, j] = a[i, j] + b[j]
    return out


def _bias_act_numba(a, b, code, slope, out):
    """Same as _bias_act_numpy: a compiled loop, then NumPy's vectorized tanh in place.

    A compiled loop calls the scalar tanh of the C library, an order of magnitude slower
    than NumPy's SIMD ufunc, so for tanh the loop only adds the bias.
    """
    _bias_act_loop(a, b, code, slope, out, out.dtype.type(EXP_CUT[out.dtype]))
    if code == TANH:
        np.tanh(out, out=out)
    return out


bias_act_kernel = dispatch(_bias_act_numpy, _bias_act_numba)


# ----------------------------------------------------------------------------------
# Kernel pair 2: da = dh * act'(.) from the output h, written into ``out``.


def _act_grad_numpy(dh, h, code, slope, out):
    """out = dh * dh/da, the local derivative taken from the output h (ACT.1-5)."""
    if code == RELU:
        np.multiply(dh, h > 0, out=out)  # (ACT.1)
    elif code == LEAKY_RELU:
        np.multiply(dh, np.where(h > 0, 1.0, slope).astype(h.dtype), out=out)  # (ACT.2)
    elif code == TANH:
        np.multiply(dh, 1.0 - h * h, out=out)  # (ACT.3)
    elif code == SIGMOID:
        np.multiply(dh, h * (1.0 - h), out=out)  # (ACT.4)
    elif code == SOFTPLUS:
        np.multiply(dh, -np.expm1(-h), out=out)  # (ACT.5)
    else:
        out[...] = dh
    return out


@numba_kernel
def _act_grad_numba(dh, h, code, slope, out):
    """Same as _act_grad_numpy: one branch-free loop per activation (ACT.1-5).

    The ReLU mask multiplies, as the twin's does, so a NaN or infinite dh where h <= 0
    gives NaN (inf * 0) instead of being replaced by 0. Constants have the arrays'
    dtype, as in _bias_act_loop.
    """
    n, m = dh.shape
    zero, one = out.dtype.type(0.0), out.dtype.type(1.0)
    if code == RELU:
        for i in range(n):
            for j in range(m):
                out[i, j] = dh[i, j] * (one if h[i, j] > 0 else zero)
    elif code == LEAKY_RELU:
        for i in range(n):
            for j in range(m):
                out[i, j] = dh[i, j] if h[i, j] > 0 else dh[i, j] * slope
    elif code == TANH:
        for i in range(n):
            for j in range(m):
                out[i, j] = dh[i, j] * (one - h[i, j] * h[i, j])
    elif code == SIGMOID:
        for i in range(n):
            for j in range(m):
                out[i, j] = dh[i, j] * (h[i, j] * (one - h[i, j]))
    elif code == SOFTPLUS:
        for i in range(n):
            for j in range(m):
                out[i, j] = dh[i, j] * -np.expm1(-h[i, j])
    else:
        for i in range(n):
            for j in range(m):
                out[i, j] = dh[i, j]
    return out


act_grad_kernel = dispatch(_act_grad_numpy, _act_grad_numba)


# ----------------------------------------------------------------------------------
# Kernel pair 3: the bias gradient, a column sum, written into ``out``.


def _col_sum_numpy(a, out):
    """out (H,) = sum over the rows of a (N, H): db = sum_n da (LIN.4)."""
    return np.sum(a, axis=0, out=out)


@numba_kernel
def _col_sum_numba(a, out):
    """Same as _col_sum_numpy: row 0, then rows 1, 2, ... added in order, as NumPy adds
    them when a (C-contiguous) has more than one column, in one vectorized pass (NumPy's
    costs about twice as much at (128, 400))."""
    n, m = a.shape
    for j in range(m):
        out[j] = a[0, j] if n > 0 else 0
    for i in range(1, n):
        for j in range(m):
            out[j] += a[i, j]
    return out


col_sum_kernel = dispatch(_col_sum_numpy, _col_sum_numba)


# ----------------------------------------------------------------------------------
# Public op pairs


class ActivationCache(NamedTuple):
    h: np.ndarray  # the output; every derivative above is a function of it
    code: int
    slope: float


def _as_2d(x):
    return x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x


def activation_forward(a, name: str, slope: float = LEAKY_SLOPE):
    """h = act(a), any shape. Returns (h, cache)."""
    v.array("a", a)
    code = activation_code(name)
    a2 = _as_2d(np.ascontiguousarray(a)) if a.ndim else a.reshape(1, 1)
    zero = np.zeros(a2.shape[1], a.dtype)
    h = bias_act_kernel(a2, zero, code, a.dtype.type(slope), np.empty_like(a2))
    h = h.reshape(a.shape)
    return h, ActivationCache(h, code, slope)


def activation_backward(dh, cache: ActivationCache):
    """da = dh * act'(a), with act' written in terms of h (ACT.1-5)."""
    h, code, slope = cache
    h2 = _as_2d(h) if h.ndim else h.reshape(1, 1)
    dh2 = np.ascontiguousarray(dh).reshape(h2.shape)
    da = act_grad_kernel(dh2, h2, code, h.dtype.type(slope), np.empty_like(h2))
    return da.reshape(h.shape)


class BiasActCache(NamedTuple):
    h: np.ndarray  # (N, H) output
    code: int
    slope: float


def bias_activation_forward(a, b, name: str, slope: float = LEAKY_SLOPE, out=None):
    """h = act(a + b): the elementwise tail of a dense layer, fused into one pass.

    a (N, H) is the matrix product x W, b (H,). ``out`` may be ``a`` to work in place,
    but a new array is faster: the compiled loop cannot be vectorized when its input and
    output may overlap (the compiler's run-time check finds them overlapping, and the
    scalar loop it falls back to took three times as long at (128, 400)).
    """
    code = activation_code(name)
    out = np.empty_like(a) if out is None else out
    h = bias_act_kernel(a, b, code, a.dtype.type(slope), out)
    return h, BiasActCache(h, code, slope)


def bias_activation_backward(dh, cache: BiasActCache, db=None):
    """dh (N, H) -> da (N, H), db (H,): the local derivative, then the bias sum (LIN.4).

    For the identity, whose derivative is 1, da is dh itself, not a copy.
    """
    h, code, slope = cache
    if code == IDENTITY:
        da = dh  # (N, H)  da = dh * 1
    else:
        da = act_grad_kernel(dh, h, code, h.dtype.type(slope), np.empty_like(h))  # (N, H)  (ACT)
    db = col_sum_kernel(da, np.empty(h.shape[1], h.dtype) if db is None else db)  # (H,)  (LIN.4)
    return da, db
