"""The convolutional models on the command line: ``--channels``, their defaults, their config.

``npvae train --model conv-vae`` (or ``conv-vqvae``) trains a model whose networks are
stride-2 convolutions (:mod:`npvae.models.conv_vae`): ``--channels 16,32`` gives the
channels of the encoder's layers, and the decoder mirrors them. Everything else (the
objective's options, training, checkpoints, eval, sample, plot) is shared with the MLP
kinds. Which kinds are convolutional is asked of the model class (:func:`npvae.kinds.is_conv`).
"""
from __future__ import annotations

import math

from .cli_common import UsageError, _int_list
from .kinds import is_conv, is_vq

# Defaults of a convolutional run that differ from an MLP run's. With channels 16,32 an
# epoch took 18-46 s on two busy shared cores; the whole default conv-vae run (8 epochs, the
# test ELBO, the figures) took 236 s, so it fits in 5 minutes. Channels 32,64 cost about
# ten times as much per step.
CONV_DEFAULTS = {"conv-vae": dict(channels="16,32", epochs=8),
                 # the model's own defaults: moving averages, restarts, k-means, and K = 256
                 # codes. With 49 codes per image 256 reach a test MSE below 0.01 per pixel where
                 # 128 do not (0.0104 after 8 epochs): 0.0105, 0.0096 and 0.0087 after 5, 6 and
                 # 7 epochs, every code used. The default 6-epoch run took 199 s from start to
                 # finish on two busy cores (22-41 s an epoch). npvae train-prior leaves
                 # MADE's direct connection out for these 49 x 256 one-hot inputs (it would
                 # hold 157 million weights): 12.9 million parameters with 512 hidden units.
                 "conv-vqvae": dict(channels="16,32", epochs=6, codes=256, ema=True,
                                    restart_after=100, kmeans_init=True)}
CONV_FALLBACK = dict(channels="16,32", epochs=8)  # a conv kind not listed above


def _channels(text: str) -> str:
    """--channels: '16,32' -> '16,32' (positive integers, one per stride-2 layer)."""
    return _int_list(text, "channel counts like 16,32 (one per layer)", "channel counts")


def add_channels_option(group) -> None:
    """--channels, in the model group of ``npvae train``."""
    group.add_argument("--channels", type=_channels, metavar="C1,C2",
                       help="conv-vae, conv-vqvae: channels of the encoder's 4x4 stride-2 "
                            "convolutions (the decoder mirrors them); each layer halves the "
                            "image side, so 28x28 takes at most 2 (default 16,32)")


def kind_defaults(kind: str) -> dict:
    """The settings a kind's runs default to where they differ from DEFAULTS."""
    if not is_conv(kind):
        return {}
    return dict(CONV_DEFAULTS.get(kind, CONV_FALLBACK))


def image_shape(data_dim: int) -> list:
    """[1, side, side] for data_dim = side^2 grey pixels (MNIST, Fashion-MNIST: 28 x 28)."""
    side = math.isqrt(int(data_dim))
    if side * side != int(data_dim):
        raise UsageError(f"a convolutional model needs square images; the data has "
                         f"{data_dim} values per example")
    return [1, side, side]


def conv_config(s: dict, data_dim: int, warmup_steps: int) -> dict:
    """The config of a convolutional model for a run's settings."""
    kind = s["model"]
    channels = [int(c) for c in str(s["channels"]).split(",")]
    shape = image_shape(data_dim)
    if shape[1] % 2 ** len(channels):
        raise UsageError(f"--channels {s['channels']}: {len(channels)} stride-2 layers need an "
                         f"image side divisible by {2 ** len(channels)}, and these images are "
                         f"{shape[1]}x{shape[2]}; give at most "
                         f"{_layers_that_fit(shape[1])} channel counts")
    cfg = dict(kind=kind, data_dim=int(data_dim), image_shape=shape, channels=channels,
               likelihood=s["likelihood"], sigma2=s["sigma2"], beta=s["beta"], dtype=s["dtype"])
    if is_vq(kind):
        cfg.update(num_codes=s["codes"], code_dim=s["code_dim"], metric=s["metric"],
                   ema=s["ema"], restart_after=s["restart_after"], kmeans_init=s["kmeans_init"])
    else:
        cfg.update(latent=s["latent"], warmup_steps=warmup_steps)
    return cfg


def _layers_that_fit(side: int) -> int:
    layers = 0
    while side % 2 == 0:
        side, layers = side // 2, layers + 1
    return layers
