"""The convolutional VAE: whole-model gradients against central differences, its
geometry, the bound it reports, and that evaluation and checkpoints treat it as a VAE."""
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from npvae import evaluate
from npvae.gradcheck import check_model
from npvae.models import build
from npvae.models.conv_vae import ConvVAE
from npvae.tour_conv import _kink_margin

from strategies import seeds

TOL = 1e-6


def tiny(likelihood="bernoulli", dtype=np.float64, **kw):
    return ConvVAE(image_shape=(1, 8, 8), channels=(2, 3), latent=2, likelihood=likelihood,
                   dtype=dtype, **kw)


def images(n, rng, dtype=np.float64):
    return rng.random((n, 64)).astype(dtype)


@settings(max_examples=6, deadline=None)
@given(seeds, st.sampled_from(["bernoulli", "gaussian"]), st.sampled_from([0.0, 0.5]))
def test_every_gradient_matches_central_differences(seed, likelihood, beta_off):
    rng = np.random.default_rng(seed)
    model = tiny(likelihood, beta=1.0 - beta_off, rng=seed)
    for p in model.params.values():  # non-trivial biases, so a wrong db cannot hide
        if p.ndim == 1:
            p[...] = rng.normal(scale=0.1, size=p.shape)
    x = images(3, rng)
    eps = rng.standard_normal((3, 2))
    # central differences across a ReLU's kink at 0 see a slope of 1/2: keep every ReLU
    # input of the step 1e-3 away (a step of 1e-4 moves a pre-activation far less)
    assume(_kink_margin(model, x, eps) > 1e-3)
    rows = check_model(model, x, eps=eps, max_entries=12, rng=rng)
    worst = max(r.rel_error for r in rows)
    assert worst <= TOL, [r for r in rows if r.rel_error > TOL]


def test_geometry_of_the_default_model():
    model = ConvVAE()
    shapes = {k: v.shape for k, v in model.params.items()}
    assert shapes["enc.conv0.w"] == (32, 1, 4, 4) and shapes["enc.conv1.w"] == (64, 32, 4, 4)
    assert shapes["enc.fc.W"] == (64 * 7 * 7, 40) and shapes["dec.fc.W"] == (20, 3136)
    assert shapes["dec.convT0.w"] == (64, 32, 4, 4) and shapes["dec.convT1.w"] == (32, 1, 4, 4)
    x = np.random.default_rng(0).random((2, 784)).astype(np.float32)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, 20)
    assert model.decoder_output(mu).shape == (2, 784)
    work = {}  # the conv decoder makes its own arrays, with or without work
    np.testing.assert_allclose(model.decoder_output(mu, work), model.decoder_output(mu), rtol=1e-6, atol=1e-6)
    out, bias = model.decoder_output(mu, work, split_bias=True)  # no bias left apart
    assert bias is None
    np.testing.assert_allclose(out, model.decoder_output(mu), rtol=1e-6, atol=1e-6)
    assert model.sample(3, rng=0).shape == (3, 784)


def test_the_loss_is_minus_the_elbo_and_the_bound_holds():
    rng = np.random.default_rng(1)
    model = tiny(rng=1)
    x = (images(5, rng) > 0.5).astype(np.float64)
    eps = rng.standard_normal((5, 2))
    loss, _, stats = model.loss_and_grads(x, eps=eps)
    assert loss == pytest.approx(-stats["elbo"])  # beta = 1, no warm-up
    # the ELBO (one sample, averaged over many) sits below the IW estimate with k = 200
    elbo = evaluate.elbo(model, x, rng=np.random.default_rng(2))["elbo"]
    iw = evaluate.iw_log_likelihood(model, x, k=200, rng=3)["log_px"]
    assert elbo < iw


def test_rebuilt_from_its_config_and_checked_inputs():
    model = tiny(rng=4)
    again = build(model.config, rng=4)
    np.testing.assert_array_equal(again.params.flat, model.params.flat)  # same init, exactly
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvVAE(image_shape=(1, 10, 10))
    with pytest.raises(ValueError, match="beta"):
        ConvVAE(beta=float("nan"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_shape=(1, 8.9, 8)), r"image_shape\[1\] must be a positive integer, got 8.9"),
    (dict(image_shape=(1, 0, 8)), r"image_shape\[1\] must be a positive integer, got 0"),
    (dict(channels=(2.9, 3)), r"channels\[0\] must be a positive integer, got 2.9"),
    (dict(channels=("2", "3")), r"channels\[0\] must be a positive integer, got '2'"),
    (dict(channels=()), "channels must hold at least one"),
    (dict(latent=2.7), "latent must be a positive integer, got 2.7"),
    (dict(latent=True), "latent must be a positive integer, got True"),
])
def test_sizes_that_are_not_positive_integers_are_refused(kwargs, match):
    # they were truncated: image_shape (1, 8.9, 8) built an 8 x 8 model
    args = dict(image_shape=(1, 8, 8), channels=(2, 3), latent=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ConvVAE(**args)
    assert ConvVAE(image_shape=np.array([1, 8, 8]), channels=(np.int64(2),), latent=np.int32(2)).latent == 2
