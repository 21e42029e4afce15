"""Time the importance-weighted log-likelihood: k samples for each of the 10,000 MNIST test images.

    python benchmarks/bench_eval.py [--k 1000] [--run runs/vae-bernoulli-... | --untrained]

The model is the pytorch/examples architecture (784-400-20, ReLU, Bernoulli decoder,
float32): by default the trained one shipped with npvae (pretrained:vae-bernoulli), from a
run's checkpoint with ``--run``, or freshly initialised with ``--untrained``. For a float32
model the weights do not change the work (its likelihood is one compiled pass, IW.7); on
NumPy's path (float64, or NPVAE_BACKEND=numpy) a decoder with logits below the exp cut
(log(tiny) + 1, IW.6) costs one more pass in those chunks. Test images are binarized once,
as `npvae eval` does for a binarized run. Prints the wall time and the estimate, then the time of the
*matrix-product floor*: the products alone (the encoder's once per image, the decoder's
for every one of the N k samples, in chunks of the size the estimator uses, and the
likelihood's batched product (x - 1/2).l of IW.6), in NumPy with the same shapes, and
laid out as the estimator lays them out: batches of examples shared by one thread per
core (at most 2), BLAS at one thread in each. On a 2-core AMD EPYC Zen 4 that layout did
these products in about 0.6 of the time one thread with two BLAS threads took. The
estimate cannot be faster than that floor; the ratio says how much the sampling, the
likelihood and the log-sum-exp add. The two are timed alternately, --runs times each,
and the medians are compared.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
sys.path.insert(0, str(Path(__file__).resolve().parent))

import statistics  # noqa: E402

from machine import describe  # noqa: E402

from npvae import data, evaluate  # noqa: E402
from npvae.checkpoint import load_checkpoint  # noqa: E402
from npvae.models import BernoulliVAE  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--run", default="pretrained:vae-bernoulli",
                   help="a run directory whose checkpoint to evaluate, or pretrained:NAME "
                        "(default: the shipped vae-bernoulli)")
    p.add_argument("--untrained", action="store_true", help="a freshly initialised model instead")
    p.add_argument("--limit", type=int, default=10000, help="test images")
    p.add_argument("--runs", type=int, default=1, help="alternating runs of each")
    args = p.parse_args(argv)
    if args.untrained:
        model = BernoulliVAE(hidden=(400,), latent=20)
    elif args.run.startswith("pretrained:"):
        from npvae import pretrained

        model = pretrained.load(args.run.split(":", 1)[1]).model
    else:
        model = load_checkpoint(args.run).model
    if "enc.0.W" not in model.params or model.config.get("likelihood") != "bernoulli":
        p.error(f"{args.run} holds a {model.kind} model: the floor is written for the MLP "
                f"VAEs with a Bernoulli decoder (vae-bernoulli, iwae)")
    images, _ = data.load("mnist", "test")
    x = data.binarize_static(data.to_unit(images, model.dtype)[: args.limit], "sample", rng=0)
    p_args = dict(k=args.k, rng=0)
    evaluate.iw_log_likelihood(model, x[:10], k=10, rng=0)  # kernels ready
    print(describe())
    print(f"model: {'untrained' if args.untrained else args.run} ({model.kind}, {model.dtype})")
    est, floor = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        res = evaluate.iw_log_likelihood(model, x, **p_args)
        est.append(time.perf_counter() - t0)
        floor.append(matmul_floor(model, len(x), args.k))
    e, f = statistics.median(est), statistics.median(floor)
    print(f"importance-weighted log p(x), k = {args.k}, {len(x):,} test images: "
          f"{e:.1f} s  (log p(x) = {res['log_px']:.2f} nats; runs: "
          f"{', '.join(f'{t:.1f}' for t in est)} s)")
    print(f"matrix-product floor: {f:.1f} s  (runs: {', '.join(f'{t:.1f}' for t in floor)} s)")
    print(f"ratio estimate / floor: {e / f:.3f}")
    return 0


def matmul_floor(model, n: int, k: int, workers: int | None = None) -> float:
    """Seconds for the estimator's matrix products alone, with random matrices of the
    model's shapes: per batch of examples, the encoder once, then for each chunk of
    min(k, 128) samples the decoder and the batched product (x - 1/2).l (IW.6). Batches
    are as iw_log_likelihood makes them (IW_ROWS // chunk examples, the last one smaller)
    and run on ``workers`` threads (default: as the estimator, one per core, at most 2)
    with BLAS at one thread each."""
    from concurrent.futures import ThreadPoolExecutor

    from npvae.threads import blas_threads

    rng = np.random.default_rng(0)
    dtype = model.dtype
    chunk = min(k, 128)
    per_batch = max(1, evaluate.IW_ROWS // chunk)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    ws = {name: rng.standard_normal(w.shape).astype(dtype) for name, w in model.params.items()
          if name.endswith(".W")}
    enc = [ws[f"enc.{i}.W"] for i in range(sum(n.startswith("enc.") for n in ws))]
    dec = [ws[f"dec.{i}.W"] for i in range(sum(n.startswith("dec.") for n in ws))]
    d = dec[-1].shape[1]
    x = rng.standard_normal((per_batch, enc[0].shape[0])).astype(dtype)
    z = rng.standard_normal((per_batch * chunk, dec[0].shape[0])).astype(dtype)

    def one_batch(bounds):
        b = bounds[1] - bounds[0]
        h = x[:b]
        for W in enc:
            h = h @ W
        for first in range(0, k, chunk):
            c = min(chunk, k - first)
            h = z[: b * c]
            for W in dec:
                h = h @ W
            np.matmul(h.reshape(b, c, d), x[:b, :d, None])  # (B, C, 1)  as (x - 1/2).l

    batches = list(evaluate._batches(n, per_batch))
    t0 = time.perf_counter()
    one_batch(batches[0])  # the estimator also runs its first batch alone
    with blas_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one_batch, batches[1:]))
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
