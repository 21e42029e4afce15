"""Exercise 11: one Adam step.  docs/derivations.md, section 11 (ADAM.1-4).

Shapes: p, g, m, v all the same shape (any); t is the step number, 1 on the first call.

Adam (Kingma and Ba 2015, Algorithm 1) keeps moving averages of the gradient and of its
square, both starting at zero, and corrects them for that zero start:

    m <- beta1 m + (1 - beta1) g                                             (ADAM.1)
    v <- beta2 v + (1 - beta2) g^2                                           (ADAM.2)
    m_hat = m / (1 - beta1^t),   v_hat = v / (1 - beta2^t)                   (ADAM.3)
    p <- p - lr m_hat / (sqrt(v_hat) + eps)                                  (ADAM.4)

Update p, m and v in place (p -= ..., m *= ..., m += ...): the caller keeps the arrays.
On the first step each entry moves by about lr, whatever the gradient's size.
Check it: npvae exercises check DIR 11_adam
"""
import numpy as np


def adam_step(p, g, m, v, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """Update p, m, v in place by one Adam step at step number t >= 1. Returns None."""
    # Your code here: see the docstring at the top of the file.
    raise NotImplementedError("adam_step is not written yet")
