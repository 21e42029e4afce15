"""Exercise 5: softplus.  docs/derivations.md, section 3 (ACT.5).

Shapes: any; a and h have the same shape.

    h = log(1 + e^a) = max(a, 0) + log(1 + e^-|a|)         (never overflows)
    dh/da = e^a / (1 + e^a) = sigmoid(a) = 1 - e^-h          (ACT.5)

The cache keeps only h. Since 1 + e^a = e^h, sigmoid(a) = 1 - 1/(1 + e^a) = 1 - e^-h.
Write it with np.expm1 (-np.expm1(-h) = 1 - e^-h) so it stays accurate when h is tiny,
and make sure it is finite for a = +-1000.
Check it: npvae exercises check DIR 05_softplus
"""
import numpy as np


def softplus_forward(a):
    """h = log(1 + exp(a)), stable for any finite a. Returns h, cache."""
    h = np.maximum(a, 0.0) + np.log1p(np.exp(-np.abs(a)))
    return h, h


def softplus_backward(dh, cache):
    """dh -> da."""
    h = cache
    # BEGIN SOLUTION
    da = dh * -np.expm1(-h)  # 1 - exp(-h) = sigmoid(a)  (ACT.5)
    # END SOLUTION
    return da
