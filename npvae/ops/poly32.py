"""float32 constants for the compiled loops that evaluate exp and log1p by polynomials
(docs/derivations.md, IW.7 and LIK.5).

A loop that calls the C library's exp or log runs one scalar call per entry (about 15 ns).
NumPy's SIMD exp and log are fast with AVX-512 but three to four times slower with AVX2
code (benchmarks/RESULTS.md). A loop made only of multiplications, additions, divisions,
roundings and integer shifts vectorizes on every CPU:

    e^-t     = 2^-m e^g,  m = round(t log2 e),  g = m log 2 - t in [-log(2)/2, log(2)/2]
    e^g      = 1 + g + g^2/2! + ... + g^7/7!          (remainder below 8e-9 of e^g)
    log(1+u) = 2 atanh(s) = 2 (s + s^3/3 + ... + s^13/13),  s = u / (2 + u) in (0, 1/3]
                                                       (remainder below 1.1e-8)

The tuples hold the coefficients from the second on, as float32, so a compiled loop
computes in float32 throughout. The loops take them as an argument, ``CONSTANTS``, rather
than reading them as globals: Numba's disk cache is keyed by the file that defines a
kernel, and would keep serving a kernel compiled with old values after an edit here.
"""
from __future__ import annotations

import math

import numpy as np

f32 = np.float32
LOG2E = f32(1 / math.log(2))
LN2 = f32(math.log(2))
# log 2 split in two (Cody and Waite): LN2_HI ends in 9 zero bits, so m * LN2_HI is exact
# for m < 512, and g = (m LN2_HI - t) + m LN2_LO loses nothing to the rounding of log 2
LN2_HI = f32(0.693145751953125)
LN2_LO = f32(math.log(2) - 0.693145751953125)
EXP_TAYLOR = tuple(f32(1 / math.factorial(j)) for j in range(2, 8))  # 1/2!, ..., 1/7!
ATANH_SERIES = tuple(f32(1 / (2 * j + 1)) for j in range(1, 7))  # 1/3, 1/5, ..., 1/13
# (LOG2E, LN2, LN2_HI, LN2_LO), EXP_TAYLOR, ATANH_SERIES: what the compiled loops unpack
CONSTANTS = ((LOG2E, LN2, LN2_HI, LN2_LO), EXP_TAYLOR, ATANH_SERIES)
