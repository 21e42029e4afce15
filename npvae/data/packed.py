"""Byte images kept with the blank ends of every image row trimmed off: the training
set in a third of its bytes, expanded back one batch at a time.

Each image is H rows of W pixels (D = H W). Of row k of image n only its span is kept,
from its first non-zero pixel to its last, both included:

    start[n, k]    where the span begins in the row (0 for a blank row)
    length[n, k]   how many pixels it holds (0 for a blank row)
    values[offset[n] : offset[n + 1]]   the spans of image n, row after row

Expanding writes each span back where it was and zero everywhere else, so for any
uint8 images x

    unpack(pack(x)) == x, byte for byte.                                          (BIN.2)

MNIST's training images keep 174 of their 784 bytes on average (the digit seldom
reaches the border: 813 of the 60,000 do); with 2 H = 56 bytes of spans and an 8-byte
offset per image,
60,000 images take 14 MiB instead of 45 MiB. Letters: N images, B batch rows,
D = H W pixels. docs/derivations.md, BIN.2.
"""
from __future__ import annotations

import numpy as np

from ..backend import dispatch, numba_kernel
from .rows import _bernoulli_rows_numpy, _index, check_sample_args, check_uniforms_used


def _span_pixels(start, length, width, d) -> tuple:
    """Every kept pixel of images with spans start, length (B, H): its flat position in a
    (B, D) array and its place among the kept bytes, both (P,) in row order."""
    B, H = start.shape
    lens = length.astype(np.int64).ravel()  # (B H,) span lengths, row by row
    first = np.cumsum(lens) - lens  # (B H,) where each span's bytes begin among the kept
    within = np.arange(lens.sum()) - np.repeat(first, lens)  # (P,) place within its span
    span0 = (np.arange(B)[:, None] * d + np.arange(H)[None, :] * width + start).ravel()
    return np.repeat(span0, lens) + within, np.repeat(first, lens) + within


def _unpack_rows_numpy(start, length, offset, values, idx, width, out):
    """start, length (N, H); offset (N + 1,); values (T,) uint8; idx (B,) -> out (B, D) uint8."""
    out[...] = 0
    dst, kept = _span_pixels(start[idx], length[idx], width, out.shape[1])  # (P,) each
    per = length[idx].sum(axis=1, dtype=np.int64)  # (B,) bytes kept of each image
    before = np.cumsum(per) - per  # (B,) where its bytes begin among the batch's
    out.reshape(-1)[dst] = values[kept + np.repeat(offset[idx] - before, per)]
    return out


@numba_kernel
def _unpack_rows_numba(start, length, offset, values, idx, width, out):
    """The same, one image row at a time; see the NumPy twin. The offsets are cast to
    unsigned integers, so no index into out or values needs the check for a negative one
    (a third of the time on M2)."""
    D, W = np.uint64(out.shape[1]), np.uint64(width)
    flat = out.reshape(-1)  # (B D,)
    flat[:] = 0
    for r in range(idx.shape[0]):
        n = idx[r]
        o = np.uint64(offset[n])  # where image n's bytes begin in values
        for k in range(start.shape[1]):
            base = np.uint64(r) * D + np.uint64(k) * W + np.uint64(start[n, k])
            m = np.uint64(length[n, k])
            for j in range(m):
                flat[base + j] = values[o + j]
            o += m
    return out


_unpack_rows = dispatch(_unpack_rows_numpy, _unpack_rows_numba)


def _nonzero_kept_numpy(offset, values, idx):
    """offset (N + 1,), values (T,) uint8, idx (B,) -> the non-zero bytes of images idx."""
    return int(sum(np.count_nonzero(values[offset[n]:offset[n + 1]]) for n in idx))


@numba_kernel
def _nonzero_kept_numba(offset, values, idx):
    """The same, one image at a time; see the NumPy twin. Bytes outside the spans are zero."""
    m = 0
    for r in range(idx.shape[0]):
        for t in range(offset[idx[r]], offset[idx[r] + 1]):
            m += values[t] != 0
    return m


_nonzero_kept = dispatch(_nonzero_kept_numpy, _nonzero_kept_numba)


def _float_rows_numpy(start, length, offset, values, idx, width, u, scale, sample, out):
    """Spans of images idx -> out (B, D) float, from their bytes b in out's dtype:
    b / scale, or with ``sample`` the sample (BIN.1) of b / scale from the uniforms u (M,).
    Expands the bytes, then divides or samples them. Returns the number of non-zero
    bytes (0 without ``sample``); a sample writes nothing unless that is M."""
    b = _unpack_rows_numpy(start, length, offset, values, idx, width,
                           np.empty(out.shape, np.uint8))  # (B, D) bytes
    if sample:
        return _bernoulli_rows_numpy(b, np.arange(len(idx)), u, scale, out)
    np.divide(b, scale, out=out)
    return 0


@numba_kernel
def _float_rows_numba(start, length, offset, values, idx, width, u, scale, sample, out):
    """The same without the bytes: zero the batch, then write each kept byte's float in
    place, in reading order. With too few uniforms a sample leaves 0 where they ran out,
    reads none past the end, and still counts every non-zero byte."""
    D, W = np.uint64(out.shape[1]), np.uint64(width)
    flat = out.reshape(-1)  # (B D,)
    flat[:] = 0
    j, m = 0, u.shape[0]  # the next unused uniform, how many there are
    for r in range(idx.shape[0]):
        n = idx[r]
        o = np.uint64(offset[n])  # where image n's bytes begin in values
        for k in range(start.shape[1]):
            base = np.uint64(r) * D + np.uint64(k) * W + np.uint64(start[n, k])
            span = np.uint64(length[n, k])
            for t in range(span):
                i = base + t
                if not sample:
                    flat[i] = values[o + t]  # the byte, widened to out's dtype
                    flat[i] = flat[i] / scale
                elif values[o + t] != 0:
                    if j < m:
                        flat[i] = values[o + t]
                        flat[i] = u[j] < flat[i] / scale  # (BIN.1)
                    j += 1
            o += span
    return j


_float_rows = dispatch(_float_rows_numpy, _float_rows_numba)


# Packing runs once, before training, in NumPy alone: compiled, it would load Numba's
# compiler (about 110 MiB) while the dense images are still in memory, and that moment
# would be the run's peak. At 0.17 s for MNIST's training images on M2 it costs little.

def _row_spans(block, width: int, span_type) -> tuple:
    """block (b, D) uint8 -> start, length (b, H): each row's first non-zero pixel and how
    many pixels reach its last one (0, 0 for a blank row)."""
    rows = block.reshape(len(block), -1, width)  # (b, H, W)
    nonzero = rows != 0
    first = nonzero.argmax(axis=2)  # (b, H): 0 for a blank row too, as it must be
    last = width - 1 - nonzero[:, :, ::-1].argmax(axis=2)  # (b, H)
    kept = np.take_along_axis(nonzero, first[..., None], axis=2)[..., 0]  # (b, H): not blank
    return first.astype(span_type), np.where(kept, last - first + 1, 0).astype(span_type)


def _kept_bytes(block, width: int, start, length) -> np.ndarray:
    """block (b, D) uint8, spans (b, H) -> (P,) the bytes inside the spans, in row order."""
    col = np.arange(width, dtype=start.dtype)  # (W,)
    inside = (col >= start[..., None]) & (col < (start + length)[..., None])  # (b, H, W)
    return block.reshape(len(block), -1, width)[inside]  # C order: image by image, row by row


def _check_spans(start, length, offset, values, width) -> None:
    """ValueError unless start, length (N, H) unsigned, offset (N + 1,) int64 and values
    (T,) uint8 describe N images of H rows ``width`` bytes long: each span inside its row,
    and offset[n + 1] - offset[n] the bytes image n keeps, from 0 up to T."""
    arrays = dict(start=start, length=length, offset=offset, values=values)
    if not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays.values()):
        raise ValueError("start, length, offset and values must be C-contiguous numpy arrays")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise ValueError(f"width must be a whole number of pixels >= 1, got {width!r}")
    if not (start.ndim == length.ndim == 2 and start.shape == length.shape
            and start.dtype == length.dtype and start.dtype.kind == "u"
            and start.dtype.isnative):
        raise ValueError(f"start and length must be (N, H) arrays of one native unsigned "
                         f"integer type, got {start.dtype} {start.shape} and "
                         f"{length.dtype} {length.shape}")
    n = start.shape[0]
    if offset.dtype != np.int64 or offset.shape != (n + 1,) or values.dtype != np.uint8 \
            or values.ndim != 1:
        raise ValueError(f"offset must be int64 ({n + 1},) and values uint8 (T,), got "
                         f"{offset.dtype} {offset.shape} and {values.dtype} {values.shape}")
    ends = np.add(start, length, dtype=np.int32)  # (N, H): one past each span's last pixel
    kept = np.zeros(n + 1, np.int64)
    np.cumsum(length.sum(axis=1, dtype=np.int64), out=kept[1:])  # what offset must be
    if ends.size and ends.max() > width:
        raise ValueError(f"every span must lie inside its row of {width} pixels")
    if not np.array_equal(offset, kept) or kept[-1] != values.size:
        raise ValueError("offset must count each image's kept bytes from 0 up to "
                         f"values.size ({values.size})")


class PackedImages:
    """N byte images (N, D) held as trimmed row spans; see the module docstring.

    Build one with :meth:`pack`. ``shape``, ``dtype`` (uint8), ``len`` and ``nbytes`` read as
    for the dense array; :meth:`rows` expands a batch, :meth:`blocks` walks all images.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, start, length, offset, values, width: int):
        """The arrays :meth:`pack` makes; checked, since the compiled loops that expand
        them trust every span to lie inside its row and every offset to its bytes."""
        _check_spans(start, length, offset, values, width)
        self.start, self.length, self.offset, self.values = start, length, offset, values
        self.width = int(width)
        self.shape = (start.shape[0], start.shape[1] * self.width)

    @classmethod
    def pack(cls, images, width: int | None = None, rows: int = 4096) -> "PackedImages":
        """uint8 images (N, H, W), or (N, D) with rows ``width`` pixels long, packed ``rows``
        images at a time (the masks stay small)."""
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8
                and images.ndim in (2, 3)):
            raise ValueError("images must be a uint8 array (N, H, W) or (N, D), got "
                             + (f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray)
                                else type(images).__name__))
        if images.ndim == 3:
            if width is not None and width != images.shape[2]:
                raise ValueError(f"width {width} does not match the images' rows "
                                 f"({images.shape[2]} pixels)")
            n, h, w = images.shape
            width, images = w, images.reshape(n, h * w)
        elif width is None:
            raise ValueError("width (pixels per image row) is needed for images given as "
                             "(N, D); for MNIST's (N, 784), width=28")
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"rows (images packed at a time) must be an integer >= 1, "
                             f"got {rows!r}")
        return cls.from_blocks((images[i:i + rows] for i in range(0, len(images), rows)),
                               images.shape[1], width)

    @classmethod
    def from_blocks(cls, blocks, d: int, width: int) -> "PackedImages":
        """Pack consecutive (b, D) uint8 blocks as one set of images (rows ``width`` long)."""
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) \
                or width < 1 or d % width:
            raise ValueError(f"width must be a whole number of pixels dividing D = {d}, "
                             f"got {width!r}")
        width = int(width)
        span_type = np.min_scalar_type(width)  # uint8 for rows up to 255 pixels
        h = d // width
        starts, lengths, values = [], [], []
        for block in blocks:
            if not (isinstance(block, np.ndarray) and block.dtype == np.uint8
                    and block.ndim == 2 and block.shape[1] == d):
                raise ValueError(f"every block must be a uint8 array (b, {d}), got "
                                 + (f"{block.dtype} {block.shape}" if isinstance(block, np.ndarray)
                                    else type(block).__name__))
            block = np.ascontiguousarray(block)  # (b, D)
            start, length = _row_spans(block, width, span_type)  # (b, H) each
            values.append(_kept_bytes(block, width, start, length))
            starts.append(start)
            lengths.append(length)
        start = np.concatenate(starts) if starts else np.zeros((0, h), span_type)
        length = np.concatenate(lengths) if lengths else np.zeros((0, h), span_type)
        offset = np.zeros(len(start) + 1, dtype=np.int64)
        np.cumsum(length.sum(axis=1, dtype=np.int64), out=offset[1:])
        values = np.concatenate(values) if values else np.zeros(0, np.uint8)
        return cls(start, length, offset, values, width)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        """``np.asarray(packed)``: the dense (N, D) bytes (a new array)."""
        dense = self.unpack()
        return dense if dtype is None else dense.astype(dtype)

    def __repr__(self) -> str:
        return (f"PackedImages({self.shape[0]} images of {self.shape[1]} bytes in rows of "
                f"{self.width}, {self.nbytes:,} bytes)")

    @property
    def nbytes(self) -> int:
        """The bytes held: spans, offsets and the kept pixels."""
        return sum(a.nbytes for a in (self.start, self.length, self.offset, self.values))

    def rows(self, idx, out=None) -> np.ndarray:
        """Images ``idx`` (B,) expanded to bytes: out (B, D) uint8, written and returned."""
        idx = _index(idx, len(self))  # native integers: the compiled kernel reads no other
        shape = (idx.shape[0], self.shape[1])
        if out is None:
            out = np.empty(shape, dtype=np.uint8)
        elif not (isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == shape
                  and out.flags.c_contiguous and out.flags.writeable):
            raise ValueError(f"out must be a writeable C-contiguous uint8 array of shape {shape}")
        return _unpack_rows(self.start, self.length, self.offset, self.values, idx,
                            self.width, out)

    def scaled_rows(self, idx, out, scale=255) -> np.ndarray:
        """Images ``idx`` (B,) as floats, byte / ``scale`` (255 gives [0, 1]), without
        expanding them to bytes first: what dividing :meth:`rows` by ``scale`` in out's
        dtype gives. out (B, D) float32 or float64, C-contiguous, written and returned."""
        idx = _index(idx, len(self))
        shape = (idx.shape[0], self.shape[1])
        if not (isinstance(out, np.ndarray) and out.shape == shape and out.flags.writeable
                and out.flags.c_contiguous
                and out.dtype in (np.dtype(np.float32), np.dtype(np.float64))):
            raise ValueError(f"out must be a writeable C-contiguous float32 or float64 "
                             f"array of shape {shape}")
        s = None  # scale in out's dtype, where the division is made
        if isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, bool):
            with np.errstate(over="ignore"):
                try:
                    s = out.dtype.type(scale)
                except OverflowError:  # an int beyond any float
                    pass
        if s is None or not np.finfo(out.dtype).tiny <= s < np.inf:  # NaN fails both
            raise ValueError(f"scale must be a positive number, normal and finite in "
                             f"{out.dtype}, got {scale!r}")
        _float_rows(self.start, self.length, self.offset, self.values, idx, self.width,
                    np.zeros(0, out.dtype), s, False, out)
        return out

    def nonzero_in_rows(self, idx) -> int:
        """M: the non-zero bytes of images ``idx`` (B,), each counted as often as ``idx``
        names it; the number of uniforms :meth:`bernoulli_rows` takes."""
        idx = _index(idx, len(self))
        return int(_nonzero_kept(self.offset, self.values, idx))

    def bernoulli_rows(self, idx, u, out) -> np.ndarray:
        """Images ``idx`` (B,) as a binary sample, each pixel 1 with probability byte / 255:
        what :func:`npvae.data.rows.bernoulli_rows` gives for the dense bytes, from the
        spans without expanding them (BIN.1, BIN.2). u (M,) uniforms in [0, 1), one per
        non-zero byte in reading order, M = ``nonzero_in_rows(idx)``, with the dtype of
        ``out``; out (B, D) float32 or float64, C-contiguous, not overlapping u, written
        and returned."""
        idx = _index(idx, len(self))
        check_sample_args(u, out, (idx.shape[0], self.shape[1]))
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        check_uniforms_used(int(_float_rows(self.start, self.length, self.offset, self.values,
                                            idx, self.width, u, out.dtype.type(255), True,
                                            out)), u)
        return out

    def blocks(self, rows: int = 4096):
        """(first image, (b, D) uint8 block) for every ``rows`` images in order."""
        for first in range(0, len(self), rows):
            yield first, self.rows(np.arange(first, min(first + rows, len(self))))

    def unpack(self) -> np.ndarray:
        """All images as one dense (N, D) uint8 array."""
        out = np.empty(self.shape, dtype=np.uint8)
        for first, block in self.blocks():
            out[first:first + len(block)] = block
        return out
