"""How many threads the matrix products get.

BLAS splits a matrix product over both cores, which pays for large products and costs
more than it saves for small ones: waking the second thread and joining it takes longer
than the product itself. For a whole training run npvae looks at the largest product of
a step, batch x inputs x outputs multiply-adds, and below :data:`SMALL_PRODUCT` gives
BLAS one thread.

The threshold was measured on 2 cores (benchmarks/RESULTS.md): at batch 20 with 784-200
layers (3.1M multiply-adds) one thread makes a step 30% faster; at batch 128 with 784-400
(40M) two threads make it 20% faster; the two cross near 12M.
"""
from __future__ import annotations

import contextlib

SMALL_PRODUCT = 12_000_000  # multiply-adds of the largest product in a step

_controller = {}


def largest_product(params, batch_size: int) -> int:
    """batch x I x O of the largest weight matrix ``*.W`` (I, O) in ``params``."""
    sizes = [w.shape[0] * w.shape[1] for k, w in params.items() if k.endswith(".W") and w.ndim == 2]
    return int(batch_size) * max(sizes, default=0)


def blas_threads_for(params, batch_size: int) -> int | None:
    """1 when every product of a step is small, else None (leave BLAS as it is)."""
    return 1 if largest_product(params, batch_size) < SMALL_PRODUCT else None


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Within the block, BLAS uses at most ``n`` threads (no change when n is None)."""
    if n is None:
        yield
        return
    from threadpoolctl import ThreadpoolController

    if "c" not in _controller:  # finding the loaded BLAS libraries takes a while: once
        _controller["c"] = ThreadpoolController()
    with _controller["c"].limit(limits=n, user_api="blas"):
        yield
