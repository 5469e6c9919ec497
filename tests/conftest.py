"""Shared fixtures and helpers: hand-made session logs, small fitted models, the real-data folder.

Tests import the plain helpers with `from conftest import ...` (pytest puts tests/ on sys.path).
The markers of pytest.ini are applied here, in one place (pytest_collection_modifyitems).
"""
import inspect
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
    """48 sessions of equal length: with batch_size 4 every slot ends together."""
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


def real_log(name):
    """A log from ../shared/data by file name; skips the test where the data is absent."""
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f'real data not found: {path} (../shared/data from the repository root) is absent')
    return read_log(path)


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


def loss_reference(loss, Yhat, smoothing, bpreg):
    """Per-row loss of the M x N score matrix Yhat whose row i has its target in column i, from the
    SPEC's formulas. Label smoothing is the usual smoothed target distribution: 1 - smoothing on the
    target, smoothing / (N - 1) on every other column."""
    M, N = Yhat.shape
    is_target = np.eye(M, N, dtype=bool)
    d = Yhat[is_target][:, None]
    if loss in ('cross-entropy', 'xe_logit'):
        labels = np.where(is_target, 1 - smoothing, smoothing / (N - 1))
        if loss == 'cross-entropy':
            log_p = np.log(Yhat + 1e-24)
        else:
            m = Yhat.max(axis=1, keepdims=True)
            log_p = Yhat - m - np.log(np.exp(Yhat - m).sum(axis=1, keepdims=True))
        return -(labels * log_p).sum(axis=1)
    if loss == 'bpr':
        return -np.log(sigmoid(d - Yhat)).sum(axis=1)
    if loss == 'top1':
        return (sigmoid(Yhat - d) + sigmoid(Yhat ** 2)).mean(axis=1) - sigmoid(d[:, 0] ** 2) / N
    negatives = np.where(is_target, -np.inf, Yhat)
    s = np.exp(negatives - negatives.max(axis=1, keepdims=True))
    s /= s.sum(axis=1, keepdims=True)
    if loss == 'bpr-max':
        return -np.log((s * sigmoid(d - Yhat)).sum(axis=1) + 1e-24) + bpreg * (s * Yhat ** 2).sum(axis=1)
    assert loss == 'top1-max'
    return (s * (sigmoid(Yhat - d) + sigmoid(Yhat ** 2))).sum(axis=1)


def gru_reference(x_proj, h, Wrz, Wh, act, bhc=None):
    """SPEC's cell; x_proj = x·Wx + b holds the r, z and candidate blocks side by side. With the
    hidden-side candidate bias bhc, the reset-after cell (reset_after=True): r multiplies h·Wh + bhc."""
    L = h.shape[1]
    r = sigmoid(x_proj[:, :L] + h @ Wrz[:, :L])
    z = sigmoid(x_proj[:, L:2 * L] + h @ Wrz[:, L:])
    recurrent = (r * h) @ Wh if bhc is None else r * (h @ Wh + bhc)
    c = ACTIVATIONS[act](x_proj[:, 2 * L:] + recurrent)
    return (1 - z) * h + z * c


def weights64(model):
    return {n: w.astype(np.float64) for n, w in model.weights.items()}


def hidden_reference(model, W, X, H_prev):
    """States after reading items X from H_prev (list per layer), with the float64 weights W; the
    input path is chosen from the hyper-parameters."""
    if model.constrained_embedding:
        x_proj = W['Wy'][X] @ W['Wx0'] + W['Bh0']
    elif model.embedding:
        x_proj = W['E'][X] @ W['Wx0'] + W['Bh0']
    else:
        x_proj = W['Wx0'][X] + W['Bh0']
    H = []
    for l in range(len(model.layers)):
        if l > 0:
            x_proj = H[-1] @ W[f'Wx{l}'] + W[f'Bh{l}']
        bhc = W[f'Bhc{l}'] if model.reset_after else None
        H.append(gru_reference(x_proj, H_prev[l], W[f'Wrz{l}'], W[f'Wh{l}'], model.hidden_act, bhc))
    return H


def forward_reference(model, X, H_prev, candidates=None):
    """New states and final scores of all items (or of the indices `candidates`)."""
    W = weights64(model)
    H = hidden_reference(model, W, X, H_prev)
    Wy, By = (W['Wy'], W['By']) if candidates is None else (W['Wy'][candidates], W['By'][candidates])
    return H, ACTIVATIONS[model.final_act](H[-1] @ Wy.T + By)


class RecordingModel:
    """A trained model seen through the interface evaluate_gpu scores it by, keeping what it compiles."""

    def __init__(self, model):
        self.model, self.functions = model, []
        self.itemidmap, self.state_sizes = model.itemidmap, model.state_sizes

    def get_params(self):
        return self.model.get_params()

    def symbolic_step(self, *args, **kwargs):
        return self.model.symbolic_step(*args, **kwargs)

    def compile_function(self, inputs, outputs, updates=None):
        fn = self.model.compile_function(inputs, outputs, updates)
        self.functions.append(fn)
        return fn


# Modules and tests that take long (seconds each on CI's two cores; see pytest.ini for the fast run).
SLOW_MODULES = {'test_accuracy', 'test_notebook', 'test_paropt', 'test_paropt_postgres', 'test_serve', 'test_workflow',
                'test_properties', 'test_model_files', 'test_c_kernels', 'test_backends', 'test_retrain', 'test_cli',
                'test_cells', 'test_live', 'test_baselines', 'test_original', 'test_bad_input', 'test_preprocess',
                'test_split_valid', 'test_saveload', 'test_synthetic', 'test_serve_production', 'test_live_store',
                'test_itemindex', 'test_docs'}
SLOW_TESTS = {'test_precompiled_headers_are_built_once_and_left_out_where_they_cannot_be',
              'test_a_cold_compile_builds_every_new_module_once_and_several_at_a_time'}


def _source(item):
    try:
        return inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return ''


def pytest_collection_modifyitems(config, items):
    """Marks every test by what it needs: realdata (../shared/data: the data_dir fixture or real_log),
    jax (the JAX backend), postgres (a PostgreSQL server), redis (a Redis server) and slow (SLOW_MODULES,
    SLOW_TESTS)."""
    for item in items:
        module = item.module.__name__ if item.module else ''
        source = _source(item)
        if 'data_dir' in item.fixturenames or 'real_log(' in source or module == 'test_accuracy':
            item.add_marker(pytest.mark.realdata)
        if module == 'test_backends' or "'jax'" in source:
            item.add_marker(pytest.mark.jax)
        if module == 'test_paropt_postgres':
            item.add_marker(pytest.mark.postgres)
        if {'redis', 'redis_url'} & set(item.fixturenames) or "'redis'" in source:
            item.add_marker(pytest.mark.redis)
        if module in SLOW_MODULES or item.name.split('[')[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
