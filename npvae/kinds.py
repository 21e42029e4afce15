"""What a kind of model is, asked of its class, so that a new kind plugs in by itself.

The command line, the training loop, evaluation and the figures branch on two questions:
does the model quantize to codes (a VQ-VAE of any architecture: codebook statistics, a
learned prior over its codes, quantized interpolation), and are its networks
convolutional (``--channels`` instead of ``--hidden``). Both are answered here from
the model's class, never by comparing kind names.
"""
from __future__ import annotations

import inspect


def model_class(what) -> type:
    """The class of a model, of a model class, or of a kind name ("conv-vae")."""
    from .models import MODELS

    if isinstance(what, str):
        if what not in MODELS:
            raise ValueError(f"no model kind {what!r}; the kinds are {sorted(MODELS)}")
        return MODELS[what]
    return what if isinstance(what, type) else type(what)


def is_vq(what) -> bool:
    """A VQ-VAE of any architecture: each example is encoded as M codes of a codebook."""
    from .models import VQVAE

    return issubclass(model_class(what), VQVAE)


def is_conv(what) -> bool:
    """Convolutional networks: the constructor takes ``channels`` and ``image_shape``."""
    params = inspect.signature(model_class(what)).parameters
    return "channels" in params and "image_shape" in params
