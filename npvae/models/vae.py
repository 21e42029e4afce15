"""The Gaussian and Bernoulli VAEs (tutorial sections 3-4, eqs. 6-12).

    q(z|x) = N(mu(x), diag exp(logvar(x)))     encoder MLP x -> [mu, logvar]   (VAE.1)
    p(z)   = N(0, I)
    p(x|z) = N(Dec(z), sigma2 I)  or  Bernoulli(sigmoid(Dec(z)))               (VAE.2)

One sample z = mu + eps * exp(logvar / 2) estimates the reconstruction term; the KL is
in closed form. The objective, in nats per example, averaged over the batch (for a
Gaussian decoder with sigma2 = 1, half the negative of the tutorial's (T.11), constants kept):

    loss = -log p(x|z) + w * KL(q(z|x) || p(z))                                (OBJ.1)

with the KL weight w = beta * min(1, step / warmup_steps) (OBJ.2); beta = 1, no
warm-up gives the negative ELBO (T.5-6). With free bits lambda > 0 the KL term becomes

    sum_j max(lambda, mean_n KL_nj)                                            (OBJ.3)

(Kingma et al. 2016): a latent dimension whose batch-average KL is below lambda
nats costs a constant lambda, and so gets no gradient from the KL.

Letters: N batch, D data size, H hidden sizes, Z latent size. docs/derivations.md,
sections VAE and OBJ.
"""
from __future__ import annotations

import numpy as np

from .. import _validate as v
from ..ops import (
    gaussian_kl_backward, gaussian_kl_forward, reparameterize_backward, reparameterize_forward,
)
from .base import (
    ContinuousLatentModel, Forward, trusted, as_rng, kl_weight, likelihood_backward,
    likelihood_forward,
)


class VAE(ContinuousLatentModel):
    """A VAE with a diagonal Gaussian encoder and a Gaussian or Bernoulli decoder.

    Parameters: ``enc.{i}.W/b`` map x (N, D) to [mu, logvar] (N, 2Z); ``dec.{i}.W/b``
    map z (N, Z) to the decoder output (N, D): the Gaussian mean or the Bernoulli logits.
    Weights start normal with He or Glorot scale (:func:`npvae.ops.mlp.init_scale`),
    biases at zero, so logvar starts near 0 (unit posterior variance).
    """

    kind = "vae"

    def __init__(self, data_dim: int = 784, hidden=(400,), latent: int = 20,
                 activation: str = "relu", likelihood: str = "bernoulli", sigma2: float = 1.0,
                 beta: float = 1.0, warmup_steps: int = 0, free_bits: float = 0.0,
                 dtype=np.float32, rng=0):
        free_bits = v.nonnegative("free_bits", free_bits)
        self._build(data_dim, hidden, latent, 2 * int(latent), activation, likelihood, sigma2,
                    beta, warmup_steps, dtype, rng, free_bits=float(free_bits))

    # -- the objective ---------------------------------------------------------------
    def forward(self, x, *, rng=None, eps=None, step=None) -> Forward:
        """The forward chain. x (N, D); eps (N, Z) fixes the noise."""
        cfg = self.config
        x = self.check_x(x)
        n, z_dim = x.shape[0], self.latent
        w = kl_weight(cfg["beta"], cfg["warmup_steps"], step)

        with trusted():  # x was checked above: the ops need not scan it again
            enc, enc_cache = self._encoder_forward(x)  # (N, 2Z)
            mu, logvar = enc[:, :z_dim], enc[:, z_dim:]  # (N, Z) each  (VAE.1)
            eps = self.noise((n, z_dim), rng, eps)  # (N, Z)
            z, rep_cache = reparameterize_forward(mu, logvar, eps)  # (N, Z)  (REP.1)
            dec_out, dec_cache = self._decoder_forward(z)  # (N, D)  (VAE.2)
            logp, lik_cache = likelihood_forward(cfg["likelihood"], dec_out, x, cfg["sigma2"])  # (N,)
            kl_dim, kl_cache = gaussian_kl_forward(mu, logvar)  # (N, Z)  (KL.1)
            kl = kl_dim.sum(axis=1)  # (N,)
            kl_mean_dim = None
            if cfg["free_bits"] > 0:
                kl_mean_dim = kl_dim.mean(axis=0)  # (Z,)
                kl_term = np.maximum(kl_mean_dim, cfg["free_bits"]).sum()  # ()  (OBJ.3)
            else:
                kl_term = kl.mean()  # ()
            recon = -logp.mean()  # ()
            loss = recon + w * kl_term  # ()  (OBJ.1)
            self.check_loss(loss, x)

        stats = dict(loss=float(loss), recon=float(recon), kl=float(kl.mean()),
                     elbo=float((logp - kl).mean()), kl_weight=w, kl_term=float(kl_term))
        saved = dict(n=n, w=w, kl_mean_dim=kl_mean_dim, enc=enc_cache, rep=rep_cache,
                     dec=dec_cache, lik=lik_cache, kl=kl_cache)
        return Forward(float(loss), stats, saved)

    def _reverse(self, s, grads) -> None:
        """The reverse chain, from the caches ``s`` of :meth:`forward`, into ``grads``."""
        cfg, n, z_dim, w = self.config, s["n"], self.latent, s["w"]
        dlogp = np.full(n, -1.0 / n, dtype=self.dtype)  # (N,)  d loss / d logp_n
        ddec_out = likelihood_backward(cfg["likelihood"], dlogp, s["lik"])  # (N, D)  (LIK.2/4)
        dz = self._decoder_backward(ddec_out, s["dec"], grads)  # (N, Z)  (MLP)
        dmu, dlogvar = reparameterize_backward(dz, s["rep"])  # (N, Z) each  (REP.2, REP.3)
        dkl_dim = np.full((n, z_dim), w / n, dtype=self.dtype)  # (N, Z)  d loss / d KL_nj
        if cfg["free_bits"] > 0:
            dkl_dim *= s["kl_mean_dim"] > cfg["free_bits"]  # (N, Z)  flat below lambda  (OBJ.3)
        dmu_kl, dlogvar_kl = gaussian_kl_backward(dkl_dim, s["kl"])  # (N, Z) each  (KL.2, KL.3)
        dmu += dmu_kl  # (N, Z)  mu feeds both z and the KL: gradients add
        dlogvar += dlogvar_kl  # (N, Z)  logvar too
        denc = np.concatenate([dmu, dlogvar], axis=1)  # (N, 2Z)
        self._encoder_backward(denc, s["enc"], grads)  # x is data: no dx

    # -- using the model -------------------------------------------------------------
    def encode(self, x):
        """x (N, D) -> mu (N, Z), logvar (N, Z) of q(z|x)."""
        x = self.check_x(x)
        enc, _ = self._encoder_forward(x)
        return enc[:, : self.latent].copy(), enc[:, self.latent:].copy()

    def reconstruct(self, x, rng=None):
        """Decode the posterior mean (rng None) or one posterior sample (rng given)."""
        mu, logvar = self.encode(x)
        if rng is not None:
            mu = mu + as_rng(rng).standard_normal(mu.shape, dtype=self.dtype) * np.exp(0.5 * logvar)
        return self.decode(mu)


class _FixedLikelihoodVAE(VAE):
    """A VAE whose decoder distribution is fixed by its class (``likelihood``)."""

    likelihood, other = "", ""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("likelihood", self.likelihood)
        if kwargs["likelihood"] != self.likelihood:
            raise ValueError(f"{type(self).__name__} has likelihood {self.likelihood!r}; "
                             f"use {self.other} or VAE")
        if self.likelihood == "bernoulli":
            kwargs.pop("sigma2", None)  # a Bernoulli decoder has no variance
        super().__init__(*args, **kwargs)


class GaussianVAE(_FixedLikelihoodVAE):
    """The VAE of tutorial section 3: p(x|z) = N(Dec(z), sigma2 I), sigma2 = 1 by default."""

    kind, likelihood, other = "vae-gaussian", "gaussian", "BernoulliVAE"


class BernoulliVAE(_FixedLikelihoodVAE):
    """The VAE of tutorial section 4: p(x|z) = Bernoulli(sigmoid(Dec(z)))."""

    kind, likelihood, other = "vae-bernoulli", "bernoulli", "GaussianVAE"
