"""Dynamic binarization of byte images in one pass (docs/derivations.md, BIN.1)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from npvae import data as npdata
from npvae.backend import use_backend
from npvae.data import rows
from npvae.train import _Batches

DTYPES = [np.float32, np.float64]


def three_steps(x, idx, u):
    """The route the one pass replaces: gather the rows, scale them, compare."""
    p = np.take(x, idx, axis=0) / u.dtype.type(255)  # (B, D) in u's dtype
    return (u < p).astype(u.dtype)


def both_twins(x, idx, u):
    scale = u.dtype.type(255)
    a = rows._bernoulli_rows.numba(x, idx, u, scale, np.full_like(u, 7))
    b = rows._bernoulli_rows.numpy(x, idx, u, scale, np.full_like(u, 7))
    return a, b


@pytest.mark.parametrize("dtype", DTYPES)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 30), st.integers(0, 2**32 - 1))
def test_bernoulli_rows_twins_agree_with_the_three_step_route(dtype, n, b, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, d), dtype=np.uint8)
    x[0, 0], x[-1, -1] = 0, 255
    idx = rng.integers(0, n, size=b)  # repeats allowed, as in any batch of indices
    u = rng.random((b, d), dtype=dtype)
    # put some uniforms exactly on, and one step either side of, their pixel's threshold
    p = np.take(x, idx, axis=0) / dtype(255)
    on = rng.random((b, d)) < 0.3
    u[on] = np.nextafter(p, rng.choice([-1.0, 0.0, 2.0], size=p.shape)).astype(dtype)[on]
    u = np.clip(u, 0, np.nextafter(dtype(1), dtype(0)))
    a, c = both_twins(x, idx, u)
    expected = three_steps(x, idx, u)
    # exact by construction: one IEEE division and one comparison per entry on both sides
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(c, expected)
    assert a.dtype == c.dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bernoulli_rows_twins_on_special_uniforms(dtype):
    info = np.finfo(dtype)
    specials = np.array([np.nan, np.inf, -np.inf, info.smallest_subnormal,
                         -info.smallest_subnormal, 0.0, -0.0, 1.0, 0.5], dtype)
    x = np.arange(256, dtype=np.uint8).reshape(1, 256)
    idx = np.zeros(specials.size, dtype=np.int64)
    u = np.repeat(specials[:, None], 256, axis=1)  # every special value against every byte
    a, c = both_twins(x, idx, u)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, three_steps(x, idx, u))
    assert not a[0].any() and not a[1].any()  # NaN and +inf are below no probability
    assert a[2].all()  # -inf is below every probability, 0 included
    assert a[3, 1:].all() and not a[3, 0]  # the smallest subnormal is below every p > 0


def test_bernoulli_rows_frequency_matches_the_grey_level():
    """Monte Carlo: each grey level b becomes 1 with frequency b / 255."""
    levels = np.arange(256, dtype=np.uint8)
    x = np.tile(levels, (1, 4))  # (1, 1024): each level four times
    rng = np.random.default_rng(20261202)
    draws = 4000
    idx = np.zeros(draws, dtype=np.int64)
    u = rng.random((draws, x.shape[1]), dtype=np.float32)
    out = rows.bernoulli_rows(x, idx, u, np.empty_like(u))
    freq = out.reshape(draws, 4, 256).mean(axis=(0, 1))  # 16,000 draws per level
    p = levels / 255.0
    se = np.sqrt(p * (1 - p) / 16000)
    assert freq[0] == 0 and freq[255] == 1  # exact: u < 0 never, u < 1 always
    assert np.all(np.abs(freq - p) <= 5 * se + 1e-12)  # five standard errors


def test_the_training_loop_draws_the_sample_the_float_route_draws():
    """_Batches with byte images and dynamic binarization: the same batch, bit for bit, as
    scaling the bytes and calling binarize_dynamic with a generator in the same state."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(50, 20), dtype=np.uint8)
    batches = _Batches(x, np.float32, 16, "dynamic", seed=0)
    idx = rng.permutation(50)[:16]
    got = batches.fill(idx, np.random.default_rng(11)).copy()
    scaled = np.take(x, idx, axis=0) / np.float32(255)
    want = npdata.binarize_dynamic(scaled, np.random.default_rng(11))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("change, message", [
    (dict(x=np.zeros((3, 4), np.float32)), "uint8"),
    (dict(out=np.zeros((2, 4), np.int32)), "float32 or float64"),
    (dict(u=np.zeros((2, 5), np.float32)), r"\(2, 4\)"),
    (dict(u=np.zeros((2, 4), np.float64)), "one float dtype"),
    (dict(idx=np.array([0, 3])), r"\[0, 3\)"),
    (dict(idx=np.array([-1, 0])), r"\[0, 3\)"),
    (dict(idx=np.array([0.0, 1.0])), "integer array"),
    (dict(u=[[0.0] * 4] * 2), "numpy arrays"),
])
def test_bernoulli_rows_rejects(change, message):
    args = dict(x=np.zeros((3, 4), np.uint8), idx=np.array([0, 2]),
                u=np.zeros((2, 4), np.float32), out=np.zeros((2, 4), np.float32))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        rows.bernoulli_rows(**args)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_bernoulli_rows_may_write_over_its_uniforms(backend):
    """out=u gives the sample a separate out gives, in both twins; the compiled loop once
    overwrote each uniform with its byte before comparing, and returned all zeros."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(7, 30), dtype=np.uint8)
    idx = np.array([3, 0, 6, 3])
    u = rng.random((4, 30), dtype=np.float32)
    want = three_steps(x, idx, u)
    with use_backend(backend):
        got = rows.bernoulli_rows(x, idx, u, u)
    assert got is u and want.any()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_bernoulli_rows_refuses_an_out_that_partly_overlaps_u(backend):
    buf = np.zeros((5, 4), np.float32)
    u, out = buf[:4], buf[1:]  # row r of out is row r + 1 of u
    x = np.zeros((3, 4), np.uint8)
    with use_backend(backend), pytest.raises(ValueError, match="u itself or not overlap"):
        rows.bernoulli_rows(x, np.array([0, 1, 2, 0]), u, out)
    halves = np.zeros((4, 8), np.float32)  # side by side in one buffer: no overlap
    got = rows.bernoulli_rows(x, np.array([0, 1, 2, 0]), halves[:, :4], halves[:, 4:])
    assert got.shape == (4, 4)


def test_bernoulli_rows_reads_strided_images():
    """Images that are a strided view (every other row) give the rows of that view."""
    rng = np.random.default_rng(4)
    full = rng.integers(0, 256, size=(10, 6), dtype=np.uint8)
    x, idx = full[::2], np.array([4, 0, 2])
    u = rng.random((3, 6), dtype=np.float32)
    got = rows.bernoulli_rows(x, idx, u, np.empty_like(u))
    np.testing.assert_array_equal(got, three_steps(np.ascontiguousarray(x), idx, u))


def test_bernoulli_rows_with_an_empty_batch():
    x = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = rows.bernoulli_rows(x, np.zeros(0, np.int64), np.zeros((0, 4), np.float32),
                              np.zeros((0, 4), np.float32))
    assert out.shape == (0, 4)
