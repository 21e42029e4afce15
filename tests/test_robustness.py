"""Nothing lost, every failure a clear message.

Each class of failure a user can meet, on tiny fake data (no network):
- signals: SIGTERM and SIGHUP save the partial epoch, say so and exit with 128 + signum;
- two runs at once: the run-folder lock, and refusal to overwrite a run;
- temporary files of a killed writer are removed when a run starts;
- NaN or inf state is refused at save and at load;
- hostile or malformed files and arguments give one clear message, never a traceback.

Real signals and a real second process are used where the behaviour depends on them:
the training runs in a subprocess that loads the same fake data and sleeps a little in
every step, so that a signal lands in the middle of an epoch.
"""
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from npvae import cli, data
from npvae import checkpoint as ckpt
from npvae import train as train_mod
from npvae.checkpoint import CheckpointError, NonFiniteState, load_checkpoint, save_checkpoint
from npvae.models import build
from npvae.optim import Adam
from npvae.train import RunInUse, TrainingDiverged, run_lock, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "8", "--latent", "2", "--batch-size", "32", "--limit", "96", "--no-progress"]

# The command line in a child process, on the fake data below, 10 ms per training step.
CHILD = """
import sys, time
import numpy as np
from npvae import cli, data
from npvae.models.vae import VAE

def fake_load(dataset="mnist", split="train", data_dir=None, download=True, progress=None):
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = {"train": 300, "test": 60}[split]
    return (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n, dtype=np.uint8))

data.load = fake_load
original = VAE.forward

def slow(self, x, **kw):
    if kw.get("step") is not None:
        time.sleep(0.01)
    return original(self, x, **kw)

VAE.forward = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def fake_load(dataset="mnist", split="train", data_dir=None, download=True, progress=None):
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = {"train": 300, "test": 60}[split]
    return (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n, dtype=np.uint8))


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    monkeypatch.setattr(data, "load", fake_load)


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, status=2):
    assert code == status, err
    assert err.startswith("npvae: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def _default_signals():
    """In the child before it starts: Ctrl-C and hang-up at their default actions, whatever
    this test process inherited (under nohup, or in a background job, they arrive ignored,
    and npvae rightly leaves an ignored signal ignored)."""
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def start_child(*argv):
    """`npvae ARGV` in a child process (see CHILD); returns it once its first step is done."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", CHILD, *argv], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_default_signals)
    lines = []
    for line in child.stderr:  # blocks until the child speaks; it ends in "first step done"
        lines.append(line)
        if "first step done" in line:
            return child, lines
    child.wait(timeout=60)
    raise AssertionError(f"the child ended before its first step: {''.join(lines)}")


def finish(child, lines, timeout=60):
    """Wait for the child; returns (exit status, stdout, all of stderr)."""
    out, err = child.communicate(timeout=timeout)
    return child.returncode, out, "".join(lines) + err


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_save_the_partial_epoch_and_exit_128_plus_signum(
        capsys, tmp_path, signum, status):
    run = tmp_path / "run"
    child, lines = start_child("train", *TINY, "--limit", "300", "--batch-size", "4",
                               "--epochs", "50", "--out", str(run))
    child.send_signal(signum)
    code, _, err = finish(child, lines)
    name = signal.Signals(signum).name
    assert code == status, err
    # the signal lands inside an epoch (the child cannot finish 50 epochs first; on a
    # loaded machine it may be past the first one)
    assert f"stopped by {name}; the state in epoch " in err and "Traceback" not in err
    assert f"continue with: npvae train --resume {run}" in err
    ck = load_checkpoint(run)
    assert ck.epoch < 50 and ck.position is not None and 1 <= ck.position["batch"] < 75
    # the partial epoch is not lost: the run goes on from there
    code, out, err = run_cli(capsys, "train", "--resume", str(run), "--epochs",
                             str(ck.epoch + 1), "--no-progress")
    assert code == 0, err
    assert load_checkpoint(run).epoch == ck.epoch + 1


def test_ctrl_c_is_still_130(capsys, tmp_path):
    run = tmp_path / "run"
    child, lines = start_child("train", *TINY, "--limit", "300", "--batch-size", "4",
                               "--epochs", "50", "--out", str(run))
    child.send_signal(signal.SIGINT)
    code, _, err = finish(child, lines)
    assert code == 130 and "stopped by Ctrl-C; the state in epoch " in err, err


def test_ctrl_c_inside_a_compiled_kernel_exits_130(capsys, tmp_path, monkeypatch):
    """Numba turns a KeyboardInterrupt in its dispatcher into a SystemError."""
    from npvae import evaluate

    def interrupted_in_dispatcher(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise SystemError("<function> returned a result with an exception set") from exc

    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))[0] == 0
    monkeypatch.setattr(evaluate, "evaluate_all", interrupted_in_dispatcher)
    code, _, err = run_cli(capsys, "eval", str(run), "--k", "2")
    assert code == 130 and err.strip() == "npvae: interrupted", err


# ----------------------------------------------------------------------------- two runs at once


def test_a_second_train_into_a_running_run_refuses_at_once(capsys, tmp_path):
    run = tmp_path / "run"
    child, lines = start_child("train", *TINY, "--limit", "300", "--batch-size", "4",
                               "--epochs", "50", "--out", str(run))
    try:
        for argv in (["train", *TINY, "--out", str(run), "--overwrite"],
                     ["train", "--resume", str(run)], ["eval", str(run)], ["plot", str(run)],
                     ["sample", str(run)]):
            code, _, err = run_cli(capsys, *argv)
            one_line_error(code, err)
            assert f"{run} is in use: another npvae process" in err
        # at once: had a command waited for the lock, it would have blocked until the
        # child's 50 epochs were over and then found the run free, not refused it
    finally:
        child.send_signal(signal.SIGTERM)
        code, _, err = finish(child, lines)
    assert code == 143, err


def test_a_killed_process_does_not_leave_the_run_locked(tmp_path):
    run = tmp_path / "run"
    code = (f"import time; from npvae.train import run_lock\n"
            f"with run_lock({str(run)!r}):\n    print('locked', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(RunInUse):
        with run_lock(run):
            pass
    child.kill()  # kill -9: no chance to clean up
    child.wait(timeout=30)
    with run_lock(run):  # the kernel released the lock with the process
        pass



def test_another_thread_of_the_process_cannot_take_a_held_run(tmp_path):
    # the lock is re-entrant for the thread that holds it, not for the whole process: two
    # threads training into one folder interleaved their metrics and overwrote each
    # other's checkpoint
    import threading

    run = tmp_path / "run"
    inside, done, seen = threading.Event(), threading.Event(), []

    def hold():
        with run_lock(run):
            with run_lock(run):  # re-entrant in its own thread
                inside.set()
                done.wait(10)

    def try_it():
        try:
            with run_lock(run):
                seen.append("entered")
        except RunInUse as exc:
            seen.append(str(exc))

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(10)
        other = threading.Thread(target=try_it)
        other.start()
        other.join(10)
    finally:
        done.set()
        holder.join(10)
    assert len(seen) == 1 and "another thread of this process" in seen[0]
    with run_lock(run):  # free again once the holder left
        pass

def test_out_naming_an_existing_run_is_refused_unless_overwrite(capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))[0] == 0
    assert (run / "manifold.png").exists()  # a 2-D latent space draws the manifold
    before = (run / "checkpoint.npz").read_bytes()
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))
    one_line_error(code, err)
    assert "already holds a run" in err and f"npvae train --resume {run}" in err
    assert "--overwrite" in err
    assert (run / "checkpoint.npz").read_bytes() == before

    # --overwrite replaces the run: nothing of the old one stays behind
    code, _, err = run_cli(capsys, "train", "--model", "vqvae", "--hidden", "8", "--codes", "4",
                           "--code-dim", "2", "--code-vectors", "2", "--batch-size", "32",
                           "--limit", "96", "--no-progress", "--epochs", "1", "--out", str(run),
                           "--overwrite")
    assert code == 0, err
    assert not (run / "manifold.png").exists()
    assert load_checkpoint(run).model.config["kind"] == "vqvae"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_overwrite_never_deletes_files_npvae_did_not_write(capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))[0] == 0
    (run / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run),
                           "--overwrite")
    one_line_error(code, err)
    assert "not part of an npvae run (notes.txt)" in err
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoint.npz").exists()
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--overwrite")
    one_line_error(code, err)
    assert "exclude each other" in err


# ----------------------------------------------------------------------------- temporary files

LEFTOVERS = [".checkpoint.npz.k3j_x9q2.tmp", ".eval.json.a1b2c3d4.tmp",
             ".metrics.jsonl.zz99yy88.tmp", ".loss_curves.png.qwerty12.tmp"]


def small_data(n=64, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, d)).astype(np.float32), rng.random((16, d)).astype(np.float32)


SMALL = dict(kind="vae-bernoulli", data_dim=16, hidden=[8], latent=2)
LOOP = dict(batch_size=16, lr=1e-3, binarize="dynamic", progress=False, verbose=False)


def test_stale_temporary_files_are_removed_when_a_run_starts_or_resumes(tmp_path):
    for name in LEFTOVERS:
        (tmp_path / name).write_bytes(b"left by kill -9")
    (tmp_path / ".my-own.tmp").write_text("not ours")
    train(build(SMALL, rng=0), *small_data(), epochs=1, run_dir=tmp_path, **LOOP)
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & set(LEFTOVERS)
    assert ".my-own.tmp" in names
    (tmp_path / LEFTOVERS[0]).write_bytes(b"again")
    train(build(SMALL, rng=0), *small_data(), epochs=2, run_dir=tmp_path, resume_from=tmp_path,
          **LOOP)
    assert not (tmp_path / LEFTOVERS[0]).exists()


def test_a_live_writers_temporary_file_is_never_removed(tmp_path):
    """Clean-up happens under the lock: while another process holds it, nothing is touched."""
    live = tmp_path / LEFTOVERS[0]
    live.write_bytes(b"being written")
    code = (f"import time; from npvae.train import run_lock\n"
            f"with run_lock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUse):
            train(build(SMALL, rng=0), *small_data(), epochs=1, run_dir=tmp_path, **LOOP)
        assert live.read_bytes() == b"being written"
    finally:
        child.kill()
        child.wait(timeout=30)


# ----------------------------------------------------------------------------- non-finite state


def adam_state(config=SMALL):
    model = build(config, rng=0)
    opt = Adam(model.params, lr=1e-2)
    x = np.random.default_rng(0).random((8, config["data_dim"])).astype(np.float32)
    _, grads, _ = model.loss_and_grads(x, rng=np.random.default_rng(1))
    opt.step(grads)
    return model, opt, np.random.default_rng(2)


@pytest.mark.parametrize("where", ["param", "optim", "buffer"])
def test_save_refuses_non_finite_state_and_keeps_the_previous_file(tmp_path, where):
    config = SMALL if where != "buffer" else dict(
        kind="vqvae", data_dim=16, hidden=[8], num_codes=4, code_dim=2, num_vectors=2,
        ema=True, likelihood="bernoulli")
    model, opt, rng = adam_state(config)
    path = save_checkpoint(tmp_path / "checkpoint.npz", model, opt, rng, 1, 1, [], {})
    before = path.read_bytes()
    if where == "param":
        model.params["dec.0.W"][0, 1] = np.nan
        expected = "parameter dec.0.W holds nan at index (0, 1)"
    elif where == "optim":
        opt.state_dict = lambda: {**Adam.state_dict(opt), "m": np.array([0.0, np.inf])}
        expected = "optimizer state m holds inf at index (1,)"
    else:
        model.buffers["ema_embed_sum"][2, 0] = -np.inf
        expected = "model buffer ema_embed_sum holds -inf at index (2, 0)"
    with pytest.raises(NonFiniteState) as info:
        save_checkpoint(path, model, opt, rng, 2, 2, [], {})
    assert expected in str(info.value) and "previous checkpoint is kept" in str(info.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # and no temporary file


def rewrite(path, **replace):
    with np.load(path, allow_pickle=False) as npz:
        members = {k: npz[k] for k in npz.files}
    members.update(replace)
    with open(path, "wb") as fh:
        np.savez(fh, **members)


def test_load_checks_the_optimizer_state(tmp_path):
    model, opt, rng = adam_state()
    path = save_checkpoint(tmp_path / "checkpoint.npz", model, opt, rng, 1, 1, [], {})
    with np.load(path) as npz:
        key = next(k for k in npz.files if k.startswith("optim/m"))
        m = npz[key].copy()
    m.flat[0] = np.nan
    rewrite(path, **{key: m})
    with pytest.raises(CheckpointError, match=rf"optimizer state {key[6:]} holds nan at index"):
        load_checkpoint(path)


def test_parameters_that_turn_nan_unseen_stop_training_and_are_not_saved(tmp_path):
    """A NaN the loss does not show (as a compiled kernel that hides NaN would) is caught at save."""
    x, xv = small_data()
    train(build(SMALL, rng=0), x, xv, epochs=1, run_dir=tmp_path, **LOOP)
    good = (tmp_path / "checkpoint.npz").read_bytes()
    model = build(SMALL, rng=0)
    original = model.forward

    def poisoned(x, **kw):
        result = original(x, **kw)
        if kw.get("step") == 7:  # the last step of epoch 2, after its loss was computed
            model.params["enc.0.b"][0] = np.nan
        return result

    model.forward = poisoned
    with pytest.raises(TrainingDiverged) as info:
        train(model, x, xv, epochs=2, run_dir=tmp_path, resume_from=tmp_path, **LOOP)
    message = str(info.value)
    assert "at the end of epoch 2" in message and "parameter enc.0.b holds nan" in message
    assert "was not saved" in message and "--resume" in message and "--lr" in message
    assert (tmp_path / "checkpoint.npz").read_bytes() == good


def test_a_run_that_diverges_in_its_first_epoch_leaves_no_empty_metrics(tmp_path):
    model = build(SMALL, rng=0)
    original = model.forward

    def nan_at_step_2(x, **kw):
        fwd = original(x, **kw)
        return fwd._replace(loss=float("nan")) if kw.get("step") == 2 else fwd

    model.forward = nan_at_step_2
    with pytest.raises(TrainingDiverged, match="no checkpoint had been saved yet"):
        train(model, *small_data(), epochs=2, run_dir=tmp_path, **LOOP)
    assert list(tmp_path.iterdir()) == []  # neither a checkpoint nor an empty metrics.jsonl


def test_a_real_divergence_is_one_message_not_a_stream_of_warnings(tmp_path):
    model = build(SMALL, rng=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TrainingDiverged, match="smaller learning rate"):
            train(model, *small_data(), epochs=2, run_dir=tmp_path, **{**LOOP, "lr": 1e4})
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_the_divergence_advice_can_be_followed(capsys, tmp_path, monkeypatch):
    """The message advises --resume with --lr or --clip; the command line accepts that."""
    from npvae.models.vae import VAE

    original = VAE.forward

    def nan_at_step_4(self, x, **kw):
        fwd = original(self, x, **kw)
        return fwd._replace(loss=float("nan")) if kw.get("step") == 4 else fwd

    run = tmp_path / "run"
    monkeypatch.setattr(VAE, "forward", nan_at_step_4)
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "2", "--out", str(run))
    assert code == 1 and f"npvae train --resume {run} --lr LR --clip NORM" in err, err
    monkeypatch.setattr(VAE, "forward", original)
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--lr", "0.0005", "--clip",
                           "10", "--no-progress")
    assert code == 0, err
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == 0.0005


def test_the_divergence_advice_after_a_resume_that_raised_epochs_keeps_them(capsys, tmp_path,
                                                                           monkeypatch):
    """The kept checkpoint was saved for fewer epochs: the advice names --epochs too."""
    from npvae.models.vae import VAE

    original = VAE.forward
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))
    assert code == 0, err
    monkeypatch.setattr(VAE, "forward", lambda self, x, **kw: original(self, x, **kw)._replace(
        loss=float("nan")) if kw.get("step") == 4 else original(self, x, **kw))
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "3", "--no-progress")
    assert code == 1 and f"npvae train --resume {run} --epochs 3 --lr LR --clip NORM" in err, err
    monkeypatch.setattr(VAE, "forward", original)
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--epochs", "3", "--lr",
                           "0.0005", "--no-progress")
    assert code == 0, err
    assert load_checkpoint(run).epoch == 3


# ----------------------------------------------------------------------------- hostile files


@pytest.mark.parametrize("content", [b"plain text", b"\x93NUMPY npy file", b"\x80\x04pickle"])
def test_a_file_that_is_not_an_npz_never_suggests_unsafe_loading(tmp_path, content):
    path = tmp_path / "checkpoint.npz"
    if content.startswith(b"\x93NUMPY"):
        np.save(path.with_suffix(".npy"), np.zeros(3))
        path.with_suffix(".npy").rename(path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not an .npz archive") as info:
        load_checkpoint(path)
    assert "allow_pickle" not in str(info.value) and "unsafe" not in str(info.value)


def test_a_pickled_member_never_suggests_unsafe_loading(tmp_path):
    model, opt, rng = adam_state()
    path = save_checkpoint(tmp_path / "checkpoint.npz", model, opt, rng, 1, 1, [], {})
    rewrite(path, history=np.array([{"epoch": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled") as info:
        load_checkpoint(path)
    assert "allow_pickle" not in str(info.value)


def test_a_config_far_larger_than_the_file_is_a_checkpoint_error(tmp_path):
    model, opt, rng = adam_state()
    path = save_checkpoint(tmp_path / "checkpoint.npz", model, opt, rng, 1, 1, [], {})
    for hidden in ([1e9], [10**9]):
        rewrite(path, config=np.array(json.dumps({**model.config, "hidden": hidden})))
        with pytest.raises(CheckpointError, match=r"config calls for 40,000,000,020 parameters "
                                                  r"but the file holds 340"):
            load_checkpoint(path)


@pytest.mark.parametrize("position, problem", [
    ({"batch": 2}, "lacks epoch_rng, sums, seen, seconds"),
    ({"batch": -1, "epoch_rng": {}, "sums": {}, "seen": 0, "seconds": 0},
     "batch and seen must be integers >= 0; epoch_rng must be a numpy bit generator state"),
    ([1, 2], "must be null or a JSON object"),
    ({"batch": 1, "epoch_rng": np.random.default_rng(0).bit_generator.state, "sums": {},
      "seen": 1, "seconds": 0, "changed": [1]}, "changed must be a JSON object"),
])
def test_a_malformed_position_is_named(tmp_path, position, problem):
    model, opt, rng = adam_state()
    path = save_checkpoint(tmp_path / "checkpoint.npz", model, opt, rng, 1, 1, [], {})
    rewrite(path, position=np.array(json.dumps(position)))
    with pytest.raises(CheckpointError, match="member 'position'") as info:
        load_checkpoint(path)
    assert problem in str(info.value)


# ----------------------------------------------------------------------------- clear messages


def test_a_model_too_large_for_memory_is_refused_before_allocating(capsys, tmp_path,
                                                                   monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before its size was checked")

    monkeypatch.setattr("npvae.models.build", must_not_build)
    code, _, err = run_cli(capsys, "train", *TINY, "--hidden", "1000000000", "--out",
                           str(tmp_path / "run"))
    one_line_error(code, err)
    assert "this model has 1,576,000,000,788 parameters" in err and "choose smaller --hidden" in err


def test_out_of_memory_is_a_message(capsys, tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(cli, "check_model_size", lambda *args: None)
    monkeypatch.setattr("npvae.models.build", no_memory)
    code, _, err = run_cli(capsys, "train", *TINY, "--out", str(tmp_path / "run"))
    one_line_error(code, err, status=1)
    assert "out of memory" in err and "--hidden" in err
    # each command names its own options to make smaller
    monkeypatch.setattr("npvae.tour.tour_model", no_memory)
    code, _, err = run_cli(capsys, "gradcheck", "ae", "--batch", "100000000")
    one_line_error(code, err, status=1)
    assert "out of memory" in err and "--batch" in err and "--hidden" not in err


def test_an_unknown_backend_in_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("NPVAE_BACKEND", "foo")
    code, _, err = run_cli(capsys, "gradcheck", "ae")
    one_line_error(code, err)
    assert "NPVAE_BACKEND must be one of ('numba', 'numpy'), got 'foo'" in err


def test_import_survives_an_unknown_backend():
    env = dict(os.environ, NPVAE_BACKEND="foo", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "npvae", "gradcheck", "ae"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("npvae: error: NPVAE_BACKEND must be one of")


def test_val_larger_than_half_the_data_is_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *TINY, "--val", "200", "--out", str(tmp_path / "r"))
    one_line_error(code, err)
    assert "--val 200" in err and "at most 150" in err
    assert not (tmp_path / "r" / "checkpoint.npz").exists()


def test_sample_refuses_an_unreadable_number_of_samples(capsys, tmp_path):
    code, _, err = run_cli(capsys, "sample", str(tmp_path), "--n", "100000")
    one_line_error(code, err)
    assert "at most 400" in err
    assert list(tmp_path.iterdir()) == []


def test_eval_json_is_written_atomically(capsys, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))[0] == 0
    (run / "eval.json").write_text('{"old": true}\n')

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", disk_full)
    code, _, err = run_cli(capsys, "eval", str(run), "--k", "0")
    one_line_error(code, err, status=1)
    assert json.loads((run / "eval.json").read_text()) == {"old": True}  # never half a file
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_an_unwritable_run_folder_fails_before_training(capsys, tmp_path, monkeypatch):
    """Checked up front, not after the first epoch (root ignores permissions: simulate)."""
    import tempfile

    real = tempfile.mkstemp

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    run = tmp_path / "run"
    run.mkdir()
    steps = []
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    from npvae.models.vae import VAE

    original = VAE.forward
    monkeypatch.setattr(VAE, "forward", lambda self, x, **kw: steps.append(1) or
                        original(self, x, **kw))
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(run))
    one_line_error(code, err, status=1)
    assert f"cannot write into the run directory {run}" in err and steps == []
    monkeypatch.setattr(tempfile, "mkstemp", real)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_fails_before_training(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="cannot write into the run directory"):
            train(build(SMALL, rng=0), *small_data(), epochs=1, run_dir=run, **LOOP)
    finally:
        run.chmod(0o755)


def test_an_ignored_hang_up_stays_ignored_as_under_nohup():
    from npvae.runs import stop_on_signals

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup leaves
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with stop_on_signals():  # at its default action, it becomes a clean stop
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # restored on exit
    finally:
        signal.signal(signal.SIGHUP, before)


# ----------------------------------------------------------------------------------
# train() from Python: its arguments and data are checked before any work, and it never
# silently replaces another run


def test_train_refuses_a_folder_holding_a_run_unless_told(tmp_path):
    x, xv = small_data()
    train(build(SMALL, rng=0), x, xv, epochs=2, run_dir=tmp_path, **LOOP)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="already holds a run.*resume_from.*overwrite=True"):
        train(build(SMALL, rng=1), x, xv, epochs=1, run_dir=tmp_path, **LOOP)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    history = train(build(SMALL, rng=1), x, xv, epochs=1, run_dir=tmp_path, overwrite=True, **LOOP)
    assert [r["epoch"] for r in history] == [1] and load_checkpoint(tmp_path).epoch == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_overwrite_removes_the_old_run_whole_before_the_first_step(tmp_path):
    """A new run that fails at once leaves no checkpoint of the old one called its own."""
    x, xv = small_data()
    train(build(SMALL, rng=0), x, xv, epochs=2, run_dir=tmp_path, **LOOP)
    (tmp_path / "samples.png").write_bytes(b"old figure")
    (tmp_path / "notes.txt").write_text("mine")
    model = build({**SMALL, "hidden": [4]}, rng=0)
    original = model.forward
    model.forward = lambda xb, **kw: original(xb, **kw)._replace(loss=float("nan"))
    with pytest.raises(TrainingDiverged, match="no checkpoint had been saved yet"):
        train(model, x, xv, epochs=2, run_dir=tmp_path, overwrite=True, **LOOP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_from_another_run_into_a_folder_holding_a_run_is_refused(tmp_path):
    x, xv = small_data()
    a, b = tmp_path / "a", tmp_path / "b"
    train(build(SMALL, rng=0), x, xv, epochs=1, run_dir=a, **LOOP)
    train(build(SMALL, rng=1), x, xv, epochs=3, seed=1, run_dir=b, **LOOP)
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    for source in (a, a / "checkpoint.npz", load_checkpoint(a)):
        with pytest.raises(ValueError, match="b already holds a run.*another checkpoint.*"
                                             "overwrite=True.*new or empty run_dir"):
            train(build(SMALL, rng=0), x, xv, epochs=2, run_dir=b, resume_from=source, **LOOP)
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before
    # into a new folder, a run may branch off from another one
    history = train(build(SMALL, rng=0), x, xv, epochs=2, run_dir=tmp_path / "c",
                    resume_from=a, **LOOP)
    assert [r["epoch"] for r in history] == [1, 2]


def test_a_stale_checkpoint_object_does_not_roll_the_run_back(tmp_path):
    x, xv = small_data()
    train(build(SMALL, rng=0), x, xv, epochs=1, run_dir=tmp_path, **LOOP)
    ck = load_checkpoint(tmp_path)
    train(build(SMALL, rng=0), x, xv, epochs=2, run_dir=tmp_path, resume_from=ck, **LOOP)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"as loaded at step 4 \(epoch 1\).*step 8 \(epoch 2\)"
                                         r".*roll the run back"):
        train(build(SMALL, rng=0), x, xv, epochs=3, run_dir=tmp_path, resume_from=ck, **LOOP)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    history = train(build(SMALL, rng=0), x, xv, epochs=3, run_dir=tmp_path,
                    resume_from=load_checkpoint(tmp_path), **LOOP)
    assert [r["epoch"] for r in history] == [1, 2, 3]


@pytest.mark.parametrize("where", ["x_train", "x_val"])
def test_bad_data_values_are_named_by_array_and_row_before_any_step(tmp_path, where):
    x, xv = small_data()
    x, xv = x.astype(np.float32), xv.astype(np.float32)
    bad = x if where == "x_train" else xv
    row = len(bad) - 1
    bad[row, 5] = np.nan
    run = tmp_path / "run"
    steps = []
    with pytest.raises(ValueError, match=rf"{where} must be finite.*index \({row}, 5\)"):
        train(build(SMALL, rng=0), x, xv, epochs=2, run_dir=run,
              on_first_step=lambda: steps.append(1), **LOOP)
    bad[row, 5] = 1.5  # outside [0, 1] for a Bernoulli decoder
    with pytest.raises(ValueError, match=rf"{where} must lie in \[0, 1\]"):
        train(build(SMALL, rng=0), x, xv, epochs=2, run_dir=run, **LOOP)
    assert steps == [] and not run.exists()


@pytest.mark.parametrize("change, words", [
    (dict(epochs=2.0), "epochs must be an integer"), (dict(batch_size=16.0), "batch_size"),
    (dict(log_every=0), "log_every"), (dict(seed=None), "seed"), (dict(seed=-1), "seed"),
    (dict(lr="a"), "lr"), (dict(clip=0.0), "clip"), (dict(args={"a": object()}), "args"),
    (dict(run_dir=None), "run_dir"),
])
def test_train_names_a_bad_argument_and_makes_no_folder(tmp_path, monkeypatch, change, words):
    monkeypatch.chdir(tmp_path)
    kwargs = {**LOOP, "epochs": 1, "run_dir": "run", **change}
    with pytest.raises(ValueError, match=words):
        train(build(SMALL, rng=0), *small_data(), **kwargs)
    assert list(tmp_path.iterdir()) == []
