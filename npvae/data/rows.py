"""A batch of byte images as a fresh binary sample, in one pass: the training loop's
dynamic binarization when the images are kept as bytes.

    out[r, d] = 1  if  u[r, d] < float(x[idx[r], d]) / 255  else 0                (BIN.1)

``u`` holds uniforms in [0, 1) drawn by the caller from the run's generator. The
division and the comparison are those of the three-step route (gather the rows, scale
them to [0, 1], compare with the uniforms), done in the dtype of ``out``, so the two
give the same sample bit for bit; the one pass reads each byte once and writes each
output once. Letters: N images, B batch rows, D pixels. docs/derivations.md, BIN.
"""
from __future__ import annotations

import numpy as np

from ..backend import dispatch, numba_kernel


def _bernoulli_rows_numpy(x, idx, u, scale, out):
    """x (N, D) uint8, idx (B,) int, u (B, D) float, scale = 255 in out's dtype -> out (B, D)."""
    p = np.divide(np.take(x, idx, axis=0), scale, dtype=out.dtype)  # (B, D) in [0, 1]
    np.less(u, p, out=out, casting="unsafe")  # (B, D): 1 where u < p  (BIN.1)
    return out


@numba_kernel
def _bernoulli_rows_numba(x, idx, u, scale, out):
    """The same, in one pass; see the NumPy twin."""
    for r in range(idx.shape[0]):
        src, noise, dst = x[idx[r]], u[r], out[r]  # (D,) each
        for d in range(dst.shape[0]):
            ud = noise[d]  # read first: out may be u itself
            dst[d] = src[d]  # the byte, widened to out's dtype
            dst[d] = ud < dst[d] / scale  # (BIN.1)
    return out


_bernoulli_rows = dispatch(_bernoulli_rows_numpy, _bernoulli_rows_numba)


def bernoulli_rows(x, idx, u, out) -> np.ndarray:
    """Rows ``idx`` of the byte images ``x``, each pixel 1 with probability byte / 255.

    x (N, D) uint8; idx (B,) integer row numbers in [0, N); u (B, D) uniforms in [0, 1)
    with the dtype of ``out``; out (B, D) float32 or float64, written and returned. ``out``
    may be ``u`` itself, but not overlap it otherwise.
    """
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2):
        raise ValueError("x must be a 2-d uint8 array of images")
    if not (isinstance(idx, np.ndarray) and idx.ndim == 1 and idx.dtype.kind in "iu"):
        raise ValueError("idx must be a 1-d integer array of row numbers")
    if not (isinstance(u, np.ndarray) and isinstance(out, np.ndarray)):
        raise ValueError("u and out must be numpy arrays")
    if out.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"out must be float32 or float64, got {out.dtype}")
    B, D = idx.shape[0], x.shape[1]
    if out.shape != (B, D) or u.shape != (B, D) or u.dtype != out.dtype:
        raise ValueError(f"u and out must both be ({B}, {D}) arrays of one float dtype, "
                         f"got {u.shape} {u.dtype} and {out.shape} {out.dtype}")
    if np.may_share_memory(u, out):  # rare: the training loop passes separate arrays
        same = (u.__array_interface__["data"][0] == out.__array_interface__["data"][0]
                and u.strides == out.strides)
        if not same and np.shares_memory(u, out):
            raise ValueError("out must be u itself or not overlap it; pass a separate array "
                             "or u as out")
    if B and (idx.min() < 0 or idx.max() >= x.shape[0]):
        raise ValueError(f"idx must lie in [0, {x.shape[0]})")
    return _bernoulli_rows(x, idx, u, out.dtype.type(255), out)
