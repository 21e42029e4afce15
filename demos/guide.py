"""The runs behind docs/guide.md: posterior collapse and what changes it, codebook collapse
and what fixes it. Each run is one `npvae train` command, printed before it runs.

    python demos/guide.py            # all of them, about fifteen minutes on 2 cores
    python demos/guide.py vq-dot     # just one (names below)
"""
import json
import sys

from common import ROOT, main

RUNS = {
    # posterior collapse: a unit-variance Gaussian decoder makes pixels cheap, the KL dear
    "gauss": ["--model", "vae-gaussian"],
    "gauss-warmup": ["--model", "vae-gaussian", "--warmup", "10epochs"],
    "gauss-freebits": ["--model", "vae-gaussian", "--free-bits", "0.5"],
    "gauss-sharp": ["--model", "vae-gaussian", "--sigma2", "0.01"],
    # beta: a heavier KL weight buys a smoother, lower-capacity code
    "bern-beta4": ["--model", "vae-bernoulli", "--beta", "4"],
    # codebook collapse: with the tutorial's dot-product choice, long codes win every vector
    "vq-dot": ["--model", "vqvae", "--metric", "dot"],
    "vq-dot-restarts": ["--model", "vqvae", "--metric", "dot", "--restart-after", "100"],
    # a large codebook with the paper's Euclidean choice: restarts bring dead codes back
    "vq512": ["--model", "vqvae", "--codes", "512", "--code-dim", "8", "--code-vectors", "8",
              "--epochs", "10"],
    "vq512-restarts": ["--model", "vqvae", "--codes", "512", "--code-dim", "8",
                       "--code-vectors", "8", "--restart-after", "100", "--epochs", "10"],
}
EPOCHS = "20"


def one(name):
    run_dir = ROOT / "runs" / f"guide-{name}"
    epochs = [] if "--epochs" in RUNS[name] else ["--epochs", EPOCHS]
    args = ["train", *RUNS[name], *epochs, "--out", str(run_dir), "--no-progress"]
    print("npvae " + " ".join(args[:-3]), flush=True)
    if main(args) != 0 or main(["eval", str(run_dir), "--k", "0"]) != 0:
        raise SystemExit(f"{name} failed")
    r = json.loads((run_dir / "eval.json").read_text())
    keep = ("elbo", "recon", "kl", "active_units", "mse", "perplexity", "used_fraction")
    return {k: r[k] for k in keep if k in r}


if __name__ == "__main__":
    names = sys.argv[1:] or list(RUNS)
    results = {name: one(name) for name in names}
    for name, r in results.items():
        print(name, "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in r.items()))
