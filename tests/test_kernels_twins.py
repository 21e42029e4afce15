"""Each Numba kernel equals its NumPy twin: rel. error 1e-12 in float64, float32
precision in float32, on random inputs."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from npvae import optim
from npvae.ops import activations, centred_softplus, kl, likelihoods, vq

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
def test_scale_rows_twins(dtype, n, d, seed):
    rng = np.random.default_rng(seed)
    g, dlogp = rng.normal(size=(n, d)).astype(dtype), rng.normal(size=n).astype(dtype)
    s1, s2 = both(likelihoods.scale_rows_kernel, g, dlogp)
    np.testing.assert_array_equal(s1, s2, strict=True)  # one product per entry in both


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
@given(st.integers(0, 40), dim, seeds)
def test_col_sum_twins(dtype, n, d, seed):
    a = (np.random.default_rng(seed).normal(size=(n, d)) * 4).astype(dtype)
    s1, s2 = both(activations.col_sum_kernel, a, np.empty(d, dtype))
    assert_twins_agree(s1, s2, dtype)  # NumPy sums a single column pairwise: not bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
@given(st.integers(0, 200), seeds)
def test_sum_of_squares_twins(dtype, n, seed):
    from npvae.optim import sumsq_kernel
    a = np.random.default_rng(seed).normal(size=n).astype(dtype)
    exact = float(np.sum(a.astype(np.float64) ** 2))  # NumPy's pairwise sum, a third grouping
    for total in both(sumsq_kernel, a):
        assert isinstance(total, float)
        assert abs(total - exact) <= 1e-12 * max(exact, 1.0)


# ----------------------------------------------------------------------------------
# Non-finite and subnormal input: every kernel pair must treat NaN, +inf, -inf and
# subnormal numbers exactly as its NumPy twin does (NaN in the same places, the same
# infinities). Finite results are compared bit for bit where the two twins perform the
# same IEEE operations in the same order on the same values ("exact by construction");
# where one twin calls the C library's scalar exp/log1p/expm1 and the other NumPy's SIMD
# ufunc, or a float32 loop rounds once through float64 where the twin rounds twice, or a
# sum is regrouped, they are compared with the stated relative and absolute tolerance
# SPECIAL_TOL (a few float32 or float64 ulps of the value, or of 1 near zero).
# optim.py's kernels are tested with the optimizer (tests/test_optim.py).

SPECIAL_TOL = {np.float64: 1e-12, np.float32: 1e-5}


def special_values(dtype):
    """NaN, both infinities, subnormals of both signs, both zeros, and ordinary values."""
    info = np.finfo(dtype)
    return np.array([
        np.nan, np.inf, -np.inf, info.smallest_subnormal, -info.smallest_subnormal,
        info.tiny / 3, -info.tiny / 3, 0.0, -0.0, info.tiny, 1.0, -1.0, 2.5, -0.75,
        30.0, -30.0, info.max, -info.max,
    ], dtype=dtype)


def pair_grid(dtype):
    """(S, S) arrays u, w with (u[i, j], w[i, j]) running over every pair of special values."""
    s = special_values(dtype)
    u, w = np.meshgrid(s, s, indexing="ij")
    return np.ascontiguousarray(u), np.ascontiguousarray(w)


def assert_twins_match(got, want, exact):
    """``got`` (compiled) equals ``want`` (NumPy twin): same dtype and shape, NaN in the
    same places (NaN == NaN), the same infinities, and finite values equal bit for bit
    when ``exact``, else within SPECIAL_TOL."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    if exact or got.dtype.kind in "iu":
        np.testing.assert_array_equal(got, want, strict=True)  # NaN == NaN here
    else:
        tol = SPECIAL_TOL[want.dtype.type]
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, equal_nan=True)


def numba_and_numpy(kernel, *args):
    with np.errstate(all="ignore"):  # inf - inf and the like are the point here
        return both(kernel, *args)


# activations whose two twins do the same IEEE operations; sigmoid and softplus call
# exp/log1p (forward) and expm1 (softplus derivative) from the C library in the compiled
# loop and from NumPy's SIMD code in the twin
EXACT_FORWARD = {"relu", "leaky_relu", "tanh", "identity"}
EXACT_GRAD = {"relu", "leaky_relu", "tanh", "sigmoid", "identity"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", activations.ACTIVATIONS)
def test_activation_twins_on_special_values(dtype, name):
    code, slope = activations.activation_code(name), dtype(0.01)
    a, b_grid = pair_grid(dtype)
    b = special_values(dtype)  # a[i, j] + b[j] meets every pair
    h1, h2 = numba_and_numpy(activations.bias_act_kernel, a, b, code, slope, np.empty_like(a))
    assert_twins_match(h1, h2, exact=name in EXACT_FORWARD)
    # the derivative from every (dh, h) pair, and from the outputs of the forward pass
    for dh, h in ((a, b_grid), (b_grid, h2)):
        g1, g2 = numba_and_numpy(activations.act_grad_kernel, dh, h, code, slope, np.empty_like(a))
        assert_twins_match(g1, g2, exact=name in EXACT_GRAD)


@pytest.mark.parametrize("dtype", DTYPES)
def test_col_sum_twins_on_special_values(dtype):
    a, w = pair_grid(dtype)  # every column meets every special value, in two orders
    info = np.finfo(dtype)
    sub = info.smallest_subnormal
    # columns whose sum depends on the order of the additions: max + max overflows before
    # -max comes; inf meets -inf; a subnormal is absorbed by 1 and not by 0
    mixed = np.array([[info.max, np.inf, sub, 1.0, sub],
                      [info.max, -np.inf, 1.0, sub, sub],
                      [-info.max, 1.0, -1.0, -1.0, -sub]], dtype=dtype)
    for m in (a, w, np.ascontiguousarray(a[::-1]), a[:1], a[:0], mixed,
              np.ascontiguousarray(mixed[::-1])):
        s1, s2 = numba_and_numpy(activations.col_sum_kernel, m, np.empty(m.shape[1], dtype))
        # with more than one column NumPy too adds row 0, then the rows in order
        assert_twins_match(s1, s2, exact=True)
    s1 = activations.col_sum_kernel.numba(mixed, np.empty(5, dtype))
    with np.errstate(all="ignore"):  # in order: inf, nan, 0, 0 and sub, by hand
        np.testing.assert_array_equal(s1, np.array([np.inf, np.nan, 0.0, 0.0, sub], dtype))


def test_compiled_relu_keeps_nan():
    """The case that hid a NaN in the weights: relu(NaN) is NaN, its gradient is NaN."""
    a = np.array([[np.nan, -1.0, 2.0]])
    h = activations.bias_act_kernel.numba(a, np.zeros(3), activations.RELU, 0.01, np.empty_like(a))
    assert np.isnan(h[0, 0]) and h[0, 1] == 0.0 and h[0, 2] == 2.0
    dh = np.array([[1.0, np.nan, np.inf]])
    g = activations.act_grad_kernel.numba(dh, np.array([[np.nan, 0.0, -1.0]]),
                                          activations.RELU, 0.01, np.empty_like(dh))
    assert g[0, 0] == 0.0 and np.isnan(g[0, 1]) and np.isnan(g[0, 2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_bernoulli_twins_on_special_values(dtype):
    logits, x = pair_grid(dtype)
    (lp1, g1), (lp2, g2) = numba_and_numpy(likelihoods.bernoulli_kernel, logits, x)
    # float64: exp comes from NumPy in both and the loop repeats the twin's operations
    # for g; the twin's log1p(e) is log(1 + e) with its rounding corrected in the
    # compiled one, equal to a few ulps (the row sums are NumPy's in both). float32: exp
    # and log1p are polynomials in the compiled loop (LIK.5), so g agrees to a few ulps
    exact_g = dtype == np.float64
    assert_twins_match(g1, g2, exact=exact_g)
    assert_twins_match(lp1, lp2, exact=False)
    # every row of the grid holds x = NaN, so its sums are all NaN: the row sums are
    # compared again on rows of 37 targets in [0, 1] (subnormals and signed zeros among
    # them) against every logit but NaN, long enough that the order of a sum shows
    rng = np.random.default_rng(3)
    s = special_values(dtype)
    in_unit = s[(s >= 0) & (s <= 1)]  # 0, -0, subnormals, tiny, 1
    x = rng.random((s.size - 1, 37)).astype(dtype)
    x[:, :in_unit.size] = in_unit
    logits = (rng.normal(size=x.shape) * 5).astype(dtype)
    logits[:, 0] = s[1:]  # one special logit per row, every one but NaN
    (lp1, g1), (lp2, g2) = numba_and_numpy(likelihoods.bernoulli_kernel, logits, x)
    assert np.isfinite(lp2).sum() >= s.size - 4  # only the rows with an infinite logit are not
    assert_twins_match(g1, g2, exact=exact_g)
    assert_twins_match(lp1, lp2, exact=False)




@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_rows_twins_on_special_values(dtype):
    _, g = pair_grid(dtype)  # g[i, j] runs over every special value along each row i
    for dlogp in special_values(dtype), special_values(dtype)[::-1]:  # every pair meets
        s1, s2 = numba_and_numpy(likelihoods.scale_rows_kernel, g, np.ascontiguousarray(dlogp))
        assert_twins_match(s1, s2, exact=True)  # the same single product per entry
    # a row scaled by 0 keeps its NaN and turns inf into NaN: no shortcut for a zero scale
    s1 = likelihoods.scale_rows_kernel.numba(np.array([[np.nan, np.inf, 1.0]], dtype),
                                             np.zeros(1, dtype))
    np.testing.assert_array_equal(s1, np.array([[np.nan, np.nan, 0.0]], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_twins_on_special_values(dtype):
    mu, logvar = pair_grid(dtype)
    (k1, v1), (k2, v2) = numba_and_numpy(kl.kl_kernel, mu, logvar)
    assert_twins_match(v1, v2, exact=True)  # np.exp in both
    assert_twins_match(k1, k2, exact=True)  # the twin's operations, in its order
    dkl, other = pair_grid(dtype)
    for m, var in ((other, np.abs(dkl)), (dkl, other)):
        (a1, b1), (a2, b2) = numba_and_numpy(kl.kl_grad_kernel, dkl, m, var)
        assert_twins_match(a1, a2, exact=True)  # dkl * mu in both
        assert_twins_match(b1, b2, exact=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", [vq.EUCLIDEAN, vq.DOT])
def test_vq_assign_twins_on_special_values(dtype, metric):
    s = special_values(dtype)
    z_e = np.ascontiguousarray(np.stack([s, np.roll(s, 3)], axis=1))  # (S, 2)
    codebook = np.ascontiguousarray(np.stack([np.roll(s, 5), s[::-1]], axis=1))  # (S, 2)
    i1, i2 = numba_and_numpy(vq.assign_kernel, z_e, codebook, metric)
    assert_twins_match(i1, i2, exact=True)  # the same scores, then the same argmin
    rng = np.random.default_rng(1)
    z_e = rng.normal(size=(40, 3)).astype(dtype)
    codebook = rng.normal(size=(7, 3)).astype(dtype)
    z_e[rng.integers(40, size=8), rng.integers(3, size=8)] = rng.choice(s, size=8)
    codebook[2, 1] = np.nan  # a NaN score wins argmin, in both twins
    i1, i2 = numba_and_numpy(vq.assign_kernel, z_e, codebook, metric)
    assert_twins_match(i1, i2, exact=True)
    # without NaN: infinite and subnormal inputs, and codes with subnormal and huge
    # entries, so that -inf, +inf and subnormal scores decide the argmin
    finite_or_inf = s[~np.isnan(s)]
    z_e = rng.normal(size=(finite_or_inf.size, 2)).astype(dtype)
    z_e[:, 0] = finite_or_inf
    codebook = rng.normal(size=(6, 2)).astype(dtype)
    codebook[4] = s[3:5]  # subnormals
    codebook[5, 0] = np.finfo(dtype).max ** 0.5 / 4  # large, its square still finite
    i1, i2 = numba_and_numpy(vq.assign_kernel, z_e, codebook, metric)
    assert_twins_match(i1, i2, exact=True)
    # by hand: z = (inf, 1) is nearest to (1, 0) and has the largest product with it
    for twin in (vq.assign_kernel.numba, vq.assign_kernel.numpy):
        with np.errstate(all="ignore"):
            got = twin(np.array([[np.inf, 1.0]], dtype), np.array([[-1.0, 0.0], [1.0, 0.0]], dtype),
                       metric)
        np.testing.assert_array_equal(got, [1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_rows_twins_on_special_values(dtype):
    s = special_values(dtype)
    rows = np.ascontiguousarray(np.stack([s, s[::-1], np.roll(s, 4)], axis=1))  # (S, 3)
    idx = np.random.default_rng(2).integers(4, size=s.size)
    o1, o2 = numba_and_numpy(vq.scatter_rows_kernel, idx, rows, 4)
    assert_twins_match(o1, o2, exact=True)  # the same additions in the same order


@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_clamp_twins_on_special_values(dtype):
    # max(-a, cut) with NaN kept: the same comparisons and negation, so bit for bit
    cut = dtype(activations.EXP_CUT[np.dtype(dtype)])
    a = np.abs(pair_grid(dtype)[0])
    got, want = numba_and_numpy(activations.neg_clamp_kernel, a, cut)
    assert_twins_match(got, want, exact=True)
    assert np.isnan(got).sum() == np.isnan(a).sum()  # NaN is never clamped away
    assert np.nanmin(got) == cut
    # its one caller passes |l|, but the pair is defined for any input: negative values,
    # -inf and negative subnormals too, and random values on both sides of the cut
    signed = pair_grid(dtype)[0]
    random = (np.random.default_rng(4).normal(size=(9, 31)) * 3 * abs(cut)).astype(dtype)
    for a in (signed, random):
        got, want = numba_and_numpy(activations.neg_clamp_kernel, a, cut)
        assert_twins_match(got, want, exact=True)
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(got, np.where(np.isnan(a), a, np.maximum(-a, cut)))



@pytest.mark.parametrize("dtype", DTYPES)
def test_clamp_below_twins_on_special_values(dtype):
    # max(a, cut) with NaN kept: the same comparison, so bit for bit; every special value
    # and random values on both sides of the cut
    cut = dtype(activations.EXP_CUT[np.dtype(dtype)])
    random = (np.random.default_rng(6).normal(size=(9, 31)) * 3 * abs(cut)).astype(dtype)
    for a in (pair_grid(dtype)[0], -np.abs(pair_grid(dtype)[0]), random):
        got, want = numba_and_numpy(activations.clamp_below_kernel, a, cut)
        assert_twins_match(got, want, exact=True)
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(got, np.where(np.isnan(a), a, np.maximum(a, cut)))
        assert np.isnan(got).sum() == np.isnan(a).sum()  # NaN is never clamped away

def neg_abs_bias_both(a, b, cut):
    """(flag, out) of each twin of neg_abs_bias_kernel, on copies of the inputs."""
    results = []
    for twin in (activations.neg_abs_bias_kernel.numba, activations.neg_abs_bias_kernel.numpy):
        out = np.full_like(a, 7.0)
        with np.errstate(all="ignore"):
            flag = twin(a.copy(), b.copy(), cut, out)
        results.append((bool(flag), out))
    return results


@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_abs_bias_twins_on_special_values(dtype):
    # -|a + b|: one addition, one abs, one negation per entry in both twins, so bit for
    # bit; a[i, j] + b[j] meets every pair of special values (inf - inf gives NaN)
    cut = dtype(activations.EXP_CUT[np.dtype(dtype)])
    a, _ = pair_grid(dtype)
    b = special_values(dtype)
    (f1, got), (f2, want) = neg_abs_bias_both(a, b, cut)
    assert_twins_match(got, want, exact=True)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(got, -np.abs(a + b))
    assert f1 is f2 is False  # NaN and -inf are below no cut, but fail the test
    # random values: within the cut, then one entry beyond it, then a NaN
    rng = np.random.default_rng(5)
    a = rng.normal(size=(12, 31)).astype(dtype)
    b = rng.normal(size=31).astype(dtype)
    for change, within in ((None, True), ((3, 4, -2.0 * cut), False), ((11, 30, np.nan), False)):
        x = a.copy()
        if change is not None:
            x[change[0], change[1]] = change[2]
        for rows in (x, x[:7]):  # all rows, and a view of the first (a last, smaller chunk)
            (f1, got), (f2, want) = neg_abs_bias_both(np.ascontiguousarray(rows), b, cut)
            assert_twins_match(got, want, exact=True)
            np.testing.assert_array_equal(got, -np.abs(rows + b))
            assert f2 is bool(np.all(-np.abs(rows + b) >= cut))
            assert f1 is f2
        assert neg_abs_bias_both(x, b, cut)[0][0] is within


def centred_softplus_both(l, b):
    """The (N,) row sums of each twin of centred_softplus_sums, on copies of the inputs."""
    with np.errstate(all="ignore"):
        return [twin(l.copy(), b.copy(), np.full_like(l, 7.0))
                for twin in (centred_softplus.centred_softplus_sums.numba,
                             centred_softplus.centred_softplus_sums.numpy)]


@pytest.mark.parametrize("dtype", DTYPES)
@given(batch, st.integers(1, 40), seeds, st.sampled_from([0.1, 3.0, 30.0]))
def test_centred_softplus_twins(dtype, n, d, seed, scale):
    # float32: the polynomial pass against NumPy's exp and log. Each entry is within 3
    # ulps of c on both sides (IW.7), so a row's sums differ by at most 6 eps sum_d c_d,
    # plus the rounding of two float32 sums. float64 takes the same passes on both sides.
    rng = np.random.default_rng(seed)
    l = (rng.normal(size=(n, d)) * scale).astype(dtype)
    b = (rng.normal(size=d) * scale).astype(dtype)
    got, want = centred_softplus_both(l, b)
    assert got.dtype == want.dtype == np.float64 and got.shape == want.shape == (n,)
    if dtype == np.float64:
        np.testing.assert_array_equal(got, want)
    else:
        eps = np.finfo(np.float32).eps
        assert np.all(np.abs(got - want) <= 8 * eps * want)  # want >= d log 2 > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_centred_softplus_twins_on_special_values(dtype):
    # l + b meets every pair of special values: NaN and inf - inf give a NaN sum,
    # +-inf and +-max + +-max an infinite one, subnormals c = log 2
    # the sums are float64 of float32 entries: compared at the entries' precision
    tol = SPECIAL_TOL[dtype]
    l, _ = pair_grid(dtype)
    b = special_values(dtype)
    got, want = centred_softplus_both(l, b)
    np.testing.assert_allclose(got, want, rtol=tol, equal_nan=True)  # inf == inf too
    with np.errstate(all="ignore"):
        lb = (l + b).astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(lb).any(axis=1))
    # each special value alone, one per row: c(x) from the closed form in float64
    one = special_values(dtype)[:, None]
    got, want = centred_softplus_both(np.ascontiguousarray(one), np.zeros(1, dtype))
    np.testing.assert_allclose(got, want, rtol=tol, equal_nan=True)
    t = np.abs(one[:, 0].astype(np.float64))
    with np.errstate(all="ignore"):
        closed = 0.5 * t + np.log1p(np.exp(-t))
    np.testing.assert_allclose(got, closed, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_of_squares_twins_on_special_values(dtype):
    # squares in float64: a float32 subnormal squares to a normal float64; info.max
    # squares to a finite float64 for float32 and to inf for float64
    s = special_values(dtype)
    finite = s[np.isfinite(s) & (np.abs(s.astype(np.float64)) < 1e100)]
    cases = [s, s[::-1], finite, finite[::-1], s[:1], s[1:2], s[2:3], s[3:5], s[:0]]
    for a in cases:
        got, want = numba_and_numpy(optim.sumsq_kernel, a)
        assert_twins_match(got, want, exact=False)
        if a.size and np.isnan(a).any():
            assert np.isnan(got)
        elif a.size and np.isinf(a).any():
            assert got == np.inf
    if dtype is np.float32:  # float32 subnormals and tiny/3: squares normal in float64
        tiny = s[3:7]
        got = optim.sumsq_kernel.numba(tiny)
        want = float(np.sum(tiny.astype(np.float64) ** 2))
        assert want > 0 and abs(got - want) <= 1e-15 * want  # none flushed to zero
