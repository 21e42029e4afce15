"""Exercise 6: the reparameterization node.  docs/derivations.md, section 5.4 (REP).

Shapes: mu, logvar, eps, z all (N, Z); N examples, Z latent dimensions.

Drawing z ~ N(mu, diag exp(logvar)) is written as a function of outside noise
eps ~ N(0, I), which the caller passes in (so a gradient check can hold it fixed):

    z = mu + eps * sigma,   sigma = exp(logvar / 2)                          (REP.1)

Backward, elementwise (each z[n, j] depends only on mu[n, j] and logvar[n, j]):
    dmu     = dz                                                             (REP.2)
    dlogvar = dz * eps * sigma / 2      since d sigma / d logvar = sigma / 2  (REP.3)
eps is data, not a parameter: it gets no gradient.
Check it: npvae exercises check DIR 06_reparameterize
"""
import numpy as np


def reparameterize_forward(mu, logvar, eps):
    """z = mu + eps * exp(logvar / 2). Returns z (N, Z), cache."""
    sigma = np.exp(0.5 * logvar)  # (N, Z)  the standard deviation
    z = mu + eps * sigma  # (N, Z)  (REP.1)
    return z, (eps, sigma)


def reparameterize_backward(dz, cache):
    """dz (N, Z) -> dmu (N, Z), dlogvar (N, Z)."""
    eps, sigma = cache
    # Your code here: see the docstring at the top of the file.
    raise NotImplementedError("reparameterize_backward is not written yet")
    return dmu, dlogvar
