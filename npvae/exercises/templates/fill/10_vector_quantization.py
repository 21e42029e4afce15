"""Exercise 10: vector quantization, straight through, with its two auxiliary losses.
docs/derivations.md, section 9 (VQ.1, VQ.3-5).

Shapes: R rows z_e (R, Dz) to quantize, a codebook E (K, Dz) of K codes; idx (R,) holds
the code chosen for each row.

Forward:
    idx[r] = argmin_k ||z_e[r] - E[k]||^2                  the nearest code      (VQ.1)
    z_q[r] = E[idx[r]]                                                           (VQ.3)

The choice is piecewise constant, so its true derivative is zero almost everywhere. The
straight-through estimator *chooses* a gradient instead: it copies the decoder's gradient
to the encoder's output as if z_q were z_e, and gives the codebook nothing on this path:

    dz_e = dz_q  (R, Dz)                                   chosen, not derived    (VQ.3)

The codebook learns from its own loss, with the encoder output held constant (sg):

    codebook loss    l[r] = ||sg[z_e[r]] - E[idx[r]]||^2                          (VQ.4)
                     dE[k] = sum over rows r with idx[r] = k of -2 dl[r] (z_e[r] - E[k])
                     (a code chosen by several rows collects all of them; an unused code
                     gets zero; z_e gets nothing)
    commitment loss  l[r] = beta ||z_e[r] - sg[E[idx[r]]]||^2                     (VQ.5)
                     dz_e[r] = 2 beta dl[r] (z_e[r] - E[idx[r]]);  the codebook gets nothing

idx is an input of both losses: it is held at the value the forward pass chose.
Check it: npvae exercises check DIR 10_vector_quantization
"""
import numpy as np


def quantize_forward(z_e, codebook):
    """z_q = codebook[idx] with idx the nearest code. Returns z_q (R, Dz), idx (R,), cache."""
    scores = np.sum(codebook * codebook, axis=1) - 2.0 * z_e @ codebook.T  # (R, K)  (VQ.1)
    idx = np.argmin(scores, axis=1)  # (R,)
    z_q = codebook[idx]  # (R, Dz)  (VQ.3)
    return z_q, idx, idx


def quantize_backward(dz_q, cache):
    """dz_q (R, Dz) -> dz_e (R, Dz). The codebook gets no gradient through the choice."""
    # Your code here: see the docstring at the top of the file.
    raise NotImplementedError("quantize_backward is not written yet")
    return dz_e


def codebook_loss_forward(z_e, codebook, idx):
    """l[r] = ||sg[z_e[r]] - codebook[idx[r]]||^2. Returns l (R,), cache."""
    diff = z_e - codebook[idx]  # (R, Dz)
    return np.sum(diff * diff, axis=1), (diff, idx, codebook.shape[0])  # (R,)  (VQ.4)


def codebook_loss_backward(dl, cache):
    """dl (R,) -> dcodebook (K, Dz). z_e gets no gradient (stop-gradient)."""
    diff, idx, num_codes = cache
    # Your code here: see the docstring at the top of the file.
    raise NotImplementedError("codebook_loss_backward is not written yet")
    return dcodebook


def commitment_loss_forward(z_e, codebook, idx, beta=0.25):
    """l[r] = beta ||z_e[r] - sg[codebook[idx[r]]]||^2. Returns l (R,), cache."""
    diff = z_e - codebook[idx]  # (R, Dz)
    return beta * np.sum(diff * diff, axis=1), (diff, beta)  # (R,)  (VQ.5)


def commitment_loss_backward(dl, cache):
    """dl (R,) -> dz_e (R, Dz). The codebook gets no gradient (stop-gradient)."""
    diff, beta = cache
    # Your code here: see the docstring at the top of the file.
    raise NotImplementedError("commitment_loss_backward is not written yet")
    return dz_e
