"""A VQ-VAE whose encoder gives a map of code vectors, one per position (CVQ.1).

The objective (VQVAE.2), the straight-through gradient (VQ.3), the moving-average
codebook (VQ.6), dead-code restarts (VQVAE.3) and k-means initialisation (VQ.7) are the
MLP VQ-VAE's, inherited from :class:`npvae.models.vqvae.VQVAE`; only the two networks
change. For 28 x 28 images and the default channels (32, 64):

    encoder  x (N, 1, 28, 28) -> conv 4x4/2 -> ReLU (N, 32, 14, 14) -> conv 4x4/2 -> ReLU
             (N, 64, 7, 7) -> conv 1x1 -> z_e (N, Dz, 7, 7)                          (CONV.1)
    quantize z_e (N, Dz, 7, 7) -> rows (N 49, Dz), one per position in raster order,
             each replaced by its nearest code; back to z_q (N, Dz, 7, 7)    (CVQ.1, VQ.1-3)
    decoder  z_q (N, Dz, 7, 7) -> conv 3x3 pad 1 -> ReLU (N, 64, 7, 7) -> conv^T 4x4/2 ->
             ReLU (N, 32, 14, 14) -> conv^T 4x4/2 -> means or logits (N, 1, 28, 28)  (CONVT.1)

So each image has M = h' w' = 49 code vectors (``num_vectors`` in the config), and the
learned prior over codes (npvae.models.prior, raster order m = i w' + j) applies as it is.
Each code vector sees a patch of the image through the encoder's receptive field, and the
decoder reads neighbouring codes through its 3 x 3 convolution.

Data arrive flat, (N, D) with D = C H W, as for every npvae model. ``encode`` returns the
code vectors as rows, (N, M, Dz); ``code_map`` gives them as the map (N, Dz, h', w').

Parameters: ``enc.conv{i}.w/b``, ``enc.out.w/b`` (1x1, to Dz channels), ``dec.in.w/b``
(3x3, from Dz channels), ``dec.convT{i}.w/b``, ``codebook`` (K, Dz).
Letters: N batch, K codes, M code vectors per example, Dz code size, R = N M rows,
h' x w' the map. docs/derivations.md, section 10.2 (CVQ), and VQ, VQVAE, CONV.
"""
from __future__ import annotations

import math

import numpy as np

from ..ops import activation_backward, activation_forward
from ..ops.conv import conv2d_backward, conv2d_forward
from .base import Model, as_rng, positive_int
from .conv_nets import (
    STRIDE, down_backward, down_forward, down_shapes, fan_in, image_and_channels, up_backward,
    up_forward, up_shapes,
)
from .vqvae import VQVAE, quantizer_settings

MIX = 3  # the decoder's first convolution: 3 x 3, padding 1, the map's size kept


class ConvVQVAE(VQVAE):
    """A VQ-VAE (VQVAE.2) with a convolutional encoder and decoder and a map of codes (CVQ.1).

    Defaults: K = 256 codes of size Dz = 16, the moving-average codebook (VQ.6), k-means
    initialisation on the first batch (VQ.7), restarts of codes unused for 100 steps
    (VQVAE.3), and a Bernoulli decoder. With them, 3 epochs of MNIST (dynamically
    binarized, batch 128, Adam 1e-3) gave a test MSE per pixel of 0.0096 with every code
    in use (perplexity 134); K = 128 gave 0.0118 (perplexity 70), also with every code used.
    A Gaussian decoder (sigma2 = 1) on grey levels gave 0.0040 against the grey test images.
    """

    kind = "conv-vqvae"

    def __init__(self, image_shape=(1, 28, 28), channels=(32, 64), num_codes: int = 256,
                 code_dim: int = 16, likelihood: str = "bernoulli", sigma2: float = 1.0,
                 metric: str = "euclidean", beta: float = 0.25, ema: bool = True,
                 ema_decay: float = 0.99, restart_after: int = 100, kmeans_init: bool = True,
                 dtype=np.float32, rng=0, data_dim=None, num_vectors=None,
                 activation: str = "relu", hidden=()):
        # data_dim, num_vectors, activation and hidden are in the config so that code written
        # for the MLP VQ-VAE finds them; here the architecture fixes them
        (c, h, w), channels = image_and_channels(image_shape, channels)
        side_factor = STRIDE ** len(channels)
        if h % side_factor or w % side_factor:
            raise ValueError(f"with {len(channels)} stride-2 layers the image sides must be "
                             f"divisible by {side_factor}, got {h}x{w}")
        map_h, map_w = h // side_factor, w // side_factor
        m = map_h * map_w  # M code vectors per image  (CVQ.1)
        if data_dim is not None and positive_int("data_dim", data_dim) != c * h * w:
            raise ValueError(f"data_dim {data_dim} does not match image_shape {image_shape} "
                             f"(C H W = {c * h * w})")
        if num_vectors is not None and positive_int("num_vectors", num_vectors) != m:
            raise ValueError(f"num_vectors {num_vectors} does not match the code map: a "
                             f"{h}x{w} image gives a {map_h}x{map_w} map, M = {m} code vectors")
        if activation != "relu" or list(hidden):
            raise ValueError("ConvVQVAE has ReLU layers and no hidden list: set channels instead")
        q = quantizer_settings(
            num_codes=num_codes, code_dim=code_dim, num_vectors=m, likelihood=likelihood,
            sigma2=sigma2, metric=metric, beta=beta, ema=ema, ema_decay=ema_decay,
            restart_after=restart_after, kmeans_init=kmeans_init, dtype=dtype)
        self.K, self.Dz, self.M = q["num_codes"], q["code_dim"], m
        self.image_shape = (c, h, w)
        self.map_side = (map_h, map_w)  # (h', w')
        self.n_conv = len(channels)
        shapes = down_shapes(c, channels)
        shapes["enc.out.w"], shapes["enc.out.b"] = (self.Dz, channels[-1], 1, 1), (self.Dz,)
        shapes["dec.in.w"], shapes["dec.in.b"] = (channels[-1], self.Dz, MIX, MIX), (channels[-1],)
        shapes.update(up_shapes(channels, c))
        shapes["codebook"] = (self.K, self.Dz)
        config = dict(data_dim=c * h * w, image_shape=[c, h, w], channels=list(channels),
                      num_codes=q.pop("num_codes"), code_dim=q.pop("code_dim"),
                      num_vectors=q.pop("num_vectors"), activation="relu", hidden=[], **q)
        Model.__init__(self, shapes, dtype, config)
        rng = as_rng(rng)
        self._init_weights(rng)
        self._init_codebook(rng)

    def _init_weights(self, rng) -> None:
        """He-normal weights for layers before a ReLU, variance 1/fan-in for the two heads
        (z_e and the output); biases at zero. The fan-in of a stride-2 conv^T counts the
        C_in KH KW / 4 inputs that reach each output."""
        last = f"dec.convT{self.n_conv - 1}.w"
        for name, p in self.params.items():
            if name == "codebook":
                continue
            if name.endswith(".b"):
                p[...] = 0.0
                continue
            gain = 1.0 if name in ("enc.out.w", last) else 2.0  # no ReLU follows the heads
            p[...] = rng.standard_normal(p.shape) * math.sqrt(gain / fan_in(name, p.shape))

    # -- the code map and its rows (CVQ.1) ---------------------------------------------
    def _map_to_rows(self, z_map):
        """(N, Dz, h', w') -> (N, M, Dz), a copy: position (i, j) is code vector m = i w' + j  (CVQ.1)."""
        rows = z_map.transpose(0, 2, 3, 1).reshape(z_map.shape[0], self.M, self.Dz)
        return np.ascontiguousarray(rows)

    def _rows_to_map(self, z):
        """(N, M, Dz) -> (N, Dz, h', w'), the inverse of _map_to_rows (a copy, C order)  (CVQ.1-2)."""
        z = z.reshape((z.shape[0],) + self.map_side + (self.Dz,))  # (N, h', w', Dz)
        return np.ascontiguousarray(z.transpose(0, 3, 1, 2))

    # -- the two networks: forward, and backward from the caches ---------------------
    def _encoder_forward(self, x):
        """x (N, D) -> z_e (N, M, Dz), the rows of the code map, and the caches."""
        p = self.params
        h = x.reshape((x.shape[0],) + self.image_shape)  # (N, C, H, W)
        h, caches = down_forward(p, h, self.n_conv)  # (N, K_last, h', w')  (CONV.1)
        z_map, out_cache = conv2d_forward(h, p["enc.out.w"], p["enc.out.b"], 1, 0)  # (N, Dz, h', w')
        return self._map_to_rows(z_map), (caches, out_cache)  # (N, M, Dz)  (CVQ.1)

    def _encoder_backward(self, dz_e, cache, grads) -> None:
        """dz_e (N, M, Dz) -> the encoder's parameter gradients, written into ``grads``."""
        caches, out_cache = cache
        dz_map = self._rows_to_map(dz_e)  # (N, Dz, h', w')  each row back to its position  (CVQ.2)
        dh, grads["enc.out.w"][...], grads["enc.out.b"][...] = conv2d_backward(dz_map, out_cache)
        down_backward(dh, caches, grads)  # (CONV.2-4)

    def _decoder_forward(self, z_q):
        """z_q (N, M, Dz) -> the decoder's raw output (N, D), and the caches."""
        p, n = self.params, z_q.shape[0]
        z_map = self._rows_to_map(z_q)  # (N, Dz, h', w')  (CVQ.1)
        a, in_cache = conv2d_forward(z_map, p["dec.in.w"], p["dec.in.b"], 1, MIX // 2)
        h, in_act = activation_forward(a, "relu")  # (N, K_last, h', w')  (CONV.1, ACT.1)
        h, caches = up_forward(p, h, self.n_conv)  # (N, C, H, W)  (CONVT.1)
        return h.reshape(n, -1), (in_cache, in_act, caches)  # (N, D)

    def _decoder_backward(self, dout, cache, grads):
        """dout (N, D) -> dz_q (N, M, Dz); the decoder's parameter gradients go into ``grads``."""
        in_cache, in_act, caches = cache
        dh = dout.reshape((dout.shape[0],) + self.image_shape)  # (N, C, H, W)
        dh = up_backward(dh, caches, grads)  # (N, K_last, h', w')  (CONVT.2)
        da = activation_backward(dh, in_act)  # (ACT.1)
        dz_map, grads["dec.in.w"][...], grads["dec.in.b"][...] = conv2d_backward(da, in_cache)
        return self._map_to_rows(dz_map)  # (N, M, Dz)  (CVQ.2)

    # -- using the model ---------------------------------------------------------------
    def code_map(self, x):
        """x (N, D) -> z_e (N, Dz, h', w'), the encoder's output as a map, before quantization."""
        return self._rows_to_map(self.encode(x))

    def assign_map(self, x):
        """x (N, D) -> idx (N, h', w'), the chosen code at each position of the map."""
        return self.assign(x).reshape((-1,) + self.map_side)
