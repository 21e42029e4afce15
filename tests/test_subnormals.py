"""No subnormal floats in a model's state after training, on any CPU.

Subnormal numbers (0 < |x| < the dtype's smallest normal number) cost some CPUs about a
hundred cycles per operation. In a VAE they appear in Adam's moments: a weight whose
gradient is non-zero once (a rarely lit pixel) or until its ReLU unit dies sees its first
moment decay by beta1 every step afterwards, and after a few hundred steps that moment is
subnormal. npvae flushes such values to zero in the update itself (FTZ.1), so the state
is the same on every machine whatever its floating-point flags. This test counts the
subnormals directly; it does not time anything.
"""
import numpy as np
import pytest

from npvae.checkpoint import load_checkpoint
from npvae.models import build
from npvae.train import train

SIDE = 12  # 12 x 12 "digits": a lit centre, a border that is always dark


def mnist_like(n, rng):
    """uint8 images with an always-zero border, a lit centre, and a few pixels that are
    lit in a single image only (their weights get a gradient once, then never again)."""
    x = np.zeros((n, SIDE, SIDE), np.uint8)
    x[:, 3:9, 3:9] = rng.integers(0, 256, (n, 6, 6))
    x[:, 3:9, 3:9] *= rng.random((n, 6, 6)) < 0.4  # sparse strokes, as in MNIST
    for j in range(6):  # pixel (1, 1 + j) is lit in image j alone
        x[j, 1, 1 + j] = 255
    return x.reshape(n, -1)


def subnormal_count(a) -> int:
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return 0
    return int(np.count_nonzero((a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)))


# float32 only: a float64 moment needs ~6,600 steps of decay to reach its subnormals, far
# more than this run takes, so a float64 case would pass without the flush. The float64
# flush is checked step by step in tests/test_optim.py::test_adam_moments_decay_to_zero_not_into_subnormals.
@pytest.mark.parametrize("dtype", [np.float32])
def test_training_leaves_no_subnormal_in_parameters_or_optimizer_state(tmp_path, dtype):
    rng = np.random.default_rng(0)
    x_train, x_val = mnist_like(256, rng), mnist_like(32, rng)
    model = build(dict(kind="vae-bernoulli", data_dim=SIDE * SIDE, hidden=[24], latent=3,
                       dtype=np.dtype(dtype).name), rng=0)
    # 16 steps an epoch x 80 epochs = 1280 steps: a first moment of 1e-4 left alone
    # reaches the float32 subnormals after ~780 steps (0.9^t 1e-4 < 1.2e-38)
    train(model, x_train, x_val, epochs=80, batch_size=16, lr=3e-3, binarize="dynamic",
          seed=0, run_dir=tmp_path, progress=False, verbose=False)
    ck = load_checkpoint(tmp_path)
    counts = {f"param {k}": subnormal_count(p) for k, p in ck.model.params.items()}
    counts.update({f"optimizer {k}": subnormal_count(a) for k, a in ck.optimizer_state.items()})
    assert sum(counts.values()) == 0, {k: c for k, c in counts.items() if c}
    # the rare pixels' weights did move once, so their moments were non-zero and decayed:
    # the test is only meaningful if that happened
    rare = [1 * SIDE + 1 + j for j in range(6)]
    assert np.any(ck.model.params["enc.0.W"][rare] != model_initial_rows(dtype, rare))


def model_initial_rows(dtype, rows):
    fresh = build(dict(kind="vae-bernoulli", data_dim=SIDE * SIDE, hidden=[24], latent=3,
                       dtype=np.dtype(dtype).name), rng=0)
    return fresh.params["enc.0.W"][rows]


# ----------------------------------------------------------------------------------
# Kernel outputs: exp(-|l|) tails (FTZ.2)


def tail_logits(dtype):
    """Logits across the cut and the range where exp(-|l|) leaves the normal numbers
    (about -87 to -104 in float32, -708 to -745 in float64), both signs, ordinary values."""
    edge = -np.log(np.finfo(dtype).tiny)
    band = np.concatenate([np.linspace(edge / 2 - 3, edge / 2 + 3, 61),
                           np.linspace(edge - 3, edge + 40, 301)])
    return np.concatenate([band, -band, np.linspace(-5, 5, 21), [1e4, -1e4]]).astype(dtype)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exponential_tails_are_zero_not_subnormal(backend, dtype):
    from npvae.backend import use_backend
    from npvae.ops.activations import (SIGMOID, SOFTPLUS, bias_act_kernel, stable_sigmoid,
                                       stable_softplus)
    from npvae.ops.likelihoods import bernoulli_kernel

    l = tail_logits(dtype)
    a = l.reshape(1, -1)
    zeros_b = np.zeros(a.shape[1], dtype)
    with use_backend(backend):
        outputs = {"sigmoid": stable_sigmoid(l), "softplus": stable_softplus(l),
                   "hidden sigmoid": bias_act_kernel(a, zeros_b, SIGMOID, dtype(0.01),
                                                     np.empty_like(a)),
                   "hidden softplus": bias_act_kernel(a, zeros_b, SOFTPLUS, dtype(0.01),
                                                      np.empty_like(a))}
        for x_value in (0.0, 1.0):
            logp, g = bernoulli_kernel(a, np.full_like(a, x_value))
            outputs[f"bernoulli logp, x = {x_value}"] = logp
            outputs[f"bernoulli gradient, x = {x_value}"] = g
    counts = {k: subnormal_count(v) for k, v in outputs.items()}
    assert sum(counts.values()) == 0, counts
    # far in the tail the values are exactly what they round to: sigmoid 0, softplus 0
    far = l < np.log(np.finfo(dtype).tiny) / 2 - 1e-3  # below the cut (FTZ.2)
    assert np.all(outputs["sigmoid"][far] == 0) and np.all(outputs["softplus"][far] == 0)
    # and nothing else moved: within the normal range the usual formulas hold
    near = np.abs(l) < 30
    np.testing.assert_allclose(outputs["sigmoid"][near], 1 / (1 + np.exp(-l[near].astype(float))),
                               rtol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_gradients_have_no_subnormals_when_logits_are_far_in_the_tail(backend):
    # A pixel that is always 0 is fitted best by a logit going to -inf, and Adam drives
    # it down steadily, so a long run reaches logits below -87, where sigmoid(l) is
    # subnormal in float32. Put the border pixels' logits there directly (through the
    # output bias) and check every gradient the backward pass produces.
    from npvae.backend import use_backend

    rng = np.random.default_rng(1)
    x = (mnist_like(64, rng) / np.float32(255)).astype(np.float32)
    model = build(dict(kind="vae-bernoulli", data_dim=SIDE * SIDE, hidden=[24], latent=3), rng=0)
    dark = np.flatnonzero(x.max(axis=0) == 0)  # pixels 0 in every image
    b = model.params["dec.1.b"]
    b[dark] = np.linspace(-40.0, -106.0, dark.size).astype(np.float32)  # across the cut
    with use_backend(backend):
        _, grads, _ = model.loss_and_grads(x, rng=np.random.default_rng(0))
    counts = {k: subnormal_count(g) for k, g in grads.items()}
    assert sum(counts.values()) == 0, counts
    assert np.all(grads["dec.1.b"][dark[-dark.size // 2:]] == 0)  # sigmoid(l) past the cut is 0
