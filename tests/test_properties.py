"""Property-based tests (issue "Reliability and security") over random small session logs: training
never crashes, predictions are finite, evaluation metrics are well-formed and equal a brute-force
evaluation of the model's own scores (predict_next_batch)."""
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from evaluation import evaluate_gpu
from gru4rec import GRU4Rec

ITEMS = [11, 12, 13, 14, 15, 16]
CUTOFFS = [1, 2, 3, 5, 10]
# Each example compiles its own graphs (seconds each): few examples, no deadline.
FEW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
STORE = 300  # sample ids drawn ahead (the default 10M takes a second to draw): refilled several times per epoch


@st.composite
def session_logs(draw, items=ITEMS, max_sessions=6, max_length=5):
    """A session log with 1-6 sessions of 1-5 events, integer or string session ids, times that may tie
    or come unordered, rows possibly shuffled."""
    n_sessions = draw(st.integers(1, max_sessions))
    string_ids = draw(st.booleans())
    rows = []
    for s in range(n_sessions):
        length = draw(st.integers(1, max_length))
        events = draw(st.lists(st.sampled_from(items), min_size=length, max_size=length))
        times = draw(st.lists(st.integers(0, 20), min_size=length, max_size=length))
        sid = f's{s}' if string_ids else s * 7 + 3
        rows += [(sid, item, t) for item, t in zip(events, times)]
    log = pd.DataFrame(rows, columns=['SessionId', 'ItemId', 'Time'])
    if draw(st.booleans()):
        log = log.sample(frac=1, random_state=draw(st.integers(0, 1000)))
    return log


LOSSES = [('cross-entropy', 'softmax'), ('xe_logit', 'softmax_logit'), ('bpr', 'linear'), ('top1', 'tanh'),
          ('bpr-max', 'elu-0.5'), ('top1-max', 'leaky-0.1'), ('bpr-max', 'selu-1.05-1.67'), ('bpr', 'relu')]
INPUT_MODES = [dict(embedding=0, constrained_embedding=False), dict(embedding=0, constrained_embedding=True),
               dict(embedding=3, constrained_embedding=False), dict(embedding='layersize', constrained_embedding=False)]


@st.composite
def hyperparameters(draw):
    loss, final_act = draw(st.sampled_from(LOSSES))
    params = dict(loss=loss, final_act=final_act, layers=draw(st.sampled_from([[4], [3, 4]])),
                  batch_size=draw(st.integers(1, 4)), n_sample=draw(st.integers(0, 3)),
                  n_epochs=draw(st.integers(1, 2)), learning_rate=draw(st.sampled_from([0.01, 0.1, 0.5])),
                  momentum=draw(st.sampled_from([0.0, 0.5])),
                  adapt=draw(st.sampled_from(['adagrad', 'rmsprop', 'adadelta', 'adam', None])),
                  dropout_p_hidden=draw(st.sampled_from([0.0, 0.3])), dropout_p_embed=draw(st.sampled_from([0.0, 0.3])),
                  sample_alpha=draw(st.sampled_from([0.0, 0.75])), train_random_order=draw(st.booleans()),
                  time_sort=draw(st.booleans()), seed=draw(st.integers(0, 5)), verbose=False,
                  **draw(st.sampled_from(INPUT_MODES)))
    if loss == 'cross-entropy':
        params['logq'] = draw(st.sampled_from([0.0, 1.0]))
    if params['n_sample'] == 0:
        params['batch_size'] = max(params['batch_size'], 2)
    return params


def quiet_fit(model, log, **options):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # duplicate events are allowed here
        return model.fit(log, sample_store=STORE, **options)


def in_library_order(log):
    return log.sort_values(['SessionId', 'Time'], kind='stable')


@FEW
@given(log=session_logs(), test=session_logs(items=ITEMS + [99]), params=hyperparameters())
def test_training_never_crashes_and_predictions_are_finite(log, test, params):
    model = GRU4Rec(**params)
    if log.groupby('SessionId').size().max() < 2:
        with pytest.raises(ValueError, match='nothing to learn from'):
            model.fit(log)
        return
    quiet_fit(model, log)
    assert len(model.history_) == params['n_epochs']
    assert all(np.isfinite(record['loss']) for record in model.history_)
    assert set(model.itemidmap) == set(log.ItemId)
    known = in_library_order(test[test.ItemId.isin(model.itemidmap)])
    assume(len(known) > 0)
    for sid, item in zip(known.SessionId, known.ItemId):
        scores = model.predict_next_batch([sid], [item], batch=1)
        assert scores.shape == (model.n_items, 1)
        assert np.isfinite(scores.to_numpy()).all()


@pytest.fixture(scope='module')
def trained():
    """Two small models over ITEMS (scores with many near-equal values are avoided by training a little)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 6, 60)
    log = pd.DataFrame({'SessionId': np.repeat(np.arange(60), lengths), 'ItemId': rng.choice(ITEMS, lengths.sum()),
                        'Time': np.arange(lengths.sum())})
    common = dict(layers=[6], batch_size=4, n_sample=3, n_epochs=2, verbose=False, seed=1)
    return {'xe-shared': GRU4Rec(loss='cross-entropy', final_act='softmax', constrained_embedding=True,
                                 **common).fit(log, sample_store=STORE),
            'bprmax-onehot': GRU4Rec(loss='bpr-max', final_act='elu-1', **common).fit(log, sample_store=STORE)}


def brute_force_rank_bounds(model, test, tolerance=1e-5):
    """For every next-item event of `test` (unknown items dropped, as evaluation does): the best and worst
    rank the target can have among all item scores from predict_next_batch, allowing float noise."""
    test = in_library_order(test[test.ItemId.isin(model.itemidmap)])
    best, worst = [], []
    model.predict_next_batch([object()], [test.ItemId.iloc[0]], batch=1)  # the first session starts afresh
    for sid, session in test.groupby('SessionId', sort=False):
        items = session.ItemId.to_numpy()
        for i in range(len(items) - 1):
            scores = model.predict_next_batch([sid], [items[i]], batch=1)[0].to_numpy()
            target = scores[model.itemidmap.get_loc(items[i + 1])]
            best.append(1 + (scores > target + tolerance).sum())
            worst.append((scores >= target - tolerance).sum())  # every tie ahead (the target included)
    return np.array(best), np.array(worst)


@FEW
@given(test=session_logs(items=ITEMS + [99], max_sessions=8), name=st.sampled_from(['xe-shared', 'bprmax-onehot']),
       batch_size=st.sampled_from([1, 3, 512]), mode=st.sampled_from(['standard', 'conservative', 'median']))
def test_evaluation_equals_brute_force(trained, test, name, batch_size, mode):
    model = trained[name]
    known = test[test.ItemId.isin(model.itemidmap)]
    if len(known) == 0 or known.groupby('SessionId').size().max() < 2:
        with pytest.raises(ValueError, match='no event'):
            evaluate_gpu(model, test, cut_off=CUTOFFS, batch_size=batch_size, mode=mode)
        return
    recall, mrr = evaluate_gpu(model, test, cut_off=CUTOFFS, batch_size=batch_size, mode=mode)
    assert list(recall) == CUTOFFS and list(mrr) == CUTOFFS
    values = np.array([[recall[k], mrr[k]] for k in CUTOFFS])
    assert ((values >= 0) & (values <= 1 + 1e-6)).all()
    assert (np.diff(values[:, 0]) >= -1e-7).all(), 'Recall@k must not decrease with k'
    assert (np.diff(values[:, 1]) >= -1e-7).all(), 'MRR@k must not decrease with k'
    assert (values[:, 1] <= values[:, 0] + 1e-6).all(), 'MRR@k <= Recall@k'
    assert recall[10] == pytest.approx(1.0), 'every one of the 6 items is in the top 10'
    best, worst = brute_force_rank_bounds(model, test)
    for k in CUTOFFS:
        assert (worst <= k).mean() - 1e-6 <= recall[k] <= (best <= k).mean() + 1e-6
        lowest, highest = np.where(worst <= k, 1 / worst, 0).mean(), np.where(best <= k, 1 / best, 0).mean()
        assert lowest - 1e-6 <= mrr[k] <= highest + 1e-6
    if (best == worst).all():  # no ties and no near-ties: one exact answer
        for k in CUTOFFS:
            assert recall[k] == pytest.approx((best <= k).mean(), abs=1e-6)
            assert mrr[k] == pytest.approx(np.where(best <= k, 1 / best, 0).mean(), abs=1e-6)
