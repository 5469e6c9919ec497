"""The notebook workflow on real data (issue "Retrain, and the notebook workflow"): validation history,
early stopping and keep_best, recommend(), progress output. Uses ../shared/data/rsc15_100k_*; skips
when that folder is absent."""
import copy

import numpy as np
import pandas as pd
import pytest

from conftest import real_log
from evaluation import evaluate_gpu
from gru4rec import GRU4Rec

SETTINGS = dict(loss='cross-entropy', final_act='softmax', constrained_embedding=True, layers=[32], batch_size=32,
                n_sample=128, learning_rate=0.2, sample_alpha=0.5, logq=1.0, seed=1, verbose=False)



@pytest.fixture(scope='module')
def data():
    train = real_log('rsc15_100k_train_tr.tsv.gz')
    valid = real_log('rsc15_100k_train_valid.tsv.gz')
    part = train[train.SessionId.isin(train.SessionId.unique()[-3000:])]  # the latest 3,000 sessions
    valid = valid[valid.SessionId.isin(valid.SessionId.unique()[:1000])]
    return part, valid


@pytest.fixture(scope='module')
def pretrained(data):
    part, _ = data
    return GRU4Rec(n_epochs=1, **SETTINGS).fit(part)


def mrr20(model, valid):
    return evaluate_gpu(model, valid, cut_off=[20])[1][20]


# -- validation, early stopping, keep_best ------------------------------------------------------------

def scrambled(log, seed=0):
    """The same sessions with every item replaced by one drawn uniformly: no sequence, no popularity left.
    A good model trained on it gets worse on real sessions with every epoch."""
    return log.assign(ItemId=np.random.default_rng(seed).choice(log.ItemId.unique(), len(log)))


def test_patience_stops_and_keep_best_returns_the_best_epoch(pretrained, data):
    part, valid = data
    model = copy.deepcopy(pretrained)
    model.retrain(scrambled(part), n_epochs=8, valid_data=valid, patience=2, keep_best=True)
    new = model.history_[1:]
    scores = [record['mrr@20'] for record in new]
    best = int(np.argmax(scores))
    assert best == 0, f'validation MRR@20 should fall from the first epoch on: {scores}'
    assert len(new) == best + 1 + 2, f'patience=2 should stop 2 epochs after the best one: {scores}'
    assert all(s < scores[best] for s in scores[best + 1:])
    assert [record['epoch'] for record in model.history_] == list(range(1, len(model.history_) + 1))
    for record in new:
        assert set(record) >= {'epoch', 'loss', 'seconds', 'recall@20', 'mrr@20'}
        assert 0 <= record['mrr@20'] <= record['recall@20'] <= 1
    # keep_best: the weights are the best epoch's, so evaluating now gives that epoch's figure exactly.
    assert mrr20(model, valid) == pytest.approx(scores[best], abs=1e-9)
    assert mrr20(model, valid) > scores[-1] + 0.01


def test_without_keep_best_the_last_epoch_stays(pretrained, data):
    part, valid = data
    model = copy.deepcopy(pretrained)
    model.retrain(scrambled(part), n_epochs=8, valid_data=valid, valid_metric='recall', patience=1)
    recalls = [record['recall@20'] for record in model.history_[1:]]
    assert len(recalls) == 2 and recalls[1] < recalls[0], recalls  # stopped one epoch after the best
    recall, mrr = evaluate_gpu(model, valid, cut_off=[20])
    assert recall[20] == pytest.approx(recalls[-1], abs=1e-9)
    assert mrr[20] == pytest.approx(model.history_[-1]['mrr@20'], abs=1e-9)


def test_validation_improves_while_training_on_real_sessions(data):
    part, valid = data
    model = GRU4Rec(n_epochs=2, **SETTINGS).fit(part, valid_data=valid, keep_best=True, patience=3)
    scores = [record['mrr@20'] for record in model.history_]
    assert len(scores) == 2 and scores[1] > scores[0] > 0.1, scores
    assert mrr20(model, valid) == pytest.approx(scores[1], abs=1e-9)


# -- history and progress output ----------------------------------------------------------------------

def test_history_has_loss_and_seconds_per_epoch_and_verbose_false_is_silent(data, capfd):
    part, _ = data
    capfd.readouterr()
    model = GRU4Rec(n_epochs=2, **SETTINGS).fit(part)
    model.retrain(part, n_epochs=1)
    out, err = capfd.readouterr()
    assert out == '' and err == '', (out, err)
    assert [record['epoch'] for record in model.history_] == [1, 2, 3]
    for record in model.history_:
        assert set(record) == {'epoch', 'loss', 'seconds'}
        assert np.isfinite(record['loss']) and record['loss'] > 0
        assert 0 < record['seconds'] < 600
    assert model.history_[1]['loss'] < model.history_[0]['loss']


def test_verbose_prints_one_line_per_epoch(data, capfd):
    part, valid = data
    capfd.readouterr()
    GRU4Rec(n_epochs=2, **dict(SETTINGS, verbose=True)).fit(part, valid_data=valid)
    out = capfd.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith('Epoch')]
    assert len(lines) == 2, out
    for n, line in enumerate(lines, 1):
        assert line.startswith(f'Epoch{n} --> loss: ') and 'mb/s' in line and 'e/s' in line
        assert 'valid mrr@20: ' in line


def test_callback_gets_each_epoch_s_record_as_the_epoch_ends(data):
    part, valid = data
    model = GRU4Rec(n_epochs=3, **SETTINGS)
    seen = []
    model.fit(part, valid_data=valid, valid_metric='recall', callback=lambda record: seen.append(
        (record, len(model.history_))))
    assert [record for record, _ in seen] == model.history_
    assert [n for _, n in seen] == [1, 2, 3]  # called once the epoch is in history_, before the next one
    assert all(0 <= record['mrr@20'] <= record['recall@20'] <= 1 for record, _ in seen)
    with pytest.raises(ValueError, match="callback='print': give a function of one epoch's history_ record"):
        GRU4Rec(**SETTINGS).fit(part, callback='print')


# -- recommend -----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def histories(data):
    """Prefixes of 30 validation sessions, as a DataFrame and as a dict."""
    _, valid = data
    sessions = valid[valid.SessionId.isin(valid.SessionId.unique()[:30])]
    frame = sessions.groupby('SessionId').head(3)  # the file's session order, not sorted by id
    as_dict = {sid: list(group.ItemId) for sid, group in frame.groupby('SessionId', sort=False)}
    assert list(as_dict) != sorted(as_dict), 'sessions in id order: the order check below would prove little'
    return frame, as_dict


def test_recommend_from_a_dict_equals_from_a_dataframe(pretrained, histories):
    frame, as_dict = histories
    known = frame[frame.ItemId.isin(pretrained.itemidmap)]
    from_frame = pretrained.recommend(frame, k=20)
    from_dict = pretrained.recommend(as_dict, k=20)
    pd.testing.assert_frame_equal(from_frame, from_dict)
    assert list(from_frame.columns) == ['SessionId', 'rank', 'ItemId', 'score']
    assert list(from_frame.SessionId.unique()) == list(known.SessionId.unique()), 'not in the order of the input'
    for _, recs in from_frame.groupby('SessionId'):
        assert list(recs['rank']) == list(range(1, 21))
        assert recs.ItemId.is_unique and recs.ItemId.isin(pretrained.itemidmap).all()
        assert (np.diff(recs.score.to_numpy()) <= 0).all()


def test_recommend_equals_the_top_of_predict_next_batch(pretrained, histories):
    _, as_dict = histories
    recs = pretrained.recommend(as_dict, k=10)
    for sid, items in list(as_dict.items())[:8]:
        items = [i for i in items if i in pretrained.itemidmap]
        if not items:
            continue
        pretrained.predict_next_batch([object()], [items[0]], batch=1)  # start afresh
        for item in items:
            scores = pretrained.predict_next_batch([sid], [item], batch=1)[0]
        top = scores.sort_values(ascending=False, kind='stable').head(10)
        got = recs[recs.SessionId == sid]
        np.testing.assert_allclose(got.score.to_numpy(), top.to_numpy(), rtol=1e-5, atol=1e-6)
        assert set(got.ItemId) == set(top.index) or np.isclose(top.iloc[-1], scores.nlargest(11).iloc[-1])


def test_recommend_exclude_seen(pretrained, histories):
    _, as_dict = histories
    recs = pretrained.recommend(as_dict, k=20, exclude_seen=True)
    plain = pretrained.recommend(as_dict, k=20)
    assert any(group.ItemId.isin(as_dict[sid]).any() for sid, group in plain.groupby('SessionId')), \
        'no session got a seen item without exclude_seen: the check below would prove nothing'
    for sid, group in recs.groupby('SessionId'):
        assert not group.ItemId.isin(as_dict[sid]).any()
        assert len(group) == 20


def test_recommend_k_larger_than_the_number_of_items(pretrained, histories):
    _, as_dict = histories
    sessions = dict(list(as_dict.items())[:3])
    n = pretrained.n_items
    recs = pretrained.recommend(sessions, k=n + 1000)
    for _, group in recs.groupby('SessionId'):
        assert len(group) == n and set(group.ItemId) == set(pretrained.itemidmap)
        assert list(group['rank']) == list(range(1, n + 1))
    unseen = pretrained.recommend(sessions, k=n + 1000, exclude_seen=True)
    for sid, group in unseen.groupby('SessionId'):
        seen = set(sessions[sid]) & set(pretrained.itemidmap)
        assert len(group) == n - len(seen) and not (set(group.ItemId) & seen)
        assert np.isfinite(group.score).all()


def test_recommend_skips_unknown_items(pretrained, histories):
    _, as_dict = histories
    sid, items = next((s, i) for s, i in as_dict.items() if all(x in pretrained.itemidmap for x in i))
    with_unknown = pretrained.recommend({sid: [-1] + items[:1] + [-2] + items[1:]}, k=10)
    pd.testing.assert_frame_equal(with_unknown, pretrained.recommend({sid: items}, k=10))
    only_unknown = pretrained.recommend({'a': [-1, -2], sid: items}, k=10)
    assert set(only_unknown.SessionId) == {sid}
