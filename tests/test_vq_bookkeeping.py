"""The VQ-VAE's bookkeeping outside the gradient, as ``VQVAE.after_step`` wires it.

- the moving-average codebook (VQ.6): the decay weighs the old averages and (1 - decay)
  the new batch, and the result is written back into the model's codebook parameter;
- a dead-code restart (VQVAE.3) resets that code's moving averages to N_k = 1, S_k = e_k;
- ``steps_unused`` counts consecutive steps without a row choosing the code: it goes back
  to 0 whenever the code is used.

The expected values are computed here from the formulas, not with ``npvae.ops.vq``, so a
mistake in the wiring cannot be repeated by the reference.
"""
import numpy as np
import pytest

from npvae.models import VQVAE
from npvae.models.base import Forward, likelihood_backward


def small_vq(**kw):
    args = dict(data_dim=6, hidden=(5,), num_codes=4, code_dim=2, num_vectors=2,
                activation="tanh", dtype=np.float64, rng=0)
    args.update(kw)
    return VQVAE(**args)


def ema_by_hand(size, embed_sum, rows, idx, decay, eps, num_codes):
    """(VQ.6) written out with loops: returns (codebook, N, S)."""
    counts = np.zeros(num_codes)
    sums = np.zeros((num_codes, rows.shape[1]))
    for r, k in enumerate(idx):
        counts[k] += 1
        sums[k] += rows[r]
    new_size = decay * size + (1 - decay) * counts
    new_sum = decay * embed_sum + (1 - decay) * sums
    total = new_size.sum()
    smoothed = (new_size + eps) / (total + num_codes * eps) * total
    return new_sum / smoothed[:, None], new_size, new_sum


@pytest.mark.parametrize("decay", [0.9, 0.3])
def test_ema_after_step_applies_the_decay_and_writes_the_codebook_back(decay):
    """(VQ.6): after_step's codebook is the hand-made moving average with this decay,
    held in the parameter buffer (``params.flat``), and the averages are stored."""
    rng = np.random.default_rng(0)
    model = small_vq(ema=True, ema_decay=decay)
    x = rng.uniform(size=(7, 6))
    size0 = model.buffers["ema_cluster_size"].copy()
    sum0 = model.buffers["ema_embed_sum"].copy()
    before = model.params["codebook"].copy()

    fwd = model.forward(x)
    rows = model.encode(x).reshape(-1, 2)  # (R, Dz) the rows the step saw
    idx = model.assign(x).reshape(-1)  # (R,)
    model.after_step(fwd, rng)

    expected, size, embed_sum = ema_by_hand(size0, sum0, rows, idx, decay, 1e-5, 4)
    np.testing.assert_allclose(model.buffers["ema_cluster_size"], size, rtol=1e-12)
    np.testing.assert_allclose(model.buffers["ema_embed_sum"], embed_sum, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(model.params["codebook"], expected, rtol=1e-9, atol=1e-12)
    assert not np.allclose(model.params["codebook"], before)  # it did move
    # written into the flat buffer the optimizer and the checkpoint see, not a loose copy
    assert np.shares_memory(model.params["codebook"], model.params.flat)


def test_ema_decay_keeps_most_of_the_old_code():
    """With decay 0.99 a used code moves about 1% of the way toward its rows' mean, not 99%."""
    rng = np.random.default_rng(1)
    model = small_vq(ema=True, ema_decay=0.99, num_vectors=1, num_codes=2)
    x = rng.uniform(size=(6, 6))
    fwd = model.forward(x)
    rows = model.encode(x).reshape(-1, 2)
    idx = model.assign(x).reshape(-1)
    before = model.params["codebook"].copy()
    model.after_step(fwd, rng)
    k = np.bincount(idx).argmax()
    mean = rows[idx == k].mean(axis=0)
    moved = np.linalg.norm(model.params["codebook"][k] - before[k])
    gap = np.linalg.norm(mean - before[k])
    assert 0 < moved < 0.2 * gap  # a small step from the old code, far short of the mean


def test_without_ema_after_step_leaves_the_codebook_to_the_optimizer():
    rng = np.random.default_rng(2)
    model = small_vq(ema=False)
    x = rng.uniform(size=(5, 6))
    fwd = model.forward(x)
    before = model.params["codebook"].copy()
    model.after_step(fwd, rng)
    np.testing.assert_array_equal(model.params["codebook"], before)


def test_restart_resets_the_moving_averages_of_the_restarted_code_only():
    """(VQVAE.3): the restarted code gets N_k = 1 and S_k = its new value; the others keep
    the averages the EMA step gave them."""
    rng = np.random.default_rng(3)
    model = small_vq(ema=True, ema_decay=0.9, restart_after=1, num_vectors=1)
    model.params["codebook"][3] = 50.0  # never the nearest: dead at once
    model.buffers["ema_embed_sum"][3] = 50.0  # consistent with N_3 = 1
    x = rng.uniform(size=(8, 6))
    fwd = model.forward(x)
    rows = model.encode(x).reshape(-1, 2)
    idx = model.assign(x).reshape(-1)
    assert 3 not in idx
    size0 = model.buffers["ema_cluster_size"].copy()
    sum0 = model.buffers["ema_embed_sum"].copy()
    model.after_step(fwd, rng)

    new = model.params["codebook"][3]
    assert np.min(np.linalg.norm(rows - new, axis=1)) < 1e-2  # moved onto a batch row
    assert model.buffers["ema_cluster_size"][3] == 1.0
    np.testing.assert_array_equal(model.buffers["ema_embed_sum"][3], new)
    assert model.buffers["steps_unused"][3] == 0
    # the codes that were not restarted hold the EMA step's averages
    _, size, embed_sum = ema_by_hand(size0, sum0, rows, idx, 0.9, 1e-5, 4)
    dead = np.flatnonzero(np.bincount(idx, minlength=4) == 0)
    keep = [k for k in range(4) if k not in dead]
    np.testing.assert_allclose(model.buffers["ema_cluster_size"][keep], size[keep], rtol=1e-12)
    np.testing.assert_allclose(model.buffers["ema_embed_sum"][keep], embed_sum[keep], rtol=1e-12)


def test_a_restarted_code_stays_where_it_was_put_while_unused():
    """Consequence of the reset: the next EMA step leaves an unused restarted code (nearly)
    in place, instead of pulling it back toward its old averages at the far point."""
    rng = np.random.default_rng(4)
    model = small_vq(ema=True, ema_decay=0.5, restart_after=1, num_vectors=1)
    model.params["codebook"][3] = 50.0
    model.buffers["ema_embed_sum"][3] = 50.0
    x = rng.uniform(size=(8, 6))
    fwd = model.forward(x)
    model.after_step(fwd, rng)
    placed = model.params["codebook"].copy()
    # one more step in which code 3 is (artificially) not chosen
    rows = model.encode(x).reshape(-1, 2)
    model.config["restart_after"] = 0  # no second restart: look at the EMA alone
    model.after_step(chose(rows, np.zeros(rows.shape[0], dtype=np.int64)), rng)
    np.testing.assert_allclose(model.params["codebook"][3], placed[3], rtol=1e-3, atol=1e-4)


def assert_encoder_receives_dz_q(model, x) -> None:
    """(VQ.3): with beta = 0 the encoder's gradients are those of dz_q, the decoder-input
    gradient, sent through the encoder as it is. Bit for bit: the copy is exact."""
    assert model.config["beta"] == 0.0
    fwd = model.forward(x)
    grads = model.backward(fwd)
    s, n = fwd.saved, x.shape[0]
    by_hand = model.params.empty_like()
    dlogp = np.full(n, -1.0 / n, dtype=model.dtype)  # (N,)
    ddec = likelihood_backward(model.config["likelihood"], dlogp, s["lik"])  # (N, D)
    dzq = model._decoder_backward(ddec, s["dec"], by_hand)  # (N, M, Dz)
    assert dzq.any()
    model._encoder_backward(dzq, s["enc"], by_hand)
    encoder = [name for name in model.params if name.startswith("enc.")]
    assert encoder
    for name in encoder:
        np.testing.assert_array_equal(grads[name], by_hand[name], err_msg=name)


def test_the_encoder_receives_dz_q_itself():
    model = small_vq(beta=0.0, num_vectors=2)
    assert_encoder_receives_dz_q(model, np.random.default_rng(6).uniform(size=(5, 6)))


def chose(rows, idx) -> Forward:
    """A forward record in which the batch's encoder rows (R, Dz) chose the codes idx (R,):
    all that after_step reads."""
    return Forward(0.0, {}, dict(rows=rows, idx=idx))


def feed(model, idx, rng):
    """Run after_step as if the latest batch had chosen the codes ``idx``."""
    rows = rng.normal(size=(len(idx), model.Dz))
    model.after_step(chose(rows, np.asarray(idx, dtype=np.int64)), rng)
    return model.buffers["steps_unused"].copy()


def test_steps_unused_counts_consecutive_steps_and_resets_on_use():
    rng = np.random.default_rng(5)
    model = small_vq(num_codes=3)
    assert feed(model, [0, 0], rng).tolist() == [0, 1, 1]
    assert feed(model, [1, 1], rng).tolist() == [1, 0, 2]
    assert feed(model, [0, 1], rng).tolist() == [0, 0, 3]
    assert feed(model, [2, 2], rng).tolist() == [1, 1, 0]  # code 2 back: its count restarts
    assert feed(model, [1, 2], rng).tolist() == [2, 0, 0]


def test_a_code_used_now_and_then_is_never_restarted():
    """Used every other step, a code's count never reaches 2, so restart_after=2 spares it;
    a running total of unused steps would reach 2 and restart it."""
    rng = np.random.default_rng(6)
    model = small_vq(num_codes=2, restart_after=2)
    for step in range(6):
        before = model.params["codebook"][1].copy()
        feed(model, [0, 1] if step % 2 else [0, 0], rng)
        np.testing.assert_array_equal(model.params["codebook"][1], before)
        assert model.buffers["steps_unused"][1] <= 1
