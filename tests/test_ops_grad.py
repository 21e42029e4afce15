"""Every op's backward against central differences: float64, random shapes
(batch 1-8, dims 1-12, and layers of 128 or more inputs, whose input gradient
input_grad takes the other way round), random values, a random upstream gradient,
max rel. error 1e-6."""
import contextlib
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from npvae.gradcheck import check_op
from npvae.ops import (
    ACTIVATIONS, activation_backward, activation_forward, bernoulli_loglik_backward,
    bernoulli_loglik_forward, bias_activation_backward, bias_activation_forward,
    gaussian_kl2_backward, gaussian_kl2_forward, gaussian_kl_backward, gaussian_kl_forward,
    gaussian_loglik_backward, gaussian_loglik_forward, linear_backward, linear_forward,
    reparameterize_backward, reparameterize_forward,
)
from npvae.ops import linear
from npvae.ops.linear import SMALL_BATCH, WIDE_INPUT, input_grad
from npvae.ops.mlp import mlp_backward, mlp_forward, mlp_init, mlp_shapes
from npvae.params import FlatDict

from strategies import batch, dim, seeds, transposed_in_float64

TOL = 1e-6


def assert_close(errors):
    assert errors, "nothing was checked"
    worst = max(errors.values())
    assert worst <= TOL, errors


@given(batch, dim, dim, seeds)
def test_linear(n, i, o, seed):
    rng = np.random.default_rng(seed)
    x, W, b = rng.normal(size=(n, i)), rng.normal(size=(i, o)), rng.normal(size=o)
    assert_close(check_op(linear_forward, linear_backward, [x, W, b], rng=rng))


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 6), i=st.sampled_from([WIDE_INPUT, 200]), o=st.integers(1, 4), seed=seeds)
def test_linear_wide_input(n, i, o, seed):
    """A small batch with a wide input: dx is taken as (W dout^T)^T (input_grad)."""
    rng = np.random.default_rng(seed)
    x, W, b = rng.normal(size=(n, i)), rng.normal(size=(i, o)), rng.normal(size=o)
    with transposed_in_float64():
        assert linear.by_transpose(np.empty((n, o)), W)
        assert_close(check_op(linear_forward, linear_backward, [x, W, b], rng=rng))


@pytest.mark.parametrize("n", [1, 20, SMALL_BATCH - 1, SMALL_BATCH, 130])
@pytest.mark.parametrize("i", [1, WIDE_INPUT - 1, WIDE_INPUT, 300])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_grad_either_way(n, i, dtype):
    """input_grad gives dout W^T, in rows (C order), in the inputs' dtype, whichever way it
    takes (float32 below SMALL_BATCH rows with WIDE_INPUT inputs or more: the transposed
    one); the two ways differ only by the rounding of the same sums."""
    rng = np.random.default_rng(n * 1000 + i)
    dout, W = rng.normal(size=(n, 37)).astype(dtype), rng.normal(size=(i, 37)).astype(dtype)
    assert linear.by_transpose(dout, W) == (dtype == np.float32 and n < SMALL_BATCH and i >= WIDE_INPUT)
    exact = dout.astype(np.float64) @ W.astype(np.float64).T
    bound = 37 * np.finfo(dtype).eps * (np.abs(dout).astype(np.float64) @ np.abs(W).T.astype(np.float64))
    for way in (contextlib.nullcontext(), transposed_in_float64()):
        with way:
            dx = input_grad(dout, W)
        assert dx.shape == (n, i) and dx.dtype == dtype and dx.flags.c_contiguous
        assert np.all(np.abs(dx - exact) <= bound)  # the standard bound of a sum of 37 products


def away_from_kink(a, name):
    if name in ("relu", "leaky_relu"):
        a[np.abs(a) < 1e-2] += 0.05  # keep 100 steps h away from the kink, where differences mislead
    if name in ("tanh", "sigmoid"):
        # where they saturate the derivative (~1e-7 at |a| = 8) drowns in the rounding
        # noise of a central difference (~1e-10): a relative check measures only noise
        np.clip(a, -4.0, 4.0, out=a)
    return a


@pytest.mark.parametrize("name", ACTIVATIONS)
@given(n=batch, d=dim, seed=seeds, scale=st.floats(0.1, 8.0))
def test_activation(name, n, d, seed, scale):
    rng = np.random.default_rng(seed)
    a = away_from_kink(rng.normal(size=(n, d)) * scale, name)
    errors = check_op(lambda a: activation_forward(a, name),
                      lambda g, c: activation_backward(g, c), [a], rng=rng)
    assert_close(errors)


@pytest.mark.parametrize("name", ACTIVATIONS)
@given(n=batch, d=dim, seed=seeds)
def test_bias_activation(name, n, d, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, d)), rng.normal(size=d)
    a = away_from_kink(a + b, name) - b
    errors = check_op(lambda a, b: bias_activation_forward(a, b, name),
                      lambda g, c: bias_activation_backward(g, c), [a, b], rng=rng)
    assert_close(errors)


@given(batch, dim, seeds)
def test_reparameterize(n, z, seed):
    rng = np.random.default_rng(seed)
    mu, logvar, eps = rng.normal(size=(n, z)), rng.normal(size=(n, z)), rng.normal(size=(n, z))
    assert_close(check_op(reparameterize_forward, reparameterize_backward, [mu, logvar, eps],
                          wrt=[0, 1], rng=rng))


@given(batch, dim, seeds)
def test_gaussian_kl(n, z, seed):
    rng = np.random.default_rng(seed)
    mu, logvar = rng.normal(size=(n, z)), rng.normal(size=(n, z))
    assert_close(check_op(gaussian_kl_forward, gaussian_kl_backward, [mu, logvar], rng=rng))


@given(batch, dim, seeds)
def test_gaussian_kl2(n, z, seed):
    rng = np.random.default_rng(seed)
    args = [rng.normal(size=(n, z)) for _ in range(4)]
    assert_close(check_op(gaussian_kl2_forward, gaussian_kl2_backward, args, rng=rng))


@given(n=batch, d=dim, seed=seeds, sigma2=st.floats(0.05, 5.0))
def test_gaussian_loglik(n, d, seed, sigma2):
    rng = np.random.default_rng(seed)
    mean, x = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    errors = check_op(lambda m: gaussian_loglik_forward(m, x, sigma2),
                      lambda g, c: gaussian_loglik_backward(g, c), [mean], rng=rng)
    assert_close(errors)


@given(n=batch, d=dim, seed=seeds, scale=st.floats(0.1, 10.0), binary=st.booleans())
def test_bernoulli_loglik(n, d, seed, scale, binary):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, d)) * scale
    x = rng.uniform(size=(n, d))
    x = (x > 0.5).astype(np.float64) if binary else x
    errors = check_op(lambda l: bernoulli_loglik_forward(l, x),
                      lambda g, c: bernoulli_loglik_backward(g, c), [logits], rng=rng)
    assert_close(errors)


@pytest.mark.parametrize("act", ["relu", "tanh", "softplus", "leaky_relu", "sigmoid"])
@given(n=batch, sizes=st.lists(dim, min_size=2, max_size=4), seed=seeds)
def test_mlp(act, n, sizes, seed):
    """The MLP helper: input gradient and every parameter gradient."""
    check_mlp(act, n, sizes, seed)


@pytest.mark.parametrize("sizes", [[WIDE_INPUT, 3, 2], [4, WIDE_INPUT, 2]])
@settings(max_examples=5, deadline=None)
@given(n=batch, seed=seeds)
def test_mlp_wide_layer(sizes, n, seed):
    """A layer with WIDE_INPUT inputs at a small batch takes its dx the other way round
    (input_grad): as the network's input gradient, and inside the network, where the
    next layer's backward reads it."""
    assert n < SMALL_BATCH
    with transposed_in_float64():
        check_mlp("tanh", n, sizes, seed)


def check_mlp(act, n, sizes, seed):
    rng = np.random.default_rng(seed)
    params = FlatDict(mlp_shapes("net", sizes), np.float64)
    mlp_init(params, "net", act, rng)
    for k in params:
        if k.endswith(".b"):
            params[k] = rng.normal(size=params[k].shape) * 0.1
    x = rng.normal(size=(n, sizes[0]))
    out, cache = mlp_forward(params, "net", x, act)
    if act in ("relu", "leaky_relu"):
        # keep every pre-activation away from the kink, or finite differences are meaningless
        pre = [h @ params[f"net.{i}.W"] + params[f"net.{i}.b"] for i, h in enumerate(cache.inputs)]
        assume(all(np.abs(p).min() > 1e-3 for p in pre[:-1]))
    g = rng.normal(size=out.shape)
    dx, grads = mlp_backward(g, cache)
    assert set(grads) == set(params)

    def f():
        return np.sum(g * mlp_forward(params, "net", x, act)[0])

    from npvae.gradcheck import numerical_gradient, rel_error
    assert rel_error(dx, numerical_gradient(f, x)) <= TOL
    for k in params:
        assert rel_error(grads[k], numerical_gradient(f, params[k])) <= TOL, k
