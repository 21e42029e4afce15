"""Tests for npvae.plots: real PNGs on disk, exact tile placement, PCA, latent grids."""
from __future__ import annotations

import os
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import matplotlib.image as mpimg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from npvae import plots  # noqa: E402
from npvae.plots import curves  # noqa: E402
from npvae.ops.vq import perplexity  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ helpers


def assert_real_png(path, expected: Path | None = None) -> np.ndarray:
    """The file is a readable, non-uniform PNG, and no temporary files are left."""
    path = Path(path)
    if expected is not None:
        assert path == expected
    assert path.is_file()
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    rgb = pixels[..., :3]
    assert float(rgb.std()) > 0.01, "image is blank"
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 2
    assert_no_temp_files(path.parent)
    return pixels


def assert_no_temp_files(directory: Path) -> None:
    leftovers = [p.name for p in directory.iterdir() if not p.name.endswith(".png")]
    assert leftovers == []


def blobs(n: int, shape=(28, 28), seed: int = 0) -> np.ndarray:
    """``n`` images with a random bright square each, values in [0, 1]."""
    rng = np.random.default_rng(seed)
    h, w = shape
    out = np.zeros((n, h, w))
    for i in range(n):
        r, c = rng.integers(0, h - 6), rng.integers(0, w - 6)
        out[i, r:r + 6, c:c + 6] = rng.uniform(0.5, 1.0)
    return out


def tile(grid, i, ncols, shape, pad):
    h, w = shape
    r, c = divmod(i, ncols)
    top, left = pad + r * (h + pad), pad + c * (w + pad)
    return grid[top:top + h, left:left + w]


def recording_decoder(shape=(28, 28)):
    calls = []

    def decode(z):
        calls.append(np.array(z, copy=True))
        z = np.asarray(z)
        # an image whose brightness depends on the code, so figures are not blank
        level = 1.0 / (1.0 + np.exp(-z.sum(axis=1)))
        out = np.zeros((z.shape[0], shape[0] * shape[1]))
        out[:, : out.shape[1] // 2] = level[:, None]
        return out

    return decode, calls


# ------------------------------------------------------------------------ image_grid


def test_image_grid_places_each_image_at_its_tile():
    shape, pad, ncols, n = (4, 5), 2, 3, 7  # non-square images catch transposes
    rng = np.random.default_rng(3)
    images = rng.uniform(0.0, 1.0, size=(n,) + shape)
    grid = plots.image_grid(images.reshape(n, -1), ncols, image_shape=shape, pad=pad)

    nrows = 3
    assert grid.shape == (nrows * (shape[0] + pad) + pad, ncols * (shape[1] + pad) + pad)
    covered = np.zeros(grid.shape, dtype=bool)
    for i in range(n):
        np.testing.assert_array_equal(tile(grid, i, ncols, shape, pad), images[i])
        r, c = divmod(i, ncols)
        top, left = pad + r * (shape[0] + pad), pad + c * (shape[1] + pad)
        covered[top:top + shape[0], left:left + shape[1]] = True
    # borders and the two unused tiles hold the pad value
    assert np.all(grid[~covered] == plots.PAD_VALUE)
    np.testing.assert_array_equal(tile(grid, 8, ncols, shape, pad), plots.PAD_VALUE)


def test_image_grid_single_pixel_markers_land_exactly():
    shape, ncols, pad = (28, 28), 4, 1
    images = np.zeros((6,) + shape)
    for i in range(6):
        images[i, i, 2 * i + 1] = 1.0  # one lit pixel at (row i, col 2i+1)
    grid = plots.image_grid(images, ncols, pad=pad, pad_value=0.0)
    lit = np.argwhere(grid == 1.0)
    expected = []
    for i in range(6):
        r, c = divmod(i, ncols)
        expected.append((pad + r * 29 + i, pad + c * 29 + 2 * i + 1))
    assert sorted(map(tuple, lit)) == sorted(expected)


def test_image_grid_flat_and_square_inputs_agree_and_pad_zero():
    images = blobs(5)
    a = plots.image_grid(images, 5, pad=0)
    b = plots.image_grid(images.reshape(5, 784), 5, pad=0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (28, 140)
    np.testing.assert_array_equal(a[:, 56:84], images[2])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(images=np.zeros((3, 10)), ncols=2), "images"),
        (dict(images=np.zeros((3, 28, 27)), ncols=2), "images"),
        (dict(images=np.zeros(784), ncols=2), "images"),
        (dict(images=np.zeros((0, 784)), ncols=2), "images"),
        (dict(images=np.full((2, 784), 1.5), ncols=2), "images"),
        (dict(images=np.full((2, 784), np.nan), ncols=2), "images"),
        (dict(images=np.zeros((2, 784)), ncols=0), "ncols"),
        (dict(images=np.zeros((2, 784)), ncols=2.0), "ncols"),
        (dict(images=np.zeros((2, 784)), ncols=2, pad=-1), "pad"),
        (dict(images=np.zeros((2, 784)), ncols=2, image_shape=(28,)), "image_shape"),
        (dict(images=np.zeros((2, 784)), ncols=2, image_shape=(0, 784)), "image_shape"),
    ],
)
def test_image_grid_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        plots.image_grid(**kwargs)


# ----------------------------------------------------------------- reconstructions


def test_reconstruction_grid_puts_each_reconstruction_below_its_original():
    n, ncols, pad = 13, 5, 1
    orig = blobs(n, seed=1)
    recon = blobs(n, seed=2)
    grid = plots.reconstruction_grid(orig, recon, ncols=ncols, pad=pad)
    blocks = 3
    assert grid.shape == (2 * blocks * 29 + 1, ncols * 29 + 1)
    for i in range(n):
        b, c = divmod(i, ncols)
        np.testing.assert_array_equal(tile(grid, 2 * b * ncols + c, ncols, (28, 28), pad), orig[i])
        np.testing.assert_array_equal(tile(grid, (2 * b + 1) * ncols + c, ncols, (28, 28), pad),
                                      recon[i])
    # the short last block is padded with grey tiles in both rows
    np.testing.assert_array_equal(tile(grid, 4 * ncols + 4, ncols, (28, 28), pad), plots.PAD_VALUE)
    np.testing.assert_array_equal(tile(grid, 5 * ncols + 4, ncols, (28, 28), pad), plots.PAD_VALUE)


def test_reconstruction_grid_caps_images_and_columns():
    grid = plots.reconstruction_grid(blobs(50), blobs(50, seed=9))  # 20 pairs, 10 across
    assert grid.shape == (4 * 29 + 1, 10 * 29 + 1)
    grid = plots.reconstruction_grid(blobs(3), blobs(3, seed=9))  # fewer than a row
    assert grid.shape == (2 * 29 + 1, 3 * 29 + 1)


def test_save_reconstructions_writes_png(tmp_path):
    target = tmp_path / "a" / "b" / "recon.png"  # parents are created
    out = plots.save_reconstructions(target, blobs(12).reshape(12, -1), blobs(12, seed=5))
    assert_real_png(out, target)


def test_save_reconstructions_validates(tmp_path):
    path = tmp_path / "r.png"
    with pytest.raises(ValueError, match="originals and reconstructions"):
        plots.save_reconstructions(path, blobs(4), blobs(5))
    with pytest.raises(ValueError, match="reconstructions"):
        plots.save_reconstructions(path, blobs(4), np.zeros((4, 100)))
    bad = blobs(4)
    bad[2, 3, 3] = np.nan
    with pytest.raises(ValueError, match="originals must be finite"):
        plots.save_reconstructions(path, bad, blobs(4))
    with pytest.raises(ValueError, match="path"):
        plots.save_reconstructions(tmp_path / "r.jpg", blobs(4), blobs(4))
    assert not path.exists()


# ------------------------------------------------------------------------ samples


def test_save_samples_writes_png_with_general_image_shape(tmp_path):
    imgs = blobs(15, shape=(16, 12))
    out = plots.save_samples(str(tmp_path / "s.png"), imgs.reshape(15, -1), ncols=5,
                             image_shape=(16, 12))
    assert_real_png(out, tmp_path / "s.png")
    with pytest.raises(ValueError, match="images"):
        plots.save_samples(tmp_path / "s2.png", imgs.reshape(15, -1), image_shape=(28, 28))


# ------------------------------------------------------------------------ manifold


def test_manifold_decodes_grid_at_normal_quantiles(tmp_path):
    n = 6
    decode, calls = recording_decoder()
    out = plots.save_manifold(tmp_path / "m.png", decode, n=n)
    assert_real_png(out)

    assert len(calls) == 1
    z = calls[0]
    assert z.shape == (n * n, 2) and z.dtype == np.float64
    lo, hi = NormalDist().inv_cdf(0.05), NormalDist().inv_cdf(0.95)
    assert lo == pytest.approx(-1.6448536, abs=1e-6)
    # display order: top-left is (low z1, high z2), bottom-right is (high z1, low z2)
    np.testing.assert_allclose(z[0], [lo, hi], rtol=0, atol=1e-12)
    np.testing.assert_allclose(z[n - 1], [hi, hi], rtol=0, atol=1e-12)
    np.testing.assert_allclose(z[n * (n - 1)], [lo, lo], rtol=0, atol=1e-12)
    np.testing.assert_allclose(z[-1], [hi, lo], rtol=0, atol=1e-12)
    expected = [NormalDist().inv_cdf(q) for q in np.linspace(0.05, 0.95, n)]
    np.testing.assert_allclose(np.unique(z[:, 0]), expected, atol=1e-12)
    np.testing.assert_allclose(np.unique(z[:, 1]), expected, atol=1e-12)
    # every (z1, z2) combination appears once
    assert len({tuple(p) for p in z}) == n * n


def test_manifold_points_match_documented_order():
    points, values = plots.manifold_points(4)
    for i in range(4):
        for j in range(4):
            np.testing.assert_array_equal(points[i * 4 + j], [values[j], values[3 - i]])


def test_manifold_rejects_bad_decoder_and_n(tmp_path):
    path = tmp_path / "m.png"
    with pytest.raises(ValueError, match="decode"):
        plots.save_manifold(path, "not callable")
    with pytest.raises(ValueError, match="decode"):
        plots.save_manifold(path, lambda z: np.zeros((len(z), 10)), n=3)
    with pytest.raises(ValueError, match="decode"):
        plots.save_manifold(path, lambda z: np.zeros((len(z) - 1, 784)), n=3)
    with pytest.raises(ValueError, match="decode"):
        plots.save_manifold(path, lambda z: np.full((len(z), 784), np.nan), n=3)
    with pytest.raises(ValueError, match="n must"):
        plots.save_manifold(path, lambda z: np.zeros((len(z), 784)), n=1)
    assert not path.exists()
    assert_no_temp_files(tmp_path)


# ------------------------------------------------------------------- interpolation


def test_interpolation_endpoints_are_exact(tmp_path):
    rng = np.random.default_rng(0)
    z_a, z_b = rng.normal(size=7), rng.normal(size=7)
    decode, calls = recording_decoder()
    out = plots.save_interpolation(tmp_path / "i.png", decode, z_a, z_b, steps=9)
    assert_real_png(out)
    assert len(calls) == 1
    z = calls[0]
    assert z.shape == (9, 7)
    assert np.array_equal(z[0], z_a)
    assert np.array_equal(z[-1], z_b)
    t = np.linspace(0, 1, 9)[:, None]
    np.testing.assert_allclose(z, (1 - t) * z_a + t * z_b, rtol=1e-12, atol=1e-12)


def test_interpolation_accepts_row_vectors_and_validates(tmp_path):
    decode, calls = recording_decoder()
    path = tmp_path / "i.png"
    plots.save_interpolation(path, decode, np.zeros((1, 3)), np.ones((1, 3)), steps=2)
    assert np.array_equal(calls[0], [[0, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="z_a and z_b"):
        plots.save_interpolation(path, decode, np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="z_a"):
        plots.save_interpolation(path, decode, np.array([0.0, np.nan]), np.zeros(2))
    with pytest.raises(ValueError, match="z_b"):
        plots.save_interpolation(path, decode, np.zeros(2), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="steps"):
        plots.save_interpolation(path, decode, np.zeros(2), np.ones(2), steps=1)


# ------------------------------------------------------------------------ PCA


def test_pca_recovers_dominant_directions():
    rng = np.random.default_rng(42)
    dim, n = 6, 4000
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))  # random orthonormal axes
    scales = np.array([10.0, 3.0, 0.5, 0.3, 0.2, 0.1])
    coeffs = rng.normal(size=(n, dim)) * scales
    z = coeffs @ basis.T + rng.normal(size=dim) * 5  # rotated, anisotropic, shifted

    proj, ratio = plots.pca_2d(z)
    assert proj.shape == (n, 2) and ratio.shape == (2,)
    centred = z - z.mean(axis=0)
    for k in range(2):
        truth = centred @ basis[:, k]
        corr = np.corrcoef(proj[:, k], truth)[0, 1]
        assert abs(corr) > 0.999
    assert ratio[0] >= ratio[1] > 0
    assert ratio.sum() <= 1.0 + 1e-12
    expected = scales[:2] ** 2 / np.sum(scales ** 2)
    np.testing.assert_allclose(ratio, expected, rtol=0.05)
    # projections are centred and uncorrelated
    np.testing.assert_allclose(proj.mean(axis=0), 0.0, atol=1e-9)
    assert abs(np.corrcoef(proj.T)[0, 1]) < 1e-9


def test_pca_is_deterministic_and_handles_degenerate_data():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 4))
    p1, r1 = plots.pca_2d(z)
    p2, r2 = plots.pca_2d(z.copy())
    # exact: the same function on the same values twice, in one process
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(r1, r2)
    proj, ratio = plots.pca_2d(np.ones((10, 3)))
    # exact by construction: the mean of equal values is that value, so the centred data
    # are exact zeros, their projection is 0, and a zero total variance gives ratio 0
    np.testing.assert_array_equal(proj, 0.0)
    np.testing.assert_array_equal(ratio, 0.0)
    proj, ratio = plots.pca_2d(np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]]))  # N == 2
    assert proj.shape == (2, 2)
    # rank 1: the second singular value is 0 only up to the SVD's rounding, which depends
    # on the CPU's SIMD code (6.8e-34 on AVX-512), so a tolerance of float64 eps
    assert ratio[0] == pytest.approx(1.0) and ratio[1] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize(
    "z", [np.zeros((5, 1)), np.zeros(5), np.zeros((1, 3)), np.array([[0.0, np.inf]] * 3)]
)
def test_pca_rejects_bad_input(z):
    with pytest.raises(ValueError, match="z"):
        plots.pca_2d(z)


# ------------------------------------------------------------------- latent scatter


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_latent_scatter_each_dimensionality(tmp_path, dim):
    rng = np.random.default_rng(dim)
    labels = rng.integers(0, 10, 300)
    z = rng.normal(size=(300, dim)) + labels[:, None]
    out = plots.save_latent_scatter(tmp_path / f"z{dim}.png", z, labels)
    assert_real_png(out)


def test_latent_scatter_many_labels_and_no_labels(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 2))
    assert_real_png(plots.save_latent_scatter(tmp_path / "many.png", z, np.arange(200) % 25))
    assert_real_png(plots.save_latent_scatter(tmp_path / "none.png", z, None))
    assert_real_png(plots.save_latent_scatter(tmp_path / "neg.png", z, np.arange(200) % 3 - 5))


def test_latent_scatter_validates(tmp_path):
    path = tmp_path / "z.png"
    z = np.zeros((10, 2))
    with pytest.raises(ValueError, match="labels"):
        plots.save_latent_scatter(path, z, np.zeros(9, dtype=int))
    with pytest.raises(ValueError, match="labels"):
        plots.save_latent_scatter(path, z, np.full(10, 0.5))
    with pytest.raises(ValueError, match="z must"):
        plots.save_latent_scatter(path, np.zeros(10), np.zeros(10, dtype=int))
    bad = z.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="z must be finite"):
        plots.save_latent_scatter(path, bad, np.zeros(10, dtype=int))
    assert not path.exists()


# ------------------------------------------------------------------------ curves


def make_history(epochs: int) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 200.0 / e,
            "val_loss": 210.0 / e,
            "train_recon": 170.0 / e,
            "train_kl": 10.0 + e,
            "val_recon": 180.0 / e,
            "val_kl": 11.0 + e,
            "train_perplexity": 30.0 + e,
            "seconds": 1.5,
            "note": "text is ignored",
        }
        for e in range(1, epochs + 1)
    ]


def test_loss_curves_full_history(tmp_path):
    out = plots.save_loss_curves(tmp_path / "loss.png", make_history(12))
    assert_real_png(out)


def test_loss_curves_single_epoch(tmp_path):
    out = plots.save_loss_curves(tmp_path / "one.png", make_history(1))
    assert_real_png(out)


def test_loss_curves_missing_keys_and_vq_terms(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 5.0, "train_recon": 4.0, "train_codebook": 0.5,
         "train_commitment": 0.2},
        {"epoch": 2, "train_loss": 4.0, "val_loss": 4.5, "train_recon": 3.0,
         "train_codebook": 0.4, "val_recon": 3.5, "val_codebook": None},
        {"train_loss": 3.0, "val_loss": float("nan")},
    ]
    assert_real_png(plots.save_loss_curves(tmp_path / "vq.png", history))
    assert_real_png(plots.save_loss_curves(tmp_path / "terms_only.png",
                                           [{"train_kl": 1.0}, {"train_kl": 2.0}]))


def test_loss_terms_grouping():
    terms = curves._loss_terms(make_history(2) + [{"val_codebook": 1.0, "train_lr": 0.1}])
    assert terms == ["recon", "kl", "codebook"]


@pytest.mark.parametrize(
    "history, match",
    [
        ([], "history"),
        ({"train_loss": 1.0}, "history"),
        ([{"epoch": 1}], "history"),
        ([{"train_loss": 1.0}, 3.0], r"history\[1\]"),
        (None, "history"),
    ],
)
def test_loss_curves_validates(tmp_path, history, match):
    with pytest.raises(ValueError, match=match):
        plots.save_loss_curves(tmp_path / "bad.png", history)
    assert_no_temp_files(tmp_path)


# ------------------------------------------------------------------------ codebook


def test_codebook_usage_png_and_perplexity(tmp_path):
    counts = np.array([0, 5, 12, 0, 30, 1, 7, 0] * 8)
    out = plots.save_codebook_usage(tmp_path / "cb.png", counts)
    assert_real_png(out)
    assert perplexity(np.full(16, 3.0)) == pytest.approx(16.0)
    assert perplexity(np.array([0.0, 9.0, 0.0])) == pytest.approx(1.0)
    assert_real_png(plots.save_codebook_usage(tmp_path / "one.png", [4]))


@pytest.mark.parametrize(
    "counts", [np.zeros(8), np.array([1, -1, 2]), np.array([0.5, 1.0]),
               np.ones((2, 4)), np.array([]), np.array([1.0, np.nan])]
)
def test_codebook_usage_validates(tmp_path, counts):
    with pytest.raises(ValueError, match="counts"):
        plots.save_codebook_usage(tmp_path / "cb.png", counts)


def test_perplexity_from_values_and_history(tmp_path):
    assert_real_png(plots.save_perplexity(tmp_path / "p1.png", [3.0, 7.5, 12.0, 15.0]))
    assert_real_png(plots.save_perplexity(tmp_path / "p2.png", np.array([4.0])))
    history = [{"epoch": e, "perplexity": 10.0 + e, "val_perplexity": 9.0 + e} for e in (1, 2, 3)]
    assert_real_png(plots.save_perplexity(tmp_path / "p3.png", history, num_codes=32))
    assert_real_png(plots.save_perplexity(tmp_path / "p4.png", [{"val_perplexity": 3.0}]))


@pytest.mark.parametrize(
    "data", [[], [1.0, float("nan")], [[1.0, 2.0]], [{"train_loss": 1.0}], {"perplexity": 2.0}]
)
def test_perplexity_validates(tmp_path, data):
    with pytest.raises(ValueError, match="history_or_values"):
        plots.save_perplexity(tmp_path / "p.png", data)


# ------------------------------------------------------------------ atomic writes


def test_writes_are_atomic_and_overwrite(tmp_path):
    path = tmp_path / "s.png"
    plots.save_samples(path, blobs(4))
    first = path.read_bytes()
    plots.save_samples(path, blobs(9, seed=3))
    assert path.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]


def test_failed_render_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "s.png"
    plots.save_samples(path, blobs(4))
    before = path.read_bytes()

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        plots.save_samples(path, blobs(6))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]


def test_written_file_is_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        path = plots.save_samples(tmp_path / "s.png", blobs(2))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_path_must_be_png(tmp_path):
    with pytest.raises(ValueError, match="path"):
        plots.save_samples(tmp_path / "s.pdf", blobs(2))
    with pytest.raises(ValueError, match="path"):
        plots.save_samples(42, blobs(2))
