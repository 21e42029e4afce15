"""Each Numba kernel equals its NumPy twin: rel. error 1e-12 in float64, float32
precision in float32, on random inputs."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from npvae.ops import activations, kl, likelihoods

from strategies import batch, dim, seeds

RTOL = {np.float64: 1e-12, np.float32: 2e-6}


def assert_twins_agree(a, b, dtype):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype == np.dtype(dtype)
    scale = max(np.abs(b).max(initial=0.0), 1.0)
    assert np.abs(a.astype(np.float64) - b).max(initial=0.0) <= RTOL[dtype] * scale * 4


def both(kernel, *args):
    return kernel.numba(*[a.copy() if isinstance(a, np.ndarray) else a for a in args]), \
        kernel.numpy(*[a.copy() if isinstance(a, np.ndarray) else a for a in args])


DTYPES = [np.float64, np.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@given(batch, dim, seeds)
def test_bernoulli_twins(dtype, n, d, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, d)) * 5).astype(dtype)
    x = rng.uniform(size=(n, d)).astype(dtype)
    (lp1, g1), (lp2, g2) = both(likelihoods.bernoulli_kernel, logits, x)
    assert_twins_agree(lp1, lp2, dtype)
    assert_twins_agree(g1, g2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(batch, dim, seeds)
def test_gaussian_twins(dtype, n, d, seed):
    rng = np.random.default_rng(seed)
    mean, x = rng.normal(size=(n, d)).astype(dtype), rng.normal(size=(n, d)).astype(dtype)
    inv, const = dtype(1 / 0.7), dtype(-1.3)
    (lp1, g1), (lp2, g2) = both(likelihoods.gaussian_kernel, mean, x, inv, const)
    assert_twins_agree(lp1, lp2, dtype)
    assert_twins_agree(g1, g2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(batch, dim, seeds)
def test_kl_twins(dtype, n, z, seed):
    rng = np.random.default_rng(seed)
    mu, lv = rng.normal(size=(n, z)).astype(dtype), rng.normal(size=(n, z)).astype(dtype)
    (k1, v1), (k2, v2) = both(kl.kl_kernel, mu, lv)
    assert_twins_agree(k1, k2, dtype)
    assert_twins_agree(v1, v2, dtype)
    dkl = rng.normal(size=(n, z)).astype(dtype)
    (a1, b1), (a2, b2) = both(kl.kl_grad_kernel, dkl, mu, v2)
    assert_twins_agree(a1, a2, dtype)
    assert_twins_agree(b1, b2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", activations.ACTIVATIONS)
@given(batch, dim, seeds)
def test_activation_twins(dtype, name, n, d, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.normal(size=(n, d)) * 4).astype(dtype), rng.normal(size=d).astype(dtype)
    code, slope = activations.activation_code(name), dtype(0.01)
    h1, h2 = both(activations.bias_act_kernel, a, b, code, slope, np.empty_like(a))
    assert_twins_agree(h1, h2, dtype)
    dh = rng.normal(size=(n, d)).astype(dtype)
    g1, g2 = both(activations.act_grad_kernel, dh, h2, code, slope, np.empty_like(a))
    assert_twins_agree(g1, g2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(st.integers(0, 200), seeds)
def test_sum_of_squares_twins(dtype, n, seed):
    from npvae.optim import sumsq_kernel
    a = np.random.default_rng(seed).normal(size=n).astype(dtype)
    exact = float(np.sum(a.astype(np.float64) ** 2))
    for twin in (sumsq_kernel.numba, sumsq_kernel.numpy):
        assert abs(twin(a) - exact) <= 1e-12 * max(exact, 1.0)
