# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. The VQ-VAE and codebook collapse
#
# The VQ-VAE snaps each encoder output to one of K codes. Its posterior is a point mass
# and its prior uniform, so the KL is the constant $M\log K$ (T.15) and the ELBO is the
# reconstruction term minus a constant. Two things are new: the gradient through the
# choice is *chosen*, not derived (the straight-through copy, VQ.3), and codes that are
# never chosen never learn. This notebook looks at both.

# %%
import matplotlib.pyplot as plt
import numpy as np

import helpers
from npvae import evaluate
from npvae.gradcheck import check_model
from npvae.models import VQVAE
from npvae.ops import vq_assign

print(helpers.setup())  # the NumPy twins: small models, no compilation
rng = np.random.default_rng(0)

# %% [markdown]
# ## Which code wins: nearest (VQ.1) or largest dot product (VQ.2)
#
# The tutorial picks the code with the largest dot product. That favours long codes, but
# only where the dot product is positive: for a row with $z\cdot e > 0$ the code $2e$ beats
# $e$; where $z\cdot e < 0$ the shorter one wins.

# %%
codebook = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # code 1 is code 0, twice as long
rows = np.array([[0.9, 0.1], [-0.9, 0.1], [0.3, 0.5]])
print("rows:\n", rows)
print("nearest code      ", vq_assign(rows, codebook, "euclidean"))
print("largest dot       ", vq_assign(rows, codebook, "dot"))
print("z . e:\n", rows @ codebook.T)

# %% [markdown]
# ## The straight-through gradient, checked on its surrogate
#
# The loss depends on the encoder's reconstruction path only through an argmin, so finite
# differences of the loss see no reconstruction gradient at all. `check_model` uses the
# surrogate whose true gradient is the straight-through one (VQVAE.4), and checks every
# parameter against it.

# %%
small = VQVAE(data_dim=12, hidden=(8,), num_codes=6, code_dim=3, num_vectors=2,
              activation="tanh", dtype=np.float64, rng=1)
batch = rng.uniform(size=(5, 12))
print("smallest assignment margin:", round(small.assignment_margin(batch), 4), "(must exceed the step, 1e-4)")
for row in check_model(small, batch):
    print(row)
    assert row.rel_error < 1e-6

# %% [markdown]
# ## Training: Euclidean against dot-product assignment, with and without restarts
#
# Same encoder, decoder and data; K = 64 codes of size 8, four per image, a short run.
# We follow the *perplexity* of the code usage (the exponential of its entropy: K when
# every code is used equally, 1 when one code takes all) and the fraction of codes in
# use (EVAL.5). In a run this short, with random initial codes, many codes are never
# chosen under either rule: they are dead, and nothing moves them. Dead-code restarts
# (VQVAE.3) move a code unused for `restart_after` steps onto a recent encoder output.

# %%
x, labels, source = helpers.digits(2000, dtype=np.float32)
print("data:", source)
settings = {
    "euclidean": dict(metric="euclidean"),
    "euclidean + restarts": dict(metric="euclidean", restart_after=20),
    "dot product": dict(metric="dot"),
    "dot product + restarts": dict(metric="dot", restart_after=20),
}
runs = {}
for name, extra in settings.items():
    model = VQVAE(data_dim=784, hidden=(64,), num_codes=64, code_dim=8, num_vectors=4,
                  dtype=np.float32, rng=0, **extra)
    history = helpers.fit(model, x, epochs=3, lr=2e-3)
    stats = evaluate.codebook_stats(model, x[:1000])
    err = evaluate.reconstruction_errors(model, x[:1000])
    runs[name] = dict(model=model, history=history, stats=stats, mse=err["mse"])
    print(f"{name:24s} perplexity {stats['perplexity']:6.1f}   codes used "
          f"{100 * stats['used_fraction']:5.1f}%   MSE per pixel {err['mse']:.4f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
for name, run in runs.items():
    axes[0].plot([h["perplexity"] for h in run["history"]], "o-", label=name)
    idx = run["model"].assign(x[:1000]).ravel()
    counts = np.sort(np.bincount(idx, minlength=64))[::-1]
    axes[1].plot(counts / counts.sum(), label=name)
axes[0].set_xlabel("epoch"); axes[0].set_ylabel("batch perplexity"); axes[0].legend(fontsize=7)
axes[1].set_xlabel("code, by usage"); axes[1].set_ylabel("share of rows"); axes[1].set_yscale("log")
plt.show()

# %% [markdown]
# Under the dot product a longer code wins every row that points roughly its way, so the
# codes in use are the longer ones. In a run this short, without restarts, that is all:
# the plain dot product's codes are no longer than the Euclidean ones. Restarts place
# codes on encoder outputs, far longer than the small initial codes; under the dot
# product the codes then grow several-fold, and a few of them take most rows. Code
# lengths, of all codes and of the codes in use against the others:

# %%
median_norm = {}
for name, run in runs.items():
    norms = np.linalg.norm(run["model"].params["codebook"], axis=1)
    in_use = np.zeros(64, bool)
    in_use[run["model"].assign(x[:1000]).ravel()] = True
    median_norm[name] = (np.median(norms), np.median(norms[in_use]), np.median(norms[~in_use]))
    print(f"{name:24s} code norms: median {median_norm[name][0]:.2f}, largest {norms.max():.2f};"
          f" median of the codes in use {median_norm[name][1]:.2f}, of the others "
          f"{median_norm[name][2]:.2f}")
used = {name: run["stats"]["used_fraction"] for name, run in runs.items()}
assert used["euclidean + restarts"] > used["euclidean"]  # restarts revive codes
assert used["euclidean + restarts"] > used["dot product + restarts"]
for name in ("dot product", "dot product + restarts"):  # the longer codes win
    assert median_norm[name][1] > median_norm[name][2]
assert median_norm["dot product + restarts"][0] > 1.5 * median_norm["dot product"][0]
assert used["dot product + restarts"] < used["dot product"]  # and fewer codes are used

# %% [markdown]
# A restarted code sits on an encoder output. Under the Euclidean choice that makes it
# the nearest code for that output, so it is chosen and learns again, and the number of
# codes in use rises. Under the dot product there is no such guarantee: a longer code in
# a similar direction still wins, the restarted codes are not chosen, and restarts do not
# cure the collapse (in the full MNIST runs of docs/guide.md, section 4, they made it
# worse). The remedy is the Euclidean choice, or codes of equal length.
