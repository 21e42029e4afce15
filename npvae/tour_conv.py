"""The tour of the convolutional VAE's backward pass (``npvae tour conv-vae``), node by node.

The model (:class:`npvae.models.ConvVAE`) is the VAE of :mod:`npvae.tour` with other
networks: the encoder is stride-2 convolutions (CONV.1), each followed by a ReLU (ACT.1),
then a dense layer to [mu, logvar]; the decoder is a dense layer and a ReLU, then
stride-2 transposed convolutions (CONVT.1), a ReLU after each but the last. Each of them
is an op pair checked by :class:`npvae.tour_chain._Chain` like every other node: the
convolution sends back dx (CONV.2), dw (CONV.3) and db (CONV.4), the transposed
convolution dx, dw (CONVT.2) and db (CONV.4). Reshapes between a map and a row of
values compute nothing; the nodes' notes say where they happen.

The tour's model is tiny and float64 so that every node can be checked by central
differences in a second: 1 x 8 x 8 images, channels (2, 3), two latents:

    x (N, 1, 8, 8) -> conv -> (N, 2, 4, 4) -> conv -> (N, 3, 2, 2) -> dense -> (N, 4)
    z (N, 2) -> dense -> (N, 12) = (N, 3, 2, 2) -> conv^T -> (N, 2, 4, 4) -> conv^T -> (N, 1, 8, 8)

Letters: N batch, C channels, F filters, H x W a map's size, Z latent size.
"""
from __future__ import annotations

import math
import textwrap
from functools import partial

import numpy as np

from .kinds import is_vq
from .models.base import kl_weight
from .models.conv_vae import KERNEL, PAD, STRIDE
from .ops.activations import activation_backward, activation_forward
from .ops.conv import (
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward,
)
from .ops.kl import gaussian_kl_backward, gaussian_kl_forward
from .ops.linear import linear_backward, linear_forward
from .ops.objectives import split_backward, split_forward, vae_objective_backward, vae_objective_forward
from .ops.reparam import reparameterize_backward, reparameterize_forward
from .tour_chain import _d, _likelihood, _likelihood_texts, _loss_value, _shape, _summary

CHANNELS, LATENT = (2, 3), 2  # the tour's model, on 1 x 8 x 8 images by default
RELU = (partial(activation_forward, name="relu"), activation_backward)
GEOMETRY = f"{KERNEL}x{KERNEL} kernel, stride {STRIDE}, pad {PAD}"
KINK_MARGIN = 1e-3  # every ReLU input of the tour's step is at least this far from 0 (10 h)


def _dims(shape) -> str:
    """(N, C, H, W) -> "CxHxW"."""
    return "x".join(str(s) for s in shape[1:])


# ----------------------------------------------------------------------------------
# The layers: each a node (or two) forward, and the same nodes in reverse


def _conv_name(prefix, i):
    return (f"{prefix}.conv{i} convolution a = conv(h, w) + b" if prefix == "enc"
            else f"{prefix}.convT{i} transposed convolution a = conv^T(h, w) + b")


def _conv_node(c, model, prefix, i, h, h_name):
    """One (transposed) convolution node; returns its output a (N, F, H', W')."""
    p = model.params
    if prefix == "enc":
        w, b = f"enc.conv{i}.w", f"enc.conv{i}.b"
        first = i == 0
        op = (partial(conv2d_forward, stride=STRIDE, pad=PAD),
              partial(conv2d_backward, need_dx=not first))
        tags = ("CONV.3", "CONV.4") if first else ("CONV.2", "CONV.3", "CONV.4")
        formula = (f"a[n,f,i,j] = b[f] + sum_(c,k,l) w[f,c,k,l] hp[n,c,2i+k,2j+l], hp = h "
                   f"padded, {GEOMETRY}  (CONV.1)")
        gradient = ("dw[f,c,k,l] = sum_(n,i,j) da[n,f,i,j] hp[n,c,2i+k,2j+l]  (CONV.3);  db = "
                    "sum_(n,i,j) da  (CONV.4)" + ("; x is data: no dx" if first else
                                                 ";  dh: each da spread back over its window  "
                                                 "(CONV.2)"))
    else:
        w, b = f"dec.convT{i}.w", f"dec.convT{i}.b"
        op = (partial(conv_transpose2d_forward, stride=STRIDE, pad=PAD), conv_transpose2d_backward)
        tags = ("CONVT.2", "CONV.4")
        formula = (f"a = conv^T(h, w) + b: each h[n,c,i,j] adds h[n,c,i,j] w[c] onto the "
                   f"window at (2i-1, 2j-1), {GEOMETRY}  (CONVT.1)")
        gradient = ("dh = conv(da, w), the convolution (CONV.1) of da;  dw = sum h * windows "
                    "of da  (CONVT.2);  db = sum_(n,i,j) da  (CONV.4)")
    a_name = f"{prefix}.conv{'T' if prefix == 'dec' else ''}{i}.a"
    return c.forward(_conv_name(prefix, i), tags, op, {h_name: h, w: p[w], b: p[b]},
                     formula=formula, gradient=gradient,
                     value=lambda a: f"{a_name} {_summary(a)}")


def _relu_node(c, name, a, a_name, out_name):
    return c.forward(name, ("ACT.1",), RELU, {a_name: a}, formula="h = relu(a) = max(a, 0)  "
                     "(ACT.1)", gradient="da = dh * [h > 0]  (ACT.1)",
                     value=lambda h: f"{out_name} {_summary(h)}")


def _encoder_forward(c, model, x):
    """x (N, D) -> enc.out (N, 2Z), node by node."""
    p, n = model.params, x.shape[0]
    h, h_name = x.reshape((n,) + model.image_shape), "x"  # (N, C, H, W)
    for i in range(model.n_conv):
        a = _conv_node(c, model, "enc", i, h, h_name)
        h = _relu_node(c, f"enc.conv{i} relu", a, f"enc.conv{i}.a", f"enc.conv{i}.out")
        h_name = f"enc.conv{i}.out"
    flat = h.reshape(n, -1)  # (N, K h' w')
    return c.forward("enc.fc linear enc.out = h W + b", ("LIN.2", "LIN.3", "LIN.4"),
                     (linear_forward, linear_backward),
                     {h_name: flat, "enc.fc.W": p["enc.fc.W"], "enc.fc.b": p["enc.fc.b"]},
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
    dh = dflat.reshape(map_shape)  # (N, K, h', w')
    for i in reversed(range(model.n_conv)):
        (da,) = c.backward(f"enc.conv{i} relu", dh, ((_d(f"enc.conv{i}.out"), dh),),
                           (f"enc.conv{i}.a",))
        h_name = "x" if i == 0 else f"enc.conv{i - 1}.out"
        dh, _, _ = c.backward(_conv_name("enc", i), da, ((_d(f"enc.conv{i}.a"), da),),
                              (None if i == 0 else h_name, f"enc.conv{i}.w", f"enc.conv{i}.b"),
                              note="x is data: its gradient is not needed" if i == 0 else "")


def _decoder_forward(c, model, z, out_name):
    """z (N, Z) -> the decoder's raw output (N, D), node by node."""
    p, n = model.params, z.shape[0]
    a = c.forward("dec.fc linear a = z W + b", ("LIN.2", "LIN.3", "LIN.4"),
                  (linear_forward, linear_backward),
                  {"z": z, "dec.fc.W": p["dec.fc.W"], "dec.fc.b": p["dec.fc.b"]},
                  formula="a = z W + b  (LIN.1)",
                  gradient="dz = da W^T  (LIN.2);  dW = z^T da  (LIN.3);  db = sum_n da  (LIN.4)",
                  value=lambda a: f"dec.fc.a {_summary(a)}")
    h = _relu_node(c, "dec.fc relu", a, "dec.fc.a", "dec.fc.out")
    h, h_name = h.reshape((n,) + model.map_shape), "dec.map"  # (N, K, h', w')
    for i in range(model.n_conv):
        a = _conv_node(c, model, "dec", i, h, h_name)
        if i == model.n_conv - 1:
            return a.reshape(n, -1)  # (N, D): the logits or means, one row per example
        h = _relu_node(c, f"dec.convT{i} relu", a, f"dec.convT{i}.a", f"dec.convT{i}.out")
        h_name = f"dec.convT{i}.out"


def _decoder_backward(c, model, dout, out_name):
    """dout (N, D) -> dz (N, Z); the decoder's parameter gradients, last node first."""
    n = dout.shape[0]
    dh = dout.reshape((n,) + model.image_shape)  # (N, C, H, W)
    for i in reversed(range(model.n_conv)):
        if i < model.n_conv - 1:
            (dh,) = c.backward(f"dec.convT{i} relu", dh, ((_d(f"dec.convT{i}.out"), dh),),
                               (f"dec.convT{i}.a",))
        h_name = "dec.map" if i == 0 else f"dec.convT{i - 1}.out"
        last = i == model.n_conv - 1
        upstream = (_d(out_name) if last else _d(f"dec.convT{i}.a"), dh)
        dh, _, _ = c.backward(_conv_name("dec", i), dh, (upstream,),
                              (h_name, f"dec.convT{i}.w", f"dec.convT{i}.b"),
                              note=f"its output {_shape((n,) + model.image_shape)} is {out_name}, "
                                   f"read as rows of {math.prod(model.image_shape)}" if last
                              else "")
    dflat = dh.reshape(n, -1)  # (N, K h' w')
    (da,) = c.backward("dec.fc relu", dflat, (("d(dec.fc.out)", dflat),), ("dec.fc.a",),
                       note=f"its output (N, {math.prod(model.map_shape)}) is read as the map "
                            f"dec.map {_shape((n,) + model.map_shape)}; the map's gradient is "
                            f"read back as rows")
    dz, _, _ = c.backward("dec.fc linear a = z W + b", da, ((_d("dec.fc.a"), da),),
                          ("z", "dec.fc.W", "dec.fc.b"))
    return dz


# ----------------------------------------------------------------------------------
# The chain, in the order ConvVAE.loss_and_grads runs it


def tour_conv_vae(c, model, x, eps) -> float:
    """Forward, then every node of the backward pass, for a ConvVAE on x (N, D)."""
    cfg, z_dim = model.config, model.latent
    w = kl_weight(cfg["beta"], cfg["warmup_steps"], None)
    lik_name, lik_tags, lik_op, out_name = _likelihood(cfg)
    loss_name = "loss = mean(-logp) + w*mean(KL)"
    split_name = "sum of the two paths into mu/logvar"
    rep_name = "reparameterization z = mu + eps*exp(logvar/2)"
    kl_name = "KL(q(z|x) || N(0, I)) per dimension"

    # ---- forward
    enc = _encoder_forward(c, model, x)  # (N, 2Z)
    mu, logvar, mu_kl, logvar_kl = c.forward(
        split_name, ("VAE.1",), (partial(split_forward, z_dim=z_dim), split_backward),
        {"enc.out": enc},
        formula="mu = enc.out[:, :Z], logvar = enc.out[:, Z:], each read by z and by the KL  "
                "(VAE.1)",
        gradient="denc.out = [dmu from z + dmu from KL, dlogvar from z + dlogvar from KL]")
    z = c.forward(rep_name, ("REP.2", "REP.3"), (reparameterize_forward, reparameterize_backward),
                  {"mu": mu, "logvar": logvar, "eps": eps},
                  formula="z = mu + eps * exp(logvar/2), eps ~ N(0, I) held fixed  (REP.1)",
                  gradient="dmu = dz  (REP.2);  dlogvar = dz * eps * exp(logvar/2) / 2  (REP.3)",
                  value=lambda z: f"z {_summary(z)}")  # (N, Z)
    out = _decoder_forward(c, model, z, out_name)  # (N, D)
    logp = c.forward(lik_name, lik_tags, lik_op, {out_name: out, "x": x},
                     **_likelihood_texts(cfg))  # (N,)
    kl = c.forward(kl_name, ("KL.2", "KL.3"), (gaussian_kl_forward, gaussian_kl_backward),
                   {"mu": mu_kl, "logvar": logvar_kl},
                   formula="KL_nj = (mu^2 + exp(logvar) - logvar - 1) / 2  (KL.1)",
                   gradient="dmu = dKL * mu  (KL.2);  dlogvar = dKL (exp(logvar) - 1) / 2  (KL.3)",
                   value=lambda kl: (f"KL {_shape(kl.shape)}, mean_n sum_j KL_nj = "
                                     f"{kl.sum(axis=1).mean():.6g} nats: the KL term"))
    recon, kl_term = -float(logp.mean()), float(kl.sum(axis=1).mean())
    c.values = dict(reconstruction=recon, kl=kl_term, elbo=-(recon + kl_term),
                    bound="a lower bound on log p(x) (T.5), one sample of z")
    loss = c.forward(loss_name, ("OBJ.1",), (partial(vae_objective_forward, w=w),
                                             vae_objective_backward), {"logp": logp, "kl": kl},
                     formula="loss = -mean_n logp_n + w mean_n sum_j KL_nj  (OBJ.1)",
                     gradient="dlogp = -1/N;  dKL = w/N  (OBJ.1)",
                     value=_loss_value(recon, kl_term, -(recon + kl_term)))

    # ---- reverse
    note = f"w = {w:g}; each example's terms enter with a factor 1/N = 1/{x.shape[0]}"
    dlogp, dkl = c.backward(loss_name, 1.0, (("dloss", 1.0),), ("logp", "kl"), note=note)
    (dout,) = c.backward(lik_name, dlogp, (("dlogp", dlogp),), (out_name,))
    dz = _decoder_backward(c, model, dout, out_name)
    dmu_z, dlogvar_z = c.backward(rep_name, dz, (("dz", dz),), ("mu", "logvar"),
                                  note="eps is the step's noise, held fixed: no gradient")
    dmu_kl, dlogvar_kl = c.backward(kl_name, dkl, (("dkl", dkl),), ("mu", "logvar"))
    (denc,) = c.backward(split_name, (dmu_z, dlogvar_z, dmu_kl, dlogvar_kl),
                         (("dmu from z", dmu_z), ("dlogvar from z", dlogvar_z),
                          ("dmu from KL", dmu_kl), ("dlogvar from KL", dlogvar_kl)), ("enc.out",),
                         note="mu and logvar each feed z and the KL: their gradients add, then "
                              "[dmu, dlogvar] is the gradient of the encoder output")
    _encoder_backward(c, model, denc)
    return float(loss)


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
        if vq or _kink_margin(model, x, eps) > KINK_MARGIN:
            break
    return model, x, eps


def _kink_margin(model, x, eps) -> float:
    """The smallest |a| over every ReLU input a of the step: central differences across
    the kink at 0 would see a slope of 1/2 where the derivative is 0 or 1."""
    p, n = model.params, x.shape[0]
    h, inputs = x.reshape((n,) + model.image_shape), []
    for i in range(model.n_conv):
        a, _ = conv2d_forward(h, p[f"enc.conv{i}.w"], p[f"enc.conv{i}.b"], STRIDE, PAD)
        inputs.append(a)
        h = np.maximum(a, 0.0)  # (N, K_i, H_i, W_i)
    enc, _ = linear_forward(h.reshape(n, -1), p["enc.fc.W"], p["enc.fc.b"])  # (N, 2Z)
    z = enc[:, :model.latent] + eps * np.exp(0.5 * enc[:, model.latent:])  # (N, Z)  (REP.1)
    a, _ = linear_forward(z, p["dec.fc.W"], p["dec.fc.b"])
    inputs.append(a)
    h = np.maximum(a, 0.0).reshape((n,) + model.map_shape)
    for i in range(model.n_conv - 1):  # the last transposed convolution has no ReLU
        a, _ = conv_transpose2d_forward(h, p[f"dec.convT{i}.w"], p[f"dec.convT{i}.b"], STRIDE, PAD)
        inputs.append(a)
        h = np.maximum(a, 0.0)
    return min(float(np.abs(a).min()) for a in inputs)


def conv_title(model, x) -> str:
    """What the tour walks: the batch, the likelihood, and the two networks' shapes."""
    cfg, n = model.config, x.shape[0]
    shapes = [model.image_shape]
    for k in cfg["channels"]:
        c, h, w = shapes[-1]
        shapes.append((k, h // STRIDE, w // STRIDE))
    maps = [_dims((n,) + s) for s in shapes]
    conv = f"conv {KERNEL}x{KERNEL}/{STRIDE} + relu"
    encoder = (f"encoder {maps[0]} -> " + " -> ".join(f"{conv} -> {m}" for m in maps[1:])
               + f" -> flatten {math.prod(shapes[-1])} -> dense -> {2 * model.latent} = mu and "
                 f"log sigma^2 for {model.latent} latents")
    back = maps[::-1]
    convt = [f"conv^T {KERNEL}x{KERNEL}/{STRIDE}" + (" + relu" if i < len(back) - 2 else "")
             for i in range(len(back) - 1)]
    decoder = (f"decoder {model.latent} latents -> dense + relu -> {math.prod(shapes[-1])} = "
               f"{back[0]} -> " + " -> ".join(f"{t} -> {m}" for t, m in zip(convt, back[1:]))
               + (" logits" if cfg["likelihood"] == "bernoulli" else " means"))
    return (f"{cfg['kind']}: one training step on {n} images of {maps[0]} ({x.shape[1]} values), "
            f"float64\n{cfg['likelihood']} likelihood\n"
            + "\n".join(textwrap.fill(part, width=92, subsequent_indent="  ")
                        for part in (encoder, decoder)))
