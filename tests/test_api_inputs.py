"""Public functions given unusual but legal inputs, or wrong ones: a result, or a clear error."""
import json

import numpy as np
import pytest

from npvae import data, optim
from npvae.backend import BACKENDS, use_backend
from npvae.checkpoint import FILENAME, load_checkpoint, save_checkpoint
from npvae.models import build

CONFIG = dict(kind="vae-bernoulli", data_dim=12, hidden=[8], latent=3)


# ----------------------------------------------------------------------------- clip_grad_norm


def _clip_under(backend, array, max_norm):
    grads = {"w": array.copy()}
    with use_backend(backend):
        norm = optim.clip_grad_norm(grads, max_norm)
    return norm, grads["w"]


@pytest.mark.parametrize("dtype", [np.float16, np.longdouble, np.dtype(">f4"), np.dtype(">f8")])
def test_clip_grad_norm_takes_any_float_dtype_under_both_backends(dtype):
    array = np.full(5, 300, dtype)
    results = [_clip_under(backend, array, 1.0) for backend in BACKENDS]
    want = float(np.sqrt(5 * 300.0**2))
    for norm, clipped in results:
        assert norm == pytest.approx(want, rel=1e-12)
        assert clipped.dtype == array.dtype
        assert float(np.sqrt(np.sum(clipped.astype(np.float64) ** 2))) == pytest.approx(1.0, rel=1e-2)
    (norm0, clipped0), (norm1, clipped1) = results
    assert norm0 == norm1
    assert np.array_equal(clipped0, clipped1)


def test_clip_grad_norm_sums_float16_in_float64():
    # 300**2 overflows float16 (max 65504): a float16 sum would be inf.
    array = np.full(1000, 300, np.float16)
    for backend in BACKENDS:
        norm, _ = _clip_under(backend, array, None)
        assert norm == pytest.approx(300.0 * np.sqrt(1000), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_grad_norm_keeps_the_kernel_for_float32_and_float64(monkeypatch, dtype):
    calls = []
    kernel = optim.sumsq_kernel

    def counted(a):
        calls.append(a.dtype)
        return kernel(a)

    monkeypatch.setattr(optim, "sumsq_kernel", counted)
    optim.clip_grad_norm({"w": np.ones(7, dtype)}, None)
    assert calls == [np.dtype(dtype)]


# ----------------------------------------------------------------------------- data.to_unit


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,width", [((0, 28, 28), 784), ((0, 784), 784), ((0, 3, 5), 15)])
def test_to_unit_of_no_images(dtype, shape, width):
    out = data.to_unit(np.zeros(shape, np.uint8), dtype=dtype)
    assert out.shape == (0, width)
    assert out.dtype == np.dtype(dtype)


def test_to_unit_of_an_empty_validation_part():
    x = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    y = np.arange(6)
    (x_tr, _), (x_va, _) = data.train_val_split(x, y, 0)
    assert data.to_unit(x_tr).shape == (6, 784)
    assert data.to_unit(x_va).shape == (0, 784)


# ----------------------------------------------------------------------------- save_checkpoint


@pytest.fixture
def model():
    return build(CONFIG, rng=0)


def _save(path, model, rng=None, epoch=1, step=1, history=(), args=None):
    rng = np.random.default_rng(0) if rng is None else rng
    return save_checkpoint(path, model, None, rng, epoch, step, list(history), args or {})


@pytest.mark.parametrize("name,epoch,step", [("epoch", -1, 0), ("step", 1, -3),
                                             ("epoch", 1.5, 0), ("step", 1, True)])
def test_save_refuses_a_bad_epoch_or_step_and_keeps_the_old_file(tmp_path, model, name, epoch, step):
    path = _save(tmp_path / FILENAME, model, epoch=2, step=5)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 0"):
        save_checkpoint(path, model, None, np.random.default_rng(0), epoch, step, [], {})
    assert path.read_bytes() == before
    assert load_checkpoint(path).epoch == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]


def test_save_takes_numpy_integers_for_epoch_and_step(tmp_path, model):
    path = _save(tmp_path / FILENAME, model, epoch=np.int64(3), step=np.uint32(7))
    ck = load_checkpoint(path)
    assert (ck.epoch, ck.step) == (3, 7)


def test_save_writes_numpy_numbers_in_history_as_python_numbers(tmp_path, model):
    history = [{"epoch": np.int64(1), "loss": np.float32(1.5), "elbo": np.float64(-2.25),
                "ok": np.bool_(True), "perplexity": np.array([1.0, 2.0], np.float32)}]
    path = _save(tmp_path / FILENAME, model, history=history, args={"lr": np.float32(0.5)})
    ck = load_checkpoint(path)
    assert ck.history == [{"epoch": 1, "loss": 1.5, "elbo": -2.25, "ok": True,
                           "perplexity": [1.0, 2.0]}]
    row = ck.history[0]
    assert type(row["epoch"]) is int and type(row["ok"]) is bool
    assert type(row["loss"]) is float and type(row["elbo"]) is float
    assert ck.args == {"lr": 0.5} and type(ck.args["lr"]) is float
    json.dumps(ck.history)  # plain Python all the way down


def test_save_names_history_when_it_cannot_be_written(tmp_path, model):
    with pytest.raises(ValueError, match="^history must hold only JSON-friendly values"):
        _save(tmp_path / FILENAME, model, history=[{"when": object()}])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rng", [0, None, np.random.RandomState(0), np.random.PCG64(0)])
def test_save_refuses_an_rng_that_is_not_a_generator(tmp_path, model, rng):
    with pytest.raises(ValueError, match="^rng must be the run's numpy.random.Generator"):
        save_checkpoint(tmp_path / FILENAME, model, None, rng, 1, 1, [], {})
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_run_directory_as_load_reads_it(tmp_path, model):
    rng = np.random.default_rng(5)
    path = _save(tmp_path, model, rng=rng, epoch=4, step=9)
    assert path == tmp_path / FILENAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]
    ck = load_checkpoint(tmp_path)
    assert ck.path == path and (ck.epoch, ck.step) == (4, 9)
    assert ck.rng.bit_generator.state == rng.bit_generator.state
    for name in model.params:
        assert np.array_equal(ck.model.params[name], model.params[name])
