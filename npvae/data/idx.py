"""The IDX files of MNIST and Fashion-MNIST: reading, writing and checking them.

An IDX file is a big-endian header (a magic number giving the type and the number of
dimensions, then each dimension's size) followed by the raw uint8 values. A file is
trusted when its structure is right (magic number, header sizes against the payload
length, 28 x 28 images, labels below 10) and its SHA-256 is one that npvae knows. A file
with the official number of examples must be the official gzipped file or hold the
official decompressed bytes; a smaller one (a subset) must still have the digest this
package recorded in the folder's manifest (``MANIFEST_NAME``) when it wrote the file.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover  (not POSIX)
    fcntl = None

DATASETS = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")

MANIFEST_NAME = "npvae-manifest.json"
GZIP_LEVEL = 6  # level 9 is ten times slower for a 2% smaller file
MAX_IDX_BYTES = 1 << 30  # read_idx's bound on a file of unknown kind (EMNIST's largest: 547 MB)
_READ_CHUNK = 1 << 20

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
    ``raw_sha256``: digest of the decompressed IDX bytes (header included);
    ``first_sha256``: for an image file, digest of its first image's 784 bytes, which
    tells a subset cut from the front of this file (see :func:`_check_subset_source`).
    """

    count: int
    gz_sha256: str
    raw_sha256: str
    first_sha256: str = ""


KNOWN_FILES = {
    "mnist": {
        "train-images-idx3-ubyte": KnownFile(
            60000,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "23ceaef5eb61f0e70d64ac18fdf0f60df3d5971cf30bbadac7b6ebf07f782d2c",
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
            "8f6a418c9a639f9e14e96feca47a97df2a35a0a68ae2875431c5c80e05536941",
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
            "5bd44e331a6d6998daf675700cd0c13dcd7af8ab954b7585124124da61459e7b",
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
            "ffc7351ed0f8bae542820866086177fa4e0b366b97bf9d998dffdb8dbe138787",
        ),
        "t10k-labels-idx1-ubyte": KnownFile(
            10000,
            "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    },
}


class CorruptFileError(ValueError):
    """A data file is damaged: bad magic number, wrong sizes, or a broken stream."""


class ChecksumError(CorruptFileError):
    """A data file's SHA-256 differs from the recorded or official digest."""


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


def _manifest_entries(directory: Path) -> dict:
    """``{file name: (sha256, source)}`` recorded in ``directory``; empty if absent or unreadable."""
    try:
        text = (directory / MANIFEST_NAME).read_text(encoding="utf-8")
        files = json.loads(text)["files"]
        return {str(k): (str(v["sha256"]), str(v.get("source", ""))) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _read_manifest(directory: Path) -> dict:
    """``{file name: sha256}`` recorded in ``directory``; empty if absent or unreadable."""
    return {name: digest for name, (digest, _) in _manifest_entries(directory).items()}


def _inflated_source(stem: str, gz_sha256: str = "") -> str:
    """The manifest's source for a raw copy npvae inflated from the ``.gz`` beside it,
    whose SHA-256 was ``gz_sha256`` (without it: the start every such source shares)."""
    return f"inflated from {stem}.gz" + (f" with SHA-256 {gz_sha256}" if gz_sha256 else "")


def _file_sha256(path: Path, limit: int) -> str | None:
    """SHA-256 of a file of at most ``limit`` bytes, read in chunks; None if it is
    larger or cannot be read (reading it for the data then says why)."""
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size > limit:
                return None
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def _record(directory: Path, name: str, digest: str, source: str) -> None:
    """Add or replace one file's SHA-256 in the folder's manifest (atomically).

    The read, change and rewrite happen under the folder's lock, so that loads recording
    into one manifest at once (two runs filling a fresh cache) keep each other's entries.
    """
    with _folder_locked(directory):
        try:
            doc = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
            files = dict(doc["files"])
        except (OSError, ValueError, KeyError, TypeError):
            files = {}
        files[name] = {"sha256": digest, "source": source}
        text = json.dumps({"version": 1, "files": files}, indent=2, sort_keys=True) + "\n"
        write_atomic(directory / MANIFEST_NAME, lambda f: f.write(text.encode("utf-8")))


@contextlib.contextmanager
def _folder_locked(directory: Path):
    """Hold an exclusive ``flock`` on ``directory``, waiting for it; the kernel releases it
    however the process ends. Where flock is missing, nothing is locked."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------- IDX


def _claimed_size(header: bytes) -> int | None:
    """Total IDX size (header + data) that a file's first bytes announce, or None."""
    if len(header) < 4:
        return None
    ndim = _MAGIC_NDIM.get(struct.unpack(">I", header[:4])[0])
    if ndim is None or len(header) < 4 + 4 * ndim:
        return None
    dims = struct.unpack(f">{ndim}I", header[4:4 + 4 * ndim])
    return 4 + 4 * ndim + math.prod(dims)  # Python ints: no overflow


def _decompress(blob: bytes, where: str, limit: int | None = None) -> bytes | bytearray:
    """The IDX bytes of a file's content, un-gzipping it when it starts as gzip.

    The stream is read in chunks and never beyond ``limit`` bytes (by default the size
    the IDX header announces, at most ``MAX_IDX_BYTES``): a damaged file or a gzip bomb
    that inflates past it is refused with ``CorruptFileError``, before it fills memory.
    A gzipped file's content comes back as the bytearray it was inflated into, not
    copied (MNIST's training images are 47 MB); ``blob`` itself when it is not gzip.
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
    return out


def _read_bounded(path: Path, limit: int) -> bytearray:
    """A file's bytes, refused before reading if it is larger than ``limit``.

    Read into a new bytearray, which nothing else holds, so that a raw IDX file's array
    can be a view of it (:func:`_parse_idx`) instead of a copy.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise CorruptFileError(f"{path}: {size} bytes, more than the {limit} an IDX file "
                                   f"of this kind can take; refused")
        blob = bytearray(size)
        got = handle.readinto(blob)
    del blob[got:]  # the file shrank since fstat: keep what was read, the checks judge it
    return blob


def _parse_idx(payload: bytes | bytearray, where: str) -> np.ndarray:
    """Array from decompressed IDX bytes; only uint8 labels (1-D) and images (3-D).

    The array is writable. It is a view of ``payload`` when that is a bytearray (a
    buffer read or inflated for this call, which nothing else holds), else a copy.
    """
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
    expected = math.prod(dims)  # Python ints: int64 would wrap for dims such as 2^22, 2^22, 2^20
    actual = len(payload) - header
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise CorruptFileError(
            f"{where}: {what}: header dims {dims} call for {expected} data bytes, "
            f"file has {actual}"
        )
    array = np.frombuffer(payload, dtype=np.uint8, offset=header).reshape(dims)
    return array if isinstance(payload, bytearray) else array.copy()  # bytes: read-only


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
    _write_idx(Path(os.fspath(path)), _check_idx_array(array))


def _write_idx(path: Path, array: np.ndarray) -> str:
    """:func:`write_idx` on checked arguments; returns the SHA-256 of the raw IDX bytes."""
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
    return digest


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

    A file with the official number of examples must be the official file of
    ``dataset`` (its ``.gz`` digest or its content digest), whatever the manifest says:
    MNIST and Fashion-MNIST share file names, so a manifest entry cannot vouch for one.
    A smaller file (a subset) must match the digest the manifest recorded, if any.

    Neither the file nor its decompressed content may exceed the official file's size
    (subsets are smaller), so a hostile file cannot exhaust memory.
    """
    where = str(path)
    limit = _official_size(dataset, stem)
    blob = _read_bounded(path, limit + limit // 100 + 1024)  # gzip may add a little
    digest = _sha256(blob)
    known = KNOWN_FILES[dataset][stem]
    payload = _decompress(blob, where, limit)
    array = _parse_idx(payload, where)
    _check_kind(array, stem, where)
    if array.shape[0] == known.count:
        if digest == known.gz_sha256:
            return array
        content = digest if payload is blob else _sha256(payload)  # a raw file: hashed once
        if content != known.raw_sha256:
            raise ChecksumError(
                f"{where}: holds {known.count} examples like the official "
                f"{_PRETTY[dataset]} file, but its content SHA-256 {content} is not "
                f"the official {known.raw_sha256}"
            )
        return array
    _check_subset_source(array, dataset, stem, where)
    recorded = _read_manifest(path.parent).get(path.name)
    if recorded is not None and recorded != digest:
        raise ChecksumError(
            f"{where}: SHA-256 {digest} differs from {recorded} recorded in "
            f"{MANIFEST_NAME} when it was written; the file changed or is damaged"
        )
    return array


def _check_subset_source(array: np.ndarray, dataset: str, stem: str, where: str) -> None:
    """Refuse a subset of images that begins with the first image of the other dataset's
    file of the same name: MNIST and Fashion-MNIST share file names, so a subset cut from
    the front of one (``x[:1000]``) can land in the other's folder. A subset that starts
    with neither dataset's first image (the user's own selection) is read as it is."""
    if array.ndim != 3 or array.shape[0] == 0:
        return
    first = _sha256(np.ascontiguousarray(array[0]).tobytes())
    for other, files in KNOWN_FILES.items():
        if other != dataset and files[stem].first_sha256 == first:
            raise CorruptFileError(
                f"{where}: its first image is the first image of {_PRETTY[other]}'s "
                f"{stem}, so it holds {_PRETTY[other]}, not {_PRETTY[dataset]}; move it to "
                f"the {other} folder"
            )


def _not_a_file(path: Path) -> str:
    if path.is_dir():
        return f"{path} is a directory, not an IDX file"
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken symbolic link"
    return f"{path} is not a regular file"


def _read_stem(directory: Path, dataset: str, stem: str,
               keep_inflated: bool = False) -> tuple[np.ndarray, Path] | None:
    """The array of ``stem`` from ``<stem>.gz`` or, failing that, the raw ``<stem>``.

    A raw ``<stem>`` that npvae inflated from the ``.gz`` beside it is read first while
    that ``.gz`` is still the one it came from (the manifest records the ``.gz``'s
    SHA-256, which takes 7 ms to check for MNIST's training images): it is the same
    content without the inflating, which takes most of a load (0.21 of 0.25 s). A copy
    of another ``.gz``, or of one that is gone, is never read. With ``keep_inflated``, a
    ``.gz`` read here leaves such a copy for the next load, unless a raw file that npvae
    did not write is in the way (it is never replaced).

    None if neither exists. A ``.gz`` that is damaged, fails its checksum or is not a
    file does not hide a good raw file beside it, nor the other way round; if no entry
    can be read, the error names each one.
    """
    gz, raw = directory / (stem + ".gz"), directory / stem
    entry = _manifest_entries(directory).get(stem)
    ours = entry is not None and entry[1].startswith(_inflated_source(stem))
    gz_digest = None  # taken before the .gz is read: if it changes meanwhile, the copy is stale
    if ours or keep_inflated:
        limit = _official_size(dataset, stem)
        gz_digest = _file_sha256(gz, limit + limit // 100 + 1024)
    fresh = ours and gz_digest is not None and entry[1] == _inflated_source(stem, gz_digest)
    order = (raw, gz) if fresh else (gz,) if ours else (gz, raw)
    problems = []
    for path in order:
        if path.is_file():
            try:
                array = _read_checked(path, dataset, stem)
            except (CorruptFileError, OSError) as exc:
                problems.append(exc)
                continue
            if (keep_inflated and path == gz and gz_digest is not None
                    and (ours or not (raw.exists() or raw.is_symlink()))):
                _keep_inflated(directory, stem, array, gz_digest)
            return array, path
        if path.exists() or path.is_symlink():
            problems.append(IsADirectoryError(_not_a_file(path)) if path.is_dir()
                            else CorruptFileError(_not_a_file(path)))
    if not problems:
        return None
    first = problems[0]
    if len(problems) == 1:
        raise first
    raise type(first)("; ".join(str(p) for p in problems))


def _keep_inflated(directory: Path, stem: str, array: np.ndarray, gz_digest: str) -> None:
    """Write ``array`` (just read from ``<stem>.gz``, whose SHA-256 is ``gz_digest``) as
    the raw ``<stem>``, recorded in the manifest as inflated from it. Best effort: a
    read-only or full cache folder only leaves later loads inflating the ``.gz`` again."""
    try:
        digest = _write_idx(directory / stem, array)
        _record(directory, stem, digest, _inflated_source(stem, gz_digest))
    except (OSError, CorruptFileError):
        pass


def _load_from_dir(directory: Path, dataset: str, split: str,
                   keep_inflated: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split from a folder; raises if missing or bad.

    ``keep_inflated``: leave a raw copy of each ``.gz`` read (see :func:`_read_stem`);
    npvae asks for it in its own cache folder only.
    """
    image_stem, label_stem = _split_stems(split)
    found = {stem: _read_stem(directory, dataset, stem, keep_inflated)
             for stem in (image_stem, label_stem)}
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
