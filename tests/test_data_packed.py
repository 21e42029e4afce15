"""Byte images packed as trimmed row spans (docs/derivations.md, BIN.2): the round trip,
the two expanding twins, and training on packed images against training on the bytes.

The twins copy bytes and write zeros: no float passes through them, so they have no NaN,
inf or subnormal input to be tested on; their edge cases are blank images and rows, rows
with no zero, and single pixels at the edges (:func:`awkward`)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from npvae import cli_common, data
from npvae.backend import use_backend
from npvae.data import packed
from npvae.data.packed import PackedImages
from npvae.models import BernoulliVAE
from npvae.train import fingerprint, train

BACKENDS = ["numba", "numpy"]


def digits(rng, n, h=28, w=28, margin=4):
    """Images like MNIST's: grey strokes inside a blank margin, some rows blank."""
    x = np.zeros((n, h, w), np.uint8)
    inner = (rng.random((n, h - 2 * margin, w - 2 * margin)) < 0.3)
    x[:, margin:h - margin, margin:w - margin] = inner * rng.integers(1, 256, inner.shape)
    return x


def awkward(rng, n, h, w):
    """Random images with the cases spans must get right: blank images and rows, full
    rows (no zero at either end), single pixels at either edge, zeros inside a span."""
    x = (rng.random((n, h, w)) < rng.random()) * rng.integers(0, 256, (n, h, w))
    x = x.astype(np.uint8)
    x[0] = 0  # a blank image
    if n > 1:
        x[1] = rng.integers(1, 256, (h, w))  # no zero anywhere: every span is a whole row
    if n > 2:
        x[2] = 0
        x[2, 0, 0], x[2, -1, -1] = 255, 1  # one pixel in each corner
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@given(st.integers(1, 12), st.integers(1, 6), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_unpack_of_pack_gives_the_images_back(backend, n, h, w, seed):
    x = awkward(np.random.default_rng(seed), n, h, w)
    with use_backend(backend):
        p = PackedImages.pack(x)
    assert p.shape == (n, h * w) and len(p) == n and p.dtype == np.uint8
    # exact by construction: bytes are copied, never computed
    with use_backend(backend):
        np.testing.assert_array_equal(p.unpack(), x.reshape(n, -1))
        flat = PackedImages.pack(x.reshape(n, -1), width=w)  # (N, D) with the row width given
        np.testing.assert_array_equal(flat.unpack(), x.reshape(n, -1))
    # the spans are the tightest: a kept row begins and ends with a non-zero byte
    rows = x.reshape(n, h, w)
    for i, k in zip(*np.nonzero(p.length)):
        s, m = int(p.start[i, k]), int(p.length[i, k])
        assert rows[i, k, s] != 0 and rows[i, k, s + m - 1] != 0
        assert not rows[i, k, :s].any() and not rows[i, k, s + m:].any()
    assert not rows[p.length == 0].any() and not p.start[p.length == 0].any()


@pytest.mark.parametrize("backend", BACKENDS)
@given(st.integers(1, 12), st.integers(1, 6), st.integers(1, 9), st.integers(0, 12),
       st.integers(0, 2**32 - 1))
def test_rows_twins_give_the_rows_of_the_dense_images(backend, n, h, w, b, seed):
    rng = np.random.default_rng(seed)
    x = awkward(rng, n, h, w).reshape(n, -1)
    p = PackedImages.pack(x, width=w)
    idx = rng.integers(0, n, size=b)  # repeats allowed, as in any batch of indices
    out = np.full((b, h * w), 7, np.uint8)  # stale bytes: every one must be written
    with use_backend(backend):
        got = p.rows(idx, out=out)
    assert got is out
    np.testing.assert_array_equal(got, x[idx])


def test_rows_twins_agree_on_mnist_like_digits():
    rng = np.random.default_rng(9)
    x = digits(rng, 200).reshape(200, -1)
    p = PackedImages.pack(x, width=28)
    idx = rng.permutation(200)[:64]
    args = (p.start, p.length, p.offset, p.values, idx, 28)
    a = packed._unpack_rows.numba(*args, np.full((64, 784), 3, np.uint8))
    c = packed._unpack_rows.numpy(*args, np.full((64, 784), 5, np.uint8))
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, x[idx])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(st.integers(1, 12), st.integers(1, 6), st.integers(1, 9), st.integers(0, 12),
       st.integers(0, 2**32 - 1))
def test_scaled_rows_are_the_rows_divided(backend, dtype, n, h, w, b, seed):
    """The floats a batch of packed images becomes without expanding its bytes: each the
    IEEE quotient byte / scale in out's dtype, so exactly what dividing the bytes gives."""
    rng = np.random.default_rng(seed)
    x = awkward(rng, n, h, w).reshape(n, -1)
    p = PackedImages.pack(x, width=w)
    idx = rng.integers(0, n, size=b)
    for scale in (255, 1):
        out = np.full((b, h * w), np.nan, dtype)  # stale values: every one must be written
        with use_backend(backend):
            got = p.scaled_rows(idx, out, scale)
        assert got is out
        np.testing.assert_array_equal(got, np.divide(x[idx], dtype(scale), dtype=dtype))


@pytest.mark.parametrize("out, message", [
    (np.zeros((2, 16), np.uint8), "float32 or float64"),
    (np.zeros((2, 15), np.float32), r"\(2, 16\)"),
    (np.zeros((16, 2), np.float32).T, "C-contiguous"),
])
def test_scaled_rows_rejects(out, message):
    p = PackedImages.pack(np.ones((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=message):
        p.scaled_rows(np.array([0, 1]), out)


@pytest.mark.parametrize("scale", [0, -255, np.inf, np.nan, True, "255", 1e-46, 1e39, 10**400])
def test_scaled_rows_rejects_a_scale_that_is_not_a_positive_number(scale):
    """Checked in out's dtype, where the division is made: 1e-46 is 0 in float32 and 1e39
    is inf, and each gave infinities or NaN."""
    p = PackedImages.pack(np.ones((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="scale must be a positive number"):
        p.scaled_rows(np.array([0, 1]), np.zeros((2, 16), np.float32), scale)
    if scale in (1e-46, 1e39):  # both fine in float64
        p.scaled_rows(np.array([0, 1]), np.zeros((2, 16), np.float64), scale)


def test_the_constructor_refuses_spans_the_loops_would_overrun():
    """Built by hand, inconsistent arrays once made the compiled loops write past the
    batch (the NumPy twins raised IndexError); each is now refused up front."""
    good = PackedImages.pack(np.arange(1, 33, dtype=np.uint8).reshape(2, 4, 4))
    parts = dict(start=good.start, length=good.length, offset=good.offset,
                 values=good.values, width=good.width)
    PackedImages(**parts)  # the arrays pack made are accepted
    long_span = good.length.copy()
    long_span[0, 0] = 5  # 5 bytes in a row of 4
    bad = [
        (dict(length=long_span), "inside its row"),
        (dict(offset=good.offset + 1), "offset must count"),
        (dict(offset=good.offset[:-1]), r"offset must be int64 \(3,\)"),
        (dict(values=good.values[:-1]), "offset must count"),
        (dict(values=good.values.astype(np.int16)), "values uint8"),
        (dict(start=good.start.astype(np.int64)), "unsigned"),
        (dict(start=good.start[:1]), "unsigned"),
        (dict(start=np.asfortranarray(np.tile(good.start, (1, 2)))[:, ::2]), "C-contiguous"),
        (dict(width=0), "width"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            PackedImages(**{**parts, **change})


def test_images_with_blank_margins_take_fewer_bytes():
    """Digits in a 4-pixel blank margin keep at most 20 of 28 pixels a row, and the spans
    cost 2 bytes a row: under 0.8 of the dense bytes. Images with no blank pixel cost more."""
    rng = np.random.default_rng(2)
    x = digits(rng, 500)
    p = PackedImages.pack(x)
    assert p.nbytes < 0.8 * x.nbytes
    full = PackedImages.pack(np.full((10, 28, 28), 9, np.uint8))
    assert full.nbytes == 10 * (784 + 2 * 28) + 8 * 11  # every byte, spans and offsets


def test_long_rows_use_wider_spans():
    """Rows longer than 255 pixels need 2-byte starts and lengths."""
    rng = np.random.default_rng(3)
    x = awkward(rng, 4, 2, 300)
    p = PackedImages.pack(x)
    assert p.start.dtype == p.length.dtype == np.uint16
    np.testing.assert_array_equal(p.unpack(), x.reshape(4, -1))
    np.testing.assert_array_equal(p.rows(np.array([3, 1])), x.reshape(4, -1)[[3, 1]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [255, 256])
def test_rows_as_long_as_a_span_type_holds(backend, width):
    """A full row of 255 pixels fits uint8 spans; one of 256 needs uint16 (a length of 256
    in a uint8 would wrap to 0 and lose the row)."""
    x = np.zeros((3, 2, width), np.uint8)
    x[0] = 200  # every pixel kept
    x[1, 0, -1] = 5  # only the last pixel of a row
    x[2, 1, 0] = 9  # only the first
    p = PackedImages.pack(x)
    assert p.length.max() == width
    with use_backend(backend):
        np.testing.assert_array_equal(p.unpack(), x.reshape(3, -1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint16, np.uint64, ">i8"])
def test_rows_takes_any_integer_index(backend, dtype):
    rng = np.random.default_rng(8)
    x = digits(rng, 20, h=6, w=6, margin=1).reshape(20, -1)
    p = PackedImages.pack(x, width=6)
    idx = np.array([19, 0, 7, 7], dtype=dtype)
    with use_backend(backend):
        np.testing.assert_array_equal(p.rows(idx), x[idx.astype(np.int64)])
    np.testing.assert_array_equal(np.asarray(p), x)  # np.asarray gives the dense bytes


def test_no_images():
    p = PackedImages.pack(np.zeros((0, 4, 4), np.uint8))
    assert p.shape == (0, 16) and p.unpack().shape == (0, 16)
    assert p.rows(np.zeros(0, np.int64)).shape == (0, 16)


@pytest.mark.parametrize("images, width, message", [
    (np.zeros((3, 16), np.float32), 4, "uint8"),
    (np.zeros(16, np.uint8), 4, "uint8 array"),
    (np.zeros((3, 16), np.uint8), None, "width"),
    (np.zeros((3, 16), np.uint8), 5, "dividing D = 16"),
    (np.zeros((3, 16), np.uint8), 0, "dividing"),
    (np.zeros((3, 16), np.uint8), 4.0, "whole number"),
    (np.zeros((3, 4, 4), np.uint8), 2, "does not match"),
    ([[0, 1]], 2, "list"),
])
def test_pack_rejects(images, width, message):
    with pytest.raises(ValueError, match=message):
        PackedImages.pack(images, width=width)


@pytest.mark.parametrize("rows", [0, -1, 2.0, True])
def test_pack_rejects_a_block_size_that_is_not_a_count(rows):
    with pytest.raises(ValueError, match="rows"):  # rows=-1 once packed no image at all
        PackedImages.pack(np.ones((5, 4, 4), np.uint8), rows=rows)


@pytest.mark.parametrize("block, width, message", [
    (np.full((2, 16), 0.6, np.float32), 4, "uint8"),  # once kept as floats, read back as 0
    (np.full((2, 16), 300, np.int16), 4, "uint8"),  # once wrapped to 44
    (np.zeros((2, 15), np.uint8), 4, r"\(b, 16\)"),
    (np.zeros(16, np.uint8), 4, r"\(b, 16\)"),
    (np.zeros((2, 16), np.uint8), 5, "dividing D = 16"),
])
def test_from_blocks_rejects(block, width, message):
    with pytest.raises(ValueError, match=message):
        PackedImages.from_blocks([block], 16, width)


@pytest.mark.parametrize("idx, out, message", [
    (np.array([0, 3]), None, r"\[0, 3\)"),
    (np.array([-1]), None, r"\[0, 3\)"),
    (np.array([0.0]), None, "integer array"),
    ([0, 1], None, "integer array"),
    (np.array([0, 1]), np.zeros((2, 15), np.uint8), r"\(2, 16\)"),
    (np.array([0, 1]), np.zeros((2, 16), np.float32), "uint8"),
    (np.array([0, 1]), np.zeros((16, 2), np.uint8).T, "C-contiguous"),
    (np.array([0, 1]), np.zeros((2, 16), np.uint8).copy().view(), "writeable"),
])
def test_rows_rejects(idx, out, message):
    if out is not None and message == "writeable":
        out.flags.writeable = False
    p = PackedImages.pack(np.ones((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=message):
        p.rows(idx, out=out)


@pytest.mark.parametrize("binarize", ["none", "dynamic", "static"])
def test_training_on_packed_images_is_the_run_on_their_bytes(tmp_path, binarize):
    """The same parameters bit for bit after two epochs (the last batch short): packing
    changes where the bytes are kept, not one draw of the run's stream."""
    rng = np.random.default_rng(4)
    x = digits(rng, 150, h=8, w=8, margin=1).reshape(150, -1)
    x_val = rng.random((20, 64)).astype(np.float32)
    params = []
    for i, images in enumerate((x, PackedImages.pack(x, width=8))):
        model = BernoulliVAE(data_dim=64, hidden=[16], latent=2, dtype=np.float32, rng=1)
        start = {k: v.copy() for k, v in model.params.items()}
        train(model, images, x_val, epochs=2, batch_size=32, binarize=binarize,
              run_dir=tmp_path / str(i), progress=False, verbose=False)
        params.append(model.params)
    dense, packed_run = params
    assert any(not np.array_equal(dense[k], start[k]) for k in dense)  # it trained
    for k in dense:
        np.testing.assert_array_equal(packed_run[k], dense[k], err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_static_sample_of_packed_images_is_packed_bytes(dtype):
    """Static binarization draws one 0/1 sample up front; of packed images it is packed
    again as bytes (it once kept the model's floats: 3 to 6 times the memory), the same
    sample as the dense route's."""
    from npvae.train import _Batches

    rng = np.random.default_rng(10)
    x = digits(rng, 300, h=8, w=8, margin=1).reshape(300, -1)
    p = PackedImages.pack(x, width=8)
    packed_batches = _Batches(p, dtype, 32, "static", seed=3)
    dense_batches = _Batches(x, dtype, 32, "static", seed=3)
    sample = packed_batches.x
    assert isinstance(sample, PackedImages) and sample.values.dtype == np.uint8
    assert sample.nbytes <= p.nbytes
    np.testing.assert_array_equal(sample.unpack(), dense_batches.x)
    assert set(np.unique(dense_batches.x)) <= {0, 1}


def test_packed_images_are_refused_as_validation_images(tmp_path):
    x = np.zeros((10, 16), np.uint8)
    model = BernoulliVAE(data_dim=16, hidden=[4], latent=2, dtype=np.float32, rng=1)
    with pytest.raises(ValueError, match=r"x_val.unpack\(\)"):
        train(model, x, PackedImages.pack(x, width=4), epochs=1, run_dir=tmp_path,
              progress=False, verbose=False)


def test_fingerprint_is_that_of_the_bytes():
    """A run may resume from either form of the same images, and not from other images."""
    rng = np.random.default_rng(5)
    x = digits(rng, 5000, h=8, w=8, margin=1).reshape(5000, -1)  # more than one block
    assert fingerprint(PackedImages.pack(x, width=8)) == fingerprint(x)
    y = x.copy()
    y[4500, 10] ^= 1
    assert fingerprint(PackedImages.pack(y, width=8)) != fingerprint(x)


def test_the_command_lines_training_images_are_packed(monkeypatch):
    """`npvae train` keeps its training images packed: the same images as the dense route."""
    rng = np.random.default_rng(6)
    images = digits(rng, 400)
    monkeypatch.setattr(data, "load", lambda *a, **k: (images, np.zeros(400, np.uint8)))
    settings = dict(dataset="mnist", data_dir=None, val=50, limit=0, dtype="float32")
    x_tr, x_va = cli_common.load_training_data(settings)
    p_tr, p_va = cli_common.load_training_data(settings, packed=True)
    assert isinstance(p_tr, PackedImages) and p_tr.nbytes < 0.8 * x_tr.nbytes
    np.testing.assert_array_equal(p_tr.unpack(), x_tr)
    np.testing.assert_array_equal(p_va, x_va)


def test_npvae_train_trains_on_packed_images(monkeypatch, tmp_path):
    from npvae import cli, train as train_module

    rng = np.random.default_rng(7)
    monkeypatch.setattr(data, "load", lambda dataset="mnist", split="train", **k: (
        digits(rng, 300 if split == "train" else 60), np.zeros(300 if split == "train" else 60,
                                                               np.uint8)))
    seen = []
    real_train = train_module.train

    def spy(model, x_train, *args, **kwargs):
        seen.append(type(x_train))
        return real_train(model, x_train, *args, **kwargs)

    monkeypatch.setattr(train_module, "train", spy)
    assert cli.main(["train", "--hidden", "16", "--batch-size", "32", "--limit", "120",
                     "--no-progress", "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    assert seen == [PackedImages]


def test_packing_does_not_load_numba():
    """The dense images are freed once packed; Numba's compiler (about 110 MiB) must load
    after that, not while both are in memory (configuration A's peak on M2 was 213 MiB
    that way, 182 MiB this way)."""
    import os
    import subprocess
    import sys

    code = ("import sys, numpy as np; from npvae.data import PackedImages; "
            "x = np.zeros((40, 28, 28), np.uint8); x[:, 5:20, 6:9] = 7; "
            "p = PackedImages.pack(x); print('numba' in sys.modules); "
            "assert (p.unpack() == x.reshape(40, -1)).all(); print('numba' in sys.modules)")
    env = dict(os.environ, NPVAE_BACKEND="numba")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]  # packed without it; expanded with it
