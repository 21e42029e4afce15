"""Figures of images: grids, reconstructions, samples, the decoded manifold,
interpolations, and the latent scatter (PCA when Z > 2)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist

import numpy as np
from matplotlib.lines import Line2D

from .common import (
    DPI, PAD_VALUE, _MAX_INCHES, _PIXEL_SCALE, PathLike, _check_callable, _check_finite,
    _check_image_shape, _check_path, _cmap, _decoded, _float_array, _image_figure, _images,
    _int_arg, _new_figure, _tile_centres, _write_png,
)


# ------------------------------------------------------------------------ image grid


def _tile(stack: np.ndarray, ncols: int, pad: int, pad_value: float) -> np.ndarray:
    n, h, w = stack.shape
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad), pad_value,
                   dtype=np.float64)
    for i in range(n):
        r, c = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = stack[i]
    return grid


def image_grid(images, ncols: int, image_shape=(28, 28), pad: int = 1,
               *, pad_value: float = PAD_VALUE) -> np.ndarray:
    """Tile images into one 2-D array, filling rows left to right, top to bottom.

    ``images`` is ``(n, H*W)`` or ``(n, H, W)`` with values in [0, 1]. Image ``i`` lands
    in tile row ``i // ncols`` and column ``i % ncols``; its top-left pixel is at
    ``(pad + row * (H + pad), pad + col * (W + pad))``. The result has shape
    ``(nrows * (H + pad) + pad, ncols * (W + pad) + pad)`` with
    ``nrows = ceil(n / ncols)``; borders and unused tiles are ``pad_value``.
    """
    stack = _images("images", images, image_shape)
    ncols = _int_arg("ncols", ncols, 1)
    pad = _int_arg("pad", pad, 0)
    pv = float(pad_value)
    if not (0.0 <= pv <= 1.0):
        raise ValueError(f"pad_value must lie in [0, 1], got {pad_value!r}")
    return _tile(stack, ncols, pad, pv)


# ---------------------------------------------------------------- image figures


def reconstruction_grid(originals, reconstructions, ncols: int = 10, image_shape=(28, 28),
                        pad: int = 1, *, max_images: int = 20) -> np.ndarray:
    """Tile originals with each reconstruction directly below its original.

    The first ``max_images`` pairs are split into blocks of ``ncols``; each block
    becomes a row of originals followed by the row of their reconstructions. Block
    ``b``'s originals are therefore tile row ``2 * b`` and its reconstructions tile
    row ``2 * b + 1`` (tile geometry as in :func:`image_grid`). Unused tiles in a
    short last block are ``PAD_VALUE`` grey. ``ncols`` shrinks to the number of pairs
    when there are fewer.
    """
    shape = _check_image_shape(image_shape)
    orig = _images("originals", originals, shape)
    recon = _images("reconstructions", reconstructions, shape)
    if orig.shape[0] != recon.shape[0]:
        raise ValueError(
            "originals and reconstructions must hold the same number of images, got "
            f"{orig.shape[0]} and {recon.shape[0]}"
        )
    ncols = _int_arg("ncols", ncols, 1)
    pad = _int_arg("pad", pad, 0)
    max_images = _int_arg("max_images", max_images, 1)
    n = min(orig.shape[0], max_images)
    ncols = min(ncols, n)
    h, w = shape
    blocks = -(-n // ncols)
    stack = np.full((2 * blocks * ncols, h, w), PAD_VALUE)
    for b in range(blocks):
        lo, hi = b * ncols, min((b + 1) * ncols, n)
        top = 2 * b * ncols
        stack[top: top + hi - lo] = orig[lo:hi]
        stack[top + ncols: top + ncols + hi - lo] = recon[lo:hi]
    return _tile(stack, ncols, pad, PAD_VALUE)


def save_reconstructions(path: PathLike, originals, reconstructions, image_shape=(28, 28),
                         title: str = "Reconstructions", *, ncols: int = 10,
                         max_images: int = 20) -> Path:
    """Originals with their reconstructions directly beneath them.

    Layout as in :func:`reconstruction_grid`: by default up to 20 pairs, shown as two
    blocks of a row of ten originals over the row of their reconstructions.
    """
    p = _check_path(path)
    shape = _check_image_shape(image_shape)
    pad = 1
    grid = reconstruction_grid(originals, reconstructions, ncols, shape, pad,
                               max_images=max_images)
    h = shape[0]
    rows = (grid.shape[0] - pad) // (h + pad)

    fig, ax = _image_figure(grid, min_width=4.0)
    ax.set_yticks(_tile_centres(rows, h, pad))
    ax.set_yticklabels(["original", "reconstruction"] * (rows // 2), fontsize=8)
    ax.tick_params(axis="y", length=0)
    ax.set_title(str(title))
    return _write_png(fig, p)


def save_samples(path: PathLike, images, ncols: int = 10, image_shape=(28, 28),
                 title: str = "Samples from the prior") -> Path:
    """A grid of images (e.g. decoded prior samples), ``ncols`` per row."""
    p = _check_path(path)
    shape = _check_image_shape(image_shape)
    stack = _images("images", images, shape)
    ncols = min(_int_arg("ncols", ncols, 1), stack.shape[0])
    grid = _tile(stack, ncols, 1, PAD_VALUE)
    fig, ax = _image_figure(grid)
    ax.set_title(str(title))
    return _write_png(fig, p)


def save_side_by_side(path: PathLike, left, right, ncols: int = 8, image_shape=(28, 28),
                      titles=("", "")) -> Path:
    """Two grids of images side by side, each with its title (e.g. samples from two priors)."""
    p = _check_path(path)
    shape = _check_image_shape(image_shape)
    grids = [_tile(_images(name, images, shape), min(_int_arg("ncols", ncols, 1), len(images)),
                   1, PAD_VALUE) for name, images in (("left", left), ("right", right))]
    h = max(g.shape[0] for g in grids) * _PIXEL_SCALE / DPI
    w = sum(g.shape[1] for g in grids) * _PIXEL_SCALE / DPI
    shrink = min(1.0, _MAX_INCHES / max(w, h))
    fig = _new_figure(w * shrink + 0.8, h * shrink + 0.7)
    for i, (grid, title) in enumerate(zip(grids, titles)):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(str(title), fontsize=9)
    return _write_png(fig, p)


def manifold_points(n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Latent points for :func:`save_manifold` and the per-axis quantile values.

    The axis values are ``inv_cdf(linspace(0.05, 0.95, n))`` of a standard normal.
    Points are returned in display order, ``(n * n, 2)``: row ``i`` of the picture
    (top to bottom) has ``z2 = values[n - 1 - i]`` and column ``j`` (left to right)
    has ``z1 = values[j]``, so point ``i * n + j`` is ``(values[j], values[n-1-i])``
    and ``z2`` grows upwards as on an ordinary plot.
    """
    n = _int_arg("n", n, 2)
    dist = NormalDist()
    values = np.array([dist.inv_cdf(q) for q in np.linspace(0.05, 0.95, n)])
    z1 = np.tile(values, n)
    z2 = np.repeat(values[::-1], n)
    return np.stack([z1, z2], axis=1), values


def save_manifold(path: PathLike, decode: Callable[[np.ndarray], np.ndarray], n: int = 20,
                  image_shape=(28, 28), title: str = "Learned 2-D latent manifold") -> Path:
    """Decode an ``n x n`` grid of 2-D latent points spread over the prior.

    ``decode`` receives one float64 array of shape ``(n * n, 2)`` (ordered as
    described in :func:`manifold_points`) and must return ``(n * n, H*W)`` (or
    ``(n * n, H, W)``) pixel values in [0, 1].
    """
    p = _check_path(path)
    _check_callable("decode", decode)
    shape = _check_image_shape(image_shape)
    n = _int_arg("n", n, 2)
    points, values = manifold_points(n)
    stack = _decoded("decode", decode(points.copy()), n * n, shape)
    pad = 1
    grid = _tile(stack, n, pad, PAD_VALUE)

    fig, ax = _image_figure(grid, extra_height=0.9, min_width=4.0)
    picks = np.unique(np.round(np.linspace(0, n - 1, min(n, 5))).astype(int))
    h, w = shape
    ax.set_xticks(_tile_centres(n, w, pad)[picks])
    ax.set_xticklabels([f"{values[j]:.2f}" for j in picks], fontsize=8)
    ax.set_yticks(_tile_centres(n, h, pad)[picks])
    ax.set_yticklabels([f"{values[n - 1 - i]:.2f}" for i in picks], fontsize=8)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(str(title))
    return _write_png(fig, p)


def save_interpolation(path: PathLike, decode: Callable[[np.ndarray], np.ndarray], z_a, z_b,
                       steps: int = 10, image_shape=(28, 28),
                       title: str = "Latent interpolation") -> Path:
    """Decode ``steps`` evenly spaced points on the segment from ``z_a`` to ``z_b``.

    ``decode`` receives one float64 array of shape ``(steps, Z)`` whose first row is
    exactly ``z_a`` and last row exactly ``z_b``; the images form one row.
    """
    p = _check_path(path)
    _check_callable("decode", decode)
    shape = _check_image_shape(image_shape)
    steps = _int_arg("steps", steps, 2)
    za = _float_array("z_a", z_a)
    zb = _float_array("z_b", z_b)
    for name, z in (("z_a", za), ("z_b", zb)):
        if not (z.ndim == 1 or (z.ndim == 2 and z.shape[0] == 1)) or z.size == 0:
            raise ValueError(f"{name} must be one latent code of shape (Z,), got {z.shape}")
        _check_finite(name, z)
    za, zb = za.ravel(), zb.ravel()
    if za.shape != zb.shape:
        raise ValueError(
            f"z_a and z_b must have the same length, got {za.shape[0]} and {zb.shape[0]}"
        )
    t = np.linspace(0.0, 1.0, steps)[:, None]
    path_z = (1.0 - t) * za + t * zb
    path_z[0], path_z[-1] = za, zb
    stack = _decoded("decode", decode(path_z.copy()), steps, shape)
    pad = 1
    grid = _tile(stack, steps, pad, PAD_VALUE)

    fig, ax = _image_figure(grid, extra_height=0.8, min_width=4.0)
    ax.set_xticks(_tile_centres(steps, shape[1], pad)[[0, -1]])
    ax.set_xticklabels(["z_a", "z_b"])
    ax.tick_params(axis="x", length=0)
    ax.set_xlabel("interpolation from z_a to z_b")
    ax.set_title(str(title))
    return _write_png(fig, p)


# ------------------------------------------------------------------------ latents


def pca_2d(z) -> tuple[np.ndarray, np.ndarray]:
    """Project ``z`` (N, Z), Z >= 2, onto its first two principal components.

    Returns the ``(N, 2)`` coordinates of the centred data along the components and
    the ``(2,)`` fraction of the total variance each explains (descending, summing to
    at most 1; zeros when the data do not vary). Each component's sign is fixed so
    that its largest-magnitude loading is positive, making the result deterministic.
    """
    arr = _float_array("z", z)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"z must have shape (N, Z) with Z >= 2, got {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"z must hold at least 2 points, got {arr.shape[0]}")
    _check_finite("z", arr)
    centred = arr - arr.mean(axis=0)
    if arr.shape[0] > arr.shape[1]:
        # more points than dimensions: the components are the eigenvectors of the (Z, Z)
        # scatter matrix, one product and a small eigh instead of the SVD of the (N, Z) data
        # (5000 x 784 encoder outputs of a conv VQ-VAE on a busy 2-core machine: 2.6-11 s,
        # against 7-37 s for the SVD)
        var, vecs = np.linalg.eigh(centred.T @ centred)  # ascending
        s = np.sqrt(np.clip(var[::-1], 0.0, None))  # (Z,)  the singular values
        comps = vecs[:, ::-1][:, :2].T.copy()  # (2, Z)
    else:
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        comps = vt[:2].copy()
    if comps.shape[0] < 2:  # N == 2 leaves a single component from the thin SVD
        comps = np.vstack([comps, np.zeros((2 - comps.shape[0], arr.shape[1]))])
    for k in range(2):
        big = np.argmax(np.abs(comps[k]))
        if comps[k, big] < 0:
            comps[k] = -comps[k]
    proj = centred @ comps.T
    var = s ** 2
    total = var.sum()
    top = np.zeros(2)
    top[:min(2, var.size)] = var[:2]
    ratio = top / total if total > 0 else np.zeros(2)
    return proj, ratio


def _labels(labels, n: int) -> np.ndarray:
    arr = _float_array("labels", labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match z, got {arr.shape}")
    _check_finite("labels", arr)
    if not np.array_equal(arr, np.round(arr)):
        raise ValueError("labels must hold integer class labels")
    return arr.astype(np.int64)


def save_latent_scatter(path: PathLike, z, labels, title: str = "Latent space") -> Path:
    """Scatter latent codes coloured by integer label.

    Two-dimensional codes are drawn as they are; wider codes are projected onto their
    first two principal components (axes report the variance explained); one-
    dimensional codes are spread vertically with a fixed random jitter. Up to ten
    distinct labels get a ``tab10`` legend (labels 0-9 keep the same colour across
    figures); more get a colour bar. ``labels=None`` draws every point in one colour.
    """
    p = _check_path(path)
    arr = _float_array("z", z)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"z must have shape (N, Z) with N, Z >= 1, got {arr.shape}")
    _check_finite("z", arr)
    n, dim = arr.shape
    lab = None if labels is None else _labels(labels, n)

    fig = _new_figure(5.6, 4.6)
    ax = fig.add_subplot()
    if dim == 1:
        x = arr[:, 0]
        y = np.random.default_rng(0).uniform(-1.0, 1.0, n)
        ax.set_xlabel("z1")
        ax.set_ylabel("random jitter")
        ax.set_yticks([])
        full_title = f"{title} (1-D codes)"
    elif dim == 2:
        x, y = arr[:, 0], arr[:, 1]
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
        full_title = str(title)
    else:
        proj, ratio = pca_2d(arr)
        x, y = proj[:, 0], proj[:, 1]
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% var)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% var)")
        full_title = f"{title} (PCA of {dim}-d codes)"

    size = 4.0 if n > 2000 else 12.0
    order = np.random.default_rng(1).permutation(n)  # no class is painted on top of all
    if lab is None:
        ax.scatter(x, y, s=size, alpha=0.7, color="tab:blue", linewidths=0)
    else:
        classes = np.unique(lab)
        if classes.size <= 10:
            cmap = _cmap("tab10")
            if classes.min() >= 0 and classes.max() <= 9:
                slot = {int(c): int(c) for c in classes}
            else:
                slot = {int(c): i for i, c in enumerate(classes)}
            colours = np.array([cmap(k) for k in range(10)])
            point_colours = colours[[slot[int(v)] for v in lab]]
            ax.scatter(x[order], y[order], s=size, c=point_colours[order], alpha=0.7,
                       linewidths=0)
            handles = [Line2D([], [], linestyle="none", marker="o", markersize=6,
                              color=colours[slot[int(c)]], label=str(int(c)))
                       for c in classes]
            ax.legend(handles=handles, title="label", fontsize=8, title_fontsize=8,
                      loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        else:
            pts = ax.scatter(x[order], y[order], s=size, c=lab[order], cmap="viridis",
                             alpha=0.7, linewidths=0)
            fig.colorbar(pts, ax=ax, label="label")
    ax.set_title(full_title)
    ax.grid(True, alpha=0.25)
    return _write_png(fig, p)
