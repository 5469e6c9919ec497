"""itemindex: the approximate top k of live sessions on large catalogues. Its recall against the exact top
20, the exactness of what it returns (order and scores among the returned items), exclude_seen and
items= with it, the saved index (reused while it matches the model, rebuilt when stale), bad arguments
and a missing faiss."""
import sys

import numpy as np
import pandas as pd
import pytest

from gru4rec import GRU4Rec
from live import SessionRecommender

faiss = pytest.importorskip('faiss')
import itemindex  # noqa: E402
from itemindex import HNSW, IVF  # noqa: E402

N_ITEMS = 4000
SMALL = IVF(n_lists=32, n_probe=24)  # random weights have no clusters: most cells are scanned


def random_model(n_items=N_ITEMS, layers=24, final_act='softmax', seed=0):
    """A GRU4Rec with random weights over item ids 0..n_items-1 (constrained embedding), as a fitted or
    loaded model is, without a training run; the output bias random too, so that the index must use it."""
    rng = np.random.default_rng(seed)
    model = GRU4Rec(loss='cross-entropy' if final_act == 'softmax' else 'bpr-max', final_act=final_act,
                    layers=[layers], constrained_embedding=True, n_sample=0, batch_size=2, verbose=False)
    model.itemidmap = pd.Index(np.arange(n_items))
    model.support = np.ones(n_items)
    model.history_, model.opt_values = [], {}
    model.weights = {'Wy': rng.normal(0, 0.5, (n_items, layers)).astype(np.float32),
                     'By': rng.normal(0, 0.5, n_items).astype(np.float32),
                     'Wx0': rng.normal(0, 0.5, (layers, 3 * layers)).astype(np.float32),
                     'Wrz0': rng.normal(0, 0.5, (layers, 2 * layers)).astype(np.float32),
                     'Wh0': rng.normal(0, 0.5, (layers, layers)).astype(np.float32),
                     'Bh0': np.zeros(3 * layers, dtype=np.float32)}
    return model


def sessions(n_sessions, n_clicks, seed=1, n_items=N_ITEMS):
    rng = np.random.default_rng(seed)
    return [(s, int(i)) for s in range(n_sessions) for i in rng.integers(n_items, size=n_clicks)]


@pytest.fixture(scope='module')
def model():
    return random_model()


@pytest.mark.parametrize('setting', [SMALL, IVF(n_lists=32, n_probe=24, metric="inner_product"),
                                     HNSW(M=16, ef_construction=40, metric='inner_product')])
def test_recall_at_20_against_the_exact_top_20(model, setting):
    exact, approximate = SessionRecommender(model, index='exact'), SessionRecommender(model, index=setting)
    recalls = []
    for s, i in sessions(60, 3):
        ids, _ = exact.update(s, i)
        found, _ = approximate.update(s, i)
        recalls.append(len(np.intersect1d(ids, found)) / 20)
    assert np.mean(recalls) >= 0.97


@pytest.mark.parametrize('final_act', ['softmax', 'elu-0.5'])
def test_returned_items_are_in_the_models_order_with_its_scores(final_act):
    model = random_model(final_act=final_act)
    exact, approximate = SessionRecommender(model, index='exact'), SessionRecommender(model, index=SMALL)
    assert exact.score_kind == final_act
    assert approximate.score_kind == ('logit' if final_act == 'softmax' else final_act)
    for s, i in sessions(20, 2, seed=2):
        exact.update(s, i, k=0)
        ids, scores = approximate.update(s, i, k=20)
        assert len(ids) == 20 and np.all(np.diff(scores) <= 0)
        all_scores = exact.scores([s])[0]  # the model's final scores of every item, exactly
        if final_act == 'softmax':  # logits: their differences are those of the log-probabilities
            log_p = np.log(all_scores[ids].astype(np.float64))
            np.testing.assert_allclose(scores - scores[0], log_p - log_p[0], atol=2e-5)
        else:
            np.testing.assert_allclose(scores, all_scores[ids], rtol=1e-5, atol=1e-6)
        # no item outside the returned ones scores above the last returned one, among those the exact
        # top 20 holds: what the index returns is a prefix of the exact order, less what it missed
        top = exact.recommend(s, k=20)[0]
        assert list(top[np.isin(top, ids)]) == list(ids[np.isin(ids, top)])


def test_exclude_seen_and_items_with_an_index(model):
    exact, approximate = SessionRecommender(model, index='exact'), SessionRecommender(model, index=SMALL)
    clicks = sessions(1, 25, seed=3)
    for s, i in clicks:
        exact.update(s, i, k=0)
        ids, _ = approximate.update(s, i, k=0)
    seen = [i for _, i in clicks][-20:]
    ids, _ = approximate.recommend(0, k=30, exclude_seen=True)
    assert len(ids) == 30 and not np.isin(ids, seen).any()
    items = list(range(0, N_ITEMS, 7))
    np.testing.assert_allclose(approximate.recommend(0, k=10, items=items)[1],
                               exact.recommend(0, k=10, items=items)[1], rtol=1e-6)
    assert list(approximate.recommend(0, k=10, items=items)[0]) == list(exact.recommend(0, k=10, items=items)[0])


def test_auto_is_exact_below_the_threshold(model):
    assert SessionRecommender(model).item_index is None
    assert repr(SessionRecommender(model, index='ivf').item_index.setting).startswith('IVF(')
    assert repr(SessionRecommender(model, index='hnsw').item_index.setting).startswith('HNSW(')


def test_saved_index_is_reused_and_rebuilt_when_stale(model, tmp_path):
    path = tmp_path / 'model.hnsw'
    first, built = SMALL.load_or_build(path, model.weights['Wy'], model.weights['By'], 'a')
    assert built and path.exists()
    again, built = SMALL.load_or_build(path, model.weights['Wy'], model.weights['By'], 'a')
    assert not built and again.fingerprint == first.fingerprint
    H = np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32)
    np.testing.assert_array_equal(again.search(H, 30), first.search(H, 30))
    retrained = model.weights['Wy'].copy()
    retrained[7, 3] += 1e-3  # one weight changed: another model
    _, built = SMALL.load_or_build(path, retrained, model.weights['By'], 'a')
    assert built
    _, built = SMALL.load_or_build(path, retrained, model.weights['By'], 'a')
    assert not built
    _, built = IVF(n_lists=32, n_probe=3, candidates=7).load_or_build(path, retrained, model.weights['By'], 'a')
    assert not built  # search-time settings search the same index
    _, built = IVF(n_lists=100).load_or_build(path, retrained, model.weights['By'], 'a')
    assert built  # another structure
    _, built = IVF(n_lists=100).load_or_build(path, retrained, model.weights['By'], 'b')
    assert built  # another lineage


def test_recommender_saves_and_swap_rebuilds(model, tmp_path):
    path = tmp_path / 'model.hnsw'
    live = SessionRecommender(model, index=SMALL, index_file=path)
    saved = path.read_bytes()
    live.update('before the swap', 5)
    other = random_model(seed=9)
    live.swap_model(other)
    assert path.read_bytes() != saved
    exact = SessionRecommender(other, index='exact')
    for s, i in sessions(10, 2, seed=4):
        ids, _ = live.update(s, i)
        assert len(np.intersect1d(ids, exact.update(s, i)[0])) >= 15


def test_not_an_index_file_is_refused(model, tmp_path):
    path = tmp_path / 'model.index'
    path.write_bytes(b'something else')
    with pytest.raises(ValueError, match='is not a GRU4Rec item index'):
        SessionRecommender(model, index=SMALL, index_file=path)
    assert path.read_bytes() == b'something else'
    SMALL.load_or_build(path.with_name('good.index'), model.weights['Wy'], model.weights['By'])
    damaged = path.with_name('good.index').read_bytes()
    path.write_bytes(damaged[:len(damaged) // 2])  # cut short
    with pytest.raises(ValueError, match='is a damaged item index'):
        SessionRecommender(model, index=SMALL, index_file=path)


@pytest.mark.parametrize('index', ['fast', 'HNSW', 3, True, IVF])
def test_bad_index_argument(model, index):
    with pytest.raises(ValueError, match=r"index=.*give one of 'auto'"):
        SessionRecommender(model, index=index)


@pytest.mark.parametrize('setting, kwargs', [(HNSW, {'M': 0}), (HNSW, {'ef_search': -1}), (IVF, {'candidates': 2.5}),
                                             (HNSW, {'M': True}), (IVF, {'n_probe': 0}), (IVF, {'n_lists': '9'})])
def test_bad_index_setting(setting, kwargs):
    with pytest.raises(ValueError, match=f'{next(iter(kwargs))}=.*positive integer'):
        setting(**kwargs)
    with pytest.raises(ValueError, match="metric='cosine': give one of"):
        setting(metric='cosine')


def test_without_faiss(model, monkeypatch):
    monkeypatch.setitem(sys.modules, 'faiss', None)  # import faiss raises ImportError
    with pytest.raises(ImportError, match='pip install faiss-cpu'):
        SessionRecommender(model, index='hnsw')
    monkeypatch.setattr('live.AUTO_INDEX_ITEMS', 10)
    with pytest.warns(UserWarning, match='served with the exact top k'):
        live = SessionRecommender(model)
    assert live.item_index is None
    assert itemindex.IVF().candidates == 100  # the setting itself needs no faiss


def test_serve_builds_saves_and_rebuilds_the_index_on_reload(tmp_path):
    pytest.importorskip('fastapi')
    from fastapi.testclient import TestClient

    from conftest import ITEM_IDS, MODELS, fit_small, make_train_log
    from serve import create_app
    model = fit_small(**MODELS['constrained'])
    path = tmp_path / 'model.gru4rec'
    model.savemodel(path)
    token = 'an-admin-token-of-16+'
    app = create_app(path, index='ivf', admin_token=token)
    saved = (tmp_path / 'model.gru4rec.index').read_bytes()
    expected = SessionRecommender(model, index='ivf').update(1, ITEM_IDS[3].item(), k=5)
    with TestClient(app) as client:
        health = client.get('/health').json()
        assert health['index'].startswith('IVF(') and health['score_kind'] == model.final_act
        answer = client.post('/click', json={'session_id': 1, 'item_id': ITEM_IDS[3].item(), 'k': 5}).json()
        assert answer['items'] == expected[0].tolist()
        np.testing.assert_allclose(answer['scores'], expected[1], rtol=1e-6)
        model.retrain(make_train_log(), sample_store=60, n_epochs=1)
        model.savemodel(path)
        assert client.post('/reload', headers={'authorization': f'Bearer {token}'}).status_code == 200
    assert (tmp_path / 'model.gru4rec.index').read_bytes() != saved  # the retrained weights' index
    assert create_app(path, index='exact').state.recommender.item_index is None
