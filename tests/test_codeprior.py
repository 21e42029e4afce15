"""npvae train-prior, and the learned prior in npvae eval and npvae sample, on tiny fake data.

A VQ-VAE with K = 8 codes and M = 3 code vectors is trained for one epoch on random
images (no network); its prior is a masked MLP with 16 hidden units.
"""
import json
import math
import shutil

import numpy as np
import pytest

from npvae import cli, data
from npvae import train as train_module
from npvae.checkpoint import load_checkpoint, save_checkpoint
from npvae.codeprior import encode_codes, evaluate_prior, prior_dir, sample_codes, vqvae_identity
from npvae.models import VQVAE, MADEPrior

from test_cli import fake_load

K, M = 8, 3
VQ = ["train", "--model", "vqvae", "--hidden", "16", "--codes", str(K), "--code-dim", "2",
      "--code-vectors", str(M), "--batch-size", "32", "--limit", "120", "--no-progress"]
PRIOR = ["--hidden", "16", "--batch-size", "32", "--no-progress"]


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    monkeypatch.setattr(data, "load", fake_load)


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    """A trained VQ-VAE run without a prior; tests copy it before writing into it."""
    run = tmp_path_factory.mktemp("prior") / "vq"
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "load", fake_load)
    try:
        assert cli.main([*VQ, "--epochs", "1", "--out", str(run)]) == 0
    finally:
        mp.undo()
    return run


@pytest.fixture
def run(vq_run, tmp_path):
    copy = tmp_path / "vq"
    shutil.copytree(vq_run, copy)
    return copy


def main(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_batch_sizes_must_be_positive_integers(bad):
    # a negative batch_size encoded no image and returned np.empty's contents
    vq = VQVAE(data_dim=12, hidden=(8,), num_codes=K, code_dim=2, num_vectors=M)
    prior = MADEPrior(num_codes=K, num_vectors=M, hidden=(4,))
    images = np.random.default_rng(0).random((5, 12)).astype(np.float32)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        encode_codes(vq, images, "none", np.random.default_rng(0), batch_size=bad)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        evaluate_prior(vq, prior, images, 1.0, np.random.default_rng(0), batch_size=bad)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        evaluate_prior(vq, prior, images, 1.0, np.random.default_rng(0), n_samples=bad)


def test_evaluate_prior_reports_both_bounds(run, capsys):
    code, out, _ = main(capsys, "train-prior", run, *PRIOR, "--epochs", "2")
    assert code == 0, out
    assert "prior test cross-entropy" in out
    pdir = prior_dir(run)
    assert {"checkpoint.npz", "metrics.jsonl", "samples.png"} <= {p.name for p in pdir.iterdir()}
    assert len(pdir.joinpath("metrics.jsonl").read_text().splitlines()) == 2

    code, _, _ = main(capsys, "eval", run, "--k", "0")
    assert code == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["prior"] == "learned"
    assert math.isclose(report["uniform_prior_nats"], M * math.log(K))
    assert math.isclose(report["nll_bound_learned_prior"], report["recon"] + report["prior_nats"])
    assert math.isclose(report["nll_bound_uniform_prior"], report["recon"] + M * math.log(K))
    assert math.isclose(report["prior_perplexity"], math.exp(report["prior_nats"] / M))
    # the cross-entropy, computed independently: -mean log p(c(x)) over the test codes
    vq, prior = load_checkpoint(run).model, load_checkpoint(prior_dir(run)).model
    _, _, x_test = cli._test_set(load_checkpoint(run).args)
    assert math.isclose(report["prior_nats"], -prior.log_prob(vq.assign(x_test)).mean(), rel_tol=1e-9)
    assert 0 < report["prior_sample_used_fraction"] <= 1


def test_eval_without_a_prior_reports_the_uniform_bound(run, capsys):
    assert main(capsys, "eval", run, "--k", "0")[0] == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["prior"] == "uniform" and "prior_nats" not in report
    assert math.isclose(report["nll_bound_uniform_prior"], -report["elbo"])


def test_sample_says_which_prior_drew_the_codes(run, capsys):
    code, _, err = main(capsys, "sample", run, "--n", "4")
    assert code == 0 and "no learned prior" in err
    code, _, err = main(capsys, "sample", run, "--n", "4", "--temperature", "0.5")
    assert code == 2 and "--temperature needs a learned prior" in err
    assert main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")[0] == 0
    code, out, err = main(capsys, "sample", run, "--n", "4", "--temperature", "0.5", "--seed", "3")
    assert code == 0 and "no learned prior" not in err
    assert (run / "samples-seed3.png").exists()


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf"])
def test_temperature_must_be_positive(run, capsys, bad):
    with pytest.raises(SystemExit) as info:
        cli.main(["sample", str(run), "--temperature", bad])
    assert info.value.code == 2
    assert not list(run.glob("samples-seed*.png"))


def stop_after_first_epoch(monkeypatch):
    """Make training stop at the end of its first epoch, as Ctrl-C would stop it there;
    returns the real train function."""
    real = train_module.train

    def stopping(*args, **kwargs):
        def stop(row):
            raise KeyboardInterrupt
        return real(*args, **kwargs, on_epoch_end=stop)

    monkeypatch.setattr(train_module, "train", stopping)
    return real


def test_a_stop_after_the_last_epoch_says_the_prior_is_trained(run, capsys, monkeypatch):
    """Stopped at the end of its last epoch (during validation or the save), the prior is
    complete: the message points to npvae eval, not to a resume that has nothing to do."""
    stop_after_first_epoch(monkeypatch)
    code, _, err = main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")
    assert code == 130
    assert f"the prior is trained; for its test cross-entropy: npvae eval {run}" in err
    assert "--resume" not in err


def test_resume_after_an_interruption_is_exact(run, tmp_path, capsys, monkeypatch):
    """Stopped after epoch 1 of 3 (as Ctrl-C would stop it), resumed: the same parameters."""
    other = tmp_path / "straight"
    shutil.copytree(run, other)
    assert main(capsys, "train-prior", other, *PRIOR, "--epochs", "3")[0] == 0

    real = stop_after_first_epoch(monkeypatch)
    code, _, err = main(capsys, "train-prior", run, *PRIOR, "--epochs", "3")
    assert code == 130
    assert f"npvae train-prior {run} --resume" in err and "npvae train --resume" not in err
    monkeypatch.setattr(train_module, "train", real)
    assert main(capsys, "train-prior", run, "--resume", "--no-progress")[0] == 0
    resumed, straight = load_checkpoint(prior_dir(run)), load_checkpoint(prior_dir(other))
    assert resumed.epoch == straight.epoch == 3
    np.testing.assert_array_equal(resumed.model.params.flat, straight.model.params.flat)


def test_a_second_prior_needs_overwrite(run, capsys):
    assert main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")[0] == 0
    code, _, err = main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")
    assert code == 2 and "already has a prior" in err
    assert main(capsys, "train-prior", run, *PRIOR, "--epochs", "1", "--overwrite")[0] == 0
    code, _, err = main(capsys, "train-prior", run, "--resume", "--hidden", "32")
    assert code == 2 and "--hidden cannot be changed" in err


def test_train_prior_refuses_a_run_that_is_not_a_vqvae(tmp_path, capsys):
    vae = tmp_path / "vae"
    assert cli.main(["train", "--hidden", "16", "--latent", "2", "--limit", "120",
                     "--batch-size", "32", "--epochs", "1", "--no-progress", "--out", str(vae)]) == 0
    capsys.readouterr()
    code, _, err = main(capsys, "train-prior", vae)
    assert code == 2 and "not a VQ-VAE" in err
    assert not prior_dir(vae).exists()


def _evaluated_with_a_stale_prior(run, capsys, why: str) -> dict:
    """npvae eval on a run whose prior is stale: it reports the VQ-VAE's numbers with the
    uniform prior's bound, says why on stderr and in eval.json, and exits 0."""
    code, _, err = main(capsys, "eval", run, "--k", "0")
    assert code == 0 and "not used" in err and why in err and "--overwrite" in err
    report = json.loads((run / "eval.json").read_text())
    assert report["prior"] == "uniform" and why in report["stale_prior"]
    assert "prior_nats" not in report
    assert math.isclose(report["nll_bound_uniform_prior"], report["recon"] + M * math.log(K))
    return report


def test_a_prior_of_another_shape_is_not_used(run, capsys):
    """A prior over M = 2 codes in the run of an M = 3 VQ-VAE: eval reports the uniform
    bound and says why; sample refuses it."""
    vq_ck = load_checkpoint(run)
    wrong = MADEPrior(num_codes=K, num_vectors=M - 1, hidden=(4,))
    save_checkpoint(prior_dir(run) / "checkpoint.npz", wrong, None, np.random.default_rng(0),
                    1, 1, [], {"vqvae": vqvae_identity(vq_ck)})
    _evaluated_with_a_stale_prior(run, capsys, f"M = {M - 1}")
    code, _, err = main(capsys, "sample", run, "--n", "4")
    assert code == 2 and f"M = {M - 1}" in err
    assert not list(run.glob("samples-seed*.png"))


def test_a_prior_of_an_older_vqvae_is_not_used(run, capsys):
    assert main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")[0] == 0
    assert main(capsys, "train", "--resume", run, "--epochs", "2", "--no-progress")[0] == 0
    code, _, err = main(capsys, "sample", run, "--n", "4")
    assert code == 2 and "has changed since" in err
    _evaluated_with_a_stale_prior(run, capsys, "has changed since")


def test_a_file_that_holds_no_prior_is_still_refused_by_eval(run, capsys):
    """Only a stale prior falls back to the uniform bound: a prior folder holding another
    kind of model is an error."""
    vq_ck = load_checkpoint(run)
    save_checkpoint(prior_dir(run) / "checkpoint.npz", vq_ck.model, None,
                    np.random.default_rng(0), 1, 1, [], {})
    code, _, err = main(capsys, "eval", run, "--k", "0")
    assert code == 2 and "not a prior over codes" in err
    assert not (run / "eval.json").exists()


def test_overwriting_a_vqvae_run_removes_its_prior_but_never_foreign_files(run, capsys):
    # the prior was fitted to the codes of the run being replaced: it goes with it
    assert main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")[0] == 0
    code, _, err = main(capsys, *VQ, "--epochs", "1", "--out", run)
    assert code == 2 and "--overwrite" in err and prior_dir(run).is_dir()
    assert main(capsys, *VQ, "--epochs", "1", "--out", run, "--overwrite")[0] == 0
    assert not prior_dir(run).exists() and (run / "checkpoint.npz").is_file()
    # a file npvae did not write inside prior/ makes it refuse, and nothing is deleted
    assert main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")[0] == 0
    (prior_dir(run) / "notes.txt").write_text("mine")
    code, _, err = main(capsys, *VQ, "--epochs", "1", "--out", run, "--overwrite")
    assert code == 2 and "prior" in err
    assert (prior_dir(run) / "notes.txt").read_text() == "mine"
    assert (prior_dir(run) / "checkpoint.npz").is_file() and (run / "checkpoint.npz").is_file()


def test_the_prior_folder_is_refused_with_the_way_to_its_run(run, capsys):
    assert main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")[0] == 0
    pdir = prior_dir(run)
    for argv in (["sample", pdir, "--n", "4"], ["eval", pdir], ["plot", pdir],
                 ["train", "--resume", pdir]):
        code, _, err = main(capsys, *argv)
        assert code == 2 and "Traceback" not in err, (argv, err)
        assert "learned prior of a VQ-VAE run" in err and str(run) in err, err


def test_overwriting_a_prior_that_cannot_be_made_keeps_the_old_prior(run, capsys, monkeypatch):
    assert main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")[0] == 0
    before = {p.name: p.read_bytes() for p in prior_dir(run).iterdir()}
    code, _, err = main(capsys, "train-prior", run, "--no-direct", "--hidden", "none",
                        "--overwrite", "--no-progress")  # refused with the options
    assert code == 2 and "--no-direct" in err

    def unavailable(*args, **kwargs):
        raise data.DataUnavailableError("could not load MNIST; every route failed")

    monkeypatch.setattr(data, "load", unavailable)  # refused once the data is read
    code, _, err = main(capsys, "train-prior", run, *PRIOR, "--overwrite")
    assert code == 2 and "could not load MNIST" in err
    assert {p.name: p.read_bytes() for p in prior_dir(run).iterdir()} == before


def test_the_direct_connection_is_chosen_by_the_rule_or_by_the_flag(run, capsys):
    """M K = 24 against 16 hidden units: the default keeps MADE's direct connection
    (576 weights against 808 on the hidden path); --no-direct leaves it out, is saved in the
    prior's checkpoint, cannot change on resume, and eval and sample use the saved prior."""
    code, _, err = main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")
    assert code == 0 and "with the direct connection" in err
    assert load_checkpoint(prior_dir(run)).model.direct

    code, _, err = main(capsys, "train-prior", run, *PRIOR, "--epochs", "1", "--overwrite",
                        "--no-direct")
    assert code == 0 and "without the direct connection" in err
    ck = load_checkpoint(prior_dir(run))
    assert ck.model.config["direct"] is False and ck.model.params["out.W"].shape == (16, M * K)
    assert ck.args["direct"] == "no"
    code, _, err = main(capsys, "train-prior", run, "--resume", "--epochs", "2", "--direct")
    assert code == 2 and "--direct cannot be changed" in err
    assert main(capsys, "train-prior", run, "--resume", "--epochs", "2", "--no-progress")[0] == 0
    assert not load_checkpoint(prior_dir(run)).model.direct
    assert main(capsys, "eval", run, "--k", "0")[0] == 0
    assert json.loads((run / "eval.json").read_text())["prior"] == "learned"
    assert main(capsys, "sample", run, "--n", "4")[0] == 0


def test_no_direct_without_hidden_layers_is_refused_and_writes_nothing(run, capsys):
    code, _, err = main(capsys, "train-prior", run, "--hidden", "none", "--no-direct",
                        "--no-progress")
    assert code == 2 and "--no-direct needs hidden layers" in err
    assert not prior_dir(run).exists()
    with pytest.raises(SystemExit) as info:
        cli.main(["train-prior", str(run), "--direct", "--no-direct"])
    assert info.value.code == 2


@pytest.mark.parametrize("bad", [0, 2.5, "3", True])
def test_uniform_code_samples_want_a_positive_integer_n(bad):
    vq = VQVAE(data_dim=6, hidden=(5,), num_codes=4, num_vectors=3, code_dim=2)
    assert sample_codes(vq, None, np.int64(2), np.random.default_rng(0)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"n must be a positive integer"):
        sample_codes(vq, None, bad, np.random.default_rng(0))


def test_resuming_a_vqvae_run_says_its_prior_must_be_fitted_again(run, capsys):
    """The prior no longer fits once the VQ-VAE trains on (sample refuses it, eval falls back):
    the resume says so before training, and its last line names the command to run."""
    assert main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")[0] == 0
    code, out, err = main(capsys, "train", "--resume", run, "--epochs", "2", "--no-progress")
    assert code == 0
    assert f"npvae train-prior {run} --overwrite" in err
    assert out.strip().splitlines()[-1].startswith(f"next: npvae train-prior {run} --overwrite")
    assert main(capsys, "train-prior", run, *PRIOR, "--epochs", "1", "--overwrite")[0] == 0
    assert main(capsys, "sample", run, "--n", "4")[0] == 0  # fitted again: accepted


def test_a_prior_of_one_code_is_refused_before_any_work(tmp_path, capsys):
    one = tmp_path / "one"
    assert main(capsys, *VQ, "--codes", "1", "--epochs", "1", "--out", one)[0] == 0
    code, _, err = main(capsys, "train-prior", one, *PRIOR, "--epochs", "1")
    assert code == 2 and "Traceback" not in err and "one code" in err
    assert not prior_dir(one).exists()


@pytest.mark.parametrize("what", ["file", "foreign"])
def test_train_prior_names_what_is_in_the_way_without_out(run, capsys, what):
    """train-prior has no --out: its refusals say what to move, not to choose an --out."""
    pdir = prior_dir(run)
    if what == "file":
        pdir.write_text("mine")
    else:
        pdir.mkdir()
        (pdir / "notes.txt").write_text("mine")
    code, _, err = main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")
    assert code == 2 and "--out" not in err and "move or delete" in err, err


def small_vq_and_prior(seed=0):
    vq = VQVAE(data_dim=12, hidden=[8], num_codes=K, code_dim=2, num_vectors=M,
               dtype=np.float64, rng=seed)
    prior = MADEPrior(num_codes=K, num_vectors=M, hidden=[6], dtype=np.float64, rng=seed + 1)
    return vq, prior


def test_evaluate_prior_s_numbers_recomputed_by_hand():
    """Every output of evaluate_prior from its definition (PRIOR.1, PRIOR.2): the sampled
    codes are the prior's own draws with the same generator, chunk by chunk."""
    vq, prior = small_vq_and_prior()
    x = np.random.default_rng(1).random((37, 12))
    recon, n = 5.25, 23  # n not a multiple of the chunk
    got = evaluate_prior(vq, prior, x, recon, np.random.default_rng(7), batch_size=10,
                         n_samples=n)
    # evaluate_prior assigns in batches of 10, this line all 37 rows at once: BLAS may round
    # the two differently (1e-16 seen), which cannot flip a code while the margin is clear
    assert vq.assignment_margin(x) > 1e-9
    nats = float(-prior.log_prob(vq.assign(x)).mean())
    uniform = M * math.log(K)
    rng = np.random.default_rng(7)
    drawn = np.concatenate([prior.sample(c, rng) for c in (10, 10, 3)])  # (n, M)
    counts = np.bincount(drawn.reshape(-1), minlength=K)
    p = counts[counts > 0] / counts.sum()
    assert got["prior_nats"] == pytest.approx(nats, rel=1e-12)
    assert got["nll_bound_learned_prior"] == pytest.approx(recon + nats, rel=1e-12)
    assert got["nll_bound_uniform_prior"] == pytest.approx(recon + uniform, rel=1e-12)
    assert got["elbo_learned_prior"] == pytest.approx(-(recon + nats), rel=1e-12)
    assert got["prior_gain_nats"] == pytest.approx(uniform - nats, rel=1e-12)
    assert got["prior_perplexity"] == pytest.approx(math.exp(nats / M), rel=1e-12)
    assert got["prior_samples"] == n
    assert got["prior_sample_used_fraction"] == pytest.approx((counts > 0).mean())
    assert got["prior_sample_perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_encode_codes_does_not_depend_on_the_batch_size():
    """The binarization noise is drawn batch after batch from one stream, so any batch size
    gives the codes of one sample of every image (each batch its own noise)."""
    vq, _ = small_vq_and_prior(3)
    images = np.random.default_rng(2).integers(0, 256, size=(50, 12), dtype=np.uint8)
    a = encode_codes(vq, images, "dynamic", np.random.default_rng(5), batch_size=7)
    b = encode_codes(vq, images, "dynamic", np.random.default_rng(5), batch_size=1000)
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(5)
    sample = (rng.random(images.shape) < images / 255.0).astype(np.float64)  # one stream
    assert vq.assignment_margin(sample) > 1e-9  # batch shapes change BLAS's rounding, not codes
    np.testing.assert_array_equal(a, vq.assign(sample))


def test_the_uniform_sampler_draws_every_code_equally():
    vq, _ = small_vq_and_prior()
    codes = sample_codes(vq, None, 4000, np.random.default_rng(8))  # (4000, M)
    counts = np.bincount(codes.reshape(-1), minlength=K)
    assert counts.size == K and counts.min() > 0
    expected = codes.size / K
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))  # five standard errors


def test_assignment_margin_against_sorted_distances():
    """The smallest gap between the nearest and second-nearest code, in squared distance,
    over all rows: brute force against the model's score-based margin."""
    vq, _ = small_vq_and_prior(4)
    x = np.random.default_rng(9).random((6, 12))
    rows = vq.encode(x).reshape(-1, 2)  # (R, Dz)
    E = vq.params["codebook"]
    d2 = ((rows[:, None, :] - E[None, :, :]) ** 2).sum(axis=2)  # (R, K)
    two = np.sort(d2, axis=1)[:, :2]
    assert vq.assignment_margin(x) == pytest.approx((two[:, 1] - two[:, 0]).min(), rel=1e-9)


def test_train_prior_refuses_a_checkpoint_file_of_another_name(run, tmp_path, capsys):
    """RUN/prior belongs to RUN/checkpoint.npz; a.npz beside it would share (and replace)
    that prior. Refused, with the way to give the checkpoint a folder of its own."""
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(run / "checkpoint.npz", two / "a.npz")
    code, _, err = main(capsys, "train-prior", two / "a.npz", *PRIOR, "--epochs", "1")
    assert code == 2 and "folder of its own" in err and "Traceback" not in err, err
    assert not prior_dir(two).exists()
    assert main(capsys, "train-prior", run / "checkpoint.npz", *PRIOR, "--epochs", "1")[0] == 0


def test_resuming_a_prior_with_no_more_epochs_trains_nothing_and_remakes_its_report(run, capsys):
    """It once said "continuing ... for 1 epochs". It trains nothing, says so, and makes the
    test numbers and the figure again (the way back after a stop during them)."""
    assert main(capsys, "train-prior", run, *PRIOR, "--epochs", "2")[0] == 0
    before = (prior_dir(run) / "checkpoint.npz").read_bytes()
    (prior_dir(run) / "samples.png").unlink()
    code, out, err = main(capsys, "train-prior", run, "--resume", "--epochs", "1", "--no-progress")
    assert code == 0 and "nothing to train" in err and "continuing" not in err, err
    assert "prior test cross-entropy" in out and (prior_dir(run) / "samples.png").is_file()
    assert (prior_dir(run) / "checkpoint.npz").read_bytes() == before


def test_the_prior_s_epoch_lines_name_log_p_of_the_codes(run, capsys):
    """A learned prior's validation value is the exact log p(c), not an ELBO."""
    code, out, _ = main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")
    assert code == 0
    line = next(l for l in out.splitlines() if l.startswith("epoch 1/1"))
    assert "val log p(c)" in line and "ELBO" not in line, line


def test_a_stop_while_the_prior_is_reported_says_how_to_finish_the_report(run, capsys,
                                                                          monkeypatch):
    from npvae import prior_cli

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prior_cli, "save_comparison", stopped)
    code, _, err = main(capsys, "train-prior", run, *PRIOR, "--epochs", "1")
    assert code != 0 and f"npvae train-prior {run} --resume" in err, err
    assert (prior_dir(run) / "checkpoint.npz").is_file()
    monkeypatch.undo()
    monkeypatch.setattr(data, "load", fake_load)
    assert main(capsys, "train-prior", run, "--resume", "--no-progress")[0] == 0
    assert (prior_dir(run) / "samples.png").is_file()
