"""The VQ-VAE (tutorial section 6; van den Oord et al. 2017) with an MLP encoder and decoder.

The encoder maps x (N, D) to M code vectors of size Dz per example, z_e (N, M, Dz). Each
is replaced by a row of the codebook E (K, Dz): the nearest one (VQ.1) or the one with
the largest dot product, as the tutorial states (VQ.2). The decoder reads the M chosen
vectors, concatenated, and gives p(x|z): Gaussian with variance sigma2 (the tutorial's
choice, sigma2 = 1) or Bernoulli.

    q(z|x): a point mass on the chosen codes;   p(z): uniform over the K^M choices
    KL(q || p) = M log K, a constant                                          (T.15)
    ELBO = log p(x | z_q) - M log K                                           (VQVAE.1)

The constant does not train anything, so what is left of the ELBO is the reconstruction
term (T.16-17). The objective is, per example,

    loss = -log p(x|z_q) + sum_m ||sg[z_e] - e||^2 + beta sum_m ||z_e - sg[e]||^2   (VQVAE.2)

(reconstruction, codebook loss (VQ.4), commitment loss (VQ.5); beta = 0.25). The
reconstruction gradient reaches the encoder straight through the quantizer (VQ.3).

Options the papers and users expect (documented in docs/derivations.md, section VQ):
- ``ema``: learn the codebook by moving averages (VQ.6) instead of the codebook loss;
- ``restart_after``: a code unused for that many steps is re-initialised from a random
  encoder output of the latest batch (VQVAE.3);
- ``kmeans_init``: fit the codebook to the first batch's encoder outputs by k-means.

The objective, the bookkeeping and encode/assign/decode_indices reach the networks only
through ``_encoder_forward``, ``_encoder_backward``, ``_decoder_forward`` and
``_decoder_backward`` (z_e and z_q as (N, M, Dz)); the convolutional VQ-VAE
(:mod:`npvae.models.conv_vqvae`) overrides those four and inherits the rest.

State that is not a parameter (moving averages, steps since each code was last used) is
kept in ``self.buffers``, arrays saved with the checkpoint. Letters: N batch, D data size,
M code vectors per example, Dz code size, K codes, R = N M rows.
"""
from __future__ import annotations

import math

import numpy as np

from .. import _validate as v
from ..ops.activations import activation_code
from ..ops.mlp import mlp_backward, mlp_forward, mlp_init, mlp_shapes
from ..ops.vq import (
    code_counts, codebook_loss_backward, codebook_loss_forward, commitment_loss_backward,
    commitment_loss_forward, ema_init, ema_update, EMAState, kmeans_init, metric_code,
    perplexity, quantize_backward, quantize_forward,
)
from .base import (
    Forward, Model, trusted, as_rng, check_likelihood, likelihood_backward, likelihood_forward, likelihood_mean,
    positive_int,
)


def quantizer_settings(*, num_codes, code_dim, num_vectors, likelihood, sigma2, metric, beta,
                       ema, ema_decay, restart_after, kmeans_init, dtype) -> dict:
    """Check the settings every VQ-VAE shares, whatever its networks; return them for the config."""
    sigma2 = check_likelihood(likelihood, sigma2, dtype)
    beta = v.nonnegative("beta", beta)
    metric_code(metric)
    num_codes, code_dim = positive_int("num_codes", num_codes), positive_int("code_dim", code_dim)
    num_vectors = positive_int("num_vectors", num_vectors)
    if not v.is_integer(restart_after):
        raise ValueError(f"restart_after must be an integer number of steps, got {restart_after!r}")
    if beta < 0 or restart_after < 0 or not 0.0 <= ema_decay < 1.0:
        raise ValueError(
            f"need beta >= 0, restart_after >= 0 and 0 <= ema_decay < 1, "
            f"got {beta}, {restart_after}, {ema_decay}"
        )
    return dict(num_codes=int(num_codes), code_dim=int(code_dim), num_vectors=int(num_vectors),
                likelihood=likelihood, sigma2=sigma2, metric=metric, beta=float(beta),
                ema=bool(ema), ema_decay=float(ema_decay), restart_after=int(restart_after),
                kmeans_init=bool(kmeans_init))


class VQVAE(Model):
    """Parameters: ``enc.*`` (D -> M Dz), ``dec.*`` (M Dz -> D) and ``codebook`` (K, Dz).

    The codebook starts as N(0, 1/Dz) rows, on the scale of the encoder's initial
    outputs; weights as in :func:`npvae.ops.mlp.init_scale`.
    """

    kind = "vqvae"

    def __init__(self, data_dim: int = 784, hidden=(400,), num_codes: int = 128,
                 code_dim: int = 16, num_vectors: int = 4, activation: str = "relu",
                 likelihood: str = "gaussian", sigma2: float = 1.0, metric: str = "euclidean",
                 beta: float = 0.25, ema: bool = False, ema_decay: float = 0.99,
                 restart_after: int = 0, kmeans_init: bool = False, dtype=np.float32, rng=0):
        hidden = tuple(positive_int("each hidden size", h) for h in hidden)
        activation_code(activation)
        data_dim = positive_int("data_dim", data_dim)
        q = quantizer_settings(
            num_codes=num_codes, code_dim=code_dim, num_vectors=num_vectors, likelihood=likelihood,
            sigma2=sigma2, metric=metric, beta=beta, ema=ema, ema_decay=ema_decay,
            restart_after=restart_after, kmeans_init=kmeans_init, dtype=dtype)
        config = dict(data_dim=int(data_dim), hidden=list(hidden), num_codes=q.pop("num_codes"),
                      code_dim=q.pop("code_dim"), num_vectors=q.pop("num_vectors"),
                      activation=activation, **q)
        self.K, self.Dz, self.M = int(num_codes), int(code_dim), int(num_vectors)
        width = self.M * self.Dz
        shapes = {**mlp_shapes("enc", (data_dim, *hidden, width)),
                  **mlp_shapes("dec", (width, *hidden[::-1], data_dim)),
                  "codebook": (self.K, self.Dz)}
        super().__init__(shapes, dtype, config)
        rng = as_rng(rng)
        mlp_init(self.params, "enc", activation, rng)
        mlp_init(self.params, "dec", activation, rng)
        self._init_codebook(rng)

    def _init_codebook(self, rng) -> None:
        """Codebook rows drawn from N(0, 1/Dz), and the buffers that are not parameters."""
        self.params["codebook"] = rng.standard_normal((self.K, self.Dz)) / math.sqrt(self.Dz)
        ema_state = ema_init(self.params["codebook"])
        self.buffers = {
            "ema_cluster_size": ema_state.cluster_size,  # (K,)  N_k of (VQ.6)
            "ema_embed_sum": ema_state.embed_sum,  # (K, Dz)  S_k of (VQ.6)
            "steps_unused": np.zeros(self.K, dtype=np.int64),  # (K,)  for restarts
            "initialised": np.array(not self.config["kmeans_init"]),  # k-means done (or not wanted)
        }

    # -- the two networks: forward, and backward from the caches --------------------
    # Everything else (the objective, the bookkeeping, encode/assign/decode_indices) goes
    # through these four, so a subclass with other networks overrides only them.
    def _encoder_forward(self, x):
        """x (N, D) -> z_e (N, M, Dz), the code vectors before quantization, and a cache."""
        h, cache = mlp_forward(self.params, "enc", x, self.config["activation"])  # (N, M Dz)
        return h.reshape(x.shape[0], self.M, self.Dz), cache

    def _encoder_backward(self, dz_e, cache, grads) -> None:
        """dz_e (N, M, Dz) -> the encoder's parameter gradients, written into ``grads``."""
        mlp_backward(dz_e.reshape(dz_e.shape[0], -1), cache, grads, need_dx=False)

    def _decoder_forward(self, z_q):
        """z_q (N, M, Dz) -> the decoder's raw output (N, D) (Gaussian mean or logits), a cache."""
        return mlp_forward(self.params, "dec", z_q.reshape(z_q.shape[0], -1), self.config["activation"])

    def _decoder_backward(self, dout, cache, grads):
        """dout (N, D) -> dz_q (N, M, Dz); the decoder's parameter gradients go into ``grads``."""
        dzq, _ = mlp_backward(dout, cache, grads)  # (N, M Dz)
        return dzq.reshape(dout.shape[0], self.M, self.Dz)

    # -- the objective ---------------------------------------------------------------
    def forward(self, x, *, rng=None, eps=None, step=None) -> Forward:
        """The forward chain. The model has no noise: rng, eps, step unused."""
        cfg = self.config
        x = self.check_x(x)
        n, R = x.shape[0], x.shape[0] * self.M
        codebook = self.params["codebook"]

        with trusted():  # x was checked above: the ops need not scan it again
            z_e, enc_cache = self._encoder_forward(x)  # (N, M, Dz)
            rows = z_e.reshape(R, self.Dz)  # (R, Dz)  z_e, one row per code vector
            z_q, q_cache = quantize_forward(rows, codebook, cfg["metric"])  # (R, Dz)  (VQ.1-3)
            idx = q_cache.idx  # (R,)
            cb, cb_cache = codebook_loss_forward(rows, codebook, idx)  # (R,)  (VQ.4)
            cm, cm_cache = commitment_loss_forward(rows, codebook, idx, cfg["beta"])  # (R,)  (VQ.5)
            dec_out, dec_cache = self._decoder_forward(z_q.reshape(n, self.M, self.Dz))  # (N, D)
            logp, lik_cache = likelihood_forward(cfg["likelihood"], dec_out, x, cfg["sigma2"])  # (N,)
            recon = -logp.mean()  # ()
            codebook_term = 0.0 if cfg["ema"] else cb.sum() / n  # ()  mean over examples of sum_m
            commitment = cm.sum() / n  # ()
            loss = recon + codebook_term + commitment  # ()  (VQVAE.2)
            self.check_loss(loss, x)

        counts = code_counts(idx, self.K)
        kl = self.M * math.log(self.K)  # (T.15)
        stats = dict(loss=float(loss), recon=float(recon), codebook=float(cb.sum() / n),
                     commitment=float(commitment), kl=kl, elbo=float(-recon - kl),
                     perplexity=perplexity(counts), used_fraction=float((counts > 0).mean()))
        saved = dict(n=n, rows=rows.copy(), idx=idx,  # rows and idx: also for after_step
                     enc=enc_cache, quantize=q_cache, codebook=cb_cache, commitment=cm_cache,
                     dec=dec_cache, lik=lik_cache)
        return Forward(float(loss), stats, saved)

    def _reverse(self, s, grads) -> None:
        """The reverse chain, from the caches ``s`` of :meth:`forward`, into ``grads``."""
        cfg, n = self.config, s["n"]
        R = n * self.M
        dlogp = np.full(n, -1.0 / n, dtype=self.dtype)  # (N,)
        ddec_out = likelihood_backward(cfg["likelihood"], dlogp, s["lik"])  # (N, D)  (LIK.2/4)
        dzq = self._decoder_backward(ddec_out, s["dec"], grads)  # (N, M, Dz)  decoder-input gradient
        dz_st = quantize_backward(dzq.reshape(R, self.Dz), s["quantize"])  # (R, Dz)  (VQ.3)
        drow = np.full(R, 1.0 / n, dtype=self.dtype)  # (R,)  d loss / d l_r
        dz_cm = commitment_loss_backward(drow, s["commitment"])  # (R, Dz)  (VQ.5)
        dz_e = dz_st + dz_cm  # (R, Dz)  two paths into z_e add up
        if cfg["ema"]:
            grads["codebook"][...] = 0.0  # (K, Dz)  learned by moving averages, not gradient  (VQ.6)
        else:
            grads["codebook"] = codebook_loss_backward(drow, s["codebook"])  # (K, Dz)  (VQ.4)
        self._encoder_backward(dz_e.reshape(n, self.M, self.Dz), s["enc"], grads)

    # -- updates outside the gradient: called by the training loop -------------------
    def on_batch_start(self, x, rng) -> None:
        """Before the first step: fit the codebook to this batch's encoder outputs by k-means."""
        if self.buffers["initialised"]:
            return
        rows = self.encode(x).reshape(-1, self.Dz)
        self.params["codebook"] = kmeans_init(rows, self.K, as_rng(rng))
        cs, es = ema_init(self.params["codebook"])
        self.buffers["ema_cluster_size"][...] = cs
        self.buffers["ema_embed_sum"][...] = es
        self.buffers["initialised"][...] = True

    def after_step(self, fwd: Forward, rng) -> None:
        """After the optimizer step: moving-average codebook (VQ.6) and dead-code restarts
        (VQVAE.3), from the encoder rows and codes of the step's forward record ``fwd``."""
        rows, idx = fwd.saved["rows"], fwd.saved["idx"]  # (R, Dz), (R,)
        cfg, b = self.config, self.buffers
        if cfg["ema"]:
            state = EMAState(b["ema_cluster_size"], b["ema_embed_sum"])
            codebook, state = ema_update(state, rows, idx, cfg["ema_decay"])  # (VQ.6)
            self.params["codebook"] = codebook
            b["ema_cluster_size"][...], b["ema_embed_sum"][...] = state
        used = code_counts(idx, self.K) > 0  # (K,)
        b["steps_unused"][used] = 0
        b["steps_unused"][~used] += 1
        if cfg["restart_after"] > 0:
            dead = np.flatnonzero(b["steps_unused"] >= cfg["restart_after"])
            if dead.size:
                self.restart_codes(dead, rows, as_rng(rng))

    def restart_codes(self, dead, rows, rng) -> None:
        """Move codes ``dead`` onto random encoder outputs ``rows`` (R, Dz)  (VQVAE.3)."""
        picks = rng.integers(rows.shape[0], size=dead.size)
        jitter = 1e-3 * rows.std() * rng.standard_normal((dead.size, self.Dz))
        new = (rows[picks] + jitter).astype(self.dtype)
        self.params["codebook"][dead] = new
        self.buffers["ema_cluster_size"][dead] = 1.0  # restart the averages at the new code
        self.buffers["ema_embed_sum"][dead] = new
        self.buffers["steps_unused"][dead] = 0

    # -- using the model -------------------------------------------------------------
    def encode(self, x):
        """x (N, D) -> z_e (N, M, Dz), the encoder outputs before quantization."""
        x = self.check_x(x)
        z_e, _ = self._encoder_forward(x)
        return z_e

    def assign(self, x):
        """x (N, D) -> idx (N, M), the chosen code of each vector."""
        z_e = self.encode(x)
        _, cache = quantize_forward(z_e.reshape(-1, self.Dz), self.params["codebook"],
                                    self.config["metric"])
        return cache.idx.reshape(x.shape[0], self.M)

    def assignment_margin(self, x) -> float:
        """The smallest gap between the best and second-best code score over all rows.

        Finite differences are meaningful only while a perturbation cannot change any
        assignment; gradient checks keep this margin well above the step size.
        """
        rows = self.encode(x).reshape(-1, self.Dz).astype(np.float64)
        E = self.params["codebook"].astype(np.float64)
        scores = rows @ E.T  # (R, K)
        if self.config["metric"] == "euclidean":
            scores = 2.0 * scores - np.sum(E * E, axis=1)  # larger is nearer
        if self.K < 2:
            return math.inf
        top2 = np.sort(scores, axis=1)[:, -2:]
        return float((top2[:, 1] - top2[:, 0]).min())

    def straight_through_objective(self, x):
        """The function whose true gradient is this model's gradient estimate  (VQVAE.4).

        With the stop-gradient values frozen at the current parameters (the assignment
        idx0, the encoder rows z0 and their codes e0 = E[idx0]), define

            z_q(theta) = z_e(theta) + (e0 - z0)        equal to e0 now, slope 1 in z_e
            f(theta)   = -log p(x | z_q) + ||z0 - E[idx0]||^2 + beta ||z_e - e0||^2

        averaged over the batch. At the current parameters f equals the loss and its
        gradient is exactly the straight-through one, so finite differences of f check
        the backward pass. The loss itself is piecewise constant in z_e: its finite
        differences would see no reconstruction gradient at all.
        """
        cfg = self.config
        x = self.check_x(x)
        n, p = x.shape[0], self.params
        z0 = self.encode(x).reshape(-1, self.Dz).copy()  # (R, Dz)
        _, cache = quantize_forward(z0, p["codebook"], cfg["metric"])
        idx0 = cache.idx  # (R,)
        e0 = p["codebook"][idx0].copy()  # (R, Dz)

        def f():
            z_e, _ = self._encoder_forward(x)  # (N, M, Dz)
            rows = z_e.reshape(-1, self.Dz)  # (R, Dz)
            z_q = rows + (e0 - z0)  # (R, Dz)
            dec_out, _ = self._decoder_forward(z_q.reshape(n, self.M, self.Dz))  # (N, D)
            logp, _ = likelihood_forward(cfg["likelihood"], dec_out, x, cfg["sigma2"])
            cb = 0.0 if cfg["ema"] else np.sum((z0 - p["codebook"][idx0]) ** 2) / n
            cm = cfg["beta"] * np.sum((rows - e0) ** 2) / n
            return float(-logp.mean() + cb + cm)

        return f

    def decode_indices(self, idx):
        """idx (N, M) code indices -> E[x|z] (N, D)."""
        idx = np.asarray(idx)
        if idx.ndim != 2 or idx.shape[1] != self.M:
            raise ValueError(f"idx must have shape (N, {self.M}), got {idx.shape}")
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"idx must have an integer dtype (code indices), got {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.K):
            raise ValueError(f"idx must lie in [0, {self.K}), got values from {idx.min()} to {idx.max()}")
        z_q = self.params["codebook"][idx]  # (N, M, Dz)
        out, _ = self._decoder_forward(z_q)  # (N, D)
        return likelihood_mean(self.config["likelihood"], out)

    def reconstruct(self, x, rng=None):
        return self.decode_indices(self.assign(x))

    def sample(self, n: int, rng):
        """Codes drawn from the uniform prior, decoded: (n, D)."""
        n = positive_int("n", n)
        idx = as_rng(rng).integers(self.K, size=(n, self.M))
        return self.decode_indices(idx)
