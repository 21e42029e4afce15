"""What every npvae model shares: parameters, configuration, input checks, likelihoods.

A model holds ``params``, a :class:`~npvae.params.FlatDict` (dotted names, one flat
buffer), and a JSON-serialisable ``config`` from which :func:`npvae.models.build`
makes an identical model. A model is itself an op pair, like the ops it is built from:

    fwd   = model.forward(x, *, rng=None, eps=None, step=None)   the forward chain
    grads = model.backward(fwd, out=None)                          the reverse chain

``fwd`` is a :class:`Forward`: ``loss`` (float, the batch mean of the objective in nats
per example), ``stats`` (dict of floats: every term of the objective separately) and
``saved`` (what the reverse chain needs: the ops' caches). ``grads`` is a FlatDict with
exactly the keys of ``params``. ``loss_and_grads`` runs both and returns
``(loss, grads, stats)``; ``loss`` runs the forward chain alone, for finite differences
and evaluation. Each model writes its forward chain in ``forward`` and its reverse chain
in ``_reverse``, one line per node, with equation tags.

Backward never touches ``params``; optimizers live in :mod:`npvae.optim`. The model's
state outside the parameters changes only in the training loop's hooks, which are given
what they need (``after_step(fwd, rng)``): nothing is remembered between calls.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import _validate as v
from ..ops import (
    bernoulli_loglik_backward, bernoulli_loglik_forward, gaussian_loglik_backward,
    gaussian_loglik_forward,
)
from ..ops.activations import activation_code, stable_sigmoid
from ..ops.mlp import mlp_backward, mlp_forward, mlp_init, mlp_predict, mlp_shapes, num_layers
from ..params import FlatDict
from .._validate import trusted  # noqa: F401  (re-exported for the models)

LIKELIHOODS = ("bernoulli", "gaussian")


def as_rng(rng) -> np.random.Generator:
    """A Generator from a Generator, a seed (an int >= 0, a SeedSequence or a BitGenerator),
    or None (a fresh seed from the OS)."""
    if isinstance(rng, np.random.Generator):
        return rng
    seed = v.is_integer(rng) and rng >= 0
    if rng is None or seed or isinstance(rng, (np.random.SeedSequence, np.random.BitGenerator)):
        return np.random.default_rng(rng)
    raise ValueError(f"rng must be None, a seed (an int >= 0) or a numpy Generator, got {rng!r}")


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1: a Python or NumPy integer (a bool, float or string is refused)."""
    if not (v.is_integer(value) and value >= 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def image_shape_chw(image_shape) -> tuple[int, int, int]:
    """``image_shape`` as three ints (C, H, W); the callers check that they are positive."""
    try:
        c, h, w = (int(s) for s in image_shape)
    except (TypeError, ValueError):
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}") from None
    return c, h, w


class Forward(NamedTuple):
    """What a model's forward chain returns; ``backward`` and ``after_step`` read it."""

    loss: float  # the batch mean of the objective, nats per example
    stats: dict  # floats: the terms of the objective, for logs
    saved: dict  # the caches of the ops, by name, for the reverse chain


class Model:
    """Base class: parameters, config, the checks every entry point runs on x, and the
    forward/backward pair around each model's ``forward`` and ``_reverse``."""

    kind = "model"

    def __init__(self, shapes: dict, dtype, config: dict):
        self.dtype = np.dtype(dtype)
        if self.dtype.type not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.params = FlatDict(shapes, self.dtype)
        self.config = dict(config, kind=self.kind, dtype=self.dtype.name)
        self.buffers = {}  # state that is not a parameter (saved in checkpoints)

    # -- inputs ---------------------------------------------------------------------
    def check_x(self, x, name: str = "x") -> np.ndarray:
        """x must be (N, data_dim), of the model's dtype, finite, and in [0, 1] for Bernoulli."""
        v.array(name, x, 2)
        d = self.config["data_dim"]
        if x.shape[1] != d:
            raise ValueError(f"{name} must have {d} features per example (shape (N, {d})), got {x.shape}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one example, got shape {x.shape}")
        if x.dtype != self.dtype:
            raise ValueError(
                f"{name} must have dtype {self.dtype} like the model, got {x.dtype}; "
                f"convert with {name}.astype(np.{self.dtype})"
            )
        bernoulli = self.config.get("likelihood") == "bernoulli"
        # NumPy's min and max carry a NaN through, and an inf lies outside [0, 1]: for a
        # Bernoulli model two passes check both, where a finite-sum check first takes a third
        if bernoulli and x.min() >= 0 and x.max() <= 1:
            return x
        v.finite(name, x, always=True)  # names the first NaN or inf
        if bernoulli:
            v.in_unit_interval(name, x, always=True)
        return x

    def check_loss(self, loss, x) -> None:
        """Name the cause when a Gaussian model's loss is not finite on x outside [0, 1].

        Called once per step, after the forward pass: it costs nothing unless the loss
        is NaN or inf. On data in [0, 1] a non-finite loss is left to the caller (the
        training loop reports it as a divergence).
        """
        if math.isfinite(loss) or self.config.get("likelihood") != "gaussian":
            return
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"the loss is {loss}: the forward pass overflowed on x with values from "
                f"{lo:g} to {hi:g}. npvae's models are built for data scaled to [0, 1]; "
                f"divide 8-bit images by 255 (npvae.data.to_unit does)"
            )

    def check_eps(self, eps, shape) -> np.ndarray:
        v.array("eps", eps)
        v.shape("eps", eps, shape)
        if eps.dtype != self.dtype:
            raise ValueError(f"eps must have dtype {self.dtype} like the model, got {eps.dtype}")
        return v.finite("eps", eps, always=True)

    def noise(self, shape, rng, eps):
        """The reparameterization noise: ``eps`` if given (checked), else drawn from ``rng``."""
        if eps is not None:
            return self.check_eps(eps, shape)
        if rng is None:
            raise ValueError("pass rng (a numpy Generator) to draw the noise, or eps to fix it")
        return as_rng(rng).standard_normal(shape, dtype=self.dtype)

    # -- the objective: forward, backward, both --------------------------------------
    def forward(self, x, *, rng=None, eps=None, step=None) -> Forward:
        """The forward chain on a batch x (N, D): the loss, its terms, the caches."""
        raise NotImplementedError

    def _reverse(self, saved: dict, grads: FlatDict) -> None:
        """The reverse chain: from the caches in ``saved``, write every gradient into ``grads``."""
        raise NotImplementedError

    def backward(self, fwd: Forward, out=None) -> FlatDict:
        """The gradients of ``fwd.loss`` with respect to every parameter, written into
        ``out`` (a FlatDict laid out like ``params``) or a new buffer.

        The caches in ``fwd`` hold the parameters and x themselves, not copies (a copy of
        every weight per step would cost as much as a layer's product): call ``backward``
        before an optimizer step or any change to the batch array, as a training step does.
        """
        grads = self.new_grads(out)
        with trusted():  # the forward pass checked x: the ops need not scan again
            self._reverse(fwd.saved, grads)
        return grads

    def loss_and_grads(self, x, *, rng=None, eps=None, step=None, out=None):
        """forward, then backward: ``(loss, grads, stats)``."""
        fwd = self.forward(x, rng=rng, eps=eps, step=step)
        return fwd.loss, self.backward(fwd, out), fwd.stats

    def loss(self, x, *, rng=None, eps=None, step=None) -> float:
        """The loss alone: the forward chain, no backward pass."""
        return self.forward(x, rng=rng, eps=eps, step=step).loss

    def new_grads(self, out=None) -> FlatDict:
        """Where backward writes: ``out`` if given (a FlatDict laid out like ``params``,
        reused from step to step by the training loop), else a new buffer."""
        if out is None:
            return self.params.empty_like()
        if not isinstance(out, FlatDict) or out.flat.shape != self.params.flat.shape \
                or out.flat.dtype != self.dtype or list(out) != list(self.params):
            raise ValueError("out must be a FlatDict laid out like model.params "
                             "(make one with model.params.empty_like())")
        return out

    def num_params(self) -> int:
        return int(self.params.flat.size)

    # -- hooks of the training loop: nothing by default ------------------------------
    def on_batch_start(self, x, rng) -> None:
        """Called with each batch before its step (the VQ-VAE's k-means start uses it)."""

    def after_step(self, fwd: Forward, rng) -> None:
        """Called after each optimizer step with the step's forward record ``fwd`` (the
        VQ-VAE's moving averages and restarts read its codes from it)."""


class ContinuousLatentModel(Model):
    """A model with a real latent z (N, Z), prior N(0, I), and an MLP decoder ``dec.*``.

    Shared by the VAEs and the autoencoder; subclasses set ``self.latent`` (Z).
    """

    latent: int

    def _build(self, data_dim, hidden, latent, enc_out, activation, likelihood, sigma2, beta,
               warmup_steps, dtype, rng, **options) -> None:
        """Check the settings the VAEs and the autoencoder share, keep them (and the kind's
        own ``options``) in the config, and lay out and initialise the encoder ``enc.*``
        (D -> enc_out) and the decoder ``dec.*`` (Z -> D)."""
        hidden = tuple(positive_int("each hidden size", h) for h in hidden)
        sigma2 = check_likelihood(likelihood, sigma2, dtype)
        activation_code(activation)  # validates the name
        latent, data_dim = positive_int("latent", latent), positive_int("data_dim", data_dim)
        beta = v.nonnegative("beta", beta)
        if not (v.is_integer(warmup_steps) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        config = dict(data_dim=int(data_dim), hidden=list(hidden), latent=int(latent),
                      activation=activation, likelihood=likelihood, sigma2=sigma2,
                      beta=float(beta), warmup_steps=int(warmup_steps), **options)
        self.latent = int(latent)
        shapes = {**mlp_shapes("enc", (data_dim, *hidden, enc_out)),
                  **mlp_shapes("dec", (latent, *hidden[::-1], data_dim))}
        Model.__init__(self, shapes, dtype, config)
        rng = as_rng(rng)
        mlp_init(self.params, "enc", activation, rng)
        mlp_init(self.params, "dec", activation, rng)

    # -- the two networks: forward, and backward from the caches --------------------
    # The objective goes through these four, so a subclass with other networks (the
    # convolutional VAE) overrides only them.
    def _encoder_forward(self, x):
        """x (N, D) -> the encoder's output (N, enc_out), and its cache."""
        return mlp_forward(self.params, "enc", x, self.config["activation"])

    def _encoder_backward(self, denc, cache, grads) -> None:
        """denc (N, enc_out) -> the encoder's parameter gradients, written into ``grads``."""
        mlp_backward(denc, cache, grads, need_dx=False)  # x is data: no dx

    def _decoder_forward(self, z):
        """z (N, Z) -> the decoder's raw output (N, D) (Gaussian mean or logits), its cache."""
        return mlp_forward(self.params, "dec", z, self.config["activation"])

    def _decoder_backward(self, dout, cache, grads):
        """dout (N, D) -> dz (N, Z); the decoder's parameter gradients go into ``grads``."""
        dz, _ = mlp_backward(dout, cache, grads)
        return dz

    def _decoder_predict(self, z, work: dict, split_bias: bool):
        """decoder_output with ``work``: the MLP's inference pass (mlp_predict), or, for a
        subclass with a decoder of its own (it overrides ``_decoder_forward``), that
        decoder's output with no bias left apart."""
        if type(self)._decoder_forward is not ContinuousLatentModel._decoder_forward:
            out = self._decoder_forward(z)[0]  # (N, D)
            return (out, None) if split_bias else out
        out = mlp_predict(self.params, "dec", z, self.config["activation"], work=work,
                          last_bias=not split_bias)  # (N, D)
        if not split_bias:
            return out
        return out, self.params[f"dec.{num_layers(self.params, 'dec') - 1}.b"]  # (N, D), (D,)

    def decoder_output(self, z, work: dict | None = None, split_bias: bool = False):
        """z (N, Z) -> the decoder's raw output (N, D): Gaussian mean or Bernoulli logits.

        With ``work`` (a dict, one per thread), the decoder keeps its buffers there and
        reuses them on the next call (:func:`npvae.ops.mlp.mlp_predict`): the output is
        then overwritten by that call. Without it the output is a new array.

        ``split_bias=True`` (with ``work``) returns ``(a, b)`` whose sum is the output:
        ``b`` (D,) is the last layer's bias, not yet added, for a caller that adds it in
        its own pass over the output (the importance-weighted estimate does, in its
        likelihood); ``b`` is None for a decoder whose output ``a`` already is.
        """
        z = np.asarray(z, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.latent:
            raise ValueError(f"z must have shape (N, {self.latent}), got {z.shape}")
        if split_bias and work is None:
            raise ValueError("split_bias=True needs work, a dict for the decoder's buffers")
        if work is not None:
            return self._decoder_predict(z, work, split_bias)
        out, _ = self._decoder_forward(z)
        return out

    def decode(self, z):
        """z (N, Z) -> E[x|z] (N, D): probabilities for Bernoulli, the mean for Gaussian.

        A NaN in a row of z gives NaN in that row of the output, under both backends
        (NaN propagates through every op, as in NumPy), never a plausible-looking value.
        """
        return likelihood_mean(self.config["likelihood"], self.decoder_output(z))

    def sample(self, n: int, rng):
        """n draws of z ~ p(z) = N(0, I), decoded to E[x|z] (n, D)."""
        n = positive_int("n", n)
        z = as_rng(rng).standard_normal((n, self.latent), dtype=self.dtype)
        return self.decode(z)


# ----------------------------------------------------------------------------------
# Likelihood p(x|z) by name: forward, backward, and the mean of the distribution.


def likelihood_forward(name, out, x, sigma2):
    if name == "bernoulli":
        return bernoulli_loglik_forward(out, x)  # (N,)  (LIK.3)
    return gaussian_loglik_forward(out, x, sigma2)  # (N,)  (LIK.1)


def likelihood_backward(name, dlogp, cache):
    if name == "bernoulli":
        return bernoulli_loglik_backward(dlogp, cache)  # (N, D)  (LIK.4)
    return gaussian_loglik_backward(dlogp, cache)  # (N, D)  (LIK.2)


def likelihood_mean(name, out):
    """E[x|z]: sigmoid of the logits, or the Gaussian mean itself."""
    return stable_sigmoid(out) if name == "bernoulli" else out


def check_likelihood(name: str, sigma2: float, dtype=np.float32) -> float:
    """The likelihood's name and its variance; a Gaussian's must be usable in ``dtype``."""
    if name not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {name!r}")
    if name == "gaussian":
        return v.variance("sigma2", sigma2, dtype)
    return v.positive("sigma2", sigma2)


def kl_weight(beta: float, warmup_steps: int, step) -> float:
    """beta * min(1, step / warmup_steps); the full beta when step is None or no warm-up (OBJ.2)."""
    if step is not None and step < 0:
        raise ValueError(f"step must be >= 0 (or None), got {step}")
    if step is None or warmup_steps <= 0:
        return float(beta)
    return float(beta) * min(1.0, float(step) / float(warmup_steps))
