"""The same graphs compiled by PyTensor's C backend and by JAX train and evaluate alike.

The negative samples and the dropout masks come from numpy, seeded by the model, so both backends see
identical mini-batches and must end with the same parameters up to float32 rounding.
"""
import numpy as np
import pandas as pd
import pytest

from evaluation import evaluate_gpu
from gru4rec import GRU4Rec

pytest.importorskip('jax', reason='the JAX backend needs jax: pip install gru4rec[jax]')

LOSS_SETTINGS = {
    'cross-entropy': dict(loss='cross-entropy', final_act='softmax', logq=1.0, smoothing=0.1),
    'xe_logit': dict(loss='xe_logit', final_act='softmax_logit'),
    'bpr': dict(loss='bpr', final_act='linear', adapt='rmsprop'),
    'top1': dict(loss='top1', final_act='tanh', adapt='adadelta'),
    'bpr-max': dict(loss='bpr-max', final_act='elu-0.5', bpreg=1.0, momentum=0.3),
    'top1-max': dict(loss='top1-max', final_act='leaky-0.1', adapt='adam', grad_cap=1.0, lmbd=1e-3),
}
INPUT_MODES = {
    'constrained': dict(constrained_embedding=True),
    'embedding': dict(embedding=6),
    'one-hot': dict(embedding=0),
}


def session_log(n_sessions=40, n_items=30, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, size=n_sessions)
    sessions = np.repeat(np.arange(n_sessions), lengths)
    items = rng.integers(0, n_items, size=len(sessions))
    return pd.DataFrame({'SessionId': sessions, 'ItemId': items, 'Time': np.arange(len(sessions))})


def trained(backend, **settings):
    # batch 5 over 40 sessions ends each epoch with a padded tail: the masks are exercised too
    params = dict(layers=[8], batch_size=5, n_sample=7, n_epochs=1, learning_rate=0.05, verbose=False, seed=3)
    params.update(settings)
    return GRU4Rec(backend=backend, **params).fit(session_log(), sample_store=70)


def assert_same_model(c_model, jax_model):
    assert type(jax_model.training_step_.function.maker.linker).__name__ == 'JAXLinker'
    assert list(c_model.weights) == list(jax_model.weights)
    for name in c_model.weights:
        assert jax_model.weights[name].dtype == c_model.weights[name].dtype == np.float32, name
        np.testing.assert_allclose(jax_model.weights[name], c_model.weights[name], rtol=1e-3, atol=2e-5,
                                   err_msg=f'parameter {name} differs between the C and JAX backends')
    test = session_log(n_sessions=15, seed=1)
    for mode in ('standard', 'conservative', 'median'):
        c_recall, c_mrr = evaluate_gpu(c_model, test, cut_off=[1, 5, 10], batch_size=4, mode=mode)
        jax_recall, jax_mrr = evaluate_gpu(jax_model, test, cut_off=[1, 5, 10], batch_size=4, mode=mode)
        for k in c_recall:
            assert type(jax_recall[k]) is float and type(jax_mrr[k]) is float
            assert jax_recall[k] == pytest.approx(c_recall[k], abs=1e-6)
            assert jax_mrr[k] == pytest.approx(c_mrr[k], abs=1e-6)


@pytest.mark.parametrize('loss', sorted(LOSS_SETTINGS))
def test_each_loss_trains_alike_on_c_and_jax(loss):
    settings = dict(LOSS_SETTINGS[loss], constrained_embedding=True)
    assert_same_model(trained('c', **settings), trained('jax', **settings))


@pytest.mark.parametrize('mode', ['embedding', 'one-hot'])
def test_each_input_mode_trains_alike_on_c_and_jax(mode):
    settings = dict(LOSS_SETTINGS['bpr-max'], **INPUT_MODES[mode])
    assert_same_model(trained('c', **settings), trained('jax', **settings))


def test_two_layers_train_alike_on_c_and_jax():
    settings = dict(LOSS_SETTINGS['cross-entropy'], layers=[8, 6], constrained_embedding=True)
    assert_same_model(trained('c', **settings), trained('jax', **settings))


def test_dropout_trains_alike_on_c_and_jax_and_a_refit_repeats_it():
    settings = dict(LOSS_SETTINGS['bpr-max'], layers=[8, 6], embedding=6, dropout_p_embed=0.3, dropout_p_hidden=0.2)
    jax_model = trained('jax', **settings)
    assert_same_model(trained('c', **settings), jax_model)
    first = {name: w.copy() for name, w in jax_model.weights.items()}
    jax_model.fit(session_log(), sample_store=70)  # the same compiled graph, reseeded
    for name, w in first.items():
        np.testing.assert_array_equal(jax_model.weights[name], w, err_msg=name)


def test_jax_predictions_equal_c_predictions():
    c_model = trained('c', **LOSS_SETTINGS['bpr-max'])
    jax_model = trained('jax', **LOSS_SETTINGS['bpr-max'])
    sessions, items = [1, 2, 3], [0, 4, 9]
    for _ in range(2):
        c_scores = c_model.predict_next_batch(sessions, items, batch=3)
        jax_scores = jax_model.predict_next_batch(sessions, items, batch=3)
        np.testing.assert_allclose(jax_scores.to_numpy(), c_scores.to_numpy(), rtol=1e-3, atol=1e-5)
