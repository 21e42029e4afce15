"""Where the time of one training step goes, part by part, beside its matrix-product floor.

    python benchmarks/profile_step.py                 # configuration A, 2 epochs of steps
    python benchmarks/profile_step.py --config B --epochs 1

The step is bench_train.py's npvae step, which is the training loop's: the batch from the
packed images, ``loss_and_grads``, Adam. Each part of it is timed where the step calls it,
by wrapping the function the step looks up (the batch maker, the checks, the noise, the
likelihood, reparameterization and KL, bias + activation, the two MLP passes, Adam), so
the code timed is the code that trains. After every step the floor's products run once
in the same process (bench_train.floor_step), and so do the largest products one by one.

The MLP passes are timed whole, and their bias + activation calls inside them too; what
is left of a pass is its matrix products and the short loop around them, and what is
left of the step beyond all the parts is Python between them. Each part's median over
all steps is printed in ms, and as a multiple of the floor's median. The wrappers cost about a
microsecond each, a few dozen a step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

# (module, name, label) of each function the step calls that is timed on its own
TIMED = [
    ("npvae.train", "_Batches.fill", "the batch"),
    ("npvae.models.base", "Model.check_x", "checking the batch"),
    ("npvae.models.base", "Model.noise", "the noise"),
    ("npvae.models.base", "mlp_forward", "MLP forward passes"),
    ("npvae.models.base", "mlp_backward", "MLP backward passes"),
    ("npvae.ops.mlp", "bias_activation_forward", "bias + activation, forward"),
    ("npvae.ops.mlp", "bias_activation_backward", "bias + activation, backward"),
    ("npvae.models.vae", "likelihood_forward", "likelihood and its gradient"),
    ("npvae.models.vae", "likelihood_backward", "likelihood, backward (scaling)"),
    ("npvae.models.vae", "reparameterize_forward", "reparameterization, forward"),
    ("npvae.models.vae", "reparameterize_backward", "reparameterization, backward"),
    ("npvae.models.vae", "gaussian_kl_forward", "KL, forward"),
    ("npvae.models.vae", "gaussian_kl_backward", "KL, backward"),
    ("npvae.optim", "Adam.step", "Adam"),
]
NESTED = {"MLP forward passes": "bias + activation, forward",
          "MLP backward passes": "bias + activation, backward"}


def install_timers(spent: dict) -> None:
    """Wrap each TIMED function in place so that its calls add their seconds to spent[label]."""
    import importlib

    for module_name, dotted, label in TIMED:
        owner = importlib.import_module(module_name)
        *path, name = dotted.split(".")
        for part in path:
            owner = getattr(owner, part)
        inner = getattr(owner, name)

        def timed(*args, _inner=inner, _label=label, **kwargs):
            t0 = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - t0

        setattr(owner, name, timed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["A", "B"], default="A")
    p.add_argument("--epochs", type=int, default=2, help="epochs of steps timed")
    p.add_argument("--limit", type=int, default=60000, help="training images per epoch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import numpy as np

    import bench_train as bt
    from npvae.memory import keep_freed_memory
    from npvae.ops.linear import input_grad
    from npvae.threads import blas_threads

    keep_freed_memory()  # as npvae's command line does
    cfg = bt.CONFIGS[args.config]
    spent = defaultdict(float)
    install_timers(spent)  # before the step is built, so that it calls the wrappers
    step, plan_of = bt.npvae_stepper(cfg, args)
    floor, threads = bt.floor_step(cfg, args)

    # the largest products alone, with the step's shapes (binary-like input for the first)
    rng = np.random.default_rng(0)
    f32, b, h = np.float32, cfg["batch"], cfg["hidden"]
    x = (rng.random((b, 784)) < 0.19).astype(f32)
    w_in, w_out = (rng.standard_normal(s).astype(f32) for s in ((784, h[0]), (h[0], 784)))
    hid, dout = rng.standard_normal((b, h[0])).astype(f32), rng.standard_normal((b, 784)).astype(f32)
    alone = {"x W (first layer)": lambda: x @ w_in, "h W (last layer)": lambda: hid @ w_out,
             "h^T d (last layer's dW)": lambda: hid.T @ dout,
             "d W^T (last layer's dx)": lambda: input_grad(dout, w_out),
             "x^T d (first layer's dW)": lambda: x.T @ hid}

    rows = defaultdict(list)
    with blas_threads(threads):
        for epoch in range(args.epochs):
            for idx in plan_of(epoch):
                spent.clear()
                t0 = time.perf_counter()
                step(idx)
                whole = time.perf_counter() - t0
                rows["the whole step"].append(whole)
                for label, seconds in spent.items():
                    rows[label].append(seconds)
                for outer, inner in NESTED.items():  # a pass without its bias + activation
                    rows[outer + ", less bias + activation"].append(spent[outer] - spent[inner])
                top = sum(v for k, v in spent.items() if k not in NESTED.values())
                rows["the rest (Python between the parts)"].append(whole - top)
                t0 = time.perf_counter()
                floor()
                rows["the floor's products"].append(time.perf_counter() - t0)
                for label, product in alone.items():
                    t0 = time.perf_counter()
                    product()
                    rows["alone: " + label].append(time.perf_counter() - t0)

    med = {label: statistics.median(v) for label, v in rows.items()}  # each part's own median
    floor_s = med["the floor's products"]

    print(describe())
    print(f"\nconfig {args.config}: 784-{'-'.join(map(str, h))}-{cfg['latent']} "
          f"{cfg['activation']}, batch {b}, BLAS at {'one thread' if threads == 1 else 'the threads the environment sets'}; "
          f"medians over {len(rows['the whole step'])} steps (each part's own median, so the "
          f"parts need not add up to the step)")
    print(f"  {'part':<46} {'ms':>7} {'x floor':>8}")
    order = ([label for _, _, label in TIMED if label in med and label not in NESTED]
             + [k for k in med if k.endswith("less bias + activation")]
             + ["the rest (Python between the parts)", "the whole step", "the floor's products"]
             + [k for k in med if k.startswith("alone: ")])
    for label in order:
        print(f"  {label:<46} {med[label] * 1e3:7.3f} {med[label] / floor_s:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
