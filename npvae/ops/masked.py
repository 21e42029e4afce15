"""Masked affine layer, the building block of MADE (Germain et al. 2015): out = x (W * A) + b.

A is a fixed 0/1 mask of W's shape. An output unit sees an input only where A is 1, so
choosing A sets which inputs each output may depend on; the masks that make a network
autoregressive are built in :mod:`npvae.models.prior` (MADE.2-3).

    out = x (W * A) + 1 b^T                                                  (MADE.4)
    dx = dout (W * A)^T;   dW = (x^T dout) * A;   db = sum_n dout            (MADE.5)

dW is the ordinary weight gradient (LIN.3) times the mask: the masked entries of W do
not reach the output, so their gradient is exactly zero and they never move. The mask is
a constant, not a parameter: it gets no gradient (None).

Letters: N batch, I input features, O output features. docs/derivations.md, section MADE.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate as v
from .linear import input_grad


class MaskedLinearCache(NamedTuple):
    x: np.ndarray  # (N, I) kept for dW
    W_masked: np.ndarray  # (I, O) W * A, kept for dx
    mask: np.ndarray  # (I, O) A, kept for dW


def masked_linear_forward(x, W, mask, b):
    """out = x @ (W * mask) + b.  x (N, I), W (I, O), mask (I, O) of 0/1, b (O,) -> out (N, O)."""
    v.array("x", x, 2), v.array("W", W, 2), v.array("b", b, 1)
    if not isinstance(mask, np.ndarray) or mask.shape != W.shape:
        raise ValueError(f"mask must be an array of W's shape {W.shape}, "
                         f"got {getattr(mask, 'shape', type(mask).__name__)}")
    if x.shape[1] != W.shape[0]:
        raise ValueError(f"x has {x.shape[1]} features but W expects {W.shape[0]} (W has shape {W.shape})")
    if b.shape[0] != W.shape[1]:
        raise ValueError(f"b must have shape ({W.shape[1]},), got {b.shape}")
    W_masked = W * mask  # (I, O)  W * A
    out = x @ W_masked  # (N, O)  (MADE.4)
    out += b  # (N, O)  (MADE.4)
    return out, MaskedLinearCache(x, W_masked, mask)


def masked_linear_backward(dout, cache: MaskedLinearCache, dW=None, db=None):
    """dout (N, O) -> dx (N, I), dW (I, O), None (the mask), db (O,)  (MADE.5).

    ``dW``/``db`` may be preallocated buffers (views into a flat gradient vector).
    """
    x, W_masked, mask = cache
    dx = input_grad(dout, W_masked)  # (N, I) = dout (W * A)^T  (MADE.5, LIN.2)
    dW = np.matmul(x.T, dout, out=dW)  # (I, O)  the unmasked gradient (LIN.3)
    dW *= mask  # (I, O)  masked entries get exactly 0  (MADE.5)
    db = np.sum(dout, axis=0, out=db)  # (O,)  (LIN.4)
    return dx, dW, None, db
