"""The six bug hunts as data: a correct program, the story told around it, the planted bug.

A hunt's solved file has one docstring, made of its ``opening``, the docstring of its
program (a file in ``solutions/bugs/``, which describes the model), its ``closing`` and the
line ``Check it: npvae exercises check DIR <name>``; the program's code follows. Where a
hunt needs its own version of a shared program, ``variant`` edits the solved file first
(b6 gives the tiny VAE Bernoulli pixels). The student's file is the solved one with each
(correct, buggy) pair of ``bug`` swapped in. On both sides of a pair, lines are written
without their indentation: they match whole lines of the file, and the new lines take the
indentation of the first line they replace. Each left side must match exactly one place
(:func:`npvae.exercises.files.replace_lines`), so a pair cannot silently go stale.
"""
from __future__ import annotations

from typing import NamedTuple


class BugHunt(NamedTuple):
    name: str  # file stem, as in npvae.exercises.grader.EXERCISES
    program: str  # the correct program, in solutions/bugs/
    opening: str  # the docstring before the program's own: title and symptom
    closing: str  # after it: where to look
    bug: tuple  # (correct, buggy) pairs of lines
    variant: tuple = ()  # (shared program, this hunt's program) pairs, applied first


# the tiny VAE with Bernoulli pixels: its decoder outputs logits  (LIK.3, LIK.4)
_BCE = ("softplus = np.maximum(out, 0.0) + np.log1p(np.exp(-np.abs(out)))  # (N, D)\n"
        "logp = np.sum(x * out - softplus, axis=1)  # (N,)  (LIK.3)")
_BCE_GRAD = ("e = np.exp(-np.abs(out))  # (N, D)\n"
             "prob = np.where(out >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # (N, D)  sigmoid(out)\n"
             "dout = dlogp[:, None] * (x - prob)  # (N, D)  (LIK.4)")
_BERNOULLI = (
    ("decoder   out = z Wd + bd  (N, D), p(x|z) = N(out, I)                  (LIK.1)",
     "decoder   out = z Wd + bd  (N, D), logits of p(x|z), pixels Bernoulli(sigmoid(out))"
     "  (LIK.3)"),
    ("r = x - out  # (N, D)  residual\n"
     "logp = -0.5 * np.sum(r * r, axis=1) - 0.5 * d * math.log(2.0 * math.pi)  # (N,)  (LIK.1)",
     _BCE),
    ("dout = dlogp[:, None] * r  # (N, D)  (LIK.2)", _BCE_GRAD),
)
# the line of the tiny VAE where b2 and b3 both plant their bugs
_KL_MEAN = ("dkl = np.full((n, z_dim), 1.0 / n)  # (N, Z)  d loss / d kl[n, j]: "
            "the mean over the batch")

HUNTS = (
    BugHunt(
        "b1_sampling", "tiny_vae.py",
        opening="""\
Bug hunt 1: samples that are too spread out, or too tight

A student's Gaussian VAE trains and its gradient check passes, yet the posterior
variances it reports do not match the spread of the codes it samples.""",
        closing="""\
The file has exactly one bug. A gradient check will not find it; sample many z and look at \
their moments.""",
        bug=(
            ("sigma = np.exp(0.5 * logvar)  # (N, Z)  sigma = exp(logvar / 2)",
             "sigma = np.exp(logvar)  # (N, Z)  sigma from the log-variance"),
            ("dsigma = 0.5 * sigma  # (N, Z)  d sigma / d logvar",
             "dsigma = sigma  # (N, Z)  d sigma / d logvar"))),

    BugHunt(
        "b2_kl_sign", "tiny_vae.py",
        opening="""\
Bug hunt 2: a KL that helps too much

This Gaussian VAE's gradient check passes and its loss goes down fast, but the
posterior means fly away from the origin and samples from the prior are noise.""",
        closing="""\
The file has exactly one bug. Compare the loss with the negative ELBO computed by hand for \
one example.""",
        bug=(
            ("loss = np.mean(-logp + kl)  # ()  (OBJ.1)",
             "loss = np.mean(-logp - kl)  # ()  (OBJ.1)"),
            (_KL_MEAN, "dkl = np.full((n, z_dim), -1.0 / n)  # (N, Z)  d loss / d kl[n, j]"))),

    BugHunt(
        "b3_batch_mean", "tiny_vae.py",
        opening="""\
Bug hunt 3: a loss that depends on the batch size

This Gaussian VAE behaves differently at batch size 8 and at batch size 128: with
large batches every latent dimension collapses onto the prior.""",
        closing="""\
The file has exactly one bug. npvae.gradcheck finds it.""",
        bug=(
            (_KL_MEAN, "dkl = np.ones((n, z_dim))  # (N, Z)  d loss / d kl[n, j]"),)),

    BugHunt(
        "b4_iwae_weights", "iw_bound.py",
        opening="""\
Bug hunt 4: an importance-weighted bound that trains worse than the ELBO""",
        closing="""\
A model trained with this op has a higher loss than the same model trained on the ELBO.
The file has exactly one bug; npvae.gradcheck finds it.""",
        bug=(
            ("# L's gradient is sum_i w_i d(a_i): w holds numbers from the forward pass, used as\n"
             "# they are (the derivative of log-sum-exp is the softmax)\n"
             "da = dL[:, None] * w  # (N, k)",
             "# L's gradient is sum_i w_i d(a_i): differentiate the surrogate sum_i w_i a_i\n"
             "da = dL[:, None] * w  # (N, k)  through a_i\n"
             "dw = dL[:, None] * a  # (N, k)  through w_i\n"
             "da += w * (dw - np.sum(w * dw, axis=1, keepdims=True))  "
             "# (N, k)  softmax backward"),)),

    BugHunt(
        "b5_straight_through", "vq_layer.py",
        opening="""\
Bug hunt 5: a VQ-VAE whose encoder never learns to reconstruct""",
        closing="""\
Trained with this layer, the codebook follows the decoder's wishes, the encoder's outputs
only chase their codes, and reconstructions stay poor. The file has exactly one bug;
npvae.gradcheck finds it, on the straight-through surrogate of docs/derivations.md (VQVAE.4).""",
        bug=(
            ("dz_e = dz_q.copy()  # straight-through: copied, not derived (VQ.3)",
             "dz_e = np.zeros_like(dz_q)  # (R, Dz)\n"
             "np.add.at(dcodebook, idx, dz_q)  # straight-through: copied, not derived (VQ.3)"),)),

    BugHunt(
        "b6_bce_logits", "tiny_vae.py",
        opening="""\
Bug hunt 6: a cross-entropy that goes NaN

This Bernoulli VAE (binary pixels, tutorial section 4) gives the right loss and the right
gradients while its weights are small. Once training makes the decoder confident, with
logits of a few tens, its loss becomes NaN or inf and the run stops.""",
        closing="""\
The file has exactly one bug. Work out the reconstruction term of one pixel with x = 0 and \
a logit of 40, in float64, the way the file does and the way docs/derivations.md does (LIK.3).""",
        variant=_BERNOULLI,
        bug=(
            (_BCE,
             "prob = 1.0 / (1.0 + np.exp(-out))  # (N, D)  sigmoid(out), the pixel probabilities\n"
             "logp = np.sum(x * np.log(prob) + (1.0 - x) * np.log(1.0 - prob), axis=1)  "
             "# (N,)  (LIK.3)"),)),
)
