"""Exercise 1: the affine layer, y = x W + b.  docs/derivations.md, section 2 (LIN).

Shapes: x (N, I), W (I, O), b (O,), y (N, O); N examples, I inputs, O outputs.

Forward (LIN.1):  y[n, o] = sum_i x[n, i] W[i, o] + b[o].

Backward: given dy = dL/dy (N, O), return the gradients of the forward inputs, in order:
    dx = dy W^T          (N, I)   each x[n] reaches every output of its own row  (LIN.2)
    dW = x^T dy          (I, O)   W is shared by all N rows, so their terms add  (LIN.3)
    db = sum_n dy[n]     (O,)     b is added to every row                        (LIN.4)
Check it: npvae exercises check DIR 01_linear
"""
import numpy as np


def linear_forward(x, W, b):
    """y = x W + b.  x (N, I), W (I, O), b (O,) -> y (N, O), cache."""
    y = x @ W + b  # (N, O)  (LIN.1)
    cache = (x, W)  # x is needed for dW, W for dx
    return y, cache


def linear_backward(dy, cache):
    """dy (N, O) -> dx (N, I), dW (I, O), db (O,)."""
    x, W = cache
    # BEGIN SOLUTION
    dx = dy @ W.T  # (N, I)  (LIN.2)
    dW = x.T @ dy  # (I, O)  (LIN.3)
    db = dy.sum(axis=0)  # (O,)  (LIN.4)
    # END SOLUTION
    return dx, dW, db
