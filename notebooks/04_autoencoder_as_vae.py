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
# # 4. The autoencoder as a VAE: eqs. 13-14 as derived
#
# Fix every posterior variance at 1, $q(z|x) = \mathcal N(\mathrm{Enc}(x), I)$, keep the
# tutorial's unit-variance Gaussian decoder, and the ELBO turns into (T.13-T.14)
#
# $$\text{minimise}\quad \mathbb E_{\epsilon}\,\|x - \mathrm{Dec}(\mathrm{Enc}(x) + \epsilon)\|^2 + \|\mathrm{Enc}(x)\|^2,
# \qquad \epsilon \sim \mathcal N(0, I):$$
#
# a squared error plus an L2 penalty on the code, *with unit noise added to the code*.
# `Autoencoder(sampled=True, likelihood="gaussian")` is exactly this; `sampled=False` is
# the usual autoencoder, which drops the noise and with it the bound.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np

import helpers
from npvae import evaluate
from npvae.models import Autoencoder

print(helpers.setup())  # the NumPy twins: small models, no compilation
rng = np.random.default_rng(0)
x, labels, source = helpers.digits(2000, dtype=np.float64)
print("data:", source)
D, Z = 784, 16

# %% [markdown]
# ## npvae's loss is half of eq. 14, plus a constant
#
# npvae minimises the negative ELBO itself: $\tfrac12\|x - \mathrm{Dec}(z)\|^2 + \tfrac12\|\mathrm{Enc}(x)\|^2 + \tfrac D2\log 2\pi$
# per example. With the noise held fixed, compute eq. 14 by hand and compare.

# %%
model = Autoencoder(data_dim=D, hidden=(), latent=Z, activation="identity", likelihood="gaussian",
                    sampled=True, dtype=np.float64, rng=0)
batch, eps = x[:50], rng.standard_normal((50, Z))
loss, _, stats = model.loss_and_grads(batch, eps=eps)
code = model.encode(batch)
recon = model.decoder_output(code + eps)
eq14 = np.mean(np.sum((batch - recon) ** 2, axis=1) + np.sum(code ** 2, axis=1))
print(f"npvae loss {loss:.6f}   eq. 14 / 2 + (D/2) log 2 pi = {eq14 / 2 + D / 2 * math.log(2 * math.pi):.6f}")
assert math.isclose(loss, eq14 / 2 + D / 2 * math.log(2 * math.pi), rel_tol=1e-12)

# %% [markdown]
# ## What the noise does: it charges the decoder for its weights
#
# For a linear decoder $\mathrm{Dec}(z) = zW + b$ the expectation over $\epsilon$ has a closed
# form (docs/derivations.md, section 8):
# $\mathbb E_\epsilon\|x - (c + \epsilon)W - b\|^2 = \|x - cW - b\|^2 + \|W\|_F^2$. Check it by
# Monte Carlo for one image:

# %%
W, b = model.params["dec.0.W"], model.params["dec.0.b"]
c = code[:1]
draws = rng.standard_normal((20000, Z))
mc = np.mean(np.sum((batch[:1] - (c + draws) @ W - b) ** 2, axis=1))
closed = np.sum((batch[:1] - c @ W - b) ** 2) + np.sum(W * W)
print(f"Monte Carlo {mc:.2f}   closed form {closed:.2f}")
assert abs(mc - closed) < 0.02 * closed

# %% [markdown]
# ## Without the noise, the penalty can be shrunk for free
#
# In the deterministic form, divide the code by $k$ and multiply the decoder's weights by
# $k$: every reconstruction is the same, and the penalty $\tfrac12\|c\|^2$ falls by $k^2$. So
# a small L2 term alone says little about how close the codes are to the prior. With the
# noise, shrinking the code is not free: the noise does not shrink, and the larger weights
# amplify it, at the price $\|W\|_F^2$ above.

# %%
det = Autoencoder(data_dim=D, hidden=(), latent=Z, activation="identity", likelihood="gaussian",
                  sampled=False, dtype=np.float64, rng=0)
before = det.loss_and_grads(batch)[2]
k = 10.0
det.params["enc.0.W"] /= k; det.params["enc.0.b"] /= k; det.params["dec.0.W"] *= k
after = det.loss_and_grads(batch)[2]
print(f"deterministic: recon {before['recon']:.4f} -> {after['recon']:.4f}, "
      f"penalty {before['kl']:.4f} -> {after['kl']:.4f}")
assert math.isclose(before["recon"], after["recon"], rel_tol=1e-9)

# %% [markdown]
# ## Train both forms
#
# Same linear 784-16-784 network, same data and steps. The sampled form (eq. 14 as
# derived) is a VAE with a fixed posterior variance, so its ELBO is a true bound and the
# importance-weighted estimate (IW.1) applies; the deterministic form reports only the
# value of its objective.

# %%
runs = {}
for sampled in (True, False):
    m = Autoencoder(data_dim=D, hidden=(), latent=Z, activation="identity", likelihood="gaussian",
                    sampled=sampled, dtype=np.float32, rng=0)
    helpers.fit(m, x.astype(np.float32), epochs=4, lr=3e-3)
    test = x[:300].astype(np.float32)
    e = evaluate.elbo(m, test, rng=1)
    err = evaluate.reconstruction_errors(m, test)
    wnorm = float(np.sum(m.params["dec.0.W"].astype(np.float64) ** 2))
    runs[sampled] = dict(elbo=e["elbo"], penalty=e["kl"], mse=err["mse"], wnorm=wnorm, model=m)
    name = "sampled (eq. 14)" if sampled else "deterministic   "
    print(f"{name}  objective/ELBO {e['elbo']:9.2f}   1/2 ||Enc(x)||^2 {e['kl']:7.2f}   "
          f"||W||_F^2 {wnorm:8.2f}   MSE per pixel {err['mse']:.4f}")
lk = evaluate.iw_log_likelihood(runs[True]["model"], x[:100].astype(np.float32), k=100, rng=2)
print(f"sampled form: L_100 = {lk['log_px']:.2f} (a bound on log p(x); "
      f"the deterministic form has no density q to weigh with)")
assert runs[True]["wnorm"] < runs[False]["wnorm"]

# %% [markdown]
# The deterministic form keeps its penalty small the way shown above, with a small code
# and large decoder weights. The sampled form cannot: the noise would be amplified along
# with the code. Its weights stay small, its penalty is the true KL of the posterior
# $\mathcal N(\mathrm{Enc}(x), I)$, and its reconstructions are blurrier, since unit noise on
# every coordinate leaves a linear decoder little to read. Top row: data; then the sampled
# and the deterministic
# form's reconstructions from the code itself.

# %%
fig, axes = plt.subplots(3, 1, figsize=(5, 1.8))
helpers.show_images(x[:10], 1, 10, ax=axes[0])
for ax, sampled in zip(axes[1:], (True, False)):
    m = runs[sampled]["model"]
    helpers.show_images(np.clip(m.decode(m.encode(x[:10].astype(np.float32))), 0, 1), 1, 10, ax=ax)
plt.show()
