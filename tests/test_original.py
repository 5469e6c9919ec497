"""Where we follow the original Theano GRU4Rec (hidasib/GRU4Rec), each behaviour against a float64 numpy
transcription of the original's formula or against the behaviour the original had: prediction state,
fit's positional arguments, BPR-max / TOP1-max with extreme scores, prediction with softmax_logit,
decoupled L2, Adadelta's step size, its evaluation entry points and its command line."""
import copy
import warnings

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

import evaluation
from conftest import ITEM_IDS, fit_small, forward_reference, make_log, sigmoid, softmax
from losses import LOSSES, parse_activation
from test_cli import cli, files, results  # noqa: F401 (files is a fixture)

SESSIONS = np.array([11, 12, 13])
FIRST, SECOND = ITEM_IDS[[0, 3, 5]], ITEM_IDS[[2, 2, 7]]
CANDIDATES = ITEM_IDS[[1, 4, 7, 9]]


def fresh_scores(model, items):
    """Scores of sessions that start with `items`, computed by numpy from the model's weights."""
    _, scores = forward_reference(model, model.itemidmap.get_indexer(items),
                                  [np.zeros((len(items), L)) for L in model.layers])
    return scores.T  # items x sessions, like predict_next_batch


def continued_scores(model, first, second):
    """Scores after each session read `first` then `second` (numpy)."""
    zeros = [np.zeros((len(first), L)) for L in model.layers]
    H, _ = forward_reference(model, model.itemidmap.get_indexer(first), zeros)
    _, scores = forward_reference(model, model.itemidmap.get_indexer(second), H)
    return scores.T


# -- bug 1 and 2: the state of predict_next_batch ---------------------------------------------------

def test_predict_next_batch_keeps_the_sessions_state_when_the_output_mode_changes():
    model = fit_small(n_epochs=1)
    model.predict_next_batch(SESSIONS, FIRST, batch=3)  # all items
    got = model.predict_next_batch(SESSIONS, SECOND, predict_for_item_ids=CANDIDATES, batch=3)
    expected = continued_scores(model, FIRST, SECOND)[model.itemidmap.get_indexer(CANDIDATES)]
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-4, atol=1e-5)
    model.predict_next_batch(SESSIONS, SECOND, predict_for_item_ids=CANDIDATES, batch=3)
    back = model.predict_next_batch(SESSIONS, FIRST, batch=3)  # and back: the same state went on
    zeros = [np.zeros((3, L)) for L in model.layers]
    H, _ = forward_reference(model, model.itemidmap.get_indexer(FIRST), zeros)
    for items in (SECOND, SECOND):
        H, _ = forward_reference(model, model.itemidmap.get_indexer(items), H)
    _, scores = forward_reference(model, model.itemidmap.get_indexer(FIRST), H)
    np.testing.assert_allclose(back.to_numpy(), scores.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('change', ['fit', 'retrain', 'set_params'])
def test_sessions_restart_after_the_weights_or_parameters_change(change):
    """The original dropped its prediction function on fit: the same session ids do not go on from
    states computed with the old weights."""
    model = fit_small(n_epochs=1)
    model.predict_next_batch(SESSIONS, FIRST, batch=3)
    if change == 'fit':
        model.fit(make_log([4] * 20, seed=5), sample_store=60)
    elif change == 'retrain':
        model.retrain(make_log([4] * 20, seed=5), sample_store=60)
    else:
        model.set_params(n_epochs=3)
    got = model.predict_next_batch(SESSIONS, SECOND, batch=3)
    np.testing.assert_allclose(got.to_numpy(), fresh_scores(model, SECOND), rtol=1e-4, atol=1e-5)


def test_predict_next_batch_gives_the_softmax_with_softmax_logit():
    """The original's prediction applied the softmax the xe_logit loss computes internally."""
    model = fit_small(n_epochs=1, loss='xe_logit', final_act='softmax_logit')
    got = model.predict_next_batch(SESSIONS, FIRST, batch=3).to_numpy()  # items x sessions
    _, logits = forward_reference(model, model.itemidmap.get_indexer(FIRST),
                                  [np.zeros((3, L)) for L in model.layers])
    np.testing.assert_allclose(got, softmax(logits).T, rtol=1e-4, atol=1e-7)
    subset = model.predict_next_batch(SESSIONS + 100, FIRST, predict_for_item_ids=CANDIDATES, batch=3).to_numpy()
    np.testing.assert_allclose(subset, softmax(logits[:, model.itemidmap.get_indexer(CANDIDATES)]).T,
                               rtol=1e-4, atol=1e-7)


# -- bug 4: BPR-max and TOP1-max with extreme scores -----------------------------------------------

def original_softmax_neg(Yhat):
    """The original's softmax_neg: the target's score zeroed, the row maximum subtracted, the target's
    weight zeroed (float64)."""
    hm = 1.0 - np.eye(*Yhat.shape)
    X = Yhat * hm
    e = np.exp(X - X.max(axis=1, keepdims=True)) * hm
    return e / e.sum(axis=1, keepdims=True)


def original_loss(loss, Yhat, bpreg):
    s = original_softmax_neg(Yhat)
    d = np.diag(Yhat)[:, None]
    if loss == 'bpr-max':
        return -np.log((sigmoid(d - Yhat) * s).sum(axis=1) + 1e-24) + bpreg * (Yhat ** 2 * s).sum(axis=1)
    return (s * (sigmoid(Yhat - d) + sigmoid(Yhat ** 2))).sum(axis=1)


@pytest.mark.parametrize('loss', ['bpr-max', 'top1-max'])
def test_bpr_max_and_top1_max_are_finite_with_extreme_scores(loss):
    """float32, as in training: a target scored far above its negatives (whose exp underflowed when the
    row maximum included the target: 0 / 0), negatives all far below zero, and an ordinary row."""
    rng = np.random.default_rng(0)
    Z = rng.normal(0, 1, size=(3, 7))
    Z[0, 0] = 300.0
    Z[1, [0, 2, 3, 4, 5, 6]] = -150 + rng.normal(0, 1, size=6)
    logits = pt.matrix('logits', dtype='float32')
    with pytensor.config.change_flags(floatX='float32'):
        per_row = LOSSES[loss](parse_activation('linear', final=True)(logits), bpreg=np.float32(0.5))
        f = pytensor.function([logits], [per_row, pytensor.grad(per_row.sum(), logits)])
    got, grad = f(Z.astype(np.float32))
    assert np.isfinite(got).all() and np.isfinite(grad).all()
    np.testing.assert_allclose(got, original_loss(loss, Z, 0.5), rtol=1e-4, atol=1e-6)


# -- bug 5: fit's third positional argument is the original's store_type ----------------------------

def test_a_third_positional_argument_of_fit_does_not_retrain():
    model = fit_small(n_epochs=1)
    model.fit(make_log([4] * 20, seed=5), 60, 'gpu')
    assert len(model.history_) == 1  # a new model, as the original trained with fit(data, 60, 'gpu')
    with pytest.raises(ValueError, match="store_type=True: use 'gpu' or 'cpu'.*by keyword"):
        model.fit(make_log([4] * 20, seed=5), 60, True)
    with pytest.raises(TypeError):
        model.fit(make_log([4] * 20, seed=5), 60, 'gpu', True)


def test_new_items_on_retraining_get_the_grown_matrixs_scale():
    """The original's extend_weights drew the new rows with the whole matrix's fan:
    uniform in +-sqrt(6 / (n_old + n_new + L)) (their own fan would allow +-sqrt(6 / (n_new + L)))."""
    old_items, new_items = np.arange(300) + 5000, np.arange(6) + 9000
    model = fit_small(make_log([3] * 200, seed=7, items=old_items), n_epochs=1, embedding=5,
                      constrained_embedding=False)
    model.set_params(learning_rate=1e-9)  # the retraining leaves the new rows where they were drawn
    n_old = model.n_items
    model.retrain(make_log([3] * 20, seed=8, items=np.concatenate([new_items, old_items[:10]]), first_session=900),
                  sample_store=60, n_epochs=1)
    assert n_old >= 100 and model.n_items - n_old >= 4
    for name, width in (('Wy', 8), ('E', 5)):
        new_rows = model.weights[name][n_old:]
        bound = np.sqrt(6.0 / (model.n_items + width))
        assert bound * 0.5 < np.abs(new_rows).max() <= bound * 1.001, name


# -- optimiser: decoupled L2 and Adadelta's step size -------------------------------------------------

@pytest.mark.parametrize('momentum', [0.0, 0.4])
def test_lmbd_is_decoupled_weight_decay(momentum):
    """The original adds lmbd * w to the step after the adaptive scaling, for dense parameters and for
    the item rows a step reads: with Adagrad, one step from weights W1 moves them by
    -lr * (g / sqrt(acc + g^2 + eps) + lmbd * W1) (plus momentum times the stored velocity), so the
    difference made by lmbd is exactly -lr * lmbd * W1 where a step reads, and 0 elsewhere. (L2 in the
    gradient would also enter the accumulator.)"""
    model = fit_small(n_epochs=1, adapt='adagrad', momentum=momentum)
    decayed = copy.deepcopy(model).set_params(lmbd=0.3)
    W1 = {name: w.copy() for name, w in model.weights.items()}
    one_step = make_log([2], seed=6, first_session=901)  # one session of two events: one training step
    model.retrain(one_step, sample_store=60, n_epochs=1)
    decayed.retrain(one_step, sample_store=60, n_epochs=1)
    for name, w1 in W1.items():
        w1 = w1.astype(np.float64)
        plain, got = model.weights[name].astype(np.float64), decayed.weights[name].astype(np.float64)
        read = (plain != w1).reshape(len(w1), -1).any(axis=1) if name in ('Wy', 'By', 'Wx0') else np.ones(len(w1), bool)
        read = read.reshape((-1,) + (1,) * (w1.ndim - 1))
        expected = np.where(read, plain - model.learning_rate * 0.3 * w1, w1)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6, err_msg=name)


def test_adadelta_takes_steps_of_its_own_size():
    """The original sets learning_rate to 1.0 with a warning when adapt='adadelta'."""
    reference = fit_small(adapt='adadelta', learning_rate=1.0)
    with pytest.warns(UserWarning, match="adadelta.*learning_rate=0.05 is ignored"):
        model = fit_small(adapt='adadelta', learning_rate=0.05)
    for name, w in reference.weights.items():
        np.testing.assert_array_equal(model.weights[name], w, err_msg=name)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fit_small(adapt='adadelta', learning_rate=1.0, n_epochs=1)


# -- evaluation entry points ---------------------------------------------------------------------------

def test_the_originals_evaluation_entry_points(test_log):
    model = fit_small(n_epochs=1)
    recall, mrr = evaluation.evaluate_gpu(model, test_log, CANDIDATES, 'SessionId', 'ItemId', 'Time', [5], 7,
                                          'conservative')
    assert evaluation.evaluate_sessions_batch(model, test_log, CANDIDATES, 5, 7, 'conservative') == (recall[5], mrr[5])
    recall, mrr = evaluation.evaluate_gpu(model, test_log, None, cut_off=[5], mode='tiebreaking')
    got = evaluation.evaluate_sessions(model, test_log, None, cut_off=5)
    assert got == (recall[5], mrr[5]) and all(isinstance(v, float) for v in got)


# -- the original's command line ------------------------------------------------------------------------

def test_the_original_readmes_command_lines_run_verbatim(files, tmp_path):
    """The three run.py lines of the original README, with its paths replaced (and the first line's
    training shortened by the parameter file's n_epochs in the second)."""
    train, test, model = files / 'train.tsv', files / 'test.tsv', tmp_path / 'save_model.pickle'
    status, out, err = cli(train, '-t', test, '-m', 1, 5, 10, 20, '-ps',
                           'layers=224,batch_size=80,dropout_p_embed=0.5,dropout_p_hidden=0.05,learning_rate=0.05,'
                           'momentum=0.4,n_sample=2048,sample_alpha=0.4,bpreg=1.95,logq=0.0,loss=bpr-max,'
                           'constrained_embedding=True,final_act=elu-0.5,n_epochs=10', '-s', model)
    assert status == 0, err
    assert len(results(out)) == 4
    paramfile = tmp_path / 'parameter_file.py'
    paramfile.write_text('from collections import OrderedDict\ngru4rec_params = OrderedDict([\n'
                         "('loss', 'cross-entropy'), ('constrained_embedding', True), ('embedding', 0),\n"
                         "('final_act', 'softmax'), ('layers', [16]), ('n_epochs', 2), ('batch_size', 16),\n"
                         "('dropout_p_embed', 0.0), ('dropout_p_hidden', 0.2), ('learning_rate', 0.05),\n"
                         "('momentum', 0.3), ('n_sample', 64), ('sample_alpha', 0.3), ('bpreg', 0.0), ('logq', 1.0)\n"
                         '])\n')
    status, _, err = cli(train, '-pf', paramfile, '-s', tmp_path / 'other.pickle')
    assert status == 0, err
    status, loaded, err = cli(model, '-l', '-t', test, '-m', 1, 5, 10, 20, '-e', 'conservative')
    assert status == 0, err
    assert len(results(loaded)) == 4


def test_the_originals_long_options(files, tmp_path):
    train, test = files / 'train.tsv', files / 'test.tsv'
    renamed = files / 'renamed.tsv'
    tiny = 'layers=8,n_epochs=1,batch_size=8,n_sample=8,seed=3'
    status, out, err = cli(train, '--parameter_string', tiny, '--save_model', tmp_path / 'm', '--test', test,
                           '--measure', 5, '--eval_type', 'median', '--sample_store_size', 1000,
                           '--sample_store_on_cpu', '-g', 'gru4rec')
    assert status == 0, err
    assert 'no effect here' in err
    ours = cli(train, '--parameter-string', tiny, '-t', test, '-m', 5, '-e', 'median', '-ss', 1000)
    assert results(out) == results(ours[1])
    status, out, err = cli(tmp_path / 'm', '--load_model', '--test', renamed, '--item_key', 'iid',
                           '--session_key', 'sid', '--time_key', 'ts', '--primary_metric', 'mrr',
                           '--log_primary_metric')
    assert status == 0, err
    assert out.strip().splitlines()[-1].startswith('PRIMARY METRIC: ')
