"""live.SessionRecommender: its scores against the model's own prediction (predict_next_batch, and the
ranks evaluate_gpu computes on real data), the state store (LRU, time-out), the rules for unknown
items, repeated clicks, exclude_seen, items= and model swaps, and calls from several threads."""
import threading

import numpy as np
import pandas as pd
import pytest

from conftest import ITEM_IDS, MODELS, fit_small, make_log
from evaluation import evaluate_gpu
from gru4rec import GRU4Rec
from live import SessionRecommender, UnknownSession

XE = dict(loss='cross-entropy', final_act='softmax')


def click_stream(n_sessions, n_clicks, seed):
    """(session, item) clicks of interleaved sessions, with repeated clicks of the same item."""
    rng = np.random.default_rng(seed)
    sessions = rng.integers(1, n_sessions + 1, size=n_clicks)
    items = rng.choice(ITEM_IDS, size=n_clicks)
    items[5::7] = items[4::7][:len(items[5::7])]  # some clicks repeat the one before
    return list(zip(sessions.tolist(), items.tolist()))


@pytest.mark.parametrize('name, final', [('onehot', 'elu-0.5'), ('constrained', 'elu-0.5'),
                                         ('two_layers', 'elu-0.5'), ('embedding', 'softmax')])
def test_scores_equal_predict_next_batch(models, name, final):
    model = models(name) if final == 'elu-0.5' else fit_small(**dict(MODELS[name], **XE))
    live = SessionRecommender(model)
    rng = np.random.default_rng(3)
    sessions = np.array([11, 12, 13, 14])
    for step in range(6):
        if step != 2:  # step 2 repeats step 1's clicks: a repeated click is a step too
            items = rng.choice(ITEM_IDS, size=4)
        if step == 4:
            sessions = np.array([11, 12, 15, 14])  # slot 2 starts a new session: the model resets it
        expected = model.predict_next_batch(sessions, items, batch=4).to_numpy().T  # 4 x n_items
        results = [live.update(s, i, k=5) for s, i in zip(sessions.tolist(), items.tolist())]
        got = live.scores(sessions.tolist())
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        for (ids, scores), row in zip(results, expected):
            np.testing.assert_allclose(scores, np.sort(row)[::-1][:5], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(row[model.itemidmap.get_indexer(ids)], scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name, options', [('onehot', dict(reset_after=True)), ('two_layers', dict(reset_after=True)),
                                           ('constrained', dict(loss='xe_logit', final_act='softmax_logit'))])
def test_cell_and_final_act_variants_score_like_predict_next_batch(name, options):
    model = fit_small(**dict(MODELS[name], **options))
    live = SessionRecommender(model)
    rng = np.random.default_rng(4)
    sessions = np.array([21, 22, 23])
    for _ in range(3):
        items = rng.choice(ITEM_IDS, size=3)
        expected = model.predict_next_batch(sessions, items, batch=3).to_numpy().T  # 3 x n_items
        live.update_many(sessions.tolist(), items.tolist(), k=1)
        np.testing.assert_allclose(live.scores(sessions.tolist()), expected, rtol=1e-5,
                                   atol=1e-6 * np.abs(expected).max())


def test_update_many_equals_updates_in_order(models):
    model = models('two_layers')
    one, many = SessionRecommender(model), SessionRecommender(model)
    clicks = click_stream(5, 40, seed=4)  # sessions click several times within one update_many call
    expected = [one.update(s, i, k=7) for s, i in clicks]
    got = many.update_many([s for s, _ in clicks[:25]], [i for _, i in clicks[:25]], k=7)
    got += many.update_many([s for s, _ in clicks[25:]], [i for _, i in clicks[25:]], k=7)
    for (ids_e, sc_e), (ids_g, sc_g) in zip(expected, got):
        np.testing.assert_array_equal(ids_g, ids_e)
        np.testing.assert_allclose(sc_g, sc_e, rtol=1e-5, atol=1e-7)


def test_top_k_and_items(models):
    model = fit_small(**dict(MODELS['embedding'], **XE))
    live = SessionRecommender(model)
    live.update('a', ITEM_IDS[3])
    live.update('a', ITEM_IDS[5])
    all_scores = pd.Series(live.scores(['a'])[0], index=model.itemidmap)
    ids, scores = live.recommend('a', k=4)
    assert list(ids) == list(all_scores.sort_values(ascending=False).index[:4])
    assert (np.diff(scores) <= 0).all()
    candidates = [ITEM_IDS[1], ITEM_IDS[7], ITEM_IDS[2]]
    ids, scores = live.recommend('a', k=10, items=candidates)  # k beyond the candidates: all of them
    # softmax over the candidates only, as predict_next_batch(predict_for_item_ids=...)
    sub = all_scores[candidates] / all_scores[candidates].sum()
    assert sorted(ids) == sorted(candidates)
    np.testing.assert_allclose(scores, sub.sort_values(ascending=False).to_numpy(), rtol=1e-5)
    assert live.recommend('a', k=1000)[0].shape == (len(ITEM_IDS),)


def test_exclude_seen_excludes_the_last_history_clicks(models):
    live = SessionRecommender(models('onehot'), history=3)
    clicks = [ITEM_IDS[0], ITEM_IDS[1], ITEM_IDS[1], ITEM_IDS[2], ITEM_IDS[3]]
    for item in clicks:
        ids, _ = live.update('s', item, k=len(ITEM_IDS), exclude_seen=True)
    assert set(ids) == set(ITEM_IDS) - {ITEM_IDS[1], ITEM_IDS[2], ITEM_IDS[3]}  # the last 3 clicks
    ids, scores = live.recommend('s', k=len(ITEM_IDS), exclude_seen=False)
    assert len(ids) == len(ITEM_IDS) and np.isfinite(scores).all()
    ids, _ = live.recommend('s', k=3, exclude_seen=True, items=[ITEM_IDS[2], ITEM_IDS[4]])
    assert list(ids) == [ITEM_IDS[4]]  # fewer than k: the other candidate was seen


def test_unknown_items_are_skipped(models):
    model = models('constrained')
    live = SessionRecommender(model)
    ids, scores = live.update('new', 'not-an-item')
    assert len(ids) == 0 and 'new' not in live  # no known click: no state, no recommendation
    assert not live.knows(-5) and live.knows(int(ITEM_IDS[2]))
    before = live.update('s', ITEM_IDS[2], k=5)
    after = live.update('s', 99999, k=5)  # skipped: the stored state's recommendations
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_allclose(after[1], before[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(live.update('s', ITEM_IDS[4], k=5)[1],
                               SessionRecommender(model).update_many(['t', 't'], [ITEM_IDS[2], ITEM_IDS[4]], k=5)[1][1],
                               rtol=1e-5, atol=1e-7)
    # within one call a skipped click answers with the state at its place in the call
    one_call = SessionRecommender(model).update_many(['u', 'u', 'u'], [ITEM_IDS[2], 'nope', ITEM_IDS[4]], k=5)
    np.testing.assert_array_equal(one_call[1][0], before[0])
    with pytest.raises(ValueError, match='does not know.*12345'):
        live.recommend('s', items=[ITEM_IDS[0], 12345])


def test_end_recommend_and_bad_input(models):
    live = SessionRecommender(models('onehot'))
    live.update(1, ITEM_IDS[0])
    assert live.end(1) and not live.end(1)
    with pytest.raises(UnknownSession, match="no live session 1"):
        live.recommend(1)
    assert [len(ids) for ids, _ in live.update_many([1, 2], [ITEM_IDS[0]] * 2, k=0)] == [0, 0]
    assert 2 in live  # k=0 updates the state without scoring
    for k in (-1, 2.5, True):
        with pytest.raises(ValueError, match='k='):
            live.update(1, ITEM_IDS[0], k=k)
    with pytest.raises(ValueError, match='items is empty'):
        live.update(1, ITEM_IDS[0], items=[])
    with pytest.raises(ValueError, match='2 session ids and 1 item ids'):
        live.update_many([1, 2], [ITEM_IDS[0]])
    with pytest.raises(ValueError, match='needs a trained GRU4Rec'):
        SessionRecommender(GRU4Rec())
    for bad in (dict(capacity=0), dict(idle_timeout=0), dict(history=-1)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            SessionRecommender(models('onehot'), **bad)
    assert len(live) == 2  # the bad calls left nothing behind


def test_lru_eviction_at_capacity(models):
    model = models('embedding')
    live = SessionRecommender(model, capacity=3)
    for s in 'abc':
        live.update(s, ITEM_IDS[0])
    live.update('a', ITEM_IDS[1])  # 'b' is now the least recently used
    live.update('d', ITEM_IDS[2])
    assert len(live) == 3 and 'b' not in live and all(s in live for s in 'acd')
    live.recommend('c')  # a recommendation counts as use
    live.update('e', ITEM_IDS[3])
    assert 'a' not in live and 'c' in live
    # an evicted session starts over from the zero state, in a reused row
    fresh = SessionRecommender(model).update('b', ITEM_IDS[5], k=6)
    again = live.update('b', ITEM_IDS[5], k=6)
    np.testing.assert_array_equal(again[0], fresh[0])
    np.testing.assert_allclose(again[1], fresh[1], rtol=1e-5, atol=1e-7)
    assert live.bytes_per_session == 4 * 8 + 4 * 20 + 16


def test_idle_timeout(models):
    now = [0.0]
    live = SessionRecommender(models('onehot'), idle_timeout=10, clock=lambda: now[0])
    live.update('old', ITEM_IDS[0])
    now[0] = 6
    live.update('young', ITEM_IDS[0])
    now[0] = 10
    assert 'old' in live  # idle for exactly the time-out: still live
    now[0] = 10.5
    assert 'old' not in live and 'young' in live
    with pytest.raises(UnknownSession):
        live.recommend('old')
    now[0] = 16.5
    assert len(live) == 0
    first = SessionRecommender(models('onehot')).update('x', ITEM_IDS[3], k=4)
    np.testing.assert_allclose(live.update('young', ITEM_IDS[3], k=4)[1], first[1], rtol=1e-5, atol=1e-7)  # started over


def test_swap_model_keeps_states_of_a_retrained_model(models, tmp_path):
    model = fit_small(**MODELS['onehot'])
    path = tmp_path / 'm.gru4rec'
    model.savemodel(path)
    live = SessionRecommender(model)
    live.update('s', ITEM_IDS[0])
    live.update('s', ITEM_IDS[1])
    state_before = live.scores(['s'])
    retrained = GRU4Rec.loadmodel(path)
    new_items = make_log([4] * 6, seed=9, items=np.r_[[5, 6, 7], ITEM_IDS])
    retrained.retrain(new_items, n_epochs=1, sample_store=60)
    assert live.swap_model(retrained)
    assert 's' in live and live.n_items == len(ITEM_IDS) + 3
    scores = live.scores(['s'])
    assert scores.shape == (1, len(ITEM_IDS) + 3)
    assert not np.allclose(scores[0, :len(ITEM_IDS)], state_before[0])  # the new weights score the kept state
    # the kept state is the one the old network computed
    live.update('s', 5)
    check = SessionRecommender(model)
    check.update('s', ITEM_IDS[0])
    check.update('s', ITEM_IDS[1])
    assert check.swap_model(retrained)
    np.testing.assert_allclose(check.update('s', 5, k=30)[1], live.recommend('s', k=30)[1], rtol=1e-5, atol=1e-7)
    # another model (different layers, or not this one's item map first) ends every live session
    assert not live.swap_model(models('two_layers'))
    assert len(live) == 0 and live.n_items == len(ITEM_IDS)


def test_threads(models):
    """Concurrent clicks of disjoint sessions from several threads give the serial results."""
    model = models('two_layers')
    clicks = click_stream(40, 800, seed=8)
    serial = SessionRecommender(model)
    expected = {n: serial.update(s, i, k=5) for n, (s, i) in enumerate(clicks)}
    live = SessionRecommender(model, capacity=64)
    got, errors = {}, []

    def worker(w):
        try:
            for n, (s, i) in enumerate(clicks):
                if s % 4 == w:
                    got[n] = live.update(s, i, k=5) if n % 3 else live.update_many([s], [i], k=5)[0]
                    if n % 50 == 0:
                        live.recommend(s)
                        live.scores([s])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for n in expected:
        np.testing.assert_array_equal(got[n][0], expected[n][0])
        np.testing.assert_allclose(got[n][1], expected[n][1], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope='module')
def rsc15(data_dir):
    """A model trained in a few seconds on a slice of rsc15_100k, and test sessions."""
    train = pd.read_csv(data_dir / 'rsc15_100k_train_full.tsv.gz', sep='\t', nrows=15000)
    test = pd.read_csv(data_dir / 'rsc15_100k_test.tsv.gz', sep='\t', nrows=3000)
    model = GRU4Rec(layers=[32], n_epochs=1, batch_size=32, n_sample=128, verbose=False, seed=1,
                    **XE).fit(train, sample_store=100000)
    return model, test


def test_ranks_equal_evaluate_gpu_on_real_data(rsc15):
    model, test = rsc15
    recall, mrr = evaluate_gpu(model, test, cut_off=[5, 20])
    test = test[test.ItemId.isin(model.itemidmap)].sort_values(['SessionId', 'Time'], kind='stable')
    live = SessionRecommender(model, capacity=64)
    index = pd.Series(np.arange(model.n_items), index=model.itemidmap)
    ranks = []
    for _, session in test.groupby('SessionId', sort=False):
        items = session.ItemId.to_numpy()
        for now, following in zip(items[:-1], items[1:]):
            live.update('s', now)
            scores = live.scores(['s'])[0]
            ranks.append(1 + (scores > scores[index[following]]).sum())
        live.end('s')
    ranks = np.array(ranks)
    assert len(ranks) > 1000
    for k in (5, 20):
        assert abs((ranks <= k).mean() - recall[k]) < 2e-4
        assert abs(((ranks <= k) / ranks).mean() - mrr[k]) < 2e-4


def test_scores_equal_predict_next_batch_on_real_data(rsc15):
    model, test = rsc15
    test = test[test.ItemId.isin(model.itemidmap)]
    lengths = test.SessionId.value_counts()
    sessions = lengths.index[lengths >= 3][:8]
    first = test[test.SessionId.isin(sessions)].groupby('SessionId').head(3)
    live = SessionRecommender(model)
    for t in range(3):
        step = first.groupby('SessionId').nth(t).set_index('SessionId').reindex(sessions)
        expected = model.predict_next_batch(sessions.to_numpy(), step.ItemId.to_numpy(), batch=8)
        live.update_many(sessions.tolist(), step.ItemId.tolist())
        got = live.scores(sessions.tolist())
        np.testing.assert_allclose(got, expected.to_numpy().T, rtol=1e-4, atol=1e-7)
