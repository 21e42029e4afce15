"""npvae: variational autoencoders in NumPy with hand-written gradients.

Every op, model and optimizer has an explicit backward pass, documented beside its
derivation in docs/derivations.md; hot loops have compiled Numba kernels beside plain
NumPy twins, chosen by ``NPVAE_BACKEND`` or :func:`set_backend`.
"""
from .backend import get_backend, set_backend, use_backend  # noqa: F401
from .params import FlatDict  # noqa: F401

__version__ = "0.1.0"
