"""The tour of the learned prior's backward pass (``npvae tour made``), node by node.

The prior (:class:`npvae.models.MADEPrior`) is a chain of masked linear layers (MADE.4-5),
activations (ACT), the concatenation [h_L, x] that gives the output layer its direct
path from the codes, and a softmax cross-entropy at every position (XENT.1-2). Each node
is an op pair checked by :class:`npvae.tour._Chain` like the other models' nodes; the
masks are constants and get no gradient, and the one-hot codes x are data.

Letters: N batch, M positions, K codes, H hidden width.
"""
from __future__ import annotations

from functools import partial

import numpy as np

from .ops.activations import TAGS as ACT_TAG
from .ops.activations import activation_backward, activation_forward
from .ops.masked import masked_linear_backward, masked_linear_forward
from .ops.softmax import softmax_xent_backward, softmax_xent_forward


def concat_forward(h, x):
    """[h, x] (N, H + M K): the output layer reads the last hidden layer and the codes."""
    return np.concatenate([h, x], axis=1), h.shape[1]


def concat_backward(dhx, width):
    """d[h, x] -> dh (N, H), dx (N, M K): the two column blocks."""
    return dhx[:, :width], dhx[:, width:]


def position_xent_forward(logits, target, num_codes):
    """logits (N, M K) read as (N, M, K); xent (N, M) at every position  (XENT.1)."""
    n = logits.shape[0]
    return softmax_xent_forward(logits.reshape(n, -1, num_codes), target)


def position_xent_backward(dxent, cache):
    """dxent (N, M) -> dlogits (N, M K)  (XENT.2); the target codes get none."""
    dlogits, _ = softmax_xent_backward(dxent, cache)
    return dlogits.reshape(dlogits.shape[0], -1), None


def prior_objective_forward(xent):
    """loss () = (1/N) sum_n sum_m xent_nm = mean_n -log p(c_n)  (MADE.1)."""
    return np.asarray(xent.sum() / xent.shape[0]), xent.shape


def prior_objective_backward(dloss, shape):
    """dloss () -> dxent (N, M) = dloss / N everywhere."""
    return np.full(shape, dloss / shape[0])


def tour_prior(c, model, x) -> float:
    """Forward, then every node of the backward pass, for a MADEPrior on one-hot codes x."""
    p, act, n = model.params, model.config["activation"], x.shape[0]
    idx = model.codes_of(x)  # (N, M)
    layers = len(model.masks) - 1
    masked = (masked_linear_forward, masked_linear_backward)  # the mask gets None: a constant
    loss_name = "loss = mean_n sum_m xent (= mean -log p(c))"
    xent_name = "softmax cross-entropy at each position"
    concat_name = "concatenation [h, x] (the direct path)"
    out_name = "out masked linear [h, x] (W*A) + b"

    masked_backward = ("dh = da (W*A)^T;  dW = (h^T da)*A;  db = sum_n da  (MADE.5); the mask "
                       "is a constant")
    tag = ACT_TAG[act]

    # ---- forward
    h, h_name = x, "x"
    for i in range(layers):
        a = c.forward(f"hid.{i} masked linear h (W*A) + b", ("MADE.2", "MADE.5"), masked,
                      {h_name: h, f"hid.{i}.W": p[f"hid.{i}.W"], f"hid.{i}.mask": model.masks[i],
                       f"hid.{i}.b": p[f"hid.{i}.b"]},
                      formula="a = h (W*A) + b, A the mask of (MADE.2)  (MADE.4)",
                      gradient=masked_backward)
        h = c.forward(f"hid.{i} {act}", (tag,), (partial(activation_forward, name=act),
                                                 activation_backward), {f"hid.{i}.a": a},
                      formula=f"h = {act}(a)  ({tag})", gradient=f"da = dh * {act}'(a)  ({tag})")
        h_name = f"hid.{i}.out"
    concat = layers and model.direct  # the output layer reads [h, x]; else h alone, or x
    if concat:
        hx, hx_name = c.forward(concat_name, ("MADE.3",), (concat_forward, concat_backward),
                                {h_name: h, "x": x},
                                formula="[h, x]: the last hidden layer beside the codes  (MADE.3)",
                                gradient="dh = d[h, x][:, :H]; x is data"), "[h, x]"
    else:
        hx, hx_name = h, h_name  # h = x when there is no hidden layer
        out_name = out_name.replace("[h, x]", "h" if layers else "x")
    logits = c.forward(out_name, ("MADE.3", "MADE.5"), masked,
                       {hx_name: hx, "out.W": p["out.W"],
                        "out.mask": model.masks[-1], "out.b": p["out.b"]},
                       formula=f"logits = {hx_name} (W*A) + b, A the strict mask of (MADE.3)  "
                               "(MADE.4)", gradient=masked_backward)
    xent = c.forward(xent_name, ("XENT.2",), (partial(position_xent_forward, num_codes=model.K),
                                              position_xent_backward),
                     {"logits": logits, "codes": idx},
                     formula="xent_nm = lse(l_nm) - l_nm[c_nm], l_nm the K logits of position m  "
                             "(XENT.1)",
                     gradient="dl_nm = dxent_nm (softmax(l_nm) - onehot(c_nm))  (XENT.2)",
                     value=lambda xe: (f"xent {xe.shape}, mean_n sum_m xent_nm = "
                                       f"{xe.sum(axis=1).mean():.6g} nats = mean_n -log p(c_n)"))
    loss = c.forward(loss_name, ("MADE.1",), (prior_objective_forward, prior_objective_backward),
                     {"xent": xent},
                     formula="loss = (1/N) sum_n sum_m xent_nm = mean_n -log p(c_n)  (MADE.1)",
                     gradient="dxent = 1/N  (MADE.1)")

    # ---- reverse
    (dxent,) = c.backward(loss_name, 1.0, (("dloss", 1.0),), ("xent",),
                          note=f"each example enters with a factor 1/N = 1/{n}")
    dlogits, _ = c.backward(xent_name, dxent, (("dxent", dxent),), ("logits", None),
                            note=f"logits (N, M K) read as (N, {model.M}, {model.K}); dlogits = "
                                 f"softmax - one-hot; the target codes get no gradient")
    dhx, _, _, _ = c.backward(out_name, dlogits, (("dlogits", dlogits),),
                              (hx_name if layers else None, "out.W", None, "out.b"),
                              note="dW = ([h, x]^T dlogits) * A: a masked weight gets exactly 0; "
                                   "the mask is a constant")
    if not layers:
        return float(loss)
    if concat:
        dh, _ = c.backward(concat_name, dhx, (("d[h, x]", dhx),), (h_name, None),
                           note="x is data: its block of the gradient is not needed")
    else:
        dh = dhx  # the output layer read h alone
    for i in reversed(range(layers)):
        (da,) = c.backward(f"hid.{i} {act}", dh, ((f"d(hid.{i}.out)", dh),), (f"hid.{i}.a",))
        dh, _, _, _ = c.backward(f"hid.{i} masked linear h (W*A) + b", da, ((f"d(hid.{i}.a)", da),),
                                 (None if i == 0 else f"hid.{i - 1}.out", f"hid.{i}.W", None,
                                  f"hid.{i}.b"),
                                 note="x is data: its gradient is not needed" if i == 0 else "")
    return float(loss)


def prior_tour_model(batch: int = 4, seed: int = 0, num_codes: int = 4, num_vectors: int = 4):
    """A small float64 prior (K = 4 codes, M = 4 positions, 16 hidden units), one-hot codes x."""
    from .models import MADEPrior

    rng = np.random.default_rng(seed)
    model = MADEPrior(num_codes=num_codes, num_vectors=num_vectors, hidden=(16,),
                      dtype=np.float64, rng=seed)
    x = model.one_hot(rng.integers(num_codes, size=(int(batch), num_vectors)))
    return model, x, None


def prior_title(model, x) -> str:
    n = x.shape[0]
    sizes = "-".join(str(s) for s in [model.M * model.K, *model.hidden, model.M * model.K])
    return (f"made: one training step of the learned prior on {n} code sequences, float64\n"
            f"M = {model.M} positions of K = {model.K} codes, one-hot input; masked layers "
            f"{sizes}{' plus the direct path' if model.direct else ''}, "
            f"{model.config['activation']}")
