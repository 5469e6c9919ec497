"""The two GRU cells (issue 18): the original's (reset_after=False, the reset gate applied to the previous
state before the recurrent product) and the reset-after cell of cuDNN and torch.nn.GRUCell
(reset_after=True), each against float64 numpy transcriptions: forward pass, gradients, torch's
published equations (and torch.nn.GRUCell itself when torch is installed); then that the option
reaches every part that runs the network (prediction, evaluation, saving, retraining, the command
line, the backends) and leaves the default model and its files as they were."""
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

import paropt
import run
from conftest import (ACTIVATIONS, INPUT_MODES, fit_small, forward_reference, gru_reference,
                      hidden_reference, make_log, sigmoid, weights64)
from evaluation import evaluate_gpu
from backends import compile_function
from gru4rec import GRU4Rec
from hyperparams import HYPERPARAMETERS, parse_hyperparameters

REPO = Path(__file__).resolve().parents[1]
# Trained with reset_after=True: every input mode, and two layers of different widths (conftest's MODELS,
# but tanh everywhere, torch.nn.GRUCell's activation).
CELL_MODELS = dict(INPUT_MODES, two_layers=dict(layers=[8, 6], **INPUT_MODES['constrained']))
MAGIC_AND_LENGTH = 16  # a model file: 8-byte magic, 8-byte header length, JSON header, npz, SHA-256


@pytest.fixture(scope='module')
def cells(models):
    """Small fitted models by (CELL_MODELS name, reset_after): the default cell's are conftest's
    (two_layers with its hidden activation elu-0.5), the others are trained once per module."""
    cache = {}

    def get(name, reset_after):
        if not reset_after:
            return models(name)
        if name not in cache:
            cache[name] = fit_small(reset_after=True, **CELL_MODELS[name])
        return cache[name]
    return get


def layer_inputs(model, W, X):
    """The first layer's input vectors x (M x n_in), such that x·Wx0 + Bh0 is the layer's x_proj."""
    if model.constrained_embedding:
        return W['Wy'][X]
    if model.embedding:
        return W['E'][X]
    return np.eye(model.n_items)[X]  # one-hot: Wx0 is the n_items x 3L input matrix


def step_inputs(model, seed=5):
    rng = np.random.default_rng(seed)
    X = np.array([3, 0, 11, 3, 7], dtype=np.int32)
    return X, [rng.normal(0, 0.5, size=(len(X), L)) for L in model.layers]


def symbolic(model):
    """X, H_prev (float64 inputs) and the model's new states and scores of all items."""
    X = pt.ivector('X')
    H_prev = [pt.dmatrix(f'H{l}') for l in range(len(model.layers))]
    H, scores = model.symbolic_step(X, H_prev)
    return X, H_prev, H, scores


# -- the cells against float64 numpy ----------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(CELL_MODELS))
def test_reset_after_adds_one_hidden_side_candidate_bias_per_layer(cells, name):
    default, reset_after = cells(name, False), cells(name, True)
    assert not any(n.startswith('Bhc') for n in default.weights)
    added = {n: w.shape for n, w in reset_after.weights.items() if n not in default.weights}
    assert added == {f'Bhc{l}': (L,) for l, L in enumerate(default.layers)}
    assert {n: w.shape for n, w in reset_after.weights.items() if n in default.weights} == \
        {n: w.shape for n, w in default.weights.items()}
    for l in range(len(default.layers)):  # initialised to zero like the other biases, then trained
        bhc = reset_after.weights[f'Bhc{l}']
        assert bhc.dtype == np.float32 and np.abs(bhc).max() > 1e-4


@pytest.mark.parametrize('name', sorted(CELL_MODELS))
def test_forward_matches_numpy(cells, name):
    """The reset-after cell; test_network checks the default cell the same way on the same models."""
    reset_after = True
    model = cells(name, reset_after)
    X, H_prev, H, scores = symbolic(model)
    X_val, H_val = step_inputs(model)
    *H_got, scores_got = model.compile_function([X] + H_prev, H + [scores])(X_val, *H_val)
    H_exp, scores_exp = forward_reference(model, X_val, H_val)
    for got, exp in zip(H_got, H_exp):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores_got, scores_exp, rtol=1e-5, atol=1e-6)
    # the two cells differ by far more than the tolerance on these weights, so the check tells them apart
    W = weights64(model)
    x_proj = layer_inputs(model, W, X_val) @ W['Wx0'] + W['Bh0']
    other = gru_reference(x_proj, H_val[0], W['Wrz0'], W['Wh0'], model.hidden_act,
                          None if reset_after else np.zeros(model.layers[0]))
    assert np.abs(other - H_got[0]).max() > 1e-2


@pytest.mark.parametrize('reset_after', [False, True])
def test_gradients_of_the_gru_weights_match_numeric_differences(cells, reset_after):
    """The gradient PyTensor differentiates for training (of a loss of the new states and the
    scores) against central differences of the float64 reference, for every GRU weight of both layers."""
    model = cells('two_layers', reset_after)
    names = [n for n in model.weights if n.startswith(('Wx', 'Wrz', 'Wh', 'Bh'))]
    assert ('Bhc0' in names) == reset_after
    X_val, H_val = step_inputs(model, seed=8)
    rng = np.random.default_rng(9)
    G_H = rng.normal(size=(len(X_val), model.layers[-1]))
    G_s = rng.normal(size=(len(X_val), model.n_items))
    X, H_prev, H, scores = symbolic(model)
    loss = (G_H * H[-1]).sum() + (G_s * scores).sum()
    grads = model.compile_function([X] + H_prev, pytensor.grad(loss, [model.params_[n] for n in names]))(X_val, *H_val)

    W = weights64(model)

    def reference_loss():
        H_ref = hidden_reference(model, W, X_val, H_val)
        s = ACTIVATIONS[model.final_act](H_ref[-1] @ W['Wy'].T + W['By'])
        return (G_H * H_ref[-1]).sum() + (G_s * s).sum()

    eps = 1e-6
    for n, got in zip(names, grads):
        numeric = np.zeros_like(W[n])
        for i in np.ndindex(W[n].shape):
            w = W[n][i]
            W[n][i] = w + eps
            up = reference_loss()
            W[n][i] = w - eps
            numeric[i] = (up - reference_loss()) / (2 * eps)
            W[n][i] = w
        got = got[:len(numeric)]  # the one-hot Wx0 has a padding row after the items
        assert np.abs(numeric).max() > 1e-3, n
        np.testing.assert_allclose(got, numeric, rtol=1e-3, atol=1e-4 * np.abs(numeric).max(), err_msg=n)


def torch_layout(W, l, split_rz_bias=True):
    """Layer l's weights in torch.nn.GRUCell's layout. Its gates are stacked in the order r, z, n
    (rows of weight_ih: in -> 3L, weight_hh: L -> 3L; bias_ih, bias_hh: 3L), ours in the order
    r, z, c (columns of Wx, Bh; Wrz holds r, z; Wh and Bhc the candidate's). Torch's z is the share
    of the old state, h' = (1-z)*n + z*h, ours the share of the new one, h' = (1-z)*h + z*c:
    σ(-a) = 1 - σ(a), so torch's z-rows are ours negated. n = c. The hidden-side biases of r and z
    only add to the input-side ones; split_rz_bias puts half of ours on each side to show it."""
    L = len(W[f'Bhc{l}'])
    flip = np.concatenate([np.ones(L), -np.ones(L), np.ones(L)])  # negates the z block
    bias = W[f'Bh{l}'] * flip
    bias_hh = np.concatenate([bias[:2 * L] / 2 if split_rz_bias else np.zeros(2 * L), W[f'Bhc{l}']])
    bias_ih = bias - np.concatenate([bias_hh[:2 * L], np.zeros(L)])
    return {'weight_ih': (W[f'Wx{l}'] * flip).T, 'weight_hh': (np.hstack([W[f'Wrz{l}'], W[f'Wh{l}']]) * flip).T,
            'bias_ih': bias_ih, 'bias_hh': bias_hh}


def torch_gru_cell_equations(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """torch.nn.GRUCell as its documentation writes it (gate order r, z, n):
    r = σ(W_ir x + b_ir + W_hr h + b_hr), z = σ(W_iz x + b_iz + W_hz h + b_hz),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h."""
    gi = x @ weight_ih.T + bias_ih
    gh = h @ weight_hh.T + bias_hh
    i_r, i_z, i_n = np.split(gi, 3, axis=1)
    h_r, h_z, h_n = np.split(gh, 3, axis=1)
    r, z = sigmoid(i_r + h_r), sigmoid(i_z + h_z)
    n = np.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def model_states(model, X_val, H_val):
    X, H_prev, H, _ = symbolic(model)
    return model.compile_function([X] + H_prev, H)(X_val, *H_val)


@pytest.mark.parametrize('name', sorted(CELL_MODELS))
def test_reset_after_is_torch_gru_cell_by_its_published_equations(cells, name):
    model = cells(name, True)
    W = weights64(model)
    X_val, H_val = step_inputs(model)
    x = layer_inputs(model, W, X_val)
    for l, got in enumerate(model_states(model, X_val, H_val)):
        x = torch_gru_cell_equations(x, H_val[l], **torch_layout(W, l))
        np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', sorted(CELL_MODELS))
def test_reset_after_equals_torch_gru_cell(cells, name):
    torch = pytest.importorskip('torch', reason='comparing with torch.nn.GRUCell itself needs torch')
    model = cells(name, True)
    W = weights64(model)
    X_val, H_val = step_inputs(model)
    x = torch.from_numpy(layer_inputs(model, W, X_val))
    for l, got in enumerate(model_states(model, X_val, H_val)):
        cell = torch.nn.GRUCell(x.shape[1], model.layers[l], dtype=torch.float64)
        with torch.no_grad():
            for param, value in torch_layout(W, l).items():
                getattr(cell, param).copy_(torch.from_numpy(value))
            x = cell(x, torch.from_numpy(H_val[l]))
        np.testing.assert_allclose(got, x.numpy(), rtol=1e-5, atol=1e-6)


# -- prediction, evaluation, saving, retraining -----------------------------------------------------

def test_predict_next_batch_runs_the_reset_after_cell(cells):
    model = cells('two_layers', True)
    ids = model.itemidmap.to_numpy()
    H = [np.zeros((3, L)) for L in model.layers]
    for items in ([0, 5, 9], [2, 5, 1]):
        H, expected = forward_reference(model, np.array(items), H)
        got = model.predict_next_batch(np.array(['a', 'b', 'c'], dtype=object), ids[items], batch=3)
        np.testing.assert_allclose(got.to_numpy(), expected.T, rtol=1e-4, atol=1e-5)


def test_evaluation_runs_the_reset_after_cell(cells, test_log):
    model = cells('embedding', True)
    ranks = []
    for _, session in test_log.groupby('SessionId', sort=False):
        items = model.itemidmap.get_indexer(session.ItemId.to_numpy())
        H = [np.zeros((1, L)) for L in model.layers]
        for t in range(len(items) - 1):
            H, scores = forward_reference(model, items[t:t + 1], H)
            ranks.append(1 + (scores[0] > scores[0, items[t + 1]]).sum())
    ranks = np.array(ranks)
    recall, mrr = evaluate_gpu(model, test_log, cut_off=[1, 3, 5], batch_size=4)
    for k in (1, 3, 5):
        assert recall[k] == pytest.approx((ranks <= k).mean(), abs=1e-9)
        assert mrr[k] == pytest.approx(((ranks <= k) / ranks).mean(), abs=1e-6)


def test_reset_after_is_saved_loaded_and_retrained(tmp_path):
    first, second = make_log([4] * 24, seed=3), make_log([5] * 24, seed=4, first_session=100)
    model = fit_small(first, reset_after=True, **INPUT_MODES['embedding'])
    model.savemodel(tmp_path / 'm.gru4rec')
    loaded = GRU4Rec.loadmodel(tmp_path / 'm.gru4rec')
    assert loaded.reset_after is True
    np.testing.assert_array_equal(loaded.weights['Bhc0'], model.weights['Bhc0'])
    X_val, H_val = step_inputs(model)
    np.testing.assert_array_equal(model_states(loaded, X_val, H_val)[0], model_states(model, X_val, H_val)[0])
    before = model.weights['Bhc0'].copy()
    model.retrain(second, sample_store=60)
    loaded.retrain(second, sample_store=60)
    assert np.abs(model.weights['Bhc0'] - before).max() > 1e-4  # retraining trains the new bias too
    for n in model.weights:
        np.testing.assert_array_equal(loaded.weights[n], model.weights[n], err_msg=n)
    assert {n for n in loaded.opt_values if n.endswith('Bhc0')}  # with its optimiser state


def read_model_file(path):
    """(JSON header, names of the arrays) of a model file, read by its documented layout."""
    blob = Path(path).read_bytes()
    n = int.from_bytes(blob[8:MAGIC_AND_LENGTH], 'little')
    with np.load(io.BytesIO(blob[MAGIC_AND_LENGTH + n:-32])) as npz:
        return json.loads(blob[MAGIC_AND_LENGTH:MAGIC_AND_LENGTH + n]), set(npz.files)


def test_the_default_model_file_only_gains_the_hyper_parameter(models, tmp_path):
    model = models('onehot')  # the default cell
    model.savemodel(tmp_path / 'm.gru4rec')
    header, arrays = read_model_file(tmp_path / 'm.gru4rec')
    assert header['params']['reset_after'] is False
    assert set(header['params']) == set(HYPERPARAMETERS)
    params = {a for a in arrays if a.startswith('param/')}
    assert params == {'param/Wx0', 'param/Wrz0', 'param/Wh0', 'param/Bh0', 'param/Wy', 'param/By'}
    assert not [a for a in arrays if 'Bhc' in a]


def test_files_without_reset_after_load_as_the_original_cell(models, tmp_path):
    model = models('two_layers')
    model.savemodel(tmp_path / 'm.gru4rec')
    blob = (tmp_path / 'm.gru4rec').read_bytes()[:-32]
    n = int.from_bytes(blob[8:MAGIC_AND_LENGTH], 'little')
    header = json.loads(blob[MAGIC_AND_LENGTH:MAGIC_AND_LENGTH + n])
    del header['params']['reset_after']  # as written before the option existed
    text = json.dumps(header).encode()
    old = blob[:8] + len(text).to_bytes(8, 'little') + text + blob[MAGIC_AND_LENGTH + n:]
    (tmp_path / 'old.gru4rec').write_bytes(old + hashlib.sha256(old).digest())
    loaded = GRU4Rec.loadmodel(tmp_path / 'old.gru4rec')
    assert loaded.reset_after is False
    X_val, H_val = step_inputs(model)
    for got, exp in zip(model_states(loaded, X_val, H_val), model_states(model, X_val, H_val)):
        np.testing.assert_array_equal(got, exp)


# -- the hyper-parameter ----------------------------------------------------------------------------

def test_reset_after_is_read_from_strings_and_checked():
    assert GRU4Rec().reset_after is False
    # set_params stores the value as given, as the constructor; fit and the model file read it parsed.
    assert parse_hyperparameters(**GRU4Rec().set_params(reset_after='True').get_params())['reset_after'] is True
    assert parse_hyperparameters(**run.parse_param_string('reset_after=1'))['reset_after'] is True
    with pytest.raises(ValueError, match='reset_after'):
        GRU4Rec().set_params(reset_after='later')


def test_the_command_line_trains_and_saves_the_reset_after_cell(tmp_path):
    make_log([4] * 24, seed=3).to_csv(tmp_path / 'train.tsv', sep='\t', index=False)
    make_log([4] * 6, seed=6, first_session=100).to_csv(tmp_path / 'test.tsv', sep='\t', index=False)
    (tmp_path / 'p.py').write_text("gru4rec_params = {'reset_after': True, 'layers': [8], 'n_epochs': 1}\n")
    status = run.main([str(tmp_path / 'train.tsv'), '-pf', str(tmp_path / 'p.py'), '-ps', 'batch_size=4,n_sample=6',
                       '-t', str(tmp_path / 'test.tsv'), '-s', str(tmp_path / 'm.gru4rec')])
    assert status == 0
    loaded = GRU4Rec.loadmodel(tmp_path / 'm.gru4rec')
    assert loaded.reset_after is True and 'Bhc0' in loaded.weights


@pytest.mark.parametrize('space', sorted((REPO / 'paramspaces').glob('*_shared_parspace.json')), ids=lambda p: p.name)
def test_the_search_spaces_try_both_cells(space):  # this library's spaces; the original's know one cell
    entry, = [e for e in paropt.read_space(space) if e['name'] == 'reset_after']
    assert entry['dtype'] == 'categorical' and sorted(entry['values']) == [False, True]
    for value in entry['values']:  # as a trial passes it to run.py
        text = run.format_param_string({'reset_after': value})
        assert parse_hyperparameters(**run.parse_param_string(text))['reset_after'] is value


# -- backends ---------------------------------------------------------------------------------------

def test_the_reset_after_graphs_compile_and_agree_on_every_backend(cells):
    """The step of prediction and evaluation, and its gradient w.r.t. the GRU weights, compiled by
    each backend: the same numbers as the C backend's."""
    pytest.importorskip('jax', reason='the JAX backend needs jax: pip install gru4rec[jax]')
    backend = 'jax'
    model = cells('two_layers', True)
    names = [n for n in model.weights if n.startswith(('Wx', 'Wrz', 'Wh', 'Bh'))]
    X, H_prev, H, scores = symbolic(model)
    outputs = H + [scores] + pytensor.grad(scores.sum() + H[-1].sum(), [model.params_[n] for n in names])
    X_val, H_val = step_inputs(model)
    expected = compile_function([X] + H_prev, outputs, backend='c')(X_val, *H_val)
    got = compile_function([X] + H_prev, outputs, backend=backend)(X_val, *H_val)
    for name, g, e in zip(['H0', 'H1', 'scores'] + names, got, expected):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-4, atol=1e-5, err_msg=name)


def test_the_reset_after_cell_trains_and_predicts_alike_on_c_and_jax():
    pytest.importorskip('jax', reason='the JAX backend needs jax: pip install gru4rec[jax]')
    settings = dict(CELL_MODELS['two_layers'], reset_after=True, n_epochs=1)
    c_model, jax_model = fit_small(**settings), fit_small(backend='jax', **settings)
    assert list(jax_model.weights) == list(c_model.weights)
    for n in c_model.weights:
        np.testing.assert_allclose(jax_model.weights[n], c_model.weights[n], rtol=1e-3, atol=2e-5, err_msg=n)
    ids = c_model.itemidmap.to_numpy()
    for items in ([0, 4, 9], [1, 4, 2]):
        np.testing.assert_allclose(jax_model.predict_next_batch([1, 2, 3], ids[items], batch=3).to_numpy(),
                                   c_model.predict_next_batch([1, 2, 3], ids[items], batch=3).to_numpy(),
                                   rtol=1e-3, atol=1e-5)
