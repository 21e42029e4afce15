"""Dynamic binarization of byte images in one pass, one uniform per non-zero byte
(docs/derivations.md, BIN.1): the twins, the dense and packed routes against the float
route, the distribution, and bad input."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from npvae import data as npdata
from npvae.backend import use_backend
from npvae.data import packed, rows
from npvae.data.packed import PackedImages
from npvae.train import _Batches

DTYPES = [np.float32, np.float64]
BACKENDS = ["numba", "numpy"]


def by_mask(x, idx, u):
    """BIN.1 written out with a mask: gather, scale, and give the j-th non-zero byte in
    reading order the j-th uniform."""
    p = np.take(x, idx, axis=0) / u.dtype.type(255)  # (B, D) in u's dtype
    out = np.zeros(p.shape, u.dtype)
    out[p != 0] = u < p[p != 0]
    return out


def both_twins(x, idx, u):
    """(numba, numpy) samples, each written over a batch of sevens."""
    scale = u.dtype.type(255)
    shape = (idx.shape[0], x.shape[1])
    a, b = np.full(shape, 7, u.dtype), np.full(shape, 7, u.dtype)
    m_a = rows._bernoulli_rows.numba(x, idx, u, scale, a)
    m_b = rows._bernoulli_rows.numpy(x, idx, u, scale, b)
    assert m_a == m_b == u.shape[0]
    return a, b


def uniforms_near_thresholds(rng, x, idx, dtype):
    """One uniform per non-zero byte, a third of them on or one step either side of
    their byte's threshold b / 255."""
    p = (np.take(x, idx, axis=0) / dtype(255))
    p = p[p != 0]  # (M,) in reading order
    u = rng.random(p.shape, dtype=dtype)
    on = rng.random(p.shape) < 0.3
    u[on] = np.nextafter(p, rng.choice([-1.0, 0.0, 2.0], size=p.shape)).astype(dtype)[on]
    return np.clip(u, 0, np.nextafter(dtype(1), dtype(0)))


@pytest.mark.parametrize("dtype", DTYPES)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 30), st.integers(0, 2**32 - 1))
def test_bernoulli_rows_twins_agree_with_the_mask_route(dtype, n, b, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, d), dtype=np.uint8)
    x[rng.random((n, d)) < 0.5] = 0  # zeros inside rows too, as inside a digit
    x[0, 0], x[-1, -1] = 0, 255
    idx = rng.integers(0, n, size=b)  # repeats allowed, as in any batch of indices
    u = uniforms_near_thresholds(rng, x, idx, dtype)
    assert rows.nonzero_in_rows(x, idx) == u.shape[0]
    with use_backend("numpy"):
        assert rows.nonzero_in_rows(x, idx) == u.shape[0]
    a, c = both_twins(x, idx, u)
    expected = by_mask(x, idx, u)
    # exact by construction: one IEEE division and one comparison per entry on every side
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
    u = np.repeat(specials, 255)  # every special value against every non-zero byte
    a, c = both_twins(x, idx, u)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, by_mask(x, idx, u))
    assert not a[:, 0].any()  # a zero byte takes no uniform and is 0
    assert not a[0].any() and not a[1].any()  # NaN and +inf are below no probability
    assert a[2, 1:].all()  # -inf is below every probability
    assert a[3, 1:].all()  # the smallest subnormal is below every p > 0


def test_bernoulli_rows_frequency_matches_the_grey_level():
    """Monte Carlo: each grey level b becomes 1 with frequency b / 255, and a zero byte
    is never 1."""
    levels = np.arange(256, dtype=np.uint8)
    x = np.tile(levels, (1, 4))  # (1, 1024): each level four times
    rng = np.random.default_rng(20261202)
    draws = 4000
    idx = np.zeros(draws, dtype=np.int64)
    u = rng.random(rows.nonzero_in_rows(x, idx), dtype=np.float32)
    out = rows.bernoulli_rows(x, idx, u, np.empty((draws, x.shape[1]), np.float32))
    freq = out.reshape(draws, 4, 256).mean(axis=(0, 1))  # 16,000 draws per level
    p = levels / 255.0
    se = np.sqrt(p * (1 - p) / 16000)
    assert freq[0] == 0 and freq[255] == 1  # exact: no draw for 0, u < 1 always
    assert np.all(np.abs(freq - p) <= 5 * se + 1e-12)  # five standard errors


def test_bernoulli_rows_pixels_are_independent():
    """Monte Carlo: neighbouring pixels, a pixel after a zero byte, and the same image twice
    in a batch are uncorrelated (each uniform is used once)."""
    x = np.array([[128, 128, 0, 128]], np.uint8)  # p = 128/255 each, and a zero between
    idx = np.zeros(2 * 20000, dtype=np.int64)  # 20,000 batches of the image twice
    rng = np.random.default_rng(20261203)
    u = rng.random(rows.nonzero_in_rows(x, idx), dtype=np.float64)
    out = rows.bernoulli_rows(x, idx, u, np.empty((idx.size, 4))).reshape(20000, 2, 4)
    bound = 5 / np.sqrt(20000)  # five standard errors of a correlation near 0
    for a, b in [(out[:, 0, 0], out[:, 0, 1]), (out[:, 0, 1], out[:, 0, 3]),
                 (out[:, 0, 3], out[:, 1, 0]), (out[:, 0, 0], out[:, 1, 0])]:
        assert abs(np.corrcoef(a, b)[0, 1]) < bound
    assert not out[:, :, 2].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["dense", "packed", "float"])
def test_the_training_loop_draws_the_sample_the_float_route_draws(form, dtype, backend):
    """_Batches with byte images (dense or packed) or with the images already scaled to
    floats, and dynamic binarization: the same batch, bit for bit, as scaling the bytes
    and calling binarize_dynamic with a generator in the same state, and the generator
    left in the same state. Batches with repeated images, a blank image, a short batch."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(50, 20), dtype=np.uint8)
    x[rng.random(x.shape) < 0.6] = 0
    x[:, :3] = 0  # a blank border, which the packed form trims off
    x[7] = 0  # a blank image
    images = {"dense": x, "packed": PackedImages.pack(x, width=5),
              "float": x / dtype(255)}[form]
    batches = _Batches(images, dtype, 16, "dynamic", seed=0)
    plans = [rng.permutation(50)[:16], np.array([7, 3, 3, 7, 3]), np.array([7] * 16),
             rng.integers(0, 50, size=16)]
    for idx in plans:
        seed = int(rng.integers(2**32))
        g_loop, g_float = np.random.default_rng(seed), np.random.default_rng(seed)
        with use_backend(backend):
            got = batches.fill(idx, g_loop).copy()
        scaled = np.take(x, idx, axis=0) / dtype(255)
        want = npdata.binarize_dynamic(scaled, g_float)
        np.testing.assert_array_equal(got, want)
        assert g_loop.bit_generator.state == g_float.bit_generator.state  # as many draws


@pytest.mark.parametrize("backend", BACKENDS)
@given(st.integers(1, 12), st.integers(1, 6), st.integers(1, 9), st.integers(1, 10),
       st.integers(0, 2**32 - 1))
def test_packed_sample_is_the_dense_sample(backend, n, h, w, b, seed):
    """PackedImages.bernoulli_rows, which samples the spans in place, gives what the dense
    route gives for the same images and uniforms (BIN.1, BIN.2)."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, h, w)) < rng.random()) * rng.integers(1, 256, (n, h, w))
    x = x.astype(np.uint8)  # zeros inside spans, blank rows
    x[0] = 0  # a blank image
    if n > 1:
        x[1] = rng.integers(1, 256, (h, w))  # every span a whole row
    x = x.reshape(n, h * w)
    p = PackedImages.pack(x, width=w)
    idx = rng.integers(0, n, size=b)
    u = uniforms_near_thresholds(rng, x, idx, np.float32)
    with use_backend(backend):
        assert p.nonzero_in_rows(idx) == rows.nonzero_in_rows(x, idx) == u.shape[0]
        got = p.bernoulli_rows(idx, u, np.full((b, h * w), 7, np.float32))
    np.testing.assert_array_equal(got, by_mask(x, idx, u))


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_sample_twins_on_special_uniforms(dtype):
    info = np.finfo(dtype)
    specials = np.array([np.nan, np.inf, -np.inf, info.smallest_subnormal, 0.0, 1.0], dtype)
    x = np.zeros((1, 2, 256), np.uint8)
    x[0, 1] = np.arange(256)  # a blank row, then every byte
    p = PackedImages.pack(x)
    idx = np.zeros(specials.size, dtype=np.int64)
    u = np.repeat(specials, 255)
    args = (p.start, p.length, p.offset, p.values, idx, p.width, u, dtype(255), True)
    a, c = np.full((6, 512), 7, dtype), np.full((6, 512), 7, dtype)
    assert packed._float_rows.numba(*args, a) == packed._float_rows.numpy(*args, c)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, by_mask(x.reshape(1, -1), idx, u))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["dense", "packed"])
@pytest.mark.parametrize("extra", [-1, 1])
def test_a_wrong_number_of_uniforms_is_refused(backend, form, extra):
    """One uniform too few or too many is an error, and the compiled loop reads none past
    the end of u: the uniform beyond it here is -1, which would make its pixel a 1."""
    x = np.zeros((3, 8), np.uint8)
    x[:, 2:6] = 200
    images = x if form == "dense" else PackedImages.pack(x, width=4)
    sampler = (lambda i, u, o: rows.bernoulli_rows(x, i, u, o)) if form == "dense" \
        else images.bernoulli_rows
    idx = np.array([0, 2])
    m = rows.nonzero_in_rows(x, idx)
    buf = np.ones(m + 2, np.float32)  # 1 is below no probability: every pixel 0
    buf[m + extra:] = -1.0
    out = np.zeros((2, 8), np.float32)
    with use_backend(backend), pytest.raises(ValueError, match=f"{m} non-zero bytes"):
        sampler(idx, buf[:m + extra], out)
    assert not out.any()


@pytest.mark.parametrize("change, message", [
    (dict(x=np.zeros((3, 4), np.float32)), "uint8"),
    (dict(out=np.zeros((2, 4), np.int32)), "float32 or float64"),
    (dict(out=np.zeros((2, 5), np.float32)), r"\(2, 4\)"),
    (dict(u=np.zeros((2, 2), np.float32)), r"\(M,\)"),
    (dict(u=np.zeros(4, np.float64)), "one float dtype"),
    (dict(idx=np.array([0, 3])), r"\[0, 3\)"),
    (dict(idx=np.array([-1, 0])), r"\[0, 3\)"),
    (dict(idx=np.array([0.0, 1.0])), "integer array"),
    (dict(u=[0.0] * 4), "numpy arrays"),
])
def test_bernoulli_rows_rejects(change, message):
    args = dict(x=np.ones((3, 4), np.uint8), idx=np.array([0, 2]),
                u=np.zeros(8, np.float32), out=np.zeros((2, 4), np.float32))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        rows.bernoulli_rows(**args)


@pytest.mark.parametrize("form", ["dense", "packed"])
def test_bernoulli_rows_refuses_a_read_only_out(form):
    x = np.ones((3, 4), np.uint8)
    out = np.zeros((2, 4), np.float32)
    out.flags.writeable = False
    sampler = (lambda i, u, o: rows.bernoulli_rows(x, i, u, o)) if form == "dense" \
        else PackedImages.pack(x, width=2).bernoulli_rows
    with pytest.raises(ValueError, match="writeable"):
        sampler(np.array([0, 1]), np.zeros(8, np.float32), out)


def test_packed_bernoulli_rows_refuses_a_strided_out():
    """The packed loop writes the batch as one flat array; the dense one takes any out."""
    p = PackedImages.pack(np.ones((3, 4), np.uint8), width=2)
    with pytest.raises(ValueError, match="C-contiguous"):
        p.bernoulli_rows(np.array([0, 1]), np.zeros(8, np.float32),
                         np.zeros((2, 8), np.float32)[:, ::2])


@pytest.mark.parametrize("form", ["dense", "packed"])
def test_big_endian_indices_give_the_sample_native_ones_give(form):
    rng = np.random.default_rng(12)
    x = rng.integers(0, 256, size=(6, 8), dtype=np.uint8)
    images = x if form == "dense" else PackedImages.pack(x, width=4)
    count = (lambda i: rows.nonzero_in_rows(x, i)) if form == "dense" else images.nonzero_in_rows
    sampler = (lambda i, u, o: rows.bernoulli_rows(x, i, u, o)) if form == "dense" \
        else images.bernoulli_rows
    idx = np.array([5, 0, 5, 2])
    u = rng.random(count(idx), dtype=np.float32)
    big = idx.astype(">i8")
    assert count(big) == u.size
    want = sampler(idx, u, np.zeros((4, 8), np.float32))
    np.testing.assert_array_equal(sampler(big, u, np.zeros((4, 8), np.float32)), want)


@pytest.mark.parametrize("form", ["dense", "packed"])
def test_bernoulli_rows_refuses_an_out_that_overlaps_u(form):
    x = np.ones((3, 4), np.uint8)
    buf = np.zeros(16, np.float32)
    u, out = buf[:8], buf[4:12].reshape(2, 4)
    sampler = (lambda i, u, o: rows.bernoulli_rows(x, i, u, o)) if form == "dense" \
        else PackedImages.pack(x, width=2).bernoulli_rows
    with pytest.raises(ValueError, match="overlap"):
        sampler(np.array([0, 1]), u, out)
    got = sampler(np.array([0, 1]), buf[:8], buf[8:].reshape(2, 4))  # side by side: fine
    assert got.shape == (2, 4)


def test_bernoulli_rows_reads_strided_images_and_writes_a_strided_out():
    """Images that are a strided view (every other row) give the rows of that view; a
    strided out (every other column) receives the sample."""
    rng = np.random.default_rng(4)
    full = rng.integers(0, 256, size=(10, 6), dtype=np.uint8)
    x, idx = full[::2], np.array([4, 0, 2])
    u = rng.random(rows.nonzero_in_rows(x, idx), dtype=np.float32)
    out = np.zeros((3, 12), np.float32)[:, ::2]
    got = rows.bernoulli_rows(x, idx, u, out)
    np.testing.assert_array_equal(got, by_mask(np.ascontiguousarray(x), idx, u))


@pytest.mark.parametrize("form", ["dense", "packed"])
def test_bernoulli_rows_with_an_empty_batch(form):
    x = np.arange(12, dtype=np.uint8).reshape(3, 4)
    images = x if form == "dense" else PackedImages.pack(x, width=2)
    idx = np.zeros(0, np.int64)
    sampler = (lambda i, u, o: rows.bernoulli_rows(x, i, u, o)) if form == "dense" \
        else images.bernoulli_rows
    out = sampler(idx, np.zeros(0, np.float32), np.zeros((0, 4), np.float32))
    assert out.shape == (0, 4)
