"""The npvae command line, on a tiny fake dataset (no network)."""
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npvae import cli, data
from npvae.checkpoint import load_checkpoint
from npvae.tour import tour_model
from npvae.train import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 300, "test": 60}
TINY = ["--hidden", "16", "--batch-size", "32", "--limit", "120", "--no-progress"]


def fake_load(dataset="mnist", split="train", data_dir=None, download=True, progress=None):
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = SIZES[split]
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    monkeypatch.setattr(data, "load", fake_load)


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One small run shared by the eval, sample and plot tests."""
    run = tmp_path_factory.mktemp("cli") / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "load", fake_load)
    try:
        assert cli.main(["train", *TINY, "--latent", "2", "--epochs", "2", "--out", str(run)]) == 0
    finally:
        mp.undo()
    return run


FIGURES = {"reconstructions.png", "samples.png", "loss_curves.png", "latent_scatter.png",
           "interpolation.png"}


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command, words", [
    ([], ["train", "eval", "sample", "plot", "gradcheck", "examples"]),
    (["train"], ["--model", "--hidden", "--latent", "--epochs", "--batch-size", "--lr", "--beta",
                 "--warmup", "--free-bits", "--binarize", "--dataset", "--data-dir", "--seed",
                 "--backend", "--dtype", "--out", "--resume", "--clip", "--sigma2", "--sampled",
                 "--codes", "--code-dim", "--code-vectors", "--metric", "--ema",
                 "--restart-after", "--kmeans-init", "--limit", "--no-progress", "examples"]),
    (["eval"], ["RUN", "--k", "eval.json", "examples"]),
    (["sample"], ["RUN", "--n", "--seed", "examples"]),
    (["plot"], ["RUN", "example"]),
    (["gradcheck"], ["vae-gaussian", "vae-bernoulli", "ae", "vqvae", "examples"]),
])
def test_help(capsys, command, words):
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in words:
        assert word in text, word


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "npvae", "--help"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gradcheck" in out.stdout and "train" in out.stdout


# ----------------------------------------------------------------------------- train


def test_train_writes_a_run_directory(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"metrics.jsonl", "checkpoint.npz", "manifold.png"} | FIGURES <= names
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    ck = load_checkpoint(trained_run)
    assert ck.model.config["kind"] == "vae-bernoulli" and ck.model.config["latent"] == 2
    assert ck.args["limit"] == 120 and ck.args["binarize"] == "dynamic"
    assert ck.epoch == 2 and ck.step == 2 * 4  # 120 images in batches of 32


def test_train_prints_test_elbo_and_paths(capsys, tmp_path):
    run = tmp_path / "r"
    code, out, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--latent", "3",
                             "--out", str(run), "--warmup", "1epochs")
    assert code == 0, err
    assert "test ELBO" in out and str(run) in out and "checkpoint.npz" in out
    assert "epoch 1/1" in out
    assert load_checkpoint(run).model.config["warmup_steps"] == 4  # one epoch of 4 steps
    assert FIGURES <= {p.name for p in run.iterdir()}


@pytest.mark.parametrize("extra", [
    ["--model", "vqvae", "--codes", "8", "--code-dim", "2", "--code-vectors", "2", "--ema",
     "--restart-after", "2", "--kmeans-init"],
    ["--model", "ae", "--sampled", "--beta", "0.5"],
    ["--model", "vae-gaussian", "--sigma2", "0.5", "--free-bits", "0.1"],
])
def test_train_other_models(capsys, tmp_path, extra):
    code, out, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(tmp_path / "r"),
                             *extra)
    assert code == 0, err
    assert "test ELBO" in out
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "r"), "--k", "0")
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    if "vqvae" in extra:  # a point mass on codes: no KL per dimension
        assert "kl_per_dim" not in report and "KL per latent dimension" not in out
    else:
        assert len(report["kl_per_dim"]) == 20  # the default --latent
        assert sum(report["kl_per_dim"]) == pytest.approx(report["kl"], rel=1e-5)
        assert "KL per latent dimension" in out


def test_resume_continues_a_run(capsys, tmp_path):
    run = tmp_path / "r"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))[0] == 0
    code, out, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "2", "--no-progress")
    assert code == 0, err
    assert "continuing" in err and "epoch 2/2" in out
    assert load_checkpoint(run).epoch == 2
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--batch-size", "64")
    assert code == 2 and "--batch-size cannot be changed when resuming" in err
    assert "--lr, --clip" in err  # what may be given instead


def test_resume_may_lower_the_learning_rate_and_add_clipping(capsys, tmp_path):
    """What the divergence message advises must be possible, and recorded."""
    run = tmp_path / "r"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))[0] == 0
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "2", "--lr",
                           "0.0003", "--clip", "5", "--no-progress")
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert (rows[0]["lr"], rows[0]["clip"]) == (0.001, None) and "changed" not in rows[0]
    assert (rows[1]["lr"], rows[1]["clip"]) == (0.0003, 5.0)
    assert rows[1]["changed"] == {"lr": [0.001, 0.0003], "clip": [None, 5.0], "step": 4}
    ck = load_checkpoint(run)
    assert (ck.args["lr"], ck.args["clip"]) == (0.0003, 5.0)
    assert float(ck.optimizer_state["lr"]) == 0.0003


def interrupt_at_step(monkeypatch, n: int):
    """Make the n-th training forward pass raise KeyboardInterrupt, as Ctrl-C would;
    returns the real VAE.forward."""
    from npvae.models.vae import VAE

    original, calls = VAE.forward, [0]

    def interrupted(self, x, **kw):
        calls[0] += kw.get("step") is not None
        if calls[0] == n:
            raise KeyboardInterrupt
        return original(self, x, **kw)

    monkeypatch.setattr(VAE, "forward", interrupted)
    return original


def test_ctrl_c_saves_and_exits_130(capsys, tmp_path, monkeypatch):
    from npvae.models.vae import VAE

    original = interrupt_at_step(monkeypatch, 6)
    run = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "3", "--out", str(run))
    assert code == 130
    assert "saved in" in err and f"npvae train --resume {run}" in err
    assert load_checkpoint(run).position["batch"] == 1
    monkeypatch.setattr(VAE, "forward", original)
    # asked for no more epochs than it completed: nothing to do, and the message says the
    # checkpoint is partway through the next epoch
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "1", "--no-progress")
    assert code == 0 and "already trained for 1 epochs and 1 batches of epoch 2" in err
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert code == 0, err
    assert load_checkpoint(run).epoch == 3


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="Ctrl-C is handled elsewhere in this process")
def test_ctrl_c_during_the_last_validation_stops_too(capsys, tmp_path, monkeypatch):
    import npvae.train as train_module

    original, calls = train_module.validation_metrics, [0]

    def validation(*args, **kw):
        calls[0] += 1
        if calls[0] == 2:  # epoch 2 of 2
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kw)

    monkeypatch.setattr(train_module, "validation_metrics", validation)
    run = tmp_path / "r"
    code, out, err = run_cli(capsys, "train", *TINY, "--epochs", "2", "--out", str(run))
    assert code == 130, err
    assert "once training was complete; the state after epoch 2 is saved in" in err
    assert f"npvae eval {run} && npvae plot {run}" in err
    assert "test ELBO" not in out and not (run / "samples.png").exists()
    assert load_checkpoint(run).epoch == 2 and len(read_metrics(run)) == 2


def test_suggested_commands_quote_a_folder_with_spaces(capsys, tmp_path, monkeypatch):
    def command_after(text, words):
        """The path given to the command ``words`` in ``text``, as a shell would read it."""
        rest = shlex.split(text.split(words, 1)[1].splitlines()[0].replace(",", " "))
        return rest[0]

    run = tmp_path / "my runs" / "vae 1"
    code, out, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))
    assert code == 0, err
    assert command_after(out, "next: npvae eval ") == str(run)
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))
    assert code == 2 and command_after(err, "npvae train --resume ") == str(run)

    interrupt_at_step(monkeypatch, 2)
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "2", "--no-progress")
    assert code == 130 and command_after(err, "continue with: npvae train --resume ") == str(run)


def test_divergence_exits_1_with_the_step(capsys, tmp_path, monkeypatch):
    from npvae.models.vae import VAE

    original = VAE.forward

    def nan_loss(self, x, **kw):
        fwd = original(self, x, **kw)
        return fwd._replace(loss=float("nan")) if kw.get("step") == 5 else fwd

    monkeypatch.setattr(VAE, "forward", nan_loss)
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "3", "--out", str(tmp_path / "r"))
    assert code == 1
    assert "diverged" in err and "at step 5 (epoch 2" in err and "Traceback" not in err
    assert load_checkpoint(tmp_path / "r").epoch == 1


# ----------------------------------------------------------------------------- errors


def one_line_error(code, err):
    assert code == 2
    assert err.startswith("npvae: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_bad_checkpoint_path_exits_2(capsys, tmp_path):
    for command in ("eval", "sample", "plot"):
        code, _, err = run_cli(capsys, command, str(tmp_path / "missing"))
        one_line_error(code, err)
        assert "no such checkpoint" in err


def test_resume_of_a_missing_folder_says_it_does_not_exist(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "runs" / "vae-typo"))
    one_line_error(code, err)
    assert "no such run folder or checkpoint file" in err and "cp " not in err


def test_corrupt_checkpoint_exits_2(capsys, tmp_path):
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip file at all")
    code, _, err = run_cli(capsys, "eval", str(tmp_path))
    one_line_error(code, err)
    assert "not a readable checkpoint" in err


def test_options_for_another_model_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--codes", "8", "--out", str(tmp_path / "r"))
    one_line_error(code, err)
    assert "--codes" in err and "vae-bernoulli" in err


def test_bad_values_exit_2(capsys):
    for argv in (["train", "--latent", "0"], ["train", "--hidden", "4,x"],
                 ["train", "--warmup", "soon"], ["gradcheck", "gan"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


def test_data_unavailable_exits_2(capsys, tmp_path, monkeypatch):
    def unavailable(*args, **kwargs):
        raise data.DataUnavailableError("could not load MNIST (split 'train'); every route failed")

    monkeypatch.setattr(data, "load", unavailable)
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "r"))
    one_line_error(code, err)
    assert "could not load MNIST" in err


# ----------------------------------------------------------------------------- mistakes cost nothing


def files_of(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def copy_of_run(run, tmp_path):
    """A copy of the files of ``run`` in tmp_path/run, for a test that writes into it."""
    copy = tmp_path / "run"
    copy.mkdir()
    for name, content in files_of(run).items():
        (copy / name).write_bytes(content)
    return copy


def test_resume_from_another_checkpoint_file_is_refused(capsys, trained_run, tmp_path):
    run = copy_of_run(trained_run, tmp_path)
    (run / "epoch1.npz").write_bytes((run / "checkpoint.npz").read_bytes())  # a user's backup
    (run / "samples.png").write_bytes(b"a user's own figure")
    before = files_of(run)
    code, _, err = run_cli(capsys, "train", "--resume", str(run / "epoch1.npz"), "--epochs", "3",
                           "--no-progress")
    one_line_error(code, err)
    assert "cp " in err and "checkpoint.npz" in err  # says how to branch from it
    assert files_of(run) == before
    # the run's own checkpoint file, named directly, is the run
    code, _, err = run_cli(capsys, "train", "--resume", str(run / "checkpoint.npz"), "--epochs",
                           "3", "--no-progress")
    assert code == 0, err


def test_resuming_a_finished_run_changes_nothing(capsys, trained_run, tmp_path):
    run = copy_of_run(trained_run, tmp_path)
    before = files_of(run)
    code, out, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "2")
    assert code == 0 and "nothing to do" in err and "--epochs N with N > 2" in err
    assert f"npvae eval {run} && npvae plot {run}" in err  # where its results come from
    assert "continuing" not in err and out == ""
    assert files_of(run) == before


def test_a_shipped_model_cannot_be_resumed_or_plotted(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["train", "--resume", "pretrained:vae-bernoulli"],
                 ["plot", "pretrained:vae-bernoulli"]):
        code, _, err = run_cli(capsys, *argv)
        one_line_error(code, err)
        assert "shipped with npvae" in err
    assert list(tmp_path.iterdir()) == []  # nothing written into the current folder


@pytest.mark.parametrize("bad", [["--val", "1000"], ["--hidden", "16", "--latent", "3",
                                                    "--model", "vqvae"]])
def test_overwrite_with_a_bad_option_keeps_the_old_run(capsys, trained_run, tmp_path, bad):
    run = copy_of_run(trained_run, tmp_path)
    before = files_of(run)
    code, _, err = run_cli(capsys, "train", *TINY, "--out", str(run), "--overwrite", *bad)
    one_line_error(code, err)
    assert files_of(run) == before


def test_a_failed_train_leaves_no_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["train", "--k", "3"], ["train", *TINY, "--val", "1000", "--out", "new"],
                 ["train", "--resume", "nope/checkpoint.npz"]):
        code, _, err = run_cli(capsys, *argv)
        one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key, value", [("seed", "abc"), ("dataset", "cifar"), ("dtype", "int8"),
                                        ("binarize", "weird"), ("lr", -1.0), ("batch_size", 0)])
def test_a_checkpoint_with_bad_settings_is_refused(capsys, trained_run, tmp_path, key, value):
    ck = load_checkpoint(trained_run)
    bad = tmp_path / "run"
    bad.mkdir()
    from npvae.checkpoint import save_checkpoint
    from npvae.optim import Adam
    save_checkpoint(bad / "checkpoint.npz", ck.model, Adam(ck.model.params), np.random.default_rng(0),
                    ck.epoch, ck.step, ck.history, {**ck.args, key: value})
    for argv in (["eval", str(bad), "--k", "0"], ["plot", str(bad)],
                 ["train", "--resume", str(bad), "--epochs", "3"]):
        code, _, err = run_cli(capsys, *argv)
        one_line_error(code, err)
        assert f"setting {key}" in err, err


def test_a_checkpoint_with_a_bad_history_is_refused(capsys, trained_run, tmp_path):
    ck = load_checkpoint(trained_run)
    bad = tmp_path / "run"
    bad.mkdir()
    from npvae.checkpoint import save_checkpoint
    from npvae.optim import Adam
    save_checkpoint(bad / "checkpoint.npz", ck.model, Adam(ck.model.params), np.random.default_rng(0),
                    ck.epoch, ck.step, [*ck.history[:-1], {"epoch": "x"}], ck.args)
    code, _, err = run_cli(capsys, "plot", str(bad))
    one_line_error(code, err)
    assert "history" in err


# ----------------------------------------------------------------------------- eval, sample, plot


def test_eval_writes_eval_json(capsys, trained_run):
    code, out, err = run_cli(capsys, "eval", str(trained_run), "--k", "8")
    assert code == 0, err
    report = json.loads((trained_run / "eval.json").read_text())
    for key in ("elbo", "recon", "kl", "log_px", "active_units"):
        assert key in report and key in out
    assert report["test_images"] == SIZES["test"] and report["k"] == 8
    assert report["log_px"] >= report["elbo"] - 5.0  # a tighter bound, up to noise
    # the KL of each latent dimension (EVAL.2): one value per dimension, summing to the KL
    assert len(report["kl_per_dim"]) == 2 and min(report["kl_per_dim"]) >= 0
    assert sum(report["kl_per_dim"]) == pytest.approx(report["kl"], rel=1e-5)
    assert "KL per latent dimension" in out
    by_dim = next(line for line in out.splitlines() if "dimension 0.." in line).split()[2:]
    ranked = next(line for line in out.splitlines() if "largest first" in line).split()[2:]
    assert by_dim == [f"{v:.2f}" for v in report["kl_per_dim"]]
    assert ranked == sorted(by_dim, key=float, reverse=True)


def test_sample_and_plot(capsys, trained_run, tmp_path):
    out_png = tmp_path / "s.png"
    code, out, err = run_cli(capsys, "sample", str(trained_run), "--n", "9", "--out", str(out_png))
    assert code == 0, err
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    code, _, _ = run_cli(capsys, "sample", str(trained_run))
    assert code == 0 and (trained_run / "samples-seed0.png").exists()

    for name in FIGURES:
        (trained_run / name).unlink()
    code, out, err = run_cli(capsys, "plot", str(trained_run))
    assert code == 0, err
    assert FIGURES | {"manifold.png"} <= {p.name for p in trained_run.iterdir()}


# ----------------------------------------------------------------------------- gradcheck


def test_gradcheck_prints_one_row_per_parameter(capsys):
    code, out, err = run_cli(capsys, "gradcheck", "vae-bernoulli")
    assert code == 0, out + err
    model, _, _ = tour_model("vae-bernoulli")
    rows = [line for line in out.splitlines() if line.split() and line.split()[0] in model.params]
    assert [r.split()[0] for r in rows] == list(model.params)
    assert "ok: all" in out


@pytest.mark.parametrize("kind", ["vae-gaussian", "ae", "vqvae"])
def test_gradcheck_other_models(capsys, kind):
    code, out, err = run_cli(capsys, "gradcheck", kind)
    assert code == 0, out + err


def test_gradcheck_fails_on_a_wrong_gradient(capsys, monkeypatch):
    from npvae.models.vae import VAE

    original = VAE.loss_and_grads

    def wrong(self, x, **kw):
        loss, grads, stats = original(self, x, **kw)
        grads["dec.0.b"] *= 1.01
        return loss, grads, stats

    monkeypatch.setattr(VAE, "loss_and_grads", wrong)
    code, out, _ = run_cli(capsys, "gradcheck", "vae-bernoulli")
    assert code == 1 and "FAIL" in out and "dec.0.b" in out


def test_hidden_sizes_parse_including_no_hidden_layer():
    from npvae.cli import _hidden, _hidden_list
    assert _hidden_list(_hidden("400")) == [400]
    assert _hidden_list(_hidden("200,200")) == [200, 200]
    assert _hidden_list(_hidden("none")) == [] == _hidden_list(_hidden("None"))


def test_empty_hidden_is_refused_with_the_way_to_say_none(capsys):
    """--hidden '' used to mean no hidden layer, silently."""
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--hidden", ""])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "empty value" in err and "--hidden none" in err


def test_commands_started_in_the_same_second_get_folders_of_their_own(capsys, tmp_path,
                                                                       monkeypatch):
    """The default folder is chosen before the checks and the data; another command may
    take that name meanwhile. It then trains into the next free name, never into the
    other command's folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "20260101-000000")
    real = cli._default_run_dir
    taken = tmp_path / "runs" / "vae-bernoulli-20260101-000000"

    def chosen_then_taken(kind):  # another command makes the folder right after the choice
        run = real(kind)
        taken.mkdir(parents=True, exist_ok=True)
        return run

    monkeypatch.setattr(cli, "_default_run_dir", chosen_then_taken)
    code, out, err = run_cli(capsys, "train", *TINY, "--epochs", "1")
    assert code == 0, err
    assert list(taken.iterdir()) == []  # the other command's folder is left alone
    assert (taken.parent / "vae-bernoulli-20260101-000000-2" / "checkpoint.npz").exists()


def test_a_killed_first_save_leaves_no_run_behind(capsys, tmp_path):
    """kill -9 during the very first save leaves only the temporary file: --out then
    trains into the folder (removing it), instead of sending the user to --resume."""
    run = tmp_path / "r"
    run.mkdir()
    (run / ".checkpoint.npz.ekd6c3hr.tmp").write_bytes(b"PK\x03\x04 cut short")
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))
    assert code == 0, err
    assert load_checkpoint(run).epoch == 1
    assert not list(run.glob(".*.tmp"))


def test_a_run_without_a_checkpoint_is_not_offered_a_resume(capsys, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))
    assert code == 2
    assert "saved no checkpoint" in err and "--overwrite" in err and "--resume" not in err
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run),
                           "--overwrite")
    assert code == 0, err
