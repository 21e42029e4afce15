"""Optimizers that update a parameter dict in place from a gradient dict with the same keys.

With g the gradient plus the L2 term (g <- g + wd * p, the gradient of wd/2 ||p||^2):

SGD with momentum mu (Sutskever et al. 2013, in the form PyTorch uses):

    b <- mu b + g                                                            (SGD.1)
    p <- p - lr * (g + mu b)   if nesterov,   p <- p - lr * b   otherwise     (SGD.2)

(with mu = 0, b = g and both read p <- p - lr g).

Adam (Kingma & Ba 2015, Algorithm 1), at step t = 1, 2, ...:

    m <- beta1 m + (1 - beta1) g                                             (ADAM.1)
    v <- beta2 v + (1 - beta2) g^2                                           (ADAM.2)
    m^ = m / (1 - beta1^t),   v^ = v / (1 - beta2^t)                         (ADAM.3)
    p <- p - lr m^ / (sqrt(v^) + eps)                                        (ADAM.4)

When ``params`` and ``grads`` are both :class:`~npvae.params.FlatDict` with the same
layout, a step is one fused pass over ``params.flat``; otherwise it loops over the keys
with the same arithmetic, so both routes give the same numbers. Parameters are always
updated in place, so views into ``params.flat`` stay valid.

``state_dict()`` returns only NumPy arrays under string keys (``np.savez`` with
``allow_pickle=False`` can store it); ``load_state_dict`` restores it exactly, so a run
resumed from a checkpoint continues bit for bit as if it had never stopped.
docs/derivations.md, sections SGD and ADAM.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from . import _validate as v
from .backend import dispatch, numba_kernel
from .params import FlatDict

# ----------------------------------------------------------------------------------
# Gradient clipping


def _sumsq(a):
    """sum(a**2) accumulated in float64, for a 1-D array, in cache-sized float64 pieces.

    NumPy alone: a compiled twin gained 1.2x (benchmarks/RESULTS.md, M1)."""
    total = 0.0
    for start in range(0, a.shape[0], 1 << 15):
        piece = a[start:start + (1 << 15)].astype(np.float64)
        total += float(piece @ piece)
    return total


def clip_grad_norm(grads, max_norm) -> float:
    """Scale all gradients together so their global L2 norm is at most ``max_norm`` (CLIP.1).

    grads: a FlatDict (its ``flat`` buffer is used) or a dict of arrays, changed in place.
    ``max_norm`` None or inf only measures. Returns the norm before clipping. A non-finite
    norm is returned as is and nothing is scaled, so the caller can skip the step.
    """
    if max_norm is not None:
        max_norm = float(max_norm)
        if not max_norm > 0.0:
            raise ValueError(f"max_norm must be > 0 (or None/inf for no clipping), got {max_norm}")
    arrays = [grads.flat] if isinstance(grads, FlatDict) else list(grads.values())
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
            raise ValueError("grads must hold floating-point numpy arrays")
    sq = 0.0
    for a in arrays:
        sq += _sumsq(np.ascontiguousarray(a).reshape(-1))  # in float64 for any dtype
    norm = math.sqrt(sq)
    if max_norm is not None and math.isfinite(max_norm) and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / norm
        for a in arrays:
            a *= a.dtype.type(scale)
    return norm


# ----------------------------------------------------------------------------------
# Kernel pair: one Adam step over 1-D arrays, in place (the NumPy twin also takes any
# shape). Every scalar arrives in the parameter dtype, so float32 parameters are
# updated in float32 arithmetic.


def _flush_numpy(a, tiny):
    """Set entries with |a| < tiny (the smallest normal number) to zero, in place (FTZ.1).

    NaN and inf fail the comparison and are kept, so a bad value still shows.
    """
    np.copyto(a, 0, where=np.abs(a) < tiny)


def _adam_numpy(p, g, m, v, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                bias1, bias2, eps, weight_decay, tiny):
    """Update p, m, v in place by (ADAM.1-4); bias1 = 1 - beta1^t, bias2 = 1 - beta2^t.

    ``tiny`` is the dtype's smallest normal number: the moments are flushed to zero below
    it (FTZ.1), so they never decay into subnormals, which cost some CPUs ~100x per op.
    Returns the number of non-finite entries of g (the update is made all the same).
    """
    bad = int(g.size - np.count_nonzero(np.isfinite(g)))
    if weight_decay != 0:
        g = g + weight_decay * p  # L2 term
    m *= beta1
    m += one_minus_beta1 * g  # (ADAM.1)
    _flush_numpy(m, tiny)  # (FTZ.1)
    v *= beta2
    v += one_minus_beta2 * g * g  # (ADAM.2)
    _flush_numpy(v, tiny)  # (FTZ.1)
    m_hat = m / bias1  # (ADAM.3)
    v_hat = v / bias2  # (ADAM.3)
    p -= lr * m_hat / (np.sqrt(v_hat) + eps)  # (ADAM.4)
    return bad


@numba_kernel
def _adam_numba(p, g, m, v, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                bias1, bias2, eps, weight_decay, tiny):
    """Same as _adam_numpy, one loop, the same operations in the same order."""
    zero = tiny - tiny  # 0 in the parameter dtype (a literal 0.0 would widen float32)
    bad = 0  # non-finite gradient entries, counted in the same pass
    for i in range(p.shape[0]):
        gi = g[i]
        bad += (gi - gi) != zero  # NaN for NaN and +-inf, 0 otherwise
        if weight_decay != 0:
            gi = gi + weight_decay * p[i]
        mi = beta1 * m[i] + one_minus_beta1 * gi  # (ADAM.1)
        mi = zero if abs(mi) < tiny else mi  # (FTZ.1): NaN fails the test and is kept
        vi = beta2 * v[i] + one_minus_beta2 * gi * gi  # (ADAM.2)
        vi = zero if vi < tiny else vi  # (FTZ.1): v >= 0
        m[i] = mi
        v[i] = vi
        m_hat = mi / bias1  # (ADAM.3)
        v_hat = vi / bias2  # (ADAM.3)
        p[i] = p[i] - lr * m_hat / (np.sqrt(v_hat) + eps)  # (ADAM.4)
    return bad


adam_kernel = dispatch(_adam_numpy, _adam_numba)


def _sgd_update(p, g, buf, lr, momentum, weight_decay, nesterov):
    """One SGD step in place on arrays of any shape; buf may be None when momentum is 0.

    Returns the number of non-finite entries of g.
    """
    bad = int(g.size - np.count_nonzero(np.isfinite(g)))
    if weight_decay != 0:
        g = g + weight_decay * p  # L2 term
    if buf is None:
        p -= lr * g  # (SGD.2) with mu = 0
        return bad
    buf *= momentum
    buf += g  # (SGD.1)
    _flush_numpy(buf, np.finfo(buf.dtype).tiny)  # (FTZ.1)
    if nesterov:
        p -= lr * (g + momentum * buf)  # (SGD.2)
    else:
        p -= lr * buf  # (SGD.2)
    return bad


# ----------------------------------------------------------------------------------
# Shared machinery: checks, the fused/per-key choice, state save and restore


def _check_number(name, value, lo, hi, lo_open=False, hi_open=False) -> float:
    x = float(value)
    ok = math.isfinite(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {left}{lo}, {hi}{right}, got {value}")
    return x


class Optimizer:
    """Base class: holds ``params``, the step count and the per-parameter buffers.

    Subclasses set ``kind``, ``_hyper`` (names of float hyperparameters saved in the
    state) and ``_buffers`` (name -> dict of arrays, one per parameter key), and
    implement ``_step_flat`` and ``_step_key``.
    """

    kind = ""
    _hyper: tuple = ()

    def __init__(self, params):
        if not isinstance(params, Mapping) or not params:
            raise ValueError("params must be a non-empty dict of numpy arrays")
        for key, p in params.items():
            if not isinstance(key, str):
                raise ValueError(f"params keys must be strings, got {key!r}")
            v.array(f"params[{key!r}]", p)
        self.params = params
        self.step_count = 0
        self._buffers: dict[str, dict] = {}

    def _new_buffer(self):
        """Zeros shaped like params: a FlatDict when params is one (so it can be fused)."""
        if isinstance(self.params, FlatDict):
            return self.params.zeros_like()
        return {k: np.zeros(p.shape, dtype=p.dtype) for k, p in self.params.items()}

    def _check_grads(self, grads) -> bool:
        """Validate keys and shapes; True when one fused pass over ``.flat`` is possible."""
        if not isinstance(grads, Mapping):
            raise ValueError(f"grads must be a dict of arrays, got {type(grads).__name__}")
        if grads.keys() != self.params.keys():
            missing = [k for k in self.params if k not in grads]
            extra = [k for k in grads if k not in self.params]
            raise ValueError(
                f"grads must have exactly the keys of params; missing: {missing}, extra: {extra}"
            )
        for key, p in self.params.items():
            g = grads[key]
            if not isinstance(g, np.ndarray) or g.dtype.kind != "f":
                raise ValueError(f"grads[{key!r}] must be a floating-point numpy array")
            if g.shape != p.shape:
                raise ValueError(
                    f"grads[{key!r}] must have the shape of params[{key!r}], "
                    f"{p.shape}, got {g.shape}"
                )
        return (
            isinstance(self.params, FlatDict)
            and isinstance(grads, FlatDict)
            and list(grads.shapes.items()) == list(self.params.shapes.items())
        )

    def step(self, grads) -> int:
        """Update ``params`` in place from ``grads`` (same keys and shapes).

        Returns the number of non-finite gradient entries (NaN or +-inf), found in the
        same pass as the update: 0 on a healthy step. When it is not 0 the update has
        been made, so the parameters hold non-finite values and should be discarded.
        """
        fused = self._check_grads(grads)
        self._check_hyper()
        self.step_count += 1
        if fused:
            p = self.params.flat
            return int(self._step_flat(p, grads.flat.astype(p.dtype, copy=False)))
        return sum(int(self._step_key(key, p, np.asarray(grads[key], dtype=p.dtype)))
                   for key, p in self.params.items())

    # ---- state -----------------------------------------------------------------

    def _hyper_values(self) -> dict:
        return {name: getattr(self, name) for name in self._hyper}

    def state_dict(self) -> dict:
        """Everything needed to resume: plain arrays under string keys (npz-safe)."""
        state = {"kind": np.array(self.kind), "step": np.array(self.step_count, dtype=np.int64)}
        for name, value in self._hyper_values().items():
            state[name] = np.array(value)
        for bname, buf in self._buffers.items():
            for key, arr in buf.items():
                state[f"{bname}.{key}"] = arr.copy()
        return state

    def load_state_dict(self, state) -> None:
        """Restore a state from :meth:`state_dict` (or from ``np.load`` of an npz of it)."""
        state = {k: state[k] for k in state.keys()}
        if "kind" not in state or str(np.asarray(state["kind"])) != self.kind:
            got = str(np.asarray(state["kind"])) if "kind" in state else None
            raise ValueError(f"state must be a {self.kind!r} optimizer state, got kind {got!r}")
        scalars = ("kind", "step") + tuple(self._hyper)
        missing = [k for k in scalars if k not in state]
        if missing:
            raise ValueError(f"state is missing the entries {missing}")
        for name in scalars[1:]:
            if np.ndim(state[name]) != 0:
                raise ValueError(f"state[{name!r}] must be a scalar (0-d array)")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"state['step'] must be >= 0, got {step}")
        hyper = {name: np.asarray(state[name]).item() for name in self._hyper}
        old = self._hyper_values()
        try:  # validate the new hyperparameters with the same checks as the constructor
            for name, value in hyper.items():
                setattr(self, name, value)
            self._check_hyper()
        except ValueError:
            for name, value in old.items():
                setattr(self, name, value)
            raise
        self._sync_buffers()
        expected = {f"{b}.{k}" for b, buf in self._buffers.items() for k in buf}
        missing = sorted(expected - state.keys())
        extra = sorted(state.keys() - expected - set(scalars))
        if missing or extra:
            raise ValueError(
                f"state does not match these params; missing: {missing}, extra: {extra}"
            )
        for bname, buf in self._buffers.items():
            for key, arr in buf.items():
                saved = np.asarray(state[f"{bname}.{key}"])
                if saved.shape != arr.shape or saved.dtype != arr.dtype:
                    raise ValueError(
                        f"state[{bname + '.' + key!r}] must be {arr.dtype} {arr.shape}, "
                        f"got {saved.dtype} {saved.shape}"
                    )
        for bname, buf in self._buffers.items():
            for key, arr in buf.items():
                arr[...] = state[f"{bname}.{key}"]
        self.step_count = step

    # ---- for subclasses --------------------------------------------------------

    def _check_hyper(self) -> None:
        raise NotImplementedError

    def _sync_buffers(self) -> None:
        """Allocate or drop buffers to match the hyperparameters (after loading a state)."""

    def _step_flat(self, p, g) -> int:
        """Update the flat buffer; return the number of non-finite entries of g."""
        raise NotImplementedError

    def _step_key(self, key, p, g) -> int:
        """Update one parameter; return the number of non-finite entries of g."""
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    kind = "sgd"
    _hyper = ("lr", "momentum", "nesterov", "weight_decay")

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params)
        self.lr, self.momentum, self.nesterov = lr, momentum, bool(nesterov)
        self.weight_decay = weight_decay
        self._check_hyper()
        self._sync_buffers()

    def _check_hyper(self):
        self.lr = v.positive("lr", self.lr)
        self.momentum = _check_number("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        self.weight_decay = _check_number("weight_decay", self.weight_decay, 0.0, math.inf,
                                          hi_open=True)
        self.nesterov = bool(self.nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")

    def _sync_buffers(self):
        if self.momentum > 0.0 and "buf" not in self._buffers:
            self._buffers["buf"] = self._new_buffer()
        elif self.momentum == 0.0:
            self._buffers.pop("buf", None)

    def _update(self, p, g, buf):
        t = p.dtype.type
        return _sgd_update(p, g, buf, t(self.lr), t(self.momentum), t(self.weight_decay),
                           self.nesterov)

    def _step_flat(self, p, g):
        buf = self._buffers.get("buf")
        return self._update(p, g, None if buf is None else buf.flat)

    def _step_key(self, key, p, g):
        buf = self._buffers.get("buf")
        return self._update(p, g, None if buf is None else buf[key])


class Adam(Optimizer):
    """Adam with bias correction (Kingma & Ba 2015) and optional L2 weight decay."""

    kind = "adam"
    _hyper = ("lr", "beta1", "beta2", "eps", "weight_decay")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas}")
        self.lr, (self.beta1, self.beta2) = lr, betas
        self.eps, self.weight_decay = eps, weight_decay
        self._check_hyper()
        self._buffers["m"] = self._new_buffer()  # first moment
        self._buffers["v"] = self._new_buffer()  # second moment

    @property
    def betas(self):
        return (self.beta1, self.beta2)

    def _check_hyper(self):
        self.lr = v.positive("lr", self.lr)
        self.beta1 = _check_number("betas[0]", self.beta1, 0.0, 1.0, hi_open=True)
        self.beta2 = _check_number("betas[1]", self.beta2, 0.0, 1.0, hi_open=True)
        self.eps = _check_number("eps", self.eps, 0.0, math.inf, lo_open=True, hi_open=True)
        self.weight_decay = _check_number("weight_decay", self.weight_decay, 0.0, math.inf,
                                          hi_open=True)

    def _scalars(self, dtype):
        """The kernel's scalar arguments in the parameter dtype; t is the current step."""
        t = self.step_count
        c = dtype.type
        return (
            c(self.lr), c(self.beta1), c(1.0 - self.beta1), c(self.beta2), c(1.0 - self.beta2),
            c(1.0 - self.beta1**t), c(1.0 - self.beta2**t), c(self.eps), c(self.weight_decay),
            np.finfo(dtype).tiny,
        )

    def _step_flat(self, p, g):
        m, v_ = self._buffers["m"].flat, self._buffers["v"].flat
        return adam_kernel(p, np.ascontiguousarray(g), m, v_, *self._scalars(p.dtype))

    def _step_key(self, key, p, g):
        m, v_ = self._buffers["m"][key], self._buffers["v"][key]
        scalars = self._scalars(p.dtype)
        if p.flags.c_contiguous and m.flags.c_contiguous and v_.flags.c_contiguous:
            g = np.ascontiguousarray(g)
            return adam_kernel(p.reshape(-1), g.reshape(-1), m.reshape(-1), v_.reshape(-1),
                               *scalars)
        else:  # a strided view cannot be flattened in place; the NumPy twin takes any shape
            return _adam_numpy(p, g, m, v_, *scalars)
