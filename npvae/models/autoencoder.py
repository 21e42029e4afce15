"""The autoencoder as the tutorial derives it (section 5, eqs. 13-14) (T.13-14).

Fix the encoder's variance at I: q(z|x) = N(Enc(x), I). The KL to N(0, I) with
logvar = 0 is (KL.1) with the variance terms cancelling:

    KL = (||Enc(x)||^2 + Z - 0 - Z) / 2 = ||Enc(x)||^2 / 2                    (AE.1)

so the negative ELBO is the reconstruction term plus an L2 penalty on the code:

    loss = -log p(x|z) + w ||Enc(x)||^2 / 2                                    (AE.2)

    sampled:        z = Enc(x) + eps,  eps ~ N(0, I)   (the derivation as written)
    deterministic:  z = Enc(x)                         (the usual autoencoder)

For a Gaussian decoder with sigma2 = 1, -log p(x|z) = ||x - Dec(z)||^2 / 2 + (D/2) log 2 pi,
so (AE.2) is half of the tutorial's (14) plus a constant. w is the KL weight of
(OBJ.2); w = 0 gives a plain autoencoder. docs/derivations.md, section AE.
"""
from __future__ import annotations

import numpy as np

from .base import (
    ContinuousLatentModel, Forward, trusted, as_rng, kl_weight, likelihood_backward,
    likelihood_forward,
)


class Autoencoder(ContinuousLatentModel):
    """Encoder MLP x (N, D) -> code (N, Z); decoder MLP code -> output (N, D)."""

    kind = "ae"

    def __init__(self, data_dim: int = 784, hidden=(400,), latent: int = 20,
                 activation: str = "relu", likelihood: str = "bernoulli", sigma2: float = 1.0,
                 sampled: bool = False, beta: float = 1.0, warmup_steps: int = 0,
                 dtype=np.float32, rng=0):
        self._build(data_dim, hidden, latent, int(latent), activation, likelihood, sigma2, beta,
                    warmup_steps, dtype, rng, sampled=bool(sampled))

    def forward(self, x, *, rng=None, eps=None, step=None) -> Forward:
        """The forward chain. eps (N, Z) fixes the noise of the sampled form."""
        cfg = self.config
        x = self.check_x(x)
        n = x.shape[0]
        w = kl_weight(cfg["beta"], cfg["warmup_steps"], step)

        with trusted():  # x was checked above: the ops need not scan it again
            code, enc_cache = self._encoder_forward(x)  # (N, Z)
            if cfg["sampled"]:
                z = code + self.noise((n, self.latent), rng, eps)  # (N, Z)  (REP.1) with logvar = 0
            else:
                z = code  # (N, Z)
            dec_out, dec_cache = self._decoder_forward(z)  # (N, D)
            logp, lik_cache = likelihood_forward(cfg["likelihood"], dec_out, x, cfg["sigma2"])  # (N,)
            l2 = 0.5 * np.einsum("nz,nz->n", code, code)  # (N,)  (AE.1)
            recon = -logp.mean()
            loss = recon + w * l2.mean()  # ()  (AE.2)
            self.check_loss(loss, x)

        stats = dict(loss=float(loss), recon=float(recon), kl=float(l2.mean()),
                     elbo=float((logp - l2).mean()), kl_weight=w)
        saved = dict(n=n, w=w, code=code, enc=enc_cache, dec=dec_cache, lik=lik_cache)
        return Forward(float(loss), stats, saved)

    def _reverse(self, s, grads) -> None:
        """The reverse chain, from the caches ``s`` of :meth:`forward`, into ``grads``."""
        n, w = s["n"], s["w"]
        dlogp = np.full(n, -1.0 / n, dtype=self.dtype)  # (N,)
        ddec_out = likelihood_backward(self.config["likelihood"], dlogp, s["lik"])  # (N, D)  (LIK.2/4)
        dz = self._decoder_backward(ddec_out, s["dec"], grads)  # (N, Z); dz/dcode = I  (REP.2)
        dcode = dz + (w / n) * s["code"]  # (N, Z)  the L2 term's gradient, added  (AE.3)
        self._encoder_backward(dcode, s["enc"], grads)

    def encode(self, x):
        """x (N, D) -> the code Enc(x) (N, Z), the mean of q(z|x)."""
        x = self.check_x(x)
        code, _ = self._encoder_forward(x)
        return code

    def reconstruct(self, x, rng=None):
        z = self.encode(x)
        if rng is not None and self.config["sampled"]:
            z = z + as_rng(rng).standard_normal(z.shape, dtype=self.dtype)
        return self.decode(z)
