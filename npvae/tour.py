"""A guided tour of one backward pass: every node from the loss back to the first layer.

``npvae tour MODEL`` builds a small float64 model, runs one training step on a tiny batch
and walks the reverse chain in the order the model runs it, one op pair at a time. For
each node it shows its local equations, forward and backward, with their tags in
docs/derivations.md, the value its forward pass computed (the reconstruction term, the
KL and the ELBO where they appear), the shapes going in, the gradients coming out with
their 2-norms, and a check of that node alone: central
differences (GC.1, GC.4) of

    f(inputs) = sum(dout * forward(inputs))                                  (GC.2)

where dout is the gradient that really arrived at the node in this step. At the end the
tour's parameter gradients are compared with the model's own ``loss_and_grads``, so the
tour cannot drift from the model it describes.

Each MLP is unrolled into the two ops a dense layer runs (MLP.1): the product a = h W,
whose backward is (LIN.2, LIN.3), and the fused bias + activation act(a + b), whose
backward is (ACT) and (LIN.4).

Some gradients are chosen rather than derived, and the tour says so: the VQ-VAE's
straight-through copy (VQ.3), whose true derivative is zero almost everywhere, and the
stop-gradients of the codebook and commitment losses (VQ.4, VQ.5), for which the tour
prints the size of the derivative that is dropped.

    model, x, eps = tour_model("vae-bernoulli")
    nodes = tour(model, x, eps)        # a list of Node, loss first
    print(format_tour(nodes))

The convolutional models' layers are walked by npvae.tour_conv, the learned prior by
npvae.tour_prior; the machinery every tour shares (Node, Tour, the chain of checked
nodes, format_tour) is npvae.tour_chain.

Letters: N batch, D data size, H hidden size, Z latent size, R = N M rows of Dz values
handed to the quantizer, K codes.
"""
from __future__ import annotations

import math
import textwrap
from functools import partial

import numpy as np

from .gradcheck import H
from .kinds import is_conv, is_vq
from .models.base import kl_weight
from .ops.activations import TAGS as ACT_TAG
from .ops.activations import bias_activation_backward, bias_activation_forward
from .ops.kl import gaussian_kl_backward, gaussian_kl_forward
from .ops.linear import linear_backward, linear_forward
from .ops.mlp import num_layers
from .ops.objectives import (
    ae_objective_backward, ae_objective_forward, fanout_backward, fanout_forward,
    l2_penalty_backward, l2_penalty_forward, split_backward, split_forward,
    vae_objective_backward, vae_objective_forward, vq_objective_backward, vq_objective_forward,
)
from .ops.reparam import reparameterize_backward, reparameterize_forward
from .ops.vq import (
    codebook_loss_backward, codebook_loss_forward, commitment_loss_backward,
    commitment_loss_forward, quantize_backward, quantize_forward,
)
from .tour_chain import (  # noqa: F401  (MATCH_TOL, NODE_TOL and format_tour: the public API)
    MATCH_TOL, NODE_TOL, Networks, Node, Tour, _Chain, _d, _likelihood, _likelihood_texts,
    _loss_value, _shape, _summary, format_tour,
)


# ----------------------------------------------------------------------------------
# The first half of a dense layer as an op pair, so the tour can check it on its own; the
# objective nodes are in npvae.ops.objectives.


def matmul_forward(h, W):
    """a = h W, the first half of a dense layer (MLP.1): the affine op with a zero bias.

    h (N, I), W (I, O) -> a (N, O). The bias is added by the activation node.
    """
    return linear_forward(h, W, np.zeros(W.shape[1], dtype=W.dtype))


def matmul_backward(da, cache):
    """da (N, O) -> dh (N, I), dW (I, O)  (LIN.2, LIN.3). The zero bias's gradient is dropped."""
    dh, dW, _ = linear_backward(da, cache)
    return dh, dW




def _layer_names(prefix, i, n_layers, in_name, out_name):
    """(input, pre-activation, output) tensor names of layer i of an MLP."""
    h = in_name if i == 0 else f"{prefix}.{i - 1}.out"
    out = out_name if i == n_layers - 1 else f"{prefix}.{i}.out"
    return h, f"{prefix}.{i}.a", out


def _bias_act_name(prefix, i, act):
    if act == "identity":
        return f"{prefix}.{i} bias (no activation)"
    return f"{prefix}.{i} bias + {act}"


# f'(a) of each activation, written with what backward reads (ACT.1-5)
ACT_DERIVATIVE = {"relu": "[h > 0]", "leaky_relu": "(1 if a + b > 0 else 0.01)",
                  "tanh": "(1 - h^2)", "sigmoid": "h (1 - h)", "softplus": "sigmoid(a + b)"}


def _mlp_forward(c, model, prefix, x, in_name, out_name):
    """The MLP of (MLP.1) as two op nodes per layer: a = h W, then act(a + b), none on the last."""
    p, act = model.params, model.config["activation"]
    n_layers = num_layers(p, prefix)
    h = x
    for i in range(n_layers):
        h_name, a_name, o_name = _layer_names(prefix, i, n_layers, in_name, out_name)
        layer_act = act if i < n_layers - 1 else "identity"
        first = i == 0 and prefix == "enc"
        a = c.forward(f"{prefix}.{i} linear a = h W", ("LIN.3",) if first else ("LIN.2", "LIN.3"),
                      (matmul_forward, matmul_backward),
                      {h_name: h, f"{prefix}.{i}.W": p[f"{prefix}.{i}.W"]},
                      formula="a = h W  (MLP.1, LIN.1 without its bias)",
                      value=lambda a, name=a_name: f"{name} {_summary(a)}",
                      gradient="dW = x^T da  (LIN.3); x is data: no dx" if first
                      else "dh = da W^T  (LIN.2);  dW = h^T da  (LIN.3)")
        if layer_act == "identity":
            tags = ("LIN.4",)
            formula, gradient = "out = a + b  (MLP.1)", "da = dout;  db = sum_n da  (LIN.4)"
        else:
            tag = ACT_TAG[layer_act]
            tags = (tag, "LIN.4")
            formula = f"h = {layer_act}(a + b)  (MLP.1, {tag})"
            gradient = (f"da = dh * {ACT_DERIVATIVE[layer_act]}  ({tag});  db = sum_n da  "
                        f"(LIN.4)")
        h = c.forward(_bias_act_name(prefix, i, layer_act), tags,
                      (partial(bias_activation_forward, name=layer_act), bias_activation_backward),
                      {a_name: a, f"{prefix}.{i}.b": p[f"{prefix}.{i}.b"]},
                      formula=formula, gradient=gradient,
                      value=lambda h, name=o_name: f"{name} {_summary(h)}")
    return h


def _mlp_backward(c, model, prefix, dout, in_name, out_name, need_dx=True):
    """The MLP's nodes in reverse (MLP.2): dh -> (da, db) -> (dh_prev, dW), last layer first."""
    act = model.config["activation"]
    n_layers = num_layers(model.params, prefix)
    dh = dout
    for i in reversed(range(n_layers)):
        h_name, a_name, o_name = _layer_names(prefix, i, n_layers, in_name, out_name)
        layer_act = act if i < n_layers - 1 else "identity"
        da, _ = c.backward(_bias_act_name(prefix, i, layer_act), dh, ((_d(o_name), dh),),
                           (a_name, f"{prefix}.{i}.b"))
        first = i == 0 and not need_dx
        dh, _ = c.backward(f"{prefix}.{i} linear a = h W", da, ((_d(a_name), da),),
                           (None if first else h_name, f"{prefix}.{i}.W"),
                           note=f"{in_name} is data: its gradient is not needed" if first else "")
    return dh




# ----------------------------------------------------------------------------------
# The three chains, each in the order its model's loss_and_grads runs it.


MLP_VAE_NETWORKS = Networks(  # enc.out (N, 2Z) = [mu, logvar]; z (N, Z)
    lambda c, model, x: _mlp_forward(c, model, "enc", x, "x", "enc.out"),
    lambda c, model, denc: _mlp_backward(c, model, "enc", denc, "x", "enc.out", need_dx=False),
    lambda c, model, z, out: _mlp_forward(c, model, "dec", z, "z", out),
    lambda c, model, dout, out: _mlp_backward(c, model, "dec", dout, "z", out))


def _tour_vae(c, model, x, eps, nets=MLP_VAE_NETWORKS):
    cfg, z_dim = model.config, model.latent
    w = kl_weight(cfg["beta"], cfg["warmup_steps"], None)
    lik_name, lik_tags, lik_op, out_name = _likelihood(cfg)
    free_bits = cfg["free_bits"]
    loss_name = ("loss = mean(-logp) + w*sum_j max(lambda, mean(KL_j))" if free_bits > 0
                 else "loss = mean(-logp) + w*mean(KL)")

    # ---- forward
    enc = nets.enc_forward(c, model, x)  # (N, 2Z)
    mu, logvar, mu_kl, logvar_kl = c.forward(
        "sum of the two paths into mu/logvar", ("VAE.1",), (partial(split_forward, z_dim=z_dim),
                                                             split_backward), {"enc.out": enc},
        formula="mu = enc.out[:, :Z], logvar = enc.out[:, Z:], each read by z and by the KL  "
                "(VAE.1)",
        gradient="denc.out = [dmu from z + dmu from KL, dlogvar from z + dlogvar from KL]")
    z = c.forward("reparameterization z = mu + eps*exp(logvar/2)", ("REP.2", "REP.3"),
                  (reparameterize_forward, reparameterize_backward),
                  {"mu": mu, "logvar": logvar, "eps": eps},
                  formula="z = mu + eps * exp(logvar/2), eps ~ N(0, I) held fixed  (REP.1)",
                  gradient="dmu = dz  (REP.2);  dlogvar = dz * eps * exp(logvar/2) / 2  "
                           "(REP.3)", value=lambda z: f"z {_summary(z)}")  # (N, Z)
    out = nets.dec_forward(c, model, z, out_name)  # (N, D)
    logp = c.forward(lik_name, lik_tags, lik_op, {out_name: out, "x": x},
                     **_likelihood_texts(cfg))  # (N,)
    kl = c.forward("KL(q(z|x) || N(0, I)) per dimension", ("KL.2", "KL.3"),
                   (gaussian_kl_forward, gaussian_kl_backward), {"mu": mu_kl, "logvar": logvar_kl},
                   formula="KL_nj = (mu^2 + exp(logvar) - logvar - 1) / 2  (KL.1)",
                   gradient="dmu = dKL * mu  (KL.2);  dlogvar = dKL (exp(logvar) - 1) / 2  (KL.3)",
                   value=lambda kl: (f"KL {_shape(kl.shape)}, mean_n sum_j KL_nj = "
                                     f"{kl.sum(axis=1).mean():.6g} nats: the KL term"))
    recon, kl_term = -float(logp.mean()), float(kl.sum(axis=1).mean())
    c.values = dict(reconstruction=recon, kl=kl_term, elbo=-(recon + kl_term),
                    bound="a lower bound on log p(x) (T.5), one sample of z")
    if free_bits > 0:
        formula = "loss = -mean_n logp_n + w sum_j max(lambda, mean_n KL_nj)  (OBJ.3)"
        gradient = ("dlogp = -1/N;  dKL_nj = w/N where mean_n KL_nj > lambda, else 0  "
                    "(OBJ.3)")
    else:
        formula = "loss = -mean_n logp_n + w mean_n sum_j KL_nj  (OBJ.1)"
        gradient = "dlogp = -1/N;  dKL = w/N  (OBJ.1)"
    loss = c.forward(loss_name, ("OBJ.1", "OBJ.3") if free_bits > 0 else ("OBJ.1",),
                     (partial(vae_objective_forward, w=w, free_bits=free_bits),
                      vae_objective_backward), {"logp": logp, "kl": kl},
                     formula=formula, gradient=gradient,
                     value=_loss_value(recon, kl_term, -(recon + kl_term)))

    # ---- reverse
    note = f"w = {w:g}; each example's terms enter with a factor 1/N = 1/{x.shape[0]}"
    dlogp, dkl = c.backward(loss_name, 1.0, (("dloss", 1.0),), ("logp", "kl"), note=note)
    (dout,) = c.backward(lik_name, dlogp, (("dlogp", dlogp),), (out_name,))
    dz = nets.dec_backward(c, model, dout, out_name)
    dmu_z, dlogvar_z = c.backward("reparameterization z = mu + eps*exp(logvar/2)", dz,
                                  (("dz", dz),), ("mu", "logvar"),
                                  note="eps is the step's noise, held fixed: no gradient")
    dmu_kl, dlogvar_kl = c.backward("KL(q(z|x) || N(0, I)) per dimension", dkl,
                                    (("dkl", dkl),), ("mu", "logvar"))
    (denc,) = c.backward("sum of the two paths into mu/logvar",
                         (dmu_z, dlogvar_z, dmu_kl, dlogvar_kl),
                         (("dmu from z", dmu_z), ("dlogvar from z", dlogvar_z),
                          ("dmu from KL", dmu_kl), ("dlogvar from KL", dlogvar_kl)),
                         ("enc.out",),
                         note="mu and logvar each feed z and the KL: their gradients add, "
                              "then [dmu, dlogvar] is the gradient of the encoder output")
    nets.enc_backward(c, model, denc)
    return float(loss)


def _tour_ae(c, model, x, eps):
    cfg = model.config
    w = kl_weight(cfg["beta"], cfg["warmup_steps"], None)
    lik_name, lik_tags, lik_op, out_name = _likelihood(cfg)
    loss_name = "loss = mean(-logp) + w*mean(||code||^2/2)"
    sampled = cfg["sampled"]
    reparam_name = "sampling z = code + eps"
    l2_name = "L2 penalty ||code||^2/2 (the KL with logvar = 0)"
    sum_name = "sum of the two paths into code"

    # ---- forward
    code = _mlp_forward(c, model, "enc", x, "x", "code")  # (N, Z)
    code_z, code_l2 = c.forward(sum_name, ("AE.3",), (fanout_forward, fanout_backward),
                                {"code": code},
                                formula="code is read twice: by the decoder and by the penalty",
                                gradient="dcode = dcode from z + dcode from L2  (AE.3)")
    if sampled:  # (REP.1) with logvar = 0: exp(0) = 1 exactly, so z = code + eps
        z = c.forward(reparam_name, ("REP.2",), (reparameterize_forward, reparameterize_backward),
                      {"code": code_z, "logvar": np.zeros_like(code_z), "eps": eps},
                      formula="z = code + eps, eps ~ N(0, I) held fixed  (REP.1 with logvar = 0)",
                      gradient="dcode = dz  (REP.2)", value=lambda z: f"z {_summary(z)}")
    else:
        z = code_z
    out = _mlp_forward(c, model, "dec", z, "z" if sampled else "code", out_name)
    logp = c.forward(lik_name, lik_tags, lik_op, {out_name: out, "x": x},
                     **_likelihood_texts(cfg))
    l2 = c.forward(l2_name, ("AE.1", "AE.3"), (l2_penalty_forward, l2_penalty_backward),
                   {"code": code_l2},
                   formula="l2_n = ||code_n||^2 / 2, the KL of q = N(code, I)  (AE.1)",
                   gradient="dcode = dl2 * code  (AE.3)",
                   value=lambda l2: (f"l2 {_shape(l2.shape)}, mean {l2.mean():.6g} nats: "
                                     f"the KL term"))
    recon, kl_term = -float(logp.mean()), float(l2.mean())
    c.values = dict(reconstruction=recon, kl=kl_term, elbo=-(recon + kl_term),
                    bound="a lower bound on log p(x) (T.5), one sample of z" if sampled else
                    "not a bound: z = code has no noise, so the terms are an objective (AE.2)")
    loss = c.forward(loss_name, ("AE.2",), (partial(ae_objective_forward, w=w),
                                            ae_objective_backward), {"logp": logp, "l2": l2},
                     formula="loss = -mean_n logp_n + w mean_n l2_n  (AE.2)",
                     gradient="dlogp = -1/N;  dl2 = w/N  (AE.2)",
                     value=_loss_value(recon, kl_term, -(recon + kl_term)))

    # ---- reverse
    dlogp, dl2 = c.backward(loss_name, 1.0, (("dloss", 1.0),), ("logp", "l2"), note=f"w = {w:g}")
    (dout,) = c.backward(lik_name, dlogp, (("dlogp", dlogp),), (out_name,))
    dz = _mlp_backward(c, model, "dec", dout, "z" if sampled else "code", out_name)
    if sampled:
        dz, _ = c.backward(reparam_name, dz, (("dz", dz),), ("code", None),
                           note="logvar is fixed at 0 and eps is noise: neither gets a gradient")
    (dcode_l2,) = c.backward(l2_name, dl2, (("dl2", dl2),), ("code",))
    (dcode,) = c.backward(sum_name, (dz, dcode_l2), (("dcode from z", dz),
                                                     ("dcode from L2", dcode_l2)), ("code",),
                          note="the code feeds the decoder and the penalty: gradients add")
    _mlp_backward(c, model, "enc", dcode, "x", "code", need_dx=False)
    return float(loss)


MLP_VQ_NETWORKS = Networks(
    lambda c, model, x: _mlp_forward(c, model, "enc", x, "x", "z_e"),
    lambda c, model, dz_e: _mlp_backward(c, model, "enc", dz_e, "x", "z_e", need_dx=False),
    lambda c, model, z_q, out: _mlp_forward(c, model, "dec", z_q, "z_q", out),
    lambda c, model, dout, out: _mlp_backward(c, model, "dec", dout, "z_q", out))


def _tour_vqvae(c, model, x, nets=MLP_VQ_NETWORKS):
    cfg, n = model.config, x.shape[0]
    R, Dz = n * model.M, model.Dz
    codebook = model.params["codebook"]
    lik_name, lik_tags, lik_op, out_name = _likelihood(cfg)
    metric_tag = "VQ.1" if cfg["metric"] == "euclidean" else "VQ.2"
    q_name = ("quantizer z_q = E[k], k the nearest code" if cfg["metric"] == "euclidean"
              else "quantizer z_q = E[k], k the largest dot product")
    cm_name = "commitment loss beta*||z_e - sg[e_k]||^2"
    cb_name = "codebook loss ||sg[z_e] - e_k||^2"
    sum_name = "sum of the two paths into z_e"
    loss_name = "loss = mean(-logp) + codebook + commitment"

    # ---- forward
    h = nets.enc_forward(c, model, x)  # (N, M Dz)
    rows = h.reshape(R, Dz)  # (R, Dz)  one row per code vector
    rows_q, rows_cm = c.forward(sum_name, ("VQVAE.2",), (fanout_forward, fanout_backward),
                                {"z_e": rows},
                                formula=f"z_e (N, M Dz) read as R = N M = {R} rows of Dz = {Dz}, "
                                        f"each read by the quantizer and the commitment loss",
                                gradient="dz_e = dz_e from the quantizer + dz_e from "
                                         "commitment  (VQVAE.2)")
    choose = ("k_r = argmin_k ||z_r - e_k||^2  (VQ.1)" if cfg["metric"] == "euclidean"
              else "k_r = argmax_k z_r . e_k  (VQ.2)")
    z_q = c.forward(q_name, (metric_tag, "VQ.3"),
                    (partial(quantize_forward, metric=cfg["metric"]), quantize_backward),
                    {"z_e": rows_q, "codebook": codebook},
                    formula=f"{choose};  z_q[r] = e_(k_r)  (VQ.3)",
                    gradient="dz_e := dz_q, copied straight through, not derived  (VQ.3); "
                             "the codebook gets nothing on this path",
                    value=lambda zq: f"z_q {_summary(zq)}")  # (R, Dz)
    idx = c.records[q_name][3].idx  # (R,)
    cb = c.forward(cb_name, ("VQ.4",), (codebook_loss_forward, codebook_loss_backward),
                   {"z_e": rows, "codebook": codebook, "idx": idx},
                   formula="cb_r = ||sg[z_r] - e_(k_r)||^2  (VQ.4)",
                   gradient="dE_k = sum_(r: k_r = k) -2 dcb_r (z_r - e_k)  (VQ.4);  dz_e = 0 "
                            "(sg)", value=lambda cb: f"cb {_summary(cb)}")
    cm = c.forward(cm_name, ("VQ.5",), (partial(commitment_loss_forward, beta=cfg["beta"]),
                                        commitment_loss_backward),
                   {"z_e": rows_cm, "codebook": codebook, "idx": idx},
                   formula=f"cm_r = beta ||z_r - sg[e_(k_r)]||^2, beta = {cfg['beta']:g}  (VQ.5)",
                   gradient="dz_r = 2 beta dcm_r (z_r - e_(k_r))  (VQ.5);  dE = 0 (sg)",
                   value=lambda cm: f"cm {_summary(cm)}")
    out = nets.dec_forward(c, model, z_q.reshape(n, -1), out_name)
    logp = c.forward(lik_name, lik_tags, lik_op, {out_name: out, "x": x},
                     **_likelihood_texts(cfg))
    loss = _vq_loss(c, model, loss_name, logp, cb, cm)

    # ---- reverse
    dlogp, dcb, dcm = c.backward(loss_name, 1.0, (("dloss", 1.0),),
                                 ("logp", "codebook_loss", "commitment_loss"),
                                 note="the codebook term is left out under EMA (VQ.6)"
                                 if cfg["ema"] else "")
    (dout,) = c.backward(lik_name, dlogp, (("dlogp", dlogp),), (out_name,))
    dzq = nets.dec_backward(c, model, dout, out_name).reshape(R, Dz)  # (R, Dz)
    (dz_st,) = c.backward(q_name, dzq, (("dz_q", dzq),), ("z_e",), stopped=("codebook",),
                          copied=True)
    numeric = c.nodes[-1].numeric_norm
    c.nodes[-1] = c.nodes[-1]._replace(note=_straight_through_note(model, x, dzq, dz_st, numeric))
    (dz_cm,) = c.backward(cm_name, dcm, (("dcommitment_loss", dcm),), ("z_e",),
                          stopped=("codebook",),
                          note="sg[e_k]: the codebook gets no gradient from this term (chosen, "
                               "VQ.5); the derivative dropped is shown under 'stopped'")
    (dz_e,) = c.backward(sum_name, (dz_st, dz_cm), (("dz_e from the quantizer", dz_st),
                                                    ("dz_e from commitment", dz_cm)), ("z_e",),
                         note=f"z_e feeds the quantizer and the commitment loss: gradients add; "
                              f"reshaped ({R}, {Dz}) -> ({n}, {model.M * Dz}) for the encoder")
    _codebook_backward(c, cfg["ema"], cb_name, dcb, codebook)
    nets.enc_backward(c, model, dz_e.reshape(n, -1))
    return float(loss)


def _vq_loss(c, model, loss_name, logp, cb, cm):
    """The VQ-VAE's loss node (VQVAE.2), forward; the ELBO under the uniform prior over
    codes (VQVAE.1) goes into the tour's values."""
    ema = model.config["ema"]
    recon, kl_term = -float(logp.mean()), model.M * math.log(model.K)
    c.values = dict(reconstruction=recon, kl=kl_term, elbo=-(recon + kl_term),
                    bound="a lower bound on log p(x) under the uniform prior over codes, whose "
                          "KL is the constant M log K  (VQVAE.1)")
    return c.forward(loss_name, ("VQVAE.2",), (partial(vq_objective_forward, ema=ema),
                                               vq_objective_backward),
                     {"logp": logp, "codebook_loss": cb, "commitment_loss": cm},
                     formula="loss = -mean_n logp_n + sum_r cb_r / N + sum_r cm_r / N  (VQVAE.2)"
                     + ("; under EMA without the cb term (VQ.6)" if ema else ""),
                     gradient="dlogp = -1/N;  dcb = " + ("0" if ema else "1/N")
                     + ";  dcm = 1/N  (VQVAE.2)",
                     value=lambda loss: (f"loss {float(loss):.6g} (not -ELBO: it adds the "
                                         f"codebook and commitment terms);  ELBO "
                                         f"{-(recon + kl_term):.6g} = -(reconstruction "
                                         f"{recon:.6g} + KL M log K = {kl_term:.6g})"))


def _codebook_backward(c, ema, cb_name, dcb, codebook) -> None:
    """The codebook's gradient: from the codebook loss (VQ.4), or zero under moving
    averages (VQ.6), where a node says so."""
    if ema:
        c.grads["codebook"] = np.zeros_like(codebook)
        c.nodes.append(Node(cb_name, ("VQ.6",), (), {"codebook": codebook.shape},
                            {_d("codebook"): codebook.shape}, {_d("codebook"): 0.0}, None, None,
                            {}, note="ema: the codebook is learned by moving averages after "
                                     "the step, so its gradient is zero",
                            formula="N_k, S_k moving averages of code counts and sums; "
                                    "e_k = S_k / N_k after the step  (VQ.6)",
                            gradient="dcodebook = 0"))
    else:
        c.backward(cb_name, dcb, (("dcodebook_loss", dcb),), ("codebook",), stopped=("z_e",),
                   note="sg[z_e]: the encoder gets no gradient from this term (chosen, VQ.4); "
                        "the derivative dropped is shown under 'stopped'")


def _straight_through_note(model, x, dzq, dz_st, numeric):
    same = np.array_equal(dz_st, dzq)
    diff = float(np.abs(dz_st - dzq).max())
    margin = model.assignment_margin(x)
    return (f"copied (straight-through), not derived (VQ.3): dz_e == dz_q exactly: {same} "
            f"(max |dz_e - dz_q| = {diff:g}). Central differences of z_q in z_e give "
            f"{numeric:.1e}: the true derivative is zero almost everywhere, because a small "
            f"step does not change which code is chosen (closest call between two codes: "
            f"score margin {margin:.2g}, step h = {H:.0e}). The codebook gets nothing on this "
            f"path; the derivative dropped is shown under 'stopped'; it learns from the "
            f"codebook loss (VQ.4) instead.")


# ----------------------------------------------------------------------------------
# Public API


def tour(model, x, eps=None, *, max_entries: int | None = None) -> Tour:
    """One training step's backward pass of ``model`` on ``x``, node by node, each node checked.

    model: a float64 VAE, Autoencoder or VQVAE; x (N, D) float64. eps (N, Z) is the
    reparameterization noise of a VAE or sampled autoencoder (drawn from seed 0 when
    None; unused by the VQ-VAE). ``max_entries`` limits each finite-difference check to
    that many random entries per array (all entries when None: fine for small models).

    Returns a :class:`Tour`, a list of :class:`Node` in the order the backward pass runs
    them (the loss first, the encoder's first layer last), with the parameter gradients
    compared against ``model.loss_and_grads(x, eps=eps)``.
    """
    from .models import VAE, VQVAE, Autoencoder

    if model.dtype != np.float64:
        raise ValueError(f"the tour checks every node by finite differences, which needs "
                         f"float64; got a {model.dtype} model (build it with dtype='float64')")
    x = model.check_x(x)
    n = x.shape[0]
    c = _Chain(model.params, max_entries, np.random.default_rng(0))
    if isinstance(model, VQVAE):
        eps = None
        nets = MLP_VQ_NETWORKS
        if is_conv(model):  # convolutional networks: npvae.tour_conv
            from .tour_conv import CONV_VQ_NETWORKS as nets
        loss = _tour_vqvae(c, model, x, nets)
        model_loss, model_grads, _ = model.loss_and_grads(x)
    elif isinstance(model, (VAE, Autoencoder)):
        needs_eps = isinstance(model, VAE) or model.config["sampled"]
        if needs_eps and eps is None:
            eps = np.random.default_rng(0).standard_normal((n, model.latent))
        eps = model.check_eps(eps, (n, model.latent)) if needs_eps else None
        walk = _tour_vae if isinstance(model, VAE) else _tour_ae
        if is_conv(model):  # convolutional networks: npvae.tour_conv
            from .tour_conv import CONV_VAE_NETWORKS
            walk = partial(_tour_vae, nets=CONV_VAE_NETWORKS)
        loss = walk(c, model, x, eps)
        model_loss, model_grads, _ = model.loss_and_grads(x, eps=eps)
    elif getattr(model, "kind", None) == "made":  # the learned prior over a VQ-VAE's codes
        from .tour_prior import tour_prior
        loss = tour_prior(c, model, x)
        model_loss, model_grads, _ = model.loss_and_grads(x)
    else:
        raise ValueError(f"the tour knows VAE, Autoencoder and VQVAE models, got "
                         f"{type(model).__name__}")

    missing = set(model.params) - set(c.grads)
    if missing or set(c.grads) - set(model.params):
        difference = math.inf
    else:
        difference = max(float(np.abs(c.grads[k] - model_grads[k]).max()) for k in model.params)
    difference = max(difference, abs(loss - model_loss))
    scale = max(float(np.abs(g).max()) for g in model_grads.values())
    return Tour(c.nodes, title=_title(model, x), loss=loss, grads=c.grads,
                max_difference=difference, scale=scale, forward=c.values)


def _title(model, x) -> str:
    cfg = model.config
    if cfg["kind"] == "made":
        from .tour_prior import prior_title
        return prior_title(model, x)
    if is_conv(model):
        from .tour_conv import conv_title
        return conv_title(model, x)
    n, d = x.shape
    side = math.isqrt(d)
    what = f" ({side}x{side} images)" if side * side == d else ""
    extra = ""
    if is_vq(model):
        extra = (f", {model.K} codes of size {model.Dz}, {model.M} per example, "
                 f"{cfg['metric']} assignment")
    elif cfg["kind"] == "ae":
        extra = ", sampled z = code + eps" if cfg["sampled"] else ", z = code"
    return (f"{cfg['kind']}: one training step on {n} examples of {d} values{what}, float64\n"
            f"{cfg['likelihood']} likelihood{extra}\n"
            + "\n".join(textwrap.fill(_read_sizes(model, part), width=92, subsequent_indent="  ")
                        for part in ("enc", "dec")))


def _read_sizes(model, prefix) -> str:
    """An MLP's layer sizes read aloud, e.g. "encoder 64-16-4: 64 inputs, a hidden layer of
    16 (relu), 4 = mu and log sigma^2 for 2 latents"."""
    cfg, p = model.config, model.params
    k = num_layers(p, prefix)
    sizes = [p[f"{prefix}.0.W"].shape[0]] + [p[f"{prefix}.{i}.W"].shape[1] for i in range(k)]
    hidden = sizes[1:-1]
    if not hidden:
        middle = "no hidden layer"
    elif len(hidden) == 1:
        middle = f"a hidden layer of {hidden[0]} ({cfg['activation']})"
    else:
        middle = (f"hidden layers of {', '.join(map(str, hidden))} ({cfg['activation']})")
    first, last = sizes[0], sizes[-1]
    kind, vq = cfg["kind"], is_vq(model)
    if prefix == "enc":
        start = f"{first} inputs"
        if vq:
            end = f"{last} = {model.M} code vectors of size {model.Dz}"
        elif kind == "ae":
            end = f"{last} = the code, {last} latents"
        else:
            end = f"{last} = mu and log sigma^2 for {last // 2} latents"
    else:
        start = (f"{first} = the {model.M} chosen codes of size {model.Dz}" if vq
                 else f"{first} latents in")
        end = (f"{last} = logits of {last} Bernoulli pixels" if cfg["likelihood"] == "bernoulli"
               else f"{last} = means of {last} Gaussian pixels, variance {cfg['sigma2']:g}")
    name = "encoder" if prefix == "enc" else "decoder"
    return f"{name} {'-'.join(map(str, sizes))}: {start}, {middle}, {end}"


def _kinds(test):
    """The kinds of ``npvae tour`` for which ``test(kind)`` holds."""
    from .models import KINDS

    return lambda: [k for k in KINDS if test(k)]


# Options of tour_model and the kinds that take them (the other kinds fix their likelihood).
_TAKES = {"likelihood": _kinds(lambda k: k not in ("vae-gaussian", "vae-bernoulli")),
          "sampled": _kinds(lambda k: k == "ae"), "metric": _kinds(is_vq)}


def tour_model(kind: str, data_dim: int = 64, batch: int = 4, seed: int = 0, *,
               likelihood: str | None = None, sampled: bool = False, metric: str | None = None):
    """A small float64 model of ``kind`` (one hidden layer of 16), a batch x and noise eps:
    what ``npvae tour`` walks through and ``npvae gradcheck`` checks.

    x (batch, data_dim) holds grey levels drawn uniformly from (0.05, 0.95) with ``seed``;
    eps (batch, Z) is standard normal (None for the VQ-VAE). The likelihood is each
    kind's default in ``npvae train``: Gaussian for vae-gaussian, Bernoulli otherwise;
    ``likelihood`` changes it for ae and vqvae, ``sampled`` makes the autoencoder's code
    noisy (z = code + eps) and ``metric`` ("euclidean" or "dot") sets the VQ-VAE's
    assignment. The tutorial's own models: vae-gaussian; ae with sampled=True and
    likelihood="gaussian"; vqvae with metric="dot" and likelihood="gaussian".
    """
    from .models import MODELS, build

    given = {"likelihood": likelihood is not None, "sampled": bool(sampled),
             "metric": metric is not None}
    for option, kinds in _TAKES.items():
        if given[option] and kind not in kinds():
            raise ValueError(f"{option} (--{option}) is for {' or '.join(kinds())}, not {kind}")
    if likelihood not in (None, "bernoulli", "gaussian"):
        raise ValueError(f"likelihood must be bernoulli or gaussian, got {likelihood!r}")
    if metric not in (None, "euclidean", "dot"):
        raise ValueError(f"metric must be euclidean or dot, got {metric!r}")
    if kind == "made":  # the learned prior: one-hot codes, M = 4 positions of K = 4 codes
        from .tour_prior import prior_tour_model
        return prior_tour_model(batch, seed)
    if kind in MODELS and is_conv(kind):  # 1 x side x side images: npvae.tour_conv
        from .tour_conv import conv_tour_model
        return conv_tour_model(kind, data_dim, batch, seed, likelihood=likelihood, metric=metric)
    rng = np.random.default_rng(seed)
    cfg = dict(kind=kind, data_dim=int(data_dim), hidden=[16], dtype="float64")
    if kind == "vqvae":  # the MLP VQ-VAE
        cfg.update(num_codes=8, code_dim=2, num_vectors=2, likelihood=likelihood or "bernoulli",
                   metric=metric or "euclidean")
    elif kind == "ae":
        cfg.update(latent=2, likelihood=likelihood or "bernoulli", sampled=bool(sampled))
    elif kind in ("vae-gaussian", "vae-bernoulli"):
        cfg.update(latent=2)
    else:
        from .models import KINDS
        raise ValueError(f"kind must be one of {', '.join(KINDS)} or made, got {kind!r}")
    model = build(cfg, rng=seed)
    x = rng.uniform(0.05, 0.95, size=(int(batch), int(data_dim)))
    eps = None if is_vq(kind) else rng.standard_normal((int(batch), 2))
    return model, x, eps
