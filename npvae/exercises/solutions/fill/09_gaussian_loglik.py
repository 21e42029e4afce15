"""Exercise 9: the Gaussian log-likelihood with a fixed variance.  docs/derivations.md, 5.2 (LIK.1-2).

Shapes: mean m and data x (N, D); logp (N,). s2 is the decoder's fixed variance (a number).

    logp[n] = -||x[n] - m[n]||^2 / (2 s2) - (D / 2) log(2 pi s2)              (LIK.1)

Backward, given dlogp (N,):

    dm[n, d] = dlogp[n] * (x[n, d] - m[n, d]) / s2                           (LIK.2)

Mind the sign (the log-density rises as m moves toward x) and the variance.
Check it: npvae exercises check DIR 09_gaussian_loglik
"""
import math

import numpy as np


def gaussian_loglik_forward(mean, x, s2=1.0):
    """log N(x; mean, s2 I) per example. mean, x (N, D) -> logp (N,), cache."""
    r = x - mean  # (N, D)  residual
    d = x.shape[1]
    logp = -0.5 * np.sum(r * r, axis=1) / s2 - 0.5 * d * math.log(2.0 * math.pi * s2)  # (LIK.1)
    return logp, (r, s2)


def gaussian_loglik_backward(dlogp, cache):
    """dlogp (N,) -> dmean (N, D)."""
    r, s2 = cache
    # BEGIN SOLUTION
    dmean = dlogp[:, None] * r / s2  # (N, D)  (LIK.2)
    # END SOLUTION
    return dmean
