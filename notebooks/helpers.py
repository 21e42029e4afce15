"""What the notebooks share: small data that needs no network, and a plain training loop.

``digits(n)`` returns MNIST's first n training images when they are already cached on
this machine (it never downloads), and otherwise n synthetic 28 x 28 "digits": the ten
seven-segment numerals, drawn with random position, size, slant and stroke width and
blurred into grey levels. Either way the images are (n, 784) floats in [0, 1], with
labels, and the notebook prints which data it used.

``setup()`` puts a notebook on the NumPy twins (``npvae.set_backend("numpy")``): the
models are small, and a fresh machine would otherwise spend longer compiling the Numba
kernels than training. Set NPVAE_NOTEBOOK_BACKEND=numba to use the compiled kernels.
"""
from __future__ import annotations

import os

import numpy as np

import npvae


def setup() -> str:
    """Select the backend for the notebook (NumPy unless NPVAE_NOTEBOOK_BACKEND says
    otherwise) and say which."""
    name = os.environ.get("NPVAE_NOTEBOOK_BACKEND", "numpy")
    npvae.set_backend(name)
    return f"backend: {name}"

# The seven segments of a numeral as line segments in a unit box, (x0, y0, x1, y1), y down.
_SEGMENTS = {
    "a": (0, 0, 1, 0), "b": (1, 0, 1, 0.5), "c": (1, 0.5, 1, 1), "d": (0, 1, 1, 1),
    "e": (0, 0.5, 0, 1), "f": (0, 0, 0, 0.5), "g": (0, 0.5, 1, 0.5),
}
_NUMERALS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]


def synthetic_digits(n: int, rng: np.random.Generator, size: int = 28):
    """n seven-segment numerals, (n, size * size) floats in [0, 1], and their labels (n,)."""
    labels = rng.integers(10, size=n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((n, size * size))
    for i, label in enumerate(labels):
        width, height = rng.uniform(7, 11), rng.uniform(14, 19)
        left = rng.uniform(5, size - 5 - width)
        top = rng.uniform(3, size - 3 - height)
        slant = rng.uniform(-0.25, 0.25)
        stroke = rng.uniform(1.0, 1.8)
        dist = np.full((size, size), np.inf)
        for seg in _NUMERALS[label]:
            x0, y0, x1, y1 = _SEGMENTS[seg]
            px0, py0 = left + width * x0 - slant * height * (y0 - 0.5), top + height * y0
            px1, py1 = left + width * x1 - slant * height * (y1 - 0.5), top + height * y1
            dx, dy = px1 - px0, py1 - py0
            t = np.clip(((xx - px0) * dx + (yy - py0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
            dist = np.minimum(dist, np.hypot(xx - px0 - t * dx, yy - py0 - t * dy))
        images[i] = np.clip(1.5 - dist / stroke, 0.0, 1.0).ravel() ** 1.5  # soft edges
    return images, labels


def digits(n: int, seed: int = 0, dtype=np.float64):
    """(x (n, 784) in [0, 1], labels (n,), source): cached MNIST if present, else synthetic."""
    if os.environ.get("NPVAE_NOTEBOOK_DATA") != "synthetic":
        from npvae import data

        try:
            images, labels = data.load("mnist", "train", download=False)
        except data.DataUnavailableError:
            pass
        else:
            x = data.to_unit(images[:n], dtype=np.float64).astype(dtype)
            return x, labels[:n].astype(np.int64), f"MNIST, the first {n} training images (cached)"
    x, labels = synthetic_digits(n, np.random.default_rng(seed))
    return x.astype(dtype), labels, f"{n} synthetic seven-segment digits (MNIST is not cached here)"


def fit(model, x, *, epochs: int, batch_size: int = 100, lr: float = 1e-3, seed: int = 0,
        binarize: bool = False, log=None):
    """Train with Adam, one pass of shuffled batches per epoch; returns per-epoch means of
    the model's stats. ``binarize`` draws a fresh binary sample of each batch (dynamic)."""
    from npvae.optim import Adam

    rng = np.random.default_rng(seed)
    opt = Adam(model.params, lr=lr)
    history = []
    for epoch in range(epochs):
        order = rng.permutation(x.shape[0])
        sums, count = {}, 0
        for start in range(0, x.shape[0], batch_size):
            batch = x[order[start:start + batch_size]]
            if binarize:
                batch = (rng.random(batch.shape) < batch).astype(model.dtype)
            fwd = model.forward(batch, rng=rng)  # the loss, its terms, the caches
            opt.step(model.backward(fwd))
            model.after_step(fwd, rng)  # the VQ-VAE's moving averages and restarts
            for key, value in fwd.stats.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
        history.append({key: value / count for key, value in sums.items()})
        if log is not None:
            log(epoch, history[-1])
    return history


def show_images(images, rows: int, cols: int, title: str = "", ax=None):
    """A grid of 28 x 28 images on one matplotlib axis."""
    import matplotlib.pyplot as plt

    images = np.asarray(images)[: rows * cols].reshape(-1, 28, 28)
    grid = np.ones((rows * 29 + 1, cols * 29 + 1))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + r * 29: 1 + r * 29 + 28, 1 + c * 29: 1 + c * 29 + 28] = 1.0 - im
    ax = ax or plt.figure(figsize=(cols * 0.5, rows * 0.5)).gca()
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax
