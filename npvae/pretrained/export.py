"""Ship a trained run: its parameters as NAME.npz (float32) and NAME.json beside it.

    python -m npvae.pretrained.export RUN NAME [--command "npvae train ..."]

Writes npvae/pretrained/NAME.npz and NAME.json, and, when missing, the check's data
fixture tests/data/mnist-test-500.npz (the first 500 test images as the run's evaluation
binarizes them, bit-packed). Prints the two SHA-256 hashes to paste into
``npvae.pretrained.SHIPPED``. The check recorded in NAME.json is the test NLL of those
500 images with k = 100 and the evaluation's noise, what ``npvae eval pretrained:NAME
--k 100 --limit 500`` prints.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import numpy as np

from . import HERE

FIXTURE = HERE.parents[1] / "tests" / "data" / "mnist-test-500.npz"
CHECK_N, CHECK_K = 500, 100
CHECK_TOLERANCE = 1e-3  # nats: float32 decoding rounds differently on other CPUs and BLAS;
# the largest drift measured was 2.3e-5 (AVX-512, AVX2 and AVX code, both backends)


def check_images(settings: dict) -> np.ndarray:
    """The first CHECK_N test images as ``npvae eval`` sees them, from the fixture."""
    with np.load(FIXTURE, allow_pickle=False) as f:
        if int(f["seed"]) != int(settings["seed"]) or str(f["binarize"]) != settings["binarize"]:
            raise ValueError(f"{FIXTURE}: binarized with seed {int(f['seed'])} "
                             f"({f['binarize']}), the model's evaluation uses seed "
                             f"{settings['seed']} ({settings['binarize']})")
        bits = np.unpackbits(f["bits"], axis=1, count=int(f["dim"]))
    return bits.astype(settings["dtype"])  # (500, 784) of 0 and 1


def make_fixture(settings: dict) -> None:
    from ..cli import _test_set

    _, _, x_test = _test_set(settings)
    x = x_test[:CHECK_N]
    if not np.isin(x, (0.0, 1.0)).all():
        raise ValueError("the check fixture holds binarized images only")
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURE, bits=np.packbits(x.astype(np.uint8), axis=1), dim=x.shape[1],
                        seed=int(settings["seed"]), binarize=settings["binarize"])


def check_nll(model, settings: dict) -> dict:
    """Test NLL and ELBO of the fixture's images with k = CHECK_K, the evaluation's noise."""
    from ..cli import EVAL_BATCH
    from ..evaluate import evaluate_all
    from ..train import side_rng

    x = check_images(settings)
    res = evaluate_all(model, x, side_rng(settings["seed"], "test-noise"), k=CHECK_K,
                       batch_size=EVAL_BATCH)
    return dict(test_images=CHECK_N, k=CHECK_K, nll=res["nll"], elbo=res["elbo"],
                tolerance=CHECK_TOLERANCE)


def main(argv=None) -> int:
    from ..checkpoint import load_checkpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("name")
    p.add_argument("--command", default="", help="the npvae train command of the run")
    a = p.parse_args(argv)
    ck = load_checkpoint(a.run)
    if ck.position is not None:
        raise SystemExit(f"{a.run}: stopped inside an epoch; ship a run at an epoch's end")
    settings = {k: ck.args[k] for k in ("dataset", "binarize", "seed", "dtype")}
    if not FIXTURE.exists():
        make_fixture(settings)
    params = {k: np.asarray(v, dtype=np.float32) for k, v in ck.model.params.items()}
    model = ck.model
    if model.dtype != np.float32:
        raise SystemExit("ship float32 models only")
    history = ck.history
    info = dict(
        name=a.name, config=model.config, settings=settings,
        training=dict(epochs=ck.epoch, steps=ck.step, command=a.command,
                      schedule=ck.args.get("schedule", "constant"),
                      batch_size=ck.args.get("batch_size"),
                      train_seconds=round(sum(r.get("seconds", 0.0) for r in history), 1),
                      val_elbo=history[-1].get("val_elbo") if history else None),
        check=check_nll(model, settings),
    )
    buf = io.BytesIO()
    np.savez_compressed(buf, **params)
    npz_path, json_path = HERE / f"{a.name}.npz", HERE / f"{a.name}.json"
    npz_path.write_bytes(buf.getvalue())
    json_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    hashes = [hashlib.sha256(path.read_bytes()).hexdigest() for path in (npz_path, json_path)]
    print(f"wrote {npz_path} ({npz_path.stat().st_size:,} bytes) and {json_path}")
    print(f"check: NLL {info['check']['nll']:.4f} on {CHECK_N} test images, k = {CHECK_K}")
    print(f'    "{a.name}": ("{hashes[0]}",\n        "{hashes[1]}"),')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
