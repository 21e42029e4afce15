"""Train the same VAE in npvae and in PyTorch, side by side, and print the ratios.

    python benchmarks/bench_train.py                  # A for 10 epochs and B for 3, 3 runs each
    python benchmarks/bench_train.py --config A --epochs 10 --runs 3   # A alone
    python benchmarks/bench_train.py --config A --flush   # subnormals flushed on both sides

Both sides get the same data (MNIST, grey-level targets, the same batches in the same
order), the same initial weights (PyTorch's are copied from npvae's), Adam with the same
settings, the same batch size, thread count and number of steps. Each run is a fresh
worker process per side, so peak resident memory is measured per side; runs alternate
between the sides so that drift in the machine's speed hits both equally.

Peak memory is the peak of training: each worker reads it when its last epoch ends, before
the test loss. Both sides are scored by npvae's evaluator, which would otherwise load
Numba and its compiler into the PyTorch process and count them against PyTorch. The test
images stay bytes until then, on both sides, as the training images do.

Whole runs, not one epoch: a run is 10 epochs (A) or 3 (B) unless --epochs says
otherwise, and the script prints the first and the last epoch of each side, so that a
slowdown that builds up over a run (subnormal floats, on CPUs that pay for them) shows.
Ratios compare the whole run's training time. With --flush both sides also set the
processor's flush-to-zero and denormals-are-zero flags (``torch.set_flush_denormal``),
which is how PyTorch users avoid subnormal slowdowns; npvae needs no flag, as its
optimizer flushes its moments in the arithmetic (docs/derivations.md, FTZ.1).

Configurations
  A  784-400-20, ReLU, batch 128   the pytorch/examples VAE
  B  784-200-200-50, tanh, batch 20   the MLP of the IWAE paper (Burda et al. 2015)

The script also times the *matrix-product floor*: the step's matrix products alone, in
NumPy, with the same shapes and the same BLAS thread count as npvae's step (one thread
when every product is small, as `npvae.threads.blas_threads_for` decides); an npvae step
cannot be faster than that. The step against its floor is printed twice: the whole
runs' medians, from separate processes run minutes apart, and the two interleaved in one
process (one more worker per run), in alternating blocks of 25 steps, which the machine's
changes of speed touch alike.

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

CONFIGS = {
    "A": dict(hidden=[400], latent=20, activation="relu", batch=128, epochs=10),
    "B": dict(hidden=[200, 200], latent=50, activation="tanh", batch=20, epochs=3),
}


def peak_rss_mb() -> float:
    """VmHWM: the peak resident set size of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def load_data(limit_train: int):
    """Training images as uint8 (N, 784): each side's loop scales a batch at a time (as
    npvae's training loop and a PyTorch MNIST dataset both do). The test images are loaded
    after training, as `npvae train` does, when the trained model is scored (:func:`test_loss`)."""
    import numpy as np

    from npvae import data

    xtr, _ = data.load("mnist", "train")
    return np.ascontiguousarray(xtr.reshape(len(xtr), -1)[:limit_train])


def batches(n: int, batch: int, epoch: int, seed: int):
    """The same shuffled batches for both sides: numpy permutation per epoch."""
    import numpy as np

    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]


def make_npvae(cfg, seed):
    import numpy as np

    from npvae.models import BernoulliVAE

    return BernoulliVAE(hidden=cfg["hidden"], latent=cfg["latent"],
                        activation=cfg["activation"], dtype=np.float32, rng=seed)


def test_loss(model) -> float:
    """Negative ELBO in nats per test example (one posterior sample), by npvae's evaluator,
    on the test images (uint8) scaled to [0, 1]."""
    import numpy as np

    from npvae import data
    from npvae.evaluate import elbo

    xte, _ = data.load("mnist", "test")
    xte = xte.reshape(len(xte), -1)
    return float(-elbo(model, data.to_unit(xte, model.dtype), np.random.default_rng(123))["elbo"])


# ----------------------------------------------------------------------------------
# Workers: one side, one process


def set_flush(args) -> None:
    """--flush: the processor's FTZ/DAZ flags for this (main) thread, as PyTorch sets them."""
    if args.flush:
        import torch

        if not torch.set_flush_denormal(True):
            raise SystemExit("this CPU has no flush-to-zero mode")


def npvae_stepper(cfg, args):
    """npvae's training step as the training loop takes it, warmed up: a function of a
    batch's indices, and the epoch's batches for an epoch number."""
    import numpy as np

    from npvae.data import PackedImages
    from npvae.optim import Adam
    from npvae.train import _Batches

    # as `npvae train` keeps them: packed (a third of the bytes), a batch at a time turned
    # into floats in [0, 1] by the training loop's own batch maker
    xtr = PackedImages.pack(load_data(args.limit), width=28)
    source = _Batches(xtr, np.float32, cfg["batch"], "none", args.seed)
    state = {}

    def start():
        state["model"] = make_npvae(cfg, args.seed)
        state["opt"] = Adam(state["model"].params, lr=1e-3)
        state["rng"] = np.random.default_rng(args.seed)
        state["grads"] = state["model"].params.empty_like()

    def step(idx):
        xb = source.fill(idx, state["rng"])  # (B, 784) in [0, 1]
        _, grads, _ = state["model"].loss_and_grads(xb, rng=state["rng"], out=state["grads"])
        state["opt"].step(grads)

    start()
    for idx in batches(len(xtr), cfg["batch"], 999_999, args.seed)[:20]:
        step(idx)  # warm up: kernels loaded, buffers touched
    start()  # then start over from the shared init
    step.model = lambda: state["model"]
    return step, lambda epoch: batches(len(xtr), cfg["batch"], epoch, args.seed)


def worker_npvae(cfg, args):
    set_flush(args)
    from npvae.memory import keep_freed_memory

    keep_freed_memory()  # as npvae's command line does before any work (npvae/memory.py)

    from npvae.threads import blas_threads, blas_threads_for

    step, plan_of = npvae_stepper(cfg, args)
    times = []
    # as npvae's training loop does: one BLAS thread when the products are small
    with blas_threads(blas_threads_for(step.model().params, cfg["batch"])):
        for epoch in range(args.epochs):
            plan = plan_of(epoch)
            t0 = time.perf_counter()
            for idx in plan:
                step(idx)
            times.append(time.perf_counter() - t0)
    peak = peak_rss_mb()  # the peak of training, before the evaluator runs
    return dict(epoch_seconds=times, test_loss=test_loss(step.model()), peak_rss_mb=peak)


def worker_torch(cfg, args):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    set_flush(args)
    xtr = load_data(args.limit)
    init = make_npvae(cfg, args.seed)  # npvae's initial weights, copied below
    z_dim = cfg["latent"]

    def layers(prefix):
        out, i = [], 0
        while f"{prefix}.{i}.W" in init.params:
            lin = torch.nn.Linear(*init.params[f"{prefix}.{i}.W"].shape)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(init.params[f"{prefix}.{i}.W"].T.copy()))
                lin.bias.copy_(torch.from_numpy(init.params[f"{prefix}.{i}.b"].copy()))
            out.append(lin)
            i += 1
        return torch.nn.ModuleList(out)

    act = torch.relu if cfg["activation"] == "relu" else torch.tanh
    enc, dec = layers("enc"), layers("dec")

    def mlp(net, h):
        for i, lin in enumerate(net):
            h = lin(h)
            if i < len(net) - 1:
                h = act(h)
        return h

    params = list(enc.parameters()) + list(dec.parameters())
    xt = torch.from_numpy(xtr)

    def make_opt():
        return torch.optim.Adam(params, lr=1e-3)

    def step(opt, idx):
        x = xt[idx].float().div_(255)
        h = mlp(enc, x)
        mu, logvar = h[:, :z_dim], h[:, z_dim:]
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = mlp(dec, z)
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = 0.5 * torch.sum(mu.pow(2) + logvar.exp() - logvar - 1.0)
        loss = (rec + kl) / x.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    warm = make_opt()
    snapshot = [p.detach().clone() for p in params]
    for idx in batches(len(xtr), cfg["batch"], 999_999, args.seed)[:20]:
        step(warm, torch.from_numpy(idx))
    with torch.no_grad():  # start over from the shared init
        for p, s in zip(params, snapshot):
            p.copy_(s)
    opt = make_opt()
    torch.manual_seed(args.seed)
    times = []
    for epoch in range(args.epochs):
        plan = [torch.from_numpy(i) for i in batches(len(xtr), cfg["batch"], epoch, args.seed)]
        t0 = time.perf_counter()
        for idx in plan:
            step(opt, idx)
        times.append(time.perf_counter() - t0)
    peak = peak_rss_mb()  # the peak of training: scoring below loads npvae's Numba kernels
    # evaluate with npvae's evaluator, so both sides are scored identically
    for prefix, net in (("enc", enc), ("dec", dec)):
        for i, lin in enumerate(net):
            init.params[f"{prefix}.{i}.W"] = lin.weight.detach().numpy().T
            init.params[f"{prefix}.{i}.b"] = lin.bias.detach().numpy()
    return dict(epoch_seconds=times, test_loss=test_loss(init), peak_rss_mb=peak)


def floor_step(cfg, args):
    """The step's matrix products alone, in NumPy, with the step's shapes: a function
    doing one step's worth, and the BLAS thread count npvae's step uses for them."""
    import numpy as np

    from npvae.ops.linear import input_grad
    from npvae.threads import blas_threads_for

    rng = np.random.default_rng(0)
    b, z = cfg["batch"], cfg["latent"]
    enc_sizes = [784, *cfg["hidden"], 2 * z]
    dec_sizes = [z, *cfg["hidden"][::-1], 784]
    f32 = np.float32
    Ws = [rng.standard_normal((i, o)).astype(f32) for s in (enc_sizes, dec_sizes)
          for i, o in zip(s[:-1], s[1:])]
    n_enc = len(enc_sizes) - 1
    x = rng.standard_normal((b, 784)).astype(f32)
    zz = rng.standard_normal((b, z)).astype(f32)

    def step():
        hs = [x]
        for W in Ws[:n_enc]:
            hs.append(hs[-1] @ W)
        hd = [zz]
        for W in Ws[n_enc:]:
            hd.append(hd[-1] @ W)
        for chain, Wl in ((hd, Ws[n_enc:]), (hs, Ws[:n_enc])):
            d = chain[-1]
            for i in reversed(range(len(Wl))):
                _ = chain[i].T @ d  # dW
                if i > 0 or chain is hd:
                    d = input_grad(d, Wl[i])  # dx, as the step takes it (skipped for the data input)
                else:
                    break

    return step, blas_threads_for(make_npvae(cfg, args.seed).params, b)


def worker_floor(cfg, args):
    """The step's matrix products alone for one epoch's worth of steps, with BLAS at the
    thread count npvae's step uses for these shapes."""
    from npvae.threads import blas_threads

    step, threads = floor_step(cfg, args)
    steps = 60000 // cfg["batch"]
    times = []
    with blas_threads(threads):
        for _ in range(50):
            step()
        for _ in range(args.epochs):
            t0 = time.perf_counter()
            for _ in range(steps * args.limit // 60000):
                step()
            times.append(time.perf_counter() - t0)
    return dict(epoch_seconds=times)


def worker_interleaved(cfg, args):
    """npvae's training step and the floor's products in one process, in alternating
    blocks of ``BLOCK`` steps (which goes first alternates too), for ``args.epochs``
    epochs' worth of each: the machine's changes of speed, which on a shared virtual
    machine move whole runs by a third, then touch both alike."""
    from npvae.memory import keep_freed_memory
    from npvae.threads import blas_threads

    keep_freed_memory()
    npvae_step, plan_of = npvae_stepper(cfg, args)
    floor, threads = floor_step(cfg, args)
    t_npvae, t_floor = [], []
    with blas_threads(threads):
        for _ in range(50):
            floor()
        for epoch in range(args.epochs):
            plan = plan_of(epoch)
            for k, first in enumerate(range(0, len(plan), BLOCK)):
                block = plan[first:first + BLOCK]
                for side in ("npvae", "floor") if k % 2 == 0 else ("floor", "npvae"):
                    t0 = time.perf_counter()
                    if side == "npvae":
                        for idx in block:
                            npvae_step(idx)
                        t_npvae.append(time.perf_counter() - t0)
                    else:
                        for _ in block:
                            floor()
                        t_floor.append(time.perf_counter() - t0)
    return dict(npvae_seconds=t_npvae, floor_seconds=t_floor)


BLOCK = 25  # steps per block of the interleaved measurement


WORKERS = {"npvae": worker_npvae, "torch": worker_torch, "floor": worker_floor,
           "interleaved": worker_interleaved}


def run_worker(side, config, args, seed) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", side, "--config", config,
           "--epochs", str(args.epochs), "--limit", str(args.limit),
           "--seed", str(seed), "--threads", str(args.threads)] + (["--flush"] if args.flush else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"  {side} worker failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), action="append",
                   help="A and/or B (default: both)")
    p.add_argument("--runs", type=int, default=3, help="alternating runs per side (median reported)")
    p.add_argument("--epochs", type=int, help="epochs per run (default 10 for A, 3 for B)")
    p.add_argument("--limit", type=int, default=60000, help="training images per epoch")
    p.add_argument("--seed", type=int, default=0, help="run r uses seed + r on both sides")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flush", action="store_true",
                   help="both sides: flush subnormals with the processor flag (needs torch)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        cfg = CONFIGS[args.config[0]]
        print(json.dumps(WORKERS[args.worker](cfg, args)))
        return 0

    torch_ok = have_torch()
    print(describe())
    if not torch_ok:
        print("PyTorch is not installed (pip install torch==2.13.0): timing npvae alone.")
    epochs_given = args.epochs
    for config in args.config or sorted(CONFIGS):
        cfg = CONFIGS[config]
        args.epochs = epochs_given or cfg["epochs"]
        print(f"\nconfig {config}: 784-{'-'.join(map(str, cfg['hidden']))}-{cfg['latent']} "
              f"{cfg['activation']}, batch {cfg['batch']}, Adam 1e-3, {args.limit} images/epoch, "
              f"{args.threads} threads, {args.runs} alternating runs x {args.epochs} epochs"
              + (", subnormals flushed by the processor flag on both sides" if args.flush else ""))
        results = {"npvae": [], "torch": [], "floor": []}
        for r in range(args.runs):
            order = ["npvae", "torch"] if r % 2 == 0 else ["torch", "npvae"]
            for side in order + ["floor"]:
                if side == "torch" and not torch_ok:
                    continue
                res = run_worker(side, config, args, args.seed + r)  # run r: seed + r, both sides
                if res is not None:
                    results[side].append(res)
        report(results, flushed=args.flush)
        inter = [run_worker("interleaved", config, args, args.seed + r) for r in range(args.runs)]
        report_interleaved([res for res in inter if res is not None])
    return 0


def report(results, flushed: bool = False) -> None:
    """Per side: the median over runs of the whole run, its first and last epoch; ratios.

    With ``flushed`` the npvae worker imported PyTorch to set the flag, so its peak
    memory includes PyTorch's and the memory ratio is not printed."""
    run_s = {s: statistics.median(sum(res["epoch_seconds"]) for res in rs)
             for s, rs in results.items() if rs}
    first = {s: statistics.median(res["epoch_seconds"][0] for res in rs)
             for s, rs in results.items() if rs}
    last = {s: statistics.median(res["epoch_seconds"][-1] for res in rs)
            for s, rs in results.items() if rs}
    for side in ("npvae", "torch", "floor"):
        if side not in run_s:
            continue
        rs = results[side]
        extra = ""
        if "test_loss" in rs[-1]:
            losses = [r["test_loss"] for r in rs]
            extra = (f"  final test loss mean {statistics.mean(losses):.2f} "
                     f"({', '.join(f'{v:.2f}' for v in losses)})"
                     f"  peak RSS {statistics.median(r['peak_rss_mb'] for r in rs):.0f} MiB")
        print(f"  {side:<6} run {run_s[side]:7.2f} s  first epoch {first[side]:6.3f} s  "
              f"last epoch {last[side]:6.3f} s  (last/first {last[side] / first[side]:.2f}){extra}")
    for side in ("npvae", "torch"):  # every epoch, so that drift over a run shows
        if side in run_s:
            per_epoch = [statistics.median(ep) for ep in zip(*(r["epoch_seconds"]
                                                              for r in results[side]))]
            print(f"  {side:<6} epochs: {' '.join(f'{t:.2f}' for t in per_epoch)} s")
    if "torch" in run_s and "npvae" in run_s:
        pairs = [sum(a["epoch_seconds"]) / sum(b["epoch_seconds"])
                 for a, b in zip(results["npvae"], results["torch"])]
        print(f"  ratio npvae/torch run time:   {run_s['npvae'] / run_s['torch']:.3f}  "
              f"(run by run: {', '.join(f'{p:.3f}' for p in pairs)})")
        if flushed:  # the flag came from torch.set_flush_denormal: npvae's worker holds torch
            print("  ratio npvae/torch peak RSS:   not comparable with --flush "
                  "(the npvae worker imported PyTorch to set the flag)")
        else:
            rss = statistics.median(r["peak_rss_mb"] for r in results["npvae"]) / \
                statistics.median(r["peak_rss_mb"] for r in results["torch"])
            print(f"  ratio npvae/torch peak RSS:   {rss:.3f}")
    if "floor" in run_s and "npvae" in run_s:
        print(f"  ratio npvae/matmul floor:     {run_s['npvae'] / run_s['floor']:.3f}")


def report_interleaved(runs) -> None:
    """The step against its floor with the two interleaved in one process (per run: total
    of the step's blocks over the floor's; and the median of the block pairs' ratios)."""
    if not runs:
        return
    totals = [sum(r["npvae_seconds"]) / sum(r["floor_seconds"]) for r in runs]
    pairs = [a / b for r in runs for a, b in zip(r["npvae_seconds"], r["floor_seconds"])]
    q = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
    print(f"  ratio npvae/matmul floor, interleaved in one process ({BLOCK}-step blocks): "
          f"{statistics.median(totals):.3f}  (run by run: {', '.join(f'{t:.3f}' for t in totals)}; "
          f"block pairs: median {q[1]:.3f}, quartiles {q[0]:.3f}-{q[2]:.3f}, {len(pairs)} pairs)")


if __name__ == "__main__":
    sys.exit(main())
