"""A multilayer perceptron built from the linear layer and the fused bias + activation.

Parameters live in a flat dict under a prefix: ``{prefix}.{i}.W`` (I_i, O_i) and
``{prefix}.{i}.b`` (O_i,) for layer i = 0 .. L-1. Hidden layers use ``activation``;
the last layer uses ``out_activation`` (``identity`` for an encoder head or logits).

    h_0 = x;   a_i = h_i W_i;   h_{i+1} = act_i(a_i + b_i)                      (MLP.1)

Backward runs the layers in reverse, each step one line per gradient (MLP.2):

    da_i = dh_{i+1} * act_i'(h_{i+1})                                          (ACT)
    dW_i = h_i^T da_i;   db_i = sum_n da_i;   dh_i = da_i W_i^T                (LIN.2-4)

Letters: N batch, I/O a layer's input/output sizes. docs/derivations.md, section MLP.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import _validate as v
from .activations import LEAKY_SLOPE, bias_activation_backward, bias_activation_forward
from .linear import input_grad


def mlp_shapes(prefix: str, sizes) -> dict:
    """{name: shape} for an MLP with layer sizes ``sizes`` = (input, hidden..., output)."""
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least an input and an output size >= 1, got {sizes}")
    shapes = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"{prefix}.{i}.W"] = (n_in, n_out)
        shapes[f"{prefix}.{i}.b"] = (n_out,)
    return shapes


def init_scale(n_in: int, n_out: int, activation: str) -> float:
    """Standard deviation of a layer's initial weights.

    He et al. (2015), sqrt(2 / n_in), before a ReLU-like activation; Glorot and Bengio
    (2010), sqrt(2 / (n_in + n_out)), before tanh, sigmoid, softplus or nothing.
    """
    if activation in ("relu", "leaky_relu"):
        return math.sqrt(2.0 / n_in)
    return math.sqrt(2.0 / (n_in + n_out))


def mlp_init(params, prefix: str, activation: str, rng: np.random.Generator) -> None:
    """Fill ``params[prefix.*]`` in place: normal weights at :func:`init_scale`, zero biases."""
    for i in range(num_layers(params, prefix)):
        W = params[f"{prefix}.{i}.W"]
        W[...] = rng.standard_normal(W.shape) * init_scale(*W.shape, activation)
        params[f"{prefix}.{i}.b"][...] = 0.0


def num_layers(params, prefix: str) -> int:
    n = 0
    while f"{prefix}.{n}.W" in params:
        n += 1
    if n == 0:
        raise ValueError(f"params holds no layer named {prefix}.0.W")
    return n


class MLPCache(NamedTuple):
    prefix: str
    inputs: list  # h_i, the input of layer i: (N, I_i), kept for dW_i
    weights: list  # W_i: (I_i, O_i), kept for dh_i
    acts: list  # BiasActCache of layer i: its output h_{i+1} (N, O_i) and activation


def _layer(params, prefix: str, i: int, h):
    """W_i, b_i of layer i, after checking that h (N, I_i) fits them."""
    W, b = params[f"{prefix}.{i}.W"], params[f"{prefix}.{i}.b"]
    if h.shape[1] != W.shape[0]:
        name = "x" if i == 0 else f"the input of {prefix}.{i}"
        raise ValueError(f"{name} has {h.shape[1]} features, {prefix}.{i}.W expects {W.shape[0]}")
    if h.dtype != W.dtype:
        raise ValueError(f"x has dtype {h.dtype} but the parameters are {W.dtype}")
    return W, b


def mlp_forward(params, prefix: str, x, activation: str, out_activation: str = "identity",
                slope: float = LEAKY_SLOPE):
    """x (N, I_0) -> out (N, O_last), with the cache backward needs."""
    v.array("x", x, 2)
    n_layers = num_layers(params, prefix)
    inputs, weights, acts = [], [], []
    h = x
    for i in range(n_layers):
        W, b = _layer(params, prefix, i, h)
        name = out_activation if i == n_layers - 1 else activation
        a = h @ W  # (N, O_i)  (LIN.1, the product; the bias is added below)
        out, act = bias_activation_forward(a, b, name, slope)  # (N, O_i), a new array: see its note  (MLP.1)
        inputs.append(h), weights.append(W), acts.append(act)
        h = out
    return h, MLPCache(prefix, inputs, weights, acts)


def mlp_predict(params, prefix: str, x, activation: str, out_activation: str = "identity",
                slope: float = LEAKY_SLOPE, work: dict | None = None, last_bias: bool = True):
    """x (N, I_0) -> out (N, O_last): the forward pass (MLP.1) alone, for inference.

    Same values as :func:`mlp_forward`, without the cache. ``work`` is a dict in which
    the call keeps its buffers (two per layer) for the next call, so a loop that runs
    the same shapes many times, like the importance-weighted estimate decoding
    thousands of chunks, allocates nothing after its first call. Without it, each
    call's arrays of a few MB are new; glibc serves blocks that size with fresh pages
    from the kernel, and faulting them in took 13% of that estimate's time.

    The result is one of ``work``'s buffers: the next call with the same ``work``
    overwrites it. A ``work`` must not be shared between threads.

    ``last_bias=False`` (with the identity ``out_activation`` only) leaves the last
    layer's bias out: the result is then h_L W_L, for a caller that adds b_L inside a
    pass of its own over the output instead of in one more pass here.
    """
    v.array("x", x, 2)
    if not last_bias and out_activation != "identity":
        raise ValueError(f"last_bias=False needs out_activation='identity', got {out_activation!r}")
    n_layers = num_layers(params, prefix)
    work = {} if work is None else work
    h = x
    for i in range(n_layers):
        W, b = _layer(params, prefix, i, h)
        name = out_activation if i == n_layers - 1 else activation
        a = np.matmul(h, W, out=work_buffer(work, (prefix, i, "a"), (h.shape[0], W.shape[1]), W.dtype))  # (N, O_i)  (LIN.1)
        if i == n_layers - 1 and not last_bias:
            return a  # (N, O_L)  without b_L
        out = work_buffer(work, (prefix, i, "h"), a.shape, a.dtype)
        h, _ = bias_activation_forward(a, b, name, slope, out=out)  # (N, O_i)  (MLP.1)
    return h


def work_buffer(work: dict, key, shape, dtype) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` in the buffer kept at ``work[key]``.

    The buffer is flat and grows only when too small, so a smaller shape (the last chunk
    of a loop) reuses it as a view instead of trading it for a new one.
    """
    size = math.prod(shape)
    buf = work.get(key)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = work[key] = np.empty(size, dtype)
    return buf[:size].reshape(shape)


def mlp_backward(dout, cache: MLPCache, grads=None, need_dx: bool = True):
    """dout (N, O_last) -> (dx (N, I_0) or None, grads).

    ``grads`` is a dict to write ``{prefix}.{i}.W`` / ``.b`` into (for instance views of a
    flat gradient buffer); a new dict is made when it is None. Pass ``need_dx=False``
    when x is data, to skip the first layer's input gradient (a whole matrix product).
    """
    prefix, inputs, weights, acts = cache
    grads = {} if grads is None else grads
    dh = dout
    for i in reversed(range(len(weights))):
        kw, kb = f"{prefix}.{i}.W", f"{prefix}.{i}.b"
        da, grads[kb] = bias_activation_backward(dh, acts[i], db=grads.get(kb))  # (N, O_i), (O_i,)  (ACT, LIN.4)
        grads[kw] = np.matmul(inputs[i].T, da, out=grads.get(kw))  # (I_i, O_i)  (LIN.3)
        if i > 0 or need_dx:
            dh = input_grad(da, weights[i])  # (N, I_i) = da W_i^T  (LIN.2)
    return (dh if need_dx else None), grads
