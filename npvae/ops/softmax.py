"""Softmax cross-entropy from logits, one categorical distribution per position.

With logits l (..., K) over K classes and the target class t at each position,

    log softmax(l)_k = l_k - lse(l),   lse(l) = c + log sum_j exp(l_j - c),  c = max_j l_j   (XENT.1)
    loss = -log softmax(l)_t = lse(l) - l_t                                             (XENT.1)

Subtracting the maximum c changes nothing mathematically (it cancels) but keeps every
exp(l_j - c) in (0, 1]: no overflow for large logits, and the largest term is exactly 1,
so the log never sees 0, and it is taken as log1p of the other terms, which keeps the small
loss of a confident prediction to full relative precision. The gradient is the softmax minus the one-hot target,

    dl_k = dloss (p_k - [k = t]),   p = softmax(l) = exp(l - lse(l))                    (XENT.2)

The target is an index, not a parameter: it gets no gradient (None).

Letters: N batch, M positions, K classes (codes). docs/derivations.md, section XENT.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate as v


def log_softmax(logits):
    """log softmax over the last axis, stable (XENT.1).  (..., K) -> (..., K).

    The largest term of the sum is exactly 1, so log(1 + the others) is taken with log1p:
    when the others are tiny (a confident prediction), log of the rounded sum would keep
    only about 1e-16 / (the others) of their value, and the loss of the predicted class,
    which is that log, would be computed to few digits.
    """
    top = logits.argmax(axis=-1)[..., None]  # (..., 1)  where the largest logit is
    c = np.take_along_axis(logits, top, axis=-1)  # (..., 1)  the largest logit
    shifted = logits - c  # (..., K)  <= 0, the largest exactly 0
    e = np.exp(shifted)  # (..., K)  in (0, 1], the largest exactly 1
    np.put_along_axis(e, top, 0.0, axis=-1)  # drop that 1
    lse = np.log1p(e.sum(axis=-1, keepdims=True))  # (..., 1)  lse(l) - c  (XENT.1)
    return shifted - lse  # (..., K)  l - lse(l)  (XENT.1)


class SoftmaxXentCache(NamedTuple):
    probs: np.ndarray  # (..., K) softmax(l), the first term of (XENT.2)
    target: np.ndarray  # (...,) int64 class at each position


def _check_target(target, shape, num_classes) -> np.ndarray:
    if not isinstance(target, np.ndarray) or target.dtype.kind not in "iu":
        raise ValueError(f"target must be an integer numpy array, got "
                         f"{getattr(target, 'dtype', type(target).__name__)}")
    if target.shape != shape:
        raise ValueError(f"target must have shape {shape}, one class per position, got {target.shape}")
    if target.size and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target must lie in [0, {num_classes}), got values from "
                         f"{target.min()} to {target.max()}")
    return target.astype(np.int64, copy=False)


def softmax_xent_forward(logits, target):
    """loss = -log softmax(logits)[target] per position.  logits (..., K), target (...) int -> (...)."""
    v.array("logits", logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a last axis of at least one class, got shape {logits.shape}")
    target = _check_target(target, logits.shape[:-1], logits.shape[-1])
    v.finite("logits", logits)
    logp = log_softmax(logits)  # (..., K)  (XENT.1)
    loss = -np.take_along_axis(logp, target[..., None], axis=-1)[..., 0]  # (...)  lse(l) - l_t  (XENT.1)
    return loss, SoftmaxXentCache(np.exp(logp), target)


def softmax_xent_backward(dloss, cache: SoftmaxXentCache):
    """dloss (...) -> dlogits (..., K), None (the target)  (XENT.2)."""
    probs, target = cache
    v.array("dloss", dloss)
    v.shape("dloss", dloss, target.shape)
    t = target[..., None]  # (..., 1)
    dlogits = probs.copy()  # (..., K)  p
    np.put_along_axis(dlogits, t, 0.0, axis=-1)  # (..., K)  the other classes' p
    rest = dlogits.sum(axis=-1, keepdims=True)  # (..., 1)  1 - p_t, from the small terms
    np.put_along_axis(dlogits, t, -rest, axis=-1)  # p_t - 1 without rounding p_t near 1
    dlogits *= dloss[..., None]  # (..., K)  p - onehot(t), times dloss  (XENT.2)
    return dlogits, None
