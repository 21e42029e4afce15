"""Every op as a forward/backward pair: ``name_forward(...) -> (out, cache)`` and
``name_backward(dout, cache) -> gradients in the order of the forward inputs``."""
from .activations import (  # noqa: F401
    ACTIVATIONS,
    activation_backward,
    activation_forward,
    bias_activation_backward,
    bias_activation_forward,
)
from .kl import (  # noqa: F401
    gaussian_kl2_backward,
    gaussian_kl2_forward,
    gaussian_kl_backward,
    gaussian_kl_forward,
)
from .likelihoods import (  # noqa: F401
    bernoulli_loglik_backward,
    bernoulli_loglik_forward,
    gaussian_loglik_backward,
    gaussian_loglik_forward,
)
from .linear import linear_backward, linear_forward  # noqa: F401
from .reparam import reparameterize_backward, reparameterize_forward  # noqa: F401
from .vq import (  # noqa: F401
    codebook_loss_backward,
    codebook_loss_forward,
    commitment_loss_backward,
    commitment_loss_forward,
    ema_init,
    ema_update,
    EMAState,
    quantize_backward,
    quantize_forward,
    vq_assign,
)
