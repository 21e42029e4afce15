"""The convolutional models on the command line (conv-vae, conv-vqvae), on tiny fake data:
train, resume, eval, sample, plot, train-prior, gradcheck, and the options they refuse."""
import json

import numpy as np
import pytest

from npvae import cli, data
from npvae.checkpoint import load_checkpoint
from npvae.kinds import is_conv, is_vq
from npvae.models import KINDS
from npvae.train_settings import new_run_settings

from test_cli import fake_load, run_cli

# channels 2,4 on 28x28 images: 28 -> 14 -> 7, a 7x7 map (M = 49 codes for the VQ-VAE)
TINY = ["--channels", "2,4", "--batch-size", "32", "--limit", "64", "--no-progress"]
VQ = ["--codes", "8", "--code-dim", "2"]
FIGURES = {"reconstructions.png", "samples.png", "loss_curves.png", "latent_scatter.png",
           "interpolation.png"}


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    monkeypatch.setattr(data, "load", fake_load)


def train_once(tmp_path_factory, name, *extra):
    run = tmp_path_factory.mktemp(name) / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "load", fake_load)
    try:
        assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(run), *extra]) == 0
    finally:
        mp.undo()
    return run


@pytest.fixture(scope="module")
def conv_vae_run(tmp_path_factory):
    return train_once(tmp_path_factory, "conv-vae", "--model", "conv-vae", "--latent", "3")


@pytest.fixture(scope="module")
def conv_vqvae_run(tmp_path_factory):
    return train_once(tmp_path_factory, "conv-vqvae", "--model", "conv-vqvae", *VQ)


# ----------------------------------------------------------------------------- kinds


def test_the_conv_kinds_are_on_the_command_line():
    assert {"conv-vae", "conv-vqvae"} <= set(KINDS)
    assert is_conv("conv-vae") and is_conv("conv-vqvae") and not is_conv("vqvae")
    assert is_vq("conv-vqvae") and is_vq("vqvae") and not is_vq("conv-vae")


def test_conv_defaults_differ_from_the_mlp_ones_only_where_they_must():
    s = new_run_settings({"model": "conv-vae"})
    assert s["channels"] == "16,32" and s["epochs"] == 8 and s["beta"] == 1.0
    assert s["likelihood"] == "bernoulli" and s["binarize"] == "dynamic"
    q = new_run_settings({"model": "conv-vqvae"})
    assert q["epochs"] == 6 and q["codes"] == 256 and q["beta"] == 0.25
    assert q["ema"] and q["kmeans_init"] and q["restart_after"] == 100
    assert new_run_settings({"model": "conv-vqvae", "ema": False})["ema"] is False
    assert new_run_settings({})["epochs"] == 30  # the MLP default is untouched


# ----------------------------------------------------------------------------- conv-vae


def test_conv_vae_trains_and_writes_every_figure(conv_vae_run):
    names = {p.name for p in conv_vae_run.iterdir()}
    assert {"checkpoint.npz", "metrics.jsonl"} | FIGURES <= names
    ck = load_checkpoint(conv_vae_run)
    assert ck.model.config["kind"] == "conv-vae" and ck.model.config["channels"] == [2, 4]
    assert ck.model.params["enc.conv1.w"].shape == (4, 2, 4, 4) and ck.epoch == 1


def test_conv_vae_resumes(capsys, conv_vae_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(conv_vae_run, run)
    code, out, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "2",
                             "--no-progress")
    assert code == 0, err
    assert "continuing conv-vae" in err and "test ELBO" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert load_checkpoint(run).epoch == 2


def test_conv_vae_eval_has_log_px_active_units_and_kl_per_dim(capsys, conv_vae_run):
    code, out, err = run_cli(capsys, "eval", str(conv_vae_run), "--k", "5", "--limit", "20")
    assert code == 0, err
    report = json.loads((conv_vae_run / "eval.json").read_text())
    assert report["model"] == "conv-vae" and report["iw_k"] == 5
    assert np.isfinite(report["log_px"]) and report["log_px"] >= report["elbo"] - 5.0
    assert 0 <= report["active_units"] <= 3 and len(report["kl_per_dim"]) == 3
    assert "KL per latent dimension" in out


def test_conv_vae_samples_and_plots(capsys, conv_vae_run, tmp_path):
    code, out, err = run_cli(capsys, "sample", str(conv_vae_run), "--n", "9",
                             "--out", str(tmp_path / "s.png"))
    assert code == 0, err
    assert (tmp_path / "s.png").stat().st_size > 0
    code, _, err = run_cli(capsys, "sample", str(conv_vae_run), "--temperature", "0.5")
    assert code == 2 and "--temperature" in err
    for name in FIGURES:
        (conv_vae_run / name).unlink()
    code, out, err = run_cli(capsys, "plot", str(conv_vae_run))
    assert code == 0, err
    assert FIGURES <= {p.name for p in conv_vae_run.iterdir()}


def test_a_two_dimensional_conv_vae_draws_its_manifold(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *TINY, "--model", "conv-vae", "--latent", "2",
                           "--epochs", "1", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert (tmp_path / "r" / "manifold.png").is_file()


# ----------------------------------------------------------------------------- conv-vqvae


def test_conv_vqvae_trains_with_codebook_figures(conv_vqvae_run):
    names = {p.name for p in conv_vqvae_run.iterdir()}
    assert FIGURES | {"codebook_usage.png", "perplexity.png"} <= names
    model = load_checkpoint(conv_vqvae_run).model
    assert model.config["kind"] == "conv-vqvae" and model.M == 49 and model.K == 8
    assert model.config["ema"] and model.config["kmeans_init"]  # the model's defaults
    row = json.loads((conv_vqvae_run / "metrics.jsonl").read_text().splitlines()[0])
    assert "val_perplexity" in row


def test_conv_vqvae_eval_has_codebook_stats(capsys, conv_vqvae_run):
    code, out, err = run_cli(capsys, "eval", str(conv_vqvae_run), "--k", "0", "--limit", "20")
    assert code == 0, err
    report = json.loads((conv_vqvae_run / "eval.json").read_text())
    assert 1.0 <= report["perplexity"] <= 8.0 and 0.0 < report["used_fraction"] <= 1.0
    assert "kl_per_dim" not in report and "log_px" not in report
    assert "k" not in report  # no importance-weighted estimate: no k to record


def test_conv_vqvae_learned_prior_over_49_positions(capsys, conv_vqvae_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(conv_vqvae_run, run)
    code, out, err = run_cli(capsys, "sample", str(run), "--n", "4")
    assert code == 0 and "drawn uniformly" in err, err
    code, out, err = run_cli(capsys, "train-prior", str(run), "--hidden", "16", "--epochs", "1",
                             "--batch-size", "32", "--no-progress")
    assert code == 0, err
    prior = load_checkpoint(run / "prior").model
    assert (prior.M, prior.K) == (49, 8)
    code, out, err = run_cli(capsys, "sample", str(run), "--n", "4", "--temperature", "0.8")
    assert code == 0, err  # --temperature is refused without a learned prior
    assert "uniformly" not in err
    code, out, err = run_cli(capsys, "eval", str(run), "--k", "0", "--limit", "20")
    assert code == 0, err
    report = json.loads((run / "eval.json").read_text())
    assert report["nll_bound_learned_prior"] < report["nll_bound_uniform_prior"] + 50.0


def test_conv_vqvae_can_switch_its_defaults_off(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *TINY, *VQ, "--model", "conv-vqvae", "--no-ema",
                           "--no-kmeans-init", "--restart-after", "0", "--epochs", "1",
                           "--out", str(tmp_path / "r"))
    assert code == 0, err
    cfg = load_checkpoint(tmp_path / "r").model.config
    assert not cfg["ema"] and not cfg["kmeans_init"] and cfg["restart_after"] == 0


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("argv", [["conv-vae"], ["--model", "conv-vae"], ["conv-vqvae"],
                                  ["conv-vae", "--seed", "3", "--batch", "2"]])
def test_gradcheck_passes_for_the_conv_kinds(capsys, argv):
    code, out, err = run_cli(capsys, "gradcheck", *argv)
    assert code == 0, out + err
    assert "enc.conv0.w" in out and "dec.convT1.w" in out and out.rstrip().endswith("1e-06)")


# ----------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("argv, words", [
    (["--model", "conv-vae", "--hidden", "16"], ["--hidden is for --model", "not conv-vae"]),
    (["--model", "conv-vae", "--activation", "tanh"], ["--activation is for", "not conv-vae"]),
    (["--channels", "2,4"], ["--channels is for --model conv-vae or conv-vqvae",
                             "not vae-bernoulli"]),
    (["--model", "conv-vae", "--free-bits", "1"], ["--free-bits is for", "not conv-vae"]),
    (["--model", "conv-vae", "--objective", "iwae"], ["--objective is for", "not conv-vae"]),
    (["--model", "conv-vae", "--codes", "8"], ["--codes is for --model vqvae or conv-vqvae"]),
    (["--model", "conv-vqvae", "--code-vectors", "4"], ["--code-vectors is for --model vqvae",
                                                        "not conv-vqvae"]),
    (["--model", "conv-vqvae", "--latent", "4"], ["--latent is for", "not conv-vqvae"]),
    (["--model", "conv-vae", "--channels", "2,4,8"], ["divisible by 8", "at most 2"]),
])
def test_options_that_do_not_fit_exit_2_with_one_line(capsys, tmp_path, argv, words):
    code, _, err = run_cli(capsys, "train", "--limit", "64", "--no-progress", *argv,
                           "--out", str(tmp_path / "r"))
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize("argv", [["train", "--channels", "0"], ["train", "--channels", "4,x"],
                                  ["train", "--channels", ""], ["gradcheck", "conv-gan"]])
def test_malformed_values_are_refused_by_the_parser(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_conv_model_too_large_for_memory_is_refused_before_it_is_built(capsys, tmp_path,
                                                                       monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before its size was checked")

    monkeypatch.setattr("npvae.models.build", must_not_build)
    code, _, err = run_cli(capsys, "train", "--model", "conv-vae", "--channels", "100000,100000",
                           "--limit", "64", "--out", str(tmp_path / "r"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "choose smaller --channels" in err


def test_param_count_knows_the_conv_models():
    from npvae.checkpoint import param_count
    from npvae.models import build

    for cfg in (dict(kind="conv-vae", channels=[2, 4], latent=3, image_shape=[1, 8, 8]),
                dict(kind="conv-vqvae", channels=[3], image_shape=[1, 12, 12], num_codes=8),
                dict(kind="conv-vae"), dict(kind="conv-vqvae")):
        model = build(cfg)
        assert param_count(model.config) == model.num_params(), cfg


def test_a_model_named_twice_or_not_at_all(capsys):
    code, _, err = run_cli(capsys, "gradcheck", "conv-vae", "--model", "vqvae")
    assert code == 2 and "two models named" in err
    code, _, err = run_cli(capsys, "tour")
    assert code == 2 and "name a model" in err


def test_help_names_the_conv_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for word in ("--channels", "conv-vae", "conv-vqvae", "--no-ema", "--no-kmeans-init"):
        assert word in text, word


@pytest.mark.parametrize("cfg", [
    dict(kind="conv-vqvae", channels=[2, 3], image_shape=[1, 8, 8], num_codes=8, code_dim=2,
         ema=False, kmeans_init=False),
    dict(kind="vqvae", data_dim=64, hidden=[16], num_codes=8, code_dim=2, num_vectors=2),
])
def test_vq_elbo_is_the_training_steps_statistics_without_its_backward(cfg):
    from npvae import evaluate
    from npvae.models import build

    model = build(dict(cfg, dtype="float64"), rng=3)
    x = np.random.default_rng(4).uniform(size=(7, 64))
    _, _, stats = model.loss_and_grads(x)
    got = evaluate.elbo(model, x, batch_size=7)
    assert got["recon"] == stats["recon"] and got["loss"] == stats["loss"]
    halves = evaluate.elbo(model, x, batch_size=4)  # batches weighted by their size
    assert halves["recon"] == pytest.approx(stats["recon"], rel=1e-12)
