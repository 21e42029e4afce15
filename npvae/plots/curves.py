"""Figures of training: loss curves per epoch, codebook usage and perplexity."""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..ops.vq import perplexity as usage_perplexity
from .common import (
    _MANY_EPOCHS, _NOT_LOSS_WORDS, PathLike, _check_finite, _check_path, _cmap,
    _float_array, _int_arg, _new_figure, _write_png,
)


# ------------------------------------------------------------------------ curves


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _history(history) -> list[Mapping]:
    if isinstance(history, Mapping) or not isinstance(history, Iterable) or isinstance(
        history, (str, bytes)
    ):
        raise ValueError(
            f"history must be a list of per-epoch dicts, got {type(history).__name__}"
        )
    rows = list(history)
    if not rows:
        raise ValueError("history must contain at least one epoch")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(
                f"history[{i}] must be a dict of per-epoch values, got {type(row).__name__}"
            )
    return rows


def _epochs(rows: Sequence[Mapping]) -> np.ndarray:
    values = [row.get("epoch") for row in rows]
    if all(_is_number(v) and math.isfinite(v) for v in values):
        return np.array(values, dtype=np.float64)
    return np.arange(1, len(rows) + 1, dtype=np.float64)


def _series(rows: Sequence[Mapping], key: str) -> np.ndarray:
    """Values of ``key`` per epoch; missing, non-numeric or non-finite entries -> NaN."""
    out = np.full(len(rows), np.nan)
    for i, row in enumerate(rows):
        v = row.get(key)
        if _is_number(v) and math.isfinite(float(v)):
            out[i] = float(v)
    return out


def _plot_series(ax, epochs, values, label, colour, style, markers) -> None:
    ax.plot(epochs, values, linestyle=style, color=colour, label=label,
            marker="o" if markers else None, markersize=4)


def _loss_terms(rows: Sequence[Mapping]) -> list[str]:
    """Suffixes ``t`` with a numeric ``train_t`` or ``val_t``, in first-seen order."""
    terms: list[str] = []
    for row in rows:
        for key, v in row.items():
            if not isinstance(key, str) or not _is_number(v):
                continue
            for prefix in ("train_", "val_"):
                if key.startswith(prefix):
                    term = key[len(prefix):]
                    if (term and term != "loss" and term not in terms
                            and not _NOT_LOSS_WORDS.intersection(term.split("_"))):
                        terms.append(term)
    return terms


def save_loss_curves(path: PathLike, history, title: str = "Training curves") -> Path:
    """Per-epoch training curves from a list of history dicts.

    The left panel shows ``train_loss`` (solid) and ``val_loss`` (dashed). The right
    panel shows every other ``train_<term>`` / ``val_<term>`` pair (recon, kl, codebook,
    commitment, ...), train solid and validation dashed in a shared colour per term;
    metrics that are not loss terms (perplexity, timings, learning rate) are left out.
    Missing keys, ``None`` and non-finite values leave gaps. The x axis uses each
    dict's ``"epoch"`` when every entry has one, else 1, 2, ...
    """
    p = _check_path(path)
    rows = _history(history)
    epochs = _epochs(rows)
    markers = len(rows) <= _MANY_EPOCHS
    train_loss = _series(rows, "train_loss")
    val_loss = _series(rows, "val_loss")
    terms = _loss_terms(rows)
    has_loss = np.isfinite(train_loss).any() or np.isfinite(val_loss).any()
    if not has_loss and not terms:
        raise ValueError(
            "history must hold numeric 'train_loss'/'val_loss' or other "
            "'train_<term>'/'val_<term>' values"
        )

    panels = int(has_loss) + int(bool(terms))
    fig = _new_figure(5.0 * panels + 0.6, 4.0)
    axes = [fig.add_subplot(1, panels, k + 1) for k in range(panels)]
    if has_loss:
        ax = axes[0]
        if np.isfinite(train_loss).any():
            _plot_series(ax, epochs, train_loss, "train", "tab:blue", "-", markers)
        if np.isfinite(val_loss).any():
            _plot_series(ax, epochs, val_loss, "validation", "tab:orange", "--", markers)
        ax.set_title("Loss")
        ax.set_ylabel("loss")
    if terms:
        ax = axes[-1]
        cmap = _cmap("tab10")
        for k, term in enumerate(terms):
            colour = cmap(k % 10)
            for prefix, style in (("train_", "-"), ("val_", "--")):
                values = _series(rows, prefix + term)
                if np.isfinite(values).any():
                    _plot_series(ax, epochs, values, f"{prefix.rstrip('_')} {term}",
                                 colour, style, markers)
        ax.set_title("Loss terms")
        ax.set_ylabel("value")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if len(rows) == 1:
            ax.set_xticks(epochs)
    fig.suptitle(str(title))
    return _write_png(fig, p)


def save_codebook_usage(path: PathLike, counts, title: str = "Codebook usage") -> Path:
    """Bar chart of how often each code was chosen, in code-index order.

    ``counts`` is a ``(K,)`` array of non-negative integer counts with a positive
    total. The title reports the usage perplexity ``exp(entropy)`` and the fraction
    of codes used at least once.
    """
    p = _check_path(path)
    arr = _float_array("counts", counts)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"counts must have shape (K,) with K >= 1, got {arr.shape}")
    _check_finite("counts", arr)
    if (arr < 0).any() or not np.array_equal(arr, np.round(arr)):
        raise ValueError("counts must hold non-negative integers")
    if arr.sum() <= 0:
        raise ValueError("counts must have a positive total (no code was ever used)")
    k = arr.size
    used = int((arr > 0).sum())
    perplexity = usage_perplexity(arr)

    fig = _new_figure(min(4.0 + 0.04 * k, 10.0), 3.8)
    ax = fig.add_subplot()
    ax.bar(np.arange(k), arr, width=1.0 if k > 64 else 0.8, color="tab:blue",
           linewidth=0)
    ax.set_xlim(-0.5 - (0.5 if k == 1 else 0), k - 0.5 + (0.5 if k == 1 else 0))
    ax.set_xlabel("code index")
    ax.set_ylabel("count")
    ax.set_title(
        f"{title}\nperplexity {perplexity:.1f} of {k}, "
        f"{used}/{k} codes used ({used / k:.0%})",
        fontsize=10,
    )
    ax.grid(True, axis="y", alpha=0.3)
    return _write_png(fig, p)


def save_perplexity(path: PathLike, history_or_values, title: str = "Codebook perplexity",
                    *, num_codes: int | None = None) -> Path:
    """Codebook perplexity per epoch.

    Accepts either a sequence of numbers (epochs 1, 2, ...; all must be finite) or a
    list of history dicts, from which ``perplexity`` / ``train_perplexity`` and
    ``val_perplexity`` are drawn (missing entries leave gaps). With ``num_codes`` a
    dotted line marks the largest possible perplexity, the codebook size.
    """
    p = _check_path(path)
    if num_codes is not None:
        num_codes = _int_arg("num_codes", num_codes, 1)
    data = history_or_values
    series: list[tuple[str, np.ndarray, str, str]] = []
    if isinstance(data, (list, tuple)) and data and all(isinstance(r, Mapping) for r in data):
        rows = list(data)
        epochs = _epochs(rows)
        for key, label, colour, style in (
            ("perplexity", "perplexity", "tab:blue", "-"),
            ("train_perplexity", "train", "tab:blue", "-"),
            ("val_perplexity", "validation", "tab:orange", "--"),
        ):
            values = _series(rows, key)
            if np.isfinite(values).any():
                series.append((label, values, colour, style))
        if not series:
            raise ValueError(
                "history_or_values holds no numeric 'perplexity', 'train_perplexity' "
                "or 'val_perplexity' entries"
            )
    else:
        if isinstance(data, Mapping):
            raise ValueError(
                "history_or_values must be a sequence of numbers or a list of dicts, got dict"
            )
        values = _float_array("history_or_values", data)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(
                "history_or_values must be a non-empty 1-D sequence of perplexities, "
                f"got shape {values.shape}"
            )
        _check_finite("history_or_values", values)
        epochs = np.arange(1, values.size + 1, dtype=np.float64)
        series.append(("perplexity", values, "tab:blue", "-"))

    markers = epochs.size <= _MANY_EPOCHS
    fig = _new_figure(5.6, 4.0)
    ax = fig.add_subplot()
    for label, values, colour, style in series:
        _plot_series(ax, epochs, values, label, colour, style, markers)
    if num_codes is not None:
        ax.axhline(num_codes, color="grey", linestyle=":", label=f"codebook size ({num_codes})")
    if epochs.size == 1:
        ax.set_xticks(epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_title(str(title))
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or num_codes is not None:
        ax.legend(fontsize=8)
    return _write_png(fig, p)
