"""Exercise 4: the logistic sigmoid.  docs/derivations.md, section 3 (ACT.4).

Shapes: any; a and h have the same shape.

    h = 1 / (1 + e^-a),     dh/da = e^-a / (1 + e^-a)^2 = h (1 - h)     (ACT.4)

The forward pass is written so that no exponential overflows: for a < 0 it uses
e^a / (1 + e^a), which is the same number. Backward: da = dh * h * (1 - h), from the
cached output h.
Check it: npvae exercises check DIR 04_sigmoid
"""
import numpy as np


def sigmoid_forward(a):
    """h = 1 / (1 + exp(-a)), stable for any finite a. Returns h, cache."""
    e = np.exp(-np.abs(a))  # in (0, 1]: never overflows
    h = np.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return h, h


def sigmoid_backward(dh, cache):
    """dh -> da."""
    h = cache
    # Your code here: see the docstring at the top of the file.
    raise NotImplementedError("sigmoid_backward is not written yet")
    return da
