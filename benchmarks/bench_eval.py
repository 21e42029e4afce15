"""Time the importance-weighted log-likelihood: k samples for each of the 10,000 MNIST test images.

    python benchmarks/bench_eval.py [--k 1000] [--run runs/vae-bernoulli-...]

The model is the pytorch/examples architecture (784-400-20, ReLU, Bernoulli decoder,
float32): from a run's checkpoint when ``--run`` is given, freshly initialised otherwise
(the cost does not depend on the weights). Test images are binarized once, as `npvae eval`
does for a binarized run. Prints the wall time and the estimate.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from npvae import data, evaluate  # noqa: E402
from npvae.checkpoint import load_checkpoint  # noqa: E402
from npvae.models import BernoulliVAE  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--run", help="a run directory whose checkpoint to evaluate")
    p.add_argument("--limit", type=int, default=10000, help="test images")
    args = p.parse_args(argv)
    model = load_checkpoint(args.run).model if args.run else BernoulliVAE(hidden=(400,), latent=20)
    images, _ = data.load("mnist", "test")
    x = data.binarize_static(data.to_unit(images, model.dtype)[: args.limit], "sample", rng=0)
    evaluate.iw_log_likelihood(model, x[:10], k=10, rng=0)  # kernels ready
    t0 = time.perf_counter()
    res = evaluate.iw_log_likelihood(model, x, k=args.k, rng=0)
    seconds = time.perf_counter() - t0
    print(f"importance-weighted log p(x), k = {args.k}, {len(x):,} test images: "
          f"{seconds:.1f} s  (log p(x) = {res['log_px']:.2f} nats)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
