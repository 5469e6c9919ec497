"""The same graphs compiled by PyTensor's C backend and by JAX train and evaluate alike.

The negative samples and the dropout masks come from numpy, seeded by the model, so both backends see
identical mini-batches and must end with the same parameters up to float32 rounding.
"""
import numpy as np
import pandas as pd
import pytest
from pytensor.link.jax.linker import JAXLinker

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
    assert isinstance(jax_model.training_step_.function.maker.linker, JAXLinker)
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


# -- the JAX backend keeps its arrays on the device ------------------------------------------------------

def test_jax_donates_the_buffers_that_updates_replace_and_computes_the_same():
    """A function's updated shared variables are donated (their old device buffers are consumed by the
    call and the new values are right); an input that no update replaces is left alone."""
    import jax
    import pytensor.tensor as pt
    from pytensor import shared

    from backends import call, compile_function, set_shared, to_host
    w = shared(np.zeros((50, 4), np.float32), shape=(50, 4))
    c = shared(np.zeros(4, np.float32), shape=(4,))
    x = pt.tensor('x', dtype='float32', shape=(4,))
    f = compile_function([x], (w * c).sum(), {w: w + x * c}, backend='jax')
    start = np.arange(200, dtype=np.float32).reshape(50, 4)
    set_shared(w, start, 'jax')
    set_shared(c, np.float32([1, 2, 3, 4]), 'jax')
    before_w, before_c = w.get_value(borrow=True), c.get_value(borrow=True)
    assert isinstance(before_w, jax.Array) and isinstance(before_c, jax.Array)
    (out,) = to_host([call(f, np.float32([1, 1, 1, 1]))])
    assert before_w.is_deleted() and not before_c.is_deleted()
    assert out == pytest.approx((start * [1, 2, 3, 4]).sum())
    np.testing.assert_array_equal(to_host([w.get_value(borrow=True)])[0], start + [1, 2, 3, 4])
    assert start[0, 1] == 1  # the caller's array was copied, never donated


def jax_model(loss='cross-entropy', **settings):
    params = dict(layers=[8], batch_size=5, n_sample=7, n_epochs=2, learning_rate=0.05, verbose=False, seed=3,
                  backend='jax', dropout_p_hidden=0.2, **LOSS_SETTINGS[loss])
    params.update(settings)
    return GRU4Rec(**params)


def test_jax_training_step_consumes_its_weights_buffers():
    model = jax_model(n_epochs=1).fit(session_log(), sample_store=70)
    step = model.training_step_
    before = {name: var.get_value(borrow=True) for name, var in step.params.items()}
    step(np.int32([0, 1]), np.int32([2, 3]), np.int32([0, 1]), np.float32([0, 0]), np.int32([4] * 7))
    for name, value in before.items():
        assert value.is_deleted(), f'{name} was copied, not updated in place'


def test_jax_training_evaluation_and_prediction_move_nothing_behind_the_codes_back():
    """Under jax.transfer_guard('disallow') every implicit host-device transfer raises: training with
    validation (the loss reads included), evaluation, prediction and recommend only move data by their explicit
    uploads and downloads (per step: the mini-batch up; every 256 steps and after an epoch the losses
    down). Compiling may move constants: the first round compiles everything outside the guard."""
    import jax
    log, valid = session_log(), session_log(n_sessions=15, seed=1)
    model = jax_model()
    for guard in ('allow', 'disallow'):
        with jax.transfer_guard(guard):
            model.fit(log, valid_data=valid)
            recall, _ = evaluate_gpu(model, valid, cut_off=[1, 5], batch_size=4)
            scores = model.predict_next_batch([1, 2, 3], [0, 4, 9], batch=3)
            top = model.recommend({1: [0, 4], 2: [9]}, k=3)
    assert len(top) == 6 and (top['score'].diff().fillna(0)[top['rank'] > 1] <= 0).all()
    assert np.isfinite(model.history_[-1]['loss']) and 0 < recall[5] <= 1 and np.isfinite(scores.to_numpy()).all()
    # The guard does catch an implicit transfer: a training step fed its inputs without the explicit upload.
    fn = model.training_step_.function
    ints, floats = model.training_step_.inputs(np.int32([0]), np.int32([1]), np.int32([0]), np.float32([0]),
                                               np.int32([2] * 7))
    fn.trust_input = True
    with jax.transfer_guard('disallow'), pytest.raises(Exception, match='[Dd]isallowed host-to-device transfer'):
        fn(ints, floats)


def test_a_loaded_or_restored_jax_model_keeps_its_weights_on_the_device(tmp_path):
    """loadmodel and a rollback after a NaN loss put the weights on the device: predicting and
    evaluating upload no weight (they run under the transfer guard once compiled: a weight left in
    host memory would be uploaded at every call)."""
    import jax
    model = jax_model('bpr-max').fit(session_log(), sample_store=70)
    model.savemodel(tmp_path / 'model')
    loaded = GRU4Rec.loadmodel(tmp_path / 'model')
    assert all(isinstance(v.get_value(borrow=True), jax.Array) for v in loaded.training_step_.params.values())
    test = session_log(n_sessions=15, seed=1)
    expected = evaluate_gpu(model, test, cut_off=[5], batch_size=4)
    for m in (model, loaded):  # compiles (outside the guard: compiling may move constants)
        evaluate_gpu(m, test, cut_off=[5], batch_size=4)
        m.predict_next_batch([1, 2, 3], [0, 4, 9], batch=3)
    for m in (model, loaded):
        with jax.transfer_guard('disallow'):
            assert evaluate_gpu(m, test, cut_off=[5], batch_size=4) == expected
            m.predict_next_batch([1, 2, 3], [0, 4, 9], batch=3)
    loaded.set_params(learning_rate=1e30)
    with pytest.raises(FloatingPointError):
        loaded.retrain(session_log())
    assert all(isinstance(v.get_value(borrow=True), jax.Array) for v in loaded.training_step_.params.values())
    evaluate_gpu(loaded, test, cut_off=[5], batch_size=4)  # the new learning rate rebuilt the graphs
    with jax.transfer_guard('disallow'):
        assert evaluate_gpu(loaded, test, cut_off=[5], batch_size=4) == expected


def test_the_python_example_of_docs_gpu_runs(capsys):
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / 'docs' / 'gpu.md').read_text()
    (example,) = [block.split('```')[0] for block in text.split('```python\n')[1:]]
    exec(compile(example, 'docs/gpu.md', 'exec'), {})  # noqa: S102 (the documentation's own example)
    assert capsys.readouterr().out.startswith('loss ')
