"""The importance-weighted autoencoder (Burda, Grosse and Salakhutdinov 2015).

The VAE's networks, trained on a tighter bound: per example, k samples z_i ~ q(z|x)
share one encoder pass, and the objective is the negative of

    L_k(x) = log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)                           (IWAE.2)

averaged over the batch. k = 1 is the ELBO estimated with a sampled KL term
(log q(z|x) - log p(z)) in place of the VAE's closed form (IWAE.5). Its gradient is
sum_i w~_i grad log w_i, the normalised weights w~ held constant (IWAE.3).

Letters: N batch, k samples per example, D data size, Z latent size.
docs/derivations.md, section IWAE.
"""
from __future__ import annotations

import numpy as np

from ..ops import reparameterize_backward, reparameterize_forward
from ..ops.iwae import (
    iw_bound_backward, iw_bound_forward, prior_ratio_backward, prior_ratio_forward,
)
from .base import Forward, likelihood_backward, likelihood_forward, trusted
from .vae import VAE


class IWAE(VAE):
    """A VAE trained on the k-sample importance-weighted bound (IWAE.2).

    Same parameters, encoder and decoder as :class:`~npvae.models.VAE`; ``k`` samples
    per example. The KL weight, warm-up and free bits belong to the ELBO and are not
    options here. Evaluation (the ELBO, L_k with any k) is the VAE's.
    """

    kind = "iwae"

    def __init__(self, data_dim: int = 784, hidden=(400,), latent: int = 20,
                 activation: str = "relu", likelihood: str = "bernoulli", sigma2: float = 1.0,
                 k: int = 5, beta: float = 1.0, warmup_steps: int = 0, free_bits: float = 0.0,
                 dtype=np.float32, rng=0):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k (importance samples per example) must be an integer >= 1, got {k!r}")
        if beta != 1.0 or warmup_steps != 0 or free_bits != 0.0:
            raise ValueError("the IWAE objective has no KL weight, warm-up or free bits: "
                             f"beta must be 1, warmup_steps 0 and free_bits 0, got {beta}, "
                             f"{warmup_steps} and {free_bits}")
        super().__init__(data_dim, hidden, latent, activation, likelihood, sigma2,
                         dtype=dtype, rng=rng)
        self.config["k"] = int(k)

    def forward(self, x, *, rng=None, eps=None, step=None) -> Forward:
        """-mean L_k, the forward chain. x (N, D); eps (N, k, Z) fixes the noise."""
        cfg = self.config
        x = self.check_x(x)
        n, k, z_dim = x.shape[0], cfg["k"], self.latent

        with trusted():  # x was checked above: the ops need not scan it again
            # one encoder pass, k samples per example
            enc, enc_cache = self._encoder_forward(x)  # (N, 2Z)
            mu, logvar = enc[:, :z_dim], enc[:, z_dim:]  # (N, Z) each  (VAE.1)
            eps = self.noise((n, k, z_dim), rng, eps)  # (N, k, Z)
            mu_k = np.repeat(mu, k, axis=0)  # (N*k, Z)  row n*k + i: example n, sample i
            logvar_k = np.repeat(logvar, k, axis=0)  # (N*k, Z)
            z, rep_cache = reparameterize_forward(mu_k, logvar_k, eps.reshape(n * k, z_dim))  # (N*k, Z)  (REP.1)
            dec_out, dec_cache = self._decoder_forward(z)  # (N*k, D)  (VAE.2)
            x_k = np.repeat(x, k, axis=0)  # (N*k, D)  each example once per sample
            logp, lik_cache = likelihood_forward(cfg["likelihood"], dec_out, x_k, cfg["sigma2"])  # (N*k,)
            ratio, ratio_cache = prior_ratio_forward(z.reshape(n, k, z_dim), eps, logvar)  # (N, k)  (IWAE.4)
            log_w = logp.reshape(n, k) + ratio  # (N, k)  (IWAE.1)
            bound, bound_cache = iw_bound_forward(log_w)  # (N,)  (IWAE.2)
            loss = -bound.mean()  # ()
            self.check_loss(loss, x)

        recon = -logp.mean()  # mean over the N k samples of -log p(x|z_i)
        kl = -ratio.mean()  # a Monte Carlo estimate of KL(q || p): mean of log q - log p(z)
        stats = dict(loss=float(loss), recon=float(recon), kl=float(kl),
                     elbo=float(log_w.mean()), iw_bound=float(bound.mean()))
        saved = dict(n=n, enc=enc_cache, rep=rep_cache, dec=dec_cache, lik=lik_cache,
                     ratio=ratio_cache, bound=bound_cache)
        return Forward(float(loss), stats, saved)

    def _reverse(self, s, grads) -> None:
        """The reverse chain, from the caches ``s`` of :meth:`forward`, into ``grads``."""
        n, k, z_dim = s["n"], self.config["k"], self.latent
        dbound = np.full(n, -1.0 / n, dtype=self.dtype)  # (N,)  d loss / d L_k(x_n)
        dlog_w = iw_bound_backward(dbound, s["bound"])  # (N, k)  (IWAE.3)
        ddec_out = likelihood_backward(self.config["likelihood"], dlog_w.reshape(n * k), s["lik"])  # (N*k, D)  (LIK.2/4)
        dz = self._decoder_backward(ddec_out, s["dec"], grads)  # (N*k, Z)  (MLP)
        dz_prior, _, dlogvar_q = prior_ratio_backward(dlog_w, s["ratio"])  # (N, k, Z), (N, Z)  (IWAE.4)
        dz += dz_prior.reshape(n * k, z_dim)  # (N*k, Z)  z feeds the decoder and p(z): gradients add
        dmu_k, dlogvar_k = reparameterize_backward(dz, s["rep"])  # (N*k, Z) each  (REP.2, REP.3)
        dmu = dmu_k.reshape(n, k, z_dim).sum(axis=1)  # (N, Z)  the k samples share mu
        dlogvar = dlogvar_k.reshape(n, k, z_dim).sum(axis=1)  # (N, Z)  and logvar
        dlogvar += dlogvar_q  # (N, Z)  logvar also enters log q directly  (IWAE.4)
        denc = np.concatenate([dmu, dlogvar], axis=1)  # (N, 2Z)
        self._encoder_backward(denc, s["enc"], grads)  # x is data: no dx
