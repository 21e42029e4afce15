"""A Bernoulli VAE with a 2-D latent space, for the manifold picture.

    python demos/vae_2d.py

The same model as demos/vae_bernoulli.py with Z = 2: the decoder's images over a grid of
latent points (standard-normal quantiles), and the test digits' posterior means.
"""
from common import run

report = run("vae-2d", ["--model", "vae-bernoulli", "--latent", "2", "--epochs", "30"], k=1000,
             figures=("manifold", "latent_scatter"))
print(f"test ELBO {report['elbo']:.2f}, log p(x) (k=1000) {report['log_px']:.2f} nats")
