"""Exercise 2: ReLU and leaky ReLU.  docs/derivations.md, section 3 (ACT.1, ACT.2).

Shapes: any; a and h have the same shape.

    relu        h = max(a, 0)                    dh/da = 1 where h > 0, else 0     (ACT.1)
    leaky relu  h = a if a > 0 else slope * a    dh/da = 1 where h > 0, else slope (ACT.2)

An elementwise function has a diagonal Jacobian, so backward is da = dh * f'(a). Write
f' from the output h, which is all the cache keeps (h has the sign of a). At a = 0 the
derivative does not exist; use 0 (relu) or slope (leaky relu) there.
Check it: npvae exercises check DIR 02_relu
"""
import numpy as np


def relu_forward(a):
    """h = max(a, 0). Returns h, cache."""
    h = np.maximum(a, 0.0)
    return h, h


def relu_backward(dh, cache):
    """dh (same shape as a) -> da."""
    h = cache
    # Your code here: see the docstring at the top of the file.
    raise NotImplementedError("relu_backward is not written yet")
    return da


def leaky_relu_forward(a, slope=0.01):
    """h = a where a > 0, slope * a elsewhere. Returns h, cache."""
    h = np.where(a > 0, a, slope * a)
    return h, (h, slope)


def leaky_relu_backward(dh, cache):
    """dh -> da."""
    h, slope = cache
    # Your code here: see the docstring at the top of the file.
    raise NotImplementedError("leaky_relu_backward is not written yet")
    return da
