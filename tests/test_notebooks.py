"""The notebooks in notebooks/ run from top to bottom without an error.

Each is kept as a jupytext percent-format .py file (diffable), converted with jupytext
and executed with nbclient on an ipykernel kernel; a cell that raises fails the test, and
the notebooks assert what they claim. Each must finish within two minutes.

The notebooks select the NumPy twins themselves (``helpers.setup()``), whatever
NPVAE_BACKEND says, so running them under both backends would repeat identical work: CI's
numba pass skips them and its numpy pass runs them (a run without NPVAE_BACKEND runs them).

They need no network: ``helpers.digits`` reads MNIST only if it is already cached, and
draws synthetic digits otherwise; the tests below check that fallback.
"""
import os
import sys
from pathlib import Path

import jupytext
import nbclient
import numpy as np
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
FILES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
LIMIT = 120  # seconds per notebook

skip_in_numba_pass = pytest.mark.skipif(
    os.environ.get("NPVAE_BACKEND") == "numba",
    reason="the notebooks run on the NumPy twins whatever the backend; they run once, "
           "in the NPVAE_BACKEND=numpy pass")


def test_there_are_five_notebooks():
    assert len(FILES) >= 5


@skip_in_numba_pass
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_notebook_runs(path):
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(nb, timeout=LIMIT, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error (or a cell
    # running past LIMIT seconds); the notebooks' run times are not asserted here
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    if path.stem != "01_elbo_and_the_bound":  # that one draws its data from its own model
        assert "data: MNIST" in printed or "synthetic" in printed  # it says which data


@pytest.fixture
def helpers(monkeypatch):
    monkeypatch.syspath_prepend(str(NOTEBOOKS))
    sys.modules.pop("helpers", None)
    import helpers as module

    yield module
    sys.modules.pop("helpers", None)


def test_digits_fall_back_to_synthetic_data_without_mnist(helpers, tmp_path, monkeypatch):
    monkeypatch.setenv("NPVAE_DATA", str(tmp_path))  # an empty cache: MNIST is not there

    def no_download(*args, **kwargs):
        assert kwargs.get("download") is False, "the notebooks must never download"
        return real_load(*args, **kwargs)

    from npvae import data

    real_load = data.load
    monkeypatch.setattr(data, "load", no_download)
    x, labels, source = helpers.digits(40, seed=1)
    assert "synthetic" in source
    assert x.shape == (40, 784) and labels.shape == (40,)
    assert 0.0 <= x.min() and x.max() <= 1.0 and 0.05 < x.mean() < 0.3
    assert set(labels.tolist()) <= set(range(10))


def test_synthetic_digits_are_reproducible_and_differ_by_class(helpers):
    a, la = helpers.synthetic_digits(200, np.random.default_rng(3))
    b, lb = helpers.synthetic_digits(200, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    means = np.array([a[la == k].mean(axis=0) for k in range(10) if np.any(la == k)])
    # class means are further apart than noise: each numeral has its own strokes
    distances = np.linalg.norm(means[:, None] - means[None], axis=2)
    assert distances[np.triu_indices(len(means), 1)].min() > 1.0
