"""Shared fixtures and helpers: hand-made session logs, small fitted models, the real-data folder.

Tests import the plain helpers with `from conftest import ...` (pytest puts tests/ on sys.path).
"""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gru4rec import GRU4Rec

DATA_DIR = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'

# Item ids are sparse and start far from 0 so that mixing up ids and dense indices shows.
ITEM_IDS = np.arange(12) * 7 + 1001

# Input modes of SPEC section 2, as hyper-parameters.
INPUT_MODES = {
    'onehot': dict(embedding=0, constrained_embedding=False),
    'embedding': dict(embedding=5, constrained_embedding=False),
    'layersize': dict(embedding='layersize', constrained_embedding=False),
    'constrained': dict(embedding=0, constrained_embedding=True),
}

SMALL = dict(layers=[8], n_epochs=2, batch_size=4, n_sample=6, sample_alpha=0.5, learning_rate=0.1,
             loss='bpr-max', final_act='elu-0.5', bpreg=0.5, verbose=False, seed=7)
# Input modes plus a deeper model whose layers differ in width (the constrained input is L_last wide).
MODELS = dict(INPUT_MODES, two_layers=dict(layers=[8, 6], hidden_act='elu-0.5', **INPUT_MODES['constrained']))
# 60 ids with 6 samples each: the store is used up and refilled several times per epoch.
SMALL_STORE = 60


def make_log(lengths, seed, items=ITEM_IDS, first_session=1):
    """Sessions of the given lengths; items drawn with skewed probabilities so that supports differ;
    times increase along the log, so the session order is the order of `lengths`."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(items) + 1)
    sessions = np.repeat(np.arange(first_session, first_session + len(lengths)), lengths)
    return pd.DataFrame({'SessionId': sessions,
                         'ItemId': rng.choice(items, size=len(sessions), p=p / p.sum()),
                         'Time': np.arange(len(sessions), dtype=np.float64) * 10.0})


def make_train_log():
    """48 sessions of equal length: with batch_size 4 every slot ends together, so no training step
    has a single row (see test_training.py::test_fit_with_a_single_slot_tail for why that matters)."""
    log = make_log([5] * 48, seed=1)
    assert set(log.ItemId) == set(ITEM_IDS)
    return log


def fit_small(log=None, **params):
    """A small model trained on `log` (default: make_train_log()) with SMALL overridden by params."""
    model = GRU4Rec(**dict(SMALL, **params))
    return model.fit(make_train_log() if log is None else log, sample_store=SMALL_STORE)


@pytest.fixture(scope='session')
def models():
    """Small fitted models by MODELS name, trained once per test session.
    Treat them as read-only: tests that change weights fit their own."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = fit_small(**MODELS[name])
        return cache[name]
    return get


@pytest.fixture
def test_log():
    """Test sessions of different lengths over the training items."""
    return make_log([2, 5, 3, 6, 2, 4, 3, 2, 5, 4, 3, 6], seed=2, first_session=501)


@pytest.fixture(scope='session')
def data_dir():
    if not DATA_DIR.is_dir():
        pytest.skip(f'real data not found: {DATA_DIR} (../shared/data from the repository root) is absent')
    return DATA_DIR


def read_log(path):
    return pd.read_csv(path, sep='\t', dtype={'SessionId': np.int64, 'ItemId': np.int64, 'Time': np.float64})


def sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# float64 references of the activations used in the tests, by gru4rec name.
ACTIVATIONS = {
    'linear': lambda x: x,
    'relu': lambda x: np.maximum(x, 0),
    'tanh': np.tanh,
    'leaky-0.1': lambda x: np.where(x >= 0, x, 0.1 * x),
    'elu-0.5': lambda x: np.where(x >= 0, x, 0.5 * np.expm1(x)),
    'selu-1.05-1.67': lambda x: 1.05 * np.where(x >= 0, x, 1.67 * np.expm1(x)),
    'softmax': softmax,
    'softmax_logit': lambda x: x,
}
