"""Affine layer: out = x W + b.

Letters: N batch, I input features, O output features. See docs/derivations.md, section LIN.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate as v


# dx = dout W^T (LIN.2) for a small batch and a wide input is computed as (W dout^T)^T:
# below SMALL_BATCH rows, with at least WIDE_INPUT inputs, in a dtype of TRANSPOSED_DTYPES
# (see input_grad).
SMALL_BATCH = 64
WIDE_INPUT = 128
TRANSPOSED_DTYPES = (np.dtype(np.float32),)


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
    v.finite("x", x), v.finite("W", W), v.finite("b", b)  # skipped inside a model's trusted()
    out = x @ W  # (N, O)  (LIN.1)
    out += b  # (N, O)  (LIN.1)
    return out, LinearCache(x, W)


def input_grad(dout, W):
    """dx = dout W^T (LIN.2): dout (N, O), W (I, O) -> dx (N, I), C-contiguous.

    Each entry is the same sum, dx[n, i] = sum_o dout[n, o] W[i, o], whichever way round
    the product is taken. For a float32 product with a small batch and a wide input
    (N < SMALL_BATCH, I >= WIDE_INPUT) it is taken as W dout^T (I, N) and then transposed
    into rows: with OpenBLAS's AVX-512 kernels, a float32 product with few result rows
    whose second factor is a transposed matrix runs slowly, and at batch 20 the transposed
    way takes 0.57-0.70 of the time for 200 to 400 inputs (benchmarks/RESULTS.md). With
    its AVX2 kernels the two ways cost about the same, and in float64 the direct way is
    the faster. Only the rounding of the sums can differ between the two.
    """
    if by_transpose(dout, W):
        return np.ascontiguousarray((W @ dout.T).T)  # (I, N) -> (N, I)  (LIN.2)
    return dout @ W.T  # (N, I)  (LIN.2)


def by_transpose(dout, W) -> bool:
    """Whether input_grad takes dout W^T as (W dout^T)^T for these operands."""
    return (dout.shape[0] < SMALL_BATCH and W.shape[0] >= WIDE_INPUT
            and dout.dtype in TRANSPOSED_DTYPES and W.dtype in TRANSPOSED_DTYPES)


def linear_backward(dout, cache: LinearCache, dW=None, db=None):
    """Gradients of the affine layer, in the order of the forward inputs.

    dout (N, O) -> dx (N, I), dW (I, O), db (O,). ``dW``/``db`` may be given as
    preallocated buffers (for instance views into a flat gradient vector).
    """
    x, W = cache
    dx = input_grad(dout, W)  # (N, I) = dout W^T  (LIN.2)
    dW = np.matmul(x.T, dout, out=dW)  # (I, O)  (LIN.3)
    db = np.sum(dout, axis=0, out=db)  # (O,)  (LIN.4)
    return dx, dW, db
