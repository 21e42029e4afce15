"""The autoencoder of tutorial section 5, 784-32-784: a linear encoder to a 32-number
code and a linear decoder, trained on grey levels for 50 epochs.

    python demos/autoencoder.py

Three runs:
- ae-beta0: the plain autoencoder (--beta 0: reconstruction only), deterministic code,
  Bernoulli decoder (cross-entropy on grey levels);
- ae-beta1: the same plus the penalty ||Enc(x)||^2 / 2 (--beta 1). This is eq. 14's
  penalty without its noise and with a Bernoulli decoder: not eq. 14 itself, and its
  reported ELBO is the value of the objective, not a bound;
- ae-eq14: eq. 14 as derived: z = Enc(x) + eps with eps ~ N(0, I) (--sampled) and a
  Gaussian decoder with unit variance (--likelihood gaussian): a true ELBO, for which
  the importance-weighted log p(x) is estimated with k = 1000.
Reports the test cross-entropy and squared error per pixel.
"""
from common import run

RUNS = {
    "ae-beta0": (["--beta", "0"], 0),
    "ae-beta1": (["--beta", "1"], 0),
    "ae-eq14": (["--beta", "1", "--sampled", "--likelihood", "gaussian"], 1000),
}

for name, (extra, k) in RUNS.items():
    report = run(name, ["--model", "ae", "--hidden", "none", "--latent", "32", *extra,
                        "--binarize", "none", "--epochs", "50"], k=k,
                 figures=("reconstructions",) if name == "ae-beta0" else ())
    line = (f"{name}: test BCE per pixel {report['bce']:.4f}, MSE per pixel {report['mse']:.4f}, "
            f"ELBO {report['elbo']:.2f}, KL {report['kl']:.2f}")
    if k:
        line += f", log p(x) (k = {k}) {report['log_px']:.2f}"
    print(line)
