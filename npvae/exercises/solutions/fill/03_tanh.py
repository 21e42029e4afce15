"""Exercise 3: tanh.  docs/derivations.md, section 3 (ACT.3).

Shapes: any; a and h have the same shape.

    h = tanh(a) = (e^a - e^-a) / (e^a + e^-a),     dh/da = 1 - tanh(a)^2 = 1 - h^2   (ACT.3)

Backward multiplies the upstream gradient elementwise: da = dh * (1 - h^2). Use the
cached output h; do not call tanh again.
Check it: npvae exercises check DIR 03_tanh
"""
import numpy as np


def tanh_forward(a):
    """h = tanh(a). Returns h, cache."""
    h = np.tanh(a)
    return h, h


def tanh_backward(dh, cache):
    """dh -> da."""
    h = cache
    # BEGIN SOLUTION
    da = dh * (1.0 - h * h)  # (ACT.3)
    # END SOLUTION
    return da
