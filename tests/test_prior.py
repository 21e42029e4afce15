"""The learned prior over VQ-VAE codes: its two op pairs, the MADE model, and training it.

Gradients: float64, central differences (GC.4) against a random upstream gradient (GC.2),
relative error at most 1e-6, over Hypothesis-drawn shapes and values. Forward values are
checked against independent references (a naive softmax, a brute-force sum over every
code sequence), because a gradient check cannot see a wrong forward pass.
"""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npvae import evaluate
from npvae.gradcheck import check_model, check_op
from npvae.models import MADEPrior, build
from npvae.models.prior import made_masks
from npvae.ops.masked import masked_linear_backward, masked_linear_forward
from npvae.ops.softmax import softmax_xent_backward, softmax_xent_forward

from strategies import batch, dim, seeds

TOL = 1e-6


def assert_close(errors):
    assert errors and max(errors.values()) <= TOL, errors


# ----------------------------------------------------------------------------- op pairs


@given(batch, dim, dim, seeds, st.floats(0.0, 1.0))
def test_masked_linear_gradients(n, i, o, seed, density):
    rng = np.random.default_rng(seed)
    x, W, b = rng.normal(size=(n, i)), rng.normal(size=(i, o)), rng.normal(size=o)
    mask = (rng.random((i, o)) < density).astype(np.float64)
    assert_close(check_op(masked_linear_forward, masked_linear_backward, [x, W, mask, b],
                          wrt=[0, 1, 3], rng=rng))


@given(batch, dim, dim, seeds)
def test_masked_linear_is_linear_with_the_masked_weights(n, i, o, seed):
    """Forward equals the ordinary layer with W * mask; masked entries get exactly 0 gradient."""
    rng = np.random.default_rng(seed)
    x, W, b = rng.normal(size=(n, i)), rng.normal(size=(i, o)), rng.normal(size=o)
    mask = (rng.random((i, o)) < 0.5).astype(np.float64)
    out, cache = masked_linear_forward(x, W, mask, b)
    np.testing.assert_allclose(out, x @ (W * mask) + b, rtol=1e-12, atol=1e-12)
    dx, dW, dmask, db = masked_linear_backward(rng.normal(size=(n, o)), cache)
    assert dmask is None  # a constant: no gradient
    assert np.all(dW[mask == 0] == 0.0)


@given(n=batch, m=st.integers(1, 5), k=st.integers(1, 9), seed=seeds, scale=st.floats(0.1, 20.0))
def test_softmax_xent_gradients(n, m, k, seed, scale):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, m, k)) * scale
    target = rng.integers(k, size=(n, m))
    errors = check_op(softmax_xent_forward, softmax_xent_backward, [logits, target], wrt=[0], rng=rng)
    assert_close(errors)


@given(n=batch, k=st.integers(1, 9), seed=seeds)
def test_softmax_xent_value_matches_the_naive_formula(n, k, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 3
    target = rng.integers(k, size=n)
    loss, cache = softmax_xent_forward(logits, target)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # naive: fine at this scale
    # -log(p) of a p near 1 is only as good as p's rounding, about 1e-16 absolute
    np.testing.assert_allclose(loss, -np.log(p[np.arange(n), target]), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(cache.probs, p, rtol=1e-12)


@given(st.floats(-40.0, 40.0), st.floats(-5.0, 5.0))
def test_softmax_xent_of_two_classes_is_a_softplus(d, base):
    """With two classes the loss of class 0 is softplus(l_1 - l_0) = log1p(exp(d)): to full
    relative precision even when it is tiny (a confident, correct prediction)."""
    logits = np.array([[base, base + d]])
    loss, _ = softmax_xent_forward(logits, np.array([0]))
    want = np.log1p(np.exp(d)) if d < 0 else d + np.log1p(np.exp(-d))
    # d itself is rounded when base + d is formed: up to 1e-16 (|base| + |d|) of it
    np.testing.assert_allclose(loss[0], want, rtol=1e-13 + 4e-16 * (abs(base) + abs(d)))


def test_softmax_xent_is_stable_for_huge_logits():
    """exp(1000) overflows; the shifted form (XENT.1) does not, in float32 or float64."""
    for dtype in (np.float32, np.float64):
        logits = np.array([[1000.0, 0.0, -1000.0], [-1000.0, -1000.0, -999.0]], dtype=dtype)
        loss, cache = softmax_xent_forward(logits, np.array([1, 2]))
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(cache.probs))
        np.testing.assert_allclose(loss, [1000.0, np.log(1 + 2 * np.exp(-1.0))], rtol=1e-6)
        dlogits, dtarget = softmax_xent_backward(np.ones(2, dtype), cache)
        assert dtarget is None and np.all(np.isfinite(dlogits))
        np.testing.assert_allclose(dlogits.sum(axis=1), 0.0, atol=1e-6)  # p sums to 1


def test_softmax_xent_refuses_bad_targets():
    logits = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"target must lie in \[0, 3\)"):
        softmax_xent_forward(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match="target must have shape"):
        softmax_xent_forward(logits, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        softmax_xent_forward(logits, np.array([0.0, 1.0]))


# ----------------------------------------------------------------------------- the model


def small_prior(K=3, M=4, hidden=(7, 6), activation="tanh", seed=0):
    """A float64 prior with every unmasked weight and bias drawn at random."""
    rng = np.random.default_rng(seed)
    model = MADEPrior(num_codes=K, num_vectors=M, hidden=hidden, activation=activation,
                      dtype=np.float64, rng=seed)
    model.params.flat[...] = rng.normal(size=model.params.flat.size) * 0.5
    names = [f"hid.{i}.W" for i in range(len(hidden))] + ["out.W"]
    for name, mask in zip(names, model.masks):
        model.params[name] = model.params[name] * mask
    return model


@given(K=st.integers(2, 4), M=st.integers(1, 5),
       hidden=st.lists(st.integers(1, 6), max_size=2), seed=seeds, n=st.integers(1, 5))
def test_prior_gradients(K, M, hidden, seed, n):
    model = small_prior(K, M, tuple(hidden), "tanh", seed)
    idx = np.random.default_rng(seed + 1).integers(K, size=(n, M))
    for row in check_model(model, model.one_hot(idx)):
        assert row.rel_error <= TOL, row


@pytest.mark.parametrize("M, hidden", [(4, (7, 6)), (1, (3,)), (49, (60,)), (5, ())])
def test_masks_are_autoregressive(M, hidden):
    """Changing code m leaves the logits of positions <= m unchanged, and changes later ones."""
    K = 3
    model = small_prior(K, M, hidden, "tanh", seed=M)
    rng = np.random.default_rng(0)
    idx = rng.integers(K, size=(6, M))
    base = model.conditional_logits(idx)
    for m in range(M):
        changed = idx.copy()
        changed[:, m] = (changed[:, m] + 1) % K
        diff = np.abs(model.conditional_logits(changed) - base).max(axis=(0, 2))  # (M,)
        assert np.all(diff[: m + 1] == 0.0), (m, diff)  # exactly: masked weights are zeros
        if m + 1 < M and M <= 5:
            assert np.all(diff[m + 1:] > 0), (m, diff)  # later positions do see code m


def test_masks_by_degree():
    """The output of position m connects to inputs of positions < m only (MADE.2)."""
    K, M = 2, 3
    masks = made_masks(M, K, hidden=())  # no hidden layer: the direct path alone
    expected = np.kron(np.triu(np.ones((M, M)), 1), np.ones((K, K)))  # row block i -> column block j > i
    np.testing.assert_array_equal(masks[0], expected)


def test_prior_is_a_normalised_distribution():
    """Brute force: p(c) summed over all K^M sequences is 1, and the loss is -mean log p(c)."""
    K, M = 3, 3
    model = small_prior(K, M, (5,), "relu", seed=2)
    every = np.array(list(itertools.product(range(K), repeat=M)))
    logp = model.log_prob(every)
    assert math.isclose(np.exp(logp).sum(), 1.0, rel_tol=1e-12)
    idx = every[[0, 5, 26]]
    loss, _, stats = model.loss_and_grads(model.one_hot(idx))
    assert math.isclose(loss, -model.log_prob(idx).mean(), rel_tol=1e-12)
    assert math.isclose(stats["bits_per_code"], loss / (M * math.log(2)), rel_tol=1e-12)


def test_ancestral_samples_follow_the_prior():
    """Sample frequencies of all K^M sequences against p(c): a chi-square test (MADE.6)."""
    K, M, n = 2, 3, 40000
    model = small_prior(K, M, (4,), "tanh", seed=5)
    every = np.array(list(itertools.product(range(K), repeat=M)))
    p = np.exp(model.log_prob(every))
    draws = model.sample(n, np.random.default_rng(0))
    counts = np.bincount(draws @ (K ** np.arange(M)[::-1]), minlength=K ** M)
    chi2 = np.sum((counts - n * p) ** 2 / (n * p))
    assert chi2 < 24.3, chi2  # 99.9% point of chi-square with 7 degrees of freedom


def test_temperature_sharpens_and_flattens():
    model = small_prior(4, 2, (5,), "tanh", seed=3)
    rng = np.random.default_rng(0)
    first = {t: np.bincount(model.sample(20000, rng, temperature=t)[:, 0], minlength=4) / 20000
             for t in (0.3, 1.0, 5.0)}
    peak = np.argmax(first[1.0])
    assert first[0.3][peak] > first[1.0][peak] > first[5.0][peak]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            model.sample(2, rng, temperature=bad)


def test_prior_refuses_what_is_not_one_hot():
    model = MADEPrior(num_codes=3, num_vectors=2, hidden=(4,))
    x = model.one_hot(np.array([[0, 2]]))
    model.loss_and_grads(x)
    for bad in (x * 0.5, x * 0, np.ones_like(x)):
        with pytest.raises(ValueError, match="one-hot"):
            model.loss_and_grads(bad)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        model.one_hot(np.array([[0, 3]]))
    with pytest.raises(ValueError, match="data_dim"):
        MADEPrior(num_codes=3, num_vectors=2, data_dim=7)


def test_prior_rebuilds_from_its_config_and_evaluates():
    model = MADEPrior(num_codes=5, num_vectors=3, hidden=(8,), rng=1)
    twin = build(model.config, rng=9)
    twin.params.flat[...] = model.params.flat
    idx = np.random.default_rng(0).integers(5, size=(10, 3))
    np.testing.assert_array_equal(twin.log_prob(idx), model.log_prob(idx))
    res = evaluate.elbo(model, model.one_hot(idx))
    assert math.isclose(res["loss"], -model.log_prob(idx).mean(), rel_tol=1e-6)
    assert res["elbo"] == -res["loss"] and "kl" not in res


# ----------------------------------------------------------------------------- the tour


@pytest.mark.parametrize("hidden, activation", [((16,), "relu"), ((5, 6), "tanh"), ((), "relu")])
def test_tour_of_the_prior_checks_every_node(hidden, activation):
    """npvae tour made: every node passes its own check, and the gradients equal the model's."""
    from npvae.tour import format_tour, tour, tour_model

    model, x, _ = tour_model("made", batch=3, seed=1)
    if hidden != (16,) or activation != "relu":
        model = small_prior(model.K, model.M, hidden, activation, seed=2)
        x = model.one_hot(np.random.default_rng(3).integers(model.K, size=(3, model.M)))
    nodes = tour(model, x)
    assert nodes.ok, format_tour(nodes)
    assert set(nodes.grads) == set(model.params)
    tags = {t for node in nodes for t in node.tags}
    assert {"MADE.1", "XENT.2", "MADE.3", "MADE.5"} <= tags
    assert ("MADE.2" in tags) == bool(hidden)
