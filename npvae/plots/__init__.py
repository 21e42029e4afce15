"""PNG figures for inspecting trained models: reconstructions, samples, latent
manifolds and scatters, interpolations, training curves and codebook statistics.

Everything here draws on a private :class:`matplotlib.figure.Figure` rendered by the
Agg canvas, so importing this module never touches pyplot's global state and works on
machines without a display.

Conventions shared by every ``save_*`` function:

* ``path`` must end in ``.png``; missing parent directories are created.
* The file is written atomically: the PNG is rendered into a temporary file in the
  same directory and moved into place with :func:`os.replace`, so a reader never sees
  a half-written image and a failed render leaves any previous file untouched.
* The return value is ``pathlib.Path(path)``.
* Bad arguments raise ``ValueError`` whose message starts with the argument's name.

Images are grey-scale with values in ``[0, 1]``. They may be given flattened,
``(n, H*W)``, or as ``(n, H, W)``; ``image_shape`` gives ``(H, W)`` (MNIST by
default). Images are drawn with row 0 at the top, so digits appear upright.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from statistics import NormalDist
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .atomic import write_atomic
from .ops.vq import perplexity as usage_perplexity

__all__ = [
    "image_grid",
    "reconstruction_grid",
    "save_reconstructions",
    "save_samples",
    "save_manifold",
    "save_latent_scatter",
    "pca_2d",
    "manifold_points",
    "save_interpolation",
    "save_loss_curves",
    "save_codebook_usage",
    "save_perplexity",
]

DPI = 100
PAD_VALUE = 0.5          # grey used between tiles and for empty tiles
_PIXEL_SCALE = 2.0       # screen pixels per image pixel in image figures
_MAX_INCHES = 9.0        # cap on the longer side of an image figure
_MANY_EPOCHS = 25        # above this many points, curves are drawn without markers

# ``train_<term>`` / ``val_<term>`` entries whose term contains one of these words are
# not loss components and are left out of the second loss-curve panel.
_NOT_LOSS_WORDS = frozenset({"perplexity", "time", "seconds", "sec", "lr", "learning",
                             "rate", "usage", "used", "accuracy", "acc"})

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- checks


def _float_array(name: str, value) -> np.ndarray:
    if callable(value) or isinstance(value, (str, bytes, Mapping)):
        raise ValueError(f"{name} must be a numeric array, got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and similar
        raise ValueError(f"{name} must be a numeric array ({exc})") from None
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
    ) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _check_finite(name: str, arr: np.ndarray) -> None:
    if arr.size and not np.isfinite(arr).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise ValueError(f"{name} must be finite, but holds {arr[where]} at index {where}")


def _check_unit_interval(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(
                f"{name} must hold pixel values in [0, 1], got values from {lo:g} to {hi:g}"
            )
    return np.clip(arr, 0.0, 1.0)


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _check_image_shape(image_shape) -> tuple[int, int]:
    try:
        dims = tuple(image_shape)
    except TypeError:
        raise ValueError(f"image_shape must be a pair (height, width), got {image_shape!r}") from None
    if len(dims) != 2 or any(
        isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dims
    ):
        raise ValueError(
            f"image_shape must be a pair of positive integers (height, width), got {image_shape!r}"
        )
    return int(dims[0]), int(dims[1])


def _images(name: str, images, image_shape) -> np.ndarray:
    """``images`` as a float64 ``(n, H, W)`` array in [0, 1]."""
    h, w = _check_image_shape(image_shape)
    arr = _float_array(name, images)
    if arr.ndim == 2:
        if arr.shape[1] != h * w:
            raise ValueError(
                f"{name} must have shape (n, {h * w}) or (n, {h}, {w}) for "
                f"image_shape={(h, w)}, got {arr.shape}"
            )
        arr = arr.reshape(arr.shape[0], h, w)
    elif arr.ndim == 3:
        if arr.shape[1:] != (h, w):
            raise ValueError(
                f"{name} must have shape (n, {h * w}) or (n, {h}, {w}) for "
                f"image_shape={(h, w)}, got {arr.shape}"
            )
    else:
        raise ValueError(
            f"{name} must have shape (n, {h * w}) or (n, {h}, {w}), got {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must contain at least one image, got {arr.shape}")
    _check_finite(name, arr)
    return _check_unit_interval(name, arr)


def _check_callable(name: str, fn) -> None:
    if not callable(fn):
        raise ValueError(f"{name} must be callable, got {type(fn).__name__}")


def _decoded(name: str, out, rows: int, image_shape) -> np.ndarray:
    """Validate what a decode callable returned for ``rows`` latent points."""
    arr = _float_array(f"{name} output", out)
    h, w = image_shape
    if arr.ndim not in (2, 3) or arr.shape[0] != rows:
        raise ValueError(
            f"{name} must return shape ({rows}, {h * w}) for {rows} latent points, "
            f"got {arr.shape}"
        )
    return _images(f"{name} output", arr, image_shape)


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(p)!r}")
    return p


# ------------------------------------------------------------------------ rendering


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _write_png(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to ``path`` atomically (:func:`npvae.atomic.write_atomic`)."""
    return write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI, facecolor="white"))


def _image_figure(grid: np.ndarray, extra_height: float = 0.6, min_width: float = 3.0
                  ) -> tuple[Figure, object]:
    """A figure sized to show ``grid`` crisply, with one axes holding it."""
    gh, gw = grid.shape
    w_in = gw * _PIXEL_SCALE / DPI
    h_in = gh * _PIXEL_SCALE / DPI
    shrink = min(1.0, _MAX_INCHES / max(w_in, h_in))
    w_in, h_in = w_in * shrink, h_in * shrink
    fig = _new_figure(max(w_in + 0.4, min_width), h_in + extra_height)
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig, ax


def _tile_centres(count: int, size: int, pad: int) -> np.ndarray:
    return pad + np.arange(count) * (size + pad) + (size - 1) / 2.0


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


def _cmap(name: str):
    return colormaps[name]


# ------------------------------------------------------------------------ curves


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _history(history) -> list[Mapping]:
    if isinstance(history, Mapping) or not isinstance(history, Iterable) or isinstance(
        history, (str, bytes)
    ):
        raise ValueError(
            f"history must be a list of per-epoch dicts, got {type(history).__name__}"
        )
    rows = list(history)
    if not rows:
        raise ValueError("history must contain at least one epoch")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(
                f"history[{i}] must be a dict of per-epoch values, got {type(row).__name__}"
            )
    return rows


def _epochs(rows: Sequence[Mapping]) -> np.ndarray:
    values = [row.get("epoch") for row in rows]
    if all(_is_number(v) and math.isfinite(v) for v in values):
        return np.array(values, dtype=np.float64)
    return np.arange(1, len(rows) + 1, dtype=np.float64)


def _series(rows: Sequence[Mapping], key: str) -> np.ndarray:
    """Values of ``key`` per epoch; missing, non-numeric or non-finite entries -> NaN."""
    out = np.full(len(rows), np.nan)
    for i, row in enumerate(rows):
        v = row.get(key)
        if _is_number(v) and math.isfinite(float(v)):
            out[i] = float(v)
    return out


def _plot_series(ax, epochs, values, label, colour, style, markers) -> None:
    ax.plot(epochs, values, linestyle=style, color=colour, label=label,
            marker="o" if markers else None, markersize=4)


def _loss_terms(rows: Sequence[Mapping]) -> list[str]:
    """Suffixes ``t`` with a numeric ``train_t`` or ``val_t``, in first-seen order."""
    terms: list[str] = []
    for row in rows:
        for key, v in row.items():
            if not isinstance(key, str) or not _is_number(v):
                continue
            for prefix in ("train_", "val_"):
                if key.startswith(prefix):
                    term = key[len(prefix):]
                    if (term and term != "loss" and term not in terms
                            and not _NOT_LOSS_WORDS.intersection(term.split("_"))):
                        terms.append(term)
    return terms


def save_loss_curves(path: PathLike, history, title: str = "Training curves") -> Path:
    """Per-epoch training curves from a list of history dicts.

    The left panel shows ``train_loss`` (solid) and ``val_loss`` (dashed). The right
    panel shows every other ``train_<term>`` / ``val_<term>`` pair (recon, kl, codebook,
    commitment, ...), train solid and validation dashed in a shared colour per term;
    metrics that are not loss terms (perplexity, timings, learning rate) are left out.
    Missing keys, ``None`` and non-finite values leave gaps. The x axis uses each
    dict's ``"epoch"`` when every entry has one, else 1, 2, ...
    """
    p = _check_path(path)
    rows = _history(history)
    epochs = _epochs(rows)
    markers = len(rows) <= _MANY_EPOCHS
    train_loss = _series(rows, "train_loss")
    val_loss = _series(rows, "val_loss")
    terms = _loss_terms(rows)
    has_loss = np.isfinite(train_loss).any() or np.isfinite(val_loss).any()
    if not has_loss and not terms:
        raise ValueError(
            "history must hold numeric 'train_loss'/'val_loss' or other "
            "'train_<term>'/'val_<term>' values"
        )

    panels = int(has_loss) + int(bool(terms))
    fig = _new_figure(5.0 * panels + 0.6, 4.0)
    axes = [fig.add_subplot(1, panels, k + 1) for k in range(panels)]
    if has_loss:
        ax = axes[0]
        if np.isfinite(train_loss).any():
            _plot_series(ax, epochs, train_loss, "train", "tab:blue", "-", markers)
        if np.isfinite(val_loss).any():
            _plot_series(ax, epochs, val_loss, "validation", "tab:orange", "--", markers)
        ax.set_title("Loss")
        ax.set_ylabel("loss")
    if terms:
        ax = axes[-1]
        cmap = _cmap("tab10")
        for k, term in enumerate(terms):
            colour = cmap(k % 10)
            for prefix, style in (("train_", "-"), ("val_", "--")):
                values = _series(rows, prefix + term)
                if np.isfinite(values).any():
                    _plot_series(ax, epochs, values, f"{prefix.rstrip('_')} {term}",
                                 colour, style, markers)
        ax.set_title("Loss terms")
        ax.set_ylabel("value")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if len(rows) == 1:
            ax.set_xticks(epochs)
    fig.suptitle(str(title))
    return _write_png(fig, p)


def save_codebook_usage(path: PathLike, counts, title: str = "Codebook usage") -> Path:
    """Bar chart of how often each code was chosen, in code-index order.

    ``counts`` is a ``(K,)`` array of non-negative integer counts with a positive
    total. The title reports the usage perplexity ``exp(entropy)`` and the fraction
    of codes used at least once.
    """
    p = _check_path(path)
    arr = _float_array("counts", counts)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"counts must have shape (K,) with K >= 1, got {arr.shape}")
    _check_finite("counts", arr)
    if (arr < 0).any() or not np.array_equal(arr, np.round(arr)):
        raise ValueError("counts must hold non-negative integers")
    if arr.sum() <= 0:
        raise ValueError("counts must have a positive total (no code was ever used)")
    k = arr.size
    used = int((arr > 0).sum())
    perplexity = usage_perplexity(arr)

    fig = _new_figure(min(4.0 + 0.04 * k, 10.0), 3.8)
    ax = fig.add_subplot()
    ax.bar(np.arange(k), arr, width=1.0 if k > 64 else 0.8, color="tab:blue",
           linewidth=0)
    ax.set_xlim(-0.5 - (0.5 if k == 1 else 0), k - 0.5 + (0.5 if k == 1 else 0))
    ax.set_xlabel("code index")
    ax.set_ylabel("count")
    ax.set_title(
        f"{title}\nperplexity {perplexity:.1f} of {k}, "
        f"{used}/{k} codes used ({used / k:.0%})",
        fontsize=10,
    )
    ax.grid(True, axis="y", alpha=0.3)
    return _write_png(fig, p)


def save_perplexity(path: PathLike, history_or_values, title: str = "Codebook perplexity",
                    *, num_codes: int | None = None) -> Path:
    """Codebook perplexity per epoch.

    Accepts either a sequence of numbers (epochs 1, 2, ...; all must be finite) or a
    list of history dicts, from which ``perplexity`` / ``train_perplexity`` and
    ``val_perplexity`` are drawn (missing entries leave gaps). With ``num_codes`` a
    dotted line marks the largest possible perplexity, the codebook size.
    """
    p = _check_path(path)
    if num_codes is not None:
        num_codes = _int_arg("num_codes", num_codes, 1)
    data = history_or_values
    series: list[tuple[str, np.ndarray, str, str]] = []
    if isinstance(data, (list, tuple)) and data and all(isinstance(r, Mapping) for r in data):
        rows = list(data)
        epochs = _epochs(rows)
        for key, label, colour, style in (
            ("perplexity", "perplexity", "tab:blue", "-"),
            ("train_perplexity", "train", "tab:blue", "-"),
            ("val_perplexity", "validation", "tab:orange", "--"),
        ):
            values = _series(rows, key)
            if np.isfinite(values).any():
                series.append((label, values, colour, style))
        if not series:
            raise ValueError(
                "history_or_values holds no numeric 'perplexity', 'train_perplexity' "
                "or 'val_perplexity' entries"
            )
    else:
        if isinstance(data, Mapping):
            raise ValueError(
                "history_or_values must be a sequence of numbers or a list of dicts, got dict"
            )
        values = _float_array("history_or_values", data)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(
                "history_or_values must be a non-empty 1-D sequence of perplexities, "
                f"got shape {values.shape}"
            )
        _check_finite("history_or_values", values)
        epochs = np.arange(1, values.size + 1, dtype=np.float64)
        series.append(("perplexity", values, "tab:blue", "-"))

    markers = epochs.size <= _MANY_EPOCHS
    fig = _new_figure(5.6, 4.0)
    ax = fig.add_subplot()
    for label, values, colour, style in series:
        _plot_series(ax, epochs, values, label, colour, style, markers)
    if num_codes is not None:
        ax.axhline(num_codes, color="grey", linestyle=":", label=f"codebook size ({num_codes})")
    if epochs.size == 1:
        ax.set_xticks(epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_title(str(title))
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or num_codes is not None:
        ax.legend(fontsize=8)
    return _write_png(fig, p)
