"""The Gaussian VAE exactly as tutorial section 3 states it: p(x|z) = N(Dec(z), I).

    python demos/vae_gaussian.py

784-400-20, ReLU, grey-level MNIST, sigma2 = 1. With a unit variance, the reconstruction
term is worth little next to the KL (a pixel error of 0.5 costs 0.125 nats), so most
latent dimensions collapse to the prior and the images are blurred: compare the active
units with the Bernoulli VAE's. `--sigma2 0.01` gives sharp images.
"""
from common import run

report = run("vae-gaussian", ["--model", "vae-gaussian", "--epochs", "30"], k=0)
print(f"test ELBO {report['elbo']:.2f} nats, MSE per pixel {report['mse']:.4f}, "
      f"active units {report['active_units']}")
