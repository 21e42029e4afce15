"""The first layer's products that skip the zeros of the data (LIN.5).

The compiled kernels visit only the non-zero entries of x; their NumPy twins are the
plain dense products. Summation order differs, so the two agree to rounding (a stated
tolerance), and they must agree on NaN, +-inf and subnormal input as well: a zero x[n, j]
may only be skipped when 0 * W[j, k] is really 0, i.e. when W (or dy) is finite.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npvae.backend import numba_available, use_backend
from npvae.ops import linear
from npvae.ops.linear import data_product, data_weight_grad
from npvae.ops.mlp import mlp_backward, mlp_forward, mlp_init, mlp_shapes
from npvae.params import FlatDict

from strategies import seeds

needs_numba = pytest.mark.skipif(not numba_available(), reason="numba not installed")
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


def sparse_data(rng, n, d, density, dtype):
    """(n, d) in [0, 1] with about ``density`` of the entries non-zero, as MNIST pixels."""
    x = rng.random((n, d)).astype(dtype)
    x[rng.random((n, d)) >= density] = 0
    return x


def close(a, b, dtype, scale):
    """Equal NaN patterns; finite values within the dtype's tolerance of the result's scale."""
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=RTOL[dtype], atol=RTOL[dtype] * scale, equal_nan=True)


@needs_numba
@settings(max_examples=40, deadline=None)
@given(seeds, st.integers(1, 40), st.integers(1, 70), st.integers(1, 30),
       st.sampled_from([0.0, 0.05, 0.2, 1.0]), st.sampled_from([np.float32, np.float64]))
def test_sparse_kernels_equal_the_dense_products(seed, n, d, o, density, dtype):
    rng = np.random.default_rng(seed)
    x = sparse_data(rng, n, d, density, dtype)
    W = rng.standard_normal((d, o)).astype(dtype)
    dy = rng.standard_normal((n, o)).astype(dtype)
    scale = float(np.abs(x).sum(axis=1).max(initial=0) * 4 + 1)
    close(linear.sparse_product_kernel.numba(x, W, np.empty((n, o), dtype)), x @ W, dtype, scale)
    scale = float(np.abs(x).sum(axis=0).max(initial=0) * 4 + 1)
    close(linear.sparse_weight_grad_kernel.numba(x, dy, np.full((d, o), np.nan, dtype)),
          x.T @ dy, dtype, scale)


def special(rng, shape, dtype, zeros=0.7):
    """Mostly zeros, with NaN, +-inf, subnormals and ordinary values among the rest."""
    tiny = np.finfo(dtype).tiny
    values = np.array([np.nan, np.inf, -np.inf, tiny / 2, -tiny / 8, tiny, 0.5, -1.5, 3.0],
                      dtype=dtype)
    a = rng.choice(values, size=shape)
    a[rng.random(shape) < zeros] = 0
    return a


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("where", ["x", "W", "both"])
def test_both_backends_agree_on_nan_inf_and_subnormal_input(dtype, where):
    rng = np.random.default_rng(3)
    n, d, o = 12, 30, 9
    x = sparse_data(rng, n, d, 0.1, dtype)
    W = rng.standard_normal((d, o)).astype(dtype)
    dy = rng.standard_normal((n, o)).astype(dtype)
    if where in ("x", "both"):
        x = special(rng, (n, d), dtype, zeros=0.9)
    if where in ("W", "both"):
        W, dy = special(rng, (d, o), dtype, zeros=0.3), special(rng, (n, o), dtype, zeros=0.3)
    results = {}
    with np.errstate(all="ignore"):
        for backend in ("numpy", "numba"):
            with use_backend(backend):
                results[backend] = (data_product(x, W, sparse=True),
                                    data_weight_grad(x, dy, sparse=True))
    for a, b in zip(results["numpy"], results["numba"]):
        close(a, b, dtype, scale=100.0)


@needs_numba
def test_the_sparse_kernels_are_used_for_mostly_zero_data_only():
    rng = np.random.default_rng(0)
    sparse = sparse_data(rng, 16, 100, 0.1, np.float32)
    dense = sparse_data(rng, 16, 100, 0.9, np.float32)
    with use_backend("numba"):
        assert linear.skips_zeros(sparse) and not linear.skips_zeros(dense)
    with use_backend("numpy"):  # the twins are the dense products
        assert not linear.skips_zeros(sparse)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_mlp_on_sparse_data_gives_the_same_output_and_gradients_on_both_backends(dtype):
    rng = np.random.default_rng(5)
    params = FlatDict(mlp_shapes("enc", (50, 16, 6)), dtype)
    mlp_init(params, "enc", "relu", rng)
    x = sparse_data(rng, 20, 50, 0.15, dtype)
    dout = rng.standard_normal((20, 6)).astype(dtype)
    got = {}
    for backend in ("numpy", "numba"):
        with use_backend(backend):
            out, cache = mlp_forward(params, "enc", x, "relu")
            _, grads = mlp_backward(dout, cache, need_dx=False)
            got[backend] = (out.copy(), {k: g.copy() for k, g in grads.items()}, cache.sparse_input)
    assert got["numba"][2] and not got["numpy"][2]
    close(got["numba"][0], got["numpy"][0], dtype, scale=10.0)
    for k in got["numpy"][1]:
        close(got["numba"][1][k], got["numpy"][1][k], dtype, scale=10.0)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_count_and_finiteness_twins_agree_on_special_values(dtype):
    rng = np.random.default_rng(11)
    for _ in range(20):
        a = special(rng, (7, 13), dtype, zeros=rng.random())
        assert linear.count_nonzero_kernel.numba(a) == linear.count_nonzero_kernel.numpy(a)
        assert linear.all_finite_kernel.numba(a) == linear.all_finite_kernel.numpy(a)
    finite = rng.standard_normal((5, 6)).astype(dtype)
    assert linear.all_finite_kernel.numba(finite) and linear.all_finite_kernel.numpy(finite)
