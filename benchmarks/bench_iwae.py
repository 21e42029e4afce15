"""The cost of the IWAE objective against the VAE's, per training step of the same size.

The IWAE paper's MLP (784-200-200-50 tanh), batch 50, binarized MNIST-like data, one
thread of BLAS as training uses at this size. A step is loss_and_grads plus Adam's
update. The two models alternate, repeat after repeat, so a machine shared with other
work slows both alike; the ratio is the median of the per-repeat ratios.

    python benchmarks/bench_iwae.py [--k 5] [--repeats 7] [--steps 100]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from machine import describe
from npvae.models import IWAE, BernoulliVAE
from npvae.optim import Adam
from npvae.threads import blas_threads, blas_threads_for

ARCH = dict(data_dim=784, hidden=(200, 200), latent=50, activation="tanh")


def steps_seconds(model, batches, rng) -> float:
    opt = Adam(model.params, lr=1e-3, eps=1e-4)
    grads = model.params.empty_like()
    t0 = time.perf_counter()
    for xb in batches:
        _, g, _ = model.loss_and_grads(xb, rng=rng, out=grads)
        opt.step(g)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=100)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    batches = [(rng.random((a.batch_size, 784), dtype=np.float32) < 0.13).astype(np.float32)
               for _ in range(a.steps)]
    vae, iwae = BernoulliVAE(**ARCH), IWAE(**ARCH, k=a.k)
    times = {"vae": [], "iwae": []}
    with blas_threads(blas_threads_for(vae.params, a.batch_size)):
        steps_seconds(vae, batches[:5], rng), steps_seconds(iwae, batches[:5], rng)  # warm-up
        for _ in range(a.repeats):
            times["vae"].append(steps_seconds(vae, batches, rng))
            times["iwae"].append(steps_seconds(iwae, batches, rng))
    ratios = [i / v for v, i in zip(times["vae"], times["iwae"])]
    ms = {name: 1e3 * statistics.median(t) / a.steps for name, t in times.items()}
    print(f"batch {a.batch_size}, 784-200-200-50 tanh: VAE step {ms['vae']:.2f} ms, "
          f"IWAE k={a.k} step {ms['iwae']:.2f} ms, ratio {statistics.median(ratios):.2f}x "
          f"(median of {a.repeats} alternating repeats of {a.steps} steps)")
    print(describe())


if __name__ == "__main__":
    main()
