"""Affine layer: out = x W + b.

Letters: N batch, I input features, O output features. See docs/derivations.md, section LIN.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate as v
from ..backend import dispatch, get_backend, numba_kernel


class LinearCache(NamedTuple):
    x: np.ndarray  # (N, I) kept for dW
    W: np.ndarray  # (I, O) kept for dx


def linear_forward(x, W, b):
    """out = x @ W + b.  x (N, I), W (I, O), b (O,) -> out (N, O)."""
    v.array("x", x, 2), v.array("W", W, 2), v.array("b", b, 1)
    if x.shape[1] != W.shape[0]:
        raise ValueError(
            f"x has {x.shape[1]} features but W expects {W.shape[0]} (W has shape {W.shape})"
        )
    if b.shape[0] != W.shape[1]:
        raise ValueError(f"b must have shape ({W.shape[1]},), got {b.shape}")
    out = x @ W  # (N, O)  (LIN.1)
    out += b  # (N, O)  (LIN.1)
    return out, LinearCache(x, W)


def linear_backward(dout, cache: LinearCache, dW=None, db=None):
    """Gradients of the affine layer, in the order of the forward inputs.

    dout (N, O) -> dx (N, I), dW (I, O), db (O,). ``dW``/``db`` may be given as
    preallocated buffers (for instance views into a flat gradient vector).
    """
    x, W = cache
    dx = dout @ W.T  # (N, I)  (LIN.2)
    dW = np.matmul(x.T, dout, out=dW)  # (I, O)  (LIN.3)
    db = np.sum(dout, axis=0, out=db)  # (O,)  (LIN.4)
    return dx, dW, db


# ----------------------------------------------------------------------------------
# The first layer of an encoder multiplies the data, and most of MNIST's pixels are 0
# (about 81% of grey levels, 87% of a binarized image). The two products that touch the
# data, x W (LIN.1) and x^T dy (LIN.3), can then skip the zero entries of x (LIN.5):
# dense BLAS cannot. Each kernel has a NumPy twin that is the plain dense product.

SPARSE_DENSITY = 0.25  # the compiled kernels skip zeros when at most this fraction is non-zero


def _sparse_product_numpy(x, W, out):
    """out = x @ W: x (N, I), W (I, O) -> out (N, O)  (LIN.1 without the bias)."""
    return np.matmul(x, W, out=out)


@numba_kernel
def _sparse_product_numba(x, W, out):
    """Same as _sparse_product_numpy, visiting only the non-zero x[n, j]  (LIN.5).

    out[n] = sum over the j with x[n, j] != 0 of x[n, j] W[j]; the rows of W it adds are
    taken four at a time, so each out[n, k] is loaded and stored once per four rows.
    """
    n_rows, n_in = x.shape
    n_out = W.shape[1]
    cols = np.empty(n_in, np.int64)  # the non-zero columns of one row of x
    for n in range(n_rows):
        c = 0
        for j in range(n_in):
            if x[n, j] != 0:
                cols[c] = j
                c += 1
        o = out[n]
        for k in range(n_out):
            o[k] = 0
        t = 0
        while t + 4 <= c:
            j0, j1, j2, j3 = cols[t], cols[t + 1], cols[t + 2], cols[t + 3]
            a0, a1, a2, a3 = x[n, j0], x[n, j1], x[n, j2], x[n, j3]
            w0, w1, w2, w3 = W[j0], W[j1], W[j2], W[j3]
            for k in range(n_out):
                o[k] += a0 * w0[k] + a1 * w1[k] + a2 * w2[k] + a3 * w3[k]
            t += 4
        while t < c:
            a, w = x[n, cols[t]], W[cols[t]]
            for k in range(n_out):
                o[k] += a * w[k]
            t += 1
    return out


def _sparse_weight_grad_numpy(x, dy, out):
    """out = x^T @ dy: x (N, I), dy (N, O) -> out (I, O)  (LIN.3)."""
    return np.matmul(x.T, dy, out=out)


@numba_kernel
def _sparse_weight_grad_numba(x, dy, out):
    """Same as _sparse_weight_grad_numpy, visiting only the non-zero x[n, j]  (LIN.5).

    out[j] = sum over the n with x[n, j] != 0 of x[n, j] dy[n]: the non-zeros are first
    listed column by column, then each row of out is summed in registers and stored once.
    """
    n_rows, n_in = x.shape
    n_out = dy.shape[1]
    start = np.zeros(n_in + 1, np.int64)  # column j's entries: rows[start[j]:start[j + 1]]
    for n in range(n_rows):
        for j in range(n_in):
            if x[n, j] != 0:
                start[j + 1] += 1
    for j in range(n_in):
        start[j + 1] += start[j]
    rows = np.empty(start[n_in], np.int64)
    fill = start[:n_in].copy()
    for n in range(n_rows):
        for j in range(n_in):
            if x[n, j] != 0:
                rows[fill[j]] = n
                fill[j] += 1
    for j in range(n_in):
        o = out[j]
        for k in range(n_out):
            o[k] = 0
        t, end = start[j], start[j + 1]
        while t + 4 <= end:
            r0, r1, r2, r3 = rows[t], rows[t + 1], rows[t + 2], rows[t + 3]
            a0, a1, a2, a3 = x[r0, j], x[r1, j], x[r2, j], x[r3, j]
            g0, g1, g2, g3 = dy[r0], dy[r1], dy[r2], dy[r3]
            for k in range(n_out):
                o[k] += a0 * g0[k] + a1 * g1[k] + a2 * g2[k] + a3 * g3[k]
            t += 4
        while t < end:
            a, g = x[rows[t], j], dy[rows[t]]
            for k in range(n_out):
                o[k] += a * g[k]
            t += 1
    return out


def _all_finite_numpy(a):
    """True when every entry of a is finite."""
    return bool(np.isfinite(a).all())


@numba_kernel
def _all_finite_numba(a):
    """Same as _all_finite_numpy, for a contiguous array, in one vectorized pass."""
    flat = a.reshape(-1)
    bad = 0
    for i in range(flat.shape[0]):
        bad += (flat[i] - flat[i]) != 0  # NaN for NaN and +-inf
    return bad == 0


def _count_nonzero_numpy(a):
    """The number of non-zero entries of a (NaN counts as non-zero)."""
    return int(np.count_nonzero(a))


@numba_kernel
def _count_nonzero_numba(a):
    """Same as _count_nonzero_numpy, for a contiguous array, in one vectorized pass."""
    flat = a.reshape(-1)
    count = 0
    for i in range(flat.shape[0]):
        count += flat[i] != 0
    return count


sparse_product_kernel = dispatch(_sparse_product_numpy, _sparse_product_numba)
sparse_weight_grad_kernel = dispatch(_sparse_weight_grad_numpy, _sparse_weight_grad_numba)
all_finite_kernel = dispatch(_all_finite_numpy, _all_finite_numba)
count_nonzero_kernel = dispatch(_count_nonzero_numpy, _count_nonzero_numba)


def skips_zeros(x) -> bool:
    """Whether the compiled backend should skip x's zeros: few enough of them are non-zero."""
    return (get_backend() == "numba" and x.flags.c_contiguous
            and count_nonzero_kernel(x) <= SPARSE_DENSITY * x.size)


def data_product(x, W, out=None, sparse=None):
    """x @ W for data x (N, I) and W (I, O) -> (N, O), skipping zeros of x when that pays.

    A zero x[n, j] contributes 0 * W[j, k] = 0 exactly, unless W[j, k] is inf or NaN: the
    sparse kernel is used only when W is finite, so both backends give the same result
    (to rounding) for every input. ``sparse`` None decides by :func:`skips_zeros`.
    """
    out = np.empty((x.shape[0], W.shape[1]), W.dtype) if out is None else out
    if sparse is None:
        sparse = skips_zeros(x)
    if sparse and W.flags.c_contiguous and all_finite_kernel(W):
        return sparse_product_kernel.numba(x, W, out)  # (N, O)  (LIN.5)
    return np.matmul(x, W, out=out)  # (N, O)  (LIN.1)


def data_weight_grad(x, dy, out=None, sparse=None):
    """x^T dy for data x (N, I) and dy (N, O) -> (I, O), skipping zeros of x when that pays.

    As :func:`data_product`: the sparse kernel is used only when dy is finite.
    """
    out = np.empty((x.shape[1], dy.shape[1]), dy.dtype) if out is None else out
    if sparse is None:
        sparse = skips_zeros(x)
    if sparse and dy.flags.c_contiguous and out.flags.c_contiguous and all_finite_kernel(dy):
        return sparse_weight_grad_kernel.numba(x, dy, out)  # (I, O)  (LIN.5)
    return np.matmul(x.T, dy, out=out)  # (I, O)  (LIN.3)
