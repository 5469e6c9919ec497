"""Negative sampling (SPEC section 4): the sample store holds item indices drawn with probability
proportional to support^sample_alpha."""
import numpy as np
import pytest

from conftest import ITEM_IDS, fit_small, make_train_log
from training import SAMPLE_CHUNK, SampleStore, inverse_cdf, sample_cdf

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
    cdf = sample_cdf(model.support, model.sample_alpha)
    with SampleStore(cdf, model.n_sample, N_DRAWS, np.random.default_rng(0)) as samples:
        store = samples.draw()
    assert store.shape == (N_DRAWS // model.n_sample, model.n_sample) and store.dtype == np.int32
    counts = np.bincount(store.ravel(), minlength=model.n_items)
    assert len(counts) == model.n_items
    critical = chi_square_critical(model.n_items - 1)
    p = SUPPORT ** alpha
    assert chi_square(counts, p / p.sum()) < critical
    # The test has the power to tell a neighbouring alpha apart.
    wrong = SUPPORT ** (alpha + 0.1)
    assert chi_square(counts, wrong / wrong.sum()) > critical


def test_inverse_cdf_is_searchsorted():
    rng = np.random.default_rng(5)
    for p in [SUPPORT, rng.pareto(1.0, 50000) * (rng.random(50000) < 0.7), np.ones(3)]:  # some zero-probability items
        cdf = np.cumsum(p) / p.sum()
        u = np.concatenate([rng.random(200000), cdf[:-1], np.nextafter(cdf[:-1], 0), [0.0]])
        expected = np.searchsorted(cdf, u, side='right')
        np.testing.assert_array_equal(inverse_cdf(cdf, u), expected)
        np.testing.assert_array_equal(inverse_cdf(cdf, u, max_steps=0), expected)  # binary search where not exact


def test_sample_store_walks_its_blocks_in_order_and_refills_reproducibly():
    cdf = np.cumsum(SUPPORT) / SUPPORT.sum()
    n_sample, size = 7, 7 * 5
    with SampleStore(cdf, n_sample, size, np.random.default_rng(3)) as samples:
        steps = np.array([samples.next() for _ in range(12)])  # two refills, the third block started
    reference = SampleStore(cdf, n_sample, size, np.random.default_rng(3))
    with reference:
        blocks = np.concatenate([reference.pending.result()] + [reference.draw() for _ in range(2)])
    np.testing.assert_array_equal(steps, blocks[:12])
    assert steps.dtype == np.int32 and len(np.unique(steps)) > 1


def test_sample_store_takes_steps_across_blocks_as_next_does():
    """take(n): the next n steps' samples, the same as n calls of next, also where they span two or three
    blocks; those spanning blocks are the caller's own, not changed by the refills that later calls start."""
    cdf = np.cumsum(SUPPORT) / SUPPORT.sum()
    with SampleStore(cdf, 5, 5 * 4, np.random.default_rng(8)) as one_by_one:
        expected = np.array([one_by_one.next() for _ in range(23)])
    with SampleStore(cdf, 5, 5 * 4, np.random.default_rng(8)) as samples:
        taken, copies = [], []
        for n in (3, 2, 9, 1, 8):  # blocks of 4: within one, spanning two, three
            taken.append(samples.take(n))
            copies.append(taken[-1].copy())  # a view of a block is valid until the next call
        samples.take(4)
    for spanning in (1, 2, 4):
        np.testing.assert_array_equal(taken[spanning], copies[spanning])
    np.testing.assert_array_equal(np.concatenate(copies), expected)
    assert taken[1].shape == (2, 5) and taken[1].dtype == np.int32


def test_sample_store_blocks_are_the_generators_uniforms_in_order():
    # A block larger than the chunks it is mapped in: the same items as one searchsorted of one draw.
    cdf = np.cumsum(SUPPORT) / SUPPORT.sum()
    n_sample, size = 1000, 3 * SAMPLE_CHUNK + 1000
    with SampleStore(cdf, n_sample, size, np.random.default_rng(11)) as samples:
        first, second = samples.pending.result(), samples.draw()
    u = np.random.default_rng(11).random(2 * first.size)
    expected = np.minimum(np.searchsorted(cdf, u, side='right'), len(cdf) - 1).reshape(2, *first.shape)
    assert first.shape == (size // n_sample, n_sample)
    np.testing.assert_array_equal(first, expected[0])
    np.testing.assert_array_equal(second, expected[1])


def test_sample_store_sizes():
    cdf = np.cumsum(SUPPORT) / SUPPORT.sum()
    with SampleStore(cdf, 4, 0, np.random.default_rng(0)) as per_step:  # size 0: a block per step
        assert per_step.next().shape == (4,) and per_step.n_steps == 1
    with SampleStore(cdf, 4, 10000000, np.random.default_rng(0), max_steps=30) as capped:
        assert capped.n_steps == 30 and capped.next().shape == (4,)
    with SampleStore(cdf, 0, 1000, np.random.default_rng(0)) as none:
        assert none.next().shape == (0,) and none.worker is None
