"""The reparameterization node: z = mu + eps * exp(logvar / 2)  (tutorial section 3).

Sampling z ~ N(mu, diag exp(logvar)) is not differentiable in mu and logvar, but the
same z written as a deterministic function of (mu, logvar) and outside noise
eps ~ N(0, I) is. The noise is an *input*, so a gradient check can hold it fixed.

Letters: N batch, Z latent size. docs/derivations.md, section REP.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate as v


class ReparamCache(NamedTuple):
    eps: np.ndarray  # (N, Z) the noise that was used
    std: np.ndarray  # (N, Z) exp(logvar / 2), kept so backward need not recompute it


def reparameterize_forward(mu, logvar, eps):
    """z = mu + eps * exp(logvar / 2).  mu, logvar, eps (N, Z) -> z (N, Z)."""
    v.array("mu", mu), v.array("logvar", logvar), v.array("eps", eps)
    v.same_shape("mu", mu, "logvar", logvar)
    v.same_shape("mu", mu, "eps", eps)
    v.finite("mu", mu), v.finite("logvar", logvar), v.finite("eps", eps)
    std = np.exp(0.5 * logvar)  # (N, Z)  sigma = exp(logvar / 2)
    z = mu + eps * std  # (N, Z)  (REP.1)
    return z, ReparamCache(eps, std)


def reparameterize_backward(dz, cache: ReparamCache):
    """dz (N, Z) -> dmu (N, Z), dlogvar (N, Z)."""
    eps, std = cache
    dmu = dz.copy()  # (N, Z)  dz/dmu = 1  (REP.2)
    dlogvar = 0.5 * dz * eps * std  # (N, Z)  dz/dlogvar = eps * sigma / 2  (REP.3)
    return dmu, dlogvar
