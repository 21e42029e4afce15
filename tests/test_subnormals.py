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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
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
