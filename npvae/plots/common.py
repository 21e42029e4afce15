"""What every figure of :mod:`npvae.plots` shares: argument checks, figure sizes and
the atomic PNG writer."""
from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic import write_atomic

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

def _cmap(name: str):
    return colormaps[name]
