"""The models shipped inside the package (npvae.pretrained): small float32 parameter files
whose hashes are checked on load, each reproducing its recorded test NLL, and the command
line's pretrained:NAME.

The check's data come with the tests: tests/data/mnist-test-500.npz holds the first 500
MNIST test images as `npvae eval` binarizes them (seed 0), bit-packed (about 50 KB), so
no test needs the MNIST download or the network.
"""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from npvae import cli, data, pretrained
from npvae.models import IWAE, BernoulliVAE
from npvae.pretrained.export import CHECK_K, CHECK_N, FIXTURE, check_images, check_nll

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
EXPECTED = {"vae-bernoulli": BernoulliVAE, "vae-k1": BernoulliVAE, "iwae-k5": IWAE}


def test_the_three_models_are_shipped_small_float32_and_parameters_only():
    assert set(pretrained.names()) == set(EXPECTED)
    total = 0
    for name in pretrained.names():
        npz_path, json_path = pretrained.files(name)
        size = npz_path.stat().st_size
        assert size <= 3 * MB, (name, size)
        total += size + json_path.stat().st_size
        with np.load(npz_path, allow_pickle=False) as npz:  # raises on any pickled member
            assert all(npz[k].dtype == np.float32 for k in npz.files)
        assert pretrained.SHIPPED[name] == (pretrained.sha256(npz_path), pretrained.sha256(json_path))
    assert total <= 10 * MB


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_model_reproduces_its_recorded_nll(name):
    """NLL of the fixture's 500 test images with k = 100 and the evaluation's noise, within
    the recorded tolerance (float32 decoding rounds differently on other CPUs and BLAS)."""
    shipped = pretrained.load(f"pretrained:{name}")
    assert type(shipped.model) is EXPECTED[name]
    recorded = shipped.info["check"]
    assert (recorded["test_images"], recorded["k"]) == (CHECK_N, CHECK_K)
    got = check_nll(shipped.model, shipped.args)
    assert abs(got["nll"] - recorded["nll"]) <= recorded["tolerance"], (got, recorded)
    assert abs(got["elbo"] - recorded["elbo"]) <= recorded["tolerance"]


def test_the_fixture_is_binary_test_images():
    x = check_images({"seed": 0, "binarize": "dynamic", "dtype": "float32"})
    assert x.shape == (CHECK_N, 784) and set(np.unique(x)) <= {0.0, 1.0}
    assert 0.1 < x.mean() < 0.16  # MNIST digits: about 13% of pixels on
    assert FIXTURE.stat().st_size < 100_000


def test_a_changed_file_is_refused(tmp_path, monkeypatch):
    for path in pretrained.files("vae-bernoulli"):
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.setattr(pretrained, "HERE", tmp_path)
    pretrained.load("pretrained:vae-bernoulli")  # the copies are the shipped files
    npz = tmp_path / "vae-bernoulli.npz"
    blob = bytearray(npz.read_bytes())
    blob[-100] ^= 1
    npz.write_bytes(bytes(blob))
    with pytest.raises(pretrained.PretrainedError, match="SHA-256"):
        pretrained.load("pretrained:vae-bernoulli")
    (tmp_path / "vae-bernoulli.json").unlink()
    with pytest.raises(pretrained.PretrainedError, match="missing"):
        pretrained.load("pretrained:vae-bernoulli")


def test_an_unknown_name_lists_the_shipped_ones():
    with pytest.raises(pretrained.PretrainedError, match="pretrained:iwae-k5"):
        pretrained.load("pretrained:vae-k50")


def test_package_data_ships_the_files():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is Python 3.11+
    line = re.search(r'^"npvae\.pretrained" = \[(.*)\]$', text, re.M)
    assert line and '"*.npz"' in line.group(1) and '"*.json"' in line.group(1)


# ----------------------------------------------------------------------------- command line


def fake_load(dataset="mnist", split="train", data_dir=None, download=True, progress=None):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8), np.zeros(30, np.uint8)


def test_cli_sample_and_eval_a_shipped_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load", fake_load)  # no MNIST, no network
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in pretrained.HERE.iterdir())
    assert cli.main(["sample", "pretrained:vae-bernoulli", "--n", "16"]) == 0
    assert (tmp_path / "samples-vae-bernoulli-seed0.png").stat().st_size > 0
    assert cli.main(["eval", "pretrained:iwae-k5", "--k", "3", "--limit", "10"]) == 0
    out = capsys.readouterr().out
    assert "nll" in out and "iwae" in out and "written to" not in out
    assert sorted(p.name for p in pretrained.HERE.iterdir()) == before  # nothing written there
    assert cli.main(["eval", "pretrained:nothing"]) == 2
    assert "shipped models" in capsys.readouterr().err
