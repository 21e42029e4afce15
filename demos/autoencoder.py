"""The autoencoder of tutorial section 5, 784-32-784: a linear encoder to a 32-number
code and a linear decoder to Bernoulli logits, trained on grey levels for 50 epochs.

    python demos/autoencoder.py

Two runs: the plain autoencoder (--beta 0: reconstruction only) and the tutorial's form,
reconstruction plus ||Enc(x)||^2 / 2 (eqs. 13-14, --beta 1). Reports the test
cross-entropy per pixel.
"""
from common import run

for beta in ("0", "1"):
    report = run(f"ae-beta{beta}", ["--model", "ae", "--hidden", "none", "--latent", "32",
                                    "--beta", beta, "--binarize", "none", "--epochs", "50"],
                 figures=("reconstructions",) if beta == "0" else ())
    print(f"beta {beta}: test BCE per pixel {report['bce']:.4f}, MSE per pixel {report['mse']:.4f}")
