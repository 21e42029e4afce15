"""Learning-rate schedules: Burda et al.'s stages, compression, and exact resume."""
import numpy as np
import pytest

from npvae import schedule
from npvae.checkpoint import CheckpointError, load_checkpoint
from npvae.models import build
from npvae.train import train

D = 36
CONFIG = dict(kind="vae-bernoulli", data_dim=D, hidden=[8], latent=2)
LOOP = dict(batch_size=16, lr=3e-3, binarize="dynamic", progress=False, verbose=False)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.random((64, D)).astype(np.float32), rng.random((16, D)).astype(np.float32)


def test_burda_schedule_is_the_papers():
    # 3^i epochs at 1e-3 * 10^(-i/7), i = 0..7: 3,280 epochs in all
    assert schedule.burda_stage_lengths(3280) == [1, 3, 9, 27, 81, 243, 729, 2187]
    starts = np.cumsum([0, 1, 3, 9, 27, 81, 243, 729])
    for i, start in enumerate(starts):
        for epoch in (start, start + 3**i - 1):
            assert schedule.lr_at("burda", 1e-3, int(epoch)) == pytest.approx(1e-3 * 10 ** (-i / 7))
    assert schedule.lr_at("burda", 1e-3, 5000) == pytest.approx(1e-3 * 10 ** (-1))
    assert schedule.adam_eps("burda") == 1e-4 and schedule.adam_eps("constant") == 1e-8
    assert schedule.lr_at("constant", 0.01, 123) == 0.01


@pytest.mark.parametrize("total", [8, 9, 50, 100, 333, 1000, 3279, 3281])
def test_a_compressed_schedule_keeps_eight_stages_in_proportion(total):
    lengths = schedule.burda_stage_lengths(total)
    assert len(lengths) == 8 and sum(lengths) == total and min(lengths) >= 1
    assert lengths == sorted(lengths)  # later stages are never shorter
    rates = [schedule.lr_at(f"burda:{total}", 1.0, e) for e in range(total)]
    assert len(set(rates)) == 8 and rates == sorted(rates, reverse=True)


@pytest.mark.parametrize("bad", ["", "linear", "burda:", "burda:x", "burda:7", "burda:-3"])
def test_unknown_or_too_short_schedules_are_refused(bad):
    with pytest.raises(ValueError, match="schedule"):
        schedule.parse(bad)


def test_each_epoch_trains_at_its_scheduled_rate_and_resume_is_exact(data, tmp_path):
    whole = build(CONFIG, rng=0)
    history = train(whole, *data, epochs=5, seed=2, run_dir=tmp_path / "a",
                    schedule="burda:8", **LOOP)
    assert [row["lr"] for row in history] == pytest.approx(
        [3e-3 * 10 ** (-i / 7) for i in range(5)])
    ck = load_checkpoint(tmp_path / "a")
    assert ck.optimizer_state["eps"] == pytest.approx(1e-4)  # the paper's Adam epsilon
    part = build(CONFIG, rng=0)
    train(part, *data, epochs=2, seed=2, run_dir=tmp_path / "b", schedule="burda:8", **LOOP)
    resumed = build(CONFIG, rng=0)
    train(resumed, *data, epochs=5, seed=2, run_dir=tmp_path / "b", resume_from=tmp_path / "b",
          schedule="burda:8", **LOOP)
    # the same code on the same machine, the same operations in the same order: exact
    np.testing.assert_array_equal(resumed.params.flat, whole.params.flat)


def test_resume_refuses_another_schedule(data, tmp_path):
    train(build(CONFIG, rng=0), *data, epochs=1, seed=2, run_dir=tmp_path, schedule="burda:8",
          **LOOP)
    with pytest.raises(CheckpointError, match="schedule"):
        train(build(CONFIG, rng=0), *data, epochs=2, seed=2, run_dir=tmp_path,
              resume_from=tmp_path, **LOOP)
