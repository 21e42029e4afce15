"""The two ways of taking a layer's input gradient dx = dy W^T (LIN.2), side by side.

    python benchmarks/bench_input_grad.py            # products, then configuration B's step
    python benchmarks/bench_input_grad.py --no-step  # products only

``npvae.ops.linear.input_grad`` takes dy W^T directly, or, in float32 for a small batch
and a wide input (N < SMALL_BATCH, I >= WIDE_INPUT), as (W dy^T)^T copied into rows. This prints,
for several batch sizes and layer shapes, the time of the second way over the first
(below 1: the second is faster), with BLAS on one thread and on the environment's
threads, and marks the cases where input_grad takes the second way. Then it runs
configuration B's training step (bench_train.py's, 784-200-200-50 tanh, batch 20, BLAS
on one thread as npvae picks it) with input_grad's switch on and off, in alternating
blocks of 100 steps, and prints the median of the blocks' time ratios (on / off).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import median_us  # noqa: E402
from machine import describe  # noqa: E402

from npvae.ops import linear  # noqa: E402
from npvae.threads import blas_threads  # noqa: E402

SHAPES = [(200, 784), (400, 784), (200, 200), (100, 400), (64, 784)]  # (I, O) of W
BATCHES = [8, 20, 32, 50, 64, 128]


def products(threads, dtype) -> None:
    rng = np.random.default_rng(0)
    label = "one BLAS thread" if threads == 1 else "BLAS threads as the environment sets"
    print(f"\n(W dy^T)^T over dy W^T, {np.dtype(dtype).name}, {label}; * = input_grad takes (W dy^T)^T")
    print(f"  {'N':>4}  " + "  ".join(f"{f'{i}x{o}':>9}" for i, o in SHAPES))
    with blas_threads(threads):
        for n in BATCHES:
            cells = []
            for i, o in SHAPES:
                W = rng.standard_normal((i, o)).astype(dtype)
                dy = rng.standard_normal((n, o)).astype(dtype)
                ways = {"direct": lambda: dy @ W.T,
                        "other": lambda: np.ascontiguousarray((W @ dy.T).T)}
                spent = {k: [] for k in ways}
                for rep in range(4):  # alternate which way goes first
                    for k in (list(ways) if rep % 2 else list(ways)[::-1]):
                        for _ in range(10):
                            ways[k]()
                        spent[k].append(median_us(ways[k], (), 200))
                ratio = statistics.median(spent["other"]) / statistics.median(spent["direct"])
                mark = "*" if linear.by_transpose(dy, W) else " "
                cells.append(f"{ratio:8.2f}{mark}")
            print(f"  {n:>4}  " + "  ".join(cells))


def step_on_off(blocks: int) -> None:
    import bench_train as bt
    from npvae.threads import blas_threads_for

    class Args:
        limit, seed = 60000, 0

    cfg = bt.CONFIGS["B"]
    step, plan_of = bt.npvae_stepper(cfg, Args)
    plan = plan_of(0)
    switch = linear.SMALL_BATCH
    per_block, spent = 100, {"on": [], "off": []}
    with blas_threads(blas_threads_for(step.model().params, cfg["batch"])):
        for k in range(blocks):
            first = (k * per_block) % (len(plan) - per_block)
            for side in (("on", "off") if k % 2 else ("off", "on")):
                linear.SMALL_BATCH = switch if side == "on" else 0
                t0 = time.perf_counter()
                for idx in plan[first:first + per_block]:
                    step(idx)
                spent[side].append((time.perf_counter() - t0) / per_block)
    linear.SMALL_BATCH = switch
    ratios = [a / b for a, b in zip(spent["on"], spent["off"])]
    q1, q3 = np.percentile(ratios, [25, 75])
    print(f"\nconfiguration B's step, input_grad's switch on / off, {blocks} block pairs of "
          f"{per_block} steps: median {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f}); "
          f"steps {statistics.median(spent['on']) * 1e3:.3f} ms on, "
          f"{statistics.median(spent['off']) * 1e3:.3f} ms off")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-step", action="store_true", help="time the products only")
    p.add_argument("--blocks", type=int, default=40, help="block pairs of B's step")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="the products' dtype (npvae takes the transposed way in float32 only)")
    args = p.parse_args(argv)
    print(describe())
    for threads in (1, None):
        products(threads, args.dtype)
    if not args.no_step:
        step_on_off(args.blocks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
