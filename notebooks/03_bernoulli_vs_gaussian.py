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
# # 3. Bernoulli against Gaussian decoders: BCE against MSE
#
# Only the decoder's distribution changes between the tutorial's sections 3 and 4:
#
# - Gaussian, $p(x|z) = \mathcal N(m, s^2 I)$: $\log p = -\|x - m\|^2/(2s^2) - \tfrac D2\log(2\pi s^2)$
#   (LIK.1), a squared error, with gradient $(x - m)/s^2$ in the mean (LIK.2);
# - Bernoulli, $p = \sigma(l)$ per pixel: $\log p = \sum_d x_d l_d - \mathrm{softplus}(l_d)$
#   (LIK.3), the negative binary cross-entropy, with gradient $x - \sigma(l)$ in the
#   logits (LIK.4).

# %%
import matplotlib.pyplot as plt
import numpy as np

import helpers
from npvae import evaluate, ops
from npvae.gradcheck import check_op
from npvae.models import BernoulliVAE, GaussianVAE

print(helpers.setup())  # the NumPy twins: small models, no compilation
rng = np.random.default_rng(0)

# %% [markdown]
# ## One pixel: the loss and its gradient as the prediction moves
#
# For a target pixel $x = 1$, the cross-entropy of a prediction $p$ grows without bound as
# $p \to 0$, while the squared error stays below 1. In the logits the BCE gradient is
# $\sigma(l) - x$, bounded by 1 in size and never vanishing while the pixel is wrong.

# %%
p_grid = np.linspace(0.01, 0.99, 99)
fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
for target in (1.0, 0.3):
    bce = -(target * np.log(p_grid) + (1 - target) * np.log(1 - p_grid))
    mse = 0.5 * (target - p_grid) ** 2
    axes[0].plot(p_grid, bce, label=f"BCE, x = {target}")
    axes[0].plot(p_grid, mse, "--", label=f"squared error / 2, x = {target}")
axes[0].set_xlabel("prediction p"); axes[0].set_ylabel("loss per pixel (nats)"); axes[0].legend(fontsize=7)
logits = np.linspace(-8, 8, 161)
prob = 1 / (1 + np.exp(-logits))
axes[1].plot(logits, prob - 1.0, label="BCE in the logit, x = 1")
axes[1].plot(logits, (prob - 1.0) * prob * (1 - prob), "--",
             label="squared error through a sigmoid, x = 1")
axes[1].set_xlabel("logit l"); axes[1].set_ylabel("d loss / d l"); axes[1].legend(fontsize=7)
plt.show()

# %% [markdown]
# The squared error behind a sigmoid has the gradient $(\sigma(l) - x)\,\sigma(l)(1 - \sigma(l))$:
# it fades when the unit saturates on the wrong side, which is why the Bernoulli decoder
# takes its logits straight into the cross-entropy.
#
# Both backward passes, checked against central differences with a random upstream
# gradient:

# %%
x_pix = rng.uniform(size=(4, 6))
print("Bernoulli:", check_op(ops.bernoulli_loglik_forward, ops.bernoulli_loglik_backward,
                             [rng.normal(size=(4, 6)), x_pix], wrt=[0], rng=rng))
print("Gaussian: ", check_op(ops.gaussian_loglik_forward, ops.gaussian_loglik_backward,
                             [rng.normal(size=(4, 6)), x_pix], wrt=[0], rng=rng,
                             kwargs=dict(sigma2=0.3)))
lp, _ = ops.bernoulli_loglik_forward(np.array([[-1e4, 1e4, 0.0]]), np.array([[0.0, 1.0, 1.0]]))
print("stable for huge logits: log p =", lp, "(= log 1/2 from the zero logit)")

# %% [markdown]
# ## Both decoders on the same images
#
# The Bernoulli VAE sees binary pixels, a fresh binary sample of each batch (dynamic
# binarization); the Gaussian VAE sees the grey levels. Same encoder and decoder sizes,
# same number of steps.

# %%
x, labels, source = helpers.digits(2000, dtype=np.float32)
print("data:", source)
models = {
    "Bernoulli": BernoulliVAE(data_dim=784, hidden=(64,), latent=8, dtype=np.float32, rng=0),
    "Gaussian, s2 = 1": GaussianVAE(data_dim=784, hidden=(64,), latent=8, dtype=np.float32, rng=0),
    "Gaussian, s2 = 0.05": GaussianVAE(data_dim=784, hidden=(64,), latent=8, sigma2=0.05,
                                       dtype=np.float32, rng=0),
}
test = x[:500]
binary_test = (np.random.default_rng(1).random(test.shape) < test).astype(np.float32)
rows = {}
for name, model in models.items():
    helpers.fit(model, x, epochs=3, lr=3e-3, binarize=name == "Bernoulli")
    data = binary_test if name == "Bernoulli" else test
    e = evaluate.elbo(model, data, rng=2)
    err = evaluate.reconstruction_errors(model, test)  # against the grey levels, for all
    rows[name] = (e["elbo"], e["kl"], err["mse"])
    print(f"{name:20s} ELBO {e['elbo']:9.2f}   KL {e['kl']:6.2f}   MSE per pixel {err['mse']:.4f}")

# %% [markdown]
# **The ELBO column cannot be compared across decoders.** The Bernoulli ELBO is a
# log-probability of binary pixels (at most 0); the Gaussian one is a log-density of grey
# levels, which includes the constant $-\tfrac D2\log(2\pi s^2)$ ($-720.4$ nats at
# $s^2 = 1$, $+453.9$ at $s^2 = 0.05$) and can be positive. They score different data under
# different kinds of distribution. What can be compared is a reconstruction error measured
# the same way for all, here the squared error per pixel against the grey levels.

# %%
fig, axes = plt.subplots(len(models) + 1, 1, figsize=(5, 0.6 * (len(models) + 1) + 0.4))
helpers.show_images(test[:10], 1, 10, "data", ax=axes[0])
for ax, (name, model) in zip(axes[1:], models.items()):
    mu, _ = model.encode(test[:10])
    helpers.show_images(np.clip(model.decode(mu), 0, 1), 1, 10, name, ax=ax)
plt.tight_layout(); plt.show()
assert rows["Bernoulli"][0] < 0  # a log-probability of discrete data is never positive
assert rows["Gaussian, s2 = 0.05"][1] > rows["Gaussian, s2 = 1"][1]  # dearer pixels buy more KL
