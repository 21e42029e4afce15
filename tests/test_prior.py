"""The learned prior over VQ-VAE codes: its two op pairs, the MADE model, and training it.

Gradients: float64, central differences (GC.4) against a random upstream gradient (GC.2),
relative error at most 1e-6, over Hypothesis-drawn shapes and values. Forward values are
checked against independent references (a naive softmax, a brute-force sum over every
code sequence), because a gradient check cannot see a wrong forward pass.
"""
import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npvae import evaluate
from npvae.gradcheck import check_model, check_op
from npvae.models import MADEPrior, build
from npvae.models.prior import direct_by_default, hidden_path_params, made_masks
from npvae.ops import linear
from npvae.ops.masked import masked_linear_backward, masked_linear_forward
from npvae.ops.softmax import softmax_xent_backward, softmax_xent_forward

from strategies import batch, dim, seeds, transposed_in_float64

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


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 6), o=st.integers(1, 4), seed=seeds, density=st.floats(0.2, 1.0))
def test_masked_linear_gradients_wide_input(n, o, seed, density):
    """A small batch through a layer of WIDE_INPUT inputs: dx is taken as (W dout^T)^T
    (input_grad; float64 patched in, as npvae takes that way in float32 only)."""
    rng = np.random.default_rng(seed)
    i = linear.WIDE_INPUT
    x, W, b = rng.normal(size=(n, i)), rng.normal(size=(i, o)), rng.normal(size=o)
    mask = (rng.random((i, o)) < density).astype(np.float64)
    with transposed_in_float64():
        assert linear.by_transpose(np.empty((n, o)), W)
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


def small_prior(K=3, M=4, hidden=(7, 6), activation="tanh", seed=0, direct=True):
    """A float64 prior with every unmasked weight and bias drawn at random."""
    rng = np.random.default_rng(seed)
    model = MADEPrior(num_codes=K, num_vectors=M, hidden=hidden, activation=activation,
                      direct=direct, dtype=np.float64, rng=seed)
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


@given(K=st.integers(2, 4), M=st.integers(1, 5),
       hidden=st.lists(st.integers(1, 6), min_size=1, max_size=2), seed=seeds, n=st.integers(1, 5),
       activation=st.sampled_from(["tanh", "relu"]))
def test_prior_gradients_without_the_direct_connection(K, M, hidden, seed, n, activation):
    """The output layer reads h_L alone; float64 central differences against the backward pass
    for every parameter, with a random upstream gradient (check_model)."""
    model = small_prior(K, M, tuple(hidden), activation, seed, direct=False)
    assert model.params["out.W"].shape == (hidden[-1], M * K)
    idx = np.random.default_rng(seed + 1).integers(K, size=(n, M))
    rows = check_model(model, model.one_hot(idx))
    assert {row.name for row in rows} >= {"out.W", "out.b", "hid.0.W"}, rows
    for row in rows:
        assert row.rel_error <= TOL, row


@given(K=st.integers(2, 4), M=st.integers(1, 5),
       hidden=st.lists(st.integers(1, 6), min_size=1, max_size=2), seed=seeds, n=st.integers(1, 4),
       direct=st.booleans())
def test_network_gradients_against_a_random_upstream_gradient(K, M, hidden, seed, n, direct):
    """The backward pass from the logits, fed a random upstream gradient G (N, M, K), against
    central differences of sum(G * logits) for every entry of every parameter."""
    from npvae.gradcheck import numerical_gradient, rel_error

    model = small_prior(K, M, tuple(hidden), "tanh", seed, direct=direct)
    rng = np.random.default_rng(seed + 2)
    x = model.one_hot(rng.integers(K, size=(n, M)))
    G = rng.normal(size=(n, M, K))
    logits, layers, out = model._network_forward(x)
    grads = model.new_grads()
    model._network_backward(G, layers, out, grads)
    for name, p in model.params.items():
        numeric = numerical_gradient(lambda: float(np.sum(G * model._network_forward(x)[0])), p)
        assert rel_error(grads[name], numeric) <= TOL, name


@pytest.mark.parametrize("M, hidden, direct", [
    (4, (7, 6), True), (1, (3,), True), (49, (60,), True), (5, (), True),
    (4, (7, 6), False), (1, (3,), False), (49, (60,), False), (49, (50, 40), False),
    (5, (9,), False)])
def test_masks_are_autoregressive(M, hidden, direct):
    """Changing code m leaves the logits of positions <= m unchanged, and changes later ones,
    with and without the direct connection (raster order of a 7x7 map: M = 49)."""
    K = 3
    model = small_prior(K, M, hidden, "tanh", seed=M, direct=direct)
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


def test_without_the_direct_connection_the_output_reads_the_hidden_units_only():
    """direct=False: out.W has H_L rows, the output mask is MADE.3 over h_L's degrees, and
    the parameters are those of the hidden path."""
    K, M, hidden = 3, 4, (7, 6)
    with_direct = MADEPrior(num_codes=K, num_vectors=M, hidden=hidden, rng=0)
    without = MADEPrior(num_codes=K, num_vectors=M, hidden=hidden, direct=False, rng=0)
    assert with_direct.config["direct"] is True and without.config["direct"] is False
    assert with_direct.params["out.W"].shape == (6 + M * K, M * K)
    assert without.params["out.W"].shape == (6, M * K)
    np.testing.assert_array_equal(without.masks[-1], with_direct.masks[-1][:6])
    assert without.num_params() == hidden_path_params(M, K, hidden)
    assert with_direct.num_params() == hidden_path_params(M, K, hidden) + (M * K) ** 2
    with pytest.raises(ValueError, match="at least one hidden layer"):
        MADEPrior(num_codes=K, num_vectors=M, hidden=(), direct=False)
    with pytest.raises(ValueError, match="direct must be True or False"):
        MADEPrior(num_codes=K, num_vectors=M, hidden=(4,), direct="no")


def test_a_config_without_the_flag_builds_the_direct_connection(tmp_path):
    """Priors saved before the flag existed have no "direct" in their config: they load with
    the connection they were trained with, and give the same log p(c)."""
    from npvae.checkpoint import load_checkpoint, save_checkpoint

    model = small_prior(4, 3, (5,), "relu", seed=4)
    del model.config["direct"]  # as an older checkpoint wrote it
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, model, None, np.random.default_rng(0), 1, 1, [], {})
    loaded = load_checkpoint(path).model
    assert loaded.direct and loaded.config["direct"] is True
    idx = np.random.default_rng(1).integers(4, size=(7, 3))
    np.testing.assert_array_equal(loaded.log_prob(idx), model.log_prob(idx))

    without = small_prior(4, 3, (5,), "relu", seed=4, direct=False)
    save_checkpoint(path, without, None, np.random.default_rng(0), 1, 1, [], {})
    loaded = load_checkpoint(path).model
    assert not loaded.direct
    np.testing.assert_array_equal(loaded.log_prob(idx), without.log_prob(idx))


@pytest.mark.parametrize("M, K, hidden, direct", [
    (4, 128, (512,), True),  # the MLP VQ-VAE's default prior: 0.26 M against 0.53 M
    (49, 128, (512,), False),  # a 7x7 map: 39 M against 6.4 M
    (49, 256, (512,), False),  # 157 M against 12.9 M
    (49, 32, (512,), True),  # 2.5 M against 1.6 M
    (3, 8, (), True),  # without hidden layers it is the whole model
])
def test_the_default_rule_for_the_direct_connection(M, K, hidden, direct):
    assert direct_by_default(M, K, hidden) is direct
    ratio = (M * K) ** 2 / hidden_path_params(M, K, hidden) if hidden else 0
    assert (ratio <= 4) is direct


def test_masks_by_degree():
    """The output of position m connects to inputs of positions < m only (MADE.3)."""
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


def naive_sample(model, n, rng, temperature=1.0):
    """Ancestral sampling with the whole network run for every position (MADE.6)."""
    idx = np.zeros((n, model.M), dtype=np.int64)
    for m in range(model.M):
        logits = model.conditional_logits(idx)[:, m].astype(np.float64)
        p = np.exp(logits / temperature - np.logaddexp.reduce(logits / temperature, axis=1,
                                                               keepdims=True))
        u = rng.random((n, 1))
        idx[:, m] = np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), model.K - 1)
    return idx


@pytest.mark.parametrize("hidden, direct, activation", [
    ((5,), True, "tanh"), ((5,), False, "relu"), ((6, 4), True, "relu"), ((6, 4), False, "tanh"),
    ((), True, "tanh")])
def test_incremental_sampling_draws_what_the_whole_network_draws(hidden, direct, activation):
    """sample() updates the first layer by one row per drawn code and evaluates one output
    block: with the same uniforms it draws the same codes as running the network in full."""
    model = small_prior(4, 6, hidden, activation, seed=7, direct=direct)
    for t in (1.0, 0.7):
        fast = model.sample(300, np.random.default_rng(1), temperature=t)
        slow = naive_sample(model, 300, np.random.default_rng(1), temperature=t)
        np.testing.assert_array_equal(fast, slow)


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


@pytest.mark.parametrize("t", [1e-300, 1e-320, 5e-324])
def test_a_vanishing_temperature_draws_the_most_likely_code(t):
    # logits / T would overflow to inf, and inf - inf is NaN: sample() divides the logits
    # less their largest, so T -> 0 is the argmax limit, with no warning
    model = small_prior(4, 3, (5,), "tanh", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes = model.sample(50, np.random.default_rng(0), temperature=t)
    greedy = model.sample(1, np.random.default_rng(1), temperature=1e-6)  # practically argmax
    assert (codes == greedy).all()


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


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "2"])
def test_log_prob_wants_a_positive_integer_batch_size(bad):
    # a negative batch_size evaluated no row and returned np.empty's contents
    model = MADEPrior(num_codes=3, num_vectors=2, hidden=(4,))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        model.log_prob(np.zeros((6, 2), dtype=np.int64), batch_size=bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_codes=3.9), "num_codes must be an integer >= 2, got 3.9"),
    (dict(num_codes=1), "num_codes must be an integer >= 2, got 1"),
    (dict(num_vectors=2.0), "num_vectors must be a positive integer, got 2.0"),
    (dict(hidden=(4.5,)), r"hidden\[0\] must be a positive integer, got 4.5"),
    (dict(hidden=(4, 0)), r"hidden\[1\] must be a positive integer, got 0"),
])
def test_sizes_that_are_not_integers_are_refused(kwargs, match):
    # they were truncated: num_codes 3.9 built a prior over 3 codes
    args = dict(num_codes=3, num_vectors=2, hidden=(4,))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MADEPrior(**args)
    assert MADEPrior(num_codes=np.int64(3), num_vectors=np.int32(2), hidden=(np.int64(4),)).K == 3


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


@pytest.mark.parametrize("hidden", [(6,), (5, 4)])
def test_tour_of_a_prior_without_the_direct_connection(hidden):
    """The output layer reads h alone: no concatenation node, and every node still checks."""
    from npvae.tour import format_tour, tour

    model = small_prior(3, 4, hidden, "tanh", seed=4, direct=False)  # tanh: no kinks
    x = model.one_hot(np.random.default_rng(5).integers(3, size=(3, 4)))
    nodes = tour(model, x)
    assert nodes.ok, format_tour(nodes)
    assert set(nodes.grads) == set(model.params)
    assert not any("concatenation" in node.name for node in nodes)
    assert any(node.name == "out masked linear h (W*A) + b" for node in nodes)
    assert "direct path" not in format_tour(nodes)
