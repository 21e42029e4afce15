"""Affine layer: out = x W + b.

Letters: N batch, I input features, O output features. See docs/derivations.md, section LIN.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate as v


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
