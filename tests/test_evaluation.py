"""evaluate_gpu against a brute-force numpy ranking of predict_next_batch scores (SPEC section 8; with
candidate items, the original's semantics but for targets off the list, which are misses),
on a model whose scores tie on purpose: with final_act relu, items with a very negative bias always
score exactly 0, and two items share their output row and bias."""
import itertools

import numpy as np
import pandas as pd
import pytensor
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import compile_function
from conftest import INPUT_MODES, ITEM_IDS, fit_small, make_log
from evaluation import TIE_MODES, evaluate_gpu

CUTOFFS = [1, 2, 3, 5, 8, 20]
ZERO_SCORED = [0, 3, 5, 8, 10]  # dense indices; 0 is the most frequent item
TWINS = (1, 2)
UNKNOWN_ITEM = 99
CANDIDATES = ITEM_IDS[[6, 0, 10, 2, 5, 1, 9, 3]]  # not in index order, so index mix-ups show
_runs = itertools.count()


@pytest.fixture(scope='module')
def model():
    model = fit_small(final_act='relu', **INPUT_MODES['onehot'])
    Wy, By = model.params_['Wy'].get_value(), model.params_['By'].get_value()
    By[ZERO_SCORED] = -100
    Wy[TWINS[1]], By[TWINS[1]] = Wy[TWINS[0]], By[TWINS[0]]
    model.params_['Wy'].set_value(Wy)
    model.params_['By'].set_value(By)
    return model


@pytest.fixture
def eval_log(test_log):
    """test_log with an unknown item inside every third session: evaluation drops it and its
    neighbours become adjacent (no session is left with a single event)."""
    rows = []
    for i, (sid, session) in enumerate(test_log.groupby('SessionId', sort=False)):
        rows.append(session)
        if i % 3 == 0:
            rows.append(pd.DataFrame({'SessionId': [sid], 'ItemId': [UNKNOWN_ITEM],
                                      'Time': [session.Time.iloc[0] + 1.0]}))
    return pd.concat(rows).sort_values(['SessionId', 'Time'], kind='stable').reset_index(drop=True)


def brute_force_counts(model, log, candidates=None):
    """For every prediction: how many scores are greater than, and equal to, the target's score
    (the target included), from predict_next_batch run one session at a time. With candidates, as in
    the original: every event of a known item is read and predicted, and its target's score is
    compared with the candidates' scores; a target that is not a candidate is a miss (greater = inf)."""
    log = log[log.ItemId.isin(model.itemidmap)]
    run = next(_runs)  # fresh session ids: predict_next_batch keeps a state per session id
    greater, equal = [], []
    for sid, session in log.groupby('SessionId', sort=False):
        items = session.sort_values('Time', kind='stable').ItemId.to_numpy()
        for t in range(len(items) - 1):
            scores = model.predict_next_batch(np.array([f'{run}-{sid}'], dtype=object), items[t:t + 1],
                                              batch=1).iloc[:, 0]
            target = scores.loc[items[t + 1]]
            if candidates is not None and items[t + 1] not in set(candidates):
                greater.append(np.inf)
                equal.append(0)
                continue
            others = scores if candidates is None else scores.loc[candidates]
            greater.append(int((others > target).sum()))
            equal.append(int((others == target).sum()))
    return np.array(greater), np.array(equal)


def ranks(greater, equal, mode):
    if mode == 'standard':
        return 1.0 + greater
    if mode == 'conservative':
        return 1.0 * greater + equal
    assert mode == 'median'
    return 1 + greater + (equal - 1) / 2


def metrics(rank):
    recall = {k: np.mean(rank <= k) for k in CUTOFFS}
    mrr = {k: np.mean(np.where(rank <= k, 1 / rank, 0)) for k in CUTOFFS}
    return recall, mrr


def assert_metrics_equal(got, expected):
    for got_metric, expected_metric in zip(got, expected):
        assert list(got_metric) == CUTOFFS
        np.testing.assert_allclose([got_metric[k] for k in CUTOFFS], [expected_metric[k] for k in CUTOFFS],
                                   rtol=1e-5, atol=0)


@pytest.mark.parametrize('mode', ['standard', 'conservative', 'median'])
@pytest.mark.parametrize('candidates,batch_size', [(None, 3), (None, 512), (CANDIDATES, 4)],
                         ids=['all-items-batch-3', 'all-items-batch-512', 'candidates-batch-4'])
def test_ranks_match_brute_force(model, eval_log, mode, candidates, batch_size):
    greater, equal = brute_force_counts(model, eval_log, candidates)
    assert (equal > 1).sum() >= len(equal) // 4, 'the test needs many targets that tie with other items'
    got = evaluate_gpu(model, eval_log, items=candidates, cut_off=CUTOFFS, batch_size=batch_size, mode=mode)
    assert_metrics_equal(got, metrics(ranks(greater, equal, mode)))


def test_tiebreaking_ranks_uniformly_among_ties(model):
    """tiebreaking puts the target uniformly among its ties: the metrics lie between the
    standard and conservative ones and match their expectation within 4 standard errors."""
    log = make_log([4] * 100, seed=3, first_session=1001)
    greater, equal = brute_force_counts(model, log)
    assert (equal > 1).sum() >= len(equal) // 4, 'the test needs many targets that tie with other items'
    recall, mrr = evaluate_gpu(model, log, cut_off=CUTOFFS, batch_size=64, mode='tiebreaking')
    low_recall, low_mrr = metrics(ranks(greater, equal, 'conservative'))
    high_recall, high_mrr = metrics(ranks(greater, equal, 'standard'))
    n = len(greater)
    for k in CUTOFFS:
        assert low_recall[k] <= recall[k] + 1e-6 and recall[k] <= high_recall[k] + 1e-6
        assert low_mrr[k] <= mrr[k] + 1e-6 and mrr[k] <= high_mrr[k] + 1e-6
        # Each prediction's rank is uniform over greater + 1 .. greater + equal.
        possible = [np.arange(g + 1, g + e + 1) for g, e in zip(greater, equal)]
        hit = np.array([np.mean(r <= k) for r in possible])
        rr = [np.where(r <= k, 1 / r, 0) for r in possible]
        rr_mean = np.array([x.mean() for x in rr])
        rr_var = np.array([x.var() for x in rr])
        assert abs(recall[k] - hit.mean()) <= 4 * np.sqrt((hit * (1 - hit)).sum()) / n + 1e-6, k
        assert abs(mrr[k] - rr_mean.mean()) <= 4 * np.sqrt(rr_var.sum()) / n + 1e-6, k


def test_sessions_left_with_one_event_do_not_leak_state(models):
    """Session lengths [3, 3, 2, 3] * 10, the second event of every third session unknown, batch_size 2:
    the pattern that makes slots take a new session right after a one-event one."""
    model = models('onehot')
    log = make_log([3, 3, 2, 3] * 10, seed=4, first_session=2001)
    log.loc[log.SessionId.duplicated() & (log.SessionId % 4 == 3), 'ItemId'] = UNKNOWN_ITEM
    assert (log[log.ItemId != UNKNOWN_ITEM].groupby('SessionId').size() == 1).sum() == 10
    greater, equal = brute_force_counts(model, log)
    got = evaluate_gpu(model, log, cut_off=CUTOFFS, batch_size=2)
    assert_metrics_equal(got, metrics(ranks(greater, equal, 'standard')))


class TableScorer:
    """A model for evaluate_gpu whose scores of the next item are a fixed row of a table, chosen by the
    input item: `table` (n_items x n_items, settable) with few distinct values makes ties at will."""

    def __init__(self, item_ids):
        self.itemidmap = pd.Index(item_ids)
        self.state_sizes = [0]  # no state: the scores depend on the last item only
        self.table = pytensor.shared(np.zeros((len(item_ids), len(item_ids)), dtype='float32'), name='table')
        self._functions = {}

    def get_params(self):
        return {'backend': 'c'}

    def symbolic_step(self, X, H_prev, candidates=None, ranking=False):
        scores = self.table[X]  # M x n_items
        return H_prev, scores if candidates is None else scores[:, candidates]

    def compile_function(self, inputs, outputs, updates=None):
        return compile_function(inputs, outputs, updates, 'c')

    def compiled(self, key, make):
        if key not in self._functions:
            self._functions[key] = make()
        return self._functions[key]


SCORER_ITEMS = np.arange(6) * 10 + 100


@pytest.fixture(scope='module')
def scorer():
    return TableScorer(SCORER_ITEMS)


@pytest.mark.parametrize('mode', TIE_MODES)
def test_a_target_off_the_candidate_list_is_a_miss(scorer, mode):
    """Items 100 -> 110: 110 is not a candidate and scores above both candidates (and, for conservative,
    ties none of them), so ranking it against them counted a hit at rank 1 ('standard', 'median',
    'tiebreaking') or rank 0 ('conservative': MRR inf). It is a miss."""
    table = np.zeros((6, 6), dtype='float32')
    table[0] = [0, 5, 1, 1, 0, 0]
    scorer.table.set_value(table)
    log = pd.DataFrame({'SessionId': [1, 1], 'ItemId': [100, 110], 'Time': [0.0, 1.0]})
    recall, mrr = evaluate_gpu(scorer, log, items=[120, 130], cut_off=[1, 5], mode=mode)
    assert dict(recall) == {1: 0.0, 5: 0.0} and dict(mrr) == {1: 0.0, 5: 0.0}
    recall, mrr = evaluate_gpu(scorer, log, items=[120, 110, 130], cut_off=[1, 5], mode=mode)
    assert dict(recall) == {1: 1.0, 5: 1.0} and dict(mrr) == {1: 1.0, 5: 1.0}


@st.composite
def scored_logs(draw):
    """A table of scores from few values (ties), sessions over the known items and one unknown (99), and
    a candidate list with repeats and unknown ids (at least one known)."""
    table = draw(st.lists(st.lists(st.integers(0, 2), min_size=6, max_size=6), min_size=6, max_size=6))
    ids = st.sampled_from(list(SCORER_ITEMS) + [99])
    sessions = draw(st.lists(st.lists(ids, min_size=2, max_size=5), min_size=1, max_size=6))
    known = st.sampled_from(list(SCORER_ITEMS))
    candidates = draw(st.lists(known, min_size=1, max_size=8)) + draw(st.lists(st.sampled_from([99, 98]), max_size=2))
    return np.array(table, dtype='float32'), sessions, draw(st.permutations(candidates))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=scored_logs(), mode=st.sampled_from(TIE_MODES), batch_size=st.sampled_from([1, 2, 512]))
def test_no_mode_scores_above_one_and_candidates_rank_as_brute_force(scorer, case, mode, batch_size):
    """Over random scores with ties and candidate lists: 0 <= MRR@k <= Recall@k <= 1 in every mode, and
    the figures equal a brute-force ranking (bounds for tiebreaking) where off-list targets are misses."""
    table, sessions, candidates = case
    scorer.table.set_value(table)
    log = pd.DataFrame([(s, item, float(t)) for s, items in enumerate(sessions) for t, item in enumerate(items)],
                       columns=['SessionId', 'ItemId', 'Time'])
    known = log[log.ItemId != 99]
    if known.groupby('SessionId').size().max() < 2:
        return
    recall, mrr = evaluate_gpu(scorer, log, items=candidates, cut_off=CUTOFFS, batch_size=batch_size, mode=mode)
    for k in CUTOFFS:
        assert 0 <= mrr[k] <= recall[k] <= 1, (k, recall[k], mrr[k])
    columns = scorer.itemidmap.get_indexer(sorted(set(candidates) - {98, 99}))
    best, worst = [], []
    for _, session in known.groupby('SessionId'):
        rows = scorer.itemidmap.get_indexer(session.ItemId)
        for x, y in itertools.pairwise(rows):
            target, others = table[x, y], table[x, columns]
            listed = y in columns
            best.append(1 + (others > target).sum() if listed else np.inf)
            worst.append((others >= target).sum() if listed else np.inf)
    best, worst = np.array(best, dtype=float), np.array(worst, dtype=float)
    expected = {'standard': best, 'conservative': worst, 'median': (best + worst) / 2}.get(mode)
    for k in CUTOFFS:
        if expected is None:
            assert np.mean(worst <= k) - 1e-6 <= recall[k] <= np.mean(best <= k) + 1e-6
            assert np.mean(np.where(worst <= k, 1 / worst, 0)) - 1e-6 <= mrr[k]
            assert mrr[k] <= np.mean(np.where(best <= k, 1 / best, 0)) + 1e-6
        else:
            assert recall[k] == pytest.approx(np.mean(expected <= k), abs=1e-6)
            assert mrr[k] == pytest.approx(np.mean(np.where(expected <= k, 1 / expected, 0)), abs=1e-6)
