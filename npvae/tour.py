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

Letters: N batch, D data size, H hidden size, Z latent size, R = N M rows of Dz values
handed to the quantizer, K codes.
"""
from __future__ import annotations

import math
import textwrap
from functools import partial
from typing import NamedTuple

import numpy as np

from .gradcheck import H, numerical_gradient, rel_error
from .models.base import kl_weight
from .ops.activations import TAGS as ACT_TAG
from .ops.activations import bias_activation_backward, bias_activation_forward
from .ops.kl import gaussian_kl_backward, gaussian_kl_forward
from .ops.likelihoods import (
    bernoulli_loglik_backward, bernoulli_loglik_forward, gaussian_loglik_backward,
    gaussian_loglik_forward,
)
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

NODE_TOL = 1e-6  # largest relative error (GC.3) a derived node may show
MATCH_TOL = 1e-12  # largest difference from loss_and_grads, relative to the largest gradient


class Node(NamedTuple):
    """One step of the backward pass, as the tour shows it."""

    name: str  # what the node computes, e.g. "dec.1 linear a = h W"
    tags: tuple  # equations of its backward in docs/derivations.md, e.g. ("LIN.2", "LIN.3")
    upstream: tuple  # ((name, shape, norm), ...) the gradients that arrive at its outputs
    input_shapes: dict  # {forward input: shape}
    grad_shapes: dict  # {gradient sent back, "dX": shape}
    grad_norms: dict  # {gradient sent back, "dX": 2-norm}
    error: float | None  # rel. error (GC.3) of its backward vs central differences; None: no check
    numeric_norm: float | None  # 2-norm of the central-difference gradients
    stopped: dict  # {input: 2-norm of the true derivative the node drops on purpose (sg)}
    copied: bool = False  # the gradient is copied (straight-through), not derived
    note: str = ""
    formula: str = ""  # its forward equation and tag, e.g. "z = mu + eps*exp(logvar/2)  (REP.1)"
    gradient: str = ""  # its backward equations and tags, e.g. "dmu = dz  (REP.2); ..."
    value: str = ""  # what its forward pass computed in this step, e.g. "z (4, 2) norm 1.3"

    @property
    def passed(self) -> bool:
        """A derived node agrees with central differences; a chosen one is exempt by design."""
        return self.copied or self.error is None or self.error <= NODE_TOL


class Tour(list):
    """The nodes of one backward pass, in the order they run, and what they add up to.

    A list of :class:`Node`, plus ``title`` (str), ``loss`` (float), ``grads`` ({name:
    array}, the parameter gradients the nodes produced), ``max_difference`` (float,
    the largest |tour - model.loss_and_grads| over every parameter entry) and
    ``forward`` ({"reconstruction", "kl", "elbo": float, "bound": str}, nats per example,
    empty for the learned prior): the step's forward values.
    """

    def __init__(self, nodes, *, title: str, loss: float, grads: dict, max_difference: float,
                 scale: float, forward: dict | None = None):
        super().__init__(nodes)
        self.title, self.loss, self.grads = title, loss, grads
        self.max_difference, self.scale = max_difference, scale
        self.forward = dict(forward or {})

    @property
    def matches_model(self) -> bool:
        return self.max_difference <= MATCH_TOL * max(1.0, self.scale)

    @property
    def ok(self) -> bool:
        """Every derived node passes its check and the gradients equal the model's."""
        return self.matches_model and all(node.passed for node in self)


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


# ----------------------------------------------------------------------------------
# The machinery: run forwards, then visit nodes backwards, checking each one.


def _d(name: str) -> str:
    return f"d{name}" if "." not in name and " " not in name else f"d({name})"


def _norm(a) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64)))


def _summary(out) -> str:
    """What a forward pass computed: a scalar's value, else each array's shape and 2-norm."""
    outs = out if isinstance(out, tuple) else (out,)
    if len(outs) == 1 and np.ndim(outs[0]) == 0:
        return f"{float(outs[0]):.6g}"
    return ",  ".join(f"{_shape(np.shape(o))} norm {_norm(o):.4g}" for o in outs)


def _contract(dout, out) -> float:
    """sum(dout * out), over every output of a node that has several  (GC.2)."""
    if isinstance(out, tuple):
        return float(sum(np.sum(d * o) for d, o in zip(dout, out)))
    return float(np.sum(dout * out))


class _Chain:
    """The forward records of one step and the nodes of its backward pass."""

    def __init__(self, param_names, max_entries, rng):
        self.records = {}
        self.texts = {}  # {node name: (formula, gradient, value)}
        self.values = {}  # the step's forward values: reconstruction, kl, elbo, bound
        self.nodes = []
        self.grads = {}
        self.param_names = set(param_names)
        self.max_entries, self.rng = max_entries, rng

    def forward(self, name, tags, op, inputs: dict, *, formula="", gradient="", value=None):
        """Run the op's forward on ``inputs`` (in order); keep what backward and the check need.

        formula and gradient are the node's local equations, forward and backward, as the
        tour prints them; value(out) -> str describes the output (default: its shape and
        2-norm, or a scalar's value).
        """
        out, cache = op[0](*inputs.values())
        self.records[name] = (tags, op, inputs, cache)
        self.texts[name] = (formula, gradient, value(out) if value else _summary(out))
        return out

    def numeric(self, name, dout, wrt):
        """Central differences of sum(dout * forward) with respect to the input ``wrt``."""
        _, op, inputs, _ = self.records[name]
        args = {k: (np.array(a, dtype=np.float64) if isinstance(a, np.ndarray)
                    and a.dtype.kind == "f" else a) for k, a in inputs.items()}
        p = args[wrt]
        entries = None
        if self.max_entries is not None and p.size > self.max_entries:
            entries = self.rng.choice(p.size, size=self.max_entries, replace=False)
        grad = numerical_gradient(lambda: _contract(dout, op[0](*args.values())[0]), p,
                                  entries=entries)
        return grad, entries

    def backward(self, name, dout, upstream, grads_of, *, stopped=(), copied=False, note=""):
        """Run one node's backward with this step's ``dout``, check it, and record a Node.

        grads_of names, for each gradient the backward returns, the input it belongs to
        (None: computed but not needed, like dx of the first layer). ``stopped`` lists
        inputs whose gradient the node sets to zero on purpose; the true derivative is
        measured and shown. Returns the backward's gradients, as a tuple.
        """
        tags, op, inputs, cache = self.records[name]
        grads = op[1](dout, cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        errors, numeric_sq = [], 0.0
        grad_shapes, grad_norms = {}, {}
        for inp, g in zip(grads_of, grads):
            if inp is None:
                continue
            grad_shapes[_d(inp)], grad_norms[_d(inp)] = g.shape, _norm(g)
            if inp in self.param_names:
                self.grads[inp] = np.array(g, copy=True)
            num, entries = self.numeric(name, dout, inp)
            ana = g if entries is None else g.reshape(-1)[entries]
            num = num if entries is None else num.reshape(-1)[entries]
            errors.append(rel_error(ana, num))
            numeric_sq += _norm(num) ** 2
        dropped = {inp: _norm(self.numeric(name, dout, inp)[0]) for inp in stopped}
        formula, gradient, value = self.texts.get(name, ("", "", ""))
        self.nodes.append(Node(
            name=name, tags=tuple(tags),
            upstream=tuple((n, np.shape(a), _norm(a)) for n, a in upstream),
            input_shapes={k: np.shape(a) for k, a in inputs.items()},
            grad_shapes=grad_shapes, grad_norms=grad_norms,
            error=max(errors) if errors else None,
            numeric_norm=math.sqrt(numeric_sq) if errors else None,
            stopped=dropped, copied=copied, note=note, formula=formula, gradient=gradient,
            value=value))
        return grads


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


def _likelihood(cfg):
    """(node name, backward tag, op pair, output name) of the decoder's likelihood."""
    if cfg["likelihood"] == "bernoulli":
        return ("likelihood log p(x|z) = log Bernoulli(x; sigmoid(logits))", ("LIK.4",),
                (bernoulli_loglik_forward, bernoulli_loglik_backward), "logits")
    return ("likelihood log p(x|z) = log N(x; mean, sigma2 I)", ("LIK.2",),
            (partial(gaussian_loglik_forward, sigma2=cfg["sigma2"]), gaussian_loglik_backward),
            "mean")


def _likelihood_texts(cfg) -> dict:
    """The likelihood node's equations and the value it shows: the reconstruction term."""
    if cfg["likelihood"] == "bernoulli":
        formula = "logp_n = sum_d x_nd l_nd - softplus(l_nd), l = logits  (LIK.3)"
        gradient = "dl = dlogp (x - sigmoid(l))  (LIK.4)"
    else:
        s2 = f"{cfg['sigma2']:g}"
        formula = (f"logp_n = -||x_n - m_n||^2 / (2 s2) - (D/2) log(2 pi s2), m = mean, "
                   f"s2 = {s2}  (LIK.1)")
        gradient = "dm = dlogp (x - m) / s2  (LIK.2)"
    return dict(formula=formula, gradient=gradient, value=lambda logp: (
        f"logp {_shape(logp.shape)}, mean {logp.mean():.6g}: reconstruction term "
        f"-mean_n logp_n = {-logp.mean():.6g} nats"))


def _loss_value(recon, kl, elbo):
    """The loss node's value: the loss, and the ELBO from the same forward pass."""
    return lambda loss: (f"loss {float(loss):.6g};  reconstruction {recon:.6g} + KL {kl:.6g}: "
                         f"ELBO {elbo:.6g}")


# ----------------------------------------------------------------------------------
# The three chains, each in the order its model's loss_and_grads runs it.


def _tour_vae(c, model, x, eps):
    cfg, z_dim = model.config, model.latent
    w = kl_weight(cfg["beta"], cfg["warmup_steps"], None)
    lik_name, lik_tags, lik_op, out_name = _likelihood(cfg)
    free_bits = cfg["free_bits"]
    loss_name = ("loss = mean(-logp) + w*sum_j max(lambda, mean(KL_j))" if free_bits > 0
                 else "loss = mean(-logp) + w*mean(KL)")

    # ---- forward
    enc = _mlp_forward(c, model, "enc", x, "x", "enc.out")  # (N, 2Z)
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
    out = _mlp_forward(c, model, "dec", z, "z", out_name)  # (N, D)
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
    dz = _mlp_backward(c, model, "dec", dout, "z", out_name)
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
    _mlp_backward(c, model, "enc", denc, "x", "enc.out", need_dx=False)
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


def _tour_vqvae(c, model, x):
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
    h = _mlp_forward(c, model, "enc", x, "x", "z_e")  # (N, M Dz)
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
    out = _mlp_forward(c, model, "dec", z_q.reshape(n, -1), "z_q", out_name)
    logp = c.forward(lik_name, lik_tags, lik_op, {out_name: out, "x": x},
                     **_likelihood_texts(cfg))
    recon, kl_term = -float(logp.mean()), model.M * math.log(model.K)
    c.values = dict(reconstruction=recon, kl=kl_term, elbo=-(recon + kl_term),
                    bound="a lower bound on log p(x) under the uniform prior over codes, whose "
                          "KL is the constant M log K  (VQVAE.1)")
    loss = c.forward(loss_name, ("VQVAE.2",), (partial(vq_objective_forward, ema=cfg["ema"]),
                                               vq_objective_backward),
                     {"logp": logp, "codebook_loss": cb, "commitment_loss": cm},
                     formula="loss = -mean_n logp_n + sum_r cb_r / N + sum_r cm_r / N  (VQVAE.2)"
                     + ("; under EMA without the cb term (VQ.6)" if cfg["ema"] else ""),
                     gradient="dlogp = -1/N;  dcb = " + ("0" if cfg["ema"] else "1/N")
                     + ";  dcm = 1/N  (VQVAE.2)",
                     value=lambda loss: (f"loss {float(loss):.6g} (not -ELBO: it adds the "
                                         f"codebook and commitment terms);  ELBO "
                                         f"{-(recon + kl_term):.6g} = -(reconstruction "
                                         f"{recon:.6g} + KL M log K = {kl_term:.6g})"))

    # ---- reverse
    dlogp, dcb, dcm = c.backward(loss_name, 1.0, (("dloss", 1.0),),
                                 ("logp", "codebook_loss", "commitment_loss"),
                                 note="the codebook term is left out under EMA (VQ.6)"
                                 if cfg["ema"] else "")
    (dout,) = c.backward(lik_name, dlogp, (("dlogp", dlogp),), (out_name,))
    dzq = _mlp_backward(c, model, "dec", dout, "z_q", out_name).reshape(R, Dz)  # (R, Dz)
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
    if cfg["ema"]:
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
    _mlp_backward(c, model, "enc", dz_e.reshape(n, -1), "x", "z_e", need_dx=False)
    return float(loss)


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
        last = model._last  # loss_and_grads below leaves state for after_step: put it back
        loss = _tour_vqvae(c, model, x)
        model_loss, model_grads, _ = model.loss_and_grads(x)
        model._last = last
    elif isinstance(model, (VAE, Autoencoder)):
        needs_eps = isinstance(model, VAE) or model.config["sampled"]
        if needs_eps and eps is None:
            eps = np.random.default_rng(0).standard_normal((n, model.latent))
        eps = model.check_eps(eps, (n, model.latent)) if needs_eps else None
        walk = _tour_vae if isinstance(model, VAE) else _tour_ae
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
    cfg, p = model.config, model.params
    if cfg["kind"] == "made":
        from .tour_prior import prior_title
        return prior_title(model, x)
    n, d = x.shape
    side = math.isqrt(d)
    what = f" ({side}x{side} images)" if side * side == d else ""
    extra = ""
    if cfg["kind"] == "vqvae":
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
    kind = cfg["kind"]
    if prefix == "enc":
        start = f"{first} inputs"
        if kind == "vqvae":
            end = f"{last} = {model.M} code vectors of size {model.Dz}"
        elif kind == "ae":
            end = f"{last} = the code, {last} latents"
        else:
            end = f"{last} = mu and log sigma^2 for {last // 2} latents"
    else:
        start = (f"{first} = the {model.M} chosen codes of size {model.Dz}" if kind == "vqvae"
                 else f"{first} latents in")
        end = (f"{last} = logits of {last} Bernoulli pixels" if cfg["likelihood"] == "bernoulli"
               else f"{last} = means of {last} Gaussian pixels, variance {cfg['sigma2']:g}")
    name = "encoder" if prefix == "enc" else "decoder"
    return f"{name} {'-'.join(map(str, sizes))}: {start}, {middle}, {end}"


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
    from .models import build

    given = {"likelihood": likelihood is not None, "sampled": bool(sampled),
             "metric": metric is not None}
    allowed = {"likelihood": ("ae", "vqvae"), "sampled": ("ae",), "metric": ("vqvae",)}
    for option, kinds in allowed.items():
        if given[option] and kind not in kinds:
            raise ValueError(f"{option} (--{option}) is for {' or '.join(kinds)}, not {kind}")
    if likelihood not in (None, "bernoulli", "gaussian"):
        raise ValueError(f"likelihood must be bernoulli or gaussian, got {likelihood!r}")
    if metric not in (None, "euclidean", "dot"):
        raise ValueError(f"metric must be euclidean or dot, got {metric!r}")
    if kind == "made":  # the learned prior: one-hot codes, M = 4 positions of K = 4 codes
        from .tour_prior import prior_tour_model
        return prior_tour_model(batch, seed)
    rng = np.random.default_rng(seed)
    cfg = dict(kind=kind, data_dim=int(data_dim), hidden=[16], dtype="float64")
    if kind == "vqvae":
        cfg.update(num_codes=8, code_dim=2, num_vectors=2, likelihood=likelihood or "bernoulli",
                   metric=metric or "euclidean")
    elif kind == "ae":
        cfg.update(latent=2, likelihood=likelihood or "bernoulli", sampled=bool(sampled))
    elif kind in ("vae-gaussian", "vae-bernoulli"):
        cfg.update(latent=2)
    else:
        raise ValueError(f"kind must be vae-gaussian, vae-bernoulli, ae or vqvae, got {kind!r}")
    model = build(cfg, rng=seed)
    x = rng.uniform(0.05, 0.95, size=(int(batch), int(data_dim)))
    eps = None if kind == "vqvae" else rng.standard_normal((int(batch), 2))
    return model, x, eps


def _shape(s) -> str:
    return "()" if s == () else str(tuple(s))


def _row(lines, label, items, width=92, keep_items=True):
    """A labelled line of the node table, wrapped under its label (never inside an item)."""
    nbsp = "\u00a0"
    text = ",  ".join(item.replace(" ", nbsp) if keep_items else item for item in items)
    lines += [line.replace(nbsp, " ") for line in textwrap.wrap(
        text, width=width, initial_indent=f"       {label:<10}", subsequent_indent=" " * 17,
        break_on_hyphens=False)]


def format_tour(nodes) -> str:
    """The tour as text: a block per node, then the comparison with ``loss_and_grads``."""
    lines = []
    title = getattr(nodes, "title", None)
    if title:
        lines += [title, f"loss {nodes.loss:.6g} nats per example"]
        values = getattr(nodes, "forward", None)
        if values:
            lines += [f"forward, nats per example: reconstruction -mean log p(x|z) = "
                      f"{values['reconstruction']:.6g}, KL = {values['kl']:.6g}, ELBO = "
                      f"{values['elbo']:.6g}", f"  the ELBO here is {values['bound']}"]
        lines.append("")
    lines += ["The backward pass, node by node, from the loss to the first layer. Tags in",
              "parentheses are equations derived in docs/derivations.md. At each node:",
              "forward, its local equation; backward, the gradients it sends back; value, what",
              "its forward pass computed in this step. A norm is the 2-norm of a gradient array,",
              "the square root of the sum of its squared entries: under upstream, of the",
              "gradient arriving at the node's output; under sends, of each gradient it sends",
              "back to an input. Each node's backward is checked on its own: central",
              f"differences (h = {H:g}, extrapolated) of sum(dout * forward(inputs)), dout being",
              "the gradient that reached the node.", ""]
    for i, node in enumerate(nodes, 1):
        tags = "(" + ", ".join(node.tags) + ")"
        lines.append(f"{i:>3}. {node.name:<62} {tags}")
        if node.formula:
            _row(lines, "forward", [node.formula], keep_items=False)
        if node.gradient:
            _row(lines, "backward", [node.gradient], keep_items=False)
        if node.value:
            _row(lines, "value", [node.value], keep_items=False)
        if node.upstream:
            _row(lines, "upstream", [f"{name} {_shape(s)} norm {v:.4g}"
                                     for name, s, v in node.upstream])
        _row(lines, "inputs", [f"{k} {_shape(s)}" for k, s in node.input_shapes.items()])
        _row(lines, "copies" if node.copied else "sends",
             [f"{k} {_shape(s)} norm {node.grad_norms[k]:.4g}"
              for k, s in node.grad_shapes.items()])
        for k, v in node.stopped.items():
            _row(lines, "stopped", [f"{_d(k)} = 0 by sg[.], chosen; the true derivative has "
                                    f"norm {v:.4g}"], keep_items=False)
        if node.copied:
            _row(lines, "check", [f"copied, not derived: central differences give norm "
                                  f"{node.numeric_norm:.1e} (rel. error {node.error:.1f}, as "
                                  f"expected)"], keep_items=False)
        elif node.error is None:
            _row(lines, "check", ["none (nothing is computed here)"])
        else:
            verdict = "ok" if node.passed else f"FAIL (> {NODE_TOL:g})"
            _row(lines, "check", [f"rel. error {node.error:.1e}  {verdict}"])
        if node.note:
            _row(lines, "note", [node.note], keep_items=False)
    if hasattr(nodes, "max_difference"):
        failed = [node.name for node in nodes if not node.passed]
        worst = max((nd.error for nd in nodes if nd.error is not None and not nd.copied),
                    default=0.0)
        copied = sum(nd.copied for nd in nodes)
        lines.append("")
        if nodes.matches_model:
            lines.append(f"the tour's gradients match model.loss_and_grads: max difference "
                         f"{nodes.max_difference:.1e} over {len(nodes.grads)} parameters")
        else:
            lines.append(f"MISMATCH: the tour's gradients differ from model.loss_and_grads by "
                         f"up to {nodes.max_difference:.1e}")
        if failed:
            lines.append(f"FAILED: {len(failed)} node(s) above {NODE_TOL:g}: {'; '.join(failed)}")
        else:
            lines.append(f"every derived node agrees with central differences (largest error "
                         f"{worst:.1e} <= {NODE_TOL:g})")
            if copied:
                lines.append(f"{copied} node copies its gradient by design, the straight-through "
                             f"estimator (VQ.3)")
    if title:
        lines.append("Every tag above is derived, with its code and its test, in "
                     "docs/derivations.md.")
    return "\n".join(lines)
