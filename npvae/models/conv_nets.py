"""The two convolutional stacks that :class:`ConvVAE` and :class:`ConvVQVAE` share.

    down  h (N, C, H, W) -> [conv 4x4/2 -> ReLU] x n -> (N, K_n, H / 2^n, W / 2^n)  (CONV.1)
    up    h (N, K_n, h', w') -> [conv^T 4x4/2 -> ReLU] x (n - 1) -> conv^T 4x4/2
          -> (N, C, H, W), the decoder's raw output: no ReLU after the last layer  (CONVT.1)

Each stride-2 layer halves (or doubles) the side: padding 1 with a 4 x 4 kernel maps
28 -> 14 -> 7 exactly. The layers' parameters are ``enc.conv{i}.w/b`` (down, i = 0 at the
image) and ``dec.convT{i}.w/b`` (up, i = 0 at the map). What each model puts between the
stacks (a dense layer, or a map of codes) is its own. docs/derivations.md, section CONV.
"""
from __future__ import annotations

from ..ops import activation_backward, activation_forward
from ..ops.conv import (
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward,
)
from .base import image_shape_chw, positive_int

KERNEL, STRIDE, PAD = 4, 2, 1  # each layer halves or doubles the side


def image_and_channels(image_shape, channels) -> tuple:
    """``image_shape`` (C, H, W) and ``channels`` as tuples of ints >= 1 (a float, bool or
    string is refused, not truncated), at least one layer. Whether the sides fit the stacks
    is the caller's check."""
    image_shape_chw(image_shape)  # three entries, or a named error
    chw = tuple(positive_int(f"image_shape[{i}]", s) for i, s in enumerate(image_shape))
    channels = tuple(positive_int(f"channels[{i}]", k) for i, k in enumerate(channels))
    if not channels:
        raise ValueError("channels must hold at least one positive integer, got ()")
    return chw, channels


def down_shapes(in_channels: int, channels: tuple) -> dict:
    """The down stack's parameter shapes: enc.conv{i}.w (K_out, K_in, 4, 4), .b (K_out,)."""
    shapes = {}
    for i, (k_in, k_out) in enumerate(zip((in_channels,) + channels[:-1], channels)):
        shapes[f"enc.conv{i}.w"], shapes[f"enc.conv{i}.b"] = (k_out, k_in, KERNEL, KERNEL), (k_out,)
    return shapes


def up_shapes(channels: tuple, out_channels: int) -> dict:
    """The up stack's parameter shapes, mirroring ``channels``: dec.convT{i}.w (K_in, K_out,
    4, 4), .b (K_out,)."""
    shapes, up = {}, channels[::-1] + (out_channels,)
    for i, (k_in, k_out) in enumerate(zip(up[:-1], up[1:])):
        shapes[f"dec.convT{i}.w"], shapes[f"dec.convT{i}.b"] = (k_in, k_out, KERNEL, KERNEL), (k_out,)
    return shapes


def fan_in(name: str, shape) -> float:
    """How many inputs reach one output of the layer whose weight is ``name``: C_in KH KW
    for a convolution, C_in KH KW / 4 for a stride-2 conv^T, the rows of a dense W."""
    if ".convT" in name:
        return shape[0] * shape[2] * shape[3] / (STRIDE * STRIDE)
    if name.endswith(".w"):
        return shape[1] * shape[2] * shape[3]
    return shape[0]


def down_forward(params, h, n_layers: int) -> tuple:
    """h (N, C, H, W) -> (N, K_n, h', w') through the down stack, and its caches."""
    caches = []
    for i in range(n_layers):
        a, conv_cache = conv2d_forward(h, params[f"enc.conv{i}.w"], params[f"enc.conv{i}.b"],
                                       STRIDE, PAD)
        h, act_cache = activation_forward(a, "relu")  # (N, K_i, H_i, W_i)  (CONV.1, ACT.1)
        caches.append((conv_cache, act_cache))
    return h, caches


def down_backward(dh, caches, grads) -> None:
    """dh (N, K_n, h', w') -> the down stack's parameter gradients, written into ``grads``.
    Its input is the data, which gets no gradient."""
    for i in reversed(range(len(caches))):
        conv_cache, act_cache = caches[i]
        da = activation_backward(dh, act_cache)  # (ACT.1)
        dh, grads[f"enc.conv{i}.w"][...], grads[f"enc.conv{i}.b"][...] = \
            conv2d_backward(da, conv_cache, need_dx=i > 0)  # x is data: no dx  (CONV.2-4)


def up_forward(params, h, n_layers: int) -> tuple:
    """h (N, K_n, h', w') -> (N, C, H, W) through the up stack, and its caches."""
    caches = []
    for i in range(n_layers):
        a, conv_cache = conv_transpose2d_forward(h, params[f"dec.convT{i}.w"],
                                                 params[f"dec.convT{i}.b"], STRIDE, PAD)  # (CONVT.1)
        act_cache = None
        if i < n_layers - 1:
            a, act_cache = activation_forward(a, "relu")
        caches.append((conv_cache, act_cache))
        h = a
    return h, caches


def up_backward(dh, caches, grads):
    """dh (N, C, H, W) -> the gradient at the up stack's input (N, K_n, h', w'); the
    stack's parameter gradients are written into ``grads``."""
    for i in reversed(range(len(caches))):
        conv_cache, act_cache = caches[i]
        if act_cache is not None:
            dh = activation_backward(dh, act_cache)  # (ACT.1)
        dh, grads[f"dec.convT{i}.w"][...], grads[f"dec.convT{i}.b"][...] = \
            conv_transpose2d_backward(dh, conv_cache)  # (CONVT.2)
    return dh
