"""Hypothesis strategies shared by the gradient tests: float64 arrays with bounded
values and shapes in the ranges the engine promises (batch 1-8, dims 1-12); and the
switch that sends their float64 input gradients through input_grad's transposed way."""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

batch = st.integers(1, 8)
dim = st.integers(1, 12)


def floats(lo=-3.0, hi=3.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)


def arrays(shape, lo=-3.0, hi=3.0):
    return hnp.arrays(np.float64, shape, elements=floats(lo, hi))


seeds = st.integers(0, 2**32 - 1)


def transposed_in_float64():
    """input_grad takes its transposed way in float64 too (in npvae only float32 does),
    so that the float64 gradient checks go through it."""
    from unittest import mock

    from npvae.ops import linear

    return mock.patch.object(linear, "TRANSPOSED_DTYPES", (np.dtype(np.float32), np.dtype(np.float64)))
