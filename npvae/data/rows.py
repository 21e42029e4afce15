"""A batch of byte images as a fresh binary sample: the training loop's dynamic
binarization when the images are kept as bytes. One pass counts the batch's non-zero
bytes (how many uniforms to draw), and one more gathers, scales and samples them.

A pixel whose byte b is 0 is 0 in every sample, so only the non-zero bytes take a
uniform. Number the batch's non-zero bytes in reading order (row r = 0, 1, ... of the
batch, and within it pixel d = 0, 1, ...): the j-th of them takes u[j], so that

    out[r, d] = 1  if  b != 0  and  u[j(r, d)] < float(b) / 255  else 0,
    b = x[idx[r], d],  j(r, d) = the non-zero bytes before (r, d)                  (BIN.1)

with M = :func:`nonzero_in_rows` uniforms u (M,) in [0, 1), drawn by the caller from the
run's generator. Every pixel is still an independent Bernoulli(b / 255) draw; on MNIST
the batch takes 19% of the uniforms one per pixel would. The division and the
comparison are made in the dtype of ``out``, as :func:`npvae.data.binarize_dynamic` makes
them on images scaled to [0, 1], so the two give the same sample bit for bit from a
generator in the same state. Letters: N images, B batch rows, D pixels, M non-zero bytes
in the batch. docs/derivations.md, BIN.1.
"""
from __future__ import annotations

import numpy as np

from ..backend import dispatch, numba_kernel


def _nonzero_in_rows_numpy(x, idx):
    """x (N, D) uint8, idx (B,) int -> M, the non-zero bytes of rows idx (repeats counted)."""
    return int(np.count_nonzero(np.take(x, idx, axis=0)))


@numba_kernel
def _nonzero_in_rows_numba(x, idx):
    """The same, one row at a time; see the NumPy twin."""
    m = 0
    for r in range(idx.shape[0]):
        src = x[idx[r]]  # (D,)
        for d in range(src.shape[0]):
            m += src[d] != 0
    return m


_nonzero_in_rows = dispatch(_nonzero_in_rows_numpy, _nonzero_in_rows_numba)


def _bernoulli_rows_numpy(x, idx, u, scale, out):
    """x (N, D) uint8, idx (B,) int, u (M,) float, scale = 255 in out's dtype -> out (B, D)
    written; returns the number of non-zero bytes, and writes nothing unless it is M."""
    b = np.take(x, idx, axis=0)  # (B, D) bytes
    kept = b != 0  # (B, D); reading order of its True entries is the order of u
    m = int(np.count_nonzero(kept))
    if m == u.shape[0]:
        p = np.divide(b[kept], scale, dtype=out.dtype)  # (M,) in (0, 1]
        out[...] = 0
        out[kept] = u < p  # (BIN.1)
    return m


@numba_kernel
def _bernoulli_rows_numba(x, idx, u, scale, out):
    """The same in one pass (see the NumPy twin), except that with too few uniforms it
    leaves 0 where they ran out, reads none past the end, and still counts every byte."""
    j, m = 0, u.shape[0]  # the next unused uniform, how many there are
    for r in range(idx.shape[0]):
        src, dst = x[idx[r]], out[r]  # (D,) each
        for d in range(dst.shape[0]):
            dst[d] = 0
            if src[d] != 0:
                if j < m:
                    dst[d] = src[d]  # the byte, widened to out's dtype
                    dst[d] = u[j] < dst[d] / scale  # (BIN.1)
                j += 1
    return j


_bernoulli_rows = dispatch(_bernoulli_rows_numpy, _bernoulli_rows_numba)


def _index(idx, n: int) -> np.ndarray:
    if not (isinstance(idx, np.ndarray) and idx.ndim == 1 and idx.dtype.kind in "iu"):
        raise ValueError("idx must be a 1-d integer array of row numbers")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"idx must lie in [0, {n})")
    return idx if idx.dtype.isnative else idx.astype(idx.dtype.newbyteorder("="))


def _images(x) -> np.ndarray:
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2):
        raise ValueError("x must be a 2-d uint8 array of images")
    return x


def nonzero_in_rows(x, idx) -> int:
    """M: how many bytes of rows ``idx`` of the byte images ``x`` are not zero, each row
    counted as often as ``idx`` names it; the number of uniforms :func:`bernoulli_rows`
    takes. x (N, D) uint8; idx (B,) integer row numbers in [0, N)."""
    x = _images(x)
    return int(_nonzero_in_rows(x, _index(idx, x.shape[0])))


def check_sample_args(u, out, shape) -> None:
    """ValueError unless u is 1-d and out a writeable ``shape`` array, both of one float
    dtype and not overlapping."""
    if not (isinstance(u, np.ndarray) and isinstance(out, np.ndarray)):
        raise ValueError("u and out must be numpy arrays")
    if out.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"out must be float32 or float64, got {out.dtype}")
    if out.shape != shape or u.ndim != 1 or u.dtype != out.dtype:
        raise ValueError(f"u must be (M,) (one uniform per non-zero byte) and out {shape}, "
                         f"of one float dtype; got {u.shape} {u.dtype} and "
                         f"{out.shape} {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    if np.shares_memory(u, out):
        raise ValueError("out must not overlap u: the sample would overwrite uniforms "
                         "not yet read")


def check_uniforms_used(m: int, u) -> None:
    """ValueError unless the sample's ``m`` non-zero bytes took all of u, one uniform each."""
    if m != u.shape[0]:
        raise ValueError(f"u holds {u.shape[0]} uniforms, but the images have {m} non-zero "
                         f"bytes (nonzero_in_rows), one uniform each")


def bernoulli_rows(x, idx, u, out) -> np.ndarray:
    """Rows ``idx`` of the byte images ``x``, each pixel 1 with probability byte / 255.

    x (N, D) uint8; idx (B,) integer row numbers in [0, N); u (M,) uniforms in [0, 1),
    one per non-zero byte of the rows in reading order, M = ``nonzero_in_rows(x, idx)``,
    with the dtype of ``out``; out (B, D) float32 or float64, not overlapping u, written
    and returned. ValueError if u does not hold M uniforms (out is then not the sample).
    """
    x = _images(x)
    idx = _index(idx, x.shape[0])
    check_sample_args(u, out, (idx.shape[0], x.shape[1]))
    check_uniforms_used(int(_bernoulli_rows(x, idx, u, out.dtype.type(255), out)), u)
    return out
