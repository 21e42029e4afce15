"""The tours of the convolutional models (``npvae tour conv-vae``, ``conv-vqvae``), node by node.

The convolutional VAE (:class:`npvae.models.ConvVAE`) is the VAE's chain of
:mod:`npvae.tour` with :data:`CONV_VAE_NETWORKS`: the encoder is stride-2 convolutions
(CONV.1), each followed by a ReLU (ACT.1), then a dense layer to [mu, logvar]; the
decoder is a dense layer and a ReLU, then stride-2 transposed convolutions (CONVT.1), a
ReLU after each but the last. The convolutional VQ-VAE
(:class:`npvae.models.ConvVQVAE`) is the VQ-VAE's chain of :mod:`npvae.tour` with
:data:`CONV_VQ_NETWORKS`: a 1 x 1 convolution to a map of code vectors, read as rows
in raster order (CVQ.1), and from the chosen codes' map a 3 x 3 convolution and ReLU
before the transposed convolutions.

Each layer is an op pair checked by :class:`npvae.tour_chain._Chain` like every other
node: the convolution sends back dx (CONV.2), dw (CONV.3) and db (CONV.4), the transposed
convolution dx, dw (CONVT.2) and db (CONV.4), the map-to-rows permutation its inverse
(CVQ.2). A reshape between a map and one row per example computes nothing; the nodes'
notes say where one happens.

The tour's models are tiny and float64 so that every node can be checked by central
differences in a second: 1 x 8 x 8 images, channels (2, 3), two latents or K = 8 codes
of size 2 on a 2 x 2 map:

    x (N, 1, 8, 8) -> conv -> (N, 2, 4, 4) -> conv -> (N, 3, 2, 2) -> dense -> (N, 4)
    z (N, 2) -> dense -> (N, 12) = (N, 3, 2, 2) -> conv^T -> (N, 2, 4, 4) -> conv^T -> (N, 1, 8, 8)

Letters: N batch, C channels, F filters, H x W a map's size, Z latent size, M code
vectors per example, Dz code size.
"""
from __future__ import annotations

import math
import textwrap
from functools import partial

import numpy as np

from .kinds import is_vq
from .models.conv_nets import KERNEL, PAD, STRIDE
from .models.conv_vqvae import MIX
from .ops.activations import activation_backward, activation_forward
from .ops.conv import (
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward,
)
from .ops.linear import linear_backward, linear_forward
from .tour_chain import Networks, _d, _shape, _summary

CHANNELS, LATENT = (2, 3), 2  # the tour's model, on 1 x 8 x 8 images by default
RELU = (partial(activation_forward, name="relu"), activation_backward)
KINK_MARGIN = 1e-3  # every ReLU input of the tour's step is at least this far from 0 (10 h)


def _dims(shape) -> str:
    """(N, C, H, W) -> "CxHxW"."""
    return "x".join(str(s) for s in shape[1:])


# ----------------------------------------------------------------------------------
# The layers: each a node (or two) forward, and the same nodes in reverse


def _geometry(layer):
    """(transposed, kernel, stride, pad) of a layer: the stride-2 layers that halve or
    double the side, the conv VQ-VAE's 1 x 1 convolution to z_e and 3 x 3 one from z_q."""
    if layer == "enc.out":
        return False, 1, 1, 0
    if layer == "dec.in":
        return False, MIX, 1, MIX // 2
    return ".convT" in layer, KERNEL, STRIDE, PAD


def _conv_name(layer):
    transposed = _geometry(layer)[0]
    return (f"{layer} transposed convolution a = conv^T(h, w) + b" if transposed
            else f"{layer} convolution a = conv(h, w) + b")


def _conv_node(c, model, layer, h, h_name, first=False):
    """One (transposed) convolution node; returns its output a (N, F, H', W')."""
    transposed, k, s, pad = _geometry(layer)
    w, b = f"{layer}.w", f"{layer}.b"
    shape = f"{k}x{k} kernel, stride {s}, pad {pad}"
    if not transposed:
        op = (partial(conv2d_forward, stride=s, pad=pad),
              partial(conv2d_backward, need_dx=not first))
        tags = ("CONV.3", "CONV.4") if first else ("CONV.2", "CONV.3", "CONV.4")
        si = "" if s == 1 else str(s)
        window = f"hp[n,c,{si}i+k,{si}j+l]"
        formula = (f"a[n,f,i,j] = b[f] + sum_(c,k,l) w[f,c,k,l] {window}, hp = h padded, {shape}"
                   f"  (CONV.1)")
        gradient = (f"dw[f,c,k,l] = sum_(n,i,j) da[n,f,i,j] {window}  (CONV.3);  db = "
                    f"sum_(n,i,j) da  (CONV.4)" + ("; x is data: no dx" if first else
                                                  ";  dh: each da spread back over its window  "
                                                  "(CONV.2)"))
    else:
        op = (partial(conv_transpose2d_forward, stride=s, pad=pad), conv_transpose2d_backward)
        tags = ("CONVT.2", "CONV.4")
        formula = (f"a = conv^T(h, w) + b: each h[n,c,i,j] adds h[n,c,i,j] w[c] onto the "
                   f"window at ({s}i-{pad}, {s}j-{pad}), {shape}  (CONVT.1)")
        gradient = ("dh = conv(da, w), the convolution (CONV.1) of da;  dw = sum h * windows "
                    "of da  (CONVT.2);  db = sum_(n,i,j) da  (CONV.4)")
    p = model.params
    return c.forward(_conv_name(layer), tags, op, {h_name: h, w: p[w], b: p[b]},
                     formula=formula, gradient=gradient,
                     value=lambda a: f"{layer}.a {_summary(a)}")


def _conv_backward(c, layer, da, h_name, first=False, note=""):
    """The backward of a convolution node; returns dh (None for the first layer)."""
    dh, _, _ = c.backward(_conv_name(layer), da, ((_d(f"{layer}.a"), da),),
                          (None if first else h_name, f"{layer}.w", f"{layer}.b"),
                          note="x is data: its gradient is not needed" if first else note)
    return dh


def _relu_node(c, layer, a):
    return c.forward(f"{layer} relu", ("ACT.1",), RELU, {f"{layer}.a": a},
                     formula="h = relu(a) = max(a, 0)  (ACT.1)",
                     gradient="da = dh * [h > 0]  (ACT.1)",
                     value=lambda h: f"{layer}.out {_summary(h)}")


def _relu_backward(c, layer, dh):
    (da,) = c.backward(f"{layer} relu", dh, ((_d(f"{layer}.out"), dh),), (f"{layer}.a",))
    return da


def _down(c, model, x):
    """x (N, D) -> the last stride-2 map (N, K, h', w'), conv and ReLU nodes; its name."""
    h, h_name = x.reshape((x.shape[0],) + model.image_shape), "x"  # (N, C, H, W)
    for i in range(model.n_conv):
        a = _conv_node(c, model, f"enc.conv{i}", h, h_name, first=i == 0)
        h, h_name = _relu_node(c, f"enc.conv{i}", a), f"enc.conv{i}.out"
    return h, h_name


def _down_backward(c, model, dh):
    """The gradient of the last stride-2 map -> the encoder's conv gradients, last first."""
    for i in reversed(range(model.n_conv)):
        da = _relu_backward(c, f"enc.conv{i}", dh)
        dh = _conv_backward(c, f"enc.conv{i}", da, f"enc.conv{i - 1}.out", first=i == 0)


def _up(c, model, h, h_name):
    """A map (N, K, h', w') -> the decoder's raw output (N, D): conv^T nodes, ReLU between."""
    n = h.shape[0]
    for i in range(model.n_conv):
        a = _conv_node(c, model, f"dec.convT{i}", h, h_name)
        if i == model.n_conv - 1:
            return a.reshape(n, -1)  # (N, D): the logits or means, one row per example
        h, h_name = _relu_node(c, f"dec.convT{i}", a), f"dec.convT{i}.out"


def _up_backward(c, model, dout, in_name, out_name):
    """dout (N, D) -> the gradient of the map the first conv^T read; conv^T gradients."""
    n = dout.shape[0]
    dh = dout.reshape((n,) + model.image_shape)  # (N, C, H, W)
    for i in reversed(range(model.n_conv)):
        last = i == model.n_conv - 1
        if not last:
            dh = _relu_backward(c, f"dec.convT{i}", dh)
        layer = f"dec.convT{i}"
        upstream = (_d(out_name) if last else _d(f"{layer}.a"), dh)
        dh, _, _ = c.backward(_conv_name(layer), dh, (upstream,),
                              (in_name if i == 0 else f"dec.convT{i - 1}.out", f"{layer}.w",
                               f"{layer}.b"),
                              note=f"its output {_shape((n,) + model.image_shape)} is {out_name}, "
                                   f"read as rows of {math.prod(model.image_shape)}" if last
                              else "")
    return dh


# ----------------------------------------------------------------------------------
# The convolutional VAE's networks


def _encoder_forward(c, model, x):
    """x (N, D) -> enc.out (N, 2Z), node by node."""
    p, n = model.params, x.shape[0]
    h, h_name = _down(c, model, x)
    return c.forward("enc.fc linear enc.out = h W + b", ("LIN.2", "LIN.3", "LIN.4"),
                     (linear_forward, linear_backward),
                     {h_name: h.reshape(n, -1), "enc.fc.W": p["enc.fc.W"],
                      "enc.fc.b": p["enc.fc.b"]},
                     formula="enc.out = h W + b, h the last map read as one row per example  "
                             "(LIN.1)",
                     gradient="dh = dout W^T  (LIN.2);  dW = h^T dout  (LIN.3);  db = sum_n "
                              "dout  (LIN.4)", value=lambda e: f"enc.out {_summary(e)}")


def _encoder_backward(c, model, denc):
    """denc (N, 2Z) -> the encoder's parameter gradients, last node first."""
    n, last = denc.shape[0], f"enc.conv{model.n_conv - 1}.out"
    map_shape = (n,) + model.map_shape
    dflat, _, _ = c.backward("enc.fc linear enc.out = h W + b", denc, (("denc.out", denc),),
                             (last, "enc.fc.W", "enc.fc.b"),
                             note=f"{last} {_shape(map_shape)} enters as rows of "
                                  f"{math.prod(model.map_shape)}; its gradient is reshaped "
                                  f"back to {_shape(map_shape)}")
    _down_backward(c, model, dflat.reshape(map_shape))  # (N, K, h', w')


def _decoder_forward(c, model, z, out_name):
    """z (N, Z) -> the decoder's raw output (N, D), node by node."""
    p, n = model.params, z.shape[0]
    a = c.forward("dec.fc linear a = z W + b", ("LIN.2", "LIN.3", "LIN.4"),
                  (linear_forward, linear_backward),
                  {"z": z, "dec.fc.W": p["dec.fc.W"], "dec.fc.b": p["dec.fc.b"]},
                  formula="a = z W + b  (LIN.1)",
                  gradient="dz = da W^T  (LIN.2);  dW = z^T da  (LIN.3);  db = sum_n da  (LIN.4)",
                  value=lambda a: f"dec.fc.a {_summary(a)}")
    h = _relu_node(c, "dec.fc", a)
    return _up(c, model, h.reshape((n,) + model.map_shape), "dec.map")  # (N, K, h', w') in


def _decoder_backward(c, model, dout, out_name):
    """dout (N, D) -> dz (N, Z); the decoder's parameter gradients, last node first."""
    n = dout.shape[0]
    dflat = _up_backward(c, model, dout, "dec.map", out_name).reshape(n, -1)  # (N, K h' w')
    (da,) = c.backward("dec.fc relu", dflat, (("d(dec.fc.out)", dflat),), ("dec.fc.a",),
                       note=f"its output (N, {math.prod(model.map_shape)}) is read as the map "
                            f"dec.map {_shape((n,) + model.map_shape)}; the map's gradient is "
                            f"read back as rows")
    dz, _, _ = c.backward("dec.fc linear a = z W + b", da, ((_d("dec.fc.a"), da),),
                          ("z", "dec.fc.W", "dec.fc.b"))
    return dz


CONV_VAE_NETWORKS = Networks(_encoder_forward, _encoder_backward, _decoder_forward,
                             _decoder_backward)


# ----------------------------------------------------------------------------------
# The convolutional VQ-VAE's networks: z_e and z_q travel as (N, M Dz), as in npvae.tour


def map_to_rows_forward(z_map):
    """z_map (N, Dz, h', w') -> (N, M Dz): position (i, j) is code vector m = i w' + j  (CVQ.1)."""
    n = z_map.shape[0]
    return np.ascontiguousarray(z_map.transpose(0, 2, 3, 1)).reshape(n, -1), z_map.shape


def map_to_rows_backward(drows, shape):
    """drows (N, M Dz) -> dz_map (N, Dz, h', w'), each row's gradient at its position  (CVQ.2)."""
    n, dz, h, w = shape
    return np.ascontiguousarray(drows.reshape(n, h, w, dz).transpose(0, 3, 1, 2))


def rows_to_map_forward(rows, shape):
    """rows (N, M Dz) -> (N, Dz, h', w') with shape = (Dz, h', w'): the rows put back  (CVQ.1)."""
    dz, h, w = shape
    z_map = np.ascontiguousarray(rows.reshape(-1, h, w, dz).transpose(0, 3, 1, 2))
    return z_map, z_map.shape


def rows_to_map_backward(dmap, shape):
    """dmap (N, Dz, h', w') -> drows (N, M Dz), the rows' gradients in raster order  (CVQ.2)."""
    return map_to_rows_forward(dmap)[0], None


TO_ROWS, TO_MAP = "code map read as M rows, raster order", "the rows put back on the map"


def _vq_encoder_forward(c, model, x):
    """x (N, D) -> z_e (N, M Dz): stride-2 convolutions, a 1 x 1 one to Dz channels, rows."""
    h, h_name = _down(c, model, x)
    z_map = _conv_node(c, model, "enc.out", h, h_name)  # (N, Dz, h', w')
    return c.forward(TO_ROWS, ("CVQ.2",), (map_to_rows_forward, map_to_rows_backward),
                     {"enc.out.a": z_map},
                     formula=f"z_e[n, m] = z_map[n, :, i, j], m = i w' + j, M = "
                             f"{model.M}  (CVQ.1)",
                     gradient="dz_map[n, :, i, j] = dz_e[n, m]: the inverse permutation  (CVQ.2)",
                     value=lambda z: f"z_e {_summary(z)}")


def _vq_encoder_backward(c, model, dz_e):
    """dz_e (N, M Dz) -> the encoder's parameter gradients, last node first."""
    (dz_map,) = c.backward(TO_ROWS, dz_e, (("dz_e", dz_e),), ("enc.out.a",))
    dh = _conv_backward(c, "enc.out", dz_map, f"enc.conv{model.n_conv - 1}.out")
    _down_backward(c, model, dh)


def _vq_decoder_forward(c, model, z_q, out_name):
    """z_q (N, M Dz) -> the decoder's raw output (N, D): the map, a 3 x 3 convolution and
    ReLU, then the transposed convolutions."""
    z_map = c.forward(TO_MAP, ("CVQ.2",),
                      (partial(rows_to_map_forward, shape=(model.Dz,) + model.map_side),
                       rows_to_map_backward), {"z_q": z_q},
                      formula="z_q.map[n, :, i, j] = z_q[n, m], m = i w' + j  (CVQ.1)",
                      gradient="dz_q[n, m] = dz_q.map[n, :, i, j]  (CVQ.2)",
                      value=lambda z: f"z_q.map {_summary(z)}")
    a = _conv_node(c, model, "dec.in", z_map, "z_q.map")
    return _up(c, model, _relu_node(c, "dec.in", a), "dec.in.out")


def _vq_decoder_backward(c, model, dout, out_name):
    """dout (N, D) -> dz_q (N, M Dz); the decoder's parameter gradients, last node first."""
    dh = _up_backward(c, model, dout, "dec.in.out", out_name)
    dz_map = _conv_backward(c, "dec.in", _relu_backward(c, "dec.in", dh), "z_q.map")
    dz_q, _ = c.backward(TO_MAP, dz_map, (("dz_q.map", dz_map),), ("z_q", None))
    return dz_q


CONV_VQ_NETWORKS = Networks(_vq_encoder_forward, _vq_encoder_backward, _vq_decoder_forward,
                            _vq_decoder_backward)


# ----------------------------------------------------------------------------------
# The tour's model and its title


def conv_tour_model(kind: str, data_dim: int = 64, batch: int = 4, seed: int = 0, *,
                    likelihood: str | None = None, metric: str | None = None):
    """A tiny float64 model of a convolutional ``kind``, a batch x and noise eps.

    Images 1 x side x side with side^2 = data_dim (default 8 x 8; side divisible by 4),
    channels (2, 3), biases drawn from N(0, 0.1^2); two latents, or for a VQ-VAE K = 8
    codes of size 2 (a 2 x 2 map: M = 4), learned by their loss (no moving averages,
    restarts or k-means). x (batch, data_dim) holds grey levels drawn uniformly from
    (0.05, 0.95) with ``seed``; eps (batch, 2) is standard normal (None for a VQ-VAE).
    """
    from .models import build

    side = math.isqrt(int(data_dim))
    if side * side != int(data_dim) or side % STRIDE ** len(CHANNELS):
        raise ValueError(f"{kind} takes square images whose side is divisible by "
                         f"{STRIDE ** len(CHANNELS)} (data_dim 64, 144, 256, ...), got data_dim "
                         f"{data_dim}")
    vq = is_vq(kind)
    if metric is not None and not vq:
        raise ValueError(f"metric (--metric) is for a VQ-VAE, not {kind}")
    rng = np.random.default_rng(seed)
    cfg = dict(kind=kind, image_shape=[1, side, side], channels=list(CHANNELS),
               likelihood=likelihood or "bernoulli", dtype="float64")
    if vq:
        cfg.update(num_codes=8, code_dim=2, metric=metric or "euclidean", ema=False,
                   restart_after=0, kmeans_init=False)
    else:
        cfg.update(latent=LATENT)
    model = build(cfg, rng=seed)
    for _ in range(1000):  # a few draws at most: keep every ReLU input off its kink at 0
        for name, p in model.params.items():  # biases start at 0: draw them, so that a map
            if name.endswith(".b"):  # no input reaches is not at the kink, and a wrong db
                p[...] = rng.normal(scale=0.1, size=p.shape)  # cannot hide
        x = rng.uniform(0.05, 0.95, size=(int(batch), side * side))
        eps = None if vq else rng.standard_normal((int(batch), LATENT))
        if _kink_margin(model, x, eps) > KINK_MARGIN:
            break
    return model, x, eps


def _kink_margin(model, x, eps) -> float:
    """The smallest |a| over every ReLU input a of the step: central differences across
    the kink at 0 would see a slope of 1/2 where the derivative is 0 or 1."""
    p, n = model.params, x.shape[0]
    conv = partial(conv2d_forward, stride=STRIDE, pad=PAD)
    h, inputs = x.reshape((n,) + model.image_shape), []
    for i in range(model.n_conv):
        inputs.append(conv(h, p[f"enc.conv{i}.w"], p[f"enc.conv{i}.b"])[0])
        h = np.maximum(inputs[-1], 0.0)  # (N, K_i, H_i, W_i)
    if is_vq(model):  # z_e, its codes, the map of codes, then dec.in's 3 x 3 convolution
        idx = model.assign(x)  # (N, M)
        z_map = map_to_rows_backward(p["codebook"][idx].reshape(n, -1),
                                     (n, model.Dz) + model.map_side)  # (N, Dz, h', w')
        a, _ = conv2d_forward(z_map, p["dec.in.w"], p["dec.in.b"], 1, MIX // 2)
    else:  # mu and logvar, z, and the dense layer
        enc, _ = linear_forward(h.reshape(n, -1), p["enc.fc.W"], p["enc.fc.b"])  # (N, 2Z)
        z = enc[:, :model.latent] + eps * np.exp(0.5 * enc[:, model.latent:])  # (N, Z)  (REP.1)
        a, _ = linear_forward(z, p["dec.fc.W"], p["dec.fc.b"])
    inputs.append(a)
    h = np.maximum(a, 0.0)
    if not is_vq(model):
        h = h.reshape((n,) + model.map_shape)  # (N, K, h', w')
    for i in range(model.n_conv - 1):  # the last transposed convolution has no ReLU
        inputs.append(conv_transpose2d_forward(h, p[f"dec.convT{i}.w"], p[f"dec.convT{i}.b"],
                                               STRIDE, PAD)[0])
        h = np.maximum(inputs[-1], 0.0)
    return min(float(np.abs(a).min()) for a in inputs)


def conv_title(model, x) -> str:
    """What the tour walks: the batch, the likelihood, and the two networks' shapes."""
    cfg, n = model.config, x.shape[0]
    shapes = [model.image_shape]
    for k in cfg["channels"]:
        c, h, w = shapes[-1]
        shapes.append((k, h // STRIDE, w // STRIDE))
    maps = [_dims((n,) + s) for s in shapes]
    down = " -> ".join(f"conv {KERNEL}x{KERNEL}/{STRIDE} + relu -> {m}" for m in maps[1:])
    last = "logits" if cfg["likelihood"] == "bernoulli" else "means"
    back = maps[::-1]
    up = " -> ".join(f"conv^T {KERNEL}x{KERNEL}/{STRIDE}" + (" + relu" if i < len(back) - 2 else "")
                     + f" -> {m}" for i, m in enumerate(back[1:])) + f" {last}"
    extra = ""
    if is_vq(model):
        z = _dims((n, model.Dz) + model.map_side)
        side = "x".join(map(str, model.map_side))
        extra = (f", {model.K} codes of size {model.Dz}, {model.M} per example (a {side} map), "
                 f"{cfg['metric']} assignment")
        encoder = (f"encoder {maps[0]} -> {down} -> conv 1x1 -> {z} = z_e, {model.M} rows of "
                   f"{model.Dz}")
        decoder = f"decoder z_q {z} -> conv {MIX}x{MIX} + relu -> {back[0]} -> {up}"
    else:
        flat = math.prod(shapes[-1])
        encoder = (f"encoder {maps[0]} -> {down} -> flatten {flat} -> dense -> "
                   f"{2 * model.latent} = mu and log sigma^2 for {model.latent} latents")
        decoder = (f"decoder {model.latent} latents -> dense + relu -> {flat} = {back[0]} -> {up}")
    return (f"{cfg['kind']}: one training step on {n} images of {maps[0]} ({x.shape[1]} values), "
            f"float64\n{cfg['likelihood']} likelihood{extra}\n"
            + "\n".join(textwrap.fill(part, width=92, subsequent_indent="  ")
                        for part in (encoder, decoder)))
