"""Negative sampling (SPEC section 4): the sample store holds item indices drawn with probability
proportional to support^sample_alpha."""
import numpy as np
import pytest

from conftest import ITEM_IDS, fit_small, make_train_log

SUPPORT = np.array([1, 2, 3, 5, 8, 13, 40, 100, 1, 7, 20, 60], dtype=np.float64)
N_DRAWS = 240000


def chi_square(counts, p):
    expected = counts.sum() * p
    return ((counts - expected) ** 2 / expected).sum()


def chi_square_critical(df, z=3.72):
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.72 is a 1e-4 upper tail."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


@pytest.fixture(scope='module')
def model():
    return fit_small()


def test_support_counts_the_training_events(model):
    log = make_train_log()
    counts = log.ItemId.value_counts()
    np.testing.assert_array_equal(model.support, counts.reindex(model.itemidmap).to_numpy())
    assert list(model.itemidmap) == sorted(ITEM_IDS)


@pytest.mark.parametrize('alpha', [0.0, 0.5, 1.0])
def test_samples_follow_support_to_the_power_alpha(model, alpha):
    model.support = SUPPORT.copy()
    model.sample_alpha = alpha
    model._cdf = model._sample_cdf()
    model.sample_store_size = N_DRAWS
    n_steps = model._refill_sample_store()
    store = model.sample_store
    assert n_steps == N_DRAWS // model.n_sample
    assert store.shape == (n_steps, model.n_sample) and store.dtype == np.int32
    counts = np.bincount(store.ravel(), minlength=model.n_items)
    assert len(counts) == model.n_items
    critical = chi_square_critical(model.n_items - 1)
    p = SUPPORT ** alpha
    assert chi_square(counts, p / p.sum()) < critical
    # The test has the power to tell a neighbouring alpha apart.
    wrong = SUPPORT ** (alpha + 0.1)
    assert chi_square(counts, wrong / wrong.sum()) > critical
