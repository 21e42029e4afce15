"""Time every compiled kernel against its NumPy twin, on the shapes of a real step.

    python benchmarks/bench_kernels.py [--repeat 200]

Shapes are those of configuration A (784-400-20, batch 128) unless a kernel needs its own:
VQ assignment uses 512 rows of size 64 against 512 codes; Adam and the sum of squares run
over the 652,824 parameters of configuration A. Times are medians of ``--repeat`` calls,
in microseconds, after one warm-up call (which compiles or loads the kernel).
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

from npvae.ops import activations, kl, likelihoods, vq  # noqa: E402
from npvae import optim  # noqa: E402
from npvae.memory import keep_freed_memory  # noqa: E402


def cases(rng):
    f32 = np.float32
    logits = rng.normal(size=(128, 784)).astype(f32)
    x = rng.uniform(size=(128, 784)).astype(f32)
    a = rng.normal(size=(128, 400)).astype(f32)
    b = rng.normal(size=400).astype(f32)
    h = np.tanh(a)
    mu, lv = rng.normal(size=(128, 20)).astype(f32), rng.normal(size=(128, 20)).astype(f32)
    z_e, codebook = rng.normal(size=(512, 64)).astype(f32), rng.normal(size=(512, 64)).astype(f32)
    n = 652_824
    p, g = rng.normal(size=n).astype(f32), rng.normal(size=n).astype(f32)
    m, v = np.zeros(n, f32), np.full(n, 1e-3, f32)
    adam = (f32(1e-3), f32(0.9), f32(0.1), f32(0.999), f32(1e-3), f32(0.5), f32(0.3), f32(1e-8), f32(0),
            np.finfo(np.float32).tiny)
    idx = rng.integers(512, size=512)
    out = np.empty_like(a)
    return [
        ("bernoulli likelihood + grad (128x784)", likelihoods.bernoulli_kernel, (logits, x)),
        ("KL to N(0, I) (128x20)", kl.kl_kernel, (mu, lv)),
        ("KL gradient (128x20)", kl.kl_grad_kernel, (mu, mu, np.exp(lv))),
        ("bias + relu (128x400)", activations.bias_act_kernel, (a, b, 0, f32(0.01), out)),
        ("bias + tanh (128x400)", activations.bias_act_kernel, (a, b, 2, f32(0.01), out)),
        ("relu gradient (128x400)", activations.act_grad_kernel, (a, h, 0, f32(0.01), out)),
        ("bias gradient, column sum (128x400)", activations.col_sum_kernel, (a, np.empty(400, f32))),
        ("likelihood backward, rows x dlogp (128x784)", likelihoods.scale_rows_kernel,
         (logits, np.full(128, -1 / 128, f32))),
        ("tanh gradient (128x400)", activations.act_grad_kernel, (a, h, 2, f32(0.01), out)),
        ("VQ assignment (512x64, K=512)", vq.assign_kernel, (z_e, codebook, vq.EUCLIDEAN)),
        ("VQ scatter-add (512x64 -> 512)", vq.scatter_rows_kernel, (idx, z_e, 512)),
        ("Adam update (652,824 params)", optim.adam_kernel, (p, g, m, v, *adam)),
        ("sum of squares (652,824 params)", optim.sumsq_kernel, (g,)),
    ]


def median_us(fn, args, repeat):
    fn(*args)  # compile or load, and touch the memory
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args(argv)
    keep_freed_memory()  # as the command line does: a kernel's new arrays reuse freed memory
    rng = np.random.default_rng(0)
    print(describe())
    print(f"median of {args.repeat} calls each")
    print(f"{'kernel':<46}{'numba us':>10}{'numpy us':>10}{'numpy/numba':>13}")
    for name, kernel, kargs in cases(rng):
        t_numba = median_us(kernel.numba, kargs, args.repeat)
        t_numpy = median_us(kernel.numpy, kargs, args.repeat)
        print(f"{name:<46}{t_numba:10.1f}{t_numpy:10.1f}{t_numpy / t_numba:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
