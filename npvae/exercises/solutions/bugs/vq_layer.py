"""A vector-quantization layer as a VQ-VAE uses it (van den Oord et al. 2017): each of R
encoder rows z_e (R, Dz) is snapped to the nearest of K codes, the rows of E (K, Dz), and
two auxiliary losses per row train the codebook and keep the encoder near its codes.

    idx[r] = argmin_k ||z_e[r] - E[k]||^2;   z_q[r] = E[idx[r]]                    (VQ.1, VQ.3)
    aux[r] = ||sg[z_e[r]] - E[idx[r]]||^2 + beta ||z_e[r] - sg[E[idx[r]]]||^2       (VQ.4, VQ.5)

Backward takes dz_q (R, Dz), the decoder's gradient, and daux (R,), and returns
(dz_e (R, Dz), dE (K, Dz)). The straight-through estimator passes dz_q on as if z_q were
z_e (VQ.3); the codebook learns from the codebook term only.
"""
import numpy as np


def vq_forward(z_e, codebook, beta=0.25):
    """Returns z_q (R, Dz), aux (R,), cache."""
    scores = np.sum(codebook * codebook, axis=1) - 2.0 * z_e @ codebook.T  # (R, K)  (VQ.1)
    idx = np.argmin(scores, axis=1)  # (R,)
    z_q = codebook[idx]  # (R, Dz)  (VQ.3)
    diff = z_e - z_q  # (R, Dz)
    aux = (1.0 + beta) * np.sum(diff * diff, axis=1)  # (R,)  codebook + commitment terms
    return z_q, aux, (diff, idx, codebook.shape[0], beta)


def vq_backward(dz_q, daux, cache):
    """dz_q (R, Dz), daux (R,) -> dz_e (R, Dz), dcodebook (K, Dz)."""
    diff, idx, num_codes, beta = cache
    dcodebook = np.zeros((num_codes, diff.shape[1]))  # (K, Dz)
    dz_e = dz_q.copy()  # straight-through: copied, not derived (VQ.3)
    np.add.at(dcodebook, idx, -2.0 * daux[:, None] * diff)  # codebook loss  (VQ.4)
    dz_e += 2.0 * beta * daux[:, None] * diff  # commitment loss  (VQ.5)
    return dz_e, dcodebook
