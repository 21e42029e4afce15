"""The IWAE (Burda, Grosse and Salakhutdinov 2015) maximises the k-sample bound instead of
the ELBO. This op computes the bound from the log weights and its gradient; the rest of
the model sends da back through the decoder and the encoder as a VAE does.

Shapes: log weights a (N, k), a[n, i] = log p(x_n|z_i) + log p(z_i) - log q(z_i|x_n); L (N,).

    L = log (1/k) sum_i exp(a_i) = m + log sum_i exp(a_i - m) - log k,  m = max_i a_i   (IW.1, IW.5)

Its gradient, written as the gradient of a weighted sum of log weights: with the normalised
weights w_i = exp(a_i) / sum_j exp(a_j),

    dL/da_i = w_i,   so the bound climbs along sum_i w_i (gradient of log w_i).
"""
import math

import numpy as np


def iw_bound_forward(a):
    """L = log mean exp(a) per row. a (N, k) -> L (N,), cache."""
    m = np.max(a, axis=1, keepdims=True)  # (N, 1)
    e = np.exp(a - m)  # (N, k)  never overflows
    s = e.sum(axis=1)  # (N,)
    L = m[:, 0] + np.log(s) - math.log(a.shape[1])  # (N,)  (IW.5)
    w = e / s[:, None]  # (N, k)  normalised importance weights, rows sum to 1
    return L, (a, w)


def iw_bound_backward(dL, cache):
    """dL (N,) -> da (N, k): the bound's gradient is the weighted sum of log-weight gradients."""
    a, w = cache
    # L's gradient is sum_i w_i d(a_i): w holds numbers from the forward pass, used as
    # they are (the derivative of log-sum-exp is the softmax)
    da = dL[:, None] * w  # (N, k)
    return da
