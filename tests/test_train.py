"""The training loop: determinism, exact resumption, Ctrl-C, divergence, metrics, figures."""
import json
import os
import signal
import warnings

import numpy as np
import pytest

from npvae.checkpoint import CheckpointError, load_checkpoint
from npvae.figures import make_figures
from npvae.models import build
from npvae.train import TrainingDiverged, TrainingInterrupted, read_metrics, train

D = 64  # 8 x 8 "images" keep every run to a fraction of a second
VAE = dict(kind="vae-bernoulli", data_dim=D, hidden=[16], latent=3, warmup_steps=7)
VQ = dict(kind="vqvae", data_dim=D, hidden=[16], num_codes=6, code_dim=2, num_vectors=2,
          likelihood="bernoulli", ema=True, restart_after=3, kmeans_init=True)
LOOP = dict(batch_size=32, lr=3e-3, binarize="dynamic", progress=False, verbose=False)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.random((150, D)).astype(np.float32)  # 5 batches, the last one short
    xv = rng.random((40, D)).astype(np.float32)
    return x, xv


def run(data, run_dir, config=VAE, epochs=3, seed=1, **kw):
    model = build(config, rng=0)
    history = train(model, *data, epochs=epochs, seed=seed, run_dir=run_dir, **{**LOOP, **kw})
    return model, history


def without_times(history):
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in history]


def training_step(kw) -> bool:
    """True for a call from the training loop (evaluation passes no step)."""
    return kw.get("step") is not None


def fail_at(model, call, exc):
    """Make the ``call``-th training step's forward pass raise ``exc`` after drawing noise."""
    original, count = model.forward, [0]

    def forward(x, **kw):
        count[0] += training_step(kw)
        if count[0] == call and training_step(kw):
            kw["rng"].standard_normal(3)  # a step cut short may already have used the rng
            raise exc
        return original(x, **kw)

    model.forward = forward


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted 3-epoch runs that the other tests must reproduce exactly."""
    out = {}
    for name, config in (("vae", VAE), ("vq", VQ)):
        out[name] = run(data, tmp_path_factory.mktemp(name), config)
    return out


@pytest.mark.parametrize("name", ["vae", "vq"])
def test_same_seed_gives_identical_parameters(data, tmp_path, reference, name):
    config = VAE if name == "vae" else VQ
    model, history = run(data, tmp_path / "a", config)
    ref_model, ref_history = reference[name]
    assert np.array_equal(model.params.flat, ref_model.params.flat)
    assert without_times(history) == without_times(ref_history)
    other, _ = run(data, tmp_path / "b", config, seed=2)
    assert not np.array_equal(other.params.flat, ref_model.params.flat)


@pytest.mark.parametrize("name", ["vae", "vq"])
def test_resume_after_an_epoch_is_exact(data, tmp_path, reference, name):
    config = VAE if name == "vae" else VQ
    run(data, tmp_path, config, epochs=1)
    model = build(config, rng=123)  # different init: everything must come from the checkpoint
    history = train(model, *data, epochs=3, seed=1, run_dir=tmp_path, resume_from=tmp_path, **LOOP)
    ref_model, ref_history = reference[name]
    assert np.array_equal(model.params.flat, ref_model.params.flat)
    assert without_times(history) == without_times(ref_history)
    assert len(read_metrics(tmp_path)) == 3


@pytest.mark.parametrize("name", ["vae", "vq"])
def test_keyboard_interrupt_mid_epoch_then_resume_is_exact(data, tmp_path, reference, name):
    config = VAE if name == "vae" else VQ
    model = build(config, rng=0)
    fail_at(model, 8, KeyboardInterrupt())  # epoch 2, third batch
    with pytest.raises(TrainingInterrupted) as info:
        train(model, *data, epochs=3, seed=1, run_dir=tmp_path, **LOOP)
    assert isinstance(info.value, KeyboardInterrupt)
    assert info.value.checkpoint == tmp_path / "checkpoint.npz"
    assert "epoch 2 after 2 of 5 batches" in str(info.value)
    ck = load_checkpoint(tmp_path)
    assert (ck.epoch, ck.step, ck.position["batch"]) == (1, 7, 2)

    resumed = build(config, rng=5)
    history = train(resumed, *data, epochs=3, seed=1, run_dir=tmp_path, resume_from=tmp_path, **LOOP)
    ref_model, ref_history = reference[name]
    assert np.array_equal(resumed.params.flat, ref_model.params.flat)
    for key, buf in getattr(ref_model, "buffers", {}).items():
        assert np.array_equal(resumed.buffers[key], buf)
    assert without_times(history) == without_times(ref_history)


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="Ctrl-C is handled elsewhere in this process")
def test_ctrl_c_finishes_the_step_then_saves(data, tmp_path, reference):
    """A real SIGINT: the step in progress completes, then the state is saved."""
    model = build(VAE, rng=0)
    original, count = model.forward, [0]

    def forward(x, **kw):
        count[0] += training_step(kw)
        if count[0] == 4 and training_step(kw):
            os.kill(os.getpid(), signal.SIGINT)
        return original(x, **kw)

    model.forward = forward
    with pytest.raises(TrainingInterrupted):
        train(model, *data, epochs=3, seed=1, run_dir=tmp_path, **LOOP)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    ck = load_checkpoint(tmp_path)
    assert (ck.epoch, ck.step, ck.position["batch"]) == (0, 4, 4)
    resumed = build(VAE, rng=0)
    train(resumed, *data, epochs=3, seed=1, run_dir=tmp_path, resume_from=ck, **LOOP)
    assert np.array_equal(resumed.params.flat, reference["vae"][0].params.flat)


def test_a_second_ctrl_c_during_the_epochs_save_does_not_repeat_the_epoch(data, tmp_path,
                                                                          reference, monkeypatch):
    """Stopped at once while epoch 2's checkpoint is written: the state saved instead is
    "epoch 2 after all its batches", without epoch 2's row, which the resume then adds once."""
    import npvae.train as train_module

    real, calls = train_module.save_checkpoint, [0]

    def save(*args, **kw):
        calls[0] += 1
        if calls[0] == 2:  # the end of epoch 2
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(train_module, "save_checkpoint", save)
    with pytest.raises(TrainingInterrupted, match="epoch 2 after 5 of 5 batches"):
        run(data, tmp_path, epochs=3)
    ck = load_checkpoint(tmp_path)
    assert (ck.epoch, ck.position["batch"], [r["epoch"] for r in ck.history]) == (1, 5, [1])
    model = build(VAE, rng=0)
    history = train(model, *data, epochs=3, seed=1, run_dir=tmp_path, resume_from=tmp_path, **LOOP)
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert without_times(history) == without_times(reference["vae"][1])
    assert np.array_equal(model.params.flat, reference["vae"][0].params.flat)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    one_epoch, _ = run(data, tmp_path / "one", epochs=1)
    model = build(VAE, rng=0)
    original, count = model.forward, [0]

    def forward(x, **kw):
        count[0] += 1
        fwd = original(x, **kw)
        return fwd._replace(loss=float("nan")) if count[0] == 8 else fwd

    model.forward = forward
    with pytest.raises(TrainingDiverged) as info:
        train(model, *data, epochs=3, seed=1, run_dir=tmp_path / "run", **LOOP)
    message = str(info.value)
    assert "loss became nan at step 7 (epoch 2, batch 3 of 5)" in message
    assert "checkpoint.npz (after epoch 1), is kept" in message
    assert (info.value.step, info.value.epoch) == (7, 2)
    ck = load_checkpoint(tmp_path / "run")
    assert (ck.epoch, ck.step, ck.position) == (1, 5, None)
    assert np.array_equal(ck.model.params.flat, one_epoch.params.flat)
    assert len(read_metrics(tmp_path / "run")) == 1


def test_the_divergence_advice_quotes_a_folder_with_spaces(data, tmp_path):
    import shlex

    folder = tmp_path / "my runs" / "vae 1"
    run(data, folder, epochs=1)
    model = build(VAE, rng=0)
    original = model.forward
    model.forward = lambda x, **kw: original(x, **kw)._replace(loss=float("nan"))
    with pytest.raises(TrainingDiverged) as info:
        train(model, *data, epochs=2, seed=1, run_dir=folder, resume_from=folder, **LOOP)
    advice = str(info.value).split("npvae train --resume ", 1)[1]
    assert shlex.split(advice)[0] == str(folder)


def test_infinite_gradient_in_the_first_epoch(data, tmp_path):
    model = build(VAE, rng=0)
    original = model.backward

    def backward(fwd, out=None):
        grads = original(fwd, out)
        grads["dec.0.W"][0, 0] = np.inf
        return grads

    model.backward = backward
    with pytest.raises(TrainingDiverged, match=r"gradient norm became inf at step 0 .*no checkpoint"):
        train(model, *data, epochs=1, seed=1, run_dir=tmp_path, **LOOP)
    assert not (tmp_path / "checkpoint.npz").exists()


def test_metrics_jsonl_has_one_line_per_epoch(data, tmp_path):
    _, history = run(data, tmp_path, epochs=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rows = [json.loads(line) for line in lines]
    assert rows == history
    for i, row in enumerate(rows, 1):
        assert row["epoch"] == i and row["step"] == 5 * i
        for key in ("train_loss", "train_recon", "train_kl", "train_elbo", "val_loss",
                    "val_elbo", "val_recon", "val_kl", "seconds", "grad_norm", "kl_weight"):
            assert np.isfinite(row[key]), key
        assert row["seconds"] > 0
        assert row["val_elbo"] == pytest.approx(-(row["val_recon"] + row["val_kl"]))
    assert rows[0]["kl_weight"] < rows[1]["kl_weight"] < 1.0  # epoch means, warm-up over 7 steps


def test_vq_metrics_report_codebook_use(data, reference):
    row = reference["vq"][1][-1]
    assert 1.0 <= row["val_perplexity"] <= 6.0 and 0 < row["val_used_fraction"] <= 1
    assert "train_perplexity" in row and "train_commitment" in row


def test_static_binarization_and_clipping(data, tmp_path):
    seen = []
    model = build(VAE, rng=0)
    original = model.forward

    def forward(x, **kw):
        seen.append(x.copy())
        return original(x, **kw)

    model.forward = forward
    train(model, *data, epochs=2, seed=1, run_dir=tmp_path, clip=1.0,
          **{**LOOP, "binarize": "static"})
    batches = np.concatenate(seen)
    assert set(np.unique(batches)) <= {0.0, 1.0}
    # the same binary sample both epochs: the sorted rows of each epoch agree
    first, second = np.concatenate(seen[:5]), np.concatenate(seen[5:])
    assert np.array_equal(np.unique(first, axis=0), np.unique(second, axis=0))


def test_resume_refuses_a_different_run(data, tmp_path):
    run(data, tmp_path, epochs=1)
    with pytest.raises(CheckpointError, match="batch_size was 32 and is now 16"):
        train(build(VAE, rng=0), *data, epochs=2, seed=1, run_dir=tmp_path, resume_from=tmp_path,
              **{**LOOP, "batch_size": 16})
    with pytest.raises(CheckpointError, match="the training data differ"):
        train(build(VAE, rng=0), data[0][:100].copy(), data[1], epochs=2, seed=1,
              run_dir=tmp_path, resume_from=tmp_path, **LOOP)
    with pytest.raises(CheckpointError, match="holds a model with config"):
        train(build({**VAE, "latent": 4}, rng=0), *data, epochs=2, seed=1, run_dir=tmp_path,
              resume_from=tmp_path, **LOOP)


def test_a_resume_keeps_the_stored_settings_it_does_not_override(data, tmp_path):
    """A command-line run continued from Python stays usable by the command line."""
    run(data, tmp_path, epochs=1, args={"dataset": "mnist", "dtype": "float32", "model": "x"})
    train(build(VAE, rng=0), *data, epochs=2, seed=1, run_dir=tmp_path, resume_from=tmp_path,
          args={"model": "y"}, **LOOP)
    args = load_checkpoint(tmp_path).args
    assert (args["dataset"], args["dtype"], args["model"], args["epochs"]) == ("mnist", "float32",
                                                                              "y", 2)


def test_resuming_a_run_saved_before_the_draws_were_recorded_says_the_stream_changed(data, tmp_path):
    """Runs saved before one uniform per non-zero byte (BIN.1) drew one per pixel: their
    dynamic binarization goes on under the new draws, and the resume says so once."""
    run(data, tmp_path, epochs=1)
    assert load_checkpoint(tmp_path).args["draws"] == "one per non-zero byte"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a run saved now resumes silently
        train(build(VAE, rng=0), *data, epochs=2, seed=1, run_dir=tmp_path,
              resume_from=tmp_path, **LOOP)
    old = load_checkpoint(tmp_path)
    del old.args["draws"]  # as an earlier npvae saved it
    with pytest.warns(RuntimeWarning, match="drew one uniform per pixel"):
        train(build(VAE, rng=0), *data, epochs=3, seed=1, run_dir=tmp_path, resume_from=old,
              **LOOP)
    assert load_checkpoint(tmp_path).args["draws"] == "one per non-zero byte"  # said once


def test_a_run_without_dynamic_binarization_records_no_draws(data, tmp_path):
    run(data, tmp_path, epochs=1, binarize="none")
    ck = load_checkpoint(tmp_path)
    assert "draws" not in ck.args
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(build(VAE, rng=0), *data, epochs=2, seed=1, run_dir=tmp_path, resume_from=ck,
              **{**LOOP, "binarize": "none"})


def test_a_new_lr_is_recorded_even_if_its_first_epoch_is_interrupted(data, tmp_path):
    run(data, tmp_path, epochs=1)  # lr 3e-3
    model = build(VAE, rng=0)
    fail_at(model, 2, KeyboardInterrupt())  # after one step of epoch 2
    with pytest.raises(TrainingInterrupted):
        train(model, *data, epochs=3, seed=1, run_dir=tmp_path, resume_from=tmp_path,
              **{**LOOP, "lr": 1e-3})
    # resumed again inside epoch 2, with yet another rate
    train(build(VAE, rng=0), *data, epochs=3, seed=1, run_dir=tmp_path, resume_from=tmp_path,
          **{**LOOP, "lr": 5e-4})
    rows = read_metrics(tmp_path)
    assert rows[1]["changed"] == {"lr": [3e-3, 1e-3], "step": 5,
                                  "then": {"lr": [1e-3, 5e-4], "step": 6}}
    assert "changed" not in rows[0] and "changed" not in rows[2]


def test_bad_arguments(data, tmp_path):
    model = build(VAE, rng=0)
    with pytest.raises(ValueError, match="x_train must have the model's dtype float32"):
        train(model, data[0].astype(np.float64), data[1], epochs=1, run_dir=tmp_path)
    with pytest.raises(ValueError, match="binarize must be one of"):
        train(model, *data, epochs=1, run_dir=tmp_path, binarize="yes")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train(model, *data, epochs=1, run_dir=tmp_path, optimizer="lbfgs")


def test_sgd_and_on_epoch_end(data, tmp_path):
    rows = []
    run(data, tmp_path, epochs=2, optimizer="sgd", on_epoch_end=rows.append)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert load_checkpoint(tmp_path).optimizer_state["kind"] == "sgd"


# ----------------------------------------------------------------------------- figures

MNIST_LIKE = dict(data_dim=784, hidden=[16])


@pytest.mark.parametrize("config, expected", [
    (dict(kind="vae-bernoulli", latent=2), {"manifold"}),
    (dict(kind="vae-gaussian", latent=5), set()),
    (dict(kind="ae", latent=3), set()),
    (dict(kind="vqvae", num_codes=8, code_dim=2, num_vectors=2, likelihood="bernoulli"),
     {"codebook_usage", "perplexity"}),
])
def test_figures_after_training(tmp_path, config, expected):
    rng = np.random.default_rng(0)
    x = rng.random((96, 784)).astype(np.float32)
    y = rng.integers(0, 10, 96).astype(np.uint8)
    model = build({**config, **MNIST_LIKE}, rng=0)
    history = train(model, x[:64], x[64:], epochs=2, seed=0, run_dir=tmp_path, batch_size=32,
                    progress=False, verbose=False)
    figures = make_figures(model, tmp_path, x[64:], y[64:], history, rng=0)
    names = {"reconstructions", "samples", "loss_curves", "latent_scatter", "interpolation"}
    assert set(figures) == names | expected
    for path in figures.values():
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("binarize", ["none", "dynamic", "static"])
def test_uint8_images_train_exactly_like_their_float_values(tmp_path, binarize):
    """Bytes scaled one batch at a time give the run that v / 255 as floats gives."""
    rng = np.random.default_rng(5)
    x_u8 = rng.integers(0, 256, size=(100, D), dtype=np.uint8)
    x_f = x_u8.astype(np.float32) / np.float32(255)
    val = x_f[:20]
    kw = dict(LOOP, binarize=binarize, epochs=2)
    models = []
    for x, sub in ((x_u8, "u8"), (x_f, "f")):
        model = build(VAE, rng=1)
        train(model, x, val, seed=3, run_dir=tmp_path / sub, **kw)
        models.append(model)
    assert np.array_equal(models[0].params.flat, models[1].params.flat)


def test_training_data_must_be_floats_or_bytes(tmp_path):
    model = build(VAE, rng=1)
    with pytest.raises(ValueError, match=r"x_train must have the model's dtype float32.*or be uint8"):
        train(model, np.zeros((10, D), np.int32), np.zeros((5, D), np.float32),
              run_dir=tmp_path, **dict(LOOP, epochs=1))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_nan_gradient_on_a_step_that_skips_the_norm_is_caught_at_that_step(data, tmp_path,
                                                                         optimizer):
    # The gradient norm is measured only on logging steps; the optimizer counts
    # non-finite gradient entries in its own pass, so a NaN on any step stops the run
    # at that step, and the checkpoint of the epoch before is kept as it was.
    model = build(VAE, rng=0)
    original, calls = model.backward, [0]

    def backward(fwd, out=None):  # only training steps run a backward pass
        grads = original(fwd, out)
        calls[0] += 1
        if calls[0] == 8:  # step 7: epoch 2, not a logging step (log_every 10)
            grads["enc.0.W"][1, 2] = np.nan
        return grads

    model.backward = backward
    with pytest.raises(TrainingDiverged, match=r"gradient became non-finite at step 7 "
                                               r"\(epoch 2, batch 3 of 5\).*not saved"):
        train(model, *data, epochs=3, seed=1, run_dir=tmp_path, optimizer=optimizer, **LOOP)
    ck = load_checkpoint(tmp_path)
    assert ck.epoch == 1 and np.all(np.isfinite(ck.model.params.flat))


def test_a_full_disk_says_which_file_and_that_the_last_checkpoint_is_kept(data, tmp_path,
                                                                         monkeypatch):
    """The save after epoch 2 fails (no space left): the message names the file, says the
    checkpoint of epoch 1 is kept and how to continue from it, and that checkpoint loads."""
    import errno

    import npvae.train as train_module

    real, calls = train_module.save_checkpoint, [0]

    def full_disk(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", full_disk)
    with pytest.raises(OSError) as info:
        run(data, tmp_path / "r", epochs=3)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "No space left" in message
    assert str(tmp_path / "r" / "checkpoint.npz") in message
    assert "the checkpoint saved before is kept" in message and "--resume" in message
    assert load_checkpoint(tmp_path / "r").epoch == 1
