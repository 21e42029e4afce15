"""Adam and SGD: each step is one fused pass over a model's flat parameter buffer.

With g the gradient plus the L2 term (g <- g + wd * p, the gradient of wd/2 ||p||^2),
SGD with momentum mu (Sutskever et al. 2013, in the form PyTorch uses):

    b <- mu b + g                                                            (SGD.1)
    p <- p - lr * (g + mu b)   if nesterov,   p <- p - lr * b   otherwise     (SGD.2)

(with mu = 0, b = g and both read p <- p - lr g); Adam (Kingma & Ba 2015, Algorithm 1),
at step t = 1, 2, ...:

    m <- beta1 m + (1 - beta1) g                                             (ADAM.1)
    v <- beta2 v + (1 - beta2) g^2                                           (ADAM.2)
    m^ = m / (1 - beta1^t),   v^ = v / (1 - beta2^t)                         (ADAM.3)
    p <- p - lr m^ / (sqrt(v^) + eps)                                        (ADAM.4)

computed, as PyTorch computes it, with the bias corrections gathered into two scalars
per step (the same update up to rounding, one division per entry instead of three):

    p <- p - s1 m / (sqrt(v) s2 + eps)                                       (ADAM.5)

with s1 = lr / (1 - beta1^t) and s2 = 1 / sqrt(1 - beta2^t).

``params`` is a :class:`~npvae.params.FlatDict` (a model's ``params`` is one; wrap arrays
of your own with ``FlatDict.from_arrays``), updated in place, so its views stay valid.
The buffers (m, v, the momentum b) are FlatDicts of the same layout. ``grads`` has the
keys and shapes of ``params``: a FlatDict in the same layout (what ``loss_and_grads``
returns) is used as it is; any other such dict, plain arrays included, is copied once
into that layout. ``state_dict()`` holds only arrays under string keys (``m.enc.0.W``),
so ``np.savez(allow_pickle=False)`` stores it, and ``load_state_dict`` restores it
exactly: a resumed run continues bit for bit. docs/derivations.md, sections SGD, ADAM.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from . import _validate
from .backend import dispatch, numba_kernel
from .params import FlatDict

# ----------------------------------------------------------------------------------
# Gradient clipping


def _sumsq_numpy(a):
    """sum(a**2) accumulated in float64, for a 1-D array, in cache-sized float64 pieces."""
    total = 0.0
    for start in range(0, a.shape[0], 1 << 15):
        piece = a[start:start + (1 << 15)].astype(np.float64)
        total += float(piece @ piece)
    return total


@numba_kernel
def _sumsq_numba(a):
    """Same sum, in float64, in one pass with eight partial sums.

    Eight independent sums let the loop overlap its additions, which one running sum
    serialises: 0.24 against 0.54 ms for the twin over 652,824 float32 entries (M2).
    The two twins group the sum differently, so they agree to float64 rounding.
    """
    n = a.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    whole = n - n % 8
    for i in range(0, whole, 8):
        x0, x1 = np.float64(a[i]), np.float64(a[i + 1])
        x2, x3 = np.float64(a[i + 2]), np.float64(a[i + 3])
        x4, x5 = np.float64(a[i + 4]), np.float64(a[i + 5])
        x6, x7 = np.float64(a[i + 6]), np.float64(a[i + 7])
        s0 += x0 * x0
        s1 += x1 * x1
        s2 += x2 * x2
        s3 += x3 * x3
        s4 += x4 * x4
        s5 += x5 * x5
        s6 += x6 * x6
        s7 += x7 * x7
    for i in range(whole, n):
        x = np.float64(a[i])
        s0 += x * x
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


sumsq_kernel = dispatch(_sumsq_numpy, _sumsq_numba)

# The dtypes the compiled kernel takes. Any other floating array (float16, longdouble,
# a non-native byte order) is summed by the NumPy twin under either backend.
_COMPILED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _sumsq(a) -> float:
    """sum(a**2) in float64 for a 1-D floating array of any dtype (the kernel where it can)."""
    if a.dtype in _COMPILED_DTYPES:
        return sumsq_kernel(a)
    return _sumsq_numpy(a)


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
# The update kernels, over 1-D arrays in place. Every scalar arrives in the parameter
# dtype, so float32 parameters are updated in float32 arithmetic.


def _flush_numpy(a, tiny):
    """Set entries with |a| < tiny (the smallest normal number) to zero, in place (FTZ.1).

    NaN and inf fail the comparison and are kept, so a bad value still shows.
    """
    np.copyto(a, 0, where=np.abs(a) < tiny)


def _adam_numpy(p, g, m, v, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                bias1, bias2, eps, weight_decay, tiny):
    """Update p, m, v in place by (ADAM.1-4); bias1 = 1 - beta1^t, bias2 = 1 - beta2^t.

    The bias corrections (ADAM.3) are folded into two scalars, as PyTorch does (ADAM.5):
    lr m^ / (sqrt(v^) + eps) = (lr / bias1) m / (sqrt(v) (1 / sqrt(bias2)) + eps), the
    same number up to rounding, with one division per entry instead of three.
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
    step = lr / bias1  # s1 = lr / (1 - beta1^t)  (ADAM.3, ADAM.5)
    scale = 1 / np.sqrt(bias2)  # s2 = 1 / sqrt(1 - beta2^t)  (ADAM.3, ADAM.5)
    p -= step * m / (np.sqrt(v) * scale + eps)  # (ADAM.5)
    return bad


@numba_kernel
def _adam_numba(p, g, m, v, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                bias1, bias2, eps, weight_decay, tiny):
    """Same as _adam_numpy, one loop, the same operations in the same order.

    The loop only notes whether some entry of g is not finite (an OR, which vectorizes
    like the rest; an integer count did not, and cost about a fifth of the pass); the
    entries are counted in a second pass only on such a step.
    """
    zero, one = p.dtype.type(0.0), p.dtype.type(1.0)
    step = lr / bias1  # s1 = lr / (1 - beta1^t)  (ADAM.3, ADAM.5)
    scale = one / np.sqrt(bias2)  # s2 = 1 / sqrt(1 - beta2^t)  (ADAM.3, ADAM.5)
    finite = True
    for i in range(p.shape[0]):
        gi = g[i]
        finite &= (gi - gi) == zero  # False for NaN and +-inf
        if weight_decay != 0:
            gi = gi + weight_decay * p[i]
        mi = beta1 * m[i] + one_minus_beta1 * gi  # (ADAM.1)
        mi = zero if abs(mi) < tiny else mi  # (FTZ.1): NaN fails the test and is kept
        vi = beta2 * v[i] + one_minus_beta2 * gi * gi  # (ADAM.2)
        vi = zero if vi < tiny else vi  # (FTZ.1): v >= 0
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - step * mi / (np.sqrt(vi) * scale + eps)  # (ADAM.5)
    bad = 0
    if not finite:  # a spoilt step: count its non-finite gradient entries
        for i in range(g.shape[0]):
            bad += (g[i] - g[i]) != zero
    return bad


adam_kernel = dispatch(_adam_numpy, _adam_numba)


def _sgd_update(p, g, buf, lr, momentum, weight_decay, nesterov):
    """One SGD step in place over 1-D arrays; buf is None when momentum is 0.

    Returns the number of non-finite entries of g.
    """
    bad = int(g.size - np.count_nonzero(np.isfinite(g)))
    if weight_decay != 0:
        g = g + weight_decay * p  # L2 term
    move = g  # (SGD.2) with mu = 0
    if buf is not None:
        buf *= momentum
        buf += g  # (SGD.1)
        _flush_numpy(buf, np.finfo(buf.dtype).tiny)  # (FTZ.1)
        move = g + momentum * buf if nesterov else buf  # (SGD.2)
    p -= lr * move
    return bad


# ----------------------------------------------------------------------------------
# The optimizers: checks, one step, state save and restore


def _check_number(name, value, lo, hi, lo_open=False, hi_open=True) -> float:
    x = float(value)
    ok = math.isfinite(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {left}{lo}, {hi}{right}, got {value}")
    return x


def _check_params(params) -> FlatDict:
    if not isinstance(params, FlatDict):
        raise ValueError(
            f"params must be a npvae.params.FlatDict (a model's .params is one), got "
            f"{type(params).__name__}; to optimize arrays of your own, wrap them with "
            "params = FlatDict.from_arrays({'w': w}) and read params['w'] from then on")
    if not params:
        raise ValueError("params must hold at least one array")
    _validate.array("params.flat", params.flat)
    return params


def _check_grads(params: FlatDict, grads) -> None:
    """ValueError unless grads is a dict of float arrays with the keys and shapes of params."""
    if not isinstance(grads, Mapping):
        raise ValueError(f"grads must be a dict of arrays, got {type(grads).__name__}")
    if grads.keys() != params.keys():
        missing = [k for k in params if k not in grads]
        extra = [k for k in grads if k not in params]
        raise ValueError(f"grads must have exactly the keys of params; "
                         f"missing: {missing}, extra: {extra}")
    for key, p in params.items():
        g = grads[key]
        if not isinstance(g, np.ndarray) or g.dtype.kind != "f":
            raise ValueError(f"grads[{key!r}] must be a floating-point numpy array")
        if g.shape != p.shape:
            raise ValueError(f"grads[{key!r}] must have the shape of params[{key!r}], "
                             f"{p.shape}, got {g.shape}")


class Optimizer:
    """Base class: ``params``, the step count and ``buffers`` (name -> FlatDict like params).

    Subclasses set ``kind`` and ``_hyper`` (the hyperparameters saved in the state) and
    define ``_checked`` (the hyperparameters validated), ``_buffer_names`` and ``_update``.
    """

    kind = ""
    _hyper: tuple = ()

    def __init__(self, params, **hyper):
        self.params = _check_params(params)
        self.step_count = 0
        self.buffers: dict[str, FlatDict] = {}
        self._set_hyper(hyper)

    def _set_hyper(self, hyper: dict) -> None:
        """Validate and set the hyperparameters; make or drop the buffers they call for."""
        checked = self._checked(hyper)
        self.__dict__.update(checked)
        old = self.buffers
        self.buffers = {name: old[name] if name in old else self.params.zeros_like()
                        for name in self._buffer_names(checked)}

    def _hyper_values(self) -> dict:
        return {name: getattr(self, name) for name in self._hyper}

    def _flat_grads(self, grads) -> np.ndarray:
        """``grads`` as one contiguous array in the layout and dtype of ``params.flat``."""
        _check_grads(self.params, grads)
        if isinstance(grads, FlatDict) and list(grads) == list(self.params):  # same layout
            return grads.flat.astype(self.params.flat.dtype, copy=False)
        packed = self.params.empty_like()
        for key, view in packed.items():
            view[...] = grads[key]
        return packed.flat

    def step(self, grads) -> int:
        """Update ``params`` in place from ``grads`` (the keys and shapes of params).

        Returns the number of non-finite gradient entries (NaN or +-inf), found in the
        same pass as the update: 0 on a healthy step. When it is not 0 the update has
        been made, so the parameters hold non-finite values and should be discarded.
        """
        g = self._flat_grads(grads)
        self._set_hyper(self._hyper_values())  # a schedule may have set a new lr
        self.step_count += 1
        return int(self._update(self.params.flat, g))

    def state_dict(self) -> dict:
        """Everything needed to resume: plain arrays under string keys (npz-safe)."""
        state = {"kind": np.array(self.kind), "step": np.array(self.step_count, dtype=np.int64)}
        state.update({name: np.array(value) for name, value in self._hyper_values().items()})
        for name, buf in self.buffers.items():
            state.update({f"{name}.{key}": arr.copy() for key, arr in buf.items()})
        return state

    def load_state_dict(self, state) -> None:
        """Restore a :meth:`state_dict` (or ``np.load`` of an npz of one) exactly.

        All of it is checked before anything changes: a bad state leaves the optimizer as it was.
        """
        state = {key: np.asarray(state[key]) for key in state.keys()}
        kind = str(state["kind"]) if "kind" in state else None
        if kind != self.kind:
            raise ValueError(f"state must be a {self.kind!r} optimizer state, got kind {kind!r}")
        scalars = ("step",) + self._hyper
        if any(name not in state or state[name].ndim != 0 for name in scalars):
            raise ValueError(f"state must hold the scalars (0-d arrays) {list(scalars)}")
        if int(state["step"]) < 0:
            raise ValueError(f"state['step'] must be >= 0, got {int(state['step'])}")
        hyper = self._checked({name: state[name].item() for name in self._hyper})
        self._check_saved_buffers(state, self._buffer_names(hyper))
        self._set_hyper(hyper)
        for name, buf in self.buffers.items():
            for key, arr in buf.items():
                arr[...] = state[f"{name}.{key}"]
        self.step_count = int(state["step"])

    def _check_saved_buffers(self, state: dict, names) -> None:
        """The state must hold one array per buffer and parameter, of the parameter's kind."""
        expected = {f"{name}.{key}": p for name in names for key, p in self.params.items()}
        missing = sorted(expected.keys() - state.keys())
        extra = sorted(state.keys() - expected.keys() - {"kind", "step", *self._hyper})
        if missing or extra:
            raise ValueError(f"state does not match these params; "
                             f"missing: {missing}, extra: {extra}")
        for key, p in expected.items():
            if state[key].shape != p.shape or state[key].dtype != p.dtype:
                raise ValueError(f"state[{key!r}] must be {p.dtype} {p.shape}, "
                                 f"got {state[key].dtype} {state[key].shape}")


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    kind = "sgd"
    _hyper = ("lr", "momentum", "nesterov", "weight_decay")

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay)

    @staticmethod
    def _checked(hyper: dict) -> dict:
        out = {"lr": _validate.positive("lr", hyper["lr"]),
               "momentum": _check_number("momentum", hyper["momentum"], 0.0, 1.0),
               "weight_decay": _check_number("weight_decay", hyper["weight_decay"], 0.0, math.inf),
               "nesterov": bool(hyper["nesterov"])}
        if out["nesterov"] and out["momentum"] == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")
        return out

    @staticmethod
    def _buffer_names(hyper: dict) -> tuple:
        return ("buf",) if hyper["momentum"] > 0.0 else ()  # b of (SGD.1)

    def _update(self, p, g) -> int:
        c, buf = p.dtype.type, self.buffers.get("buf")
        return _sgd_update(p, g, None if buf is None else buf.flat, c(self.lr),
                           c(self.momentum), c(self.weight_decay), self.nesterov)


class Adam(Optimizer):
    """Adam with bias correction (Kingma & Ba 2015) and optional L2 weight decay."""

    kind = "adam"
    _hyper = ("lr", "beta1", "beta2", "eps", "weight_decay")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas}")
        super().__init__(params, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps,
                         weight_decay=weight_decay)

    @staticmethod
    def _checked(hyper: dict) -> dict:
        return {"lr": _validate.positive("lr", hyper["lr"]),
                "beta1": _check_number("betas[0]", hyper["beta1"], 0.0, 1.0),
                "beta2": _check_number("betas[1]", hyper["beta2"], 0.0, 1.0),
                "eps": _check_number("eps", hyper["eps"], 0.0, math.inf, lo_open=True),
                "weight_decay": _check_number("weight_decay", hyper["weight_decay"], 0.0, math.inf)}

    @staticmethod
    def _buffer_names(hyper: dict) -> tuple:
        return ("m", "v")  # the moments of (ADAM.1-2)

    def _update(self, p, g) -> int:
        t, c = self.step_count, p.dtype.type
        return adam_kernel(p, g, self.buffers["m"].flat, self.buffers["v"].flat, c(self.lr),
                           c(self.beta1), c(1.0 - self.beta1), c(self.beta2), c(1.0 - self.beta2),
                           c(1.0 - self.beta1**t), c(1.0 - self.beta2**t), c(self.eps),
                           c(self.weight_decay), np.finfo(p.dtype).tiny)  # (ADAM.3): t >= 1
