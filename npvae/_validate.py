"""Input checks shared by every op and model.

Each check raises ``ValueError`` whose message names the argument and says what was
expected, so a user never has to decode an error from deep inside NumPy or Numba.
The checks are cheap: shapes cost nothing, and the NaN/inf check first sums the array
(one pass) and only looks element by element when the sum is not finite.
"""
from __future__ import annotations

import threading

import numpy as np

FLOAT_DTYPES = (np.float32, np.float64)

_trust = threading.local()  # .depth: how many trusted blocks this thread is inside


def _is_trusted() -> bool:
    return getattr(_trust, "depth", 0) > 0


class trusted:
    """Inside ``with trusted():`` the value scans (NaN/inf, [0, 1]) are skipped.

    A model checks its input once, at its entry point, then runs its chain of ops inside
    this block: the ops' own scans would only repeat that work on every step. Shape and
    dtype checks, which cost nothing, still run. The block covers the thread that enters
    it, not the others: a model running in one thread never switches off the checks of
    ops another thread runs.
    """

    def __enter__(self):
        _trust.depth = getattr(_trust, "depth", 0) + 1
        return self

    def __exit__(self, *exc):
        _trust.depth -= 1
        return False


def array(name: str, value, ndim: int | tuple[int, ...] | None = None) -> np.ndarray:
    """``value`` as a floating NumPy array of the expected rank."""
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(value).__name__}")
    if value.dtype.type not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must have dtype float32 or float64, got {value.dtype}"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.ndim not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                f"got shape {value.shape}"
            )
    return value


def finite(name: str, value: np.ndarray, always: bool = False) -> np.ndarray:
    """Reject NaN and inf, naming the argument and the first bad position.

    Skipped inside :class:`trusted` unless ``always`` (for checks at a model's entry).
    """
    if not always and _is_trusted():
        return value
    total = value.sum()
    if np.isfinite(total):
        return value
    bad = ~np.isfinite(value)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} must be finite, but it holds {value[where]} at index {where}"
        )
    return value  # finite values whose sum overflowed: fine


def same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}"
        )


def same_dtype(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.dtype != b.dtype:
        raise ValueError(
            f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}"
        )


def shape(name: str, value: np.ndarray, expected: tuple) -> None:
    """``expected`` may hold None for a free axis."""
    ok = value.ndim == len(expected) and all(
        e is None or e == s for e, s in zip(expected, value.shape)
    )
    if not ok:
        pretty = "(" + ", ".join("any" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {pretty}, got {value.shape}")


def in_unit_interval(name: str, value: np.ndarray, always: bool = False) -> None:
    if not always and _is_trusted():
        return
    lo, hi = value.min(initial=0.0), value.max(initial=1.0)
    if lo < 0.0 or hi > 1.0:
        where = tuple(int(i) for i in np.argwhere((value < 0) | (value > 1))[0])
        raise ValueError(
            f"{name} must lie in [0, 1] (Bernoulli targets), but it holds {value[where]} at "
            f"index {where} (values from {value.min()} to {value.max()})"
        )


def is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool (True is 1 to Python, never a count here)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_positive_real(value) -> bool:
    """A finite number > 0, given as a number (not a bool, not a string)."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)) and bool(np.isfinite(value)) and value > 0)


def positive(name: str, value) -> float:
    v = float(value)
    if not (v > 0.0) or not np.isfinite(v):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return v


def nonnegative(name: str, value) -> float:
    """A finite number >= 0 (NaN and inf are refused: a weight of NaN trains nothing)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}") from None
    if not (v >= 0.0) or not np.isfinite(v):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return v


def smallest_variance(dtype) -> float:
    """The smallest Gaussian variance sigma2 that arithmetic in ``dtype`` can use.

    The log-density and its gradient need 1/sigma2 and (1/sigma2)^2 to be finite normal
    numbers: sigma2 >= sqrt(tiny), the square root of the smallest normal number
    (1.1e-19 in float32, 1.5e-154 in float64).
    """
    return float(np.sqrt(np.finfo(dtype).tiny))


def variance(name: str, value, dtype) -> float:
    """A positive finite variance that ``dtype`` can use (see :func:`smallest_variance`)."""
    v = positive(name, value)
    dtype = np.dtype(dtype)
    if dtype.type in FLOAT_DTYPES and v < smallest_variance(dtype):
        raise ValueError(
            f"{name} = {value} is too small for {dtype.name} arithmetic: 1/{name} or its "
            f"square overflows and the loss would be NaN; the smallest usable value in "
            f"{dtype.name} is {smallest_variance(dtype):.3g}"
        )
    return v
