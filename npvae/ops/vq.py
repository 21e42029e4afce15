"""Vector quantization for VQ-VAE: pick a code per row, pass gradients straight through.

The encoder's output is cut into R = N * M rows z_r of size Dz; each row is replaced by
one of K code vectors e_k, the rows of ``codebook`` (K, Dz). The prior over codes is
uniform, so the KL term of the ELBO is the constant log K (tutorial section 6) and
training is driven by reconstruction plus the two auxiliary losses below.

Code assignment, two metrics:

    euclidean  k_r = argmin_k ||z_r - e_k||^2 = argmin_k ( ||e_k||^2 - 2 z_r . e_k )   (VQ.1)
    dot        k_r = argmax_k  z_r . e_k                                                (VQ.2)

(VQ.1) is the VQ-VAE paper's nearest neighbour; ||z_r||^2 is the same for every k and is
dropped. (VQ.2) is the tutorial's "largest dot product". Ties in the computed score go to
the lowest k. Two codes at exactly the same distance from z_r need not tie in the score:
its rounding can pick either of them.

Quantization and its gradient:

    z_q[r] = e_{k_r};    dL/dz_e[r] := dL/dz_q[r]                                       (VQ.3)

The selection is piecewise constant, so its true derivative is zero almost everywhere;
the straight-through estimator copies the gradient instead. The codebook gets no
gradient along this path: it learns from (VQ.4) or from the moving averages of (VQ.6).

With sg[.] the stop-gradient (the value is used, its derivative is taken as zero):

    codebook    l_r = || sg[z_r] - e_{k_r} ||^2                                         (VQ.4)
                dL/de_k = sum_{r : k_r = k} -2 dl_r (z_r - e_k),        dL/dz_r = 0
    commitment  l_r = beta || z_r - sg[e_{k_r}] ||^2                                    (VQ.5)
                dL/dz_r = 2 beta dl_r (z_r - e_{k_r}),                  dL/de_k = 0

Moving-average codebook (van den Oord et al. 2017, appendix A.1; Razavi et al. 2019),
a replacement for (VQ.4). With decay g, n_k = #{r : k_r = k} and s_k = sum_{r : k_r = k} z_r:

    N_k <- g N_k + (1 - g) n_k                       smoothed cluster size              (VQ.6)
    S_k <- g S_k + (1 - g) s_k                       smoothed sum of assigned rows      (VQ.6)
    N'_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j     Laplace smoothing           (VQ.6)
    e_k  = S_k / N'_k                                                                   (VQ.6)

Code usage is summarised by the perplexity exp(-sum_k p_k log p_k), p_k = n_k / R: K when
every code is used equally, 1 when a single code takes every row.

Letters: R rows to quantize (= N * M), Dz code size, K codes. docs/derivations.md, section VQ.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import _validate as v
from ..backend import dispatch, numba_kernel

METRICS = ("euclidean", "dot")
_METRIC_CODE = {name: i for i, name in enumerate(METRICS)}
EUCLIDEAN, DOT = range(len(METRICS))  # the codes the assignment kernels take


def metric_code(metric: str) -> int:
    if metric not in _METRIC_CODE:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return _METRIC_CODE[metric]


# ----------------------------------------------------------------------------------
# Kernel pair: the index of the best code for every row.


def _assign_numpy(z_e, codebook, metric_code):
    """idx (R,) int64: best code per row by (VQ.1) (EUCLIDEAN) or (VQ.2) (DOT); ties in the
    score -> lowest k."""
    dots = z_e @ codebook.T  # (R, K)  z_r . e_k
    if metric_code == EUCLIDEAN:
        sq_norms = np.einsum("kd,kd->k", codebook, codebook)  # (K,)  ||e_k||^2
        scores = sq_norms - 2.0 * dots  # (R, K)  (VQ.1) without ||z_r||^2
        return np.argmin(scores, axis=1).astype(np.int64)
    return np.argmax(dots, axis=1).astype(np.int64)  # (R,)  (VQ.2)


@numba_kernel
def _scores_loop(dots, sq_norms, scale):
    """dots[r, k] <- sq_norms[k] + scale * dots[r, k], in place: one vectorizable pass."""
    r, k = dots.shape
    for i in range(r):
        for c in range(k):
            dots[i, c] = sq_norms[c] + scale * dots[i, c]
    return dots


def _assign_numba(z_e, codebook, metric_code):
    """Same as _assign_numpy: dot products from BLAS, scores in one compiled pass, NumPy's argmin.

    Both metrics become "smallest score wins": ||e_k||^2 - 2 z.e_k for (VQ.1), -z.e_k for
    (VQ.2). The scores are written over the dot products (no second (R, K) matrix); the
    search for the minimum is left to np.argmin, whose SIMD loop a compiled loop with a
    data-dependent branch cannot match. Ties in the score go to the lowest k, as in the twin.
    """
    dots = z_e @ codebook.T  # (R, K)  z_r . e_k
    if metric_code == EUCLIDEAN:
        sq_norms = np.einsum("kd,kd->k", codebook, codebook)  # (K,)  ||e_k||^2
        scores = _scores_loop(dots, sq_norms, dots.dtype.type(-2.0))  # (R, K)  (VQ.1)
    else:
        scores = _scores_loop(dots, np.zeros(codebook.shape[0], dots.dtype),
                              dots.dtype.type(-1.0))  # (R, K)  (VQ.2), as a minimum
    return np.argmin(scores, axis=1).astype(np.int64)


assign_kernel = dispatch(_assign_numpy, _assign_numba)

# ----------------------------------------------------------------------------------
# Kernel pair: out[k] = sum of rows[r] over the r with idx[r] == k (scatter-add).


def _scatter_rows_numpy(idx, rows, num_codes):
    """out (K, Dz) with out[k] = sum_{r : idx[r] = k} rows[r], added in row order."""
    out = np.zeros((num_codes, rows.shape[1]), dtype=rows.dtype)
    np.add.at(out, idx, rows)  # unbuffered: repeated indices accumulate
    return out


@numba_kernel
def _scatter_rows_numba(idx, rows, num_codes):
    """Same as _scatter_rows_numpy, one loop in row order."""
    r, d = rows.shape
    out = np.zeros((num_codes, d), dtype=rows.dtype)
    for i in range(r):
        k = idx[i]
        for j in range(d):
            out[k, j] += rows[i, j]
    return out


scatter_rows_kernel = dispatch(_scatter_rows_numpy, _scatter_rows_numba)

# ----------------------------------------------------------------------------------
# Input checks


def _check_pair(z_e, codebook, name="codebook"):
    """z_e (R, Dz) and codebook (K, Dz): float, same dtype, finite, K >= 1, Dz >= 1."""
    v.array("z_e", z_e, 2), v.array(name, codebook, 2)
    if codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise ValueError(
            f"{name} must hold at least one code of at least one dimension, "
            f"got an empty codebook of shape {codebook.shape}"
        )
    if z_e.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"z_e has rows of size Dz={z_e.shape[1]} but {name} has codes of size "
            f"Dz={codebook.shape[1]} (z_e {z_e.shape}, {name} {codebook.shape})"
        )
    v.same_dtype("z_e", z_e, name, codebook)
    v.finite("z_e", z_e), v.finite(name, codebook)


def _check_idx(idx, rows: int, num_codes: int) -> np.ndarray:
    """idx (R,) of integers in [0, K), returned as int64."""
    if not isinstance(idx, np.ndarray):
        raise ValueError(f"idx must be a numpy array, got {type(idx).__name__}")
    if idx.dtype.kind not in "iu":
        raise ValueError(f"idx must have an integer dtype, got {idx.dtype}")
    if idx.shape != (rows,):
        raise ValueError(f"idx must have shape ({rows},), one code per row, got {idx.shape}")
    if rows and (idx.min() < 0 or idx.max() >= num_codes):
        raise ValueError(
            f"idx must lie in [0, {num_codes}) for a codebook of {num_codes} codes, "
            f"got values from {idx.min()} to {idx.max()}"
        )
    return np.ascontiguousarray(idx, dtype=np.int64)


def _check_upstream(name, dout, shape, dtype):
    v.array(name, dout)
    v.shape(name, dout, shape)
    return np.asarray(dout, dtype=dtype)


# ----------------------------------------------------------------------------------
# Assignment and quantization (VQ.1-VQ.3)


def vq_assign(z_e, codebook, metric: str = "euclidean"):
    """Index of the chosen code per row.  z_e (R, Dz), codebook (K, Dz) -> idx (R,) int64.

    metric "euclidean": nearest code (VQ.1); "dot": largest dot product (VQ.2).
    """
    code = metric_code(metric)
    _check_pair(z_e, codebook)
    z_e = np.ascontiguousarray(z_e)  # one compiled layout for the kernel
    codebook = np.ascontiguousarray(codebook)
    return assign_kernel(z_e, codebook, code)


class QuantizeCache(NamedTuple):
    idx: np.ndarray  # (R,) chosen code per row
    num_codes: int  # K, so callers can count code usage
    shape: tuple  # (R, Dz), the shape of z_q and dz_q
    dtype: np.dtype  # z_q's dtype, given to dz_e


def quantize_forward(z_e, codebook, metric: str = "euclidean"):
    """z_q = codebook[idx].  z_e (R, Dz), codebook (K, Dz) -> z_q (R, Dz)  (VQ.3).

    ``cache.idx`` is the assignment, to be passed to the codebook and commitment losses.
    """
    idx = vq_assign(z_e, codebook, metric)  # (R,)  (VQ.1) or (VQ.2)
    z_q = codebook[idx]  # (R, Dz)  (VQ.3)
    return z_q, QuantizeCache(idx, codebook.shape[0], z_q.shape, z_q.dtype)


def quantize_backward(dz_q, cache: QuantizeCache):
    """dz_q (R, Dz) -> dz_e (R, Dz), a copy of dz_q in z_q's dtype  (VQ.3).

    Only z_e receives a gradient; the codebook gets none through the selection.
    """
    dz_q = _check_upstream("dz_q", dz_q, cache.shape, cache.dtype)
    dz_e = dz_q.copy()  # straight-through: copied, not derived (VQ.3)
    return dz_e


# ----------------------------------------------------------------------------------
# Auxiliary losses (VQ.4, VQ.5): idx is an input, held fixed as the forward chose it.


class CodebookLossCache(NamedTuple):
    diff: np.ndarray  # (R, Dz) z_e - codebook[idx]
    idx: np.ndarray  # (R,) rows of the codebook that were used
    num_codes: int  # K, the number of rows of dcodebook


def codebook_loss_forward(z_e, codebook, idx):
    """l_r = ||sg[z_e[r]] - codebook[idx[r]]||^2.  z_e (R, Dz), codebook (K, Dz), idx (R,) -> (R,).

    Moves the chosen codes toward the encoder outputs; z_e is treated as a constant (VQ.4).
    """
    _check_pair(z_e, codebook)
    idx = _check_idx(idx, z_e.shape[0], codebook.shape[0])
    diff = z_e - codebook[idx]  # (R, Dz)
    loss = np.einsum("rd,rd->r", diff, diff)  # (R,)  (VQ.4)
    return loss, CodebookLossCache(diff, idx, codebook.shape[0])


def codebook_loss_backward(dloss, cache: CodebookLossCache):
    """dloss (R,) -> dcodebook (K, Dz)  (VQ.4).  z_e gets no gradient (stop-gradient)."""
    diff, idx, num_codes = cache
    dloss = _check_upstream("dloss", dloss, (diff.shape[0],), diff.dtype)
    drows = (-2.0 * dloss)[:, None] * diff  # (R, Dz)  d l_r / d e_{k_r}
    return scatter_rows_kernel(idx, drows, num_codes)  # (K, Dz)  sum over rows per code  (VQ.4)


class CommitmentLossCache(NamedTuple):
    diff: np.ndarray  # (R, Dz) z_e - codebook[idx]
    beta: float


def commitment_loss_forward(z_e, codebook, idx, beta: float = 0.25):
    """l_r = beta ||z_e[r] - sg[codebook[idx[r]]]||^2.  (R, Dz), (K, Dz), (R,) -> (R,)  (VQ.5).

    Keeps the encoder outputs near their codes; the codebook is treated as a constant.
    """
    _check_pair(z_e, codebook)
    idx = _check_idx(idx, z_e.shape[0], codebook.shape[0])
    beta = float(beta)
    if not (beta >= 0.0) or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    diff = z_e - codebook[idx]  # (R, Dz)
    loss = beta * np.einsum("rd,rd->r", diff, diff)  # (R,)  (VQ.5)
    return loss, CommitmentLossCache(diff, beta)


def commitment_loss_backward(dloss, cache: CommitmentLossCache):
    """dloss (R,) -> dz_e (R, Dz)  (VQ.5).  The codebook gets no gradient (stop-gradient)."""
    diff, beta = cache
    dloss = _check_upstream("dloss", dloss, (diff.shape[0],), diff.dtype)
    return (2.0 * beta * dloss)[:, None] * diff  # (R, Dz)  (VQ.5)


# ----------------------------------------------------------------------------------
# Moving-average codebook (VQ.6), as pure functions of an explicit state


class EMAState(NamedTuple):
    cluster_size: np.ndarray  # (K,) N_k, smoothed count of rows assigned to code k
    embed_sum: np.ndarray  # (K, Dz) S_k, smoothed sum of those rows


def ema_init(codebook) -> EMAState:
    """Start the averages as if each code had been assigned one row equal to itself.

    Then S_k / N_k = e_k from the first step on, and a code nobody picks keeps its place
    instead of being divided by a zero count.
    """
    v.array("codebook", codebook, 2)
    if codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise ValueError(f"codebook must not be empty, got shape {codebook.shape}")
    v.finite("codebook", codebook)
    return EMAState(np.ones(codebook.shape[0], dtype=codebook.dtype), codebook.copy())


def ema_update(state: EMAState, z_e, idx, decay: float = 0.99, eps: float = 1e-5):
    """One moving-average step (VQ.6): -> (new codebook (K, Dz), new EMAState).

    state: the current averages; z_e (R, Dz) the encoder rows, idx (R,) their codes.
    ``decay`` in [0, 1] (0 = forget the past), ``eps`` >= 0 the Laplace smoothing.
    The inputs are not modified.
    """
    cluster_size, embed_sum = state
    v.array("state.cluster_size", cluster_size, 1)
    _check_pair(z_e, embed_sum, "state.embed_sum")
    num_codes = embed_sum.shape[0]
    if cluster_size.shape != (num_codes,) or cluster_size.dtype != embed_sum.dtype:
        raise ValueError(
            f"state.cluster_size must be a {embed_sum.dtype} array of shape ({num_codes},), "
            f"got {cluster_size.dtype} {cluster_size.shape}"
        )
    if z_e.shape[0] == 0:
        raise ValueError("z_e must hold at least one row to update the codebook")
    idx = _check_idx(idx, z_e.shape[0], num_codes)
    z_e = np.ascontiguousarray(z_e)
    decay, eps = float(decay), float(eps)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    if not (eps >= 0.0) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")

    counts = np.bincount(idx, minlength=num_codes).astype(z_e.dtype)  # (K,)  n_k
    sums = scatter_rows_kernel(idx, z_e, num_codes)  # (K, Dz)  s_k
    size = decay * cluster_size + (1.0 - decay) * counts  # (K,)  N_k  (VQ.6)
    total = size.sum()  # sum_j N_j > 0: it starts at K and each step adds (1 - decay) R
    smoothed = (size + eps) / (total + num_codes * eps) * total  # (K,)  N'_k  (VQ.6)
    new_sum = decay * embed_sum + (1.0 - decay) * sums  # (K, Dz)  S_k  (VQ.6)
    codebook = new_sum / smoothed[:, None]  # (K, Dz)  e_k  (VQ.6)
    return codebook, EMAState(size, new_sum)


# ----------------------------------------------------------------------------------
# Usage statistics and initialisation


def code_counts(idx, num_codes: int) -> np.ndarray:
    """How many rows chose each code.  idx (R,) -> counts (K,) int64."""
    if not (v.is_integer(num_codes) and num_codes >= 1):
        raise ValueError(f"num_codes must be an integer >= 1, got {num_codes!r}")
    num_codes = int(num_codes)
    if not isinstance(idx, np.ndarray) or idx.ndim != 1:
        raise ValueError(f"idx must be a 1-D numpy array, got {type(idx).__name__} "
                         f"of shape {np.shape(idx)}")
    idx = _check_idx(idx, idx.shape[0], num_codes)
    return np.bincount(idx, minlength=num_codes).astype(np.int64)


def perplexity(counts) -> float:
    """exp(entropy) of the usage distribution p_k = counts_k / sum(counts).

    counts (K,), any non-negative numbers (integer counts or EMA cluster sizes).
    k codes used equally -> k; a single code used -> 1.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"counts must have 1 dimension, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("counts must be finite and >= 0")
    total = counts.sum()
    if not total > 0:
        raise ValueError("counts must have a positive total (no rows were counted)")
    p = counts[counts > 0] / total  # zero-probability codes add nothing to the entropy
    return float(np.exp(-np.sum(p * np.log(p))))


def _noise_scale(z_e):
    """A small jitter relative to the spread of the data (or its size if it has none)."""
    spread = float(z_e.std(dtype=np.float64))  # float32 squares of rows above 1.8e19 overflow
    if spread == 0.0:
        spread = max(float(np.abs(z_e).max()), 1.0)
    return 1e-3 * spread


def _squared_distances(z_e, centre):
    """||z_e[r] - centre||^2 (R,) float64, squared in float64: the square of a finite
    float32 difference above 1.8e19 overflows float32."""
    diff = (z_e - centre).astype(np.float64)  # (R, Dz)
    return np.sum(diff ** 2, axis=1)


def kmeans_init(z_e, num_codes: int, rng, iters: int = 10):
    """A codebook fitted to the rows of z_e by k-means.  z_e (R, Dz) -> codebook (K, Dz).

    Seeds with k-means++ (each new centre drawn with probability proportional to its
    squared distance from the nearest centre so far), then runs ``iters`` Lloyd steps (VQ.7);
    a centre left without rows keeps its place. When R < K there are too few rows to
    choose from: the codebook is rows drawn with replacement plus a small jitter, so no
    two codes coincide. ``rng`` is a numpy.random.Generator; the result has z_e's dtype.
    """
    v.array("z_e", z_e, 2), v.finite("z_e", z_e)
    rows = z_e.shape[0]
    if rows == 0 or z_e.shape[1] == 0:
        raise ValueError(f"z_e must be non-empty to fit a codebook, got shape {z_e.shape}")
    if not (v.is_integer(num_codes) and num_codes >= 1):
        raise ValueError(f"num_codes must be an integer >= 1, got {num_codes!r}")
    if not (v.is_integer(iters) and iters >= 0):
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    num_codes, iters = int(num_codes), int(iters)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    z_e = np.ascontiguousarray(z_e)
    scale = _noise_scale(z_e)

    if rows < num_codes:
        picks = rng.integers(rows, size=num_codes)
        jitter = scale * rng.standard_normal((num_codes, z_e.shape[1]))
        return (z_e[picks] + jitter).astype(z_e.dtype)

    # k-means++ seeding
    centres = np.empty((num_codes, z_e.shape[1]), dtype=z_e.dtype)
    centres[0] = z_e[rng.integers(rows)]
    d2 = _squared_distances(z_e, centres[0])  # (R,)
    for c in range(1, num_codes):
        total = d2.sum()
        if total > 0:
            pick = rng.choice(rows, p=d2 / total)
            centres[c] = z_e[pick]
        else:  # fewer distinct rows than codes: jitter a copy
            pick = rng.integers(rows)
            centres[c] = z_e[pick] + scale * rng.standard_normal(z_e.shape[1])
        np.minimum(d2, _squared_distances(z_e, centres[c]), out=d2)

    # Lloyd iterations
    for _ in range(iters):
        idx = assign_kernel(z_e, centres, EUCLIDEAN)  # (R,)  nearest centre  (VQ.1)
        counts = np.bincount(idx, minlength=num_codes)  # (K,)
        sums = scatter_rows_kernel(idx, z_e, num_codes)  # (K, Dz)
        used = counts > 0
        centres[used] = sums[used] / counts[used, None]
    return centres
