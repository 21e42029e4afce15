"""Does the default run slow down over its epochs, or does the machine? The run, epoch by
epoch, beside a fixed reference timed after every epoch.

    python benchmarks/bench_drift.py               # the default run: 30 epochs
    python benchmarks/bench_drift.py --epochs 10

The run is `npvae train`'s with its defaults (the same settings, data, model and
training loop, in this process). After each epoch the script times a reference that
does not change over the run: 150 rounds of four matrix products of a step's shapes on
fixed random inputs. A machine whose speed wanders (a virtual machine sharing its cores
and caches with other guests) moves both; a slowdown of npvae's own, such as subnormal
numbers piling up in its state, moves the epoch and not the reference. The script prints
each epoch's time, the reference's and their quotient, then the last over the second
epoch and the median of the last five over the median of epochs 2-6, raw and divided by
the reference. The reference is timed between epochs, so a machine that switches
between a quick and a slow phase within an epoch can still move the quotient; the
printed epochs then show which epochs ran in the same phase.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402


def reference_seconds(rounds: int = 150) -> float:
    """Four products of a configuration-A step's shapes on fixed inputs, ``rounds`` times."""
    import numpy as np

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((784, 400)).astype(np.float32)
    w2 = rng.standard_normal((400, 784)).astype(np.float32)
    x = rng.standard_normal((128, 784)).astype(np.float32)
    h = rng.standard_normal((128, 400)).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(rounds):
        a = x @ w1  # (128, 400)
        b = h @ w2  # (128, 784)
        h.T @ b  # (400, 784)
        x.T @ a  # (784, 400)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: npvae train's)")
    args = p.parse_args(argv)

    from npvae.memory import keep_freed_memory

    keep_freed_memory()  # as the command line does before any work
    from npvae.cli_common import load_training_data
    from npvae.models import build
    from npvae.train import train
    from npvae.train_settings import model_config, new_run_settings

    s = new_run_settings({} if args.epochs is None else {"epochs": args.epochs})
    x_train, x_val = load_training_data(s, packed=True)
    steps = -(-len(x_train) // s["batch_size"])
    model = build(model_config(s, x_train.shape[1], steps), rng=s["seed"])
    print(describe())
    print(f"the default run: {s['epochs']} epochs of {len(x_train):,} images, batch "
          f"{s['batch_size']}, binarization {s['binarize']}; reference: 150 rounds of four "
          f"products after each epoch")
    rows = []

    def after_epoch(row):
        ref = reference_seconds()
        rows.append((row["seconds"], ref))
        print(f"  epoch {row['epoch']:3d}  {row['seconds']:6.3f} s  reference {ref:.3f} s  "
              f"epoch / reference {row['seconds'] / ref:6.2f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        train(model, x_train, x_val, epochs=s["epochs"], batch_size=s["batch_size"],
              lr=s["lr"], optimizer=s["optimizer"], clip=s["clip"], seed=s["seed"],
              binarize=s["binarize"], run_dir=tmp, progress=False, verbose=False,
              on_epoch_end=after_epoch, schedule=s.get("schedule", "constant"))
    if len(rows) < 2:
        return 0
    raw = [t for t, _ in rows]
    scaled = [t / r for t, r in rows]
    print(f"last / second epoch:  raw {raw[-1] / raw[1]:.3f}  against the reference "
          f"{scaled[-1] / scaled[1]:.3f}")
    if len(rows) >= 10:
        late_early = [statistics.median(v[-5:]) / statistics.median(v[1:6]) for v in (raw, scaled)]
        print(f"median of the last five / median of epochs 2-6:  raw {late_early[0]:.3f}  "
              f"against the reference {late_early[1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
