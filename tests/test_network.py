"""The network of SPEC section 2 against a float64 numpy re-implementation using the model's weights:
the GRU cell, the forward pass of every input mode, prediction with state carried between calls,
and the initialisation."""
import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

from conftest import INPUT_MODES, MODELS, SMALL, forward_reference, gru_reference, weights64
from hyperparams import parse_hyperparameters
from losses import parse_activation
from network import gru_step, init_weights


def expected_shapes(params, n_items):
    layers = params.get('layers', SMALL['layers'])
    L0, L_last = layers[0], layers[-1]
    K = L0 if params['embedding'] == 'layersize' else params['embedding']
    shapes = {'Wy': (n_items, L_last), 'By': (n_items,)}
    if params['constrained_embedding']:
        shapes['Wx0'] = (L_last, 3 * L0)
    elif K:
        shapes.update(E=(n_items, K), Wx0=(K, 3 * L0))
    else:
        shapes['Wx0'] = (n_items, 3 * L0)
    for l, L in enumerate(layers):
        if l > 0:
            shapes[f'Wx{l}'] = (layers[l - 1], 3 * L)
        shapes.update({f'Wrz{l}': (L, 2 * L), f'Wh{l}': (L, L), f'Bh{l}': (3 * L,)})
    return shapes


@pytest.mark.parametrize('name', sorted(MODELS))
def test_parameters_have_the_shapes_of_the_input_mode(models, name):
    model = models(name)
    assert {n: w.shape for n, w in model.weights.items()} == expected_shapes(MODELS[name], model.n_items)
    for n, p in model.params_.items():  # the compiled graph holds the same weights (item matrices: plus a padding row)
        np.testing.assert_array_equal(model.weights[n], p.get_value()[:len(model.weights[n])])


@pytest.mark.parametrize('name,layer', [('onehot', 0), ('two_layers', 0), ('two_layers', 1)])
def test_gru_step_matches_numpy(models, name, layer):
    model = models(name)
    x_proj, h = pt.dmatrix('x_proj'), pt.dmatrix('h')
    f = pytensor.function([x_proj, h], gru_step(x_proj, h, model.params_[f'Wrz{layer}'], model.params_[f'Wh{layer}'],
                                                 parse_activation(model.hidden_act)))
    L = model.layers[layer]
    rng = np.random.default_rng(layer)
    xp, h0 = rng.normal(0, 1, size=(5, 3 * L)), rng.normal(0, 0.7, size=(5, L))
    W = weights64(model)
    expected = gru_reference(xp, h0, W[f'Wrz{layer}'], W[f'Wh{layer}'], model.hidden_act)
    np.testing.assert_allclose(f(xp, h0), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name', sorted(MODELS))
@pytest.mark.parametrize('with_candidates', [False, True])
def test_symbolic_step_matches_numpy(models, name, with_candidates):
    model = models(name)
    X = pt.ivector('X')
    H_prev = [pt.dmatrix(f'H{l}') for l in range(len(model.layers))]
    candidates = pt.ivector('candidates')
    H, scores = model.symbolic_step(X, H_prev, candidates if with_candidates else None)
    f = pytensor.function([X, candidates] + H_prev, H + [scores], on_unused_input='ignore')
    rng = np.random.default_rng(5)
    X_val = np.array([3, 0, 11, 3, 7], dtype=np.int32)
    H_val = [rng.normal(0, 0.5, size=(len(X_val), L)) for L in model.layers]
    cand = np.array([4, 9, 0, 4, 2], dtype=np.int32) if with_candidates else None
    *H_got, scores_got = f(X_val, np.zeros(0, np.int32) if cand is None else cand, *H_val)
    H_exp, scores_exp = forward_reference(model, X_val, H_val, cand)
    for got, exp in zip(H_got, H_exp):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
    assert scores_got.shape == (len(X_val), model.n_items if cand is None else len(cand))
    np.testing.assert_allclose(scores_got, scores_exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['onehot', 'two_layers'])
def test_predict_next_batch_carries_state_within_sessions(models, name):
    """Three slots over four calls; slot 1 switches session at the third call and must start afresh."""
    model = models(name)
    ids = model.itemidmap.to_numpy()
    calls = [(['a', 'b', 'c'], [0, 5, 9]), (['a', 'b', 'c'], [2, 5, 1]),
             (['a', 'd', 'c'], [7, 3, 1]), (['a', 'd', 'c'], [11, 4, 6])]
    states = {}
    for sessions, items in calls:
        H_prev = [np.stack([states[s][l] if s in states else np.zeros(L) for s in sessions])
                  for l, L in enumerate(model.layers)]
        H, expected = forward_reference(model, np.array(items), H_prev)
        states.update({s: [h[i] for h in H] for i, s in enumerate(sessions)})
        got = model.predict_next_batch(np.array(sessions, dtype=object), ids[items], batch=3)
        assert list(got.index) == list(ids)
        np.testing.assert_allclose(got.to_numpy(), expected.T, rtol=1e-4, atol=1e-5)


def test_predict_next_batch_scores_candidates(models):
    model = models('constrained')
    ids = model.itemidmap.to_numpy()
    candidates = [10, 1, 4]
    got = model.predict_next_batch(np.array(['x', 'y']), ids[[2, 8]], predict_for_item_ids=ids[candidates], batch=2)
    _, expected = forward_reference(model, np.array([2, 8]), [np.zeros((2, L)) for L in model.layers], candidates)
    assert list(got.index) == list(ids[candidates])
    np.testing.assert_allclose(got.to_numpy(), expected.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('params', [dict(INPUT_MODES['onehot'], layers=[8, 6]),
                                    dict(INPUT_MODES['embedding'], layers=[8, 6]),
                                    dict(INPUT_MODES['constrained'], layers=[8])])
def test_initialisation_is_uniform_per_block_with_zero_biases(params):
    """Each weight block is uniform in [-s, s], s = sqrt(6 / (rows + cols)) of the block (not of the
    concatenated matrix): with this many draws the largest magnitude is within 10% of s."""
    weights = init_weights(parse_hyperparameters(**dict(SMALL, **params)), 40, np.random.default_rng(0))
    shapes = expected_shapes(params, 40)
    assert {n: w.shape for n, w in weights.items()} == shapes
    for name, w in weights.items():
        assert w.dtype == np.float32
        if name.startswith('B'):
            assert not w.any(), name
            continue
        rows = w.shape[0]
        n_blocks = 3 if name.startswith('Wx') else 2 if name.startswith('Wrz') else 1
        for block in np.split(w, n_blocks, axis=1):
            s = np.sqrt(6.0 / (rows + block.shape[1]))
            assert 0.9 * s < np.abs(block).max() <= s, name
