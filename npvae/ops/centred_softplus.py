"""Row sums of the centred softplus, the part of the Bernoulli log-likelihood that needs
exp and log, for the importance-weighted estimate (docs/derivations.md, IW.6 and IW.7).

    c(l)       = softplus(l) - l/2 = |l|/2 + log(1 + e^-|l|)                     (IW.6)
    log p(x|l) = (x - 1/2).l - sum_d c(l_d)                                      (IW.6)

The estimate decodes k samples for every image, so it evaluates c at k x D logits per
image (7.8 million for k = 1000 on MNIST): after the matrix products, that is where its
time goes. Two twins:

- ``_centred_softplus_numpy``: NumPy's SIMD exp and log, in passes over the logits; any
  float dtype; exact to the rounding of the dtype.
- ``_centred_softplus_numba``: for float32, one compiled pass that evaluates exp and
  log1p by polynomials (IW.7), vectorized, without a call to the C library. Each c(l)
  is within 3 units in the last place of the exact value (2.9987 at most over every
  float32, with or without fused multiply-adds; the NumPy twin's passes reach 2.56).
  Other dtypes go to the NumPy twin: the polynomials are written for float32's precision.

Letters: N rows (samples), D data size.
"""
from __future__ import annotations

import numpy as np

from ..backend import dispatch, numba_kernel
from .activations import NORMAL_EXP_CUT, clamp_below_kernel, neg_abs_bias_kernel
from .poly32 import CONSTANTS

# The polynomial pass clamps |l| at T_MAX = 30 log 2 (20.79), where e^-|l| = 2^-30: the
# power of two is then an int32 shift (IW.7). Beyond it c(l) = |l|/2 + log(1 + e^-|l|)
# is taken as |l|/2 + log(1 + 2^-30), 9.3e-10 too much, far below a float32 unit in the
# last place of |l|/2 (above 10.4 there, so at least 9.5e-7).
T_MAX_STEPS = 30


def _centred_softplus_numpy(l, b, out):
    """(N,) float64: sum_d c(l_d + b_d) for l (N, D), b (D,) (IW.6). ``out`` (N, D) is
    scratch, overwritten.

    -|l + b| in one pass (compiled under the numba backend), its row sum, a clamp at
    log(tiny) + 1 only when an entry lies below it (exp then never gives a subnormal
    number, FTZ.2), then NumPy's exp, + 1 and log, and a row sum. log is taken of the
    rounded 1 + e rather than log1p(e): NumPy has SIMD code for exp and log on every x86
    build, for log1p only with AVX-512; the rounding of 1 + e costs at most half a unit
    in the last place of 1 per entry. NaN gives NaN; +-inf gives inf.
    """
    dtype = out.dtype
    cut = dtype.type(NORMAL_EXP_CUT[dtype])  # e only enters 1 + e: exp(cut) need only be normal
    within = neg_abs_bias_kernel(l, b, cut, out)  # (N, D)  -|l + b|; False if one is below the cut
    half_abs = -0.5 * np.einsum("rd->r", out).astype(np.float64)  # (N,)  sum_d |l_d| / 2
    if not within:  # rare: a trained MNIST decoder's logits stay above -62
        clamp_below_kernel(out, cut)  # max(-|l|, cut): exp never subnormal  (FTZ.2)
    np.exp(out, out=out)  # (N, D)  e = exp(-|l|) in (0, 1]; below 6e-8 (float32) lost in 1 + e
    out += dtype.type(1.0)  # (N, D)  1 + e
    np.log(out, out=out)  # (N, D)  log(1 + e)
    return half_abs + np.einsum("rd->r", out)  # (N,)  (IW.6)


@numba_kernel(contract=True)
def _centred_softplus_loop(l, b, out, consts):
    """out (N, D) float32 <- c(l + b) entry by entry, exp and log1p by polynomials (IW.7);
    ``consts`` is poly32.CONSTANTS.

    With t = min(|l + b|, T_MAX):
      e^-t = 2^-m e^g, m = round(t log2 e) in 0..30, g = (m - t log2 e) log 2 in
             [-log(2)/2, log(2)/2]; e^g by its Taylor series to g^7 (relative error
             below 8e-9), 2^-m exactly as the integer 2^(30 - m) times 2^-30;
      log(1 + u) = 2 atanh(s), s = u / (2 + u) in (0, 1/3] for u = e^-t in (0, 1];
             the atanh series to s^13 (error below 1.1e-8).
    c needs only absolute precision here (it is summed with |l|/2), so g is formed with
    one rounded log 2; the training likelihood, which needs tiny values to full relative
    precision, splits log 2 in two and keeps every power of two down to its cut (LIK.5).
    Every operation vectorizes (no branch, no call), and the compiler may fuse a
    multiply and an add into one instruction (``contract``, this kernel alone: no
    gradient passes through it). NaN gives NaN (t is then taken as T_MAX, and |l|/2
    is NaN); +-inf gives inf. No intermediate is subnormal unless l + b is.
    """
    f = np.float32
    one, half, two = f(1.0), f(0.5), f(2.0)
    (log2e, ln2, _, _), taylor, series = consts
    e2, e3, e4, e5, e6, e7 = taylor  # 1/2!, ..., 1/7!
    a3, a5, a7, a9, a11, a13 = series  # 1/3, ..., 1/13
    t_max = f(T_MAX_STEPS) * ln2
    scale = f(2.0 ** -T_MAX_STEPS)
    n, d = l.shape
    for i in range(n):
        for j in range(d):
            a = abs(l[i, j] + b[j])  # |l|
            t = a if a < t_max else t_max  # NaN and |l| beyond T_MAX take T_MAX
            y = t * log2e  # e^-t = 2^-y
            m = np.floor(y + half)  # nearest integer, 0..30
            g = (m - y) * ln2  # e^-t = 2^-m e^g, |g| <= log(2)/2
            eg = one + g * (one + g * (e2 + g * (e3 + g * (e4 + g * (e5 + g * (e6 + g * e7))))))
            p2 = f(np.int32(1) << (np.int32(T_MAX_STEPS) - np.int32(m))) * scale  # 2^-m, exact
            u = eg * p2  # e^-t in (0, 1]
            s = u / (two + u)  # log(1 + u) = 2 atanh(s)
            z = s * s
            atanh_s = s * (one + z * (a3 + z * (a5 + z * (a7 + z * (a9 + z * (a11 + z * a13))))))
            out[i, j] = half * a + two * atanh_s  # c(l) = |l|/2 + log(1 + e^-|l|)  (IW.6)
    return out


def _centred_softplus_numba(l, b, out):
    """Same sums as _centred_softplus_numpy: for float32 from the polynomial pass (IW.7)
    and NumPy's row sum; for any other dtype, the NumPy twin's passes."""
    if out.dtype != np.float32:
        return _centred_softplus_numpy(l, b, out)
    _centred_softplus_loop(l, b, out, CONSTANTS)  # (N, D)  c(l + b)
    return np.einsum("rd->r", out).astype(np.float64)  # (N,)  (IW.6)


centred_softplus_sums = dispatch(_centred_softplus_numpy, _centred_softplus_numba)

