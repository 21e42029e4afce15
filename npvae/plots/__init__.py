"""PNG figures for inspecting trained models: reconstructions, samples, latent
manifolds and scatters, interpolations, training curves and codebook statistics.

Everything here draws on a private :class:`matplotlib.figure.Figure` rendered by the
Agg canvas, so importing this module never touches pyplot's global state and works on
machines without a display.

Conventions shared by every ``save_*`` function:

* ``path`` must end in ``.png``; missing parent directories are created.
* The file is written atomically: the PNG is rendered into a temporary file in the
  same directory and moved into place with :func:`os.replace`, so a reader never sees
  a half-written image and a failed render leaves any previous file untouched.
* The return value is ``pathlib.Path(path)``.
* Bad arguments raise ``ValueError`` whose message starts with the argument's name.

Images are grey-scale with values in ``[0, 1]``. They may be given flattened,
``(n, H*W)``, or as ``(n, H, W)``; ``image_shape`` gives ``(H, W)`` (MNIST by
default). Images are drawn with row 0 at the top, so digits appear upright.

The figures live in :mod:`npvae.plots.images` and :mod:`npvae.plots.curves`, what they
share in :mod:`npvae.plots.common`.
"""
from __future__ import annotations

from .common import DPI, PAD_VALUE  # noqa: F401
from .curves import save_codebook_usage, save_loss_curves, save_perplexity
from .images import (
    image_grid, manifold_points, pca_2d, reconstruction_grid, save_interpolation,
    save_latent_scatter, save_manifold, save_reconstructions, save_samples, save_side_by_side,
)

__all__ = [
    "image_grid",
    "reconstruction_grid",
    "save_reconstructions",
    "save_samples",
    "save_side_by_side",
    "save_manifold",
    "save_latent_scatter",
    "pca_2d",
    "manifold_points",
    "save_interpolation",
    "save_loss_curves",
    "save_codebook_usage",
    "save_perplexity",
]
