"""Exercise 12: the importance-weighted log-likelihood.  docs/derivations.md, 12.1 (IW.1, IW.5).

Shapes: log weights a (N, k), one row per example, one column per sample; L (N,).

With k draws z_i ~ q(z|x) and log weights a_i = log p(x|z_i) + log p(z_i) - log q(z_i|x),

    L = log (1/k) sum_i exp(a_i)                                             (IW.1)

computed stably with m = max_i a_i:  L = m + log sum_i exp(a_i - m) - log k   (IW.5)

Backward: dL/da_i = exp(a_i) / sum_j exp(a_j) =: w_i, the normalised importance weights
(a softmax over the k samples). Given dL (N,):

    da[n, i] = dL[n] * w[n, i]

The weights are numbers computed from the forward values; the gradient uses them as they
are and does not differentiate them again. Compute them as stably as the forward pass:
log weights of -1000 or +1000 must give finite weights that sum to 1 in every row.
Check it: npvae exercises check DIR 12_iw_loglik
"""
import math

import numpy as np


def iw_loglik_forward(a):
    """L = log mean exp(a) per row. a (N, k) -> L (N,), cache."""
    m = np.max(a, axis=1, keepdims=True)  # (N, 1)  the largest log weight
    s = np.sum(np.exp(a - m), axis=1)  # (N,)  every term <= 1, the largest is exactly 1
    L = m[:, 0] + np.log(s) - math.log(a.shape[1])  # (N,)  (IW.5)
    return L, (a, m)


def iw_loglik_backward(dL, cache):
    """dL (N,) -> da (N, k)."""
    a, m = cache
    # BEGIN SOLUTION
    e = np.exp(a - m)  # (N, k)  never overflows
    w = e / e.sum(axis=1, keepdims=True)  # (N, k)  normalised weights, rows sum to 1
    da = dL[:, None] * w  # (N, k)
    # END SOLUTION
    return da
