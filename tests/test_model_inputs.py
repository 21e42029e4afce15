"""Bad arguments to the models' constructors and methods give a ValueError that names them."""
import numpy as np
import pytest

from npvae.models import VAE, Autoencoder
from npvae.models.base import as_rng, kl_weight
from npvae.models.conv_vae import ConvVAE
from npvae.models.conv_vqvae import ConvVQVAE
from npvae.models.iwae import IWAE
from npvae.models.prior import MADEPrior
from npvae.models.vqvae import VQVAE

SMALL_CONV = dict(image_shape=(1, 8, 8), channels=(4,))


def small_models():
    """One small float64 model of each kind that has a ``sample`` method."""
    f64 = dict(dtype=np.float64)
    return [
        VAE(data_dim=4, hidden=(3,), latent=2, **f64),
        IWAE(data_dim=4, hidden=(3,), latent=2, **f64),
        Autoencoder(data_dim=4, hidden=(3,), latent=2, **f64),
        VQVAE(data_dim=4, hidden=(3,), num_codes=3, code_dim=2, num_vectors=2, **f64),
        ConvVAE(latent=2, **SMALL_CONV, **f64),
        ConvVQVAE(num_codes=3, code_dim=2, kmeans_init=False, **SMALL_CONV, **f64),
    ]


MODELS = small_models()
IDS = [m.kind for m in MODELS]


# -- the convolutional VAE's settings ----------------------------------------------------
def test_conv_vae_checks_sigma2_against_its_own_dtype():
    """A variance too small for float32 is usable in float64, as for every other model."""
    model = ConvVAE(latent=2, likelihood="gaussian", sigma2=1e-25, dtype=np.float64, **SMALL_CONV)
    assert model.config["sigma2"] == 1e-25
    with pytest.raises(ValueError, match=r"sigma2 = 1e-25 is too small for float32"):
        ConvVAE(latent=2, likelihood="gaussian", sigma2=1e-25, dtype=np.float32, **SMALL_CONV)


def test_conv_vae_checks_beta_like_the_mlp_vae():
    assert ConvVAE(latent=2, beta="1", **SMALL_CONV).config["beta"] == 1.0
    assert VAE(data_dim=4, hidden=(), latent=2, beta="1").config["beta"] == 1.0
    for bad in ("one", -1.0, float("nan"), None):
        with pytest.raises(ValueError, match=r"beta must be a finite number >= 0"):
            ConvVAE(latent=2, beta=bad, **SMALL_CONV)


@pytest.mark.parametrize("cls", [ConvVAE, ConvVQVAE])
@pytest.mark.parametrize("bad", [(8, 8), (1, 1, 8, 8), 8, ("a", 8, 8)])
def test_conv_models_want_image_shape_as_c_h_w(cls, bad):
    with pytest.raises(ValueError, match=r"image_shape must be \(C, H, W\)"):
        cls(image_shape=bad, channels=(4,))


# -- sample(n, rng) ----------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS, ids=IDS)
@pytest.mark.parametrize("bad", [0, -1, 2.5, 3.0, "3", True, None])
def test_sample_wants_a_positive_integer_n(model, bad):
    with pytest.raises(ValueError, match=r"n must be a positive integer"):
        model.sample(bad, 0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True])
def test_the_learned_prior_samples_a_positive_integer_number_of_sequences(bad):
    prior = MADEPrior(num_codes=3, num_vectors=2, hidden=(4,))
    assert prior.sample(np.int64(2), 0).shape == (2, 2)
    with pytest.raises(ValueError, match=r"n must be a positive integer"):
        prior.sample(bad, 0)


def test_a_seed_sequence_or_bit_generator_is_a_seed():
    a = as_rng(np.random.SeedSequence(5)).random()
    assert a == np.random.default_rng(np.random.SeedSequence(5)).random()
    assert as_rng(np.random.PCG64(5)).random() == np.random.default_rng(5).random()


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_sample_takes_python_and_numpy_integers(model):
    d = model.config["data_dim"]
    assert model.sample(2, 0).shape == (2, d)
    np.testing.assert_array_equal(model.sample(np.int64(2), 0), model.sample(2, 0))


# -- decode_indices ----------------------------------------------------------------------
@pytest.mark.parametrize("model", [m for m in MODELS if hasattr(m, "decode_indices")],
                         ids=[m.kind for m in MODELS if hasattr(m, "decode_indices")])
def test_decode_indices_wants_integer_codes(model):
    n_codes = model.config["num_vectors"]
    for bad in (np.zeros((2, n_codes)), np.zeros((2, n_codes), dtype=bool)):
        with pytest.raises(ValueError, match=r"idx must have an integer dtype \(code indices\)"):
            model.decode_indices(bad)
    for idx in (np.zeros((2, n_codes), dtype=np.int64), np.ones((2, n_codes), dtype=np.uint8)):
        assert model.decode_indices(idx).shape == (2, model.config["data_dim"])


# -- rng -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [1.5, -1, True, "0", [1, 2], np.random.RandomState(0)])
def test_as_rng_refuses_what_is_not_a_seed_or_generator(bad):
    with pytest.raises(ValueError, match=r"rng must be None, a seed \(an int >= 0\) or a "
                                         r"numpy Generator"):
        as_rng(bad)


def test_as_rng_takes_none_seeds_and_generators():
    gen = np.random.default_rng(3)
    assert as_rng(gen) is gen
    assert isinstance(as_rng(None), np.random.Generator)
    for seed in (0, 7, np.int64(7), np.uint32(7)):
        assert isinstance(as_rng(seed), np.random.Generator)
    assert as_rng(7).integers(1000) == as_rng(np.int64(7)).integers(1000)


@pytest.mark.parametrize("model", [m for m in MODELS if m.kind in ("vae", "iwae")],
                         ids=["vae", "iwae"])
def test_loss_refuses_a_bad_rng(model):
    x = np.full((3, 4), 0.5)
    with pytest.raises(ValueError, match=r"rng must be None, a seed"):
        model.loss(x, rng=1.5)
    assert np.isfinite(model.loss(x, rng=1))


# -- step --------------------------------------------------------------------------------
def test_negative_step_is_refused_without_warmup():
    assert kl_weight(0.5, 0, None) == 0.5 and kl_weight(0.5, 0, 3) == 0.5
    with pytest.raises(ValueError, match=r"step must be >= 0"):
        kl_weight(0.5, 0, -1)
    x = np.full((3, 4), 0.5)
    for model in (VAE(data_dim=4, hidden=(3,), latent=2, dtype=np.float64),
                  Autoencoder(data_dim=4, hidden=(3,), latent=2, dtype=np.float64)):
        assert model.config["warmup_steps"] == 0
        with pytest.raises(ValueError, match=r"step must be >= 0"):
            model.loss(x, rng=0, step=-1)
        assert np.isfinite(model.loss(x, rng=0, step=0))


@pytest.mark.parametrize("cls", [VQVAE, ConvVQVAE])
@pytest.mark.parametrize("name, bad", [("num_codes", 5.7), ("code_dim", 2.5), ("num_codes", True),
                                       ("restart_after", 1.5)])
def test_quantizer_sizes_must_be_integers_not_truncated(cls, name, bad):
    """5.7 codes used to become 5, silently; a bool is not a count either."""
    kwargs = dict(SMALL_CONV) if cls is ConvVQVAE else dict(data_dim=4, hidden=(3,))
    kwargs.update(num_codes=3, code_dim=2, kmeans_init=False)
    kwargs[name] = bad
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(warmup_steps=2.7), r"warmup_steps must be an integer >= 0, got 2.7"),
    (dict(warmup_steps=-1), r"warmup_steps must be an integer >= 0, got -1"),
    (dict(data_dim=16.9), r"data_dim must be a positive integer, got 16.9"),
])
def test_conv_vae_sizes_are_never_truncated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvVAE(latent=2, **SMALL_CONV, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(data_dim=16.9), r"data_dim must be a positive integer, got 16.9"),
    (dict(num_vectors=4.0), r"num_vectors must be a positive integer, got 4.0"),
])
def test_conv_vqvae_sizes_are_never_truncated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvVQVAE(**SMALL_CONV, **kwargs)
