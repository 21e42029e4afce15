"""Convolution and transposed convolution: the fast paths against the direct loops, the
backward passes against central differences (float64, random upstream gradient), the
transposed convolution as the adjoint of the convolution, and known values."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from npvae._validate import trusted
from npvae.backend import use_backend
from npvae.gradcheck import check_op
from npvae.ops import conv
from npvae.ops.conv import (
    conv2d_backward, conv2d_backward_reference, conv2d_forward, conv2d_forward_reference,
    conv_output_size, conv_transpose2d_backward, conv_transpose2d_forward,
    conv_transpose2d_forward_reference, conv_transpose_output_size,
)

from strategies import seeds

TOL = 1e-6  # gradient checks (GC.3)

geometry = st.fixed_dictionaries(dict(
    n=st.integers(1, 3), c=st.integers(1, 3), f=st.integers(1, 3),
    h=st.integers(1, 8), w=st.integers(1, 8), kh=st.integers(1, 4), kw=st.integers(1, 4),
    stride=st.integers(1, 3), pad=st.integers(0, 2)))


def conv_args(g, rng):
    assume(g["kh"] <= g["h"] + 2 * g["pad"] and g["kw"] <= g["w"] + 2 * g["pad"])
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    w = rng.standard_normal((g["f"], g["c"], g["kh"], g["kw"]))
    b = rng.standard_normal(g["f"])
    return x, w, b


@given(geometry, seeds)
def test_conv2d_fast_path_equals_the_direct_loops(g, seed):
    rng = np.random.default_rng(seed)
    x, w, b = conv_args(g, rng)
    y, cache = conv2d_forward(x, w, b, g["stride"], g["pad"])
    np.testing.assert_allclose(y, conv2d_forward_reference(x, w, b, g["stride"], g["pad"]),
                               rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    for got, want in zip(conv2d_backward(dy, cache),
                         conv2d_backward_reference(dy, x, w, g["stride"], g["pad"])):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@given(geometry, seeds)
def test_conv2d_backward_matches_central_differences(g, seed):
    rng = np.random.default_rng(seed)
    x, w, b = conv_args(g, rng)
    errors = check_op(conv2d_forward, conv2d_backward, [x, w, b, g["stride"], g["pad"]],
                      wrt=[0, 1, 2], rng=rng)
    assert max(errors.values()) <= TOL, errors


def transpose_args(g, rng):
    """A transposed convolution from the conv output size back to (h, w)."""
    assume(g["kh"] <= g["h"] + 2 * g["pad"] and g["kw"] <= g["w"] + 2 * g["pad"])
    oh = conv_output_size(g["h"], g["kh"], g["stride"], g["pad"])
    ow = conv_output_size(g["w"], g["kw"], g["stride"], g["pad"])
    out_pad_h = g["h"] - conv_transpose_output_size(oh, g["kh"], g["stride"], g["pad"])
    out_pad_w = g["w"] - conv_transpose_output_size(ow, g["kw"], g["stride"], g["pad"])
    assume(out_pad_h == out_pad_w)  # one output_pad for both axes
    x = rng.standard_normal((g["n"], g["f"], oh, ow))  # C_in = f
    w = rng.standard_normal((g["f"], g["c"], g["kh"], g["kw"]))  # (C_in, C_out, KH, KW)
    b = rng.standard_normal(g["c"])
    return x, w, b, out_pad_h


@given(geometry, seeds)
def test_transposed_conv_is_the_adjoint_of_conv(g, seed):
    # <conv(u), v> = <u, conv^T(v)> with the same filters and no bias (CONVT.1)
    rng = np.random.default_rng(seed)
    v, w, _, out_pad = transpose_args(g, rng)
    u = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    conv_u, _ = conv2d_forward(u, w, np.zeros(g["f"]), g["stride"], g["pad"])
    convt_v, _ = conv_transpose2d_forward(v, w, np.zeros(g["c"]), g["stride"], g["pad"], out_pad)
    assert convt_v.shape == u.shape
    lhs, rhs = np.sum(conv_u * v), np.sum(u * convt_v)
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)


@given(geometry, seeds)
def test_transposed_conv_fast_path_and_gradients(g, seed):
    rng = np.random.default_rng(seed)
    x, w, b, out_pad = transpose_args(g, rng)
    args = [x, w, b, g["stride"], g["pad"], out_pad]
    y, _ = conv_transpose2d_forward(*args)
    np.testing.assert_allclose(y, conv_transpose2d_forward_reference(*args), rtol=1e-12,
                               atol=1e-12)
    errors = check_op(conv_transpose2d_forward, conv_transpose2d_backward, args, wrt=[0, 1, 2],
                      rng=rng)
    assert max(errors.values()) <= TOL, errors


def test_known_values():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    # a 1x1 filter of weight 2 doubles; a bias adds
    y, _ = conv2d_forward(x, np.full((1, 1, 1, 1), 2.0), np.array([0.5]))
    np.testing.assert_array_equal(y, 2 * x + 0.5)
    # a 2x2 box filter with stride 2 sums each non-overlapping 2x2 block
    y, _ = conv2d_forward(x, np.ones((1, 1, 2, 2)), np.zeros(1), stride=2)
    np.testing.assert_array_equal(y[0, 0], [[0 + 1 + 4 + 5, 2 + 3 + 6 + 7],
                                            [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]])
    # a delta at the kernel's corner, pad 1: the output is x shifted by one pixel
    delta = np.zeros((1, 1, 3, 3))
    delta[0, 0, 0, 0] = 1.0
    y, _ = conv2d_forward(x, delta, np.zeros(1), pad=1)
    np.testing.assert_array_equal(y[0, 0, 1:, 1:], x[0, 0, :3, :3])
    np.testing.assert_array_equal(y[0, 0, 0, :], 0)
    # the transposed 2x2 stride-2 box spreads each pixel over a 2x2 block
    t, _ = conv_transpose2d_forward(np.array([[[[1.0, 2.0]]]]), np.ones((1, 1, 2, 2)),
                                    np.zeros(1), stride=2)
    np.testing.assert_array_equal(t[0, 0], [[1, 1, 2, 2], [1, 1, 2, 2]])


def test_the_models_geometry_28_14_7_and_back():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 28, 28))
    h1, _ = conv2d_forward(x, rng.standard_normal((32, 1, 4, 4)), np.zeros(32), 2, 1)
    h2, _ = conv2d_forward(h1, rng.standard_normal((64, 32, 4, 4)), np.zeros(64), 2, 1)
    assert h1.shape == (2, 32, 14, 14) and h2.shape == (2, 64, 7, 7)
    u1, _ = conv_transpose2d_forward(h2, rng.standard_normal((64, 32, 4, 4)), np.zeros(32), 2, 1)
    u2, _ = conv_transpose2d_forward(u1, rng.standard_normal((32, 1, 4, 4)), np.zeros(1), 2, 1)
    assert u1.shape == (2, 32, 14, 14) and u2.shape == (2, 1, 28, 28)


@pytest.mark.parametrize("bad, match", [
    (dict(stride=0), "stride"), (dict(pad=-1), "pad"),
    (dict(w=np.zeros((2, 3, 3, 3))), "channels"), (dict(b=np.zeros(3)), "b must"),
    (dict(w=np.zeros((2, 1, 9, 9))), "does not fit"),
    # sizes that are not integers are refused, not truncated (stride 1.5 ran as stride 1)
    (dict(stride=1.5), "stride must be an integer >= 1, got 1.5"),
    (dict(stride=True), "stride must be an integer >= 1, got True"),
    (dict(stride="2"), "stride must be an integer >= 1, got '2'"),
    (dict(pad=0.9), "pad must be an integer >= 0, got 0.9"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(x=np.zeros((1, 1, 4, 4)), w=np.zeros((2, 1, 3, 3)), b=np.zeros(2), stride=1,
                pad=0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        conv2d_forward(**args)


@pytest.mark.parametrize("bad, match", [
    (dict(stride=2.0), "stride must be an integer"),
    (dict(output_pad=1.7, stride=2), r"output_pad must be an integer in \[0, stride\) = \[0, 2\), got 1.7"),
    (dict(output_pad=1, stride=1), r"output_pad must be an integer in \[0, stride\)"),
])
def test_bad_transpose_arguments_are_named(bad, match):
    args = dict(x=np.zeros((1, 2, 3, 3)), w=np.zeros((2, 1, 3, 3)), b=np.zeros(1), stride=1,
                pad=0, output_pad=0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        conv_transpose2d_forward(**args)


X, W, B = np.ones((1, 1, 4, 4)), np.ones((2, 1, 3, 3)), np.zeros(2)  # conv: x, w, b
XT, WT, BT = np.ones((1, 2, 3, 3)), np.ones((2, 1, 3, 3)), np.zeros(1)  # conv^T: x, w, b
NAN, INF = np.full((1, 1, 4, 4), np.nan), np.array([1.0, np.inf])
EMPTY = [  # an empty kernel gave an output of bare biases, an empty image one of zeros
    (conv2d_forward, (X, np.ones((2, 1, 0, 3)), B), r"w must have no axis of size 0 .*\(2, 1, 0, 3\)"),
    (conv2d_forward, (X, np.ones((0, 1, 3, 3)), np.zeros(0)), "w must have no axis of size 0"),
    (conv2d_forward, (np.ones((1, 0, 4, 4)), np.ones((2, 0, 3, 3)), B), "x must have at least one"),
    (conv2d_forward, (np.ones((1, 1, 0, 4)), W, B, 1, 1), "x must have at least one"),
    (conv2d_forward_reference, (X, np.ones((2, 1, 0, 3)), B), "w must have no axis of size 0"),
    (conv_transpose2d_forward, (np.ones((1, 2, 0, 3)), WT, BT), "x must have at least one"),
    (conv_transpose2d_forward, (XT, np.ones((2, 1, 0, 0)), BT), "w must have no axis of size 0"),
]
NOT_FINITE = [
    (conv2d_forward, (NAN, W, B), r"x must be finite, but it holds nan at index \(0, 0, 0, 0\)"),
    (conv2d_forward, (X, W, INF), r"b must be finite, but it holds inf at index \(1,\)"),
    (conv2d_forward_reference, (X, W * np.nan, B), "w must be finite"),
    (conv_transpose2d_forward, (XT * np.inf, WT, BT), "x must be finite"),
    (conv_transpose2d_forward, (XT, WT * np.nan, BT), "w must be finite"),
    (conv_transpose2d_forward_reference, (XT, WT, BT * np.nan), "b must be finite"),
]


@pytest.mark.parametrize("op, args, match", EMPTY + NOT_FINITE)
def test_empty_sizes_and_nan_or_inf_are_refused_by_name(op, args, match):
    with pytest.raises(ValueError, match=match):
        op(*args)


def test_an_empty_batch_is_fine_and_trusted_inputs_are_not_scanned():
    y, cache = conv2d_forward(np.ones((0, 1, 4, 4)), W, B, 1, 1)
    assert y.shape == (0, 2, 4, 4) and conv2d_backward(y, cache)[0].shape == (0, 1, 4, 4)
    with trusted():  # a model checks its data once and runs its chain here (no scan)
        y, _ = conv2d_forward(NAN, W, B)
    assert np.isnan(y).all()


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_backward_passes_refuse_a_dy_unlike_the_forward_output(backend):
    # the compiled loops trust dy's sizes: a dy with the right number of entries in the
    # wrong shape read and wrote outside its buffers on the Numba backend
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 1, 4, 4)), rng.standard_normal((2, 1, 3, 3))
    xt, wt = rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((2, 1, 3, 3))
    with use_backend(backend):
        _, cache = conv2d_forward(x, w, np.zeros(2))  # y (1, 2, 2, 2)
        _, cache_t = conv_transpose2d_forward(xt, wt, np.zeros(1))  # y (1, 1, 5, 5)
        with pytest.raises(ValueError, match=r"dy must have shape \(1, 2, 2, 2\), got \(1, 2, 1, 4\)"):
            conv2d_backward(np.ones((1, 2, 1, 4)), cache)
        with pytest.raises(ValueError, match=r"dy must have shape \(1, 1, 5, 5\), got \(1, 1, 4, 4\)"):
            conv_transpose2d_backward(np.ones((1, 1, 4, 4)), cache_t)
        with pytest.raises(ValueError, match="dy must have dtype float64 like the forward output"):
            conv2d_backward(np.ones((1, 2, 2, 2), np.float32), cache)
        with pytest.raises(ValueError, match="dy must have dtype float64 like the forward output"):
            conv_transpose2d_backward(np.ones((1, 1, 5, 5), np.float32), cache_t)
        with pytest.raises(ValueError, match="dy must have 4 dimensions"):
            conv2d_backward(np.ones((2, 2, 2)), cache)


SPECIAL = np.array([np.nan, np.inf, -np.inf, 5e-324, -5e-324, 1e-310, 1e-40, -1e-44, 0.0, -0.0])
# (the last non-zero values are subnormal in float32, the ones before in float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(geometry, seeds)
def test_im2col_and_col2im_twins_agree_exactly_on_special_values(dtype, g, seed):
    # laying out windows is a copy and summing them back adds in the same (k, l) order in
    # both twins, so they agree bit for bit, NaN, infinities and subnormals included
    rng = np.random.default_rng(seed)
    x, w, _ = conv_args(g, rng)
    special = rng.random(x.shape) < 0.3
    x = np.where(special, rng.choice(SPECIAL, size=x.shape), x).astype(dtype)
    kh, kw, s, p = g["kh"], g["kw"], g["stride"], g["pad"]
    oh, ow = conv_output_size(g["h"], kh, s, p), conv_output_size(g["w"], kw, s, p)
    cols = conv._im2col.numba(x, kh, kw, s, p, oh, ow)
    np.testing.assert_array_equal(cols, conv._im2col.numpy(x, kh, kw, s, p, oh, ow))
    assert cols.dtype == dtype and cols.shape == (g["n"] * oh * ow, g["c"] * kh * kw)
    spread = np.where(rng.random(cols.shape) < 0.3, rng.choice(SPECIAL, size=cols.shape),
                      rng.standard_normal(cols.shape)).astype(dtype)
    with np.errstate(invalid="ignore"):  # inf + (-inf) is NaN in both, by design
        got = conv._col2im.numba(spread, x.shape, kh, kw, s, p, oh, ow)
        want = conv._col2im.numpy(spread, x.shape, kh, kw, s, p, oh, ow)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == dtype and got.shape == x.shape


@given(geometry, seeds)
def test_col2im_is_the_adjoint_of_im2col(g, seed):
    # <im2col(x), c> = <x, col2im(c)>: the data gradient of (CONV.1)'s layout is (CONV.2)'s sum
    rng = np.random.default_rng(seed)
    x, _, _ = conv_args(g, rng)
    kh, kw, s, p = g["kh"], g["kw"], g["stride"], g["pad"]
    oh, ow = conv_output_size(g["h"], kh, s, p), conv_output_size(g["w"], kw, s, p)
    c = rng.standard_normal((g["n"] * oh * ow, g["c"] * kh * kw))
    for backend in ("numba", "numpy"):
        im2col, col2im = getattr(conv._im2col, backend), getattr(conv._col2im, backend)
        lhs = np.sum(im2col(x, kh, kw, s, p, oh, ow) * c)
        rhs = np.sum(x * col2im(c, x.shape, kh, kw, s, p, oh, ow))
        assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs), np.abs(c).sum())


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_im2col_rows_are_windows_in_k_l_c_order(backend):
    # row (n, i, j) is the window under output (i, j), channels fastest: (k, l, c) order,
    # the order _as_matrix gives the filters; a strided (non-contiguous) x is read as well
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6, 3)).transpose(0, 3, 1, 2)  # (N, C, H, W) = (2, 3, 5, 6)
    kh, kw, s, p = 3, 2, 2, 1
    oh, ow = conv_output_size(5, kh, s, p), conv_output_size(6, kw, s, p)
    cols = getattr(conv._im2col, backend)(x, kh, kw, s, p, oh, ow)
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    for n in range(2):
        for i in range(oh):
            for j in range(ow):
                window = xp[n, :, i * s:i * s + kh, j * s:j * s + kw]  # (C, KH, KW)
                np.testing.assert_array_equal(cols[(n * oh + i) * ow + j],
                                              window.transpose(1, 2, 0).ravel())
    w = rng.standard_normal((4, 3, kh, kw))
    np.testing.assert_array_equal(conv._as_filters(conv._as_matrix(w), w.shape), w)
