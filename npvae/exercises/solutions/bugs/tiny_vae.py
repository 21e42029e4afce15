"""The model, a VAE small enough to check by hand (N examples, D data dimensions, Z latents):

    encoder   h = x We + be  (N, 2Z);  mu = h[:, :Z], logvar = h[:, Z:]       (VAE.1)
    sample    z = mu + eps * exp(logvar / 2),  eps ~ N(0, I) given            (REP.1)
    decoder   out = z Wd + bd  (N, D), p(x|z) = N(out, I)                  (LIK.1)
    loss      the mean over the batch of -log p(x|z) + KL(q(z|x) || N(0, I))  (OBJ.1)
"""
import math

import numpy as np


def init_params(data_dim=6, latent=2, rng=None):
    """Small random weights for the tiny VAE, float64."""
    rng = np.random.default_rng(0) if rng is None else rng
    return {
        "enc.W": rng.normal(scale=0.5, size=(data_dim, 2 * latent)),
        "enc.b": rng.normal(scale=0.1, size=2 * latent),
        "dec.W": rng.normal(scale=0.5, size=(latent, data_dim)),
        "dec.b": rng.normal(scale=0.1, size=data_dim),
    }


def reparameterize(mu, logvar, eps):
    """z = mu + eps * sigma, sigma the standard deviation of q.

    Returns z (N, Z), sigma (N, Z) and d sigma / d logvar (N, Z) for the backward pass.
    """
    sigma = np.exp(0.5 * logvar)  # (N, Z)  sigma = exp(logvar / 2)
    dsigma = 0.5 * sigma  # (N, Z)  d sigma / d logvar
    return mu + eps * sigma, sigma, dsigma  # (N, Z)  (REP.1)


def loss_and_grads(params, x, eps):
    """Negative ELBO, averaged over the batch, and its gradient for every parameter.

    x (N, D) data, eps (N, Z) the noise. Returns (loss, grads) with grads keyed like params.
    """
    n, d = x.shape
    z_dim = eps.shape[1]
    We, be, Wd, bd = params["enc.W"], params["enc.b"], params["dec.W"], params["dec.b"]

    # ---- forward
    h = x @ We + be  # (N, 2Z)  (LIN.1)
    mu, logvar = h[:, :z_dim], h[:, z_dim:]  # (N, Z) each  (VAE.1)
    z, sigma, dsigma = reparameterize(mu, logvar, eps)  # (N, Z)  (REP.1)
    out = z @ Wd + bd  # (N, D)  (LIN.1)
    r = x - out  # (N, D)  residual
    logp = -0.5 * np.sum(r * r, axis=1) - 0.5 * d * math.log(2.0 * math.pi)  # (N,)  (LIK.1)
    var = np.exp(logvar)  # (N, Z)
    kl = 0.5 * np.sum(mu * mu + var - logvar - 1.0, axis=1)  # (N,)  (KL.1)
    loss = np.mean(-logp + kl)  # ()  (OBJ.1)

    # ---- backward
    dlogp = np.full(n, -1.0 / n)  # (N,)  d loss / d logp[n]
    dout = dlogp[:, None] * r  # (N, D)  (LIK.2)
    dWd = z.T @ dout  # (Z, D)  (LIN.3)
    dbd = dout.sum(axis=0)  # (D,)  (LIN.4)
    dz = dout @ Wd.T  # (N, Z)  (LIN.2)
    dmu = dz.copy()  # (N, Z)  (REP.2)
    dlogvar = dz * eps * dsigma  # (N, Z)  (REP.3)
    dkl = np.full((n, z_dim), 1.0 / n)  # (N, Z)  d loss / d kl[n, j]: the mean over the batch
    dmu += dkl * mu  # (N, Z)  mu also feeds the KL  (KL.2)
    dlogvar += 0.5 * dkl * (var - 1.0)  # (N, Z)  (KL.3)
    dh = np.concatenate([dmu, dlogvar], axis=1)  # (N, 2Z)
    dWe = x.T @ dh  # (D, 2Z)  (LIN.3)
    dbe = dh.sum(axis=0)  # (2Z,)  (LIN.4)
    return float(loss), {"enc.W": dWe, "enc.b": dbe, "dec.W": dWd, "dec.b": dbd}
