"""Bad input gives a ValueError that names the argument and what was expected."""
import numpy as np
import pytest

from npvae.ops import (
    activation_forward, bernoulli_loglik_forward, gaussian_kl2_forward, gaussian_kl_forward,
    gaussian_loglik_forward, linear_forward, reparameterize_forward,
)
from npvae.ops.mlp import mlp_forward, mlp_shapes
from npvae.params import FlatDict

A = np.zeros((3, 4))


def test_mismatched_shapes():
    with pytest.raises(ValueError, match=r"mu and logvar must have the same shape"):
        reparameterize_forward(A, np.zeros((3, 5)), A)
    with pytest.raises(ValueError, match=r"mu and eps must have the same shape"):
        reparameterize_forward(A, A, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"mu and logvar"):
        gaussian_kl_forward(A, np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"logits and x must have the same shape"):
        bernoulli_loglik_forward(A, np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"x has 4 features but W expects 5"):
        linear_forward(A, np.zeros((5, 2)), np.zeros(2))
    with pytest.raises(ValueError, match=r"b must have shape \(2,\)"):
        linear_forward(A, np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(ValueError, match=r"mu1 and logvar2"):
        gaussian_kl2_forward(A, A, A, np.zeros((1, 4)))


def test_nan_and_inf_are_named():
    bad = A.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"logvar must be finite.*\(1, 2\)"):
        gaussian_kl_forward(A, bad)
    with pytest.raises(ValueError, match=r"mean must be finite"):
        gaussian_loglik_forward(bad, A)
    inf = A.copy()
    inf[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"x must be finite"):
        bernoulli_loglik_forward(A, inf)
    with pytest.raises(ValueError, match=r"eps must be finite"):
        reparameterize_forward(A, A, inf)
    with pytest.raises(ValueError, match=r"x must be finite.*\(1, 2\)"):
        linear_forward(bad, np.zeros((4, 2)), np.zeros(2))
    with pytest.raises(ValueError, match=r"W must be finite"):
        linear_forward(A, np.array([[np.inf, 0.0]] + [[0.0, 0.0]] * 3), np.zeros(2))
    with pytest.raises(ValueError, match=r"b must be finite"):
        linear_forward(A, np.zeros((4, 2)), np.array([0.0, np.nan]))


def test_a_trusted_block_in_one_thread_leaves_the_checks_of_another_on():
    # a model runs its ops inside trusted(); an op called meanwhile from another thread
    # must still scan its input (the depth of trusted blocks was once one global count)
    import threading

    from npvae._validate import trusted

    bad = A.copy()
    bad[1, 2] = np.nan
    inside, done = threading.Event(), threading.Event()

    def hold_a_trusted_block():
        with trusted():
            inside.set()
            done.wait(10)

    holder = threading.Thread(target=hold_a_trusted_block)
    holder.start()
    try:
        assert inside.wait(10)
        with pytest.raises(ValueError, match=r"logvar must be finite"):
            gaussian_kl_forward(A, bad)
    finally:
        done.set()
        holder.join()
    with trusted():  # in this thread the block still skips the scan
        kl, _ = gaussian_kl_forward(A, bad)
    assert np.isnan(kl).any()


def test_bernoulli_targets_outside_unit_interval():
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\].*1.5"):
        bernoulli_loglik_forward(A, np.full((3, 4), 1.5))
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        bernoulli_loglik_forward(A, np.full((3, 4), -0.1))


@pytest.mark.parametrize("sigma2", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_variance(sigma2):
    with pytest.raises(ValueError, match=r"sigma2 must be a positive finite number"):
        gaussian_loglik_forward(A, A, sigma2=sigma2)


def test_wrong_types_and_dtypes():
    with pytest.raises(ValueError, match=r"mu must be a numpy array, got list"):
        gaussian_kl_forward([[0.0]], np.zeros((1, 1)))
    with pytest.raises(ValueError, match=r"x must have dtype float32 or float64, got int64"):
        bernoulli_loglik_forward(A, np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"logits and x must have the same dtype"):
        bernoulli_loglik_forward(A, np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"x must have 2 dimensions"):
        linear_forward(np.zeros(3), np.zeros((3, 2)), np.zeros(2))


def test_unknown_activation_and_mlp_input():
    with pytest.raises(ValueError, match=r"activation must be one of .*'gelu'"):
        activation_forward(A, "gelu")
    params = FlatDict(mlp_shapes("enc", [5, 3]))
    with pytest.raises(ValueError, match=r"x has 4 features, enc.0.W expects 5"):
        mlp_forward(params, "enc", A, "relu")
    with pytest.raises(ValueError, match=r"no layer named dec.0.W"):
        mlp_forward(params, "dec", A, "relu")
    with pytest.raises(ValueError, match=r"sizes must list"):
        mlp_shapes("enc", [5])


@pytest.mark.parametrize("dtype, sigma2", [(np.float32, 1e-300), (np.float32, 1e-25),
                                           (np.float64, 1e-300)])
def test_variance_too_small_for_the_dtype(dtype, sigma2):
    a = np.zeros((3, 4), dtype)
    with pytest.raises(ValueError, match=rf"sigma2 = {sigma2} is too small for {dtype.__name__}"
                                         r" arithmetic.*smallest usable value"):
        gaussian_loglik_forward(a, a, sigma2=sigma2)
