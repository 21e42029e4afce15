"""The forward maths, checked without the backward passes: distributions, closed forms
against Monte Carlo, log-likelihoods against direct formulas on hand-computed cases."""
import math

import numpy as np
import pytest

from npvae.ops import (
    ACTIVATIONS, bernoulli_loglik_forward, gaussian_kl2_backward, gaussian_kl2_forward,
    gaussian_kl_forward, gaussian_loglik_forward, linear_forward, reparameterize_forward,
)
from npvae.ops.activations import LEAKY_SLOPE
from npvae.ops.mlp import mlp_forward, mlp_init, mlp_predict, mlp_shapes, work_buffer
from npvae.params import FlatDict


def test_affine_layer_hand_computed():
    # small integers and halves: every product and sum is exact in float64, so the
    # comparison is exact by construction (LIN.1)
    x = np.array([[1.0, 2.0], [3.0, -1.0]])
    W = np.array([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0]])
    b = np.array([0.5, -1.0, 2.0])
    y, _ = linear_forward(x, W, b)
    np.testing.assert_array_equal(y, [[-0.5, 1.0, 4.0], [4.5, -2.0, 8.0]])


REFERENCE_ACTIVATIONS = {
    "relu": lambda a: np.maximum(a, 0.0),
    "leaky_relu": lambda a: np.where(a > 0, a, LEAKY_SLOPE * a),
    "tanh": np.tanh,
    "sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a)),
    "softplus": lambda a: np.log(1.0 + np.exp(a)),
    "identity": lambda a: a,
}


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_mlp_forward_composes_its_layers(act, rng):
    # (MLP.1) written out directly: h1 = f(x W0 + b0), out = h1 W1 + b1, with non-zero
    # biases so that a dropped or misplaced bias shows
    params = FlatDict(mlp_shapes("net", (5, 7, 3)), np.float64)
    mlp_init(params, "net", act, rng)
    params["net.0.b"][...] = rng.normal(size=7)
    params["net.1.b"][...] = rng.normal(size=3)
    x = rng.normal(size=(4, 5))
    out, _ = mlp_forward(params, "net", x, act)
    f = REFERENCE_ACTIVATIONS[act]
    h1 = f(x @ params["net.0.W"] + params["net.0.b"])
    expected = h1 @ params["net.1.W"] + params["net.1.b"]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_mlp_predict_gives_mlp_forward_s_output_while_reusing_its_buffers(act, dtype, tol, rng):
    # the inference path (MLP.1 without a cache) against the training path, on batches
    # of 6, then 2 (a last, smaller chunk: views of the same buffers), then 6 again
    params = FlatDict(mlp_shapes("net", (5, 7, 4, 3)), dtype)
    mlp_init(params, "net", act, rng)
    for i, n in enumerate((7, 4, 3)):
        params[f"net.{i}.b"][...] = rng.normal(size=n)
    work = {}
    outs = []
    for n in (6, 2, 6):
        x = rng.normal(size=(n, 5)).astype(dtype)
        expected, _ = mlp_forward(params, "net", x, act, out_activation="softplus")
        got = mlp_predict(params, "net", x, act, out_activation="softplus", work=work)
        assert got.shape == (n, 3) and got.dtype == dtype
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
        outs.append(got)
    assert len(work) == 6  # two buffers per layer, none added for the smaller batch
    assert np.shares_memory(outs[0], outs[1]) and np.shares_memory(outs[0], outs[2])
    # the last bias left out, for a caller that adds it itself
    x = rng.normal(size=(6, 5)).astype(dtype)
    expected, _ = mlp_forward(params, "net", x, act)
    got = mlp_predict(params, "net", x, act, work=work, last_bias=False)
    np.testing.assert_allclose(got + params["net.2.b"], expected, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="last_bias=False needs out_activation='identity'"):
        mlp_predict(params, "net", x, act, out_activation="sigmoid", last_bias=False)
    # without work, each call returns a new array
    x = rng.normal(size=(6, 5)).astype(dtype)
    a, b = (mlp_predict(params, "net", x, act) for _ in range(2))
    assert not np.shares_memory(a, b)


def test_work_buffer_grows_only_when_too_small():
    work = {}
    a = work_buffer(work, "k", (4, 5), np.float32)
    assert a.shape == (4, 5) and a.dtype == np.float32
    b = work_buffer(work, "k", (2, 3), np.float32)  # smaller: a view of the same memory
    assert b.shape == (2, 3) and np.shares_memory(a, b)
    c = work_buffer(work, "k", (5, 5), np.float32)  # larger: a new buffer
    assert c.shape == (5, 5) and not np.shares_memory(a, c)
    d = work_buffer(work, "k", (2, 2), np.float64)  # another dtype: a new buffer
    assert d.dtype == np.float64 and not np.shares_memory(c, d)
    assert work_buffer(work, "other", (2, 2), np.float64) is not None and len(work) == 2

def test_reparameterized_samples_have_mean_mu_and_variance_exp_logvar(rng):
    mu = np.array([[0.5, -2.0, 3.0]])
    logvar = np.array([[0.0, np.log(4.0), np.log(0.09)]])
    s = 200_000
    eps = rng.standard_normal((s, 3))
    z, _ = reparameterize_forward(np.repeat(mu, s, 0), np.repeat(logvar, s, 0), eps)
    var = np.exp(logvar[0])
    # standard errors: sqrt(var / s) for the mean, var * sqrt(2 / s) for the variance
    np.testing.assert_allclose(z.mean(0), mu[0], atol=5 * np.sqrt(var / s).max())
    np.testing.assert_allclose(z.var(0), var, atol=5 * (var * np.sqrt(2 / s)).max())
    # the standard deviation, not the variance, multiplies eps
    assert abs(z.std(0)[1] - 2.0) < 0.02


def _log_normal(z, mu, var):
    return -0.5 * ((z - mu) ** 2 / var + np.log(2 * np.pi * var))


def test_closed_form_kl_matches_monte_carlo(rng):
    mu = np.array([[0.3, -1.2, 2.0, 0.0]])
    logvar = np.array([[-1.0, 0.5, 0.0, -3.0]])
    kl, _ = gaussian_kl_forward(mu, logvar)
    s = 400_000
    var = np.exp(logvar[0])
    z = mu[0] + np.sqrt(var) * rng.standard_normal((s, 4))
    terms = _log_normal(z, mu[0], var) - _log_normal(z, 0.0, 1.0)  # log q - log p
    mc, se = terms.mean(0), terms.std(0) / np.sqrt(s)
    assert np.all(np.abs(kl[0] - mc) < 5 * se + 1e-3), (kl, mc, se)


def test_two_gaussian_kl_matches_monte_carlo_and_reduces_to_standard(rng):
    m1, lv1 = np.array([[0.4, -0.7]]), np.array([[0.2, -0.5]])
    m2, lv2 = np.array([[-0.3, 0.9]]), np.array([[0.7, 0.3]])
    kl, _ = gaussian_kl2_forward(m1, lv1, m2, lv2)
    s = 400_000
    v1, v2 = np.exp(lv1[0]), np.exp(lv2[0])
    z = m1[0] + np.sqrt(v1) * rng.standard_normal((s, 2))
    terms = _log_normal(z, m1[0], v1) - _log_normal(z, m2[0], v2)
    assert np.all(np.abs(kl[0] - terms.mean(0)) < 5 * terms.std(0) / np.sqrt(s) + 1e-3)
    zeros = np.zeros_like(m1)
    np.testing.assert_allclose(gaussian_kl2_forward(m1, lv1, zeros, zeros)[0],
                               gaussian_kl_forward(m1, lv1)[0], rtol=1e-14)


def test_kl_is_zero_only_at_the_prior():
    z = np.zeros((2, 3))
    # exact by construction: exp(0) = 1 in every libm, and (0 + 1 - 0 - 1) / 2 = 0
    assert np.all(gaussian_kl_forward(z, z)[0] == 0.0)
    kl, _ = gaussian_kl_forward(np.full((1, 1), 1.0), np.zeros((1, 1)))
    assert kl[0, 0] == pytest.approx(0.5)  # mu^2 / 2


def test_gaussian_loglik_hand_computed():
    x = np.array([[1.0, 2.0]])
    mean = np.array([[0.0, 0.0]])
    # -(1 + 4) / 2 - log(2 pi)  for sigma2 = 1, D = 2
    logp, _ = gaussian_loglik_forward(mean, x)
    assert logp[0] == pytest.approx(-2.5 - math.log(2 * math.pi), rel=1e-14)
    # sigma2 = 4: -(5) / 8 - log(2 pi 4)
    logp, _ = gaussian_loglik_forward(mean, x, sigma2=4.0)
    assert logp[0] == pytest.approx(-5 / 8 - math.log(8 * math.pi), rel=1e-14)


def test_gaussian_loglik_integrates_to_one_in_1d():
    grid = np.linspace(-12, 12, 200_001)[:, None]
    logp, _ = gaussian_loglik_forward(np.full_like(grid, 0.7), grid, sigma2=2.5)
    assert np.trapezoid(np.exp(logp), grid[:, 0]) == pytest.approx(1.0, abs=1e-9)


def test_bernoulli_loglik_hand_computed():
    logits = np.array([[0.0, np.log(3.0)]])  # p = 1/2 and 3/4
    x = np.array([[1.0, 0.0]])
    logp, _ = bernoulli_loglik_forward(logits, x)
    assert logp[0] == pytest.approx(math.log(0.5) + math.log(0.25), rel=1e-14)
    x = np.array([[0.25, 1.0]])  # grey targets: the cross-entropy
    logp, _ = bernoulli_loglik_forward(logits, x)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(0.5) + math.log(0.75)
    assert logp[0] == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bernoulli_is_stable_for_huge_logits(dtype):
    logits = np.array([[1e4, -1e4, 1e4, -1e4, 0.0]], dtype=dtype)
    x = np.array([[1.0, 0.0, 0.0, 1.0, 1.0]], dtype=dtype)
    # no overflow, no log(0), no invalid op (exp(-1e4) underflowing to 0 is the intent)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        logp, cache = bernoulli_loglik_forward(logits, x)
    assert np.isfinite(logp).all() and np.isfinite(cache.g).all()
    assert logp[0] == pytest.approx(-2e4 - math.log(2), rel=1e-6)
    np.testing.assert_allclose(cache.g, [[0.0, 0.0, -1.0, 1.0, 0.5]], atol=1e-7)


@pytest.mark.parametrize("dtype, tiny_logvar", [(np.float64, -1e4), (np.float32, -100.0)])
def test_two_gaussian_kl_gives_the_limit_when_a_variance_underflows(dtype, tiny_logvar):
    """exp(-logvar2) overflows: the KL is +inf (it gave 0 * inf = NaN), or exactly 0 when
    the two distributions are equal, and a squared mean gap that overflows on its own
    but not once divided by v2 stays finite."""
    lv = dtype(tiny_logvar)
    m1 = np.array([[0.0, 0.0, 1.0, 0.0, 0.0]], dtype)
    lv1 = np.array([[0.0, lv, lv, -lv, 0.0]], dtype)
    m2 = np.zeros_like(m1)
    lv2 = np.array([[lv, lv, lv, -lv, 0.0]], dtype)
    with np.errstate(all="raise"):  # no warning either: these are the right answers
        kl, cache = gaussian_kl2_forward(m1, lv1, m2, lv2)
    assert kl.dtype == dtype
    assert np.isposinf(kl[0, 0])  # v2 -> 0 with v1 = 1
    assert kl[0, 1] == 0.0  # the same tiny-variance Gaussian twice: 0, exactly
    assert np.isposinf(kl[0, 2])  # equal tiny variances, means 1 apart
    assert kl[0, 3] == 0.0 and kl[0, 4] == 0.0  # huge equal variances; the standard case
    big = dtype(1e30 if dtype is np.float32 else 1e200)  # big^2 overflows, big^2 / v2 need not
    lv_big = dtype(100.0 if dtype is np.float32 else 600.0)
    kl, _ = gaussian_kl2_forward(np.full((1, 1), big), np.full((1, 1), lv_big, dtype),
                                 np.zeros((1, 1), dtype), np.full((1, 1), lv_big, dtype))
    expected = 0.5 * np.exp(2 * np.log(float(big)) - float(lv_big))  # (m1 - m2)^2 / (2 v2)
    assert np.isfinite(kl[0, 0]) and kl[0, 0] == pytest.approx(expected, rel=1e-5)
    # the gradients at equal tiny-variance Gaussians are finite too (no 0 * inf)
    grads = gaussian_kl2_backward(np.ones_like(m1), cache)
    assert all(np.isfinite(g[0, 1]) for g in grads)


def test_two_gaussian_kl_is_never_nan_at_extreme_log_variances():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        top = np.log(np.finfo(dtype).max)
        m1, m2 = (rng.normal(size=(50, 4)) * 3).astype(dtype), rng.normal(size=(50, 4)).astype(dtype)
        m2[:10] = m1[:10]  # some equal means
        lv1 = rng.uniform(-3 * top, 3 * top, size=(50, 4)).astype(dtype)
        lv2 = rng.uniform(-3 * top, 3 * top, size=(50, 4)).astype(dtype)
        kl, _ = gaussian_kl2_forward(m1, lv1, m2, lv2)
        assert not np.isnan(kl).any() and (kl >= 0).all()


@pytest.mark.parametrize("dtype, ulps", [(np.float64, 4), (np.float32, 4)])
def test_each_pixel_s_loglik_is_within_a_few_ulps_of_log1p(dtype, ulps):
    """The compiled kernel takes log1p(exp(-|l|)) as log(1 + e) with the rounding of 1 + e
    corrected (_bernoulli_loop; for float32 the polynomial pass, _bernoulli_poly_loop); per pixel, over logits from 1e-6 to the cut and both
    targets, it must match the closed form with np.log1p to a few units in the last place."""
    from npvae.backend import use_backend

    mags = np.concatenate([np.geomspace(1e-6, 40.0, 400), [0.0]])
    l = np.concatenate([mags, -mags]).astype(dtype)[:, None]  # (N, 1): one pixel per row
    for target in (0.0, 1.0):
        x = np.full_like(l, target)
        l64 = l.astype(np.float64)[:, 0]
        lin = target * l64 - np.maximum(l64, 0.0)  # exact: 0 or -|l|
        want = lin - np.log1p(np.exp(-np.abs(l64)))  # (N,)  in float64, no cancellation
        with use_backend("numba"):
            logp, _ = bernoulli_loglik_forward(l, x)
        tol = ulps * np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
        err = np.abs(logp.astype(np.float64) - want)
        assert (err <= tol + np.finfo(dtype).tiny).all(), float(np.max(err / (tol + 1e-300)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_each_pixel_s_gradient_is_within_a_few_ulps_and_exact_beyond_the_cut(dtype):
    """x - sigmoid(l) per pixel, computed in float64 as (x - [l > 0]) +- sigmoid(-|l|), so
    that a well-predicted pixel's tiny gradient is exact: the compiled kernel (for float32
    the polynomial pass, LIK.5) is within 4 ulps of it from |l| = 1e-6 to the cut, and
    beyond the cut, where exp(-|l|) is taken as 0 (FTZ.2), the value and gradient are
    exactly (x - [l > 0]) l and x - [l > 0]."""
    from npvae.backend import use_backend
    from npvae.ops.activations import EXP_CUT

    cut = -float(dtype(EXP_CUT[np.dtype(dtype)]))  # the cut as the kernels hold it
    mags = np.concatenate([np.geomspace(1e-6, cut * (1 - 1e-6), 2000), [0.0, cut]])  # the cut
    # itself is inside: exp(-|l|) is kept there, as the NumPy twin keeps it
    far = np.array([cut * 1.001, 2 * cut, 1e4, float(np.finfo(dtype).max)])
    l = np.concatenate([mags, -mags, far, -far]).astype(dtype)[:, None]
    inside = np.abs(l[:, 0]) <= cut
    for target in (0.0, 1.0):
        x = np.full_like(l, target)
        l64 = l.astype(np.float64)[:, 0]
        xm = target - (l64 > 0)  # 0 or -1, or 1 for l <= 0 and x = 1
        sig = np.exp(-np.abs(l64)) / (1 + np.exp(-np.abs(l64)))  # sigmoid(-|l|)
        want = np.where(l64 > 0, xm + sig, xm - sig)  # x - sigmoid(l)
        with use_backend("numba"):
            logp, cache = bernoulli_loglik_forward(l, x)
        g = cache.g[:, 0].astype(np.float64)
        tol = 4 * np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
        assert np.all(np.abs(g - want)[inside] <= tol[inside]), target
        np.testing.assert_array_equal(g[~inside], xm[~inside])
        np.testing.assert_array_equal(logp[~inside], (xm * l64)[~inside].astype(dtype))


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_a_well_predicted_pixel_keeps_its_small_loglik_and_gradient_precise(backend):
    """x = 1 with l >> 0 (or x = 0 with l << 0): log p = -log1p(exp(-|l|)) and the gradient
    +-sigmoid(-|l|) are tiny, and must come out to full relative precision, not as the
    difference of two numbers near l or near 1 (a finite-difference check of the loss
    would otherwise see rounding of 1e-15 divided by its step)."""
    from npvae.backend import use_backend
    from npvae.ops import bernoulli_loglik_backward

    l = np.array([[3.0, 13.6, 30.0, -3.0, -13.6, -30.0]])
    x = np.array([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    want_logp = -np.log1p(np.exp(-np.abs(l)))  # each pixel's log p, in closed form
    want_g = np.where(l > 0, 1.0, -1.0) * np.exp(-np.abs(l)) / (1 + np.exp(-np.abs(l)))
    with use_backend(backend):
        for j in range(l.shape[1]):
            logp, cache = bernoulli_loglik_forward(l[:, j:j + 1], x[:, j:j + 1])
            np.testing.assert_allclose(logp, want_logp[:, j], rtol=1e-14)
            g = bernoulli_loglik_backward(np.ones(1), cache)
            np.testing.assert_allclose(g, want_g[:, j:j + 1], rtol=1e-14)


def test_the_polynomial_centred_softplus_is_within_three_ulps():
    """(IW.7) The float32 polynomial pass of the importance-weighted estimate against
    c(t) = |t|/2 + log1p(e^-|t|) in float64: within 3 units in the last place of c on a
    dense grid from 0 to 30, down to 1e-30, and beyond the clamp at 30 log 2, both signs,
    with the bias added inside the pass."""
    from npvae.ops.centred_softplus import T_MAX_STEPS, _centred_softplus_loop
    from npvae.ops.poly32 import CONSTANTS

    t_max = T_MAX_STEPS * math.log(2)
    grid = np.concatenate([np.linspace(0, 30, 600_001), np.geomspace(1e-30, 1, 20_001),
                           [t_max * (1 - 1e-6), t_max, t_max * (1 + 1e-6), 25.0, 86.0,
                            88.0, 1e4, 3e38]]).astype(np.float32)
    grid = np.concatenate([grid, -grid, np.zeros(-2 * grid.size % 64, np.float32)])
    rows = grid.reshape(-1, 64)  # (R, 64)
    b = np.random.default_rng(0).normal(size=64).astype(np.float32)
    for bias in (np.zeros(64, np.float32), b):
        out = np.empty_like(rows)
        _centred_softplus_loop(rows, bias, out, CONSTANTS)
        t = np.abs((rows + bias).astype(np.float64))  # the float32 sum, as the pass forms it
        want = 0.5 * t + np.log1p(np.exp(-t))
        assert np.all(np.abs(out - want) <= 3 * np.spacing(want.astype(np.float32)))


def _horner(coeffs, x):
    """sum_j coeffs[j] x^j in float64."""
    out = np.zeros_like(x)
    for c in reversed(coeffs):
        out = out * x + float(c)
    return out


def test_the_polynomials_remainders_are_within_their_stated_bounds():
    """(IW.7, LIK.5) The two series with their float32 coefficients, evaluated in float64:
    e^g within 8e-9 of its value (relative) for |g| <= log(2)/2, and 2 atanh(s) within
    1.1e-8 for s in (0, 1/3]. The ulps bounds of both compiled loops rest on these; a
    dropped term breaks them tenfold, which an ulps test on a grid can miss."""
    from npvae.ops.poly32 import CONSTANTS

    _, taylor, series = CONSTANTS
    g = np.linspace(-math.log(2) / 2, math.log(2) / 2, 200_001)
    e_g = _horner((1.0, 1.0) + taylor, g)
    assert np.max(np.abs(e_g - np.exp(g)) / np.exp(g)) < 8e-9
    s = np.linspace(0.0, 1 / 3, 200_001)[1:]
    two_atanh = 2 * s * _horner((1.0,) + series, s * s)
    assert np.max(np.abs(two_atanh - 2 * np.arctanh(s))) < 1.1e-8
    # and the log 2 split: LN2_HI + LN2_LO is log 2 to float64 rounding, m LN2_HI exact
    (_, ln2, hi, lo), _, _ = CONSTANTS
    assert abs(float(hi) + float(lo) - math.log(2)) < 1e-12
    m = np.arange(64, dtype=np.float32)
    np.testing.assert_array_equal((m * hi).astype(np.float64), m.astype(np.float64) * float(hi))


def test_the_float32_training_likelihood_is_within_four_ulps_on_two_whole_binades():
    """(LIK.5) Every float32 logit of magnitude in [2^-7, 2^-6) and in [4, 8), both signs,
    both targets: the compiled float32 kernel's value per pixel within 4 ulps of the
    closed form with log1p. The worst cases of a truncated series are single isolated
    inputs (dropping the s^13 term reaches 4.6 ulps in the first binade, the g^7 term 5.0
    in the second), which a sampled grid misses."""
    from npvae.ops.activations import EXP_CUT
    from npvae.ops.likelihoods import _bernoulli_poly_loop
    from npvae.ops.poly32 import CONSTANTS

    cut = np.float32(EXP_CUT[np.dtype(np.float32)])
    worst = 0.0
    for lo in (2.0 ** -7, 4.0):
        first, last = np.float32(lo).view(np.int32), np.float32(2 * lo).view(np.int32)
        for start in range(int(first), int(last), 1 << 20):
            mags = np.arange(start, min(start + (1 << 20), int(last)), dtype=np.int32).view(np.float32)
            l = np.concatenate([mags, -mags])[:, None]  # (R, 1)
            l64 = l[:, 0].astype(np.float64)
            soft = np.maximum(l64, 0.0) + np.log1p(np.exp(-np.abs(l64)))  # softplus, float64
            for target in (0.0, 1.0):
                x = np.full_like(l, target)
                terms, _ = _bernoulli_poly_loop(l, x, np.empty_like(l), np.empty_like(l), cut, CONSTANTS)
                want = target * l64 - soft
                ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
                worst = max(worst, float(np.max(np.abs(terms[:, 0] - want) / ulp)))
    assert worst <= 4.0, worst
