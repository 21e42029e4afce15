"""Exercise 7: the KL from N(mu, diag sigma^2) to N(0, I).  docs/derivations.md, 5.1 (KL).

Shapes: mu, logvar, kl all (N, Z); the per-example KL is kl.sum(axis=1).

With logvar = log sigma^2, per dimension (tutorial eq. 7):

    kl = (mu^2 + exp(logvar) - logvar - 1) / 2                               (KL.1)

Backward, elementwise, given dkl (N, Z):
    dmu     = dkl * mu                                                       (KL.2)
    dlogvar = dkl * (exp(logvar) - 1) / 2                                    (KL.3)
The cache keeps sigma^2 = exp(logvar), so backward need not recompute it.
Check it: npvae exercises check DIR 07_gaussian_kl
"""
import numpy as np


def gaussian_kl_forward(mu, logvar):
    """Per-dimension KL to the standard normal. Returns kl (N, Z), cache."""
    var = np.exp(logvar)  # (N, Z)  sigma^2
    kl = 0.5 * (mu * mu + var - logvar - 1.0)  # (N, Z)  (KL.1)
    return kl, (mu, var)


def gaussian_kl_backward(dkl, cache):
    """dkl (N, Z) -> dmu (N, Z), dlogvar (N, Z)."""
    mu, var = cache
    # BEGIN SOLUTION
    dmu = dkl * mu  # (N, Z)  (KL.2)
    dlogvar = 0.5 * dkl * (var - 1.0)  # (N, Z)  (KL.3)
    # END SOLUTION
    return dmu, dlogvar
