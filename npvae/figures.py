"""The figures of a run, drawn from a trained model and its metrics history.

:func:`make_figures` writes the PNGs that ``npvae train`` and ``npvae plot`` leave in a
run folder (the drawing itself is in :mod:`npvae.plots`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

EVAL_BATCH = 1000


def _latents(model, x) -> np.ndarray:
    """One point per example for the latent scatter: q's mean, the code, or VQ's z_e."""
    z = model.encode(x)
    if isinstance(z, tuple):  # a VAE gives (mu, logvar)
        z = z[0]
    return np.asarray(z).reshape(len(x), -1)


def _pixels(images) -> np.ndarray:
    """Decoder means as displayable pixels: a Gaussian decoder's mean may leave [0, 1]."""
    return np.clip(images, 0.0, 1.0)


def _decoder(model):
    """decode(z (n, Z) float64) -> images (n, D) in [0, 1]."""
    return lambda z: _pixels(model.decode(np.asarray(z, dtype=model.dtype)))


def _vq_decoder(model):
    """Quantize points of the encoder's output space, then decode the chosen codes."""
    from .ops.vq import vq_assign

    def decode(z):
        rows = np.asarray(z, dtype=model.dtype).reshape(-1, model.Dz)
        idx = np.asarray(vq_assign(rows, model.params["codebook"], model.config["metric"]))
        return _pixels(model.decode_indices(idx.reshape(len(z), model.M)))

    return decode


def _two_different_digits(y, n: int) -> tuple[int, int]:
    """Indices of the first example and of the first one with another label."""
    if y is not None:
        other = np.flatnonzero(np.asarray(y[:n]) != y[0])
        if other.size:
            return 0, int(other[0])
    return 0, min(1, n - 1)


def _loss_terms(history, config) -> list:
    """History rows without the entries that would repeat a curve: the ELBO (minus the
    loss when beta = 1) and the KL term of the objective unless free bits change it."""
    drop = {"train_elbo", "val_elbo"}
    if not config.get("free_bits"):
        drop.add("train_kl_term")
    return [{k: v for k, v in row.items() if k not in drop} for row in history]


def make_figures(model, run_dir, x_test, y_test, history, rng, *, n_scatter: int = 5000) -> dict:
    """Write the run's PNG figures into ``run_dir``; returns {name: path}.

    x_test (N, D) images in [0, 1] of the model's dtype, y_test (N,) their labels (or
    None). Figures: reconstructions, samples, loss curves (when there is a history),
    latent scatter (PCA when Z > 2), an interpolation between two test digits of
    different classes, the decoded manifold when the latent space is 2-D, and for a
    VQ-VAE the codebook usage histogram and perplexity per epoch.
    """
    from . import plots

    run_dir = Path(run_dir)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    from .kinds import is_vq

    vq = is_vq(model)
    out = {}
    x_show = x_test[:20]
    out["reconstructions"] = plots.save_reconstructions(
        run_dir / "reconstructions.png", x_show, _pixels(model.reconstruct(x_show)),
        title="Test digits (top) and their reconstructions")
    out["samples"] = plots.save_samples(run_dir / "samples.png", _pixels(model.sample(100, rng)),
                                        ncols=10, title="Samples from the prior")
    if history:
        out["loss_curves"] = plots.save_loss_curves(run_dir / "loss_curves.png",
                                                    _loss_terms(history, model.config))

    xs = x_test[:n_scatter]
    z = _latents(model, xs)
    labels = None if y_test is None else np.asarray(y_test[:n_scatter])
    out["latent_scatter"] = plots.save_latent_scatter(
        run_dir / "latent_scatter.png", z, labels,
        title="Encoder outputs (before quantization)" if vq else "Test set in latent space")

    a, b = _two_different_digits(y_test, len(x_test))
    decode = _vq_decoder(model) if vq else _decoder(model)
    if len(x_test) > 1:
        z_ab = _latents(model, x_test[[a, b]])
        out["interpolation"] = plots.save_interpolation(
            run_dir / "interpolation.png", decode, z_ab[0], z_ab[1], steps=10,
            title="Interpolation between two test digits" + (" (each point quantized)" if vq else ""))
    if not vq and z.shape[1] == 2:
        out["manifold"] = plots.save_manifold(run_dir / "manifold.png", decode, n=20)
    if vq:
        from . import evaluate

        stats = evaluate.codebook_stats(model, x_test, batch_size=EVAL_BATCH)
        counts = np.asarray(stats["counts"])
        if counts.sum() > 0:
            out["codebook_usage"] = plots.save_codebook_usage(
                run_dir / "codebook_usage.png", counts, title="Codebook usage on the test set")
        if any("val_perplexity" in r or "train_perplexity" in r for r in history):
            out["perplexity"] = plots.save_perplexity(
                run_dir / "perplexity.png", history, num_codes=model.config["num_codes"])
    return out
