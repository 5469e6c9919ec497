"""Bad input (issue "Reliability and security"): every entry point (fit, retrain, predict_next_batch,
recommend, evaluate_gpu) rejects malformed session logs and arguments with an error that says what is
wrong, never modifies the caller's DataFrame, and training failures (NaN loss, Ctrl-C) leave a usable
model. tests/README.md tabulates the inputs tried and the error each gets."""
import copy
import inspect
import re
import warnings

import numpy as np
import pandas as pd
import pytest

import sessions
from evaluation import evaluate_gpu
from gru4rec import GRU4Rec
from hyperparams import HYPERPARAMETERS, parse_hyperparameters
from training import TrainingStep

PARAMS = dict(layers=[8], n_epochs=1, batch_size=4, n_sample=6, learning_rate=0.1, verbose=False, seed=5)


def session_log(n_sessions=30, n_items=12, seed=0, first_session=0):
    """Sessions of 2-5 events over items 100, 103, ...; time increases along the log."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 6, n_sessions)
    return pd.DataFrame({'SessionId': np.repeat(np.arange(first_session, first_session + n_sessions), lengths),
                         'ItemId': rng.integers(0, n_items, lengths.sum()) * 3 + 100,
                         'Time': np.arange(lengths.sum(), dtype=np.float64) + 1e9})


@pytest.fixture(scope='module')
def log():
    return session_log()


@pytest.fixture(scope='module')
def model(log):
    return GRU4Rec(**PARAMS).fit(log)


def snapshot(model):
    weights, opt_values = model.training_step_.get_state()  # what the compiled step holds
    return ({n: w.copy() for n, w in weights.items()}, {n: np.copy(v) for n, v in opt_values.items()},
            copy.deepcopy(model.history_), model.itemidmap.copy(), model.support.copy())


def assert_same_state(model, state):
    weights, opt_values, history, itemidmap, support = state
    now = snapshot(model)
    assert now[3].equals(itemidmap)
    np.testing.assert_array_equal(now[4], support)
    def no_seconds(h):
        return [{k: v for k, v in record.items() if k != 'seconds'} for record in h]
    assert no_seconds(now[2]) == no_seconds(history)
    for name in weights:
        np.testing.assert_array_equal(now[0][name], weights[name], err_msg=name)
    assert set(now[1]) == set(opt_values)
    for name in opt_values:
        np.testing.assert_array_equal(now[1][name], opt_values[name], err_msg=name)


# -- malformed session logs --------------------------------------------------------------------------

def _with(log, column, values):
    out = log.copy()
    out[column] = values
    return out


def _nan_at(log, column, row=3, value=np.nan):
    values = log[column].astype(object if value is None else float)
    values.iloc[row] = value
    return _with(log, column, values)


def _mixed_ids(log):
    return _with(log, 'ItemId', [str(v) if i % 2 else v for i, v in enumerate(log.ItemId)])


def _length_one(log):
    return log.drop_duplicates('SessionId')


NO_COLUMN = r"has no column\(s\) \['{}'\]"
MISSING = r"column '{}' has 1 missing \(NaN/None\) value"
NOT_TIME = r"column 'Time' must be numeric or datetime"
# name -> (make the bad log from a good one, expected error, message pattern)
BAD_LOGS = {
    'missing column': (lambda l: l.drop(columns='Time'), ValueError, NO_COLUMN.format('Time')),
    'misnamed column': (lambda l: l.rename(columns={'ItemId': 'item_id'}), ValueError, NO_COLUMN.format('ItemId')),
    'lower-case names': (lambda l: l.rename(columns=str.lower), ValueError,
                         r"has no column\(s\) \['SessionId', 'ItemId', 'Time'\]"),
    'repeated column': (lambda l: pd.concat([l, l[['ItemId']]], axis=1), ValueError,
                        r"more than one column named \['ItemId'\]"),
    'NaN item id': (lambda l: _nan_at(l, 'ItemId'), ValueError, MISSING.format('ItemId')),
    'None item id': (lambda l: _nan_at(l, 'ItemId', value=None), ValueError, MISSING.format('ItemId')),
    'pd.NA item id': (lambda l: _with(l, 'ItemId', l.ItemId.astype('Int64').where(l.index != 3)), ValueError,
                      MISSING.format('ItemId')),
    'NaN session id': (lambda l: _nan_at(l, 'SessionId'), ValueError, MISSING.format('SessionId')),
    'NaN time': (lambda l: _nan_at(l, 'Time'), ValueError, MISSING.format('Time')),
    'NaT time': (lambda l: _with(l, 'Time', pd.to_datetime(l.Time, unit='s').where(l.index != 3)), ValueError,
                 MISSING.format('Time')),
    'empty': (lambda l: l.iloc[:0], ValueError, 'is empty'),
    'mixed item id types': (_mixed_ids, ValueError, r"column 'ItemId' mixes integer and non-integer ids"),
    'string times': (lambda l: _with(l, 'Time', l.Time.astype(str)), ValueError, NOT_TIME),
    'mixed-type times': (lambda l: _with(l, 'Time', [str(t) if i % 2 else t for i, t in enumerate(l.Time)]), ValueError,
                         NOT_TIME),
    'complex times': (lambda l: _with(l, 'Time', l.Time.astype(complex)), ValueError, NOT_TIME),
    'timedelta times': (lambda l: _with(l, 'Time', pd.to_timedelta(l.Time, unit='s')), ValueError, NOT_TIME),
    'not a DataFrame': (lambda l: l.to_numpy(), TypeError, 'must be a pandas DataFrame, got ndarray'),
}


@pytest.mark.parametrize('case', BAD_LOGS)
def test_fit_rejects(log, case):
    make, error, pattern = BAD_LOGS[case]
    bad = make(log)
    with pytest.raises(error, match=r'^training data'):
        GRU4Rec(**PARAMS).fit(bad)
    with pytest.raises(error, match=pattern):
        GRU4Rec(**PARAMS).fit(bad)


@pytest.mark.parametrize('case', BAD_LOGS)
def test_fit_rejects_bad_valid_data(log, case):
    make, error, pattern = BAD_LOGS[case]
    model = GRU4Rec(**PARAMS)
    with pytest.raises(error, match=r'^valid_data.*' + pattern):
        model.fit(log, valid_data=make(log))
    assert model.itemidmap is None, 'the model changed although fit refused its input'


@pytest.mark.parametrize('case', BAD_LOGS)
def test_retrain_rejects_and_keeps_the_model(model, log, case):
    make, error, pattern = BAD_LOGS[case]
    trained = copy.deepcopy(model)
    before = snapshot(trained)
    with pytest.raises(error, match=pattern):
        trained.retrain(make(log))
    assert_same_state(trained, before)


@pytest.mark.parametrize('case', BAD_LOGS)
def test_evaluate_rejects(model, log, case):
    make, error, pattern = BAD_LOGS[case]
    with pytest.raises(error, match=r'^test data.*' + pattern):
        evaluate_gpu(model, make(log))


@pytest.mark.parametrize('case', BAD_LOGS)
def test_recommend_rejects(model, log, case):
    make, error, pattern = BAD_LOGS[case]
    with pytest.raises(error, match=r'^sessions.*' + pattern):
        model.recommend(make(log))


def test_sessions_of_length_one(model, log):
    """Nothing to learn or evaluate, but a one-event session is a valid history to recommend for."""
    ones = _length_one(log)
    with pytest.raises(ValueError, match='no session with two or more events: nothing to learn from'):
        GRU4Rec(**PARAMS).fit(ones)
    trained = copy.deepcopy(model)
    before = snapshot(trained)
    with pytest.raises(ValueError, match='no session with two or more events'):
        trained.retrain(ones)
    assert_same_state(trained, before)
    with pytest.raises(ValueError, match='no event to predict'):
        evaluate_gpu(model, ones)
    recs = model.recommend(ones, k=3)
    assert len(recs) == 3 * ones.SessionId.nunique()


def test_test_data_without_known_items(model, log):
    unknown = _with(log, 'ItemId', log.ItemId + 1)  # 101, 104, ...: none was trained on
    with pytest.raises(ValueError, match="test data has no event of an item the model knows"):
        evaluate_gpu(model, unknown)
    with pytest.raises(ValueError, match="sessions has no event of an item the model knows"):
        model.recommend(unknown)
    with pytest.raises(ValueError, match='none of the candidate items is known'):
        evaluate_gpu(model, log, items=[1, 2])
    with pytest.raises(ValueError, match=r'not trained on, e.g. \[101\]'):
        model.predict_next_batch([1], [101], batch=1)


def test_duplicate_events_train_with_a_warning(log):
    doubled = pd.concat([log, log.iloc[[4, 9, 10]]]).sort_values(['SessionId', 'Time'], kind='stable')
    with pytest.warns(UserWarning, match=r'the training data has 3 duplicate event\(s\).*trained on'):
        model = GRU4Rec(**PARAMS).fit(doubled)
    assert len(model.history_) == 1 and np.isfinite(model.history_[0]['loss'])
    with pytest.warns(UserWarning, match=r'3 duplicate event'):
        model.retrain(doubled)
    assert len(model.history_) == 2
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        warnings.filterwarnings('ignore', 'PyTensor could not link to a BLAS')
        GRU4Rec(**PARAMS).fit(log)  # no warning without duplicates


def test_repeated_index_labels_are_fine(model, log):
    """pd.concat without ignore_index repeats index labels; results must not depend on the index."""
    repeated = log.set_axis(np.zeros(len(log), dtype=int))
    partly_unknown = _with(log, 'ItemId', log.ItemId.where(log.index % 4 != 0, 7))
    for frame in (log, partly_unknown):
        expected = model.recommend(frame, k=5)
        got = model.recommend(frame.set_axis(np.zeros(len(frame), dtype=int)), k=5)
        pd.testing.assert_frame_equal(got, expected)
    assert evaluate_gpu(model, repeated) == evaluate_gpu(model, log)


# -- hyper-parameters ---------------------------------------------------------------------------------

BAD_PARAMS = [
    (dict(loss='foo'), r"loss='foo': unknown loss; use one of"),
    (dict(loss='BPR-max'), r"unknown loss"),
    (dict(final_act='elu-x'), r"unknown activation 'elu-x'"),
    (dict(final_act='elu'), r"unknown activation 'elu'"),
    (dict(final_act='elu-1-2'), r"unknown activation 'elu-1-2'"),
    (dict(final_act='selu-1'), r"unknown activation 'selu-1'"),
    (dict(final_act='leaky-'), r"unknown activation 'leaky-'"),
    (dict(final_act=3), r"unknown activation '3'"),
    (dict(hidden_act='softmax'), r"unknown activation 'softmax'"),
    (dict(hidden_act='gelu'), r"unknown activation 'gelu'"),
    (dict(loss='cross-entropy', final_act='linear'), r"needs final_act='softmax'"),
    (dict(loss='bpr-max', final_act='softmax'), r"softmax final activations go with"),
    (dict(layers=[0]), r'layers=\[0\]: give one positive size'),
    (dict(layers=[8, -1]), r'layers=\[8, -1\]: give one positive size'),
    (dict(layers=[]), r'layers=\[\]: give one positive size'),
    (dict(layers='8/x'), r"layers='8/x' cannot be read"),
    (dict(batch_size=0), r'batch_size=0: must be positive'),
    (dict(batch_size=-3), r'batch_size=-3: must be positive'),
    (dict(n_epochs=0), r'n_epochs=0: must be positive'),
    (dict(n_epochs='two'), r"n_epochs='two' cannot be read"),
    (dict(n_sample=-1), r'n_sample=-1: must not be negative'),
    (dict(n_sample=0, batch_size=1), r'batch_size=1: with n_sample=0'),
    (dict(embedding=-1), r'embedding=-1: must be 0'),
    (dict(embedding='big'), r"embedding='big' cannot be read"),
    (dict(dropout_p_hidden=1.0), r'dropout_p_hidden=1.0: must be in \[0, 1\)'),
    (dict(dropout_p_hidden=-0.1), r'dropout_p_hidden=-0.1: must be in \[0, 1\)'),
    (dict(dropout_p_embed=1.5), r'dropout_p_embed=1.5: must be in \[0, 1\)'),
    (dict(smoothing=1.0), r'smoothing=1.0: must be in \[0, 1\)'),
    (dict(learning_rate=-0.1), r'learning_rate=-0.1: must be a finite number >= 0'),
    (dict(learning_rate=float('nan')), r'learning_rate=nan: must be a finite number'),
    (dict(learning_rate=float('inf')), r'learning_rate=inf: must be a finite number'),
    (dict(momentum=-0.5), r'momentum=-0.5: must be a finite number >= 0'),
    (dict(sample_alpha=-1), r'sample_alpha=-1.0: must be a finite number >= 0'),
    (dict(bpreg=float('nan')), r'bpreg=nan: must be a finite number'),
    (dict(adapt='sgdx'), r"adapt='sgdx': unknown optimiser"),
    (dict(adapt='adagrad', adapt_params=[0.9]), r'adagrad takes 0 values'),
    (dict(adapt='adam', adapt_params=[0.9]), r'adam takes 2 values'),
    (dict(constrained_embedding='maybe'), r"constrained_embedding='maybe' cannot be read"),
    (dict(backend='cuda'), r"backend='cuda': use one of"),
    (dict(backend='numba'), r"backend='numba': use one of \['c', 'jax'\]"),  # no longer offered
]


@pytest.mark.parametrize('params, pattern', BAD_PARAMS, ids=[str(p) for p, _ in BAD_PARAMS])
def test_bad_hyperparameters(log, model, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        GRU4Rec(**dict(PARAMS, **params)).fit(log)
    with pytest.raises(ValueError, match=pattern):
        GRU4Rec(**PARAMS).set_params(**params)
    trained = copy.deepcopy(model)
    before = snapshot(trained)
    with pytest.raises(ValueError, match=pattern):
        trained.set_params(**params)
    for name, value in params.items():  # set behind set_params' back: retrain checks again
        setattr(trained, name, value)
    with pytest.raises(ValueError, match=pattern):
        trained.retrain(log)
    assert_same_state(trained, before)


def test_unknown_hyperparameter_names(log, model):
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['hiden_act'\]"):
        GRU4Rec(**PARAMS).set_params(hiden_act='tanh')
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_epoch'"):
        GRU4Rec(n_epoch=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        copy.deepcopy(model).retrain(log, learning_rate=0.5)


def test_bad_fit_options(log, model):
    cases = [(dict(sample_store=-1), r'sample_store=-1'),
             (dict(valid_metric='ndcg'), r"valid_metric='ndcg': use 'mrr' or 'recall'"),
             (dict(keep_best=True), r'keep_best and patience need valid_data'),
             (dict(patience=2), r'keep_best and patience need valid_data'),
             (dict(valid_data=log, patience=0), r'patience=0: give a positive number'),
             (dict(n_epochs=0), r'n_epochs=0: must be positive'),
             (dict(n_epochs=-2), r'n_epochs=-2: must be positive')]
    for options, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            GRU4Rec(**PARAMS).fit(log, **options)
        trained = copy.deepcopy(model)
        before = snapshot(trained)
        with pytest.raises(ValueError, match=pattern):
            trained.retrain(log, **options)
        assert_same_state(trained, before)


# -- prediction, recommendation and evaluation arguments ----------------------------------------------

def test_untrained_model_is_refused_everywhere(log):
    untrained = GRU4Rec(**PARAMS)
    pattern = r'not trained yet: call fit\(data\) or GRU4Rec.loadmodel\(path\)'
    for call in (lambda: untrained.predict_next_batch([1], [100], batch=1), lambda: untrained.recommend(log),
                 lambda: evaluate_gpu(untrained, log), lambda: untrained.savemodel('never.gru4rec')):
        with pytest.raises(ValueError, match=pattern):
            call()
    with pytest.raises(ValueError, match=r'retrain needs a trained or loaded model; call fit\(data\) first'):
        untrained.retrain(log)


def test_bad_predict_next_batch_arguments(model):
    cases = [(lambda: model.predict_next_batch([1, 2], [100, 103], batch=3), r'needs exactly batch=3'),
             (lambda: model.predict_next_batch([1, 2], [100], batch=2), r'needs exactly batch=2'),
             (lambda: model.predict_next_batch([1, 2], [100, 99], batch=2), r'input_item_ids .* e.g. \[99\]'),
             (lambda: model.predict_next_batch([1, 2], [100, np.nan], batch=2), r'input_item_ids .* e.g. \[nan\]'),
             (lambda: model.predict_next_batch([1, 2], [100, '103'], batch=2),  # numpy makes both strings
              r"input_item_ids .* e.g. \['100', '103'\]"),
             (lambda: model.predict_next_batch([1, 2], [100, 103], predict_for_item_ids=[100, 5], batch=2),
              r'predict_for_item_ids .* e.g. \[5\]')]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


def test_bad_recommend_arguments(model, log):
    for k in (0, -1):
        with pytest.raises(ValueError, match=f'k must be a positive number of items, got {k}'):
            model.recommend(log, k=k)
    with pytest.raises(ValueError, match='batch_size must be a positive number of sessions, got 0'):
        model.recommend(log, batch_size=0)
    with pytest.raises(ValueError, match='sessions is empty'):
        model.recommend({})
    with pytest.raises(ValueError, match='sessions is empty'):
        model.recommend({1: []})
    with pytest.raises(ValueError, match="sessions has no event of an item the model knows"):
        model.recommend({1: [99, 98]})
    with pytest.raises(ValueError, match=r"column 'ItemId' has 1 missing"):
        model.recommend({1: [100, None]})
    with pytest.raises(TypeError, match='must be a pandas DataFrame'):
        model.recommend([[100, 103]])


def test_bad_evaluation_arguments(model, log):
    cases = [(dict(mode='optimistic'), r"unknown tie mode 'optimistic'"),
             (dict(cut_off=0), r'cut_off must be positive integers'),
             (dict(cut_off=[20, -5]), r'cut_off must be positive integers'),
             (dict(cut_off=[]), r'cut_off must be positive integers'),
             (dict(batch_size=0), r'batch_size must be positive'),
             (dict(items=[]), r'none of the candidate items is known')]
    for options, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            evaluate_gpu(model, log, **options)


# -- fewer test sessions than the evaluation batch -----------------------------------------------------

def brute_force_ranks(model, test, tolerance=1e-5):
    """Ranks of every next item, one session at a time through predict_next_batch: the best and worst
    rank allowed by float noise of `tolerance` (1 + #(score > target + tol), 1 + #(score > target - tol) - 1)."""
    best, worst = [], []
    model.predict_next_batch([object()], [test.ItemId.iloc[0]], batch=1)  # so that the first session starts afresh
    for sid, session in test.groupby('SessionId', sort=False):
        items = session.ItemId.to_numpy()
        for i in range(len(items) - 1):
            scores = model.predict_next_batch([sid], [items[i]], batch=1)[0]
            target = scores[items[i + 1]]
            best.append(1 + (scores > target + tolerance).sum())
            worst.append((scores > target - tolerance).sum())  # the target itself counts here
    return np.array(best), np.array(worst)


def metrics(ranks, k):
    return (ranks <= k).mean(), np.where(ranks <= k, 1.0 / ranks, 0).mean()


@pytest.mark.parametrize('n_sessions, batch_size', [(1, 512), (3, 512), (3, 2), (7, 3)])
def test_fewer_test_sessions_than_the_batch_are_all_evaluated(model, n_sessions, batch_size):
    test = session_log(n_sessions=n_sessions, seed=11, first_session=1000)
    best, worst = brute_force_ranks(model, test)
    assert len(best) == len(test) - n_sessions
    recall, mrr = evaluate_gpu(model, test, cut_off=[1, 3, 5], batch_size=batch_size)
    for k in (1, 3, 5):
        lo_recall, lo_mrr = metrics(worst, k)
        hi_recall, hi_mrr = metrics(best, k)
        assert lo_recall - 1e-6 <= recall[k] <= hi_recall + 1e-6  # the sums are float32
        assert lo_mrr - 1e-6 <= mrr[k] <= hi_mrr + 1e-6
    assert (best == worst).mean() > 0.9, 'too many near-ties for this check to mean much'


# -- the caller's data is never modified ----------------------------------------------------------------

@pytest.fixture
def messy_log(log):
    """Unsorted, with a non-default index, an extra column and string session ids: everything that tempts
    a library to sort, reindex or add columns in place."""
    messy = log.assign(SessionId='s' + log.SessionId.astype(str), extra=np.arange(len(log)))
    messy.index = np.arange(len(log))[::-1] * 7
    return messy.sample(frac=1, random_state=3)


def _unchanged(frame, copy_before):
    pd.testing.assert_frame_equal(frame, copy_before, check_exact=True)
    assert list(frame.columns) == list(copy_before.columns)
    assert frame.index.equals(copy_before.index)


def test_entry_points_leave_the_callers_data_alone(model, messy_log):
    before = messy_log.copy(deep=True)
    trained = GRU4Rec(**PARAMS).fit(messy_log, valid_data=messy_log)
    _unchanged(messy_log, before)
    trained.retrain(messy_log, valid_data=messy_log, keep_best=True)
    _unchanged(messy_log, before)
    trained.recommend(messy_log, exclude_seen=True)
    _unchanged(messy_log, before)
    evaluate_gpu(trained, messy_log)
    evaluate_gpu(trained, messy_log, items=messy_log.ItemId.iloc[:5])
    _unchanged(messy_log, before)
    with pytest.warns(UserWarning, match='duplicate'):
        dup = pd.concat([messy_log, messy_log.iloc[:2]])
        dup_before = dup.copy(deep=True)
        trained.retrain(dup)
    _unchanged(dup, dup_before)
    # Failing calls too.
    bad = messy_log.assign(ItemId=messy_log.ItemId.astype(float))
    bad.iloc[0, bad.columns.get_loc('ItemId')] = np.nan
    bad_before = bad.copy(deep=True)
    for call in (lambda: GRU4Rec(**PARAMS).fit(bad), lambda: trained.retrain(bad), lambda: trained.recommend(bad),
                 lambda: evaluate_gpu(trained, bad)):
        with pytest.raises(ValueError):
            call()
        _unchanged(bad, bad_before)


def test_recommend_and_predict_leave_their_arguments_alone(model):
    sessions = {7: [100, 103, 100], 'x': [106]}
    before = copy.deepcopy(sessions)
    model.recommend(sessions, exclude_seen=True)
    assert sessions == before
    session_ids, items, candidates = np.array([1, 2]), np.array([100, 103]), np.array([106, 100, 103])
    copies = session_ids.copy(), items.copy(), candidates.copy()
    model.predict_next_batch(session_ids, items, candidates, batch=2)
    for array, original in zip((session_ids, items, candidates), copies):
        np.testing.assert_array_equal(array, original)


# -- failures during training -----------------------------------------------------------------------------

def test_nan_loss_stops_with_an_error_and_keeps_the_last_good_epoch(log):
    model = GRU4Rec(**dict(PARAMS, n_epochs=1)).fit(log)
    good = snapshot(model)
    model.set_params(learning_rate=1e30)
    with pytest.raises(FloatingPointError, match=r'loss became (nan|inf) at epoch 1, step \d+;.*last completed epoch'):
        model.retrain(log)
    assert_same_state(model, good)
    assert len(model.history_) == 1
    # Still usable: finite predictions (that training goes on is checked after Ctrl-C below).
    scores = model.predict_next_batch([1, 2], [100, 103], batch=2)
    assert np.isfinite(scores.to_numpy()).all()


def test_nan_loss_in_a_later_epoch_names_it(log, monkeypatch):
    """The loss turns NaN in the middle of the 2nd epoch: the error names epoch 2 and the step; the
    model is the one after epoch 1 (equal to a model trained for 1 epoch with the same seed)."""
    one_epoch = GRU4Rec(**dict(PARAMS, n_epochs=1)).fit(log)
    train = TrainingStep.run
    calls = {'n': 0}

    def poisoned(self, *args):
        calls['n'] += 1
        cost = train(self, *args)
        return np.float32(np.nan) if calls['n'] == steps_per_epoch + 5 else cost
    steps_per_epoch = count_steps(log)
    monkeypatch.setattr(TrainingStep, 'run', poisoned)
    model = GRU4Rec(**dict(PARAMS, n_epochs=3))
    with pytest.raises(FloatingPointError, match=r'at epoch 2, step 5;'):
        model.fit(log)
    assert_same_state(model, snapshot(one_epoch))


def count_steps(log):
    itemidmap = pd.Index(np.sort(log.ItemId.unique()))
    items, offsets, order = sessions.session_arrays(log, itemidmap, 'SessionId', 'ItemId', 'Time')
    return sum(1 for _ in sessions.session_parallel_batches(items, offsets, order, PARAMS['batch_size']))


def test_ctrl_c_keeps_the_completed_epochs(log, monkeypatch, capfd):
    one_epoch = GRU4Rec(**dict(PARAMS, n_epochs=1)).fit(log)
    train = TrainingStep.run
    steps_per_epoch = count_steps(log)
    calls = {'n': 0}

    def interrupted(self, *args):
        calls['n'] += 1
        if calls['n'] == steps_per_epoch + 3:
            raise KeyboardInterrupt
        return train(self, *args)
    monkeypatch.setattr(TrainingStep, 'run', interrupted)
    capfd.readouterr()
    model = GRU4Rec(**dict(PARAMS, n_epochs=3)).fit(log)  # returns: Ctrl-C ends training, not the program
    err = capfd.readouterr().err
    assert re.search(r'interrupted in epoch 2: the model keeps the weights of the 1 completed epoch', err), err
    monkeypatch.undo()
    assert len(model.history_) == 1
    assert_same_state(model, snapshot(one_epoch))
    # Usable: it predicts, evaluates, saves and can be trained further.
    recall, mrr = evaluate_gpu(model, log)
    assert 0 < mrr[20] <= recall[20] <= 1
    assert len(model.recommend({1: [100]}, k=3)) == 3
    model.retrain(log, n_epochs=1)
    assert len(model.history_) == 2


def test_a_retrain_that_fails_in_its_first_epoch_leaves_item_map_and_supports(log, monkeypatch):
    """New items and their counts enter the model only with a completed epoch of the new data."""
    model = GRU4Rec(**PARAMS).fit(log)
    before = snapshot(model)
    new = session_log(seed=4, first_session=500)
    new['ItemId'] = np.where(new.index % 3 == 0, new.ItemId + 1, new.ItemId)  # 101, 104, ...: new items
    model.set_params(learning_rate=1e30)
    with pytest.raises(FloatingPointError, match='at epoch 1'):
        model.retrain(new)
    assert_same_state(model, before)
    def interrupted(self, *args):
        raise KeyboardInterrupt
    monkeypatch.setattr(TrainingStep, 'run', interrupted)
    model.retrain(new)  # the new items need a new graph, whose steps are interrupted
    monkeypatch.undo()
    assert_same_state(model, before)
    # Consistent with its item map: it scores exactly the old items.
    recs = model.recommend({1: [100]}, k=model.n_items + 5)
    assert sorted(recs.ItemId) == sorted(log.ItemId.unique())


def test_the_signature_docstring_and_parsing_come_from_one_table():
    """HYPERPARAMETERS is the one list: the constructor's signature (names, order, defaults), the docstring
    and parse_hyperparameters follow it; positional arguments bind in its order, and a default list is
    never shared between models."""
    signature = inspect.signature(GRU4Rec)
    assert list(signature.parameters) == list(HYPERPARAMETERS)
    assert {n: p.default for n, p in signature.parameters.items()} == {n: h.default for n, h in HYPERPARAMETERS.items()}
    assert all(f'    {name}=' in GRU4Rec.__doc__ for name in HYPERPARAMETERS)
    assert parse_hyperparameters() == parse_hyperparameters(**GRU4Rec().get_params())
    model = GRU4Rec('top1', 'tanh', layers='8/4')
    assert (model.loss, model.final_act, model.layers, model.hidden_act) == ('top1', 'tanh', '8/4', 'tanh')
    with pytest.raises(TypeError, match="multiple values for argument 'loss'"):
        GRU4Rec('top1', loss='bpr')
    first, second = GRU4Rec(), GRU4Rec()
    first.layers.append(5)
    assert second.layers == [100] and GRU4Rec().adapt_params == []
