"""Train the convolutional VAE in npvae and in PyTorch, side by side, and print the ratio.

    python benchmarks/bench_conv.py                 # 2 alternating runs per side, 1 epoch
    python benchmarks/bench_conv.py --epochs 3 --limit 20000

Both sides: 28x28 -> 32 ch 4x4/2 -> 64 ch 4x4/2 -> dense -> z (20) and back through
transposed convolutions, Bernoulli decoder on dynamically binarized MNIST, batch 128,
Adam 1e-3, the same initial weights (PyTorch's copied from npvae's), the same batches,
2 threads. PyTorch uses oneDNN for its convolutions. Each side runs in its own process
and the sides alternate; the script prints every epoch's time and the ratio of whole
runs, with the CPU.

PyTorch is optional (``pip install torch==2.13.0``); without it only npvae is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

BATCH = 128


def data(limit):
    import numpy as np

    from npvae import data as npdata

    x, _ = npdata.load("mnist", "train")
    return np.ascontiguousarray(x.reshape(len(x), -1)[:limit])


def plan(n, epoch, seed):
    import numpy as np

    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]


def worker_npvae(args):
    import numpy as np

    from npvae.models import ConvVAE
    from npvae.optim import Adam

    from npvae.memory import keep_freed_memory

    keep_freed_memory()  # as npvae's command line does before any work (npvae/memory.py)
    x = data(args.limit)
    model = ConvVAE(rng=args.seed)
    opt = Adam(model.params, lr=1e-3)
    rng = np.random.default_rng(args.seed)
    buf = model.params.empty_like()
    xb = np.empty((BATCH, 784), np.float32)
    times = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        for idx in plan(len(x), epoch, args.seed):
            np.divide(x[idx], np.float32(255), out=xb)
            xb[...] = rng.random(xb.shape, dtype=np.float32) < xb  # dynamic binarization
            _, grads, _ = model.loss_and_grads(xb, rng=rng, out=buf)
            opt.step(grads)
        times.append(time.perf_counter() - t0)
    return dict(epoch_seconds=times)


def worker_torch(args):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from npvae.models import ConvVAE

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x = torch.from_numpy(data(args.limit))
    init = ConvVAE(rng=args.seed).params
    nn = torch.nn
    enc = nn.ModuleList([nn.Conv2d(1, 32, 4, 2, 1), nn.Conv2d(32, 64, 4, 2, 1)])
    enc_fc, dec_fc = nn.Linear(3136, 40), nn.Linear(20, 3136)
    dec = nn.ModuleList([nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ConvTranspose2d(32, 1, 4, 2, 1)])
    with torch.no_grad():  # npvae's initial weights; its dense W is (in, out), torch's (out, in)
        for i, layer in enumerate(enc):
            layer.weight.copy_(torch.from_numpy(init[f"enc.conv{i}.w"].copy()))
            layer.bias.copy_(torch.from_numpy(init[f"enc.conv{i}.b"].copy()))
        for i, layer in enumerate(dec):
            layer.weight.copy_(torch.from_numpy(init[f"dec.convT{i}.w"].copy()))
            layer.bias.copy_(torch.from_numpy(init[f"dec.convT{i}.b"].copy()))
        for layer, name in ((enc_fc, "enc.fc"), (dec_fc, "dec.fc")):
            layer.weight.copy_(torch.from_numpy(init[f"{name}.W"].T.copy()))
            layer.bias.copy_(torch.from_numpy(init[f"{name}.b"].copy()))
    params = [p for m in (enc, enc_fc, dec_fc, dec) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    times = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        for idx in plan(len(x), epoch, args.seed):
            xb = torch.bernoulli(x[torch.from_numpy(idx)].float().div_(255))
            h = xb.view(-1, 1, 28, 28)
            for layer in enc:
                h = torch.relu(layer(h))
            e = enc_fc(h.flatten(1))
            mu, logvar = e[:, :20], e[:, 20:]
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            h = torch.relu(dec_fc(z)).view(-1, 64, 7, 7)
            h = dec[1](torch.relu(dec[0](h)))
            rec = F.binary_cross_entropy_with_logits(h.flatten(1), xb, reduction="sum")
            kl = 0.5 * torch.sum(mu.pow(2) + logvar.exp() - logvar - 1.0)
            loss = (rec + kl) / len(xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return dict(epoch_seconds=times)


WORKERS = {"npvae": worker_npvae, "torch": worker_torch}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=60000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0
    print(describe())
    try:
        import torch  # noqa: F401
        sides = ["npvae", "torch"]
    except ImportError:
        sides = ["npvae"]
        print("PyTorch is not installed (pip install torch==2.13.0): timing npvae alone.")
    results = {s: [] for s in sides}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for r in range(args.runs):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            cmd = [sys.executable, __file__, "--worker", side, "--epochs", str(args.epochs),
                   "--limit", str(args.limit), "--seed", str(args.seed + r),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"{side} failed:\n{out.stderr[-2000:]}")
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs = {s: [sum(r["epoch_seconds"]) for r in rs] for s, rs in results.items()}
    for side, rs in results.items():
        epochs = [statistics.median(e) for e in zip(*(r["epoch_seconds"] for r in rs))]
        print(f"  {side:<6} run {statistics.median(runs[side]):7.2f} s  epochs: "
              f"{' '.join(f'{t:.2f}' for t in epochs)} s")
    if "torch" in runs:
        pairs = [a / b for a, b in zip(runs["npvae"], runs["torch"])]
        print(f"  ratio npvae/torch: {statistics.median(runs['npvae']) / statistics.median(runs['torch']):.3f}"
              f"  (run by run: {', '.join(f'{q:.3f}' for q in pairs)}; target <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
