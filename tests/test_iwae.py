"""The importance-weighted objective (IWAE.1-5): its ops against central differences and
stable by hand, the whole model's gradients, k = 1 against the VAE, the bound against
exact log p(x) and against the evaluation estimator.

Gradient checks in float64, the noise eps held fixed, a random upstream gradient (GC.2),
tolerance 1e-6 on the relative error (GC.3), as in tests/test_models.py.
"""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npvae import evaluate as ev
from npvae.gradcheck import check_op
from npvae.models import IWAE, VAE, build
from npvae.ops.iwae import (
    iw_bound_backward, iw_bound_forward, prior_ratio_backward, prior_ratio_forward,
)

from strategies import arrays, seeds
from test_evaluate import exact_log_px, linear_vae, set_exact_posterior
from test_models import (
    TOL, architectures, assert_gradients, away_from_kinks, batches, make_x, randomize,
)

LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------
# The two op pairs


@given(n=st.integers(1, 5), k=st.integers(1, 6), data=st.data())
def test_iw_bound_op_gradients(n, k, data):
    log_w = data.draw(arrays((n, k), -5.0, 5.0))
    errors = check_op(iw_bound_forward, iw_bound_backward, [log_w],
                      rng=np.random.default_rng(n * 10 + k))
    assert max(errors.values()) <= TOL, errors


def test_iw_bound_is_a_stable_log_mean_exp():
    """log (1/k) sum exp, by hand where exp would overflow or underflow (IWAE.2)."""
    log_w = np.array([[0.0, 0.0, 0.0, 0.0],
                      [1000.0, 1000.0, -1e6, 1000.0 + math.log(2.0)],
                      [-800.0, -800.0, -800.0, -800.0]])
    bound, cache = iw_bound_forward(log_w)
    # row 2: weights e^1000 (1, 1, 0, 2), mean e^1000
    np.testing.assert_allclose(bound, [0.0, 1000.0, -800.0], rtol=1e-15, atol=1e-12)
    np.testing.assert_allclose(cache.weights.sum(axis=1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(cache.weights[1], [0.25, 0.25, 0.0, 0.5], atol=1e-15)
    single, _ = iw_bound_forward(np.array([[-123.25]]))
    assert single[0] == -123.25  # k = 1: the log weight itself, exactly


@given(n=st.integers(1, 4), k=st.integers(1, 4), z=st.integers(1, 4), seed=seeds)
def test_prior_ratio_op_gradients(n, k, z, seed):
    rng = np.random.default_rng(seed)
    zs, eps, logvar = rng.normal(size=(n, k, z)), rng.normal(size=(n, k, z)), rng.normal(size=(n, z))
    errors = check_op(prior_ratio_forward, prior_ratio_backward, [zs, eps, logvar], wrt=[0, 2],
                      rng=rng)
    assert max(errors.values()) <= TOL, errors
    _, cache = prior_ratio_forward(zs, eps, logvar)
    assert prior_ratio_backward(np.ones((n, k)), cache)[1] is None  # eps is data


def test_prior_ratio_is_the_density_difference():
    """r = log N(z; 0, I) - log N(z; mu, diag sigma^2), the densities written out (IW.4)."""
    rng = np.random.default_rng(3)
    mu, logvar = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    eps = rng.normal(size=(4, 5, 3))
    std = np.exp(0.5 * logvar)[:, None, :]
    z = mu[:, None, :] + std * eps  # (N, k, Z)
    log_pz = np.sum(-0.5 * z**2 - 0.5 * LOG_2PI, axis=2)
    log_q = np.sum(-0.5 * ((z - mu[:, None, :]) / std) ** 2 - np.log(std) - 0.5 * LOG_2PI, axis=2)
    r, _ = prior_ratio_forward(z, eps, logvar)
    np.testing.assert_allclose(r, log_pz - log_q, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------
# The whole model


def iwae_like(model_arch, likelihood, k, sigma2=1.0):
    return IWAE(**model_arch, likelihood=likelihood, sigma2=sigma2, k=k, dtype=np.float64)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@given(arch=architectures(), n=batches, k=st.integers(1, 5), seed=seeds)
def test_iwae_gradients(likelihood, arch, n, k, seed):
    rng = np.random.default_rng(seed)
    model = randomize(iwae_like(arch, likelihood, k, sigma2=0.7), rng)
    x = make_x(model, n, rng)
    eps = rng.standard_normal((n, k, arch["latent"]))
    mu, logvar = model.encode(x)
    z = (mu[:, None, :] + eps * np.exp(0.5 * logvar)[:, None, :]).reshape(n * k, -1)
    away_from_kinks(model, np.repeat(x, k, axis=0), z)
    assert_gradients(model, x, eps=eps)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_iwae_k1_matches_the_vae(likelihood):
    """k = 1 with the VAE's noise (IWAE.5): the same decoder gradients, bit for bit; the
    losses differ by exactly (log q(z|x) - log p(z)) - KL, computed here independently;
    the encoder gradients differ by exactly that term's gradient (central differences)."""
    rng = np.random.default_rng(11)
    arch = dict(data_dim=7, hidden=(5, 4), latent=3, activation="tanh")
    vae = randomize(VAE(**arch, likelihood=likelihood, sigma2=0.5, dtype=np.float64), rng)
    iwae = iwae_like(arch, likelihood, 1, sigma2=0.5)
    iwae.params.flat[...] = vae.params.flat
    x = make_x(vae, 6, rng)
    eps = rng.standard_normal((6, 3))

    def gap():  # mean over x of -r - KL, from the encoder alone: (IWAE.5)
        mu, logvar = vae.encode(x)
        z = mu + eps * np.exp(0.5 * logvar)
        log_q = np.sum(-0.5 * eps**2 - 0.5 * logvar - 0.5 * LOG_2PI, axis=1)
        log_pz = np.sum(-0.5 * z**2 - 0.5 * LOG_2PI, axis=1)
        kl = 0.5 * np.sum(mu**2 + np.exp(logvar) - logvar - 1.0, axis=1)
        return float(np.mean(log_q - log_pz - kl))

    loss_v, grads_v, _ = vae.loss_and_grads(x, eps=eps)
    loss_i, grads_i, _ = iwae.loss_and_grads(x, eps=eps[:, None, :])
    assert loss_i - loss_v == pytest.approx(gap(), rel=1e-12, abs=1e-12)
    for name in vae.params:
        if name.startswith("dec."):
            assert np.array_equal(grads_i[name], grads_v[name]), name  # exact: w~ = 1
    from npvae.gradcheck import numerical_gradient, rel_error
    for name in vae.params:
        if name.startswith("enc."):
            want = numerical_gradient(gap, vae.params[name])
            assert rel_error(grads_i[name] - grads_v[name], want) <= TOL, name


def test_iwae_k1_is_the_elbo_on_average():
    """E_eps[L_1] = ELBO (IWAE.5, IW.2): the mean k = 1 loss over many draws of eps is the
    VAE's closed-form-KL loss averaged over the same draws, within Monte Carlo error."""
    rng = np.random.default_rng(5)
    arch = dict(data_dim=6, hidden=(5,), latent=2, activation="tanh")
    vae = randomize(VAE(**arch, likelihood="bernoulli", dtype=np.float64), rng)
    iwae = iwae_like(arch, "bernoulli", 1)
    iwae.params.flat[...] = vae.params.flat
    x = np.repeat(make_x(vae, 1, rng), 20000, axis=0)  # one example, 20,000 draws
    eps = rng.standard_normal((x.shape[0], 2))
    _, _, s_v = vae.loss_and_grads(x, eps=eps)
    _, _, s_i = iwae.loss_and_grads(x, eps=eps[:, None, :])
    mu, logvar = vae.encode(x[:1])
    z = mu + eps * np.exp(0.5 * logvar)
    diff = np.sum(-0.5 * eps**2 - 0.5 * logvar + 0.5 * z**2, axis=1)  # log q - log p(z) per draw
    se = diff.std(ddof=1) / math.sqrt(diff.size)
    assert abs(s_i["loss"] - s_v["loss"]) < 4 * se
    assert abs(s_i["kl"] - s_v["kl"]) < 4 * se  # the sampled KL estimates the closed form


def linear_iwae(vae, k):
    model = IWAE(data_dim=vae.config["data_dim"], hidden=(), latent=vae.latent,
                 activation="identity", likelihood="gaussian", sigma2=vae.config["sigma2"],
                 k=k, dtype=np.float64)
    model.params.flat[...] = vae.params.flat
    return model


def test_iwae_bound_increases_with_k():
    """On a linear-Gaussian model with exact log p(x): the mean training bound rises with
    k and stays below log p(x), closing most of the gap by k = 500 (IWAE.2, IW.2)."""
    rng = np.random.default_rng(7)
    vae = linear_vae(4, 2, 0.5, rng, orthogonal=True)
    set_exact_posterior(vae)
    p = vae.params  # q off the posterior, as in test_importance_weighted_estimate_closes_the_gap
    p["enc.0.W"] += rng.normal(size=p["enc.0.W"].shape) * 0.1
    p["enc.0.b"] += np.array([0.8, -0.6, 0.5, 1.0])
    x = np.repeat(rng.normal(size=(10, 4)), 40, axis=0)
    log_px = exact_log_px(vae, x).mean()
    gaps, ses = [], []
    for k in (1, 5, 50, 500):
        model = linear_iwae(vae, k)
        bound = -model.loss_and_grads(x, rng=np.random.default_rng(k))[0]
        per = []  # a standard error from ten independent repeats
        for seed in range(10):
            per.append(-model.loss_and_grads(x[::10], rng=np.random.default_rng(100 + seed))[0])
        gaps.append(log_px - bound)
        ses.append(np.std(per, ddof=1) / math.sqrt(10 * 10))
    assert gaps[0] > 1.0
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3]
    assert gaps[3] > -3 * ses[3]  # never above log p(x), up to noise
    assert gaps[3] < 0.1 * gaps[0]


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_iwae_bound_matches_iw_log_likelihood(likelihood):
    """With the noise iw_log_likelihood draws (example_rng), the training bound per example
    is its L_k (IWAE.1-2 against IW.1-5)."""
    rng = np.random.default_rng(2)
    arch = dict(data_dim=9, hidden=(6,), latent=3, activation="softplus")
    model = randomize(iwae_like(arch, likelihood, 7, sigma2=0.8), rng)
    x = make_x(model, 5, rng)
    want = ev.iw_log_likelihood(model, x, k=7, rng=42)["per_example"]
    root = int(np.random.default_rng(42).integers(2**63))
    eps = np.stack([ev.example_rng(root, i).standard_normal((7, 3)) for i in range(5)])
    for i in range(5):  # one example at a time: the loss is then its -L_k
        loss, _, _ = model.loss_and_grads(x[i:i + 1], eps=eps[i:i + 1])
        assert -loss == pytest.approx(want[i], rel=1e-12, abs=1e-10)


def test_iwae_config_rebuilds_and_refuses_elbo_options():
    model = IWAE(data_dim=5, hidden=(3,), latent=2, k=4, rng=1)
    again = build(model.config, rng=1)
    assert isinstance(again, IWAE) and again.config == model.config and again.config["k"] == 4
    np.testing.assert_array_equal(again.params.flat, model.params.flat)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k .*integer >= 1"):
            IWAE(data_dim=5, hidden=(3,), latent=2, k=bad)
    with pytest.raises(ValueError, match="no KL weight"):
        IWAE(data_dim=5, hidden=(3,), latent=2, beta=2.0)
    with pytest.raises(ValueError, match="eps"):
        model.loss_and_grads(np.zeros((3, 5), np.float32), eps=np.zeros((3, 2), np.float32))


def test_iwae_float32_step_is_finite_and_close_to_float64():
    rng = np.random.default_rng(0)
    m64 = IWAE(data_dim=20, hidden=(8,), latent=4, activation="tanh", k=5, dtype=np.float64, rng=0)
    m32 = IWAE(data_dim=20, hidden=(8,), latent=4, activation="tanh", k=5, rng=0)
    m64.params.flat[...] = m32.params.flat
    x = (rng.random((6, 20)) < 0.3).astype(np.float64)
    eps = rng.standard_normal((6, 5, 4))
    l64, g64, _ = m64.loss_and_grads(x, eps=eps)
    l32, g32, _ = m32.loss_and_grads(x.astype(np.float32), eps=eps.astype(np.float32))
    assert l32 == pytest.approx(l64, rel=1e-5)
    np.testing.assert_allclose(g32.flat, g64.flat, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------------
# The command line: npvae train --objective iwae --k K


def test_cli_trains_an_iwae_and_refuses_misplaced_options(tmp_path, monkeypatch, capsys):
    from npvae import cli, data
    from npvae.checkpoint import load_checkpoint
    from test_cli import TINY, fake_load

    monkeypatch.setattr(data, "load", fake_load)  # a tiny fake dataset: no network
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--latent", "2", "--epochs", "1", "--objective", "iwae",
                     "--k", "3", "--out", str(run)]) == 0
    ck = load_checkpoint(run)
    assert isinstance(ck.model, IWAE) and ck.model.config["k"] == 3  # rebuilt from the config
    assert cli.main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert load_checkpoint(run).epoch == 2
    capsys.readouterr()
    for argv, message in [
        (["--k", "3"], "--k is the number of importance samples of --objective iwae"),
        (["--model", "ae", "--objective", "iwae"], "--objective is for --model"),
        (["--model", "vqvae", "--k", "2"], "--k is for --model"),
        (["--objective", "iwae", "--beta", "2"], "--beta is an option of the ELBO"),
        (["--objective", "iwae", "--free-bits", "0.5"], "--free-bits is an option of the ELBO"),
    ]:
        assert cli.main(["train", *TINY, *argv, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err


def test_training_reports_the_same_objective_on_training_and_validation_data(tmp_path):
    # an IWAE trains on -L_k; its validation loss must be -L_k too, not the negative ELBO,
    # which is larger (L_k >= ELBO, IW.2): on this data the gap is several nats
    from npvae.train import train

    rng = np.random.default_rng(0)
    x = (rng.random((64, 16)) < 0.3).astype(np.float32)
    model = IWAE(data_dim=16, hidden=[8], latent=3, k=5)
    row = train(model, x, x[:32], epochs=1, batch_size=16, run_dir=tmp_path, progress=False,
                verbose=False)[-1]
    assert row["val_loss"] < -row["val_elbo"] - 0.5
    # and it is the model's own objective on the validation data, up to its noise
    assert abs(row["val_loss"] - model.loss(x[:32], rng=1)) < 1.0
