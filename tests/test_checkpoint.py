"""Checkpoints: exact round trips, atomic writes, and clear errors for bad files."""
import json
import os
import zipfile

import numpy as np
import pytest

from npvae import checkpoint as ckpt
from npvae.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from npvae.models import build
from npvae.optim import Adam

CONFIG = dict(kind="vae-bernoulli", data_dim=12, hidden=[8], latent=3)


def trained_state(config=CONFIG, steps=3):
    """A small model and an Adam optimizer a few steps in, and an advanced Generator."""
    model = build(config, rng=0)
    opt = Adam(model.params, lr=1e-2)
    rng = np.random.default_rng(7)
    for _ in range(steps):
        x = rng.random((5, config["data_dim"])).astype(model.dtype)
        fwd = model.forward(x, rng=rng)
        opt.step(model.backward(fwd))
        model.after_step(fwd, rng)
    return model, opt, rng


HISTORY = [{"epoch": 1, "train_loss": 8.5, "val_elbo": -8.25, "seconds": 0.5}]
ARGS = {"batch_size": 5, "dataset": "mnist", "hidden": "8", "clip": None}


@pytest.fixture
def saved(tmp_path):
    model, opt, rng = trained_state()
    path = save_checkpoint(tmp_path / "checkpoint.npz", model, opt, rng, 2, 3, HISTORY, ARGS)
    return path, model, opt, rng


def test_round_trip_is_exact(saved):
    path, model, opt, rng = saved
    ck = load_checkpoint(path)
    assert ck.path == path
    assert ck.model.config == model.config
    assert list(ck.model.params) == list(model.params)
    for k in model.params:
        assert np.array_equal(ck.model.params[k], model.params[k])
        assert ck.model.params[k].dtype == model.params[k].dtype
    state = opt.state_dict()
    assert set(ck.optimizer_state) == set(state)
    for k, v in state.items():
        assert np.array_equal(ck.optimizer_state[k], v)
    fresh = Adam(ck.model.params, lr=1.0)
    fresh.load_state_dict(ck.optimizer_state)
    assert fresh.step_count == opt.step_count and fresh.lr == opt.lr
    assert ck.rng.bit_generator.state == rng.bit_generator.state
    assert np.array_equal(ck.rng.standard_normal(10), rng.standard_normal(10))
    assert (ck.epoch, ck.step, ck.history, ck.args, ck.position) == (2, 3, HISTORY, ARGS, None)


def test_run_directory_and_position(tmp_path):
    model, opt, rng = trained_state()
    position = {"batch": 4, "sums": {"loss": 12.5}, "seen": 20, "seconds": 1.0,
                "epoch_rng": rng.bit_generator.state}
    save_checkpoint(tmp_path / "checkpoint.npz", model, opt, rng, 1, 9, [], {}, position=position)
    ck = load_checkpoint(tmp_path)  # a run directory works too
    assert ck.position == position


def test_file_is_a_plain_npz_without_pickles(saved):
    path = saved[0]
    with np.load(path, allow_pickle=False) as npz:
        names = set(npz.files)
        assert int(npz["format_version"]) == ckpt.FORMAT_VERSION
        assert json.loads(str(npz["config"]))["kind"] == "vae-bernoulli"
        assert json.loads(str(npz["rng"]))["bit_generator"] == "PCG64"
        assert npz["param/enc.0.W"].shape == (12, 8)
    assert {"args", "history", "epoch", "step", "optim/m.enc.0.W"} <= names
    with zipfile.ZipFile(path) as zf:  # nothing but .npy members
        assert all(n.endswith(".npy") for n in zf.namelist())


def test_vq_buffers_round_trip(tmp_path):
    config = dict(kind="vqvae", data_dim=12, hidden=[8], num_codes=5, code_dim=2,
                  num_vectors=2, ema=True, restart_after=1, likelihood="bernoulli")
    model, opt, rng = trained_state(config)
    assert model.buffers["ema_cluster_size"].any()
    save_checkpoint(tmp_path / "c.npz", model, opt, rng, 1, 3, [], {})
    ck = load_checkpoint(tmp_path / "c.npz")
    for k, v in model.buffers.items():
        assert np.array_equal(ck.model.buffers[k], v) and ck.model.buffers[k].dtype == v.dtype


def test_write_is_atomic(saved, monkeypatch):
    path, model, opt, rng = saved
    before = path.read_bytes()

    def broken_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, rng, 3, 4, HISTORY, ARGS)
    assert path.read_bytes() == before  # the old checkpoint is untouched
    assert os.listdir(path.parent) == [path.name]  # and no temporary file is left behind
    load_checkpoint(path)


# ----------------------------------------------------------------------------- bad files


def rewrite(path, drop=(), replace=None):
    """Rewrite the npz at ``path`` without the members in ``drop``, with those in ``replace``."""
    with np.load(path, allow_pickle=False) as npz:
        members = {k: npz[k] for k in npz.files if k not in drop}
    members.update(replace or {})
    with open(path, "wb") as fh:
        np.savez(fh, **members)


def expect_error(path, *patterns):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for pattern in patterns:
        assert pattern in message, message
    # raised from None: no chained NumPy or zipfile traceback behind it
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert isinstance(info.value, ValueError)
    return message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.npz", "no such checkpoint")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "text"])
def test_damaged_files(saved, damage):
    path = saved[0]
    data = path.read_bytes()
    content = {"garbage": os.urandom(1000), "truncated": data[: len(data) // 2], "empty": b"",
               "text": b'{"this": "is json, not npz"}'}[damage]
    path.write_bytes(content)
    expect_error(path, "not a readable checkpoint")


def test_bad_crc_is_caught(saved):
    path = saved[0]
    data = bytearray(path.read_bytes())
    start = data.find(b"param/dec.0.W") + 400  # inside that member's data
    data[start:start + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    expect_error(path, "not a readable checkpoint")


def test_missing_members(saved):
    path = saved[0]
    rewrite(path, drop=("rng", "history"))
    expect_error(path, "missing rng, history")


def test_wrong_format_version(saved):
    path = saved[0]
    rewrite(path, replace={"format_version": np.array(99)})
    expect_error(path, "format version 99", f"version {ckpt.FORMAT_VERSION}")


def test_params_that_do_not_fit_the_config(saved):
    path = saved[0]
    rewrite(path, replace={"param/enc.0.W": np.zeros((12, 9), np.float32)})
    expect_error(path, "enc.0.W has shape (12, 9)", "(12, 8)")


def test_missing_and_unexpected_params(saved):
    path = saved[0]
    rewrite(path, drop=("param/dec.1.b",), replace={"param/extra": np.zeros(2, np.float32)})
    expect_error(path, "missing parameters ['dec.1.b']", "unexpected parameters ['extra']")


def test_non_finite_params(saved):
    path = saved[0]
    with np.load(path) as npz:
        w = npz["param/dec.0.W"].copy()
    w[1, 2] = np.nan
    rewrite(path, replace={"param/dec.0.W": w})
    expect_error(path, "dec.0.W holds nan at index (1, 2)")


def test_dtype_mismatch(saved):
    path = saved[0]
    with np.load(path) as npz:
        w = npz["param/enc.0.b"].astype(np.float64)
    rewrite(path, replace={"param/enc.0.b": w})
    expect_error(path, "enc.0.b has dtype float64", "float32")


def test_config_that_builds_no_model(saved):
    path = saved[0]
    rewrite(path, replace={"config": np.array(json.dumps({"kind": "transformer"}))})
    expect_error(path, "config does not describe a model")
    rewrite(path, replace={"config": np.array("{not json")})
    expect_error(path, "'config' is not valid JSON")


def test_pickled_member_is_refused(saved):
    path = saved[0]
    with np.load(path, allow_pickle=False) as npz:
        members = {k: npz[k] for k in npz.files}
    members["history"] = np.array([{"epoch": 1}], dtype=object)  # needs pickle to read
    with open(path, "wb") as fh:
        np.savez(fh, **members)
    expect_error(path, "not a readable checkpoint")


def test_bad_rng_state(saved):
    path = saved[0]
    rewrite(path, replace={"rng": np.array(json.dumps({"bit_generator": "NoSuchGenerator"}))})
    expect_error(path, "rng state")
