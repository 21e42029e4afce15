"""Trained models shipped inside the package: ``npvae eval pretrained:NAME`` and
``npvae sample pretrained:NAME`` work straight after ``pip install``.

Each model is two files in this folder:

    NAME.npz    its parameters only, float32, one member per parameter (``enc.0.W``, ...)
    NAME.json   the model's config, the data settings its numbers need (dataset,
                binarization, seed), how it was trained, and a check: the test NLL of
                the first 500 test images with k = 100, as ``npvae eval pretrained:NAME
                --k 100 --limit 500`` prints it

Both files' SHA-256 hashes are written below, and :func:`load` refuses a file whose hash
differs. The archive is read with ``allow_pickle=False``, so loading never runs code, and
every member must have exactly the name, shape and dtype the config gives, and be finite.

To ship a new model: ``python -m npvae.pretrained.export RUN NAME``, then paste the
hashes it prints into :data:`SHIPPED`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..checkpoint import CheckpointError

PREFIX = "pretrained:"
HERE = Path(__file__).resolve().parent

# name: (sha256 of NAME.npz, sha256 of NAME.json)
SHIPPED = {
    "vae-bernoulli": ("8fdfc58c5843ed8900dd06ffb111c6140094432a8e6550d168a23074279637e7",
                      "4432b8f80771bd0b44e7fd2172fe07a4d4d0032acb3616ebdfacc8ca8f27e387"),
    "vae-k1": ("0619f56d2843d1a30658be6f9061125c98029e57b0e0b74bfb433752ceaa244f",
               "01d876bb66c74f9a0b1162674dd2bdffeb0586d2333e04d734fa53562de876d3"),
    "iwae-k5": ("42690484c72e94cc81ff3e55449061ef9a1c8a10954b3c35dba51f3c0706bc88",
                "cbfd1d9bbd2c425e751789bef82672364854dd0692ea07ff22a059cc83046193"),
}


class PretrainedError(CheckpointError):
    """A shipped model that does not exist, or whose files are not the ones shipped."""


class Pretrained(NamedTuple):
    """What the command line needs of a run, for a shipped model."""

    path: Path  # NAME.npz
    model: object
    args: dict  # dataset, binarize, seed, dtype: as a run's settings
    info: dict  # the whole NAME.json
    epoch: int


def is_pretrained(text) -> bool:
    return str(text).startswith(PREFIX)


def names() -> list:
    return sorted(SHIPPED)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files(name: str) -> tuple[Path, Path]:
    """The two files of a shipped model, NAME.npz and NAME.json (after checking the name)."""
    if name not in SHIPPED:
        raise PretrainedError(f"no shipped model {name!r}; the shipped models are "
                              f"{', '.join(PREFIX + n for n in names())}")
    return HERE / f"{name}.npz", HERE / f"{name}.json"


def _verified(path: Path, expected: str) -> bytes:
    if not path.is_file():
        raise PretrainedError(f"{path}: missing from the installed package (reinstall npvae)")
    blob = path.read_bytes()
    got = hashlib.sha256(blob).hexdigest()
    if got != expected:
        raise PretrainedError(f"{path}: SHA-256 {got} is not the shipped file's {expected}; "
                              f"the file was changed or damaged (reinstall npvae)")
    return blob


def load(spec: str) -> Pretrained:
    """``"pretrained:NAME"`` (or ``"NAME"``) -> the model with its shipped parameters."""
    import io

    from ..models import build

    name = spec[len(PREFIX):] if is_pretrained(spec) else spec
    npz_path, json_path = files(name)
    npz_hash, json_hash = SHIPPED[name]
    info = json.loads(_verified(json_path, json_hash).decode("utf-8"))
    blob = _verified(npz_path, npz_hash)
    model = build(info["config"], rng=0)
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if set(arrays) != set(model.params):
        raise PretrainedError(f"{npz_path}: parameters {sorted(arrays)} do not match the config's "
                              f"{sorted(model.params)}")
    for key, value in arrays.items():
        want = model.params[key]
        if value.shape != want.shape or value.dtype != want.dtype or not np.isfinite(value).all():
            raise PretrainedError(f"{npz_path}: {key} must be a finite {want.dtype} array of "
                                  f"shape {want.shape}, got {value.dtype} {value.shape}")
        want[...] = value
    return Pretrained(npz_path, model, dict(info["settings"]), info, int(info["training"]["epochs"]))
