"""Vector quantizer: assignment, straight-through gradient, auxiliary losses, EMA, helpers.

Gradient checks use float64 values on a dyadic grid (multiples of 2^-12) and a step
h = 2^-6: every perturbed value, difference, square and row sum is then exact, so the
central difference of these quadratic losses is exact up to the final products with
the random upstream gradient, and a 1e-6 bound on the relative error means something
even for entries near zero. Codes are placed far apart so a perturbation of size h
cannot change which code a row picks; the tests assert that it does not.
"""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npvae.ops import vq

from strategies import dim, seeds

H = 2.0**-6  # finite-difference step
GRID = 2**12  # values are integers / GRID


def max_rel_error(analytic, numeric):
    """max |a - n| / max(|a| + |n|, 1e-8), elementwise."""
    denom = np.maximum(np.abs(analytic) + np.abs(numeric), 1e-8)
    return float(np.max(np.abs(analytic - numeric) / denom, initial=0.0))


num_rows = st.integers(1, 16)  # R = N M: up to 8 examples of up to 2 code vectors


def bounded(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)


def dyadic(shape, lo, hi):
    """float64 arrays of multiples of 1/GRID in [lo, hi]."""
    ints = st.integers(int(lo * GRID), int(hi * GRID))
    return hnp.arrays(np.float64, shape, elements=ints.map(lambda i: i / GRID))


@st.composite
def separated_case(draw):
    """z_e (R, Dz), codebook (K, Dz), idx (R,) with row r within 0.5 sqrt(Dz) of code idx[r]
    and every other code at least 1.5 sqrt(Dz) away (offsets 4 apart per coordinate)."""
    rows, dz, k = draw(num_rows), draw(dim), draw(dim)
    order = np.array(draw(st.permutations(range(k))), dtype=np.float64)
    codebook = 4.0 * order[:, None] + draw(dyadic((k, dz), -1.0, 1.0))  # (K, Dz)
    idx = draw(hnp.arrays(np.int64, rows, elements=st.integers(0, k - 1)))
    z_e = codebook[idx] + draw(dyadic((rows, dz), -0.5, 0.5))  # (R, Dz)
    return z_e, codebook, idx


@st.composite
def any_case(draw, dtype=np.float64):
    """Unstructured z_e and codebook: duplicates, zeros and exact ties are all allowed."""
    rows, dz, k = draw(num_rows), draw(dim), draw(dim)
    elements = st.floats(-4, 4, allow_nan=False, width=np.dtype(dtype).itemsize * 8)
    z_e = draw(hnp.arrays(dtype, (rows, dz), elements=elements))
    codebook = draw(hnp.arrays(dtype, (k, dz), elements=elements))
    return z_e, codebook


def scores64(z_e, codebook, metric):
    """Smallest-wins scores in float64, written independently of the module."""
    z, e = z_e.astype(np.float64), codebook.astype(np.float64)
    if metric == "euclidean":
        return ((z[:, None, :] - e[None, :, :]) ** 2).sum(-1)  # (R, K)
    return -(z @ e.T)  # (R, K)


def check_choice(idx, scores, tol):
    """idx is optimal for every row; where the best score beats the runner-up by more
    than tol it must be exactly that code (the only rows where rounding cannot decide)."""
    rows = np.arange(scores.shape[0])
    best = scores.min(axis=1)
    assert np.all(scores[rows, idx] <= best + tol)
    clear = np.ones(scores.shape[0], dtype=bool)
    if scores.shape[1] > 1:
        top2 = np.sort(scores, axis=1)[:, :2]
        clear = top2[:, 1] - top2[:, 0] > tol
    np.testing.assert_array_equal(idx[clear], scores[clear].argmin(axis=1))


def euclid_gap(z_e, codebook):
    """Smallest margin, over rows, between the nearest and second-nearest code."""
    d2 = scores64(z_e, codebook, "euclidean")
    if d2.shape[1] == 1:
        return np.inf
    top2 = np.sort(d2, axis=1)[:, :2]
    return float((top2[:, 1] - top2[:, 0]).min())


# ----------------------------------------------------------------------------------
# Assignment (VQ.1, VQ.2)


@settings(deadline=None)
@given(separated_case())
def test_euclidean_assignment_matches_brute_force(case):
    z_e, codebook, idx = case
    brute = ((z_e[:, None] - codebook[None]) ** 2).sum(-1).argmin(axis=1)
    np.testing.assert_array_equal(brute, idx)  # the construction is what it claims
    np.testing.assert_array_equal(vq.vq_assign(z_e, codebook, "euclidean"), brute)


@settings(deadline=None)
@given(any_case(), st.sampled_from(vq.METRICS))
def test_assignment_is_optimal_on_any_data(case, metric):
    z_e, codebook = case
    idx = vq.vq_assign(z_e, codebook, metric)
    assert idx.dtype == np.int64 and idx.shape == (z_e.shape[0],)
    check_choice(idx, scores64(z_e, codebook, metric), tol=1e-9)


@settings(deadline=None)
@given(any_case())
def test_dot_assignment_is_argmax_of_dot_products(case):
    z_e, codebook = case
    idx = vq.vq_assign(z_e, codebook, "dot")
    check_choice(idx, -(z_e @ codebook.T), tol=1e-9)


def test_metrics_disagree_on_a_hand_made_case():
    # code 0 is nearer to z; code 1 is far but long, so its dot product is larger
    z_e = np.array([[1.0, 0.0]])
    codebook = np.array([[0.9, 0.0], [3.0, 3.0]])
    assert vq.vq_assign(z_e, codebook, "euclidean")[0] == 0  # ||z-e||^2: 0.01 vs 13
    assert vq.vq_assign(z_e, codebook, "dot")[0] == 1  # z.e: 0.9 vs 3


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_exact_ties_go_to_the_lowest_index(backend):
    # codes of equal norm: equally near codes tie exactly in the score of (VQ.1) as well
    kernel = vq.assign_kernel.numpy if backend == "numpy" else vq.assign_kernel.numba
    codebook = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z_e = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    np.testing.assert_array_equal(kernel(z_e, codebook, vq.EUCLIDEAN), [0, 0, 0])
    np.testing.assert_array_equal(kernel(z_e, codebook, vq.DOT), [0, 0, 0])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_tie_in_distance_is_decided_by_the_rounding_of_the_score(backend):
    # codes 1/8 either side of z are exactly equally near (all values representable), but
    # (VQ.1) ranks the rounded ||e_k||^2 - 2 z.e_k, which here gives the row to k = 1
    kernel = vq.assign_kernel.numpy if backend == "numpy" else vq.assign_kernel.numba
    z_e = np.array([[1.0956934985716344]])
    codebook = np.array([[0.9706934985716344], [1.2206934985716344]])
    assert z_e[0, 0] - codebook[0, 0] == codebook[1, 0] - z_e[0, 0] == 0.125
    assert kernel(z_e, codebook, vq.EUCLIDEAN)[0] == 1


def test_single_code_takes_every_row():
    z_e = np.random.default_rng(0).standard_normal((5, 3))
    for metric in vq.METRICS:
        np.testing.assert_array_equal(vq.vq_assign(z_e, np.ones((1, 3)), metric), 0)


# ----------------------------------------------------------------------------------
# The two twins agree


@settings(deadline=None)
@given(st.sampled_from([np.float64, np.float32]).flatmap(
    lambda dt: st.tuples(any_case(dt), st.just(dt))), st.sampled_from([0, 1]))
def test_assign_twins_agree(case_dtype, code):
    (z_e, codebook), dtype = case_dtype
    a = vq._assign_numpy(z_e, codebook, code)
    b = vq._assign_numba(z_e, codebook, code)
    tol = 1e-9 if dtype == np.float64 else 1e-3  # rounding of the scores in each dtype
    metric = vq.METRICS[code]
    check_choice(a, scores64(z_e, codebook, metric), tol)
    check_choice(b, scores64(z_e, codebook, metric), tol)
    # where neither twin's rounding can matter, they pick the same code
    s = scores64(z_e, codebook, metric)
    if s.shape[1] > 1:
        top2 = np.sort(s, axis=1)[:, :2]
        clear = top2[:, 1] - top2[:, 0] > tol
        np.testing.assert_array_equal(a[clear], b[clear])
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("code", [0, 1])
def test_assign_twins_identical_on_random_data(dtype, code):
    """Exact by construction: both twins take the dot products from the same BLAS call
    and the same einsum, form the scores with the same IEEE operations (s - 2d equals
    s + (-2)d bit for bit), and pick with np.argmin/argmax."""
    rng = np.random.default_rng(1)
    z_e = rng.standard_normal((500, 16)).astype(dtype)
    codebook = rng.standard_normal((64, 16)).astype(dtype)
    np.testing.assert_array_equal(
        vq._assign_numpy(z_e, codebook, code), vq._assign_numba(z_e, codebook, code)
    )


@settings(deadline=None)
@given(any_case(), seeds)
def test_scatter_twins_agree(case, seed):
    z_e, codebook = case
    idx = np.random.default_rng(seed).integers(codebook.shape[0], size=z_e.shape[0])
    a = vq._scatter_rows_numpy(idx, z_e, codebook.shape[0])
    b = vq._scatter_rows_numba(idx, z_e, codebook.shape[0])
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * z_e.shape[0] * 4)


# ----------------------------------------------------------------------------------
# Quantization and the straight-through gradient (VQ.3)


@settings(deadline=None)
@given(separated_case(), seeds)
def test_quantize_forward_picks_codes_and_backward_copies(case, seed):
    z_e, codebook, idx = case
    z_q, cache = vq.quantize_forward(z_e, codebook)
    np.testing.assert_array_equal(cache.idx, idx)
    assert cache.num_codes == codebook.shape[0]
    np.testing.assert_array_equal(z_q, codebook[idx])
    dz_q = np.random.default_rng(seed).standard_normal(z_q.shape)  # random upstream
    dz_e = vq.quantize_backward(dz_q, cache)
    assert np.array_equal(dz_e, dz_q)  # exactly the upstream gradient
    assert dz_e is not dz_q and not np.shares_memory(dz_e, dz_q)  # a copy


# ----------------------------------------------------------------------------------
# Gradient checks of the auxiliary losses (VQ.4, VQ.5)


def random_upstream(data, n):
    """A random normal upstream gradient (n,), never all zeros or constant (hypothesis's
    array strategy mostly fills one repeated value, often 0)."""
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).standard_normal(n)


@settings(deadline=None)
@given(separated_case(), st.data())
def test_codebook_loss_gradient(case, data):
    z_e, codebook, idx = case
    assume(euclid_gap(z_e, codebook) > 100 * H)
    dloss = random_upstream(data, z_e.shape[0])
    loss, cache = vq.codebook_loss_forward(z_e, codebook, idx)
    np.testing.assert_allclose(loss, ((z_e - codebook[idx]) ** 2).sum(1), rtol=1e-14)
    dcodebook = vq.codebook_loss_backward(dloss, cache)
    assert dcodebook.shape == codebook.shape

    numeric = np.zeros_like(codebook)
    for k in range(codebook.shape[0]):
        for j in range(codebook.shape[1]):
            plus, minus = codebook.copy(), codebook.copy()
            plus[k, j] += H
            minus[k, j] -= H
            np.testing.assert_array_equal(vq.vq_assign(z_e, plus), idx)  # no code switch
            np.testing.assert_array_equal(vq.vq_assign(z_e, minus), idx)
            lp, _ = vq.codebook_loss_forward(z_e, plus, idx)
            lm, _ = vq.codebook_loss_forward(z_e, minus, idx)
            numeric[k, j] = dloss @ (lp - lm) / (2 * H)
    assert max_rel_error(dcodebook, numeric) <= 1e-6


@settings(deadline=None)
@given(separated_case(), st.data())
def test_commitment_loss_gradient(case, data):
    z_e, codebook, idx = case
    assume(euclid_gap(z_e, codebook) > 100 * H)
    dloss = random_upstream(data, z_e.shape[0])
    beta = data.draw(bounded(0.0, 2.0))
    loss, cache = vq.commitment_loss_forward(z_e, codebook, idx, beta)
    np.testing.assert_allclose(loss, beta * ((z_e - codebook[idx]) ** 2).sum(1), rtol=1e-14)
    dz_e = vq.commitment_loss_backward(dloss, cache)
    assert dz_e.shape == z_e.shape

    numeric = np.zeros_like(z_e)
    for r in range(z_e.shape[0]):
        for j in range(z_e.shape[1]):
            plus, minus = z_e.copy(), z_e.copy()
            plus[r, j] += H
            minus[r, j] -= H
            np.testing.assert_array_equal(vq.vq_assign(plus, codebook), idx)  # no code switch
            np.testing.assert_array_equal(vq.vq_assign(minus, codebook), idx)
            lp, _ = vq.commitment_loss_forward(plus, codebook, idx, beta)
            lm, _ = vq.commitment_loss_forward(minus, codebook, idx, beta)
            numeric[r, j] = dloss @ (lp - lm) / (2 * H)
    assert max_rel_error(dz_e, numeric) <= 1e-6


def test_unused_codes_get_zero_gradient():
    codebook = np.array([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    z_e = np.array([[0.5, -0.25], [4.0, 5.5]])
    idx = vq.vq_assign(z_e, codebook)
    _, cache = vq.codebook_loss_forward(z_e, codebook, idx)
    dcodebook = vq.codebook_loss_backward(np.array([0.3, -1.7]), cache)
    np.testing.assert_array_equal(dcodebook[2], 0.0)
    np.testing.assert_allclose(dcodebook[0], -2 * 0.3 * np.array([0.5, -0.25]))


# ----------------------------------------------------------------------------------
# Moving-average codebook (VQ.6)


def test_ema_update_by_hand():
    codebook = np.array([[0.0], [10.0]])
    z_e = np.array([[1.0], [3.0], [11.0]])
    idx = np.array([0, 0, 1])
    state = vq.ema_init(codebook)
    # N = 0.5 [1, 1] + 0.5 [2, 1] = [1.5, 1];  S = 0.5 [0, 10] + 0.5 [4, 11] = [2, 10.5]
    new, st_ = vq.ema_update(state, z_e, idx, decay=0.5, eps=0.0)
    np.testing.assert_allclose(st_.cluster_size, [1.5, 1.0], rtol=1e-15)
    np.testing.assert_allclose(st_.embed_sum, [[2.0], [10.5]], rtol=1e-15)
    np.testing.assert_allclose(new, [[2.0 / 1.5], [10.5]], rtol=1e-15)
    # Laplace smoothing, eps = 0.5: N' = (N + 0.5) / (2.5 + 2 * 0.5) * 2.5 = [10/7, 15/14]
    new, _ = vq.ema_update(state, z_e, idx, decay=0.5, eps=0.5)
    np.testing.assert_allclose(new, [[1.4], [9.8]], rtol=1e-14)
    # pure: nothing passed in was changed
    np.testing.assert_array_equal(state.cluster_size, [1.0, 1.0])
    np.testing.assert_array_equal(state.embed_sum, codebook)
    np.testing.assert_array_equal(codebook, [[0.0], [10.0]])


@settings(deadline=None)
@given(separated_case())
def test_ema_moves_codes_toward_the_mean_of_their_rows(case):
    z_e, codebook, idx = case
    used = np.unique(idx)
    means = np.stack([z_e[idx == k].mean(0) for k in used])  # (used, Dz)
    state = vq.ema_init(codebook)
    dists = []
    for decay in (0.99, 0.9, 0.5, 0.1, 0.0):
        new, _ = vq.ema_update(state, z_e, idx, decay=decay, eps=1e-12)
        dists.append(np.abs(new[used] - means).max())
    tol = 1e-9 * (1 + np.abs(means).max())  # the smoothing shifts codes by ~K eps |e|
    assert all(a >= b - tol for a, b in zip(dists, dists[1:]))  # closer as decay falls
    assert dists[-1] <= tol  # decay 0: the means themselves


def test_ema_converges_to_the_means_under_a_fixed_assignment():
    rng = np.random.default_rng(3)
    codebook = rng.standard_normal((4, 3))
    z_e = rng.standard_normal((40, 3))
    idx = vq.vq_assign(z_e, codebook)
    state = vq.ema_init(codebook)
    for _ in range(300):
        new, state = vq.ema_update(state, z_e, idx, decay=0.9, eps=1e-8)
    for k in np.unique(idx):
        np.testing.assert_allclose(new[k], z_e[idx == k].mean(0), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------
# Usage statistics and k-means initialisation


@given(st.integers(1, 12), st.integers(0, 12), st.integers(1, 1000))
def test_perplexity_of_uniform_usage_is_the_number_of_codes(k, unused, count):
    counts = np.concatenate([np.full(k, count), np.zeros(unused, dtype=np.int64)])
    assert np.isclose(vq.perplexity(counts), k, rtol=1e-12)


def test_perplexity_of_one_code_is_one():
    assert vq.perplexity(np.array([0, 7, 0, 0])) == 1.0


def test_code_counts():
    counts = vq.code_counts(np.array([2, 0, 2, 2]), 4)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, [1, 0, 3, 0])


def test_kmeans_init_recovers_clear_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    z_e = np.concatenate([c + 0.1 * rng.standard_normal((200, 2)) for c in centres])
    codebook = vq.kmeans_init(z_e, 3, np.random.default_rng(1))
    assert codebook.shape == (3, 2) and codebook.dtype == z_e.dtype
    nearest = vq.vq_assign(centres, codebook)  # the code recovered for each centre
    np.testing.assert_array_equal(np.sort(nearest), [0, 1, 2])  # one code per cluster
    found = codebook[nearest]
    np.testing.assert_allclose(found, centres, atol=0.05)


@settings(deadline=None)
@given(any_case(), seeds)
def test_kmeans_init_gives_k_finite_rows(case, seed):
    z_e, codebook = case
    k = codebook.shape[0]
    out = vq.kmeans_init(z_e, k, np.random.default_rng(seed), iters=3)
    assert out.shape == (k, z_e.shape[1]) and out.dtype == z_e.dtype
    assert np.all(np.isfinite(out))


def test_kmeans_init_squares_float32_rows_in_float64():
    # rows of order 1e20 are finite in float32 but their squares are not: the seeding's
    # probabilities were inf / inf = NaN ("Probabilities contain NaN")
    rows = (np.random.default_rng(0).standard_normal((50, 2)) * 1e20).astype(np.float32)
    seeds = vq.kmeans_init(rows, 4, np.random.default_rng(0), iters=0)
    assert seeds.dtype == np.float32
    np.testing.assert_array_equal(  # the same rows as the seeding of a float64 copy
        seeds, vq.kmeans_init(rows.astype(np.float64), 4, np.random.default_rng(0), iters=0))
    with np.errstate(over="ignore", invalid="ignore"):  # the Lloyd steps' float32 scores (VQ.1) overflow
        assert np.all(np.isfinite(vq.kmeans_init(rows, 4, np.random.default_rng(0))))
    jittered = vq.kmeans_init(rows[:3], 4, np.random.default_rng(0))  # fewer rows than codes
    assert np.all(np.isfinite(jittered)) and len(np.unique(jittered, axis=0)) == 4


def test_kmeans_init_with_fewer_rows_than_codes():
    z_e = np.array([[0.0, 1.0], [5.0, 5.0]])
    out = vq.kmeans_init(z_e, 6, np.random.default_rng(0))
    assert out.shape == (6, 2) and np.all(np.isfinite(out))
    assert len(np.unique(out, axis=0)) == 6  # jittered: no two codes coincide
    nearest = np.abs(out[:, None] - z_e[None]).max(-1).min(-1)
    assert np.all(nearest < 0.1)  # each code is a data row plus a small jitter


# ----------------------------------------------------------------------------------
# Bad input


def _ok():
    return np.zeros((4, 3)), np.ones((5, 3)), np.zeros(4, dtype=np.int64)


def _nan(a):
    a = a.copy()
    a[0, 0] = np.nan
    return a


z0, e0, i0 = _ok()
BAD = [
    ("z_e", lambda f: f(np.zeros(3), e0)),  # z_e not 2-D
    ("codebook", lambda f: f(z0, np.ones(3))),  # codebook not 2-D
    ("Dz", lambda f: f(z0, np.ones((5, 2)))),  # code sizes differ
    ("empty codebook", lambda f: f(z0, np.ones((0, 3)))),
    ("z_e must be finite", lambda f: f(_nan(z0), e0)),
    ("codebook must be finite", lambda f: f(z0, _nan(e0))),
    ("z_e and codebook must have the same dtype", lambda f: f(z0, e0.astype(np.float32))),
    ("z_e must have dtype", lambda f: f(z0.astype(np.int64), e0)),
]
WITH_IDX = {
    "vq_assign": lambda z, e: vq.vq_assign(z, e),
    "quantize_forward": lambda z, e: vq.quantize_forward(z, e),
    "codebook_loss_forward": lambda z, e: vq.codebook_loss_forward(z, e, np.zeros(len(z), int)),
    "commitment_loss_forward": lambda z, e: vq.commitment_loss_forward(
        z, e, np.zeros(len(z), int)),
}


@pytest.mark.parametrize("fn", list(WITH_IDX), ids=list(WITH_IDX))
@pytest.mark.parametrize("match,call", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_argument(fn, match, call):
    with pytest.raises(ValueError, match=match):
        call(WITH_IDX[fn])


@pytest.mark.parametrize("fn", ["vq_assign", "quantize_forward"])
def test_unknown_metric(fn):
    with pytest.raises(ValueError, match="metric"):
        getattr(vq, fn)(z0, e0, metric="cosine")


@pytest.mark.parametrize("fwd", [vq.codebook_loss_forward, vq.commitment_loss_forward])
@pytest.mark.parametrize(
    "idx, match",
    [
        (np.array([0, 1, 2, 5]), "idx must lie in"),  # K = 5: 5 is out of range
        (np.array([0, -1, 2, 3]), "idx must lie in"),
        (np.array([0, 1, 2]), "idx must have shape"),
        (np.zeros(4), "idx must have an integer dtype"),
    ],
)
def test_bad_idx(fwd, idx, match):
    with pytest.raises(ValueError, match=match):
        fwd(z0, e0, idx)


def test_negative_beta():
    with pytest.raises(ValueError, match="beta"):
        vq.commitment_loss_forward(z0, e0, i0, beta=-0.1)


def test_bad_upstream_gradients():
    _, cache = vq.quantize_forward(z0, e0)
    with pytest.raises(ValueError, match="dz_q"):
        vq.quantize_backward(np.zeros((3, 3)), cache)
    # rows of the wrong size were copied through as the gradient of z_e
    with pytest.raises(ValueError, match=r"dz_q must have shape \(4, 3\), got \(4, 7\)"):
        vq.quantize_backward(np.zeros((4, 7)), cache)
    assert vq.quantize_backward(np.zeros((4, 3), np.float32), cache).dtype == np.float64
    _, cache = vq.codebook_loss_forward(z0, e0, i0)
    with pytest.raises(ValueError, match="dloss"):
        vq.codebook_loss_backward(np.zeros(3), cache)
    _, cache = vq.commitment_loss_forward(z0, e0, i0)
    with pytest.raises(ValueError, match="dloss"):
        vq.commitment_loss_backward(np.zeros((4, 1)), cache)


def test_bad_helper_arguments():
    state = vq.ema_init(e0)
    with pytest.raises(ValueError, match="empty"):
        vq.ema_init(np.ones((0, 3)))
    with pytest.raises(ValueError, match="decay"):
        vq.ema_update(state, z0, i0, decay=1.5)
    with pytest.raises(ValueError, match="eps"):
        vq.ema_update(state, z0, i0, eps=-1.0)
    with pytest.raises(ValueError, match="idx"):
        vq.ema_update(state, z0, np.full(4, 7))
    with pytest.raises(ValueError, match="Dz"):
        vq.ema_update(state, np.zeros((4, 2)), i0)
    with pytest.raises(ValueError, match="idx"):
        vq.code_counts(np.array([0, 9]), 4)
    for bad in (0, 4.7, "4", True):  # a count of codes is never truncated or parsed
        with pytest.raises(ValueError, match=r"num_codes must be an integer >= 1"):
            vq.code_counts(np.array([0, 1]), bad)
    with pytest.raises(ValueError, match="counts"):
        vq.perplexity(np.zeros(3))
    with pytest.raises(ValueError, match="counts"):
        vq.perplexity(np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="rng"):
        vq.kmeans_init(z0, 2, rng=0)
    with pytest.raises(ValueError, match="z_e"):
        vq.kmeans_init(np.zeros((0, 3)), 2, np.random.default_rng(0))


def test_kmeans_init_refuses_sizes_that_are_not_integers():
    # they were truncated: num_codes 2.5 fitted 2 codes
    with pytest.raises(ValueError, match="num_codes must be an integer >= 1, got 2.5"):
        vq.kmeans_init(z0, 2.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="iters must be an integer >= 0, got 1.5"):
        vq.kmeans_init(z0, 2, np.random.default_rng(0), iters=1.5)
