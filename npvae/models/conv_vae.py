"""A VAE with a convolutional encoder and a transposed-convolution decoder.

The objective is the VAE's (OBJ.1): a Bernoulli or Gaussian decoder, the closed-form KL,
one reparameterized sample. Only the two networks change. For 28 x 28 images and the
default channels (32, 64):

    encoder  x (N, 1, 28, 28) -> conv 4x4/2 -> ReLU (N, 32, 14, 14) -> conv 4x4/2 -> ReLU
             (N, 64, 7, 7) -> flatten (N, 3136) -> dense -> [mu, logvar] (N, 2Z)     (CONV.1)
    decoder  z (N, Z) -> dense -> ReLU (N, 3136) -> (N, 64, 7, 7) -> conv^T 4x4/2 -> ReLU
             (N, 32, 14, 14) -> conv^T 4x4/2 -> logits or means (N, 1, 28, 28)        (CONVT.1)

Each stride-2 layer halves (or doubles) the side: padding 1 with a 4 x 4 kernel maps
28 -> 14 -> 7 exactly, so the image side must be divisible by 4. Data arrive flat, (N, D)
with D = C H W, as for every npvae model, and are reshaped here.
The two convolutional stacks are :mod:`npvae.models.conv_nets`, shared with the conv VQ-VAE.

Parameters: ``enc.conv{i}.w/b``, ``enc.fc.W/b``, ``dec.fc.W/b``, ``dec.convT{i}.w/b``.
docs/derivations.md, sections CONV and VAE.
"""
from __future__ import annotations

import math

import numpy as np

from .. import _validate as v
from ..ops import activation_backward, activation_forward, linear_backward, linear_forward
from .base import ContinuousLatentModel, as_rng, check_likelihood, positive_int
from .conv_nets import (
    STRIDE, down_backward, down_forward, down_shapes, fan_in, image_and_channels, up_backward,
    up_forward, up_shapes,
)
from .vae import VAE


class ConvVAE(VAE):
    """A VAE (OBJ.1) whose encoder and decoder are convolutional; see the module docstring.

    Only the four network methods below differ from :class:`VAE`: the objective, its
    reverse chain, ``encode`` and ``decoder_output`` are the VAE's own.
    """

    kind = "conv-vae"

    def __init__(self, image_shape=(1, 28, 28), channels=(32, 64), latent: int = 20,
                 likelihood: str = "bernoulli", sigma2: float = 1.0, beta: float = 1.0,
                 warmup_steps: int = 0, dtype=np.float32, rng=0, data_dim=None,
                 free_bits: float = 0.0, activation: str = "relu", hidden=()):
        # data_dim, free_bits, activation and hidden are in the config so that code written
        # for the MLP VAE finds them; here they are fixed by the architecture
        (c, h, w), channels = image_and_channels(image_shape, channels)
        if data_dim is not None and positive_int("data_dim", data_dim) != c * h * w:
            raise ValueError(f"data_dim {data_dim} does not match image_shape {image_shape}")
        if free_bits or activation != "relu" or list(hidden):
            raise ValueError("ConvVAE has ReLU layers, no hidden list and no free bits")
        latent = positive_int("latent", latent)
        side_factor = STRIDE ** len(channels)
        if h % side_factor or w % side_factor:
            raise ValueError(f"with {len(channels)} stride-2 layers the image sides must be "
                             f"divisible by {side_factor}, got {h}x{w}")
        beta = v.nonnegative("beta", beta)
        if not (v.is_integer(warmup_steps) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        sigma2 = check_likelihood(likelihood, sigma2, dtype)
        self.latent = latent
        self.image_shape = (c, h, w)
        self.map_shape = (channels[-1], h // side_factor, w // side_factor)  # (K, h', w')
        flat = int(np.prod(self.map_shape))
        shapes = down_shapes(c, channels)
        shapes["enc.fc.W"], shapes["enc.fc.b"] = (flat, 2 * self.latent), (2 * self.latent,)
        shapes["dec.fc.W"], shapes["dec.fc.b"] = (self.latent, flat), (flat,)
        shapes.update(up_shapes(channels, c))
        config = dict(data_dim=c * h * w, image_shape=[c, h, w], channels=list(channels),
                      latent=self.latent, likelihood=likelihood, sigma2=sigma2, beta=float(beta),
                      warmup_steps=int(warmup_steps), free_bits=0.0, activation="relu",
                      hidden=[])
        ContinuousLatentModel.__init__(self, shapes, dtype, config)
        self.n_conv = len(channels)
        self._init_weights(as_rng(rng))

    def _init_weights(self, rng):
        """He-normal weights for layers before a ReLU (fan-in C KH KW), Glorot for the
        heads; biases at zero."""
        for name, p in self.params.items():
            if name.endswith(".b"):
                p[...] = 0.0
                continue
            head = name in ("enc.fc.W", f"dec.convT{self.n_conv - 1}.w")  # no ReLU follows
            std = math.sqrt((1.0 if head else 2.0) / fan_in(name, p.shape))
            p[...] = rng.standard_normal(p.shape) * std

    # -- the two networks: forward, and backward from the caches ---------------------
    def _encoder_forward(self, x):
        """x (N, D) -> enc (N, 2Z), caches."""
        p = self.params
        h = x.reshape((x.shape[0],) + self.image_shape)  # (N, C, H, W)
        h, caches = down_forward(p, h, self.n_conv)  # (N, K, h', w')  (CONV.1)
        enc, fc_cache = linear_forward(h.reshape(h.shape[0], -1), p["enc.fc.W"], p["enc.fc.b"])
        return enc, (caches, fc_cache, h.shape)  # (N, 2Z)  (LIN.1)

    def _encoder_backward(self, denc, cache, grads):
        caches, fc_cache, map_shape = cache
        dflat, grads["enc.fc.W"][...], grads["enc.fc.b"][...] = linear_backward(denc, fc_cache)
        down_backward(dflat.reshape(map_shape), caches, grads)  # (N, K, h', w')  (LIN.2-4)

    def _decoder_forward(self, z):
        """z (N, Z) -> the decoder's raw output (N, D), caches."""
        p = self.params
        a, fc_cache = linear_forward(z, p["dec.fc.W"], p["dec.fc.b"])  # (N, K h' w')  (LIN.1)
        h, fc_act = activation_forward(a, "relu")
        h = h.reshape((z.shape[0],) + self.map_shape)  # (N, K, h', w')
        h, caches = up_forward(p, h, self.n_conv)  # (N, C, H, W)  (CONVT.1)
        return h.reshape(z.shape[0], -1), (fc_cache, fc_act, caches)  # (N, D)

    def _decoder_backward(self, dout, cache, grads):
        fc_cache, fc_act, caches = cache
        dh = up_backward(dout.reshape((dout.shape[0],) + self.image_shape), caches, grads)
        da = activation_backward(dh.reshape(dh.shape[0], -1), fc_act)  # (ACT.1)
        dz, grads["dec.fc.W"][...], grads["dec.fc.b"][...] = linear_backward(da, fc_cache)
        return dz  # (N, Z)  (LIN.2)
