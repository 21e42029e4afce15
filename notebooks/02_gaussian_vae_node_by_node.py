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
# # 2. The Gaussian VAE node by node: reparameterization and KL
#
# The tutorial's Gaussian VAE has two nodes that a plain network does not: the sampling
# of $z$, made differentiable by the reparameterization trick, and the closed-form KL.
# Each is an op pair in `npvae.ops` with a hand-written backward. Here we check each one
# three ways: the gradient against central differences (what `npvae.gradcheck` does),
# the forward values against Monte Carlo, and then the assembled model on small data.

# %%
import matplotlib.pyplot as plt
import numpy as np

import helpers
from npvae import evaluate, ops
from npvae.gradcheck import check_op

print(helpers.setup())  # the NumPy twins: small models, no compilation
rng = np.random.default_rng(0)

# %% [markdown]
# ## Reparameterization: $z = \mu + \epsilon \odot e^{\ell/2}$ (REP.1)
#
# The noise $\epsilon$ is an input, so a gradient check can hold it fixed. The backward
# pass is $d\mu = dz$ (REP.2) and $d\ell = \tfrac12\,dz \odot \epsilon \odot \sigma$ (REP.3).

# %%
mu, logvar, eps = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
errors = check_op(ops.reparameterize_forward, ops.reparameterize_backward, [mu, logvar, eps],
                  wrt=[0, 1], rng=rng)
print("relative errors against central differences:", errors)
assert max(errors.values()) < 1e-8

# %% [markdown]
# A gradient check compares the backward pass with the forward pass. It cannot tell
# whether the forward pass itself is right: a forward that used $e^{\ell}$ (the variance)
# as the standard deviation, with a backward to match, would pass it. Monte Carlo can
# tell: the samples must have mean $\mu$ and variance $e^{\ell}$.

# %%
mu1, logvar1 = np.array([[0.5, -1.0, 2.0]]), np.log(np.array([[4.0, 0.25, 1.0]]))
draws = rng.standard_normal((200_000, 3))
z, _ = ops.reparameterize_forward(np.repeat(mu1, len(draws), 0), np.repeat(logvar1, len(draws), 0), draws)
print("sample mean     ", z.mean(0).round(3), "  mu      ", mu1[0])
print("sample variance ", z.var(0).round(3), "  exp(lv) ", np.exp(logvar1[0]))
assert np.allclose(z.var(0), np.exp(logvar1[0]), rtol=0.02)

wrong = np.repeat(mu1, len(draws), 0) + draws * np.exp(np.repeat(logvar1, len(draws), 0))
print("with exp(logvar) as the std, the variance would be", wrong.var(0).round(3))

# %% [markdown]
# ## The KL to the prior: $\tfrac12(\mu^2 + \sigma^2 - \log\sigma^2 - 1)$ per dimension (KL.1)
#
# Its gradients are $d\mu = d\mathrm{KL}\odot\mu$ (KL.2) and
# $d\ell = \tfrac12 d\mathrm{KL}\odot(\sigma^2 - 1)$ (KL.3). The closed form is checked
# against a Monte Carlo estimate $\mathbb E_q[\log q(z) - \log p(z)]$.

# %%
errors = check_op(ops.gaussian_kl_forward, ops.gaussian_kl_backward, [mu, logvar], rng=rng)
print("relative errors against central differences:", errors)
assert max(errors.values()) < 1e-8

kl, _ = ops.gaussian_kl_forward(mu1, logvar1)
sigma = np.exp(0.5 * logvar1)
zs = mu1 + sigma * draws  # (S, 3) samples from q
log_q = -0.5 * (draws ** 2 + logvar1 + np.log(2 * np.pi))
log_p = -0.5 * (zs ** 2 + np.log(2 * np.pi))
print("closed form KL  ", kl[0].round(4))
print("Monte Carlo KL  ", (log_q - log_p).mean(0).round(4))
assert np.allclose(kl[0], (log_q - log_p).mean(0), atol=0.02)

# the KL is zero only at the prior, and its gradient vanishes there
kl0, cache = ops.gaussian_kl_forward(np.zeros((1, 2)), np.zeros((1, 2)))
print("KL at the prior:", kl0, " gradients there:", ops.gaussian_kl_backward(np.ones((1, 2)), cache))

# %% [markdown]
# ## The assembled model on small data
#
# `GaussianVAE` wires these nodes with an MLP encoder and decoder. We train the
# tutorial's model, $p(x|z) = \mathcal N(\mathrm{Dec}(z), I)$, on two thousand images for
# a few epochs, and the same model with a decoder variance $s^2 = 0.05$, and look at the
# KL per latent dimension (EVAL.2). With a unit variance a pixel error costs little, so
# the code is worth less to the model and it buys fewer nats of KL. Trained longer on
# all of MNIST, the unit-variance model lets most of its dimensions collapse onto the
# prior (KL near 0): 12 of 20 after 30 epochs (docs/guide.md, section 3).

# %%
x, labels, source = helpers.digits(2000, dtype=np.float32)
print("data:", source)
from npvae.models import GaussianVAE  # noqa: E402

results = {}
for s2 in (1.0, 0.05):
    model = GaussianVAE(data_dim=784, hidden=(64,), latent=8, sigma2=s2, dtype=np.float32, rng=0)
    history = helpers.fit(model, x, epochs=3, lr=3e-3, seed=0)
    kl_dims = evaluate.kl_per_dimension(model, x[:1000])
    active = evaluate.active_units(model, x[:1000])["count"]
    results[s2] = (kl_dims, active, model)
    print(f"s2 = {s2}: last epoch recon {history[-1]['recon']:.2f}, KL {history[-1]['kl']:.2f}; "
          f"KL per dimension {np.sort(kl_dims)[::-1].round(2)}; active units {active} / 8")

fig, ax = plt.subplots(figsize=(5, 2.5))
for i, (s2, (kl_dims, _, _)) in enumerate(results.items()):
    ax.bar(np.arange(8) + 0.4 * i, np.sort(kl_dims)[::-1], width=0.4, label=f"s2 = {s2}")
ax.set_xlabel("latent dimension (sorted)"); ax.set_ylabel("KL (nats)"); ax.legend(fontsize=8)
plt.show()
assert results[1.0][0].sum() < results[0.05][0].sum()  # the unit variance buys less KL

# %% [markdown]
# Reconstructions of the s2 = 0.05 model (top: data, bottom: the decoder's mean at the
# posterior mean):

# %%
model = results[0.05][2]
mu_x, _ = model.encode(x[:10])
fig, axes = plt.subplots(2, 1, figsize=(5, 1.2))
helpers.show_images(x[:10], 1, 10, ax=axes[0])
helpers.show_images(np.clip(model.decode(mu_x), 0, 1), 1, 10, ax=axes[1])
plt.show()
