"""BLAS gets one thread for small products and keeps its own count for large ones."""
import numpy as np
from threadpoolctl import threadpool_info

from npvae.models import BernoulliVAE
from npvae.threads import SMALL_PRODUCT, blas_threads, blas_threads_for, largest_product


def blas_counts():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_largest_product_and_the_choice():
    iwae = BernoulliVAE(hidden=(200, 200), latent=50).params  # largest W: 784 x 200
    assert largest_product(iwae, 20) == 20 * 784 * 200
    assert blas_threads_for(iwae, 20) == 1  # 3.1M < threshold
    example = BernoulliVAE(hidden=(400,), latent=20).params  # 784 x 400
    assert largest_product(example, 128) == 128 * 784 * 400 > SMALL_PRODUCT
    assert blas_threads_for(example, 128) is None


def test_limit_applies_inside_and_is_restored():
    np.ones((4, 4)) @ np.ones((4, 4))  # BLAS loaded
    before = blas_counts()
    with blas_threads(1):
        assert all(n == 1 for n in blas_counts())
    assert blas_counts() == before
    with blas_threads(None):
        assert blas_counts() == before
