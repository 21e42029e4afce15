"""Optimizers: the maths against independent references, gradients given as FlatDicts or
as plain dicts, the two Adam twins, gradient clipping, and exact save/restore of the state."""
import io
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npvae.backend import use_backend
from npvae.optim import SGD, Adam, adam_kernel, clip_grad_norm
from npvae.params import FlatDict

from strategies import seeds

SHAPES = {"enc.0.W": (3, 4), "enc.0.b": (4,), "dec.0.W": (4, 2), "dec.0.b": (2,)}
SIZE = sum(math.prod(s) for s in SHAPES.values())


def flat_dict(values, dtype=np.float64, shapes=SHAPES):
    d = FlatDict(shapes, dtype)
    d.flat[:] = values
    return d


def random_flat(rng, dtype=np.float64, scale=1.0):
    return flat_dict(scale * rng.standard_normal(SIZE), dtype)


def gradient_sequence(seed, steps, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [random_flat(rng, dtype, scale=rng.uniform(0.01, 10)) for _ in range(steps)]


# ----------------------------------------------------------------------------------
# Independent references: one parameter vector, written straight from the papers.


def adam_reference(p, grads, lr, b1, b2, eps, wd):
    """Kingma & Ba, Algorithm 1, with the L2 term added to the gradient; element by element."""
    p = [float(x) for x in p]
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        for i in range(len(p)):
            gi = float(g[i]) + wd * p[i]
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi**2
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            p[i] = p[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
    return np.array(p)


def sgd_reference(p, grads, lr, mu, nesterov, wd):
    """Momentum SGD as Sutskever et al. / PyTorch write it; element by element."""
    p = [float(x) for x in p]
    b = [0.0] * len(p)
    for g in grads:
        for i in range(len(p)):
            gi = float(g[i]) + wd * p[i]
            b[i] = mu * b[i] + gi
            p[i] = p[i] - lr * (gi + mu * b[i] if nesterov else b[i])
    return np.array(p)


adam_hyper = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 1.0),
    "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.9999)),
    "eps": st.floats(1e-10, 1e-2),
    "weight_decay": st.sampled_from([0.0, 1e-4, 0.1]),
})
sgd_hyper = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 1.0),
    "momentum": st.floats(0.0, 0.99),
    "nesterov": st.booleans(),
    "weight_decay": st.sampled_from([0.0, 1e-4, 0.1]),
}).filter(lambda h: h["momentum"] > 0 or not h["nesterov"])


def close(actual, expected, rtol):
    scale = max(np.abs(expected).max(), 1.0)
    return np.abs(actual - expected).max() <= rtol * scale


@settings(deadline=None)
@given(adam_hyper, st.integers(1, 6), seeds)
def test_adam_matches_the_paper(hyper, steps, seed):
    params = random_flat(np.random.default_rng(seed + 1))
    start = params.flat.copy()
    grads = gradient_sequence(seed, steps)
    opt = Adam(params, **hyper)
    for g in grads:
        opt.step(g)
    b1, b2 = hyper["betas"]
    expected = adam_reference(start, [g.flat for g in grads], hyper["lr"], b1, b2,
                              hyper["eps"], hyper["weight_decay"])
    assert close(params.flat, expected, 1e-12)


@settings(deadline=None)
@given(sgd_hyper, st.integers(1, 6), seeds)
def test_sgd_matches_the_reference(hyper, steps, seed):
    params = random_flat(np.random.default_rng(seed + 1))
    start = params.flat.copy()
    grads = gradient_sequence(seed, steps)
    opt = SGD(params, **hyper)
    for g in grads:
        opt.step(g)
    expected = sgd_reference(start, [g.flat for g in grads], hyper["lr"], hyper["momentum"],
                             hyper["nesterov"], hyper["weight_decay"])
    assert close(params.flat, expected, 1e-12)


def test_adam_first_step_moves_each_entry_by_lr():
    # with bias correction, step 1 is lr * g / (|g| + eps): a move of almost exactly lr
    params = flat_dict(np.zeros(SIZE))
    g = random_flat(np.random.default_rng(0))
    Adam(params, lr=0.01, eps=1e-12).step(g)
    np.testing.assert_allclose(params.flat, -0.01 * np.sign(g.flat), rtol=1e-9)


# ----------------------------------------------------------------------------------
# Parameters are a FlatDict; gradients in another form are packed into its layout


def make_optimizer(kind, params):
    if kind == "adam":
        return Adam(params, lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)
    if kind == "sgd":
        return SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    return SGD(params, lr=0.05)


KINDS = ["adam", "sgd", "plain-sgd"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_plain_dict_gradients_give_the_same_numbers(kind, dtype):
    # the same layout is used as it is; a plain dict, a FlatDict in another key order or
    # another dtype is copied into the layout and dtype first: bit for bit the same steps
    start = random_flat(np.random.default_rng(5), dtype)
    params = [start.copy() for _ in range(4)]
    opts = [make_optimizer(kind, p) for p in params]
    reordered = dict(reversed(list(SHAPES.items())))
    for g in gradient_sequence(6, 4, dtype):
        assert opts[0].step(g) == 0
        opts[1].step({k: v.copy() for k, v in g.items()})
        opts[2].step(FlatDict.from_arrays({k: g[k] for k in reordered}))
        opts[3].step(g.astype(np.float64))  # float32 -> float64 -> float32 is exact
    for p in params[1:]:
        assert np.array_equal(p.flat, params[0].flat)


@pytest.mark.parametrize("kind", KINDS)
def test_step_keeps_views_and_leaves_grads_alone(kind):
    params = random_flat(np.random.default_rng(0))
    views = dict(params)
    g = random_flat(np.random.default_rng(1))
    g_before = g.flat.copy()
    plain = {k: v.copy() for k, v in g.items()}
    opt = make_optimizer(kind, params)
    opt.step(g)
    opt.step(plain)
    for key, view in views.items():
        assert view is params[key] and np.shares_memory(view, params.flat)
    np.testing.assert_array_equal(g.flat, g_before)
    for key in SHAPES:
        np.testing.assert_array_equal(plain[key], g[key])


def test_buffers_are_flat_dicts_in_the_layout_of_params():
    params = random_flat(np.random.default_rng(0))
    for opt, names in ((Adam(params), ["m", "v"]), (SGD(params, lr=0.1, momentum=0.5), ["buf"]),
                       (SGD(params, lr=0.1), [])):
        assert list(opt.buffers) == names
        for buf in opt.buffers.values():
            assert isinstance(buf, FlatDict) and buf.shapes == params.shapes
            assert buf.flat.dtype == params.flat.dtype and not np.shares_memory(buf.flat, params.flat)


def test_params_must_be_a_flat_dict():
    w = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"FlatDict.*FlatDict\.from_arrays"):
        Adam({"w": w})
    params = FlatDict.from_arrays({"w": w, "b": np.zeros(3, np.float32)})
    assert list(params) == ["w", "b"] and params.flat.dtype == np.float64  # the common dtype
    Adam(params, lr=0.1).step({"w": np.ones((2, 3)), "b": np.ones(3)})
    np.testing.assert_allclose(params["w"], 0.9)  # the copy is updated ...
    np.testing.assert_array_equal(w, 1.0)  # ... and not the array it was made from


# ----------------------------------------------------------------------------------
# The two Adam twins


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-6)])
@given(st.integers(1, 200), seeds, st.sampled_from([0.0, 0.01]))
def test_adam_twins_agree(dtype, rtol, n, seed, wd):
    rng = np.random.default_rng(seed)
    p, g, m = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    v = rng.uniform(0, 2, n).astype(dtype)
    c = np.dtype(dtype).type
    scalars = (c(1e-3), c(0.9), c(0.1), c(0.999), c(0.001), c(1 - 0.9**3), c(1 - 0.999**3),
               c(1e-8), c(wd), np.finfo(dtype).tiny)
    a = [x.copy() for x in (p, g, m, v)]
    b = [x.copy() for x in (p, g, m, v)]
    adam_kernel.numpy(*a, *scalars)
    adam_kernel.numba(*b, *scalars)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype == dtype
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol)


def _adam_scalars(dtype, t=3, wd=0.0):
    c = np.dtype(dtype).type
    return (c(1e-3), c(0.9), c(0.1), c(0.999), c(0.001), c(1 - 0.9**t), c(1 - 0.999**t),
            c(1e-8), c(wd), np.finfo(dtype).tiny)


def _special_values(dtype, n, rng):
    """n values mixing ordinary numbers with NaN, +-inf, +-0, subnormals and the normal edge."""
    tiny = np.finfo(dtype).tiny
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, tiny, -tiny, tiny / 2, -tiny / 4,
                         tiny * 1.5, np.finfo(dtype).smallest_subnormal], dtype=dtype)
    out = rng.standard_normal(n).astype(dtype)
    where = rng.random(n) < 0.5
    out[where] = rng.choice(specials, where.sum())
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_twins_agree_on_nan_inf_and_subnormal_input(dtype, wd):
    # Non-finite values must propagate the same way in both twins (never hidden), and
    # subnormal moments must be flushed the same way. Same operations in the same order,
    # so finite results agree to rounding; NaN positions must match exactly.
    rng = np.random.default_rng(7)
    n = 400
    p, g, m = (_special_values(dtype, n, rng) for _ in range(3))
    v = np.abs(_special_values(dtype, n, rng))
    a = [x.copy() for x in (p, g, m, v)]
    b = [x.copy() for x in (p, g, m, v)]
    with np.errstate(all="ignore"):
        bad_a = adam_kernel.numpy(*a, *_adam_scalars(dtype, wd=wd))
        bad_b = adam_kernel.numba(*b, *_adam_scalars(dtype, wd=wd))
    assert bad_a == bad_b == np.count_nonzero(~np.isfinite(g))  # both count every one
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
        np.testing.assert_allclose(x, y, rtol=rtol, atol=0, equal_nan=True)
    tiny = np.finfo(dtype).tiny
    for moment in (a[2], a[3], b[2], b[3]):  # no subnormal survives in either moment
        finite = moment[np.isfinite(moment)]
        assert not np.any((finite != 0) & (np.abs(finite) < tiny))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adam_moments_decay_to_zero_not_into_subnormals(dtype):
    # A weight whose gradient stops being non-zero: m decays by beta1 each step. Without
    # the flush it passes through ~2^23 (float32) subnormal values on its way down.
    params = FlatDict.from_arrays({"w": np.ones(3, dtype)})
    opt = Adam(params, lr=1e-3)
    opt.step({"w": np.array([1e-3, -1e-3, 0.0], dtype)})
    tiny = np.finfo(dtype).tiny
    zero_grad = {"w": np.zeros(3, dtype)}
    steps_to_zero = None
    for t in range(20000):
        opt.step(zero_grad)
        m = opt.buffers["m"]["w"]
        assert not np.any((m != 0) & (np.abs(m) < tiny)), f"subnormal m at step {t}"
        if steps_to_zero is None and not np.any(m):
            steps_to_zero = t
    # 1e-4 * 0.9^t falls below tiny after log(tiny / 1e-4) / log(0.9) steps, then is zero
    expected = math.log(tiny / 1e-4) / math.log(0.9)
    assert steps_to_zero is not None and abs(steps_to_zero - expected) < 3


def test_sgd_momentum_buffer_never_subnormal():
    params = FlatDict.from_arrays({"w": np.ones(2, np.float32)})
    opt = SGD(params, lr=0.1, momentum=0.5)
    opt.step({"w": np.array([1.0, -1.0], np.float32)})
    for _ in range(300):
        opt.step({"w": np.zeros(2, np.float32)})
        buf = opt.buffers["buf"]["w"]
        assert not np.any((buf != 0) & (np.abs(buf) < np.finfo(np.float32).tiny))
    assert not np.any(opt.buffers["buf"]["w"])  # 0.5^300 is far below tiny: flushed to 0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adam_same_result_on_both_backends(dtype):
    results = []
    for backend in ("numpy", "numba"):
        params = random_flat(np.random.default_rng(3), dtype)
        with use_backend(backend):
            opt = Adam(params, lr=0.01, weight_decay=0.1)
            for g in gradient_sequence(4, 5, dtype):
                opt.step(g)
        results.append(params.flat)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12 if dtype == np.float64 else 1e-6)


# ----------------------------------------------------------------------------------
# Gradient clipping


@given(hnp.arrays(np.float64, SIZE, elements=st.floats(-10, 10)), st.floats(0.1, 20.0))
def test_clip_grad_norm(values, max_norm):
    grads = flat_dict(values)
    norm = clip_grad_norm(grads, max_norm)
    expected = math.sqrt(sum(float(x) ** 2 for x in values))
    assert math.isclose(norm, expected, rel_tol=1e-12, abs_tol=1e-300)
    if expected > max_norm:
        np.testing.assert_allclose(grads.flat, values * (max_norm / expected), rtol=1e-14)
        assert math.isclose(np.linalg.norm(grads.flat), max_norm, rel_tol=1e-12)
    else:
        np.testing.assert_array_equal(grads.flat, values)


@pytest.mark.parametrize("max_norm", [None, math.inf])
def test_clip_grad_norm_measures_only(max_norm):
    grads = {"a": np.full((2, 2), 3.0), "b": np.array([4.0, 0.0])}
    assert clip_grad_norm(grads, max_norm) == math.sqrt(4 * 9 + 16)
    np.testing.assert_array_equal(grads["a"], 3.0)


def test_clip_grad_norm_on_a_plain_dict_scales_in_place():
    grads = {"a": np.array([3.0]), "b": np.array([[4.0]], dtype=np.float32)}
    assert clip_grad_norm(grads, 1.0) == 5.0
    np.testing.assert_allclose(grads["a"], [0.6])
    np.testing.assert_allclose(grads["b"], [[0.8]], rtol=1e-7)
    assert grads["b"].dtype == np.float32


def test_clip_grad_norm_rejects_bad_max_norm():
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm({"a": np.ones(2)}, 0.0)


# ----------------------------------------------------------------------------------
# Save and restore


def npz_round_trip(state):
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("through_npz", [False, True])
def test_resume_is_bit_identical(kind, dtype, through_npz):
    grads = gradient_sequence(7, 10, dtype)
    start = random_flat(np.random.default_rng(8), dtype)

    straight = start.copy()
    opt = make_optimizer(kind, straight)
    for g in grads:
        opt.step(g)

    first = start.copy()
    opt = make_optimizer(kind, first)
    for g in grads[:5]:
        opt.step(g)
    state = opt.state_dict()
    if through_npz:
        state = npz_round_trip(state)
    resumed = first.copy()  # the parameters, as a checkpoint would restore them
    opt2 = make_optimizer(kind, resumed)
    if kind == "adam":
        opt2.lr = 0.5  # the saved hyperparameters replace these
    opt2.load_state_dict(state)
    for g in grads[5:]:
        opt2.step(g)
    assert opt2.step_count == 10
    assert np.array_equal(resumed.flat, straight.flat)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_is_plain_arrays(kind):
    opt = make_optimizer(kind, random_flat(np.random.default_rng(0)))
    opt.step(random_flat(np.random.default_rng(1)))
    state = opt.state_dict()
    assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items())
    assert all(v.dtype != object for v in state.values())
    assert str(state["kind"]) == ("adam" if kind == "adam" else "sgd")
    assert int(state["step"]) == 1
    state["step"][...] = 99  # a copy: changing it does not touch the optimizer
    assert opt.step_count == 1


def test_state_dict_saves_the_moments():
    params = random_flat(np.random.default_rng(0))
    opt = Adam(params)
    opt.step(random_flat(np.random.default_rng(1)))
    state = opt.state_dict()
    for key in SHAPES:
        assert state[f"m.{key}"].shape == SHAPES[key]
        assert state[f"v.{key}"].shape == SHAPES[key]
        assert np.any(state[f"v.{key}"] > 0)


def test_load_state_of_the_wrong_kind():
    sgd = SGD(random_flat(np.random.default_rng(0)), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="kind"):
        Adam(random_flat(np.random.default_rng(0))).load_state_dict(sgd.state_dict())


def test_load_state_of_the_wrong_shapes():
    state = Adam(random_flat(np.random.default_rng(0))).state_dict()
    other = FlatDict({"enc.0.W": (3, 5), "enc.0.b": (4,), "dec.0.W": (4, 2), "dec.0.b": (2,)})
    with pytest.raises(ValueError, match=r"m\.enc\.0\.W"):
        Adam(other).load_state_dict(state)


def test_load_state_with_missing_or_extra_entries():
    state = Adam(random_flat(np.random.default_rng(0))).state_dict()
    del state["v.dec.0.b"]
    state["m.extra"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"missing: \['v\.dec\.0\.b'\].*extra: \['m\.extra'\]"):
        Adam(random_flat(np.random.default_rng(0))).load_state_dict(state)


def test_load_state_with_bad_hyperparameters_leaves_the_optimizer_unchanged():
    opt = Adam(random_flat(np.random.default_rng(0)), lr=0.01)
    state = opt.state_dict()
    state["lr"] = np.array(-1.0)
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(state)
    assert opt.lr == 0.01


def test_a_bad_state_changes_nothing():
    opt = SGD(random_flat(np.random.default_rng(0)), lr=0.1, momentum=0.5)
    opt.step(random_flat(np.random.default_rng(1)))
    before = opt.state_dict()
    state = SGD(random_flat(np.random.default_rng(0)), lr=0.2).state_dict()
    state["step"] = np.array(3)  # momentum 0 and no buffer: good ...
    state["buf.enc.0.W"] = np.zeros((3, 4))  # ... but for this entry
    with pytest.raises(ValueError, match=r"extra: \['buf\.enc\.0\.W'\]"):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_loading_a_state_makes_or_drops_the_momentum_buffer():
    grads = gradient_sequence(2, 6)
    straight = random_flat(np.random.default_rng(3))
    opt = SGD(straight, lr=0.05, momentum=0.9)
    for g in grads[:3]:
        opt.step(g)
    state = opt.state_dict()
    resumed = straight.copy()
    for g in grads[3:]:
        opt.step(g)
    plain = SGD(resumed, lr=0.05)  # no buffer until the state brings momentum 0.9
    plain.load_state_dict(state)
    for g in grads[3:]:
        plain.step(g)
    assert np.array_equal(resumed.flat, straight.flat)
    plain.load_state_dict(SGD(resumed, lr=0.05).state_dict())
    assert plain.momentum == 0.0 and plain.buffers == {}


# ----------------------------------------------------------------------------------
# Bad input


def test_grads_with_missing_and_extra_keys():
    opt = Adam(random_flat(np.random.default_rng(0)))
    grads = {k: np.zeros(s) for k, s in SHAPES.items() if k != "enc.0.b"}
    grads["enc.1.b"] = np.zeros(4)
    with pytest.raises(ValueError, match=r"missing: \['enc\.0\.b'\], extra: \['enc\.1\.b'\]"):
        opt.step(grads)


def test_grads_with_the_wrong_shape():
    opt = SGD(random_flat(np.random.default_rng(0)), lr=0.1)
    grads = {k: np.zeros(s) for k, s in SHAPES.items()}
    grads["dec.0.W"] = np.zeros((2, 4))
    with pytest.raises(ValueError, match=r"grads\['dec\.0\.W'\]"):
        opt.step(grads)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: Adam(p, lr=0.0), "lr"),
        (lambda p: Adam(p, lr=-1e-3), "lr"),
        (lambda p: Adam(p, betas=(1.0, 0.999)), r"betas\[0\]"),
        (lambda p: Adam(p, betas=(0.9, -0.1)), r"betas\[1\]"),
        (lambda p: Adam(p, betas=(0.9,)), "betas"),
        (lambda p: Adam(p, eps=0.0), "eps"),
        (lambda p: Adam(p, weight_decay=-1.0), "weight_decay"),
        (lambda p: SGD(p, lr=math.nan), "lr"),
        (lambda p: SGD(p, lr=0.1, momentum=1.0), "momentum"),
        (lambda p: SGD(p, lr=0.1, nesterov=True), "nesterov"),
        (lambda p: SGD(p, lr=0.1, weight_decay=-0.1), "weight_decay"),
        (lambda p: SGD({}, lr=0.1), "params"),
        (lambda p: SGD({"w": np.zeros(2)}, lr=0.1), "params must be a npvae.params.FlatDict"),
        (lambda p: SGD(FlatDict({}), lr=0.1), "params must hold"),
        (lambda p: SGD(FlatDict({"w": (2,)}, np.int64), lr=0.1), "params"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make(random_flat(np.random.default_rng(0)))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("make", [lambda p: Adam(p, lr=1e-3), lambda p: SGD(p, lr=0.1, momentum=0.9),
                                  lambda p: SGD(p, lr=0.1)])
@pytest.mark.parametrize("flat", [True, False])
def test_step_counts_non_finite_gradient_entries(backend, make, flat):
    params = random_flat(np.random.default_rng(0), np.float32)
    with use_backend(backend):
        opt = make(params)
        grads = (params.zeros_like() if flat else {k: np.zeros_like(v) for k, v in params.items()})
        for g in grads.values():
            g[...] = 1.0
        assert opt.step(grads) == 0
        keys = list(grads)
        grads[keys[0]].reshape(-1)[0] = np.nan
        grads[keys[-1]].reshape(-1)[-1] = -np.inf
        grads[keys[-1]].reshape(-1)[0] = np.inf
        with np.errstate(invalid="ignore"):
            assert opt.step(grads) == 3
