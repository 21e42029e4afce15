"""VQ-VAE with MLP encoder and decoder (tutorial section 6), with and without dead-code restarts.

    python demos/vqvae.py

784-400-(4 x 16), K = 128 codes, nearest code by Euclidean distance, beta = 0.25, a
Bernoulli decoder on dynamically binarized MNIST (the command line's default for MNIST;
`--likelihood gaussian` gives the tutorial's N(Dec(z), I)), 30 epochs. The second run
moves any code unused for 100 steps onto a recent encoder output. Reports the test MSE
per pixel (against the binarized test images), the codebook perplexity and the fraction
of codes in use.
"""
from common import run

for name, extra in (("vqvae", []), ("vqvae-restarts", ["--restart-after", "100"])):
    report = run(name, ["--model", "vqvae", "--epochs", "30", *extra],
                 figures=("reconstructions", "codebook_usage") if name == "vqvae" else ("codebook_usage",))
    print(f"{name}: MSE per pixel {report['mse']:.4f}, perplexity {report['perplexity']:.1f}, "
          f"codes used {report['used_fraction']:.0%}")
