"""Two-dimensional convolution and its adjoint, the transposed convolution.

Layout NCHW. x (N, C, H, W) is convolved with a filter bank w (F, C, KH, KW), stride s
and zero padding p on every side, plus a bias b (F,):

    y[n, f, i, j] = b[f] + sum_{c, k, l} w[f, c, k, l] xp[n, c, s i + k, s j + l]     (CONV.1)

where xp is x padded with p zeros; y is (N, F, OH, OW), OH = (H + 2p - KH) // s + 1.
Each output reads a KH x KW window of xp, so the backward pass spreads each dy back over
the window it came from (CONV.2), and the filter gradient correlates x with dy (CONV.3):

    dxp[n, c, s i + k, s j + l] += sum_f w[f, c, k, l] dy[n, f, i, j]                (CONV.2)
    dw[f, c, k, l] = sum_{n, i, j} dy[n, f, i, j] xp[n, c, s i + k, s j + l]          (CONV.3)
    db[f] = sum_{n, i, j} dy[n, f, i, j]                                              (CONV.4)

The transposed convolution is the map whose matrix is the transpose of (CONV.1)'s: what
(CONV.2) does to dy, it does to its input (CONVT.1). So its forward is conv2d's input
gradient and its input gradient is conv2d's forward (CONVT.2).

Every op here comes twice: a direct-loop reference (``*_reference``) to read beside the
equations, one output position or one window offset at a time, and the fast path the
models use, which lays the windows out as the rows of a matrix ("im2col") so that
(CONV.1) and (CONV.3) become one BLAS product each, and (CONV.2) a product followed by
KH x KW strided additions ("col2im"). The references are NumPy; so are the products.
Laying out the windows and summing them back are compiled loops, each beside a NumPy
twin of strided views (the backend switch picks one); tests check all of them agree.

The forward functions check their inputs: ranks, sizes (all >= 1 but the batch), one dtype,
and no NaN or inf in x, w and b (skipped inside ``npvae._validate.trusted()``, where a model
that checked its data runs its chain), as the VQ and softmax ops do. The backward functions
check dy against the forward output's shape and dtype: the compiled loops trust their sizes.

Letters: N batch, C input channels, F output channels (filters), H x W input size,
KH x KW kernel, OH x OW output size, s stride, p padding. docs/derivations.md, CONV.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate as v
from ..backend import dispatch, numba_kernel


# ----------------------------------------------------------------------------------
# Shapes and checks


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """(size + 2 pad - kernel) // stride + 1, the number of window positions along an axis."""
    return (size + 2 * pad - kernel) // stride + 1


def _check_geometry(stride, pad):
    """stride >= 1 and pad >= 0, each an integer (a float, bool or string is refused, not truncated)."""
    if not (v.is_integer(stride) and stride >= 1):
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    if not (v.is_integer(pad) and pad >= 0):
        raise ValueError(f"pad must be an integer >= 0, got {pad!r}")
    return int(stride), int(pad)


def _check_sizes(x, w):
    """Every size but the batch must be >= 1: an empty kernel, filter bank or image has no
    windows (a 0 x 2 kernel gave an output of bare biases)."""
    if 0 in x.shape[1:]:
        raise ValueError(f"x must have at least one channel, row and column, got shape {x.shape}")
    if 0 in w.shape:
        raise ValueError(f"w must have no axis of size 0 (filters, channels or kernel), "
                         f"got shape {w.shape}")


def _check_conv(x, w, b, stride, pad):
    v.array("x", x, 4), v.array("w", w, 4), v.array("b", b, 1)
    stride, pad = _check_geometry(stride, pad)
    _check_sizes(x, w)
    n, c, h, wd = x.shape
    f, cw, kh, kw = w.shape
    if cw != c:
        raise ValueError(f"x has {c} channels but w expects {cw} (w is (F, C, KH, KW) = {w.shape})")
    if b.shape != (f,):
        raise ValueError(f"b must have shape ({f},), got {b.shape}")
    if kh > h + 2 * pad or kw > wd + 2 * pad:
        raise ValueError(f"a {kh}x{kw} kernel does not fit a {h}x{wd} input padded by {pad}")
    if not (x.dtype == w.dtype == b.dtype):
        raise ValueError(f"x, w and b must share a dtype, got {x.dtype}, {w.dtype}, {b.dtype}")
    v.finite("x", x), v.finite("w", w), v.finite("b", b)
    return stride, pad


def _check_dy(dy, y_shape, dtype):
    """dy must have the forward output's shape and dtype: the compiled loops of the backward
    pass take their sizes from the cache and do not check bounds."""
    v.array("dy", dy, 4)
    v.shape("dy", dy, tuple(y_shape))
    if dy.dtype != dtype:
        raise ValueError(f"dy must have dtype {dtype} like the forward output, got {dy.dtype}")


def _pad(x, pad):
    """x (N, C, H, W) -> (N, C, H + 2 pad, W + 2 pad) with zeros around."""
    if pad == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def _unpad(xp, pad):
    return xp if pad == 0 else xp[:, :, pad:-pad, pad:-pad]


# ----------------------------------------------------------------------------------
# The direct-loop references: the equations as written


def conv2d_forward_reference(x, w, b, stride: int = 1, pad: int = 0):
    """(CONV.1) one output position at a time.  x (N, C, H, W) -> y (N, F, OH, OW)."""
    stride, pad = _check_conv(x, w, b, stride, pad)
    f, _, kh, kw = w.shape
    xp = _pad(x, pad)
    oh = conv_output_size(x.shape[2], kh, stride, pad)
    ow = conv_output_size(x.shape[3], kw, stride, pad)
    y = np.empty((x.shape[0], f, oh, ow), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            window = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]  # (N, C, KH, KW)
            y[:, :, i, j] = np.einsum("nckl,fckl->nf", window, w) + b  # (N, F)  (CONV.1)
    return y


def conv2d_backward_reference(dy, x, w, stride: int = 1, pad: int = 0):
    """(CONV.2-4) one output position at a time.  dy (N, F, OH, OW) -> dx, dw, db."""
    f, _, kh, kw = w.shape
    xp = _pad(x, pad)
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(dy.shape[2]):
        for j in range(dy.shape[3]):
            rows, cols = slice(i * stride, i * stride + kh), slice(j * stride, j * stride + kw)
            g = dy[:, :, i, j]  # (N, F)
            dxp[:, :, rows, cols] += np.einsum("nf,fckl->nckl", g, w)  # (N, C, KH, KW)  (CONV.2)
            dw += np.einsum("nf,nckl->fckl", g, xp[:, :, rows, cols])  # (F, C, KH, KW)  (CONV.3)
    db = dy.sum(axis=(0, 2, 3))  # (F,)  (CONV.4)
    return _unpad(dxp, pad), dw, db


# ----------------------------------------------------------------------------------
# The fast path: windows as matrix rows (im2col), one BLAS product per equation.
# Laying the windows out (im2col) and summing them back (col2im) are its two loops:
# each is a NumPy twin (strided views) beside a compiled loop over the same indices.


def _windows(xp, kh, kw, stride):
    """A read-only view (N, OH, OW, KH, KW, C) of every window of the padded input."""
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))  # (N, C, H', W', KH, KW)
    win = win[:, :, ::stride, ::stride]  # (N, C, OH, OW, KH, KW)
    return win.transpose(0, 2, 3, 4, 5, 1)


def _im2col_numpy(x, kh, kw, stride, pad, oh, ow):
    """x (N, C, H, W) -> cols (N*OH*OW, KH*KW*C): row (n, i, j) holds the window of the
    padded input under output position (i, j), in (k, l, c) order, channels fastest, so
    that one row of a window over all channels is KW*C consecutive entries (CONV.1)."""
    n, c = x.shape[:2]
    win = _windows(_pad(x, pad), kh, kw, stride)[:, :oh, :ow]  # (N, OH, OW, KH, KW, C) view
    return win.reshape(n * oh * ow, kh * kw * c)  # the copy of im2col


@numba_kernel
def _im2col_numba(x, kh, kw, stride, pad, oh, ow):
    """The same as :func:`_im2col_numpy` as loops. Each example is first copied, channels
    last, into a buffer with a zero border; the KW*C entries a window reads from one row
    of that buffer are then consecutive. Indices are unsigned: a signed one could be
    negative (counted from the end), and the check for that stops the copies from being
    vectorized (3 times slower)."""
    u = np.uint64
    n, c, h, w = u(x.shape[0]), u(x.shape[1]), u(x.shape[2]), u(x.shape[3])
    kh, kw, stride, pad, oh, ow = u(kh), u(kw), u(stride), u(pad), u(oh), u(ow)
    run = kw * c  # the entries of one window row
    cols = np.empty((n * oh * ow, kh * run), dtype=x.dtype)
    xp = np.zeros((h + u(2) * pad, (w + u(2) * pad) * c), dtype=x.dtype)  # (H', W' C), border 0
    for b in range(n):
        for ch in range(c):
            for r in range(h):
                for q in range(w):
                    xp[pad + r, (pad + q) * c + ch] = x[b, ch, r, q]
        for i in range(oh):
            for j in range(ow):
                row = (b * oh + i) * ow + j
                at = j * stride * c
                for k in range(kh):
                    for m in range(run):
                        cols[row, k * run + m] = xp[i * stride + k, at + m]
    return cols


def _col2im_numpy(cols, x_shape, kh, kw, stride, pad, oh, ow):
    """Sum window-shaped rows back onto the input they were read from (CONV.2).

    cols (N*OH*OW, KH*KW*C) -> dx (N, C, H, W) = x_shape: for each offset (k, l) of the
    window, one strided addition of an (N, C, OH, OW) block. The offsets go from the last
    to the first, the order in which :func:`_col2im_numba` meets them at each entry.
    """
    n, c, h, w = x_shape
    blocks = cols.reshape(n, oh, ow, kh, kw, c)
    dxp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for k in reversed(range(kh)):
        for l in reversed(range(kw)):
            dxp[:, :, k:k + stride * oh:stride, l:l + stride * ow:stride] += \
                blocks[:, :, :, k, l].transpose(0, 3, 1, 2)  # (N, C, OH, OW)  (CONV.2)
    return np.ascontiguousarray(_unpad(dxp, pad))


@numba_kernel
def _col2im_numba(cols, x_shape, kh, kw, stride, pad, oh, ow):
    """The same as :func:`_col2im_numpy` as loops, one row of cols at a time, each added
    onto one example kept channels last with a border, KW*C consecutive entries per
    window row; the border is dropped at the end. Rows come in order, so each entry
    receives its terms with (k, l) descending, as in the twin, and the two agree bit for
    bit. Indices are unsigned, as in :func:`_im2col_numba`."""
    u = np.uint64
    n, c, h, w = u(x_shape[0]), u(x_shape[1]), u(x_shape[2]), u(x_shape[3])
    kh, kw, stride, pad, oh, ow = u(kh), u(kw), u(stride), u(pad), u(oh), u(ow)
    run = kw * c  # the entries of one window row
    dx = np.empty((x_shape[0], x_shape[1], x_shape[2], x_shape[3]), dtype=cols.dtype)
    dxp = np.empty((h + u(2) * pad, (w + u(2) * pad) * c), dtype=cols.dtype)  # (H', W' C)
    row = u(0)  # the rows of cols, read in order: example b's windows are consecutive
    for b in range(n):
        dxp[...] = 0
        for i in range(oh):
            for j in range(ow):
                at = j * stride * c  # where window (i, j) starts in its row of dxp
                for k in range(kh):
                    for m in range(run):
                        dxp[i * stride + k, at + m] += cols[row, k * run + m]  # (CONV.2)
                row += u(1)
        for ch in range(c):
            for r in range(h):
                for q in range(w):
                    dx[b, ch, r, q] = dxp[pad + r, (pad + q) * c + ch]
    return dx


_im2col = dispatch(_im2col_numpy, _im2col_numba)
_col2im = dispatch(_col2im_numpy, _col2im_numba)


def _as_matrix(w):
    """Filters (A, B, KH, KW) -> (A, KH*KW*B), each row in the windows' (k, l, c) order."""
    return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


def _as_filters(m, shape):
    """The inverse of :func:`_as_matrix`: (A, KH*KW*B) -> (A, B, KH, KW) = shape."""
    a, b, kh, kw = shape
    return np.ascontiguousarray(m.reshape(a, kh, kw, b).transpose(0, 3, 1, 2))


class ConvCache(NamedTuple):
    cols: np.ndarray  # (N*OH*OW, KH*KW*C) the windows of the padded input, kept for dw
    w: np.ndarray  # (F, C, KH, KW) kept for dx
    x_shape: tuple  # (N, C, H, W)
    y_shape: tuple  # (N, F, OH, OW), the shape dy must have
    stride: int
    pad: int


def conv2d_forward(x, w, b, stride: int = 1, pad: int = 0):
    """y = conv(x, w) + b  (CONV.1).  x (N, C, H, W), w (F, C, KH, KW), b (F,) -> y (N, F, OH, OW)."""
    stride, pad = _check_conv(x, w, b, stride, pad)
    f, c, kh, kw = w.shape
    n = x.shape[0]
    oh = conv_output_size(x.shape[2], kh, stride, pad)
    ow = conv_output_size(x.shape[3], kw, stride, pad)
    cols = _im2col(x, kh, kw, stride, pad, oh, ow)  # (N*OH*OW, KH*KW*C)
    y = cols @ _as_matrix(w).T  # (N*OH*OW, F)  (CONV.1)
    y += b
    y = y.reshape(n, oh, ow, f).transpose(0, 3, 1, 2)  # (N, F, OH, OW)
    return np.ascontiguousarray(y), ConvCache(cols, w, x.shape, y.shape, stride, pad)


def conv2d_backward(dy, cache: ConvCache, need_dx: bool = True):
    """dy (N, F, OH, OW) -> dx (N, C, H, W), dw (F, C, KH, KW), db (F,)  (CONV.2-4).

    ``need_dx=False`` when x is data: dx is then None and its product is skipped.
    """
    cols, w, x_shape, y_shape, stride, pad = cache
    _check_dy(dy, y_shape, w.dtype)
    f, c, kh, kw = w.shape
    n, _, oh, ow = dy.shape
    g = dy.transpose(0, 2, 3, 1).reshape(n * oh * ow, f)  # (N*OH*OW, F)
    dw = _as_filters(g.T @ cols, w.shape)  # (F, C, KH, KW)  (CONV.3)
    db = g.sum(axis=0)  # (F,)  (CONV.4)
    if not need_dx:
        return None, dw, db
    dcols = g @ _as_matrix(w)  # (N*OH*OW, KH*KW*C)
    dx = _col2im(dcols, tuple(x_shape), kh, kw, stride, pad, oh, ow)  # (N, C, H, W)  (CONV.2)
    return dx, dw, db


# ----------------------------------------------------------------------------------
# Transposed convolution: the adjoint of conv2d in its input (CONVT.1-2)


def conv_transpose_output_size(size: int, kernel: int, stride: int, pad: int,
                               output_pad: int = 0) -> int:
    """(size - 1) stride - 2 pad + kernel + output_pad: the input size of the conv whose
    output has ``size`` positions (output_pad in [0, stride) picks among the sizes the
    floor in conv_output_size maps to the same ``size``)."""
    return (size - 1) * stride - 2 * pad + kernel + output_pad


def _check_transpose(x, w, b, stride, pad, output_pad):
    v.array("x", x, 4), v.array("w", w, 4), v.array("b", b, 1)
    stride, pad = _check_geometry(stride, pad)
    if not (v.is_integer(output_pad) and 0 <= output_pad < stride):
        raise ValueError(f"output_pad must be an integer in [0, stride) = [0, {stride}), "
                         f"got {output_pad!r}")
    output_pad = int(output_pad)
    _check_sizes(x, w)
    c_in, f_out, kh, kw = w.shape
    if x.shape[1] != c_in:
        raise ValueError(f"x has {x.shape[1]} channels but w expects {c_in} "
                         f"(w is (C_in, C_out, KH, KW) = {w.shape})")
    if b.shape != (f_out,):
        raise ValueError(f"b must have shape ({f_out},), got {b.shape}")
    oh = conv_transpose_output_size(x.shape[2], kh, stride, pad, output_pad)
    ow = conv_transpose_output_size(x.shape[3], kw, stride, pad, output_pad)
    if oh < 1 or ow < 1:
        raise ValueError(f"the output would be {oh}x{ow}: pad {pad} is too large")
    if not (x.dtype == w.dtype == b.dtype):
        raise ValueError(f"x, w and b must share a dtype, got {x.dtype}, {w.dtype}, {b.dtype}")
    v.finite("x", x), v.finite("w", w), v.finite("b", b)
    return stride, pad, output_pad, oh, ow


class ConvTransposeCache(NamedTuple):
    g: np.ndarray  # (N*H*W, C_in) the input, one row per position, kept for dw
    x_shape: tuple  # (N, C_in, H, W)
    w: np.ndarray  # (C_in, C_out, KH, KW) kept for dx
    out_shape: tuple  # (N, C_out, OH, OW), the shape dy must have
    stride: int
    pad: int


def conv_transpose2d_forward(x, w, b, stride: int = 1, pad: int = 0, output_pad: int = 0):
    """y = conv^T(x, w) + b  (CONVT.1).

    x (N, C_in, H, W), w (C_in, C_out, KH, KW), b (C_out,) -> y (N, C_out, OH, OW) with
    OH = (H - 1) stride - 2 pad + KH + output_pad. conv^T with w is the transpose of the
    conv2d (stride, pad) from C_out to C_in channels with the same w: its forward is that
    conv's (CONV.2) applied to x.
    """
    stride, pad, output_pad, oh, ow = _check_transpose(x, w, b, stride, pad, output_pad)
    c_in, c_out, kh, kw = w.shape
    n, _, h, wd = x.shape
    g = x.transpose(0, 2, 3, 1).reshape(n * h * wd, c_in)  # (N*H*W, C_in)
    cols = g @ _as_matrix(w)  # (N*H*W, KH*KW*C_out)  (CONVT.1)
    y = _col2im(cols, (n, c_out, oh, ow), kh, kw, stride, pad, h, wd)  # (N, C_out, OH, OW)
    y += b[None, :, None, None]
    return y, ConvTransposeCache(g, x.shape, w, y.shape, stride, pad)


def conv_transpose2d_backward(dy, cache: ConvTransposeCache):
    """dy (N, C_out, OH, OW) -> dx (N, C_in, H, W), dw (C_in, C_out, KH, KW), db (C_out,).

    dx is the conv2d forward of dy with the same w (CONVT.2); dw correlates dy's windows
    with x, as (CONV.3) with the roles of input and output exchanged.
    """
    g, x_shape, w, out_shape, stride, pad = cache
    _check_dy(dy, out_shape, w.dtype)
    c_in, c_out, kh, kw = w.shape
    n, _, h, wd = x_shape
    cols = _im2col(dy, kh, kw, stride, pad, h, wd)  # (N*H*W, KH*KW*C_out)
    dx = (cols @ _as_matrix(w).T).reshape(n, h, wd, c_in).transpose(0, 3, 1, 2)  # (CONVT.2)
    dw = _as_filters(g.T @ cols, w.shape)  # (C_in, C_out, KH, KW)  (CONVT.2)
    db = dy.sum(axis=(0, 2, 3))  # (C_out,)  (CONV.4)
    return np.ascontiguousarray(dx), dw, db


def conv_transpose2d_forward_reference(x, w, b, stride: int = 1, pad: int = 0,
                                       output_pad: int = 0):
    """(CONVT.1) by scattering: each input pixel adds w times itself onto its window."""
    stride, pad, output_pad, oh, ow = _check_transpose(x, w, b, stride, pad, output_pad)
    c_in, c_out, kh, kw = w.shape
    n, _, h, wd = x.shape
    yp = np.zeros((n, c_out, oh + 2 * pad, ow + 2 * pad), dtype=x.dtype)
    for i in range(h):
        for j in range(wd):
            yp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw] += \
                np.einsum("nc,cfkl->nfkl", x[:, :, i, j], w)  # (N, C_out, KH, KW)  (CONVT.1)
    y = _unpad(yp, pad)[:, :, :oh, :ow]
    return y + b[None, :, None, None]
