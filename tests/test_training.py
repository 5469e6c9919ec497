"""The training step: one SGD step against a float64 numpy reference (cost, gradients, sparse updates,
logQ, samples from the store, carried states), float32 graphs under floatX=float64, and the tail of an
epoch that shrinks to a single slot."""
import numpy as np
import pandas as pd
import pytensor
import pytest

import evaluation
from conftest import (ACTIVATIONS, INPUT_MODES, RecordingModel, fit_small, hidden_reference, loss_reference,
                      make_log, make_train_log, weights64)
from sessions import session_arrays, session_parallel_batches

STEP_CASES = {
    'xe-logq-smoothing-constrained': dict(loss='cross-entropy', final_act='softmax', logq=1.0, smoothing=0.1,
                                          **INPUT_MODES['constrained']),
    'bpr-max-two-layers-onehot': dict(loss='bpr-max', final_act='elu-0.5', bpreg=0.5, layers=[8, 6],
                                      **INPUT_MODES['onehot']),
    'top1-embedding': dict(loss='top1', final_act='tanh', **INPUT_MODES['embedding']),
}


def step_cost(model, W, X, T, samples, H_prev):
    """The SPEC's training cost of one step with weights W, without dropout."""
    H = hidden_reference(model, W, X, H_prev)
    Y = np.concatenate([T, samples])
    logits = H[-1] @ W['Wy'][Y].T + W['By'][Y]
    if model.logq:
        q = np.concatenate([model.support[T], model.support[samples] ** model.sample_alpha])
        logits = logits - model.logq * np.log(q)
    Yhat = ACTIVATIONS[model.final_act](logits)
    return loss_reference(model.loss, Yhat, model.smoothing, model.bpreg).sum() / model.batch_size, H


@pytest.mark.parametrize('case', sorted(STEP_CASES))
def test_sgd_step_matches_numpy(case):
    """Three of four slots active (cost still divided by batch_size 4), one of them reset, the states
    taken from permuted rows, a sample equal to a target and an item that is both input and target:
    every parameter must move by -learning_rate times the numeric gradient, untouched rows not at all."""
    model = fit_small(adapt=None, momentum=0.0, n_epochs=1, **STEP_CASES[case])
    rng = np.random.default_rng(0)
    H_state = [rng.normal(0, 0.5, size=(model.batch_size, L)).astype(np.float32) for L in model.layers]
    for shared, value in zip(model.H_, H_state):
        shared.set_value(value)
    X, T = np.array([3, 0, 7], dtype=np.int32), np.array([5, 3, 0], dtype=np.int32)
    prev_rows, keep = np.array([2, 0, 3], dtype=np.int32), np.array([1, 0, 1], dtype=np.float32)
    store = rng.integers(0, model.n_items, size=(3, model.n_sample)).astype(np.int32)
    store[1, 0] = T[1]
    H_prev = [h.astype(np.float64)[prev_rows] * keep[:, None] for h in H_state]
    W = weights64(model)

    cost = model.training_step_(X, T, prev_rows, keep, store[1])

    expected_cost, expected_H = step_cost(model, W, X, T, store[1], H_prev)
    np.testing.assert_allclose(cost, expected_cost, rtol=1e-4)
    for shared, h in zip(model.H_, expected_H):  # the padding row after the three active ones is not compared
        np.testing.assert_allclose(shared.get_value()[:len(X)], h, rtol=1e-4, atol=1e-6)
    for name, grad in numeric_gradients(model, W, X, T, store[1], H_prev).items():
        delta = model.params_[name].get_value()[:len(W[name])].astype(np.float64) - W[name]
        np.testing.assert_allclose(delta, -model.learning_rate * grad, rtol=2e-3, atol=1e-6, err_msg=name)


@pytest.mark.parametrize('mode', ['constrained', 'onehot'])
def test_adagrad_momentum_step_sums_the_gradient_of_a_row_read_several_times(mode):
    """An item sampled three times, also a target and (constrained) an input, and an input read by
    two slots: each row gets its summed gradient G and one step, acc += G^2,
    velocity = momentum * velocity - lr * G / sqrt(acc + 1e-6), w += velocity; rows the step does not
    read keep weights and optimiser state. (Once per read, as the original did, fails this.)"""
    model = fit_small(adapt='adagrad', momentum=0.3, n_epochs=1, loss='cross-entropy', final_act='softmax',
                      **INPUT_MODES[mode])
    rng = np.random.default_rng(1)
    state = {}
    for name, accumulators in model.training_step_.optimizer.state.items():
        for kind, shared in accumulators.items():
            state[kind, name] = rng.uniform(0.1, 1.0, size=shared.get_value().shape).astype(np.float32)
            if kind == 'velocity':
                state[kind, name] -= 0.5
            shared.set_value(state[kind, name])
    for shared in model.H_:
        shared.set_value(np.zeros_like(shared.get_value()))
    X, T = np.array([3, 3, 7], dtype=np.int32), np.array([5, 3, 0], dtype=np.int32)
    prev_rows, keep = np.array([0, 1, 2], dtype=np.int32), np.zeros(3, dtype=np.float32)
    samples = np.array([5, 9, 5, 5, 1, 0], dtype=np.int32)[:model.n_sample]
    W = weights64(model)
    H_prev = [np.zeros((len(X), L)) for L in model.layers]

    model.training_step_(X, T, prev_rows, keep, samples)

    read = {'Wy': np.concatenate([T, samples] + ([X] if mode == 'constrained' else [])),
            'By': np.concatenate([T, samples])}  # the rows each item-indexed parameter reads
    if mode == 'onehot':
        read['Wx0'] = X
    for name, G in numeric_gradients(model, W, X, T, samples, H_prev).items():
        acc, vel = (state[kind, name][:len(G)].astype(np.float64) for kind in ('adagrad', 'velocity'))
        touched = np.ones(len(G), bool)
        if name in read:
            touched[:] = False
            touched[read[name]] = True
        touched = touched.reshape((-1,) + (1,) * (G.ndim - 1))
        acc_new = np.where(touched, acc + G ** 2, acc)
        vel_new = np.where(touched, model.momentum * vel - model.learning_rate * G / np.sqrt(acc_new + 1e-6), vel)
        w_new = np.where(touched, W[name] + vel_new, W[name])
        accumulators = model.training_step_.optimizer.state[name]
        for got, expected, what in [(accumulators['adagrad'], acc_new, 'accumulator'),
                                    (accumulators['velocity'], vel_new, 'velocity'),
                                    (model.params_[name], w_new, 'weights')]:
            np.testing.assert_allclose(got.get_value()[:len(G)], expected, rtol=2e-3, atol=1e-6,
                                       err_msg=f'{name} {what}')


def numeric_gradients(model, W, X, T, samples, H_prev, h=1e-6):
    """Central differences of step_cost w.r.t. every weight (float64)."""
    grads = {}
    for name, w in W.items():
        grad = np.zeros_like(w)
        for idx in np.ndindex(*w.shape):
            w[idx] += h
            up = step_cost(model, W, X, T, samples, H_prev)[0]
            w[idx] -= 2 * h
            down = step_cost(model, W, X, T, samples, H_prev)[0]
            w[idx] += h
            grad[idx] = (up - down) / (2 * h)
        grads[name] = grad
    return grads


@pytest.mark.parametrize('adapt', ['adadelta', 'adam'])  # the others' arithmetic is a subset of these
def test_graphs_are_float32_under_float64_floatx(adapt):
    """Every feature that adds arithmetic to the training graph is on, so a float64 constant or
    upcast anywhere shows."""
    assert pytensor.config.floatX == 'float64'
    model = fit_small(loss='cross-entropy', final_act='softmax', logq=1.0, smoothing=0.1, adapt=adapt,
                      momentum=0.5, grad_cap=1.0, lmbd=0.01, dropout_p_hidden=0.2, dropout_p_embed=0.1,
                      **INPUT_MODES['embedding'])
    optimizer = model.training_step_.optimizer
    shared = (list(model.params_.values()) + model.H_
              + [v for state in optimizer.state.values() for v in state.values()]
              + [optimizer.t, model.P_target_, model.P_sample_])
    assert {v.name: v.get_value().dtype for v in shared} == {v.name: np.float32 for v in shared}
    cost = model.training_step_(np.array([1, 2], np.int32), np.array([3, 4], np.int32), np.array([0, 1], np.int32),
                                np.ones(2, np.float32), np.arange(model.n_sample, dtype=np.int32))
    assert cost.dtype == np.float32
    model.predict_next_batch(np.array([1, 2]), model.itemidmap[[0, 1]], batch=2)
    recording = RecordingModel(model)  # the evaluation step, with candidates and random tie-breaking
    evaluation.evaluate_gpu(recording, make_train_log(), items=model.itemidmap[:5], cut_off=[5, 20], batch_size=4,
                            mode='tiebreaking')
    compiled = [model.training_step_.function, model.compiled(('predict_next_batch', 2, False), None),
                *recording.functions]
    assert len(compiled) == 3
    for fn in compiled:
        dtypes = {v.dtype for v in fn.maker.fgraph.variables if hasattr(v, 'dtype')}
        assert 'float64' not in dtypes


@pytest.mark.parametrize('mode', ['onehot',
                                  'embedding',
                                  'layersize', 'constrained'])
def test_fit_when_the_epoch_tail_shrinks_to_one_slot(mode):
    log = make_log([2, 5, 3, 6, 2, 4, 3, 2, 5, 4, 3, 7], seed=5)
    items, offsets, order = session_arrays(log, pd.Index(np.sort(log.ItemId.unique())),
                                           'SessionId', 'ItemId', 'Time')
    assert min(len(X) for X, *_ in session_parallel_batches(items, offsets, order, 4)) == 1
    model = fit_small(log, n_epochs=1, **INPUT_MODES[mode])
    assert np.isfinite(model.history_[0]['loss'])


def test_fit_does_not_modify_the_callers_data():
    log = make_train_log()
    shuffled = log.sample(frac=1.0, random_state=0)
    before = shuffled.copy()
    fit_small(shuffled, n_epochs=1)
    pd.testing.assert_frame_equal(shuffled, before)


def test_fit_keeps_the_hyper_parameters_as_given():
    """fit parses command-line strings for its own use (hyperparameters_) and leaves the hyper-parameters
    as the caller gave them, as a scikit-learn estimator does."""
    model = fit_small(layers='8', n_epochs='1', constrained_embedding='True', learning_rate='0.05')
    assert model.get_params()['layers'] == '8' and model.n_epochs == '1' and model.learning_rate == '0.05'
    assert model.hyperparameters_['layers'] == [8] and model.hyperparameters_['constrained_embedding'] is True
    assert model.layers_ == [8] and np.isfinite(model.history_[0]['loss'])


def test_losses_read_in_blocks_give_the_epoch_loss_and_name_the_nan_step(monkeypatch):
    """The loop reads the steps' losses every CHECK_EVERY steps (3 here) and at the epoch's end: the
    epoch's loss is still the float32 running sum of each step's cost times its sessions, over the
    events; a NaN returned at step 8 is named as step 8 and the model goes back to its last epoch."""
    import training
    from gru4rec import GRU4Rec
    monkeypatch.setattr(training, 'CHECK_EVERY', 3)
    recorded, sizes, nan_at = [], [], {'step': None}
    packed, run = training.TrainingStep.packed, training.TrainingStep.run

    def recording_packed(self, batches, samples):  # prepares steps ahead of the runs: sizes may run ahead
        for ints, floats, M in packed(self, batches, samples):
            sizes.append(M)
            yield ints, floats, M

    def recording_run(self, ints, floats):
        cost = run(self, ints, floats)
        recorded.append(np.asarray(cost))
        return np.float32(np.nan) if len(recorded) == nan_at['step'] else cost
    monkeypatch.setattr(training.TrainingStep, 'packed', recording_packed)
    monkeypatch.setattr(training.TrainingStep, 'run', recording_run)
    model = GRU4Rec(layers=[8], batch_size=4, n_sample=6, n_epochs=1, verbose=False, seed=1)
    model.fit(make_train_log(), sample_store=60)
    assert len(recorded) > 2 * 3 + 1
    assert len(sizes) == len(recorded)
    total = 0.0
    for cost, size in zip(recorded, sizes):
        total += cost * size
    assert model.history_[0]['loss'] == float(total) / sum(sizes)
    good = {name: w.copy() for name, w in model.weights_.items()}
    recorded.clear()
    sizes.clear()
    nan_at['step'] = 8
    with pytest.raises(FloatingPointError, match=r'the loss became nan at epoch 1, step 8;'):
        model.retrain(make_train_log())
    assert len(recorded) == 9  # found at the read after step 9
    for name, w in good.items():
        np.testing.assert_array_equal(model.weights_[name], w)
