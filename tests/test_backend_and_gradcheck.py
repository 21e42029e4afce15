"""The backend switch, the flat parameter buffer and the public gradient checker."""
import os
import subprocess
import sys

import numpy as np
import pytest

import npvae
from npvae import gradcheck
from npvae.backend import dispatch, get_backend, set_backend, use_backend
from npvae.ops import activation_backward as tanh_backward, linear_backward, linear_forward
from npvae.ops import activation_forward
from npvae.params import FlatDict


def test_switch_selects_twin_everywhere():
    calls = []
    k = dispatch(lambda: calls.append("numpy"), lambda: calls.append("numba"))
    with use_backend("numpy"):
        k()
    with use_backend("numba"):
        k()
    assert calls == ["numpy", "numba"]


def test_set_backend_returns_previous_and_rejects_unknown():
    before = get_backend()
    assert set_backend("numpy") == before
    assert set_backend(before) == "numpy"
    with pytest.raises(ValueError, match=r"backend must be one of"):
        set_backend("cuda")


def test_environment_variable_selects_backend():
    code = "import npvae; print(npvae.get_backend())"
    env = dict(os.environ, NPVAE_BACKEND="numpy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "numpy"
    env["NPVAE_BACKEND"] = "fortran"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "NPVAE_BACKEND must be one of" in out.stderr


def test_import_does_not_import_numba():
    code = "import sys, npvae, npvae.ops; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_training_imports_leave_out_the_downloader():
    # urllib.request brings ssl and http (7 MB); only a download needs it
    code = ("import sys, npvae.cli, npvae.train, npvae.data, npvae.evaluate; "
            "print(sorted(m for m in ('urllib.request', 'ssl', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_flatdict_views_share_one_buffer():
    p = FlatDict({"a.W": (2, 3), "a.b": (3,)}, np.float32)
    p["a.W"] = np.ones((2, 3))
    p["a.b"][...] = 2.0
    np.testing.assert_array_equal(p.flat, [1] * 6 + [2] * 3)
    p.flat[:] = 5.0
    assert p["a.W"].sum() == 30.0
    with pytest.raises(ValueError, match=r"a.b must have shape \(3,\)"):
        p["a.b"] = np.zeros(4)
    with pytest.raises(KeyError):
        p["c"] = np.zeros(1)
    q = p.copy()
    q.flat[:] = 0
    assert p["a.b"][0] == 5.0


def test_gradcheck_passes_a_correct_backward(rng):
    x, W, b = rng.normal(size=(4, 3)), rng.normal(size=(3, 2)), rng.normal(size=2)
    errors = gradcheck.check_op(linear_forward, linear_backward, [x, W, b], rng=rng)
    assert set(errors) == {"arg0", "arg1", "arg2"} and max(errors.values()) < 1e-8


def test_gradcheck_catches_a_wrong_backward(rng):
    def wrong(dout, cache):  # forgets to transpose-multiply correctly: uses W, not W.T
        dx, dW, db = linear_backward(dout, cache)
        return dx, dW * 1.001, db
    x, W, b = rng.normal(size=(4, 3)), rng.normal(size=(3, 2)), rng.normal(size=2)
    errors = gradcheck.check_op(linear_forward, wrong, [x, W, b], rng=rng)
    assert errors["arg1"] > 1e-4 and errors["arg0"] < 1e-8


def tanh_forward(a):
    return activation_forward(a, "tanh")


def test_random_upstream_catches_what_ones_would_miss(rng):
    """A backward that averages dh over each row: right when dh is all ones, wrong otherwise."""
    def smeared(dh, cache):
        return tanh_backward(np.repeat(dh.mean(1, keepdims=True), dh.shape[1], 1), cache)
    a = rng.normal(size=(3, 4))
    _, cache = tanh_forward(a)
    ones = np.ones_like(a)
    assert np.array_equal(smeared(ones, cache), tanh_backward(ones, cache))
    errors = gradcheck.check_op(tanh_forward, smeared, [a], rng=rng)
    assert errors["arg0"] > 1e-3


def test_rel_error_definition():
    assert gradcheck.rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert gradcheck.rel_error([1.0, 2.0], [1.0, 2.2]) == pytest.approx(0.2 / 2.2)
    with pytest.raises(ValueError, match="same shape"):
        gradcheck.rel_error(np.zeros(2), np.zeros(3))


def test_numerical_gradient_restores_and_requires_float64(rng):
    p = rng.normal(size=(3, 2))
    before = p.copy()
    g = gradcheck.numerical_gradient(lambda: np.sum(np.sin(p)), p)
    np.testing.assert_allclose(g, np.cos(before), atol=1e-9)
    assert np.array_equal(p, before)
    with pytest.raises(ValueError, match="float64"):
        gradcheck.numerical_gradient(lambda: 0.0, p.astype(np.float32))
