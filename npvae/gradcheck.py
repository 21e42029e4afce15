"""Compare hand-written gradients with central differences.

The central difference of a scalar function f at entry i of an array p,

    D(h) = (f(p + h e_i) - f(p - h e_i)) / (2 h)  =  df/dp_i + c h^2 + O(h^4)     (GC.1)

is an independent estimate of the gradient. Its error has two parts: truncation, c h^2,
and rounding, about 1e-16 |f| / h. Combining two step sizes cancels the h^2 term
(Richardson extrapolation),

    (4 D(h/2) - D(h)) / 3  =  df/dp_i + O(h^4)                                   (GC.4)

so a larger step, h = 1e-4, can be used, and rounding stays near 1e-12 |f|. That
matters for small gradients: the check is relative to the gradient's size. For an op with an array output y, the
scalar is f = sum(g * y) with a *random* upstream gradient g, so that every entry of y
matters; with g = 1 a wrong backward can still sum to the right answer (GC.2).

The error reported is

    rel_error(a, n) = max_i |a_i - n_i| / max(max_i |a_i|, max_i |n_i|, tiny)     (GC.3)

the largest absolute disagreement, measured against the scale of the gradient. Work in
float64: with (GC.4) and h = 1e-4 a correct backward gives ~1e-9 or better, and a wrong one gives
something of order one. Keep inputs further than h from kinks (ReLU at 0) and ties.

Typical use on an op pair::

    errors = check_op(linear_forward, linear_backward, [x, W, b], rng=rng)
    # {'arg0': 3e-11, 'arg1': 2e-11, 'arg2': 1e-11}

and on a model (anything with ``params``, ``loss`` and ``loss_and_grads``)::

    for row in check_model(model, x, eps=eps): print(row)
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

TINY = 1e-30


def rel_error(analytic, numeric) -> float:
    """max |a - n| / max(max |a|, max |n|)  (GC.3); 0 when both are all zeros."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"analytic and numeric must have the same shape, got {a.shape} and {n.shape}")
    if a.size == 0:
        return 0.0
    scale = max(np.abs(a).max(), np.abs(n).max(), TINY)
    return float(np.abs(a - n).max() / scale)


H = 1e-4  # the default step: see (GC.4)


def numerical_gradient(f: Callable[[], float], p: np.ndarray, h: float = H,
                       entries: np.ndarray | None = None, richardson: bool = True) -> np.ndarray:
    """Central differences of the scalar ``f()`` with respect to ``p`` (GC.1), extrapolated (GC.4).

    ``richardson=False`` gives the plain central difference (GC.1) with step h.

    ``p`` is perturbed in place and restored exactly, so ``f`` must read the current
    values of ``p``. ``entries`` (flat indices) limits the work to some entries; the
    others are left at zero.
    """
    if p.dtype != np.float64:
        raise ValueError(f"p must be float64 for a gradient check, got {p.dtype}")
    flat = p.reshape(-1)
    if not np.shares_memory(flat, p):
        raise ValueError("p must be contiguous so it can be perturbed in place")
    def central(i, step):
        old = flat[i]
        flat[i] = old + step
        f_plus = float(f())
        flat[i] = old - step
        f_minus = float(f())
        flat[i] = old  # restored exactly
        return (f_plus - f_minus) / (2.0 * step)  # (GC.1)

    grad = np.zeros(p.size)
    for i in range(p.size) if entries is None else entries:
        if richardson:
            grad[i] = (4.0 * central(i, h / 2) - central(i, h)) / 3.0  # (GC.4)
        else:
            grad[i] = central(i, h)
    return grad.reshape(p.shape)


def check_op(forward: Callable, backward: Callable, args: Sequence, *,
             wrt: Sequence[int] | None = None, rng: np.random.Generator | None = None,
             h: float = H, kwargs: dict | None = None) -> dict:
    """Check ``backward`` of an op pair against central differences.

    ``forward(*args, **kwargs) -> (out, cache)`` and ``backward(dout, cache)`` returning
    the gradients of the forward inputs in order (a lone array for a single input).
    ``wrt`` lists which positional arguments to check (default: every float64 array).
    Returns ``{"arg<i>": rel_error}``.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    kwargs = kwargs or {}
    args = list(args)
    if wrt is None:
        wrt = [i for i, a in enumerate(args) if isinstance(a, np.ndarray) and a.dtype == np.float64]
    out, cache = forward(*args, **kwargs)
    g = rng.standard_normal(np.shape(out))  # random upstream gradient  (GC.2)
    grads = backward(g, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)

    def f():
        return np.sum(g * forward(*args, **kwargs)[0])  # f = sum(g * y)  (GC.2)

    errors = {}
    for i in wrt:
        numeric = numerical_gradient(f, args[i], h)
        errors[f"arg{i}"] = rel_error(grads[i], numeric)
    return errors


class GradRow(NamedTuple):
    """One parameter's comparison: the analytic and numerical gradient norms and their error."""

    name: str
    analytic_norm: float
    numeric_norm: float
    rel_error: float
    entries: int

    def __str__(self):
        return (f"{self.name:<14} |analytic| {self.analytic_norm:11.4e}  "
                f"|numeric| {self.numeric_norm:11.4e}  rel.err {self.rel_error:9.2e}  "
                f"({self.entries} entries)")


def check_model(model, x, *, eps=None, h: float = H, max_entries: int | None = None,
                rng: np.random.Generator | None = None, keys: Sequence[str] | None = None,
                **loss_kwargs) -> list:
    """Check every parameter gradient of ``model.loss_and_grads`` against central differences.

    The model's parameters must be float64. ``eps`` (the model's noise) is held fixed so
    the loss is a deterministic function of the parameters. ``max_entries`` checks a
    random subset of each parameter's entries (all when None). Returns one
    :class:`GradRow` per parameter, in the order of ``model.params``.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    params = model.params

    # A model whose gradient is chosen rather than derived (the VQ-VAE's straight-through
    # estimator) provides the function whose true gradient its backward computes.
    surrogate = getattr(model, "straight_through_objective", None)
    if surrogate is not None:
        loss = surrogate(x)
    else:
        def loss():  # the forward chain alone
            return model.loss(x, eps=eps, **loss_kwargs)

    _, grads, _ = model.loss_and_grads(x, eps=eps, **loss_kwargs)
    grads = {k: np.array(g, dtype=np.float64, copy=True) for k, g in grads.items()}
    if set(grads) != set(params):
        raise ValueError(
            f"grads must have exactly the keys of params; missing {sorted(set(params) - set(grads))}, "
            f"extra {sorted(set(grads) - set(params))}"
        )
    rows = []
    for name in keys if keys is not None else list(params):
        p = params[name]
        entries = None
        if max_entries is not None and p.size > max_entries:
            entries = rng.choice(p.size, size=max_entries, replace=False)
        numeric = numerical_gradient(loss, p, h, entries)
        analytic = grads[name]
        if entries is not None:
            analytic = analytic.reshape(-1)[entries]
            numeric = numeric.reshape(-1)[entries]
        rows.append(GradRow(name, float(np.linalg.norm(analytic)), float(np.linalg.norm(numeric)),
                            rel_error(analytic, numeric), p.size if entries is None else len(entries)))
    return rows
