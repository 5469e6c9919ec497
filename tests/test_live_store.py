"""SessionRecommender's state stores and its production rules: no lock re-entered under model swaps
(a stress test bounded in time), states in a real Redis equal to in-process ones, several recommenders
sharing one Redis, no click lost when two of them click one session at once, lineages, and clear errors."""
import threading

import numpy as np
import pytest

from conftest import ITEM_IDS, MODELS, fit_small
from gru4rec import GRU4Rec
from live import SessionRecommender, UnknownSession
from servers import RedisServer


@pytest.fixture(scope='module')
def redis_url(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp('redis')).start()
    yield server.url
    server.stop()


def clicks(n_sessions, n_clicks, seed):
    rng = np.random.default_rng(seed)
    return list(zip(rng.integers(1, n_sessions + 1, size=n_clicks).tolist(),
                    rng.choice(np.r_[ITEM_IDS, [-5]], size=n_clicks).tolist()))  # -5: an unknown item


def assert_same(got, expected):
    assert len(got) == len(expected)
    for (ids, scores), (ids_expected, scores_expected) in zip(got, expected):
        np.testing.assert_array_equal(ids, ids_expected)
        np.testing.assert_allclose(scores, scores_expected, rtol=1e-5, atol=1e-7)


def run_threads(targets, timeout):
    """Runs the functions in threads; fails, naming them, if any is still running after `timeout` s."""
    errors = []

    def guarded(target):
        try:
            target()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = [t for t in threads if t.is_alive()]
    assert not stuck, f'{len(stuck)} of {len(threads)} threads still running after {timeout} s: a deadlock'
    assert not errors, errors


@pytest.mark.parametrize('store', ['memory', 'redis'])
def test_swaps_under_load_never_hang(models, store, request):
    """Threads clicking (update, update_many), recommending and scoring while another swaps the model
    back and forth, between two steps of one lineage and to another model. The code before the
    store rework deadlocked here (a call re-entered its own lock after a swap)."""
    model = models('embedding')
    retrained = GRU4Rec.loadmodel(_saved(model, request))
    other = fit_small(**MODELS['embedding'])
    url = request.getfixturevalue('redis_url') if store == 'redis' else None
    live = SessionRecommender(model, capacity=50, state_store=url)
    stop = threading.Event()

    def clicker(w):
        def run():
            for n, (s, i) in enumerate(clicks(20, 400, seed=w)):
                if n % 3 == 0:
                    live.update_many([s, s + 100], [i, ITEM_IDS[n % 12]], k=5, exclude_seen=True)
                else:
                    live.update(s, i, k=5)
                try:
                    live.recommend(s, k=3)
                    live.scores([s])
                except UnknownSession:  # ended by a swap to another model in between: allowed
                    pass
        return run

    def swapper():
        n = 0
        while not stop.is_set() or n < 30:
            live.swap_model((retrained, model, other)[n % 3])
            n += 1

    def stop_after(workers):
        def run():
            for w in workers:
                w.join()
            stop.set()
        return run
    workers = [threading.Thread(target=clicker(w), daemon=True) for w in range(4)]
    for w in workers:
        w.start()
    run_threads([stop_after(workers), swapper], timeout=120)
    if url:
        live.close()


def _saved(model, request):
    path = request.getfixturevalue('tmp_path') / 'model.gru4rec'
    model.savemodel(path)
    return path


def test_redis_states_equal_in_process_ones(models, redis_url):
    """The same clicks (repeated sessions in one call, unknown items, exclude_seen, items=) answered
    from Redis and from memory; a recommender on the same Redis sees the sessions, recommend and end
    work on it, and an idle session times out (Redis's TTL)."""
    model = models('two_layers')
    memory = SessionRecommender(model)
    shared = SessionRecommender(model, state_store=redis_url)
    stream = clicks(15, 300, seed=3)
    for first in range(0, len(stream), 30):
        part = stream[first:first + 30]
        options = dict(k=4, exclude_seen=first % 60 == 0, items=list(ITEM_IDS[:9]) if first % 90 == 0 else None)
        sessions, items = [s for s, _ in part], [i for _, i in part]
        assert_same(shared.update_many(sessions, items, **options), memory.update_many(sessions, items, **options))
    other = SessionRecommender(model, state_store=redis_url)
    for s in range(1, 16):
        if s in memory:
            assert_same([other.recommend(s, k=6, exclude_seen=True)], [memory.recommend(s, k=6, exclude_seen=True)])
            np.testing.assert_allclose(other.scores([s]), memory.scores([s]), rtol=1e-5, atol=1e-7)
    assert other.end(3) and not shared.end(3) and 3 not in shared
    with pytest.raises(UnknownSession):
        shared.recommend(3)
    # a session ended (or clicked) elsewhere: the copy `shared` kept of the state it wrote last is stale
    other.update(4, ITEM_IDS[2])
    memory.update(4, ITEM_IDS[2])
    other.end(5)
    memory.end(5)
    for s in (4, 5):
        assert_same([shared.update(s, ITEM_IDS[7], k=5)], [memory.update(s, ITEM_IDS[7], k=5)])
    assert shared.bytes_per_session == 8 + 4 * (8 + 6) + 4 * 20
    brief = SessionRecommender(model, state_store=redis_url, idle_timeout=0.2, history=3)
    brief.update('brief', ITEM_IDS[0])
    assert 'brief' in brief
    threading.Event().wait(0.5)
    assert 'brief' not in brief
    for r in (shared, other, brief):
        r.close()


def test_two_recommenders_clicking_one_session_lose_no_click(models, redis_url):
    """Two recommenders on one Redis click the same sessions at once from two threads. Every click of
    a session is the same item, so whatever their order the states after n clicks are n steps of it:
    a lost click (a write over another's) shows as a different state."""
    model = models('onehot')
    a, b = (SessionRecommender(model, state_store=redis_url) for _ in range(2))
    sessions = [f'race{s}' for s in range(8)]
    item = ITEM_IDS[4]

    def clicker(live):
        def run():
            for _ in range(25):
                live.update_many(sessions, [item] * len(sessions), k=0)
        return run
    run_threads([clicker(a), clicker(b)], timeout=120)
    twin = SessionRecommender(model)
    for _ in range(50):
        twin.update_many(sessions[:1], [item], k=0)
    for s in sessions:
        np.testing.assert_allclose(a.scores([s]), twin.scores(sessions[:1]), rtol=1e-5, atol=1e-7)
    a.close()
    b.close()


def test_swap_keeps_states_only_within_one_lineage(models, tmp_path):
    """A model fitted anew on the same data (same catalogue, same layers) is another lineage: its swap
    ends the live sessions; the same model loaded again or retrained keeps them."""
    model = models('onehot')
    path = tmp_path / 'm.gru4rec'
    model.savemodel(path)
    live = SessionRecommender(model)
    live.update('s', ITEM_IDS[0])
    assert live.swap_model(GRU4Rec.loadmodel(path)) and 's' in live
    anew = fit_small(**MODELS['onehot'])
    assert anew.itemidmap.equals(model.itemidmap)
    assert not live.swap_model(anew) and 's' not in live


def test_more_new_sessions_than_capacity_in_one_call(models):
    """update_many with more new sessions than the store holds answers every click as if alone: a
    session of the call is never ended to make room for another of the same call before its click."""
    model = models('embedding')
    live = SessionRecommender(model, capacity=4)
    live.update('old', ITEM_IDS[1])
    live.update('old', ITEM_IDS[2])
    sessions = ['old'] + [f'new{i}' for i in range(9)]
    items = [ITEM_IDS[i % 12] for i in range(10)]
    got = live.update_many(sessions, items, k=5)
    twin = SessionRecommender(model)
    twin.update('old', ITEM_IDS[1])
    twin.update('old', ITEM_IDS[2])
    assert_same(got, [twin.update(s, i, k=5) for s, i in zip(sessions, items)])
    assert len(live) == 4


def test_clear_answers_to_misuse(models):
    model = models('embedding')
    live = SessionRecommender(model)
    assert live.update_many([], []) == []
    twice = live.update('s', ITEM_IDS[0], k=20, items=[ITEM_IDS[1], ITEM_IDS[2], ITEM_IDS[1]])
    assert sorted(twice[0].tolist()) == sorted(ITEM_IDS[1:3].tolist())  # the repeated id ranked once
    assert_same([live.recommend('s', k=20, items=[ITEM_IDS[1], ITEM_IDS[2]])], [twice])
    for bad in ([1, 2], {'a': 1}, None, True):
        with pytest.raises(ValueError, match='item id .* ids are integers or strings'):
            live.update('s', bad)
        with pytest.raises(ValueError, match='session id .* ids are integers or strings'):
            live.update(bad, ITEM_IDS[0])
    with pytest.raises(ValueError, match=r'capacity=1,000,000,000,000 sessions need .* more than the .* available'):
        SessionRecommender(model, capacity=10 ** 12)
    with pytest.raises(ValueError, match="state_store='postgres://x'"):
        SessionRecommender(model, state_store='postgres://x')
    with pytest.raises(ValueError, match='cannot use the state store redis://127.0.0.1:1/0'):
        SessionRecommender(model, state_store='redis://:secret@127.0.0.1:1/0')
    assert len(live) == 1  # the refused calls left the live session as it was
