"""How long Adam's update takes when its arrays were last touched a while ago.

    python benchmarks/bench_adam_cache.py [--calls 200]

Adam over configuration A's 652,824 float32 parameters reads p, g, m and v (10.4 MB) and
writes p, m and v. Called back to back, those arrays stay in the processor's caches. In a
training step they were last touched one step earlier, a few milliseconds before, with
the step's other work in between. This times the update after a pause of 0 to 10 ms in
which the process touches no memory (sleeping, or spinning on the clock), then after a
64 MB read that pushes the arrays out of every cache. If the update slows down after an
idle pause, something other than the process (another guest, the host) evicts its data
from the shared last-level cache in that time. Medians of ``--calls`` calls, in ms.
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

from machine import describe  # noqa: E402

from npvae.optim import adam_kernel  # noqa: E402

N_PARAMS = 652_824  # configuration A


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    f32 = np.float32
    rng = np.random.default_rng(0)
    params, grads = rng.standard_normal(N_PARAMS).astype(f32), rng.standard_normal(N_PARAMS).astype(f32)
    m, v = np.zeros(N_PARAMS, f32), np.zeros(N_PARAMS, f32)
    hyper = (f32(1e-3), f32(0.9), f32(0.1), f32(0.999), f32(1e-3), f32(0.5), f32(0.3), f32(1e-8),
             f32(0), np.finfo(f32).tiny)
    big = np.ones(16 << 20, f32)  # 64 MB, larger than the last-level cache

    def update():
        adam_kernel(params, grads, m, v, *hyper)

    def timed_after(pause) -> float:
        spent = []
        for _ in range(args.calls):
            pause()
            t0 = time.perf_counter()
            update()
            spent.append(time.perf_counter() - t0)
        return statistics.median(spent) * 1e3

    def spin(seconds):
        def pause():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                pass
        return pause

    update()  # compile or load the kernel
    print(describe())
    print(f"\nAdam over {N_PARAMS:,} float32 parameters, median of {args.calls} calls, ms")
    print(f"  {'before each call':<40} {'ms':>7}")
    print(f"  {'nothing (back to back)':<40} {timed_after(lambda: None):7.3f}")
    for ms in (0.5, 2.0, 10.0):
        print(f"  {f'sleeping {ms:g} ms':<40} {timed_after(lambda s=ms / 1e3: time.sleep(s)):7.3f}")
        print(f"  {f'spinning on the clock {ms:g} ms':<40} {timed_after(spin(ms / 1e3)):7.3f}")
    print(f"  {'reading 64 MB':<40} {timed_after(lambda: big.sum()):7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
