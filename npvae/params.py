"""Parameters and gradients kept in one contiguous buffer, seen through named views.

A model's ``params`` is a :class:`FlatDict`: an ordinary ``dict`` from dotted names
(``"enc.0.W"``) to arrays, except that every array is a view into one 1-D buffer,
``params.flat``. Gradients come back the same way, with the same keys in the same order,
so an optimizer updates the whole model in one fused pass over ``flat`` instead of
looping over parameters in Python.

Writing into a view (``params["enc.0.W"][...] = w``) writes into ``flat``; rebinding a key
to a new array would break that link, so :meth:`FlatDict.__setitem__` copies into the
view instead.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


class FlatDict(dict):
    """dict of named views into one contiguous 1-D array ``self.flat``."""

    def __init__(self, shapes: Mapping[str, tuple], dtype=np.float64, flat=None):
        dtype = np.dtype(dtype)
        sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes.values()]
        total = int(sum(sizes))
        if flat is None:
            flat = np.zeros(total, dtype=dtype)
        elif flat.shape != (total,) or flat.dtype != dtype or not flat.flags.c_contiguous:
            raise ValueError(
                f"flat must be a contiguous {dtype} array of shape ({total},), "
                f"got {flat.dtype} {flat.shape}"
            )
        super().__init__()
        self.flat = flat
        offset = 0
        for (name, shp), n in zip(shapes.items(), sizes):
            dict.__setitem__(self, name, flat[offset : offset + n].reshape(shp))
            offset += n

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], dtype=None) -> "FlatDict":
        """A new FlatDict holding copies of ``arrays``, in their order.

        For arrays of your own that an optimizer should update:
        ``params = FlatDict.from_arrays({"w": w})``, then read ``params["w"]``, not ``w``
        (the copy is what gets updated). dtype: by default the arrays' common dtype.
        """
        arrays = {name: np.asarray(a) for name, a in arrays.items()}
        if dtype is None:
            dtype = np.result_type(*arrays.values()) if arrays else np.float64
        new = cls({name: a.shape for name, a in arrays.items()}, dtype)
        for name, a in arrays.items():
            new[name] = a
        return new

    @property
    def shapes(self) -> dict:
        return {k: v.shape for k, v in self.items()}

    def _like(self, flat) -> "FlatDict":
        """A FlatDict with this layout over ``flat``: views made by slicing, no size arithmetic."""
        new = dict.__new__(FlatDict)
        new.flat = flat
        offset = 0
        for name, view in self.items():
            dict.__setitem__(new, name, flat[offset: offset + view.size].reshape(view.shape))
            offset += view.size
        return new

    def zeros_like(self) -> "FlatDict":
        """A new FlatDict with the same keys, shapes and dtype, all zeros."""
        return self._like(np.zeros_like(self.flat))

    def empty_like(self) -> "FlatDict":
        return self._like(np.empty_like(self.flat))

    def copy(self) -> "FlatDict":
        return self._like(self.flat.copy())

    def astype(self, dtype) -> "FlatDict":
        return FlatDict(self.shapes, dtype, self.flat.astype(dtype))

    def __setitem__(self, key, value):
        if key not in self:
            raise KeyError(
                f"{key!r} is not a parameter; a FlatDict's keys are fixed: {list(self)}"
            )
        view = dict.__getitem__(self, key)
        if value is view:  # already written in place (e.g. np.matmul(..., out=view))
            return
        value = np.asarray(value)
        if value.shape != view.shape:
            raise ValueError(
                f"{key} must have shape {view.shape}, got {value.shape}"
            )
        view[...] = value

    def __reduce__(self):  # pickling keeps the flat layout
        return (FlatDict, (self.shapes, self.flat.dtype, self.flat.copy()))
