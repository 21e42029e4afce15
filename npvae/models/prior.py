"""A learned prior over a VQ-VAE's codes: MADE (Germain et al. 2015), a masked autoregressive MLP.

A VQ-VAE describes an image by M code indices c = (c_1, ..., c_M), each one of K. The
tutorial's prior is uniform, p(c) = K^-M, so decoding uniformly drawn codes gives noise:
almost none of the K^M combinations is a digit. This model learns p(c) from the codes of
the training set, one position at a time (the chain rule, exact for any order):

    log p(c) = sum_m log p(c_m | c_<m)                                             (MADE.1)

The input is the one-hot codes x (N, M K), position m in columns m K .. m K + K - 1. Every
layer is a masked linear layer (MADE.4); each unit carries a degree, and the masks (MADE.2-3)
let the logits of position m see the codes of positions < m only, whatever M is (a 7x7 code
map is M = 49 positions in raster order). By default the output layer also reads x
directly (the "direct connections" of the MADE paper), a linear path that learns pairwise
statistics fast; ``direct=False`` leaves it out, and the output layer reads h_L alone.

    h_0 = x;   h_{l+1} = act(h_l (W_l * A_l) + b_l)               l = 0 .. L-1   (MADE.4)
    logits = [h_L, x] (W_out * A_out) + b_out,   (N, M K) -> (N, M, K)            (MADE.4)
    logits = h_L (W_out * A_out) + b_out          without the direct connection   (MADE.4)

The direct connection costs (M K)^2 weights, the hidden path about 2 M K H: for the MLP
VQ-VAE's 4 codes of 128 that is 0.26 million against 0.5 million, but for a 7x7 map of
256 codes 157 million against 13 million. :func:`direct_by_default` is the rule
``npvae train-prior`` uses to choose.
    loss = (1/N) sum_n sum_m xent(logits_nm, c_nm) = mean_n -log p(c_n)   (MADE.1) (XENT.1)

In a VQ-VAE with this prior, KL(q(c|x) || p(c)) = -log p(c(x)) for the point mass q on the
chosen codes, so the ELBO gains exactly what the prior learns over M log K
(docs/derivations.md, section 10.1).

Parameters: ``hid.{l}.W`` (I_l, H_l), ``hid.{l}.b`` (H_l,), ``out.W`` (H_L + M K, M K)
with the direct connection or (H_L, M K) without, ``out.b`` (M K,). Letters: N batch, M positions, K codes, H hidden width.
docs/derivations.md, section MADE.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import _validate as v
from ..ops.activations import activation_backward, activation_code, activation_forward
from ..ops.masked import masked_linear_backward, masked_linear_forward
from ..ops.mlp import init_scale
from ..ops.softmax import log_softmax, softmax_xent_backward, softmax_xent_forward
from .base import Forward, Model, as_rng, positive_int, trusted


def input_degrees(num_vectors: int, num_codes: int) -> np.ndarray:
    """(M K,) the degree of each one-hot input: m + 1 for the K columns of position m."""
    return np.repeat(np.arange(1, num_vectors + 1), num_codes)


def hidden_degrees(width: int, num_vectors: int) -> np.ndarray:
    """(H,) degrees 1 .. M-1 in turn (MADE.2); all 1 when M = 1 (then nothing reaches the output)."""
    return 1 + np.arange(width) % max(num_vectors - 1, 1)


# The direct connection is left out by default when it would hold more than this many
# times the weights and biases of the hidden path (see direct_by_default).
DIRECT_MAX_RATIO = 4


def hidden_path_params(num_vectors: int, num_codes: int, hidden) -> int:
    """Weights and biases of the masked layers from x through h_L to the logits, without the
    direct connection: sum over the layers of (I + 1) O, from M K to H_1 .. H_L to M K."""
    sizes = [num_vectors * num_codes, *hidden, num_vectors * num_codes]
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))


def direct_by_default(num_vectors: int, num_codes: int, hidden) -> bool:
    """Whether ``npvae train-prior`` gives the output layer the direct connection from x.

    Yes unless its (M K)^2 weights would be more than DIRECT_MAX_RATIO = 4 times the hidden
    path's parameters (:func:`hidden_path_params`), and always without hidden layers (then
    it is the whole model). With one hidden layer of H units this keeps it while M K is at
    most about 8 H: the MLP VQ-VAE's M = 4, K = 128 under the default H = 512 (0.26 million
    against 0.53 million) keeps it; a 7x7 map of K = 128 codes (39 million against 6.4
    million) or 256 codes (157 million against 12.9 million) leaves it out.
    """
    hidden = [int(h) for h in hidden]
    if not hidden:
        return True
    width = int(num_vectors) * int(num_codes)
    return width * width <= DIRECT_MAX_RATIO * hidden_path_params(num_vectors, num_codes, hidden)


def made_masks(num_vectors: int, num_codes: int, hidden, direct: bool = True) -> list:
    """The masks of every layer, float 0/1, input layer first, the output layer last.

    Hidden layer l: A[i, j] = [deg_l(j) >= deg_{l-1}(i)]                          (MADE.2)
    Output layer:   A[i, j] = [deg_out(j) > deg_in(i)], its inputs [h_L, x]       (MADE.3)
    (its inputs h_L alone when ``direct`` is False, x alone without hidden layers)

    Position m (counted from 0) has degree m + 1. By induction over the layers, a hidden
    unit of degree d depends only on inputs of degree <= d, the positions 0 .. d - 1. The
    logits of position m have degree m + 1 and see only units and inputs of degree <= m,
    so they depend on positions 0 .. m - 1 alone: on c_<m, never on c_m or later.
    """
    prev = input_degrees(num_vectors, num_codes)
    d_in = prev
    masks = []
    for width in hidden:
        deg = hidden_degrees(width, num_vectors)
        masks.append((deg[None, :] >= prev[:, None]).astype(np.float64))  # (I, H)  (MADE.2)
        prev = deg
    if not hidden:
        into_out = d_in  # x: the direct connection is the whole model
    else:
        into_out = np.concatenate([prev, d_in]) if direct else prev  # [h_L, x] or h_L
    masks.append((d_in[None, :] > into_out[:, None]).astype(np.float64))  # (H_L [+ M K], M K)  (MADE.3)
    return masks


class PriorCache(NamedTuple):
    layers: list  # (masked-linear cache, activation cache) per hidden layer
    out: tuple  # the output layer's masked-linear cache
    xent: tuple  # the cross-entropy's cache
    hidden: int  # H_L, the width of the last hidden layer (0 without hidden layers)


class MADEPrior(Model):
    """p(c) over M code indices in [0, K), autoregressive in raster order (MADE.1-5).

    ``x`` for :meth:`loss_and_grads` is the one-hot codes (N, M K) of the model's dtype
    (:meth:`one_hot` makes it), so the training loop trains it like any other model.
    Weights start at :func:`npvae.ops.mlp.init_scale` over the unmasked inputs, biases at 0.

    ``direct`` (default True) gives the output layer the direct connection from x; it is
    saved in the config, and a config without it (checkpoints written before it existed)
    builds the model with the connection, as those priors had it. Without hidden layers the
    direct connection is the only path, so ``direct=False`` needs at least one.
    """

    kind = "made"

    def __init__(self, num_codes: int = 128, num_vectors: int = 4, hidden=(512,),
                 activation: str = "relu", data_dim: int | None = None, direct: bool = True,
                 dtype=np.float32, rng=0):
        if not (v.is_integer(num_codes) and num_codes >= 2):
            raise ValueError(f"num_codes must be an integer >= 2, got {num_codes!r}")
        K, M = int(num_codes), positive_int("num_vectors", num_vectors)
        hidden = tuple(positive_int(f"hidden[{i}]", h) for i, h in enumerate(hidden))
        activation_code(activation)
        if data_dim is not None and int(data_dim) != M * K:
            raise ValueError(f"data_dim must be num_vectors * num_codes = {M * K}, got {data_dim}")
        if not isinstance(direct, (bool, np.bool_)):
            raise ValueError(f"direct must be True or False, got {direct!r}")
        direct = bool(direct)
        if not direct and not hidden:
            raise ValueError("without hidden layers the direct connection is the whole model: "
                             "direct=False needs at least one hidden layer")
        self.K, self.M, self.hidden, self.direct = K, M, hidden, direct
        sizes = (M * K, *hidden)
        shapes = {}
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            shapes[f"hid.{i}.W"], shapes[f"hid.{i}.b"] = (n_in, n_out), (n_out,)
        width = (hidden[-1] if hidden else 0) + (M * K if direct or not hidden else 0)
        shapes["out.W"], shapes["out.b"] = (width, M * K), (M * K,)
        config = dict(num_codes=K, num_vectors=M, hidden=list(hidden), activation=activation,
                      data_dim=M * K, direct=direct)
        super().__init__(shapes, dtype, config)
        self.masks = [m.astype(self.dtype) for m in made_masks(M, K, hidden, direct)]  # rebuilt, never saved
        rng = as_rng(rng)
        weights = [f"hid.{i}.W" for i in range(len(hidden))] + ["out.W"]
        for name, mask in zip(weights, self.masks):
            fan_in = max(float(mask.sum(axis=0).mean()), 1.0)  # inputs an output unit really sees
            act = activation if name != "out.W" else "identity"
            W = rng.standard_normal(mask.shape) * init_scale(fan_in, mask.shape[1], act)
            self.params[name] = W * mask  # masked entries start (and stay) at 0

    # -- inputs ---------------------------------------------------------------------
    def one_hot(self, idx) -> np.ndarray:
        """idx (N, M) integers in [0, K) -> x (N, M K) of the model's dtype."""
        idx = self.check_idx(idx)
        x = np.zeros((idx.shape[0], self.M * self.K), dtype=self.dtype)
        cols = idx + self.K * np.arange(self.M)  # (N, M)  column of each code
        np.put_along_axis(x, cols, 1.0, axis=1)
        return x

    def check_idx(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu" or idx.ndim != 2 or idx.shape[1] != self.M:
            raise ValueError(f"codes must be integers of shape (N, {self.M}), got "
                             f"{idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.K):
            raise ValueError(f"codes must lie in [0, {self.K}), got values from {idx.min()} "
                             f"to {idx.max()}")
        return idx.astype(np.int64, copy=False)

    def codes_of(self, x) -> np.ndarray:
        """One-hot x (N, M K) -> idx (N, M), refusing rows that are not one-hot per position."""
        x = self.check_x(x)
        groups = x.reshape(x.shape[0], self.M, self.K)
        if not (np.all((groups == 0) | (groups == 1)) and np.all(groups.sum(axis=2) == 1)):
            raise ValueError(f"x must be one-hot codes: in every row, each of the {self.M} blocks "
                             f"of {self.K} columns holds a single 1 and zeros (make it with "
                             f"MADEPrior.one_hot)")
        return groups.argmax(axis=2)

    # -- forward and backward ---------------------------------------------------------
    def _network_forward(self, x):
        """x (N, M K) one-hot -> logits (N, M, K) and the caches backward needs."""
        p, act = self.params, self.config["activation"]
        h, layers = x, []
        for i, mask in enumerate(self.masks[:-1]):
            a, lin = masked_linear_forward(h, p[f"hid.{i}.W"], mask, p[f"hid.{i}.b"])  # (N, H)  (MADE.4)
            h, act_cache = activation_forward(a, act)  # (N, H)
            layers.append((lin, act_cache))
        if not layers:
            h_out = x  # (N, M K)  the direct connection alone
        elif self.direct:
            h_out = np.concatenate([h, x], axis=1)  # (N, H_L + M K)  [h_L, x]
        else:
            h_out = h  # (N, H_L)
        logits, out = masked_linear_forward(h_out, p["out.W"], self.masks[-1], p["out.b"])  # (MADE.4)
        return logits.reshape(x.shape[0], self.M, self.K), layers, out

    def _network_backward(self, dlogits, layers, out_cache, grads) -> None:
        """dlogits (N, M, K) -> the parameter gradients, written into ``grads`` (MADE.5, ACT)."""
        n = dlogits.shape[0]
        dh_out, _, _, _ = masked_linear_backward(
            dlogits.reshape(n, -1), out_cache, dW=grads["out.W"], db=grads["out.b"])  # (MADE.5)
        dh = dh_out[:, :self.hidden[-1]] if layers else None  # (N, H_L)  an x part is data: dropped
        for i in reversed(range(len(layers))):
            lin, act_cache = layers[i]
            da = activation_backward(dh, act_cache)  # (N, H_i)  (ACT)
            dh, _, _, _ = masked_linear_backward(
                da, lin, dW=grads[f"hid.{i}.W"], db=grads[f"hid.{i}.b"])  # (MADE.5)

    def forward(self, x, *, rng=None, eps=None, step=None) -> Forward:
        """Mean over the batch of -log p(c) (MADE.1), in nats per example; no noise: rng,
        eps, step unused."""
        idx = self.codes_of(x)  # (N, M)
        n = x.shape[0]
        with trusted():  # x was checked above
            logits, layers, out_cache = self._network_forward(x)  # (N, M, K)
            xent, xent_cache = softmax_xent_forward(logits, idx)  # (N, M)  (XENT.1)
            nll = xent.sum(axis=1, dtype=np.float64)  # (N,)  -log p(c_n)  (MADE.1)
            loss = float(nll.mean())  # ()
        stats = dict(loss=loss, nats=loss, bits_per_code=loss / (self.M * math.log(2.0)))
        saved = dict(n=n, layers=layers, out=out_cache, xent=xent_cache)
        return Forward(loss, stats, saved)

    def _reverse(self, s, grads) -> None:
        """The reverse chain, from the caches ``s`` of :meth:`forward`, into ``grads``."""
        dxent = np.full((s["n"], self.M), 1.0 / s["n"], dtype=self.dtype)  # (N, M)  d loss / d xent_nm
        dlogits, _ = softmax_xent_backward(dxent, s["xent"])  # (N, M, K)  (XENT.2)
        self._network_backward(dlogits, s["layers"], s["out"], grads)

    # -- using the model ----------------------------------------------------------------
    def log_prob(self, idx, batch_size: int = 1000) -> np.ndarray:
        """log p(c) (N,) float64 in nats, for codes idx (N, M)  (MADE.1)."""
        idx = self.check_idx(idx)
        batch_size = positive_int("batch_size", batch_size)
        out = np.empty(idx.shape[0])
        for start in range(0, idx.shape[0], batch_size):
            part = idx[start:start + batch_size]
            logits, _, _ = self._network_forward(self.one_hot(part))  # (B, M, K)
            logp = log_softmax(logits.astype(np.float64))  # (B, M, K)  (XENT.1)
            out[start:start + batch_size] = np.take_along_axis(
                logp, part[..., None], axis=2)[..., 0].sum(axis=1)  # (B,)  (MADE.1)
        return out

    def conditional_logits(self, idx) -> np.ndarray:
        """The logits of p(c_m | c_<m) at every position, (N, M, K), for codes idx (N, M)."""
        return self._network_forward(self.one_hot(idx))[0]

    def sample(self, n: int, rng, temperature: float = 1.0) -> np.ndarray:
        """n code sequences (n, M) int64 drawn one position at a time  (MADE.6).

        c_m ~ softmax(logits_m / T) given the c_<m already drawn; ``temperature`` T > 0
        (T = 1 samples p(c); T < 1 sharpens it, T > 1 flattens it).

        Each step computes only what changed. The first layer is linear in the one-hot x,
        and drawing c_m sets one column of x, so its pre-activation gains one row of
        W_0 * A_0 (MADE.4) instead of being recomputed; and only position m's K columns of
        the output layer are evaluated. The draws are those of computing every
        conditional_logits(idx)[:, m] in full, up to the rounding of the sums.
        """
        temperature = v.positive("temperature", temperature)
        rng = as_rng(rng)
        n, K, act = positive_int("n", n), self.K, self.config["activation"]
        p = self.params
        idx = np.zeros((n, self.M), dtype=np.int64)
        x = np.zeros((n, self.M * K), dtype=self.dtype)  # (n, M K)  the codes drawn so far
        rows = np.arange(n)
        layers = len(self.hidden)
        if layers:
            W0 = p["hid.0.W"] * self.masks[0]  # (M K, H_1)
            a0 = np.repeat(p["hid.0.b"][None, :], n, axis=0)  # (n, H_1)  x = 0 so far
            hidden_W = [p[f"hid.{i}.W"] * self.masks[i] for i in range(1, layers)]
        W_out = p["out.W"] * self.masks[-1]  # (H_L [+ M K], M K)
        for m in range(self.M):  # position m reads only c_<m, drawn already (MADE.3)
            if layers:
                h, _ = activation_forward(a0, act)  # (n, H_1)
                for i, W in enumerate(hidden_W, start=1):
                    h, _ = activation_forward(h @ W + p[f"hid.{i}.b"], act)  # (n, H_i)
                inputs = np.concatenate([h, x], axis=1) if self.direct else h
            else:
                inputs = x
            block = slice(m * K, (m + 1) * K)
            logits = inputs @ W_out[:, block] + p["out.b"][block]  # (n, K)  (MADE.4)
            l64 = logits.astype(np.float64)  # (n, K)
            l64 -= l64.max(axis=1, keepdims=True)  # <= 0: for a tiny T, l / T is -inf at worst
            with np.errstate(over="ignore"):  # -inf: probability 0, the T -> 0 limit
                l64 /= temperature  # (n, K)
            probs = np.exp(log_softmax(l64))  # (n, K)  (MADE.6)
            u = rng.random((n, 1))  # (n, 1)  one uniform per draw: inverse CDF
            c = np.minimum((np.cumsum(probs, axis=1) < u).sum(axis=1), K - 1)  # (n,)
            idx[:, m] = c
            x[rows, m * K + c] = 1.0
            if layers:
                a0 += W0[m * K + c]  # (n, H_1)  x gained column m K + c_m
        return idx
