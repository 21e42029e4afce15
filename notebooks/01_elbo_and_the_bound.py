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
# # 1. The ELBO is a bound: see it where log p(x) is exact
#
# For any encoder $q(z|x)$, Jensen's inequality gives
# $\log p(x) \ge \mathrm{ELBO}(x) = \mathbb E_q[\log p(x|z)] - \mathrm{KL}(q(z|x)\,\|\,p(z))$
# (docs/derivations.md, T.4-T.5), and the gap is exactly $\mathrm{KL}(q(z|x)\,\|\,p(z|x))$.
# For a neural decoder $\log p(x)$ has no closed form, so the bound cannot be seen
# directly. Here the decoder is linear, $x = zW + b + \text{noise}$ with $z \sim \mathcal N(0, I)$
# and noise $\mathcal N(0, s^2 I)$, so
#
# $$x \sim \mathcal N(b,\; W^\top W + s^2 I), \qquad p(z|x) = \mathcal N\big(S W (x - b)/s^2,\; S\big),\quad S = (I + W W^\top / s^2)^{-1}.$$
#
# Everything is exact, and we can watch the ELBO, the gap, and the importance-weighted
# estimate $L_k$ (IW.1) close in on $\log p(x)$. The data are drawn from the model itself
# (synthetic; no download).

# %%
import math

import matplotlib.pyplot as plt
import numpy as np

import helpers
from npvae import evaluate
from npvae.models import GaussianVAE

print(helpers.setup())  # the NumPy twins: small models, no compilation
rng = np.random.default_rng(0)
D, Z, S2 = 8, 2, 0.5  # data size, latent size, decoder variance s^2

model = GaussianVAE(data_dim=D, hidden=(), latent=Z, activation="identity", sigma2=S2,
                    dtype=np.float64, rng=0)
p = model.params
q_basis, _ = np.linalg.qr(rng.normal(size=(D, Z)))  # orthonormal columns
p["dec.0.W"] = np.array([[2.0], [1.0]]) * q_basis.T  # (Z, D): rows orthogonal, lengths 2 and 1
p["dec.0.b"] = rng.normal(size=D)
W, b = p["dec.0.W"], p["dec.0.b"]

# data from the model: z ~ N(0, I), x = z W + b + noise
n = 500
x = rng.normal(size=(n, Z)) @ W + b + math.sqrt(S2) * rng.normal(size=(n, D))
print("data:", x.shape, "drawn from the linear-Gaussian model itself")

# %% [markdown]
# ## Exact quantities

# %%
def exact_log_px(x):
    cov = W.T @ W + S2 * np.eye(D)
    r = x - b
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (D * math.log(2 * math.pi) + logdet + np.sum(r * np.linalg.solve(cov, r.T).T, axis=1))


def exact_posterior(x):
    prec = np.eye(Z) + W @ W.T / S2
    cov = np.linalg.inv(prec)
    return (x - b) @ W.T @ cov / S2, cov  # mean (N, Z), covariance (Z, Z)


def closed_form_elbo(x):
    """The ELBO of the model's own encoder, per example, with the expectation in closed form:
    under q, E||x - zW - b||^2 = ||x - mu W - b||^2 + sum_j v_j ||W_j||^2."""
    mu, logvar = model.encode(x)
    v = np.exp(logvar)
    r = x - mu @ W - b
    recon = -0.5 * (np.sum(r * r, axis=1) + v @ np.sum(W * W, axis=1)) / S2 \
        - 0.5 * D * math.log(2 * math.pi * S2)
    kl = 0.5 * np.sum(mu * mu + v - logvar - 1.0, axis=1)  # (KL.1)
    return recon - kl


def kl_to_posterior(x):
    mu, logvar = model.encode(x)
    m, cov = exact_posterior(x)
    prec = np.linalg.inv(cov)
    d = m - mu
    _, logdet_cov = np.linalg.slogdet(cov)
    return 0.5 * (np.exp(logvar) @ np.diag(prec) + np.sum((d @ prec) * d, axis=1) - Z
                  + logdet_cov - logvar.sum(axis=1))


# %% [markdown]
# ## A random encoder: the ELBO sits below log p(x), by exactly the KL to the posterior

# %%
p["enc.0.W"] = rng.normal(scale=0.3, size=(D, 2 * Z))
p["enc.0.b"] = rng.normal(scale=0.3, size=2 * Z)
log_px = exact_log_px(x)
elbo = closed_form_elbo(x)
gap = kl_to_posterior(x)
print(f"mean log p(x)          {log_px.mean():10.4f}")
print(f"mean ELBO              {elbo.mean():10.4f}")
print(f"mean KL(q || p(z|x))   {gap.mean():10.4f}")
print(f"largest |log p(x) - ELBO - KL| over examples: {np.abs(log_px - elbo - gap).max():.2e}")
assert np.all(elbo <= log_px + 1e-9)
assert np.allclose(log_px - elbo, gap, atol=1e-8)

# The one-sample Monte Carlo ELBO that training uses averages to the same number:
mc = evaluate.elbo(model, x, rng=1)
print(f"npvae.evaluate.elbo (one sample per example): {mc['elbo']:.3f} +- {mc['elbo_se']:.3f}")

# %% [markdown]
# ## The importance-weighted estimate climbs toward log p(x) as k grows (IW.2)

# %%
ks = [1, 4, 16, 64, 256, 1024]
estimates = [evaluate.iw_log_likelihood(model, x[:100], k=k, rng=2)["log_px"] for k in ks]
exact = log_px[:100].mean()
for k, e in zip(ks, estimates):
    print(f"k = {k:5d}   L_k = {e:9.4f}   gap to log p(x) {exact - e:7.4f}")
fig, ax = plt.subplots(figsize=(5, 3))
ax.semilogx(ks, estimates, "o-", label="$L_k$ (importance-weighted)")
ax.axhline(exact, color="k", ls="--", label="exact log p(x)")
ax.axhline(closed_form_elbo(x[:100]).mean(), color="C3", ls=":", label="ELBO")
ax.set_xlabel("k"); ax.set_ylabel("nats per example"); ax.legend(fontsize=8)
plt.show()
assert estimates[-1] > estimates[0] and estimates[-1] <= exact + 0.05

# %% [markdown]
# ## The exact posterior closes the gap
#
# Because $W$ has orthogonal rows, the exact posterior covariance is diagonal, so an
# encoder of npvae's form (a mean and one variance per dimension) can represent it. Set
# the encoder's weights to it: the ELBO equals $\log p(x)$ for every example, and every
# importance weight equals $p(x)$, so $L_k$ is exact for any k.

# %%
cov = 1.0 / (1.0 + np.sum(W * W, axis=1) / S2)  # (Z,) the diagonal of S
enc_W = np.zeros((D, 2 * Z)); enc_b = np.zeros(2 * Z)
enc_W[:, :Z] = W.T * (cov / S2)
enc_b[:Z] = -(b @ W.T) * cov / S2
enc_b[Z:] = np.log(cov)
p["enc.0.W"], p["enc.0.b"] = enc_W, enc_b
print(f"largest |log p(x) - ELBO| {np.abs(exact_log_px(x) - closed_form_elbo(x)).max():.2e}")
print(f"L_1 = {evaluate.iw_log_likelihood(model, x[:100], k=1, rng=3)['log_px']:.6f}, "
      f"exact {exact:.6f}")
assert np.allclose(exact_log_px(x), closed_form_elbo(x), atol=1e-9)

# %% [markdown]
# ## Training moves both ends
#
# Start the encoder from scratch and train the whole VAE (decoder too) on the data. The
# ELBO rises, and so does the exact $\log p(x)$ of the model being trained; the gap
# between them, the KL to the posterior, shrinks.

# %%
from npvae.optim import Adam  # noqa: E402

p["enc.0.W"] = rng.normal(scale=0.1, size=(D, 2 * Z)); p["enc.0.b"] = np.zeros(2 * Z)
p["dec.0.W"] = rng.normal(scale=0.1, size=(Z, D)); p["dec.0.b"] = np.zeros(D)
opt = Adam(p, lr=0.02)
trace = []
for step in range(600):
    batch = x[rng.integers(n, size=100)]
    loss, grads, _ = model.loss_and_grads(batch, rng=rng)
    opt.step(grads)
    if step % 50 == 0 or step == 599:
        trace.append((step, exact_log_px(x).mean(), closed_form_elbo(x).mean()))
for step, lp, el in trace:
    print(f"step {step:4d}   log p(x) {lp:8.3f}   ELBO {el:8.3f}   gap {lp - el:6.3f}")
assert trace[-1][2] > trace[0][2] and trace[-1][1] - trace[-1][2] < trace[0][1] - trace[0][2]
