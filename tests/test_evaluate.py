"""Evaluation: the ELBO is a lower bound on log p(x) (T.4), the importance-weighted
estimate closes the gap (IW.2), and every summary agrees with a hand computation.

The bound is checked where log p(x) is known exactly: a linear-Gaussian VAE. With
hidden=() and the identity activation the decoder is one affine layer, x = z W + b plus
N(0, s2 I) noise with W (Z, D), so

    x ~ N(b, W^T W + s2 I)                                   log p(x) in closed form
    p(z|x) = N(m, S),  S = (I + W W^T / s2)^-1,  m = S W (x - b) / s2

and, for a diagonal q = N(mu, diag v), the ELBO is closed form too, because under q

    E ||x - z W - b||^2 = ||x - mu W - b||^2 + sum_j v_j ||W_j||^2     (W_j row j of W)

The gap log p(x) - ELBO is KL(q || p(z|x)) (T.5), which the tests also check.
"""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npvae import evaluate as ev
from npvae.models import Autoencoder, BernoulliVAE, GaussianVAE, VAE
from npvae.models.base import Forward, likelihood_forward

from strategies import seeds

LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------
# The linear-Gaussian VAE and its exact quantities


def linear_vae(d, z, s2, rng, enc_scale=0.5, orthogonal=False):
    """GaussianVAE(hidden=(), identity) in float64 with random decoder and encoder.

    ``orthogonal`` gives W orthogonal rows (W W^T diagonal), so the exact posterior is
    diagonal and a VAE encoder can represent it (needs z <= d).
    """
    model = GaussianVAE(data_dim=d, hidden=(), latent=z, activation="identity", sigma2=s2,
                        dtype=np.float64, rng=0)
    p = model.params
    if orthogonal:
        q, _ = np.linalg.qr(rng.normal(size=(d, z)))  # (D, Z) orthonormal columns
        p["dec.0.W"] = rng.uniform(0.5, 2.0, size=z)[:, None] * q.T  # (Z, D)
    else:
        p["dec.0.W"] = rng.normal(size=(z, d))
    p["dec.0.b"] = rng.normal(size=d)
    p["enc.0.W"] = rng.normal(size=(d, 2 * z)) * enc_scale
    p["enc.0.b"] = rng.normal(size=2 * z) * enc_scale
    return model


def exact_log_px(model, x):
    """log N(x; b, W^T W + s2 I) per example."""
    W, b, s2 = model.params["dec.0.W"], model.params["dec.0.b"], model.config["sigma2"]
    d = x.shape[1]
    cov = W.T @ W + s2 * np.eye(d)  # (D, D)
    r = x - b  # (N, D)
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (d * LOG_2PI + logdet + np.sum(r * np.linalg.solve(cov, r.T).T, axis=1))


def exact_posterior(model, x):
    """Mean (N, Z) and precision (Z, Z) of p(z|x)."""
    W, b, s2 = model.params["dec.0.W"], model.params["dec.0.b"], model.config["sigma2"]
    precision = np.eye(W.shape[0]) + W @ W.T / s2  # (Z, Z)
    mean = np.linalg.solve(precision, ((x - b) @ W.T).T / s2).T  # (N, Z)
    return mean, precision


def exact_elbo(model, x):
    """The ELBO of the model's own encoder, in closed form, per example."""
    W, b, s2 = model.params["dec.0.W"], model.params["dec.0.b"], model.config["sigma2"]
    mu, logvar = model.encode(x)
    v = np.exp(logvar)
    r = x - mu @ W - b  # (N, D)
    expected_sq = np.sum(r * r, axis=1) + v @ np.sum(W * W, axis=1)  # (N,)  E_q ||x - zW - b||^2
    recon = -0.5 * expected_sq / s2 - 0.5 * x.shape[1] * math.log(2.0 * math.pi * s2)
    kl = 0.5 * np.sum(mu * mu + v - logvar - 1.0, axis=1)
    return recon - kl


def kl_to_exact_posterior(model, x):
    """KL( N(mu, diag v) || p(z|x) ) per example: the gap of the bound."""
    mu, logvar = model.encode(x)
    m, precision = exact_posterior(model, x)
    diff = m - mu  # (N, Z)
    z = mu.shape[1]
    _, logdet_p = np.linalg.slogdet(precision)
    trace = np.exp(logvar) @ np.diag(precision)  # tr(P diag v)
    quad = np.sum((diff @ precision) * diff, axis=1)
    return 0.5 * (trace + quad - z - logdet_p - logvar.sum(axis=1))


def set_exact_posterior(model):
    """Encoder weights that output the exact posterior (W must have orthogonal rows)."""
    p = model.params
    W, b, s2 = p["dec.0.W"], p["dec.0.b"], model.config["sigma2"]
    z = W.shape[0]
    cov = 1.0 / (1.0 + np.sum(W * W, axis=1) / s2)  # (Z,)  diagonal of (I + W W^T / s2)^-1
    enc_W = np.zeros_like(p["enc.0.W"])
    enc_b = np.zeros_like(p["enc.0.b"])
    enc_W[:, :z] = W.T * (cov / s2)  # mu = (x - b) W^T cov / s2
    enc_b[:z] = -(b @ W.T) * cov / s2
    enc_b[z:] = np.log(cov)  # logvar: constant, so weights zero and bias log cov
    p["enc.0.W"], p["enc.0.b"] = enc_W, enc_b


def data(model, n, rng):
    d = model.config["data_dim"]
    if model.config["likelihood"] == "bernoulli":
        return rng.uniform(size=(n, d)).astype(model.dtype)
    return rng.normal(size=(n, d)).astype(model.dtype)


# ----------------------------------------------------------------------------------
# (a) the bound, (b) equality at the exact posterior, (c) IW closes the gap


def test_empty_hidden_tuple_gives_single_linear_layers():
    model = GaussianVAE(data_dim=5, hidden=(), latent=2, activation="identity", dtype=np.float64)
    assert model.params.shapes == {"enc.0.W": (5, 4), "enc.0.b": (4,),
                                   "dec.0.W": (2, 5), "dec.0.b": (5,)}


@given(d=st.integers(1, 6), z=st.integers(1, 4), s2=st.floats(0.1, 3.0), seed=seeds)
def test_elbo_is_a_lower_bound(d, z, s2, seed):
    """ELBO <= log p(x) for a random encoder (T.4); the gap is KL(q || p(z|x)) (T.5)."""
    rng = np.random.default_rng(seed)
    model = linear_vae(d, z, s2, rng)
    x = rng.normal(size=(5, d)) * 2.0
    log_px, bound = exact_log_px(model, x), exact_elbo(model, x)
    gap = kl_to_exact_posterior(model, x)
    assert np.all(gap >= -1e-10)
    assert np.all(bound <= log_px + 1e-10)
    np.testing.assert_allclose(log_px - bound, gap, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monte_carlo_elbo_averages_to_the_closed_form(seed):
    """evaluate.elbo: one reparameterized sample per example; its mean is the exact ELBO."""
    rng = np.random.default_rng(seed)
    model = linear_vae(4, 2, 0.5, rng)
    x = np.repeat(rng.normal(size=(1, 4)), 20000, axis=0)  # one point, many samples
    result = ev.elbo(model, x, rng=seed + 10)
    exact = exact_elbo(model, x[:1])[0]
    assert abs(result["elbo"] - exact) < 5 * result["elbo_se"]
    mu, logvar = model.encode(x[:1])
    kl = 0.5 * np.sum(mu * mu + np.exp(logvar) - logvar - 1.0)
    assert result["kl"] == pytest.approx(kl, rel=1e-12)
    assert result["elbo"] == pytest.approx(-(result["recon"] + result["kl"]), rel=1e-12)
    assert result["elbo"] <= exact_log_px(model, x[:1])[0] + 5 * result["elbo_se"]


@given(d=st.integers(1, 6), z=st.integers(1, 4), s2=st.floats(0.1, 3.0), seed=seeds)
def test_elbo_is_tight_at_the_exact_posterior(d, z, s2, seed):
    """With q = p(z|x) the bound is an equality and every importance weight is p(x)."""
    z = min(z, d)
    rng = np.random.default_rng(seed)
    model = linear_vae(d, z, s2, rng, orthogonal=True)
    set_exact_posterior(model)
    x = rng.normal(size=(4, d)) * 2.0
    log_px = exact_log_px(model, x)
    np.testing.assert_allclose(exact_elbo(model, x), log_px, rtol=1e-9, atol=1e-9)
    m, _ = exact_posterior(model, x)
    np.testing.assert_allclose(model.encode(x)[0], m, rtol=1e-9, atol=1e-9)
    iw = ev.iw_log_likelihood(model, x, k=7, rng=seed, chunk=3)
    np.testing.assert_allclose(iw["per_example"], log_px, rtol=1e-9, atol=1e-9)  # zero variance
    assert iw["elbo_k1"] == pytest.approx(log_px.mean(), rel=1e-9, abs=1e-9)


def test_importance_weighted_estimate_closes_the_gap():
    """E[L_k] rises with k towards log p(x) (IW.2) for a q that is not the posterior."""
    rng = np.random.default_rng(7)
    model = linear_vae(4, 2, 0.5, rng, orthogonal=True)
    set_exact_posterior(model)
    p = model.params  # move q off the posterior: shifted means, wider than p(z|x)
    p["enc.0.W"] += rng.normal(size=p["enc.0.W"].shape) * 0.1
    p["enc.0.b"] += np.array([0.8, -0.6, 0.5, 1.0])
    x = np.repeat(rng.normal(size=(20, 4)), 10, axis=0)  # 10 repeats of 20 points
    log_px, bound = exact_log_px(model, x), exact_elbo(model, x)
    assert np.mean(log_px - bound) > 1.0  # a real gap to close

    def error(k):  # mean of L_k - log p(x) over examples, and its standard error
        diff = ev.iw_log_likelihood(model, x, k=k, rng=k)["per_example"] - log_px
        return diff.mean(), diff.std(ddof=1) / math.sqrt(diff.size)

    errors = {k: error(k) for k in (1, 10, 100, 2000)}
    l1 = ev.iw_log_likelihood(model, x, k=1, rng=1)["per_example"]
    assert abs(np.mean(l1 - bound)) < 5 * np.std(l1 - bound) / math.sqrt(x.shape[0])  # L_1 ~ ELBO
    means = [errors[k][0] for k in (1, 10, 100, 2000)]
    assert means[0] < means[1] < means[2] < means[3]
    assert means[3] <= 3 * errors[2000][1]  # not above log p(x), up to noise
    assert abs(means[3]) < 0.02
    k2000 = ev.iw_log_likelihood(model, x, k=2000, rng=3)
    assert abs(k2000["elbo_k1"] - bound.mean()) < 0.05  # the mean log weight estimates the ELBO


# ----------------------------------------------------------------------------------
# The importance-weighted estimator: chunking, a dense reference, stability


def iw_dense(model, x, k, seed):
    """L_k the plain way: every sample at once, the same noise streams (example_rng)."""
    root = int(np.random.default_rng(seed).integers(2**63))
    n, z_dim = x.shape[0], model.latent
    eps = np.stack([ev.example_rng(root, i).standard_normal((k, z_dim)) for i in range(n)])
    mu, logvar = ev.posterior(model, x)
    std = np.exp(0.5 * logvar)
    z = mu[:, None, :] + std[:, None, :] * eps  # (N, k, Z)
    out = model.decoder_output(z.reshape(n * k, z_dim))
    cfg = model.config
    log_px_z, _ = likelihood_forward(cfg["likelihood"], out, np.repeat(x, k, axis=0), cfg["sigma2"])
    log_pz = np.sum(-0.5 * z * z - 0.5 * LOG_2PI, axis=2)
    u = (z - mu[:, None]) / std[:, None]  # (N, k, Z)
    log_q = np.sum(-0.5 * u * u - np.log(std[:, None]) - 0.5 * LOG_2PI, axis=2)
    a = log_px_z.reshape(n, k) + log_pz - log_q  # (N, k)
    m = a.max(axis=1, keepdims=True)
    return (m[:, 0] + np.log(np.exp(a - m).sum(axis=1))) - math.log(k)


def small_models():
    common = dict(data_dim=5, hidden=(4,), latent=3, activation="tanh", dtype=np.float64)
    return {
        "bernoulli": BernoulliVAE(**common, rng=1),
        "gaussian": GaussianVAE(**common, sigma2=0.3, rng=2),
        "ae-sampled": Autoencoder(**common, likelihood="gaussian", sampled=True, rng=3),
        "ae-sampled-bernoulli": Autoencoder(**common, likelihood="bernoulli", sampled=True, rng=4),
    }


@pytest.mark.parametrize("name", list(small_models()))
def test_iw_matches_a_dense_implementation(name):
    model = small_models()[name]
    x = data(model, 6, np.random.default_rng(0))
    got = ev.iw_log_likelihood(model, x, k=50, rng=123, chunk=7, batch_size=4)
    want = iw_dense(model, x, 50, 123)
    np.testing.assert_allclose(got["per_example"], want, rtol=1e-10, atol=1e-10)
    assert got["log_px"] == pytest.approx(want.mean(), rel=1e-10)
    assert got["nll"] == -got["log_px"]


@pytest.mark.parametrize("name", ["bernoulli", "gaussian", "ae-sampled"])
@given(k=st.integers(1, 40), chunk=st.integers(1, 50), batch=st.integers(1, 9))
def test_iw_does_not_depend_on_chunk_or_batch_size(name, k, chunk, batch):
    model = small_models()[name]
    x = data(model, 7, np.random.default_rng(1))
    base = ev.iw_log_likelihood(model, x, k=k, rng=5, chunk=k, batch_size=7)
    got = ev.iw_log_likelihood(model, x, k=k, rng=5, chunk=chunk, batch_size=batch)
    np.testing.assert_allclose(got["per_example"], base["per_example"], rtol=1e-10, atol=1e-10)
    assert got["elbo_k1"] == pytest.approx(base["elbo_k1"], rel=1e-10, abs=1e-10)


def test_iw_is_reproducible_from_a_seed_or_generator():
    model = small_models()["bernoulli"]
    x = data(model, 3, np.random.default_rng(2))
    a = ev.iw_log_likelihood(model, x, k=20, rng=9)
    b = ev.iw_log_likelihood(model, x, k=20, rng=np.random.default_rng(9))
    c = ev.iw_log_likelihood(model, x, k=20, rng=10)
    np.testing.assert_array_equal(a["per_example"], b["per_example"])
    assert not np.array_equal(a["per_example"], c["per_example"])


@given(values=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=30),
       scale=st.sampled_from([1.0, 1e3, 1e6, 1e9]), offset=st.floats(-1e9, 1e9),
       cuts=st.lists(st.integers(1, 29), max_size=5))
def test_running_logsumexp_is_exact_and_stable(values, scale, offset, cuts):
    """Any split into chunks gives log sum exp, even where exp itself overflows (IW.5)."""
    a = offset + scale * np.array(values)
    m = a.max()
    want = m + math.log(np.exp(a - m).sum())
    lse = ev.RunningLogSumExp(1)
    for part in np.split(a, sorted(set(c for c in cuts if c < a.size))):
        if part.size:
            lse.update(part[None, :])
    got = lse.result()[0]
    assert np.isfinite(got)
    assert got == pytest.approx(want, rel=1e-14, abs=1e-12)


def test_running_logsumexp_huge_values_by_hand():
    lse = ev.RunningLogSumExp(3)
    lse.update(np.array([[1e4, 1e4], [-1e5, -1e5], [-2e4, 5.0]]))
    lse.update(np.array([[-1e4], [-1e5], [2e4]]))  # row 3: the new maximum dwarfs the old sum
    np.testing.assert_allclose(lse.result(), [1e4 + math.log(2), -1e5 + math.log(3), 2e4],
                               rtol=1e-15)


def loglik_samples_reference(model, out, x):
    """What ev.loglik_samples computes, the plain way: the likelihood op (LIK.1/3) on x
    repeated C times. out (B*C, D), x (B, D) -> (B, C) float64."""
    cfg = model.config
    b = x.shape[0]
    c = out.shape[0] // b
    logp, _ = likelihood_forward(cfg["likelihood"], out, np.repeat(x, c, axis=0), cfg["sigma2"])
    return logp.astype(np.float64).reshape(b, c)  # (B, C)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("scale", [0.1, 5.0, 1e3])
def test_fast_loglik_matches_the_likelihood_ops(likelihood, scale):
    """The fast form (IW.6 / LIK.1) against the op on x repeated: float64 and float32."""
    rng = np.random.default_rng(0)
    model = VAE(data_dim=30, hidden=(), latent=2, likelihood=likelihood, sigma2=0.7,
                dtype=np.float64)
    x = rng.uniform(size=(4, 30))
    x[0] = (x[0] > 0.5)  # a binary row too
    out = rng.normal(size=(4 * 6, 30)) * scale
    want = loglik_samples_reference(model, out.copy(), x)
    got = ev.loglik_samples(model, out.copy(), x)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9 * max(1.0, scale))
    model32 = VAE(data_dim=30, hidden=(), latent=2, likelihood=likelihood, sigma2=0.7,
                  dtype=np.float32)
    got32 = ev.loglik_samples(model32, out.astype(np.float32), x.astype(np.float32))
    np.testing.assert_allclose(got32, want, rtol=1e-5, atol=1e-4 * max(1.0, scale))
    # the decoder's last bias handed over apart (decoder_output(..., split_bias=True)):
    # the output is out - bias + bias, the same values up to the rounding of that split
    bias = rng.normal(size=30) * scale
    got = ev.loglik_samples(model, out - bias, x, bias)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9 * max(1.0, scale))
    got32 = ev.loglik_samples(model32, (out - bias).astype(np.float32), x.astype(np.float32),
                              bias.astype(np.float32))
    np.testing.assert_allclose(got32, want, rtol=1e-5, atol=1e-4 * max(1.0, scale))


class _WatchExp:
    """Stands in for numpy inside npvae.ops.centred_softplus: every call of exp is checked
    for a subnormal result (FTZ.2); everything else is numpy's."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        return getattr(np, name)

    def exp(self, a, out=None):
        r = np.exp(a, out=out)
        self.calls += 1
        tiny = np.finfo(r.dtype).tiny
        assert not np.any((r != 0) & (np.abs(r) < tiny)), "exp made a subnormal number"
        return r


def _logits_around_the_cuts(dtype):
    """Two (4, 6) blocks of logits: all above the normal cut log(tiny) + 1, and some below."""
    from npvae.ops.activations import EXP_CUT, NORMAL_EXP_CUT

    cut, low = EXP_CUT[np.dtype(dtype)], NORMAL_EXP_CUT[np.dtype(dtype)]
    between = np.array([0.9 * cut, 0.5 * (cut + low), 0.99 * low, -1.0, 2.0, -0.9 * cut])
    beyond = np.array([1.5 * low, -1e4, 1e4, 3.0, 1.01 * low, low])
    return [(np.stack([r, -r, r[::-1], r]).astype(dtype), clamped)
            for r, clamped in ((between, False), (beyond, True))]


def _check_against_the_closed_form(model, out, x, dtype):
    l64, x64 = out.astype(np.float64), np.repeat(x.astype(np.float64), 2, axis=0)
    want = (x64 * l64 - np.logaddexp(0.0, l64)).sum(axis=1).reshape(2, 2)  # (LIK.3)
    got = ev.loglik_samples(model, out.copy(), x)
    # rounding in the model's dtype, relative to the size of the terms summed
    scale = np.abs(l64).sum(axis=1).reshape(2, 2)
    assert np.all(np.abs(got - want) <= 8 * np.finfo(dtype).eps * scale)


@pytest.mark.parametrize("dtype, backend", [(np.float32, "numpy"), (np.float64, "numpy"),
                                            (np.float64, "numba")])
def test_the_estimate_clamps_only_below_the_normal_cut(monkeypatch, dtype, backend):
    """(IW.6, FTZ.2) On the path with NumPy's exp, exp(-|l|) only enters 1 + exp(-|l|):
    it may go down to exp(log(tiny) + 1), a normal number, with no clamp pass. Below that
    it is clamped, and no exp result is ever subnormal; the values are the closed
    form's, in float64."""
    from npvae.backend import use_backend
    from npvae.ops import centred_softplus as cs
    from npvae.ops.activations import EXP_CUT, NORMAL_EXP_CUT

    cut, low = EXP_CUT[np.dtype(dtype)], NORMAL_EXP_CUT[np.dtype(dtype)]
    assert np.exp(dtype(low)) >= np.finfo(dtype).tiny  # normal, with exp's rounding
    assert dtype(1) + np.exp(dtype(cut)) == 1  # so both cuts give the same 1 + e
    model = VAE(data_dim=6, hidden=(), latent=2, likelihood="bernoulli", dtype=dtype)
    x = np.array([[0, 1, 0, 1, 0.5, 1], [1, 0, 0.25, 1, 0, 0]], dtype)
    watch = _WatchExp()
    monkeypatch.setattr(cs, "np", watch)
    clamps = []
    real_clamp = cs.clamp_below_kernel
    monkeypatch.setattr(cs, "clamp_below_kernel", lambda a, c: (clamps.append(1), real_clamp(a, c))[1])
    with use_backend(backend):
        for out, clamped in _logits_around_the_cuts(dtype):
            _check_against_the_closed_form(model, out, x, dtype)
            assert bool(clamps) is clamped  # the clamp pass runs only for logits below the cut
            clamps.clear()
    assert watch.calls >= 2


def test_the_float32_estimate_takes_the_polynomial_pass(monkeypatch):
    """(IW.7) Under the numba backend a float32 model's likelihood calls neither exp nor
    the clamp: one compiled pass, with the closed form's values on logits on both sides
    of every cut, +-1e4 included."""
    from npvae.backend import use_backend
    from npvae.ops import centred_softplus as cs

    model = VAE(data_dim=6, hidden=(), latent=2, likelihood="bernoulli", dtype=np.float32)
    x = np.array([[0, 1, 0, 1, 0.5, 1], [1, 0, 0.25, 1, 0, 0]], np.float32)
    watch = _WatchExp()
    monkeypatch.setattr(cs, "np", watch)
    monkeypatch.setattr(cs, "clamp_below_kernel", None)  # would raise if called
    with use_backend("numba"):
        for out, _ in _logits_around_the_cuts(np.float32):
            _check_against_the_closed_form(model, out, x, np.float32)
    assert watch.calls == 0


def test_float32_estimate_is_close_to_float64():
    model64 = small_models()["bernoulli"]
    model32 = BernoulliVAE(data_dim=5, hidden=(4,), latent=3, activation="tanh", dtype=np.float32)
    model32.params.flat[...] = model64.params.flat
    x = data(model64, 8, np.random.default_rng(3))
    a = ev.iw_log_likelihood(model64, x, k=200, rng=4)
    b = ev.iw_log_likelihood(model32, x.astype(np.float32), k=200, rng=4)
    np.testing.assert_allclose(b["per_example"], a["per_example"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
# The ELBO against the models' own objective


def test_elbo_equals_the_models_statistics_with_the_same_noise():
    for model in small_models().values():
        x = data(model, 9, np.random.default_rng(4))
        eps = np.random.default_rng(11).standard_normal((9, model.latent))
        _, _, stats = model.loss_and_grads(x, eps=eps)
        got = ev.elbo(model, x, rng=11, batch_size=4)  # the same stream, batch after batch
        assert got["elbo"] == pytest.approx(stats["elbo"], rel=1e-12)
        assert got["recon"] == pytest.approx(stats["recon"], rel=1e-12)
        assert got["kl"] == pytest.approx(stats["kl"], rel=1e-12)
        assert got["loss"] == pytest.approx(stats["loss"], rel=1e-12)
        assert got["n"] == 9


def test_elbo_ignores_beta_warmup_and_free_bits():
    """The reported ELBO is the true bound; only ``loss`` follows the training objective."""
    rng = np.random.default_rng(5)
    plain = BernoulliVAE(data_dim=6, hidden=(5,), latent=3, dtype=np.float64, rng=3)
    other = BernoulliVAE(data_dim=6, hidden=(5,), latent=3, dtype=np.float64, rng=3,
                         beta=4.0, warmup_steps=100, free_bits=0.2)
    x = data(plain, 20, rng)
    a, b = ev.elbo(plain, x, rng=1), ev.elbo(other, x, rng=1)
    for key in ("elbo", "recon", "kl", "elbo_se"):
        assert a[key] == b[key]  # exact: the same parameters and the same code path
    kl_dim = ev.kl_per_dimension(other, x)
    assert b["loss"] == pytest.approx(b["recon"] + 4.0 * np.maximum(kl_dim, 0.2).sum(), rel=1e-12)


def test_elbo_does_not_depend_on_batch_size():
    model = small_models()["gaussian"]
    x = data(model, 11, np.random.default_rng(6))
    a, b = ev.elbo(model, x, rng=3, batch_size=11), ev.elbo(model, x, rng=3, batch_size=2)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-12)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_deterministic_autoencoder_reports_its_objective(likelihood):
    model = Autoencoder(data_dim=5, hidden=(4,), latent=2, likelihood=likelihood, beta=0.5,
                        dtype=np.float64, rng=1)
    x = data(model, 7, np.random.default_rng(7))
    _, _, stats = model.loss_and_grads(x)
    got = ev.elbo(model, x)  # no noise, no rng needed
    for key in ("recon", "kl", "elbo", "loss"):
        assert got[key] == pytest.approx(stats[key], rel=1e-12)


# ----------------------------------------------------------------------------------
# Latent use, reconstruction errors


def test_kl_per_dimension_by_hand_and_sums_to_the_kl_term():
    model = small_models()["bernoulli"]
    x = data(model, 13, np.random.default_rng(8))
    mu, logvar = model.encode(x)
    want = np.mean(0.5 * (mu**2 + np.exp(logvar) - logvar - 1.0), axis=0)
    got = ev.kl_per_dimension(model, x, batch_size=5)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got.sum() == pytest.approx(ev.elbo(model, x, rng=0)["kl"], rel=1e-12)
    ae = small_models()["ae-sampled"]
    np.testing.assert_allclose(ev.kl_per_dimension(ae, x), np.mean(0.5 * ae.encode(x) ** 2, axis=0))


def test_active_units_counts_posterior_means_that_move():
    model = GaussianVAE(data_dim=4, hidden=(), latent=4, activation="identity", dtype=np.float64)
    W = np.zeros((4, 8))
    W[0, 0] = 1.0  # unit 0: mu = x_0, variance ~ 1
    W[1, 1] = 0.2  # unit 1: variance ~ 0.04
    W[2, 2] = 0.05  # unit 2: variance ~ 0.0025, below 0.01
    W[:, 4:] = 3.0  # logvar moves a lot, which does not count
    model.params["enc.0.W"] = W  # unit 3: constant mean
    model.params["enc.0.b"] = np.arange(8.0)
    x = np.random.default_rng(9).normal(size=(4000, 4))
    got = ev.active_units(model, x, batch_size=300)
    want = np.var(x @ W[:, :4], axis=0)
    np.testing.assert_allclose(got["variances"], want, rtol=1e-12, atol=1e-15)
    assert got["count"] == 2
    assert ev.active_units(model, x, threshold=0.001)["count"] == 3


def test_reconstruction_errors_by_hand():
    """Decoder forced to a constant output p: the errors are plain averages (EVAL.4)."""
    rng = np.random.default_rng(10)
    model = BernoulliVAE(data_dim=6, hidden=(3,), latent=2, dtype=np.float64)
    p = rng.uniform(0.1, 0.9, size=6)
    model.params["dec.1.W"] = np.zeros((3, 6))
    model.params["dec.1.b"] = np.log(p / (1 - p))  # logits of p
    x = (rng.uniform(size=(10, 6)) > 0.5).astype(np.float64)
    got = ev.reconstruction_errors(model, x, batch_size=3)
    assert got["mse"] == pytest.approx(np.mean((p - x) ** 2), rel=1e-12)
    assert got["bce"] == pytest.approx(-np.mean(x * np.log(p) + (1 - x) * np.log(1 - p)), rel=1e-12)

    gauss = GaussianVAE(data_dim=3, hidden=(), latent=1, activation="identity", dtype=np.float64)
    gauss.params["dec.0.W"] = np.zeros((1, 3))
    gauss.params["dec.0.b"] = np.array([1.5, 0.0, 0.25])  # outside, at the edge of, inside [0, 1]
    x = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])
    got = ev.reconstruction_errors(gauss, x)
    q = np.clip(gauss.params["dec.0.b"], 1e-7, 1 - 1e-7)
    assert got["mse"] == pytest.approx(np.mean((gauss.params["dec.0.b"] - x) ** 2), rel=1e-12)
    assert got["bce"] == pytest.approx(-np.mean(x * np.log(q) + (1 - x) * np.log(1 - q)), rel=1e-12)
    assert np.isfinite(got["bce"])
    assert math.isnan(ev.reconstruction_errors(gauss, x * 3.0)["bce"])  # x outside [0, 1]


# ----------------------------------------------------------------------------------
# VQ-VAE: a stand-in with a known assignment, and the real model when it exists


class FakeVQ:
    """Enough of the VQ-VAE interface: assign(x) = floor(K x[:, :M]), recon = sum x^2 / 2."""

    def __init__(self, num_codes=4, num_vectors=2, data_dim=3):
        self.config = dict(data_dim=data_dim, num_codes=num_codes, num_vectors=num_vectors,
                           code_dim=1, likelihood="gaussian")
        self.dtype = np.dtype(np.float64)

    def check_x(self, x):
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError("x must hold at least one example")
        return x

    def assign(self, x):
        m, k = self.config["num_vectors"], self.config["num_codes"]
        return np.minimum((x[:, :m] * k).astype(np.int64), k - 1)

    def forward(self, x, **_):
        recon = float(np.mean(0.5 * np.sum(x * x, axis=1)))
        return Forward(recon + 1.0, dict(recon=recon, loss=recon + 1.0), {})

    def reconstruct(self, x, rng=None):
        return 0.5 * x


def test_codebook_stats_on_a_fake_vq():
    fake = FakeVQ(num_codes=4, num_vectors=2)
    x = np.array([[0.0, 0.3, 0.5], [0.1, 0.99, 0.5], [0.6, 0.3, 0.5]])  # codes 0,1 / 0,3 / 2,1
    got = ev.codebook_stats(fake, x, batch_size=2)
    np.testing.assert_array_equal(got["counts"], [2, 2, 1, 1])
    p = np.array([2, 2, 1, 1]) / 6
    assert got["perplexity"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-12)
    assert got["used_fraction"] == 1.0
    one = ev.codebook_stats(fake, np.zeros((5, 3)))
    assert one["perplexity"] == pytest.approx(1.0) and one["used_fraction"] == 0.25
    uniform = ev.codebook_stats(FakeVQ(num_codes=4, num_vectors=1),
                                np.array([[0.1, 0, 0], [0.3, 0, 0], [0.6, 0, 0], [0.9, 0, 0]]))
    assert uniform["perplexity"] == pytest.approx(4.0)


def test_elbo_and_evaluate_all_on_a_fake_vq():
    fake = FakeVQ(num_codes=4, num_vectors=2)
    x = np.random.default_rng(12).uniform(size=(7, 3))
    recon = np.mean(0.5 * np.sum(x * x, axis=1))
    for batch_size in (7, 3):  # batches of unequal size are weighted by their size
        got = ev.elbo(fake, x, batch_size=batch_size)
        assert got["recon"] == pytest.approx(recon, rel=1e-12)
        assert got["kl"] == pytest.approx(2 * math.log(4))  # M log K  (T.15)
        assert got["elbo"] == pytest.approx(-(recon + 2 * math.log(4)), rel=1e-12)
        assert got["loss"] == pytest.approx(recon + 1.0, rel=1e-12)
    report = ev.evaluate_all(fake, x, rng=0, k=10)
    assert {"perplexity", "used_fraction", "mse", "bce"} <= set(report)
    assert "log_px" not in report and "active_units" not in report


def test_codebook_stats_on_the_vqvae():
    vqvae = pytest.importorskip("npvae.models.vqvae")
    vq_ops = pytest.importorskip("npvae.ops.vq")
    model = vqvae.VQVAE(data_dim=6, hidden=(5,), num_codes=8, code_dim=2, num_vectors=3,
                        dtype=np.float64, rng=0)
    x = np.random.default_rng(13).normal(size=(25, 6))
    got = ev.codebook_stats(model, x, batch_size=7)
    idx = model.assign(x)
    np.testing.assert_array_equal(got["counts"], vq_ops.code_counts(idx.reshape(-1), 8))
    assert got["counts"].sum() == 25 * 3
    assert got["perplexity"] == pytest.approx(vq_ops.perplexity(got["counts"]), rel=1e-12)
    _, _, stats = model.loss_and_grads(x)
    e = ev.elbo(model, x, batch_size=25)
    assert e["elbo"] == pytest.approx(stats["elbo"], rel=1e-12)
    assert e["kl"] == pytest.approx(3 * math.log(8))


# ----------------------------------------------------------------------------------
# evaluate_all and bad input


def test_evaluate_all_collects_plain_numbers():
    model = small_models()["bernoulli"]
    x = data(model, 10, np.random.default_rng(14))
    report = ev.evaluate_all(model, x, rng=0, k=20, batch_size=4)
    assert {"elbo", "recon", "kl", "loss", "mse", "bce", "active_units", "log_px", "nll",
            "iw_k"} <= set(report)
    assert all(isinstance(v, (int, float)) for v in report.values())
    assert report["log_px"] >= report["elbo"] - 1.0  # IW with k = 20 is not much below the ELBO
    ae = Autoencoder(data_dim=5, hidden=(4,), latent=3, dtype=np.float64)
    assert "log_px" not in ev.evaluate_all(ae, x, rng=0, k=20)  # deterministic: no density


@pytest.mark.parametrize("call, message", [
    (lambda m, x: ev.iw_log_likelihood(m, x, k=0, rng=0), r"k must be an integer >= 1, got 0"),
    (lambda m, x: ev.iw_log_likelihood(m, x, k=2.5, rng=0), r"k must be an integer >= 1"),
    (lambda m, x: ev.iw_log_likelihood(m, x, k=5, rng=0, chunk=0), r"chunk must be an integer"),
    (lambda m, x: ev.iw_log_likelihood(m, x, k=5, rng=0, batch_size=-1), r"batch_size must be"),
    (lambda m, x: ev.iw_log_likelihood(m, x, k=5), r"pass rng"),
    (lambda m, x: ev.iw_log_likelihood(m, x[:0], k=5, rng=0), r"x must hold at least one example"),
    (lambda m, x: ev.iw_log_likelihood(m, x[:, :3], k=5, rng=0), r"x must have 5 features"),
    (lambda m, x: ev.elbo(m, x.astype(np.float32), rng=0), r"x must have dtype float64"),
    (lambda m, x: ev.elbo(m, x), r"pass rng"),
    (lambda m, x: ev.elbo(m, x * 2.0, rng=0), r"x must lie in \[0, 1\]"),
    (lambda m, x: ev.elbo(m, x, rng=0, batch_size=0), r"batch_size must be an integer >= 1"),
    (lambda m, x: ev.kl_per_dimension(m, np.full_like(x, np.nan)), r"x must be finite"),
    (lambda m, x: ev.active_units(m, x, threshold=-1.0), r"threshold must be"),
    (lambda m, x: ev.codebook_stats(m, x), r"codebook_stats needs a VQ-VAE"),
    (lambda m, x: ev.evaluate_all(m, x, rng=0, k=-1), r"k must be an integer >= 0"),
    (lambda m, x: ev.elbo(object(), x, rng=0), r"model must be a VAE, an Autoencoder or a VQ-VAE"),
])
def test_bad_input_is_named(call, message):
    model = small_models()["bernoulli"]
    x = data(model, 4, np.random.default_rng(15))
    with pytest.raises(ValueError, match=message):
        call(model, x)


def test_undefined_estimates_are_refused():
    x = np.random.default_rng(16).uniform(size=(3, 5))
    ae = Autoencoder(data_dim=5, hidden=(4,), latent=3, dtype=np.float64)
    with pytest.raises(ValueError, match=r"deterministic autoencoder.*sampled=True"):
        ev.iw_log_likelihood(ae, x, k=5, rng=0)
    fake = FakeVQ(data_dim=5)
    for call in (lambda: ev.iw_log_likelihood(fake, x, k=5, rng=0),
                 lambda: ev.kl_per_dimension(fake, x), lambda: ev.active_units(fake, x)):
        with pytest.raises(ValueError, match=r"needs a Gaussian q\(z\|x\)"):
            call()


@pytest.mark.parametrize("name", ["bernoulli", "gaussian"])
def test_iw_does_not_depend_on_the_number_of_worker_threads(name):
    # Batches of examples go to different threads; each example has its own noise stream,
    # so the estimate is the same. BLAS runs at one thread per worker, and a product split
    # over a different number of threads may round differently: a stated tolerance.
    model = small_models()[name]
    x = data(model, 9, np.random.default_rng(3))
    one = ev.iw_log_likelihood(model, x, k=24, rng=4, batch_size=2, chunk=8, workers=1)
    two = ev.iw_log_likelihood(model, x, k=24, rng=4, batch_size=2, chunk=8, workers=2)
    np.testing.assert_allclose(two["per_example"], one["per_example"], rtol=1e-6, atol=1e-6)
    assert two["elbo_k1"] == pytest.approx(one["elbo_k1"], rel=1e-6, abs=1e-6)


def test_iw_stops_at_the_first_failing_batch_and_cancels_the_rest():
    model = small_models()["bernoulli"]
    x = data(model, 40, np.random.default_rng(3))
    original, calls = model.decoder_output, [0]

    def failing(z, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("planted failure")
        return original(z, *args, **kwargs)

    model.decoder_output = failing
    with pytest.raises(RuntimeError, match="planted failure"):
        ev.iw_log_likelihood(model, x, k=4, rng=0, batch_size=1, chunk=4, workers=2)
    assert calls[0] < 40  # the batches queued after the failure never ran
