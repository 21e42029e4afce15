"""Whole models: every parameter gradient against central differences, the autoencoder
as a VAE whose log-variance is fixed at 0 (tutorial eqs. 13-14), the interface every model
shares, and errors that name the bad argument.

Gradient checks run in float64 over small random architectures (data 1-8, up to two
hidden layers of 1-8 units, latent 1-4, batch 1-6) with every parameter drawn at random,
the noise eps held fixed, and a tolerance of 1e-6 on the relative error (GC.3) of each
parameter's gradient (see assert_gradients for gradients far smaller than the rest). Inputs
are kept away from the places where finite differences mean nothing: ReLU kinks,
free-bits thresholds and ties between codes.
"""
import math

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from npvae.gradcheck import check_model
from npvae.models import Autoencoder, BernoulliVAE, GaussianVAE, VAE, build
from npvae.models.base import kl_weight
from npvae.ops.mlp import mlp_forward

from strategies import seeds

try:
    from npvae.models.vqvae import VQVAE
except ImportError:  # the tests below that need it are skipped
    VQVAE = None

TOL = 1e-6
FLOOR = 1e-4  # see assert_gradients
SMOOTH = ("tanh", "softplus", "sigmoid")
KINKED = ("relu", "leaky_relu")
H = 1e-3  # the Richardson step (GC.4): its rounding error, ~1e-12 |f| / H, stays small
MARGIN = 2e-2  # distance kept from kinks, thresholds and ties: well above what a step H moves


@st.composite
def architectures(draw):
    return dict(data_dim=draw(st.integers(1, 8)),
                hidden=tuple(draw(st.lists(st.integers(1, 8), max_size=2))),
                latent=draw(st.integers(1, 4)),
                activation=draw(st.sampled_from(SMOOTH + KINKED)))


batches = st.integers(1, 6)


def randomize(model, rng, scale=0.5):
    """Every parameter (biases too) drawn at random, so no term can hide behind a zero."""
    model.params.flat[...] = rng.normal(size=model.params.flat.size) * scale
    return model


def make_x(model, n, rng):
    d = model.config["data_dim"]
    if model.config["likelihood"] == "bernoulli":
        return rng.uniform(size=(n, d))  # grey levels: the general case of (LIK.3)
    return rng.normal(size=(n, d))


def hidden_preactivations(model, prefix, inputs):
    """a_i + b_i of every hidden layer of one MLP (where ReLU has its kink)."""
    _, cache = mlp_forward(model.params, prefix, inputs, model.config["activation"])
    layers = len(cache.weights)
    return [cache.inputs[i] @ cache.weights[i] + model.params[f"{prefix}.{i}.b"]
            for i in range(layers - 1)]


def away_from_kinks(model, x, z):
    """assume() every hidden pre-activation of encoder (on x) and decoder (on z) is off 0."""
    if model.config["activation"] not in KINKED:
        return
    pre = hidden_preactivations(model, "enc", x) + hidden_preactivations(model, "dec", z)
    assume(all(np.abs(a).min() > MARGIN for a in pre if a.size))


def vae_latent(model, x, eps):
    mu, logvar = model.encode(x)
    return mu + eps * np.exp(0.5 * logvar)


def assert_gradients(model, x, **kwargs):
    """Every parameter's relative error (GC.3) <= TOL, measured against the larger of its own
    gradient's size and FLOOR times the largest parameter gradient.

    The central difference of a loss of size |f| carries a rounding error near 1e-12 |f|
    whatever the gradient, so a parameter whose whole gradient is 1e-7 (a unit behind a
    saturated tanh, say) cannot be checked to 1e-6 of itself; it is checked to 1e-6 of
    the floor instead, which still exposes any error that matters to the model.
    """
    rows = check_model(model, x, h=H, **kwargs)
    sizes = [max(row.analytic_norm, row.numeric_norm) for row in rows]  # >= the max |entry|
    floor = FLOOR * max(sizes)
    errors = [row.rel_error * size / max(size, floor) for row, size in zip(rows, sizes)]
    assert max(errors) <= TOL, "\n" + "\n".join(str(row) for row in rows)


# ----------------------------------------------------------------------------------
# Gradient checks, every model and option


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@given(arch=architectures(), n=batches, seed=seeds, sigma2=st.floats(0.2, 3.0))
def test_vae_gradients(likelihood, arch, n, seed, sigma2):
    rng = np.random.default_rng(seed)
    model = randomize(VAE(**arch, likelihood=likelihood, sigma2=sigma2, dtype=np.float64), rng)
    x = make_x(model, n, rng)
    eps = rng.standard_normal((n, arch["latent"]))
    away_from_kinks(model, x, vae_latent(model, x, eps))
    assert_gradients(model, x, eps=eps)


@given(arch=architectures(), n=batches, seed=seeds, beta=st.floats(0.0, 3.0),
       warmup=st.integers(1, 50), data=st.data())
def test_vae_gradients_with_beta_and_warmup(arch, n, seed, beta, warmup, data):
    step = data.draw(st.integers(0, warmup - 1))  # inside the warm-up: w = beta step / warmup
    rng = np.random.default_rng(seed)
    model = randomize(BernoulliVAE(**arch, beta=beta, warmup_steps=warmup, dtype=np.float64), rng)
    x = make_x(model, n, rng)
    eps = rng.standard_normal((n, arch["latent"]))
    away_from_kinks(model, x, vae_latent(model, x, eps))
    assert_gradients(model, x, eps=eps, step=step)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@given(arch=architectures(), n=batches, seed=seeds, free_bits=st.floats(0.05, 1.5))
def test_vae_gradients_with_free_bits(likelihood, arch, n, seed, free_bits):
    rng = np.random.default_rng(seed)
    model = VAE(**arch, likelihood=likelihood, free_bits=free_bits, dtype=np.float64)
    randomize(model, rng)
    x = make_x(model, n, rng)
    eps = rng.standard_normal((n, arch["latent"]))
    away_from_kinks(model, x, vae_latent(model, x, eps))
    mu, logvar = model.encode(x)
    kl_mean = np.mean(0.5 * (mu**2 + np.exp(logvar) - logvar - 1.0), axis=0)  # (Z,)
    assume(np.abs(kl_mean - free_bits).min() > 10 * MARGIN)  # off the max(lambda, .) corner
    assert_gradients(model, x, eps=eps)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("sampled", [True, False])
@given(arch=architectures(), n=batches, seed=seeds, beta=st.floats(0.0, 3.0),
       warmup=st.integers(0, 20), data=st.data())
def test_autoencoder_gradients(likelihood, sampled, arch, n, seed, beta, warmup, data):
    step = data.draw(st.none() | st.integers(0, 30))
    rng = np.random.default_rng(seed)
    model = randomize(Autoencoder(**arch, likelihood=likelihood, sampled=sampled, beta=beta,
                                  warmup_steps=warmup, dtype=np.float64), rng)
    x = make_x(model, n, rng)
    eps = rng.standard_normal((n, arch["latent"])) if sampled else None
    code = model.encode(x)
    away_from_kinks(model, x, code + eps if sampled else code)
    assert_gradients(model, x, eps=eps, step=step)


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("ema", [False, True])
@given(data_dim=st.integers(1, 8), hidden=st.lists(st.integers(1, 8), max_size=2),
       num_codes=st.integers(2, 6), code_dim=st.integers(1, 3), num_vectors=st.integers(1, 2),
       activation=st.sampled_from(SMOOTH + KINKED),
       likelihood=st.sampled_from(["gaussian", "bernoulli"]),
       n=batches, seed=seeds)
def test_vqvae_gradients(metric, ema, data_dim, hidden, num_codes, code_dim, num_vectors,
                         activation, likelihood, n, seed):
    """Straight-through gradients, checked on the surrogate whose true gradient they are."""
    if VQVAE is None:
        pytest.skip("npvae.models.vqvae is not available")
    rng = np.random.default_rng(seed)
    model = VQVAE(data_dim=data_dim, hidden=tuple(hidden), num_codes=num_codes, code_dim=code_dim,
                  num_vectors=num_vectors, activation=activation, likelihood=likelihood,
                  metric=metric, ema=ema, dtype=np.float64, rng=0)
    randomize(model, rng)
    x = make_x(model, n, rng)
    assume(model.assignment_margin(x) > MARGIN)  # no two codes nearly tied for any vector
    z_q = model.params["codebook"][model.assign(x)].reshape(n, -1)
    away_from_kinks(model, x, z_q)
    loss, grads, _ = model.loss_and_grads(x)
    assert model.straight_through_objective(x)() == pytest.approx(loss, rel=1e-12)
    if ema:
        assert not grads["codebook"].any()  # learned by moving averages, not by gradient
    assert_gradients(model, x)


# ----------------------------------------------------------------------------------
# The autoencoder is the VAE with logvar = 0 (tutorial section 5)


def matching_vae(ae):
    """A VAE with the autoencoder's decoder and an encoder whose mu-part is the AE encoder
    and whose logvar-part has zero weights and bias, so logvar(x) = 0 for every x."""
    cfg = ae.config
    vae = VAE(data_dim=cfg["data_dim"], hidden=cfg["hidden"], latent=cfg["latent"],
              activation=cfg["activation"], likelihood=cfg["likelihood"], sigma2=cfg["sigma2"],
              beta=cfg["beta"], dtype=np.float64)
    z = cfg["latent"]
    last = len(cfg["hidden"])
    for key, value in ae.params.items():
        if key == f"enc.{last}.W":
            vae.params[key] = np.concatenate([value, np.zeros_like(value)], axis=1)
        elif key == f"enc.{last}.b":
            vae.params[key] = np.concatenate([value, np.zeros(z)])
        else:
            vae.params[key] = value
    return vae


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("sampled", [True, False])
@given(arch=architectures(), n=batches, seed=seeds, beta=st.floats(0.0, 3.0))
def test_autoencoder_is_the_vae_with_unit_variance(likelihood, sampled, arch, n, seed, beta):
    """Same loss and same shared gradients as the VAE with logvar = 0; the deterministic
    autoencoder is that VAE with eps = 0. The KL of (KL.1) becomes ||Enc(x)||^2 / 2 (AE.1)."""
    rng = np.random.default_rng(seed)
    ae = randomize(Autoencoder(**arch, likelihood=likelihood, sampled=sampled, beta=beta,
                               dtype=np.float64), rng)
    vae = matching_vae(ae)
    x = make_x(ae, n, rng)
    eps = rng.standard_normal((n, arch["latent"]))
    ae_loss, ae_grads, ae_stats = ae.loss_and_grads(x, eps=eps if sampled else None)
    vae_eps = eps if sampled else np.zeros_like(eps)  # z = mu exactly
    vae_loss, vae_grads, vae_stats = vae.loss_and_grads(x, eps=vae_eps)
    assert ae_loss == pytest.approx(vae_loss, rel=1e-12, abs=1e-12)
    for key in ("recon", "kl", "elbo"):
        assert ae_stats[key] == pytest.approx(vae_stats[key], rel=1e-12, abs=1e-12)
    last = len(arch["hidden"])
    for key, g in ae_grads.items():
        want = vae_grads[key]
        if key.startswith(f"enc.{last}."):
            want = want[..., : arch["latent"]]  # the mu half
        np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sampled", [True, False])
def test_gaussian_autoencoder_loss_is_half_of_tutorial_eq_14_plus_a_constant(sampled):
    """sigma2 = 1, beta = 1: loss = E||x - Dec(z)||^2 / 2 + ||Enc(x)||^2 / 2 + (D/2) log 2 pi."""
    rng = np.random.default_rng(0)
    ae = randomize(Autoencoder(data_dim=7, hidden=(5,), latent=3, activation="tanh",
                               likelihood="gaussian", sampled=sampled, dtype=np.float64), rng)
    x = rng.normal(size=(9, 7))
    eps = rng.standard_normal((9, 3))
    code = ae.encode(x)
    z = code + eps if sampled else code
    r = x - ae.decoder_output(z)
    want = np.mean(0.5 * np.sum(r * r, axis=1) + 0.5 * np.sum(code * code, axis=1)) \
        + 0.5 * 7 * math.log(2 * math.pi)
    loss, _, _ = ae.loss_and_grads(x, eps=eps if sampled else None)
    assert loss == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------------
# The interface every model shares


def model_specs():
    """name -> (class, keyword arguments including the init seed), small and quick."""
    small = dict(data_dim=6, hidden=(5,), latent=3, activation="tanh")
    specs = {
        "vae-gaussian": (GaussianVAE, dict(small, sigma2=0.5, rng=1)),
        "vae-bernoulli": (BernoulliVAE, dict(small, rng=2)),
        "vae-beta-warmup-free-bits": (VAE, dict(small, beta=2.0, warmup_steps=10,
                                                free_bits=0.05, rng=3)),
        "ae-sampled-gaussian": (Autoencoder, dict(small, likelihood="gaussian", sampled=True,
                                                  rng=4)),
        "ae-deterministic-bernoulli": (Autoencoder, dict(small, rng=5)),
    }
    if VQVAE is not None:
        vq = dict(data_dim=6, hidden=(5,), num_codes=5, code_dim=2, num_vectors=2)
        specs["vqvae-euclidean"] = (VQVAE, dict(vq, rng=6))
        specs["vqvae-dot-ema-bernoulli"] = (VQVAE, dict(vq, metric="dot", ema=True,
                                                        likelihood="bernoulli", rng=7))
    return specs


SPECS = model_specs()


def new_model(name, dtype=np.float64):
    cls, kwargs = SPECS[name]
    return cls(**kwargs, dtype=dtype)


def needs_noise(model):
    return isinstance(model, VAE) or (isinstance(model, Autoencoder) and model.config["sampled"])


def noise_for(model, n, rng, dtype):
    return rng.standard_normal((n, model.latent)).astype(dtype) if needs_noise(model) else None


def is_vq(model):
    return VQVAE is not None and isinstance(model, VQVAE)


def other_models():
    """name -> (model, x, the noise keyword) for the models outside SPECS."""
    from npvae.models import IWAE, ConvVAE, MADEPrior

    rng = np.random.default_rng(9)
    iwae = IWAE(data_dim=6, hidden=(5,), latent=3, k=4, activation="tanh", dtype=np.float64, rng=8)
    conv = ConvVAE(image_shape=(1, 8, 8), channels=(2, 3), latent=2, dtype=np.float64, rng=9)
    prior = MADEPrior(num_codes=3, num_vectors=4, hidden=(6,), dtype=np.float64, rng=10)
    return {
        "iwae": (iwae, rng.uniform(size=(3, 6)), dict(eps=rng.standard_normal((3, 4, 3)))),
        "conv-vae": (conv, rng.uniform(size=(3, 64)), dict(eps=rng.standard_normal((3, 2)))),
        "made-prior": (prior, prior.one_hot(rng.integers(3, size=(5, 4))), {}),
    }


def every_model(name):
    if name in SPECS:
        model = new_model(name)
        rng = np.random.default_rng(0)
        x = make_x(model, 4, rng)
        noise = noise_for(model, 4, rng, np.float64)
        return model, x, {} if noise is None else dict(eps=noise)
    return other_models()[name]


@pytest.mark.parametrize("name", list(SPECS) + ["iwae", "conv-vae", "made-prior"])
def test_forward_alone_gives_the_loss_and_no_call_changes_the_model(name):
    """``loss`` and ``forward`` run no backward pass and give loss_and_grads' numbers
    exactly (the same ops on the same inputs); no call leaves state in the model."""
    model, x, noise = every_model(name)
    params, buffers = model.params.flat.copy(), {k: b.copy() for k, b in model.buffers.items()}
    loss, grads, stats = model.loss_and_grads(x, **noise)
    fwd = model.forward(x, **noise)
    assert fwd.loss == loss and fwd.stats == stats
    np.testing.assert_array_equal(model.backward(fwd).flat, grads.flat)

    def no_backward(*args):
        raise AssertionError("the forward pass ran the reverse chain")

    model._reverse = no_backward
    assert model.loss(x, **noise) == loss
    np.testing.assert_array_equal(model.params.flat, params)
    for key, value in buffers.items():
        np.testing.assert_array_equal(model.buffers[key], value, err_msg=key)
    with pytest.raises(AssertionError, match="reverse chain"):
        model.loss_and_grads(x, **noise)  # the patch took: loss_and_grads does call it


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grads_have_the_keys_shapes_and_dtype_of_params(name, dtype):
    model = new_model(name, dtype)
    rng = np.random.default_rng(0)
    x = make_x(model, 4, rng).astype(dtype)
    loss, grads, stats = model.loss_and_grads(x, eps=noise_for(model, 4, rng, dtype))
    assert isinstance(loss, float) and np.isfinite(loss)
    assert list(grads) == list(model.params)
    for key, g in grads.items():
        assert g.shape == model.params[key].shape and g.dtype == np.dtype(dtype), key
        assert np.all(np.isfinite(g)), key
    assert all(isinstance(v, (int, float)) for v in stats.values())


@pytest.mark.parametrize("name", list(SPECS))
def test_float32_model_agrees_with_float64(name):
    m64, m32 = new_model(name), new_model(name, np.float32)
    m32.params.flat[...] = m64.params.flat
    rng = np.random.default_rng(1)
    x = make_x(m64, 5, rng)
    eps = noise_for(m64, 5, rng, np.float64)
    l64, g64, _ = m64.loss_and_grads(x, eps=eps)
    l32, g32, _ = m32.loss_and_grads(x.astype(np.float32),
                                     eps=None if eps is None else eps.astype(np.float32))
    assert l32 == pytest.approx(l64, rel=1e-5)
    scale = max(np.abs(g64.flat).max(), 1e-12)
    assert np.abs(g32.flat - g64.flat).max() / scale < 1e-4


@pytest.mark.parametrize("name", list(SPECS))
def test_build_remakes_the_same_model_from_its_config(name):
    model = new_model(name)
    again = build(model.config, rng=SPECS[name][1]["rng"])
    assert type(again) is type(model) and again.dtype == model.dtype
    assert again.config == model.config
    assert again.params.shapes == model.params.shapes
    np.testing.assert_array_equal(again.params.flat, model.params.flat)  # same seed, same init


@pytest.mark.parametrize("name", list(SPECS))
def test_encode_decode_reconstruct_sample(name):
    model = new_model(name)
    rng = np.random.default_rng(2)
    x = make_x(model, 7, rng)
    d = model.config["data_dim"]
    bernoulli = model.config["likelihood"] == "bernoulli"
    if is_vq(model):
        m, dz, k = model.M, model.Dz, model.K
        assert model.encode(x).shape == (7, m, dz)
        idx = model.assign(x)
        assert idx.shape == (7, m) and idx.dtype.kind in "iu" and idx.min() >= 0 and idx.max() < k
        decoded = model.decode_indices(idx)
    else:
        enc = model.encode(x)
        mu = enc[0] if isinstance(model, VAE) else enc
        if isinstance(model, VAE):
            assert enc[0].shape == enc[1].shape == (7, model.latent)
        assert mu.shape == (7, model.latent)
        decoded = model.decode(mu)
    assert decoded.shape == (7, d)
    recon = model.reconstruct(x)
    np.testing.assert_allclose(recon, decoded, rtol=1e-12)  # posterior mean / chosen codes
    assert model.reconstruct(x, rng=3).shape == (7, d)
    samples = model.sample(11, rng=4)
    assert samples.shape == (11, d) and samples.dtype == model.dtype
    np.testing.assert_array_equal(samples, model.sample(11, rng=4))  # a seed fixes them
    if bernoulli:
        for out in (decoded, recon, samples):
            assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("name", list(SPECS))
def test_loss_is_deterministic_given_eps_or_seed(name):
    model = new_model(name)
    rng = np.random.default_rng(3)
    x = make_x(model, 5, rng)
    eps = noise_for(model, 5, rng, np.float64)
    a, ga, _ = model.loss_and_grads(x, eps=eps)
    b, gb, _ = model.loss_and_grads(x, eps=eps)
    assert a == b and np.array_equal(ga.flat, gb.flat)
    if needs_noise(model):
        c = model.loss_and_grads(x, rng=np.random.default_rng(8))[0]
        assert c == model.loss_and_grads(x, rng=np.random.default_rng(8))[0]
        eps8 = np.random.default_rng(8).standard_normal((5, model.latent))
        want = model.loss_and_grads(x, eps=eps8)[0]
        assert c == want  # rng draws exactly the eps it would be given


@pytest.mark.parametrize("name", list(SPECS))
def test_stats_hold_every_term(name):
    model = new_model(name)
    rng = np.random.default_rng(4)
    x = make_x(model, 6, rng)
    loss, _, stats = model.loss_and_grads(x, eps=noise_for(model, 6, rng, np.float64))
    assert {"recon", "kl", "elbo", "loss"} <= set(stats)
    assert stats["loss"] == loss
    assert stats["elbo"] == pytest.approx(-(stats["recon"] + stats["kl"]), rel=1e-12)
    if is_vq(model):
        assert stats["kl"] == pytest.approx(model.M * math.log(model.K))  # (T.15)
    elif model.config.get("free_bits", 0.0) == 0.0:
        assert loss == pytest.approx(stats["recon"] + stats["kl_weight"] * stats["kl"], rel=1e-12)


@pytest.mark.parametrize("step, weight", [(None, 2.0), (0, 0.0), (5, 1.0), (10, 2.0), (30, 2.0)])
def test_warmup_weight_schedule(step, weight):
    assert kl_weight(2.0, 10, step) == pytest.approx(weight)
    model = BernoulliVAE(data_dim=4, hidden=(), latent=2, beta=2.0, warmup_steps=10,
                         dtype=np.float64)
    x = np.full((3, 4), 0.5)
    eps = np.zeros((3, 2))
    loss, _, stats = model.loss_and_grads(x, eps=eps, step=step)
    assert stats["kl_weight"] == pytest.approx(weight)
    assert loss == pytest.approx(stats["recon"] + weight * stats["kl"], rel=1e-12)


def test_no_warmup_means_full_weight():
    assert kl_weight(0.5, 0, 0) == 0.5 and kl_weight(0.5, 0, None) == 0.5


def test_free_bits_objective_by_hand():
    """sum_j max(lambda, mean_n KL_nj) replaces the KL (OBJ.3); stats['kl'] stays the true KL."""
    rng = np.random.default_rng(5)
    model = randomize(VAE(data_dim=5, hidden=(4,), latent=3, activation="tanh", free_bits=0.3,
                          beta=1.5, dtype=np.float64), rng)
    x = rng.uniform(size=(8, 5))
    eps = rng.standard_normal((8, 3))
    loss, _, stats = model.loss_and_grads(x, eps=eps)
    mu, logvar = model.encode(x)
    kl_dim = 0.5 * (mu**2 + np.exp(logvar) - logvar - 1.0)
    assert stats["kl"] == pytest.approx(kl_dim.sum(axis=1).mean(), rel=1e-12)
    kl_term = np.maximum(kl_dim.mean(axis=0), 0.3).sum()
    assert loss == pytest.approx(stats["recon"] + 1.5 * kl_term, rel=1e-12)


# ----------------------------------------------------------------------------------
# Bad input names the argument


def bad_cases():
    g = GaussianVAE(data_dim=5, hidden=(4,), latent=2, dtype=np.float64)
    b = BernoulliVAE(data_dim=5, hidden=(4,), latent=2, dtype=np.float64)
    sampled_ae = Autoencoder(data_dim=5, latent=2, sampled=True, dtype=np.float64)
    x = np.full((3, 5), 0.5)
    eps = np.zeros((3, 2))
    nan = x.copy()
    nan[1, 2] = np.nan
    return [
        ("features", lambda: g.loss_and_grads(np.zeros((3, 4)), eps=eps),
         r"x must have 5 features per example \(shape \(N, 5\)\), got \(3, 4\)"),
        ("rank", lambda: g.loss_and_grads(np.zeros(5), eps=eps), r"x must have 2 dimensions"),
        ("dtype", lambda: g.loss_and_grads(x.astype(np.float32), eps=eps),
         r"x must have dtype float64 like the model, got float32"),
        ("integer", lambda: g.loss_and_grads(x.astype(int), eps=eps),
         r"x must have dtype float32 or float64"),
        ("list", lambda: g.loss_and_grads(x.tolist(), eps=eps), r"x must be a numpy array"),
        ("nan", lambda: g.loss_and_grads(nan, eps=eps), r"x must be finite.*\(1, 2\)"),
        ("empty", lambda: g.loss_and_grads(x[:0], eps=eps[:0]),
         r"x must hold at least one example"),
        ("bernoulli range", lambda: b.loss_and_grads(x + 1.0, eps=eps),
         r"x must lie in \[0, 1\] \(Bernoulli targets\), but it holds 1.5 at index \(0, 0\) "
         r"\(values from 1.5 to 1.5\)"),
        ("bernoulli below 0", lambda: b.loss_and_grads(np.where(nan != nan, -0.25, x), eps=eps),
         r"holds -0.25 at index \(1, 2\) \(values from -0.25 to 0.5\)"),
        # the Bernoulli check reads min and max first: a NaN or inf must still be named
        ("bernoulli nan", lambda: b.loss_and_grads(nan, eps=eps), r"x must be finite.*\(1, 2\)"),
        ("bernoulli inf", lambda: b.loss_and_grads(np.where(nan != nan, np.inf, x), eps=eps),
         r"x must be finite, but it holds inf at index \(1, 2\)"),
        ("bernoulli -inf", lambda: b.loss_and_grads(np.where(nan != nan, -np.inf, x), eps=eps),
         r"x must be finite, but it holds -inf at index \(1, 2\)"),
        ("eps shape", lambda: g.loss_and_grads(x, eps=np.zeros((3, 3))),
         r"eps must have shape \(3, 2\)"),
        ("eps dtype", lambda: g.loss_and_grads(x, eps=eps.astype(np.float32)),
         r"eps must have dtype float64"),
        ("no noise", lambda: g.loss_and_grads(x), r"pass rng .* or eps"),
        ("sampled ae no noise", lambda: sampled_ae.loss_and_grads(x), r"pass rng"),
        ("decode z", lambda: g.decode(np.zeros((3, 3))), r"z must have shape \(N, 2\)"),
        ("likelihood", lambda: VAE(likelihood="poisson"), r"likelihood must be one of"),
        ("sigma2", lambda: GaussianVAE(sigma2=0.0), r"sigma2 must be a positive finite number"),
        ("activation", lambda: VAE(activation="swish"), r"activation must be one of"),
        ("beta", lambda: VAE(beta=-1.0), r"beta must be a finite number >= 0, got -1.0"),
        ("warmup", lambda: VAE(warmup_steps=-1), r"warmup_steps must be an integer >= 0, got -1"),
        ("warmup float", lambda: VAE(warmup_steps=2.5), r"warmup_steps must be an integer >= 0, got 2.5"),
        ("latent", lambda: Autoencoder(latent=0), r"latent must be a positive integer, got 0"),
        ("latent float", lambda: VAE(latent=2.7), r"latent must be a positive integer, got 2.7"),
        ("data_dim float", lambda: VAE(data_dim=9.5), r"data_dim must be a positive integer, got 9.5"),
        ("hidden float", lambda: VAE(hidden=(4.5,)), r"each hidden size must be a positive integer, got 4.5"),
        ("hidden string", lambda: Autoencoder(hidden=("4",)), r"each hidden size must be a positive integer, got '4'"),
        ("vq hidden float", lambda: VQVAE(hidden=(4.5,)), r"each hidden size must be a positive integer, got 4.5"),
        ("vq data_dim", lambda: VQVAE(data_dim=0), r"data_dim must be a positive integer, got 0"),
        ("dtype model", lambda: VAE(dtype=np.float16), r"dtype must be float32 or float64"),
        ("build kind", lambda: build({"kind": "gan"}), r"config kind must be one of"),
    ]


@pytest.mark.parametrize("name, call, message", bad_cases(), ids=[c[0] for c in bad_cases()])
def test_bad_input_is_named(name, call, message):
    with pytest.raises(ValueError, match=message):
        call()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, name", [
    (lambda value: VAE(beta=value), "beta"),
    (lambda value: GaussianVAE(free_bits=value), "free_bits"),
    (lambda value: BernoulliVAE(beta=value), "beta"),
    (lambda value: Autoencoder(beta=value), "beta"),
    (lambda value: VQVAE(beta=value), "beta"),
])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_constructors_refuse_nan_and_inf_weights(make, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got {value}"):
        make(value)


@pytest.mark.parametrize("make", [
    lambda **kw: GaussianVAE(**kw), lambda **kw: Autoencoder(likelihood="gaussian", **kw),
    lambda **kw: VQVAE(likelihood="gaussian", **kw)])
def test_sigma2_too_small_for_the_dtype_is_refused_naming_the_smallest(make):
    """1e-300 is 0 in float32; 1e-25 is not, but 1/sigma2 squared overflows float32."""
    for sigma2 in (1e-300, 1e-25):
        with pytest.raises(ValueError, match=r"sigma2 = 1e-(300|25) is too small for float32 "
                                             r"arithmetic.*smallest usable value in float32 "
                                             r"is 1.08e-19"):
            make(sigma2=sigma2, dtype=np.float32)
    make(sigma2=1e-25, dtype=np.float64)  # fine in float64
    with pytest.raises(ValueError, match=r"smallest usable value in float64 is 1.49e-154"):
        make(sigma2=1e-300, dtype=np.float64)
    # the smallest usable value gives a finite loss on data in [0, 1]
    model = make(sigma2=1.1e-19, dtype=np.float32, data_dim=6, hidden=(4,))
    x = np.random.default_rng(0).uniform(size=(3, 6)).astype(np.float32)
    loss, grads, _ = model.loss_and_grads(x, rng=0)
    assert np.isfinite(loss) and np.isfinite(grads.flat).all()


@pytest.mark.parametrize("make, overflows", [
    (lambda: GaussianVAE(data_dim=784, rng=0), True),  # exp(logvar) overflows
    (lambda: Autoencoder(data_dim=784, likelihood="gaussian", rng=0), False),
    (lambda: VQVAE(data_dim=784, likelihood="gaussian", rng=0), False)])
def test_gaussian_model_on_0_255_data_names_the_scale(make, overflows):
    """Bytes given as floats overflow the float32 forward pass: a clear error, not NaN."""
    model = make()
    x = np.random.default_rng(0).integers(0, 256, size=(16, 784)).astype(np.float32)
    with np.errstate(all="ignore"):
        if overflows:
            with pytest.raises(ValueError, match=r"the loss is nan: .* x with values from 0 to "
                                                 r"255.*scaled to \[0, 1\]; divide 8-bit images"):
                model.loss_and_grads(x, rng=0)
        else:  # a large but finite loss, and no error
            assert np.isfinite(model.loss_and_grads(x, rng=0)[0])
    # the same data scaled to [0, 1] trains
    loss, _, _ = model.loss_and_grads(x / np.float32(255), rng=0)
    assert np.isfinite(loss)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid", "softplus"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_decode_propagates_nan(backend, activation, likelihood):
    """A NaN latent decodes to NaN (it gave 0.5 everywhere when the compiled ReLU hid it)."""
    from npvae.backend import use_backend
    model = VAE(data_dim=7, hidden=(5, 4), latent=3, activation=activation,
                likelihood=likelihood, dtype=np.float32)
    z = np.zeros((3, 3), np.float32)
    z[1, 0] = np.nan
    with use_backend(backend):
        out = model.decode(z)
    assert np.isnan(out[1]).all()
    assert np.isfinite(out[[0, 2]]).all()


def test_deterministic_models_need_no_noise():
    x = np.full((3, 5), 0.5)
    Autoencoder(data_dim=5, hidden=(4,), latent=2, dtype=np.float64).loss_and_grads(x)
    if VQVAE is not None:
        VQVAE(data_dim=5, hidden=(4,), num_codes=3, code_dim=2, num_vectors=1,
              dtype=np.float64).loss_and_grads(x)


def test_negative_warmup_step_is_refused():
    from npvae.models.base import kl_weight
    assert kl_weight(2.0, 10, 5) == 1.0
    with pytest.raises(ValueError, match=r"step must be >= 0"):
        kl_weight(1.0, 10, -5)


def test_dead_code_restart_moves_unused_codes_onto_encoder_outputs():
    """(VQVAE.3): a code unused for restart_after steps lands on (near) a row of the batch."""
    rng = np.random.default_rng(0)
    model = VQVAE(data_dim=6, hidden=(5,), num_codes=4, code_dim=2, num_vectors=1,
                  activation="tanh", restart_after=2, dtype=np.float64, rng=0)
    far = np.full(2, 50.0)
    model.params["codebook"][3] = far  # never the nearest: dead from the start
    x = rng.uniform(size=(8, 6))
    for step in range(2):
        fwd = model.forward(x)
        used_before = model.buffers["steps_unused"].copy()
        model.after_step(fwd, rng)
    rows = model.encode(x).reshape(-1, 2)
    new = model.params["codebook"][3]
    assert not np.allclose(new, far)
    assert np.min(np.linalg.norm(rows - new, axis=1)) < 1e-2  # on a recent encoder output
    assert model.buffers["steps_unused"][3] == 0
    assert used_before[3] == 1  # it had been counted as unused before the restart
    live = [k for k in range(3) if model.buffers["steps_unused"][k] < 2]
    assert live  # codes in use were left alone


@pytest.mark.parametrize("cls", [BernoulliVAE, GaussianVAE, Autoencoder])
def test_decoder_output_with_work_gives_the_same_values(cls):
    # the buffered inference path (mlp_predict) against the training path, for a last
    # batch smaller than the first, as the importance-weighted estimate decodes them
    model = cls(data_dim=9, hidden=(6, 5), latent=3, dtype=np.float64, rng=0)
    rng = np.random.default_rng(1)
    for name, p in model.params.items():  # non-zero biases, so a dropped one shows
        p[...] = rng.normal(size=p.shape)
    work = {}
    for n in (7, 3):
        z = rng.normal(size=(n, 3))
        want = model.decoder_output(z)
        np.testing.assert_allclose(model.decoder_output(z, work), want, rtol=1e-12, atol=1e-12)
        a, b = model.decoder_output(z, work, split_bias=True)  # the last bias left apart
        np.testing.assert_array_equal(b, model.params["dec.2.b"])
        np.testing.assert_allclose(a + b, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="split_bias=True needs work"):
        model.decoder_output(z, split_bias=True)


def test_a_subclass_with_its_own_decoder_keeps_it_when_decoding_into_work():
    # a subclass that replaces the networks (as the convolutional VAE does) overrides the
    # four network methods; the buffered path used by the importance-weighted estimate
    # must then run its decoder, not the MLP under dec.*
    class Doubled(BernoulliVAE):
        def _decoder_forward(self, z):
            out, cache = super()._decoder_forward(z)
            return 2.0 * out, cache

    model = Doubled(data_dim=6, hidden=(5,), latent=2, dtype=np.float64, rng=0)
    z = np.random.default_rng(1).normal(size=(4, 2))
    want = model.decoder_output(z)
    np.testing.assert_allclose(model.decoder_output(z, {}), want, rtol=1e-12)
    out, bias = model.decoder_output(z, {}, split_bias=True)
    assert bias is None
    np.testing.assert_allclose(out, want, rtol=1e-12)
