"""Time the default `npvae train` end to end against a PyTorch script of the same run.

    python benchmarks/bench_run.py               # 2 alternating runs per side, 30 epochs
    python benchmarks/bench_run.py --runs 3 --epochs 10

This is what a user runs: `npvae train` with its defaults, a 784-400-20 ReLU Bernoulli VAE
on MNIST for 30 epochs, 55,000 training images (5,000 held out), batch 128, Adam 1e-3,
dynamic binarization (a fresh binary sample of each image on every visit), validation
on the held-out images after every epoch, a checkpoint after every epoch, and the test
ELBO at the end. The PyTorch side does the same run in a plain script: the same split of
the same data, the same initial weights (copied from npvae's), dynamic binarization, a
validation ELBO, a checkpoint (`torch.save` of model and optimizer) and a metrics line
after every epoch, and the test ELBO at the end. It makes no figures; npvae does, and
their time is counted against npvae.

Each side is one fresh process per run (the npvae side is the `npvae` command itself,
with the compiled kernels already cached), the sides alternate, and the script prints
per side: the whole process's wall time, the training loop's time (the epochs and their
validation), the second and the last epoch, and the ratios. The second epoch is the
reference for drift because the first one includes warming up; on a machine whose speed
wanders from minute to minute, the median of epochs 2-6 against the median of the last
five says more than two single epochs, and is printed too.

PyTorch is optional (``pip install torch==2.13.0``); without it only npvae is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

EVAL_BATCH = 1000


# ----------------------------------------------------------------------------------
# The PyTorch twin of `npvae train` (run as: bench_run.py --worker torch OUT_DIR)


def torch_run(out_dir: Path, epochs: int, seed: int, threads: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from npvae import data
    from npvae.models import BernoulliVAE

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    # -- data: the split npvae's command line makes (uint8 kept, scaled per batch)
    images, labels = data.load("mnist", "train")
    x = images.reshape(len(images), -1)
    (x_tr, _), (x_va, _) = data.train_val_split(x, labels, 5000, seed=0)
    xt = torch.from_numpy(np.ascontiguousarray(x_tr))
    gen = torch.Generator().manual_seed(seed)
    x_val = torch.bernoulli(torch.from_numpy(x_va).float().div_(255), generator=gen)
    test_images, _ = data.load("mnist", "test")
    x_test = torch.bernoulli(torch.from_numpy(test_images.reshape(len(test_images), -1))
                             .float().div_(255), generator=gen)

    # -- model: npvae's initial weights
    init = BernoulliVAE(hidden=[400], latent=20, rng=seed)

    def linear(key):
        W, b = init.params[f"{key}.W"], init.params[f"{key}.b"]
        lin = torch.nn.Linear(*W.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W.T.copy()))
            lin.bias.copy_(torch.from_numpy(b.copy()))
        return lin

    enc0, enc1, dec0, dec1 = (linear(k) for k in ("enc.0", "enc.1", "dec.0", "dec.1"))
    model = torch.nn.ModuleList([enc0, enc1, dec0, dec1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def negative_elbo(xb):
        """(loss, recon, kl), each a batch mean in nats per image."""
        h = enc1(torch.relu(enc0(xb)))
        mu, logvar = h[:, :20], h[:, 20:]
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = dec1(torch.relu(dec0(z)))
        recon = F.binary_cross_entropy_with_logits(logits, xb, reduction="sum") / len(xb)
        kl = 0.5 * torch.sum(mu.pow(2) + logvar.exp() - logvar - 1.0) / len(xb)
        return recon + kl, recon, kl

    def evaluate(xs):
        with torch.no_grad():
            total = 0.0
            for i in range(0, len(xs), EVAL_BATCH):
                total += float(negative_elbo(xs[i:i + EVAL_BATCH])[0]) * len(xs[i:i + EVAL_BATCH])
        return -total / len(xs)

    history = []
    metrics = out_dir / "metrics.jsonl"
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(xt), generator=gen)
        sums = 0.0
        for i in range(0, len(xt), 128):
            xb = torch.bernoulli(xt[perm[i:i + 128]].float().div_(255), generator=gen)
            loss, _, _ = negative_elbo(xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += float(loss) * len(xb)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        row = dict(epoch=epoch + 1, train_loss=sums / len(xt), val_elbo=evaluate(x_val),
                   seconds=seconds, val_seconds=time.perf_counter() - t1)
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()},
                   out_dir / "checkpoint.pt")
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        history.append(row)
    test_elbo = evaluate(x_test)
    return dict(history=history, test_elbo=test_elbo,
                in_process_seconds=time.perf_counter() - t_start)


# ----------------------------------------------------------------------------------
# The driver


def run_npvae(args, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        # `python -m npvae` is the `npvae` command, found without the environment's bin on PATH
        cmd = [sys.executable, "-m", "npvae", "train", "--out", str(out), "--seed", str(seed),
               "--no-progress"]
        if args.epochs != 30:
            cmd += ["--epochs", str(args.epochs)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(args.threads))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"npvae train failed:\n{proc.stderr[-2000:]}")
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        elbo = float(proc.stdout.split("test ELBO ")[1].split()[0])
    return dict(wall=wall, history=history, test_elbo=elbo)


def run_torch(args, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--worker", tmp, "--epochs", str(args.epochs),
               "--threads", str(args.threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd + ["--seed", str(seed)], capture_output=True, text=True,
                              env=thread_env(args.threads))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"the PyTorch run failed:\n{proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(wall=wall, history=res["history"], test_elbo=res["test_elbo"])


def thread_env(threads: int) -> dict:
    """The environment of either side's process: BLAS, OpenMP and Numba at ``threads``."""
    n = str(threads)
    return dict(os.environ, OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, NUMBA_NUM_THREADS=n)


def loop_seconds(history) -> float:
    return sum(r["seconds"] + r.get("val_seconds", 0.0) for r in history)


def summarize(name, runs) -> dict:
    med = statistics.median
    s = dict(wall=med(r["wall"] for r in runs), loop=med(loop_seconds(r["history"]) for r in runs),
             second=med(r["history"][min(1, len(r["history"]) - 1)]["seconds"] for r in runs),
             last=med(r["history"][-1]["seconds"] for r in runs),
             early=med(t for r in runs for t in epoch_seconds(r["history"])[1:6]),
             late=med(t for r in runs for t in epoch_seconds(r["history"])[-5:]),
             elbo=statistics.mean(r["test_elbo"] for r in runs))
    print(f"  {name:<6} process {s['wall']:6.1f} s  training loop {s['loop']:6.1f} s  "
          f"epoch 2 {s['second']:5.2f} s  last epoch {s['last']:5.2f} s "
          f"(last/second {s['last'] / s['second']:.2f})  test ELBO {s['elbo']:.2f}")
    print(f"  {'':<6} median of epochs 2-6 {s['early']:5.2f} s, of the last five "
          f"{s['late']:5.2f} s (late/early {s['late'] / s['early']:.2f}: drift, less "
          f"sensitive to one slow epoch than last/second)")
    return s


def epoch_seconds(history) -> list:
    """Each epoch's training time (without its validation), in order."""
    return [r["seconds"] for r in history]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2, help="alternating runs per side")
    p.add_argument("--epochs", type=int, default=30, help="epochs per run (npvae's default: 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="threads of both sides (BLAS, OpenMP and Numba; PyTorch's intra-op)")
    p.add_argument("--worker", metavar="OUT_DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the drift figures compare later epochs with the second")
    if args.worker:
        print(json.dumps(torch_run(Path(args.worker), args.epochs, args.seed, args.threads)))
        return 0
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
        print("PyTorch is not installed (pip install torch==2.13.0): timing npvae alone.")
    print(describe())
    print(f"default run: 784-400-20 ReLU Bernoulli VAE, {args.epochs} epochs, batch 128, "
          f"dynamic binarization, validation every epoch; {args.runs} alternating runs per side")
    subprocess.run([sys.executable, "-m", "npvae", "train", "--epochs", "1", "--limit", "256",
                    "--no-progress", "--out", tempfile.mkdtemp() + "/warm"],
                   capture_output=True)  # kernel cache
    results = {"npvae": [], "torch": []}
    for r in range(args.runs):
        order = ["npvae", "torch"] if r % 2 == 0 else ["torch", "npvae"]
        for side in order:
            if side == "torch" and not have_torch:
                continue
            runner = run_npvae if side == "npvae" else run_torch
            results[side].append(runner(args, args.seed + r))
    summary = {side: summarize(side, rs) for side, rs in results.items() if rs}
    a = summary["npvae"]
    each = [r["history"][-1]["seconds"] / r["history"][1]["seconds"] for r in results["npvae"]]
    print(f"  npvae last epoch / second epoch: {a['last'] / a['second']:.3f} "
          f"(run by run: {', '.join(f'{q:.3f}' for q in each)})")
    if "torch" in summary:
        b = summary["torch"]
        pairs = [x["wall"] / y["wall"] for x, y in zip(results["npvae"], results["torch"])]
        print(f"  ratio npvae/torch, whole process: {a['wall'] / b['wall']:.3f} "
              f"(run by run: {', '.join(f'{q:.3f}' for q in pairs)})")
        print(f"  ratio npvae/torch, training loop: {a['loop'] / b['loop']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
