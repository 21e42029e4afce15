"""The four models of the tutorial, and :func:`build` to remake one from its config."""
from __future__ import annotations

from .autoencoder import Autoencoder
from .base import Model
from .conv_vae import ConvVAE
from .conv_vqvae import ConvVQVAE
from .iwae import IWAE
from .prior import MADEPrior
from .vae import VAE, BernoulliVAE, GaussianVAE
from .vqvae import VQVAE

MODELS = {
    "vae-gaussian": GaussianVAE,
    "vae-bernoulli": BernoulliVAE,
    "vae": VAE,
    "iwae": IWAE,
    "ae": Autoencoder,
    "conv-vae": ConvVAE,
    "vqvae": VQVAE,
    "conv-vqvae": ConvVQVAE,
    "made": MADEPrior,  # the learned prior over a VQ-VAE's codes (npvae train-prior)
}
# The kinds the command line trains, checks and tours ("vae" needs a likelihood named).
KINDS = ("vae-gaussian", "vae-bernoulli", "ae", "vqvae", "conv-vae", "conv-vqvae")


def build(config: dict, rng=0) -> Model:
    """A new model of ``config["kind"]`` with the architecture in ``config`` (fresh init)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in MODELS:
        raise ValueError(f"config kind must be one of {sorted(MODELS)}, got {kind!r}")
    return MODELS[kind](**config, rng=rng)


__all__ = ["Autoencoder", "BernoulliVAE", "ConvVAE", "ConvVQVAE", "GaussianVAE", "IWAE", "KINDS", "MADEPrior", "MODELS", "Model", "VAE", "VQVAE", "build"]
