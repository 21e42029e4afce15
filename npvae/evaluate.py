"""Evaluating a model on a data set: the ELBO, an importance-weighted log-likelihood,
how many latent units are used, reconstruction errors and codebook use.

Every number is in nats per example, averaged over the examples of x (N, D), unless said
otherwise. Work is done in batches, so memory does not grow with N, and all randomness
comes from the ``rng`` argument (a ``numpy.random.Generator`` or a seed): the same seed
gives the same numbers.

**The ELBO** (tutorial eqs. 1-5) (T.1-5), always with beta = 1 and no free bits, so that it is
the true bound whatever the training objective was:

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))                                  (EVAL.1)

- VAE: one reparameterized sample z = mu + sigma * eps per example estimates the first
  term (an unbiased estimate); the KL is closed form (KL.1).
- Autoencoder: q(z|x) = N(Enc(x), I), so KL = ||Enc(x)||^2 / 2 (AE.1). The sampled form
  decodes z = Enc(x) + eps; the deterministic form decodes z = Enc(x) and reports the
  terms of its objective (AE.2), which are then not a bound.
- VQ-VAE: log p(x|z_q) as the model's training step computes it (its forward half) and
  KL = M log K (T.15).

``loss`` is the model's training objective with warm-up over: recon + beta KL, with free
bits lambda (OBJ.3) applied to the per-dimension KL averaged over the whole of x,
sum_j max(lambda, mean_x KL_j); for the VQ-VAE its objective (VQVAE.2).

**Importance-weighted log-likelihood** (Burda, Grosse and Salakhutdinov 2015): with k
draws z_i ~ q(z|x),

    L_k(x) = log (1/k) sum_i w_i,    w_i = p(x|z_i) p(z_i) / q(z_i|x)                 (IW.1)

    E[L_1] = ELBO <= E[L_k] <= E[L_{k+1}] <= log p(x),   L_k -> log p(x) as k -> inf     (IW.2)

    log w_i = log p(x|z_i) + log N(z_i; 0, I) - log N(z_i; mu, diag sigma^2)         (IW.3)
    log N(z; m, diag v) = -1/2 sum_j ((z_j - m_j)^2 / v_j + log v_j + log 2 pi)      (IW.4)

with (z_i - mu) / sigma = eps_i, the standard normal draw itself, in the q term.
The samples are taken ``chunk`` at a time; the log of the sum is kept as a running
maximum m and a running sum s of exp(a - m) per example, so no (N, k, D) array is made:

    m' = max(m, max_i a_i);   s' = s exp(m - m') + sum_i exp(a_i - m')
    log sum_i exp(a_i) = m + log s                                                      (IW.5)

For many samples at once the Bernoulli log-likelihood (LIK.3), x.l - sum_d softplus(l_d),
is evaluated with softplus(l) = max(l, 0) + log(1 + exp(-|l|)) and max(l, 0) = (l + |l|) / 2:

    log p(x|l) = (x - 1/2).l - sum_d |l_d| / 2 - sum_d log(1 + exp(-|l_d|))           (IW.6)

which needs one exp and one log per entry and row sums besides: for a float32 model one
compiled pass with exp and log1p as polynomials (IW.7), otherwise NumPy's SIMD exp and
log. The Gaussian one is (LIK.1). Example n draws its samples from its own generator
(:func:`example_rng`), so the estimate does not depend on how the work is cut up.

**Latent use.** KL per latent dimension, the mean over x of (KL.1) (or Enc(x)_j^2 / 2
for the autoencoder); the Z values sum to the KL of (EVAL.1):

    KL_j = mean_x KL(q(z_j|x) || N(0, 1))                                              (EVAL.2)

A unit u is active (Burda et al. 2015) when its posterior mean moves with x:

    A_u = Var_x( E_q[z_u | x] ) > 0.01                                                  (EVAL.3)

**Reconstruction errors**, per pixel, of xhat = E[x|z] at the posterior mean of z
(the code for an autoencoder, the chosen codes for a VQ-VAE):

    mse = mean (xhat - x)^2
    bce = -mean [x log p + (1 - x) log(1 - p)],  p = clip(xhat, 1e-7, 1 - 1e-7)       (EVAL.4)

(bce is NaN when x is not in [0, 1].)

**Codebook use** of a VQ-VAE: with n_k the number of code vectors, over all of x, that
chose code k, and p_k = n_k / (N M),

    perplexity = exp(-sum_k p_k log p_k);    used_fraction = #{k : n_k > 0} / K         (EVAL.5)

Letters: N examples, D data size, Z latent size, k importance samples, K codes, M code
vectors per example. docs/derivations.md, section EVAL.
"""
from __future__ import annotations

import math
import os
import threading

import numpy as np

from .models.autoencoder import Autoencoder
from .models.base import as_rng, likelihood_forward
from .models.vae import VAE
from .ops import gaussian_kl_forward
from .ops.centred_softplus import centred_softplus_sums
from .ops.vq import perplexity
from .ops.mlp import work_buffer

LOG_2PI = math.log(2.0 * math.pi)
ACTIVE_THRESHOLD = 0.01  # Burda et al. (2015)
BCE_CLIP = 1e-7
IW_ROWS = 2048  # default (example, sample) pairs decoded at once by iw_log_likelihood:
# on M2 (benchmarks/RESULTS.md) 2048 rows took 0.94 of the time of 1024, whose chunks
# pay their Python and small-array work twice as often


# ----------------------------------------------------------------------------------
# Argument checks and what kind of posterior a model has


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def family(model) -> str:
    """How q(z|x) is defined: 'vae', 'ae-sampled', 'ae' (deterministic) or 'vq'; 'prior' for a code prior."""
    if isinstance(model, VAE):
        return "vae"
    if isinstance(model, Autoencoder):
        return "ae-sampled" if model.config["sampled"] else "ae"
    if callable(getattr(model, "assign", None)) and "num_codes" in getattr(model, "config", {}):
        return "vq"
    if getattr(model, "kind", None) == "made":
        return "prior"  # no latent variable: a learned prior over a VQ-VAE's codes
    raise ValueError(f"model must be a VAE, an Autoencoder or a VQ-VAE, got {type(model).__name__}")


def _need_gaussian_posterior(model, what: str) -> str:
    kind = family(model)
    if kind == "vq":
        raise ValueError(f"{what} needs a Gaussian q(z|x); a VQ-VAE has a point mass on codes")
    return kind


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def posterior(model, x):
    """x (N, D) -> mu (N, Z), logvar (N, Z) of q(z|x); logvar = 0 for an autoencoder."""
    if family(model) == "vae":
        return model.encode(x)
    code = model.encode(x)
    return code, np.zeros_like(code)


def kl_terms(model, mu, logvar):
    """KL(q(z_j|x) || N(0, 1)) per example and dimension, (N, Z).

    (KL.1) for a VAE; Enc(x)_j^2 / 2 for an autoencoder (AE.1), written directly so that
    small codes keep their value in float32 (1 + c^2 - 1 would round it away).
    """
    if family(model) == "vae":
        kl, _ = gaussian_kl_forward(mu, logvar)  # (N, Z)  (KL.1)
        return kl
    return 0.5 * mu * mu  # (N, Z)  (AE.1)


# ----------------------------------------------------------------------------------
# The ELBO and its terms (EVAL.1)


def elbo(model, x, rng=None, batch_size: int = 500) -> dict:
    """The ELBO (EVAL.1) over x, with beta = 1 and no free bits, and its two terms.

    Returns floats: ``elbo``, ``recon`` (= -E_q log p(x|z)), ``kl``, ``loss`` (the
    model's training objective, see the module docstring), ``elbo_se`` (the standard
    error of the mean ELBO over examples) and ``n``. The noise eps (N, Z) is drawn in
    float64 from ``rng`` batch after batch, one stream, so the result does not depend on
    batch_size, and a float32 copy of the model sees the same noise.
    """
    batch_size = _positive_int("batch_size", batch_size)
    kind = family(model)
    x = model.check_x(x)
    if kind == "vq":
        return _elbo_vq(model, x, batch_size)
    if kind == "prior":
        return _nll_prior(model, x, batch_size)
    if kind != "ae" and rng is None:
        raise ValueError("pass rng (a numpy Generator or a seed) to draw the posterior samples")
    rng = as_rng(rng) if kind != "ae" else None
    cfg = model.config
    n = x.shape[0]
    logp = np.empty(n)  # (N,)  log p(x|z) at one z per example
    kl = np.empty(n)  # (N,)
    kl_dim_sum = np.zeros(model.latent)  # (Z,)  sum over x of KL_nj, for free bits
    for start, stop in _batches(n, batch_size):
        xb = x[start:stop]
        mu, logvar = posterior(model, xb)  # (B, Z) each
        if kind == "ae":
            z = mu  # (B, Z)  deterministic code
        else:
            eps = rng.standard_normal(mu.shape).astype(model.dtype)  # (B, Z)  float64 draws
            z = mu + eps * np.exp(0.5 * logvar)  # (B, Z)  (REP.1)
        out = model.decoder_output(z)  # (B, D)
        lp, _ = likelihood_forward(cfg["likelihood"], out, xb, cfg["sigma2"])  # (B,)  (LIK.1/3)
        kl_dim = kl_terms(model, mu, logvar)  # (B, Z)  (KL.1) or (AE.1)
        logp[start:stop] = lp
        kl[start:stop] = kl_dim.sum(axis=1, dtype=np.float64)
        kl_dim_sum += kl_dim.sum(axis=0, dtype=np.float64)
    per_example = logp - kl  # (N,)  (EVAL.1)
    recon, kl_mean = float(-logp.mean()), float(kl.mean())
    free_bits = cfg.get("free_bits", 0.0)
    kl_term = np.maximum(kl_dim_sum / n, free_bits).sum() if free_bits > 0 else kl_mean  # (OBJ.3)
    return dict(elbo=float(per_example.mean()), recon=recon, kl=kl_mean,
                loss=float(recon + cfg["beta"] * kl_term), elbo_se=_std_error(per_example), n=n)


def _std_error(values: np.ndarray) -> float:
    n = values.shape[0]
    return float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def _elbo_vq(model, x, batch_size: int) -> dict:
    """VQ-VAE: recon and loss as the model's forward chain gives them (no backward pass),
    KL = M log K (T.15)."""
    cfg = model.config
    kl = cfg["num_vectors"] * math.log(cfg["num_codes"])  # (T.15)
    recon = loss = 0.0
    for start, stop in _batches(x.shape[0], batch_size):
        stats = model.forward(x[start:stop]).stats
        weight = (stop - start) / x.shape[0]
        recon += weight * stats["recon"]
        loss += weight * stats["loss"]
    return dict(elbo=-(recon + kl), recon=recon, kl=kl, loss=loss, elbo_se=math.nan,
                n=x.shape[0])


def _nll_prior(model, x, batch_size: int) -> dict:
    """A code prior (one-hot codes x): its exact log p(c) (MADE.1) stands in for the ELBO.

    The prior has no latent variable, so its likelihood is exact: ``elbo`` = log p(c) and
    ``loss`` = -log p(c), in nats per example; there is no reconstruction or KL term.
    """
    logp = model.log_prob(model.codes_of(x), batch_size=batch_size)  # (N,)  (MADE.1)
    nll = float(-logp.mean())
    return dict(elbo=-nll, loss=nll, elbo_se=_std_error(logp), n=x.shape[0])


# ----------------------------------------------------------------------------------
# Importance-weighted log-likelihood (IW.1-IW.6)


class RunningLogSumExp:
    """log sum_i exp(a_i) per row, over values that arrive in chunks (IW.5).

    Keeps a running maximum m (N,) and a running sum s (N,) of exp(a_i - m), in float64,
    so huge or tiny a_i neither overflow nor underflow.
    """

    def __init__(self, n: int):
        self.m = np.full(n, -np.inf)  # (N,)
        self.s = np.zeros(n)  # (N,)

    def update(self, a):
        """a (N, C): C more values per row."""
        a = np.asarray(a, dtype=np.float64)
        m_new = np.maximum(self.m, a.max(axis=1))  # (N,)  (IW.5)
        # exp(-inf - finite) = 0 for the first chunk; rows whose values are all -inf stay at 0
        scale = np.exp(np.where(np.isneginf(m_new), 0.0, self.m - m_new))  # (N,)
        shifted = np.where(np.isneginf(m_new)[:, None], -np.inf, a - m_new[:, None])  # (N, C)
        self.s = self.s * scale + np.exp(shifted).sum(axis=1)  # (N,)  (IW.5)
        self.m = m_new

    def result(self):
        """(N,) log sum exp of every value seen so far (-inf for a row of -inf only)."""
        return self.m + np.log(self.s)  # (IW.5)


def example_rng(seed: int, index: int) -> np.random.Generator:
    """The generator that draws the importance samples of example ``index``.

    ``iw_log_likelihood`` draws ``seed = rng.integers(2**63)`` once and then example n
    draws its k eps (k, Z) in order from ``default_rng([seed, n])``. Each example has its
    own stream, so the estimate does not depend on ``batch_size`` or ``chunk``. The draws
    are float64 (cast to the model's dtype for decoding).
    """
    return np.random.default_rng([int(seed), int(index)])


def _bernoulli_logp_samples(logits, x, bias=None, work=None):
    """log p(x_n | l_{n,i}) for C samples per example, the fast form (IW.6).

    logits (B*C, D); x (B, D) -> (B, C) float64. With ``bias`` (D,), the logits are
    ``logits + bias``: the decoder's last bias is added here, inside the pass over the
    logits, instead of in a pass of its own. ``work`` keeps the one (B*C, D) buffer this
    needs from call to call. Same values as the likelihood op (LIK.3) on x repeated C
    times: the centred term (x - 1/2).l is a batched matrix-vector product, plus
    (x - 1/2).b once per example, and the rest, sum_d |l_d|/2 + log(1 + e^-|l_d|), comes
    from ``centred_softplus_sums``: for float32 one compiled pass with polynomial exp and
    log (IW.7), else NumPy's exp and log in passes.
    """
    b, d = x.shape
    c = logits.shape[0] // b
    l, dtype = logits, logits.dtype
    xc = x - 0.5  # (B, D)
    centred = np.matmul(l.reshape(b, c, d), xc[:, :, None])[:, :, 0]  # (B, C)  (x - 1/2).l
    if bias is None:
        bias = np.zeros(d, dtype)
    else:
        centred += (xc @ bias)[:, None]  # (B, C)  (x - 1/2).(l + b) = (x - 1/2).l + (x - 1/2).b
    e = np.empty_like(l) if work is None else work_buffer(work, ("iw", "e"), l.shape, dtype)
    rest = centred_softplus_sums(l, bias, e)  # (B*C,)  sum_d c(l_d + b_d)
    return centred.astype(np.float64) - rest.reshape(b, c)  # (B, C)  (IW.6)


def _gaussian_logp_samples(mean, x, sigma2: float, bias=None):
    """log N(x_n; m_{n,i}, sigma2 I) for C samples per example (LIK.1).

    mean (B*C, D), overwritten; x (B, D) -> (B, C) float64. With ``bias`` (D,), the
    means are ``mean + bias``.
    """
    b, d = x.shape
    c = mean.shape[0] // b
    r = mean.reshape(b, c, d)
    shift = x if bias is None else x - bias  # (B, D)
    r -= shift[:, None, :]  # (B, C, D)  m - x
    sq = np.einsum("ncd,ncd->nc", r, r).astype(np.float64)  # (B, C)  ||x - m||^2
    return -0.5 * sq / sigma2 - 0.5 * d * math.log(2.0 * math.pi * sigma2)  # (B, C)  (LIK.1)


def loglik_samples(model, out, x, bias=None, work=None):
    """log p(x_n | z_{n,i}) from the decoder output of C samples per example.

    out (B*C, D), rows n*C .. n*C + C - 1 belonging to example n, may be overwritten;
    x (B, D) -> (B, C) float64. With ``bias`` (D,), the decoder output is ``out + bias``
    (see ``decoder_output(z, work, split_bias=True)``). ``work``, a dict, keeps a
    buffer for the next call.
    """
    cfg = model.config
    if cfg["likelihood"] == "bernoulli":
        return _bernoulli_logp_samples(out, x, bias, work)  # (IW.6)
    return _gaussian_logp_samples(out, x, cfg["sigma2"], bias)  # (LIK.1)


def iw_log_likelihood(model, x, k: int = 5000, rng=None, batch_size: int | None = None,
                      chunk: int | None = None, workers: int | None = None) -> dict:
    """The importance-weighted estimate L_k of log p(x) (IW.1), per example and averaged.

    Defined for the VAEs and the sampled autoencoder (q = N(Enc(x), I)). ``batch_size``
    examples are encoded together and their samples are decoded ``chunk`` per example at
    a time, into buffers each thread keeps from chunk to chunk, so memory is about
    2 * workers * batch_size * chunk * (H + D) numbers; by default chunk is min(k, 128)
    and batch_size is such that batch_size * chunk is about 2048 (IW_ROWS: about 20 MB
    per thread for the 784-400-20 model in float32).

    ``workers`` threads (default: one per core, at most 2) each take whole batches of
    examples, with BLAS at one thread each: the matrix products of one batch overlap
    the elementwise work of another, which a single thread leaves one core idle for.
    Every example draws its samples from its own stream (:func:`example_rng`), so the
    estimate does not depend on ``workers``, ``batch_size`` or ``chunk``.

    Returns ``log_px`` (mean of L_k), ``nll`` (= -log_px), ``log_px_se`` (its standard
    error over examples), ``per_example`` (N,) float64, ``elbo_k1`` (the mean of all
    N k values of log w_i: the ELBO estimated with k samples per example), ``k``, ``n``.
    The noise is drawn in float64 whatever the model's dtype, so a float32 and a float64
    copy of a model see the same samples. Decoding runs in the model's dtype; the log
    weights and their log-sum-exp in float64.
    """
    kind = _need_gaussian_posterior(model, "iw_log_likelihood")
    if kind == "ae":
        raise ValueError(
            "iw_log_likelihood needs q(z|x) to be a density; the deterministic autoencoder "
            "has a point code (build Autoencoder(sampled=True) for q = N(Enc(x), I))"
        )
    k = _positive_int("k", k)
    chunk = min(k, 128) if chunk is None else _positive_int("chunk", chunk)
    chunk = min(chunk, k)
    if batch_size is None:
        batch_size = max(1, IW_ROWS // chunk)
    batch_size = _positive_int("batch_size", batch_size)
    workers = min(2, os.cpu_count() or 1) if workers is None else _positive_int("workers", workers)
    if rng is None:
        raise ValueError("pass rng (a numpy Generator or a seed) to draw the importance samples")
    x = model.check_x(x)
    seed = int(as_rng(rng).integers(2**63))
    n = x.shape[0]

    local = threading.local()  # each thread's decoder buffers, reused batch after batch

    def one_batch(bounds):
        if not hasattr(local, "work"):
            local.work = {}
        return _iw_batch(model, x[bounds[0]:bounds[1]], bounds[0], seed, k, chunk, local.work)

    batches = list(_batches(n, batch_size))
    results = [one_batch(batches[0])]  # in this thread: kernels compiled before the workers start
    if len(batches) > 1:
        if workers > 1:
            del local.work  # the workers decode the rest into buffers of their own
        results += _map_in_threads(one_batch, batches[1:], workers)
    per_example = np.concatenate([r[0] for r in results])  # (N,)
    log_w_total = math.fsum(r[1] for r in results)  # sum of every log w_i, for elbo_k1
    log_px = float(per_example.mean())
    return dict(log_px=log_px, nll=-log_px, log_px_se=_std_error(per_example),
                per_example=per_example, elbo_k1=float(log_w_total / (n * k)), k=k, n=n)


def _map_in_threads(fn, items, workers: int) -> list:
    """[fn(item) for item in items], on ``workers`` threads with BLAS at one thread each.

    Results come back in order. On an exception or Ctrl-C the batches not yet started
    are cancelled, so the call returns (or raises) as soon as the running ones finish.
    A worker whose batch fails also tells the others to start no further batch: the
    main thread, waiting for an earlier batch, may cancel the queue only later.
    """
    if workers == 1:
        return [fn(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    from .threads import blas_threads

    failed = threading.Event()

    def run(item):
        if failed.is_set():  # a batch queued before it already failed: its error is raised
            return None
        try:
            return fn(item)
        except BaseException:
            failed.set()
            raise

    with blas_threads(1):
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            return list(pool.map(run, items))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _iw_batch(model, xb, start: int, seed: int, k: int, chunk: int, work: dict):
    """L_k (B,) for the examples xb (B, D) whose first has index ``start``, and the sum
    of their B k log weights. Samples are decoded ``chunk`` per example at a time, into
    the buffers kept in ``work`` (this thread's own)."""
    b, z_dim, dtype = xb.shape[0], model.latent, model.dtype
    mu, logvar = posterior(model, xb)  # (B, Z) each
    std = np.exp(0.5 * logvar)  # (B, Z)
    logvar_sum = logvar.sum(axis=1, dtype=np.float64)  # (B,)  log det of q's covariance
    streams = [example_rng(seed, i) for i in range(start, start + b)]
    lse = RunningLogSumExp(b)
    log_w_total = 0.0
    for first in range(0, k, chunk):
        c = min(chunk, k - first)
        eps64 = work_buffer(work, ("iw", "eps"), (b, c, z_dim), np.float64)  # (B, C, Z)
        for row, stream in zip(eps64, streams):
            stream.standard_normal((c, z_dim), out=row)  # the example's own stream
        z = mu[:, None, :] + std[:, None, :] * eps64.astype(dtype)  # (B, C, Z)  (REP.1)
        out, bias = model.decoder_output(z.reshape(b * c, z_dim), work, split_bias=True)  # (B*C, D), (D,) or None
        log_px_z = loglik_samples(model, out, xb, bias, work)  # (B, C)  (IW.6) or (LIK.1)
        z64 = work_buffer(work, ("iw", "z"), z.shape, np.float64)  # (B, C, Z)
        z64[...] = z  # the decoded z, in float64
        sq_eps = np.einsum("ncz,ncz->nc", eps64, eps64)  # (B, C)  ||(z - mu) / sigma||^2
        log_q = -0.5 * (sq_eps + logvar_sum[:, None] + z_dim * LOG_2PI)  # (B, C)  (IW.4)
        log_pz = -0.5 * (np.einsum("ncz,ncz->nc", z64, z64) + z_dim * LOG_2PI)  # (B, C)  (IW.4)
        log_w = log_px_z + log_pz - log_q  # (B, C)  (IW.3)
        lse.update(log_w)  # (IW.5)
        log_w_total += log_w.sum()
    return lse.result() - math.log(k), log_w_total  # (B,)  (IW.1)


# ----------------------------------------------------------------------------------
# Latent use (EVAL.2, EVAL.3)


def kl_per_dimension(model, x, batch_size: int = 500):
    """(Z,) mean over x of each latent dimension's KL to N(0, 1) (EVAL.2); sums to the KL term."""
    _need_gaussian_posterior(model, "kl_per_dimension")
    batch_size = _positive_int("batch_size", batch_size)
    x = model.check_x(x)
    total = np.zeros(model.latent)  # (Z,)
    for start, stop in _batches(x.shape[0], batch_size):
        mu, logvar = posterior(model, x[start:stop])  # (B, Z) each
        total += kl_terms(model, mu, logvar).sum(axis=0, dtype=np.float64)  # (Z,)
    return total / x.shape[0]  # (Z,)  (EVAL.2)


def active_units(model, x, threshold: float = ACTIVE_THRESHOLD, batch_size: int = 500) -> dict:
    """Units whose posterior mean varies over x: Var_x(E_q[z_u]) > threshold (EVAL.3).

    Returns ``count`` (int) and ``variances`` (Z,) float64 (population variance over x).
    """
    _need_gaussian_posterior(model, "active_units")
    batch_size = _positive_int("batch_size", batch_size)
    threshold = float(threshold)
    if not threshold >= 0 or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    x = model.check_x(x)
    means = [posterior(model, x[s:e])[0] for s, e in _batches(x.shape[0], batch_size)]
    mu = np.concatenate(means).astype(np.float64)  # (N, Z): small, one row per example
    variances = mu.var(axis=0)  # (Z,)  (EVAL.3)
    return dict(count=int((variances > threshold).sum()), variances=variances)


# ----------------------------------------------------------------------------------
# Reconstruction errors (EVAL.4) and codebook use (EVAL.5)


def reconstruction_errors(model, x, batch_size: int = 500) -> dict:
    """Per-pixel ``mse`` and ``bce`` of the reconstruction from the posterior mean (EVAL.4)."""
    batch_size = _positive_int("batch_size", batch_size)
    family(model)
    x = model.check_x(x)
    unit = bool(x.min() >= 0.0 and x.max() <= 1.0)
    sq = ce = 0.0
    for start, stop in _batches(x.shape[0], batch_size):
        xb = x[start:stop].astype(np.float64)  # (B, D)
        xhat = model.reconstruct(x[start:stop]).astype(np.float64)  # (B, D)  E[x|z], z at the mean
        sq += np.sum((xhat - xb) ** 2)
        if unit:
            p = np.clip(xhat, BCE_CLIP, 1.0 - BCE_CLIP)  # (B, D)  keeps log away from 0
            ce -= np.sum(xb * np.log(p) + (1.0 - xb) * np.log1p(-p))  # (EVAL.4)
    size = x.size
    return dict(mse=float(sq / size), bce=float(ce / size) if unit else math.nan)


def codebook_stats(model, x, batch_size: int = 500) -> dict:
    """Code use of a VQ-VAE over x (EVAL.5): ``perplexity``, ``used_fraction``, ``counts`` (K,)."""
    if family(model) != "vq":
        raise ValueError(f"codebook_stats needs a VQ-VAE, got {type(model).__name__}")
    batch_size = _positive_int("batch_size", batch_size)
    x = model.check_x(x)
    num_codes = int(model.config["num_codes"])
    counts = np.zeros(num_codes, dtype=np.int64)  # (K,)
    for start, stop in _batches(x.shape[0], batch_size):
        idx = np.asarray(model.assign(x[start:stop]))  # (B, M) int
        counts += np.bincount(idx.reshape(-1), minlength=num_codes)  # (K,)  n_k
    return dict(perplexity=perplexity(counts),  # (EVAL.5)
                used_fraction=float((counts > 0).mean()), counts=counts)


# ----------------------------------------------------------------------------------
# Everything at once


def evaluate_all(model, x, rng=None, k: int = 0, batch_size: int = 500) -> dict:
    """The numbers a report needs, as a flat dict of plain floats and ints.

    ELBO terms (``elbo``, ``recon``, ``kl``, ``loss``), ``mse`` and ``bce``; for Gaussian
    posteriors ``active_units``; for a VQ-VAE ``perplexity`` and ``used_fraction``; and,
    when k > 0 and the model has a density q(z|x), ``log_px``, ``nll`` and ``iw_k``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0 (0 skips the importance-weighted "
                         f"estimate), got {k!r}")
    kind = family(model)
    rng = None if rng is None else as_rng(rng)  # one generator shared by every estimate
    e = elbo(model, x, rng, batch_size)
    result = {key: e[key] for key in ("elbo", "recon", "kl", "loss", "n")}
    result.update(reconstruction_errors(model, x, batch_size))
    if kind == "vq":
        stats = codebook_stats(model, x, batch_size)
        result.update(perplexity=stats["perplexity"], used_fraction=stats["used_fraction"])
    else:
        result["active_units"] = active_units(model, x, batch_size=batch_size)["count"]
    if k > 0 and kind in ("vae", "ae-sampled"):
        iw = iw_log_likelihood(model, x, k, rng)
        result.update(log_px=iw["log_px"], nll=iw["nll"], iw_k=iw["k"])
    return result


__all__ = [
    "RunningLogSumExp", "active_units", "codebook_stats", "elbo",
    "evaluate_all", "example_rng", "family", "iw_log_likelihood", "kl_per_dimension",
    "kl_terms", "loglik_samples", "posterior", "reconstruction_errors",
]
