"""Bernoulli VAE on dynamically binarized MNIST: what `npvae train` does by default.

    python demos/vae_bernoulli.py

784-400-20, ReLU, batch 128, Adam 1e-3, 30 epochs; the test ELBO and the
importance-weighted log-likelihood with k = 1000 (tutorial section 4, eq. 12).
"""
from common import run

report = run("vae-bernoulli", ["--model", "vae-bernoulli", "--epochs", "30"], k=1000,
             figures=("reconstructions", "samples", "latent_scatter", "interpolation", "loss_curves"))
print(f"test ELBO {report['elbo']:.2f}, log p(x) (k=1000) {report['log_px']:.2f} nats, "
      f"{report['train_seconds']} s of training")
