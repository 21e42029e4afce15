"""The machinery every tour shares: a node of the backward pass, the chain that runs and
checks the nodes, the likelihood and loss nodes' texts, and the tour as text.

:mod:`npvae.tour` walks the MLP models with it, :mod:`npvae.tour_conv` the convolutional
ones, :mod:`npvae.tour_prior` the learned prior. Each node is an op pair
``(forward, backward)``; the chain runs the forward passes in order, then each backward
with the gradient that really reached it, and checks it alone by central differences
(GC.1, GC.4) of sum(dout * forward(inputs)) (GC.2).
"""
from __future__ import annotations

import math
import textwrap
from functools import partial
from typing import Callable, NamedTuple

import numpy as np

from .gradcheck import H, numerical_gradient, rel_error
from .ops.likelihoods import (
    bernoulli_loglik_backward, bernoulli_loglik_forward, gaussian_loglik_backward,
    gaussian_loglik_forward,
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


class Networks(NamedTuple):
    """A VQ-VAE's two networks as tour nodes; z_e and z_q travel as (N, M Dz), M rows each.

    enc_forward(c, model, x) -> z_e;  enc_backward(c, model, dz_e);
    dec_forward(c, model, z_q, out_name) -> out (N, D);  dec_backward(c, model, dout,
    out_name) -> dz_q.  npvae.tour has the MLP's, npvae.tour_conv the convolutional ones.
    """

    enc_forward: Callable
    enc_backward: Callable
    dec_forward: Callable
    dec_backward: Callable


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
