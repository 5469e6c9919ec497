"""`gru4rec serve` as production software, against real processes on 127.0.0.1: /reload in a loop
beside live traffic never hangs the service; the control plane is closed and every limit answers a
4xx that names it; with the sessions in a real Redis, a service killed with SIGKILL mid-stream and
started again, two services answering one session's clicks in turn, several workers on one port, and
a Redis killed and restarted all answer exactly as one uninterrupted in-process twin."""
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import ITEM_IDS, MODELS
from live import SessionRecommender
from servers import ADMIN, ADMIN_TOKEN, ROOT, RedisServer, Service, free_port, saved_model


@pytest.fixture(scope='module')
def model_file(tmp_path_factory):
    return saved_model(tmp_path_factory, MODELS['two_layers'])


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path / 'redis').start()
    yield server
    server.stop()


def stream(n_sessions=10, n_clicks=8, seed=5):
    """Interleaved clicks of several sessions (with an unknown item now and then), as (session, item)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.repeat(np.arange(n_sessions), n_clicks))
    items = rng.choice(np.r_[ITEM_IDS, [999]], size=len(order))
    return [(f'user{s}', int(i)) for s, i in zip(order, items)]


class Twin:
    """The answers an uninterrupted in-process recommender gives to the same clicks, to compare with."""

    def __init__(self, model):
        self.live = SessionRecommender(model)

    def check(self, answer, session, item, k=5):
        ids, scores = self.live.update(session, item, k=k, exclude_seen=True)
        assert answer['items'] == ids.tolist(), (session, item)
        np.testing.assert_allclose(answer['scores'], scores, rtol=1e-5, atol=1e-6)


def click(client, session, item):
    answer = client.post('/click', json={'session_id': session, 'item_id': item, 'k': 5, 'exclude_seen': True})
    assert answer.status_code == 200, answer.text
    return answer.json()


def stream_with_a_fault(model, service, clicks, fault):
    """Streams clicks to the service and checks every answer against an uninterrupted twin; halfway,
    fault() strikes and returns the service to go on with (the same one, or one started anew)."""
    twin = Twin(model)
    for half in (0, 1):
        if half:
            service = fault()
        with httpx.Client(base_url=service.url, timeout=30) as client:
            for session, item in clicks[half * len(clicks) // 2:(half + 1) * len(clicks) // 2]:
                twin.check(click(client, session, item), session, item)


def test_reload_in_a_loop_beside_traffic_never_hangs(model_file):
    """/recommend and /click in a loop while another client reloads the model 25 times: the code
    before this test hung for good within a few reloads (no answer to /health, SIGTERM ignored)."""
    model, path = model_file
    service = Service(path)
    stop, statuses, errors = threading.Event(), [], []

    def traffic():
        try:
            with httpx.Client(base_url=service.url, timeout=10) as client:
                n = 0
                while not stop.is_set():
                    statuses.append(client.post('/click', json={'session_id': n % 5,
                                                                'item_id': int(ITEM_IDS[n % 12])}).status_code)
                    statuses.append(client.post('/recommend', json={'session_id': n % 5}).status_code)
                    n += 1
        except Exception as e:  # noqa: BLE001 - a timeout here is the hang this test is about
            errors.append(e)
    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=service.url, timeout=10) as client:
            for _ in range(25):
                answer = client.post('/reload', headers=ADMIN)
                assert answer.status_code == 200 and answer.json()['kept_states']
        stop.set()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        assert set(statuses) == {200} and len(statuses) > 50
        assert httpx.get(f'{service.url}/health', timeout=5).json()['reloads'] == 25
    finally:
        stop.set()
        service.stop(timeout=20)  # SIGTERM ends it: a hung service would not


def test_control_plane_and_limits(model_file):
    _, path = model_file
    closed = Service(path, token=None)
    limited = Service(path, '--max-body', 600, '--max-session-id', 16, '--max-items', 5)
    try:
        assert httpx.post(f'{closed.url}/reload', headers=ADMIN).status_code == 404  # no token: no control plane
        assert '/reload' not in httpx.get(f'{closed.url}/openapi.json').json()['paths']
        for headers in ({}, {'authorization': 'Bearer wrong-token-wrong-token'}, {'authorization': ADMIN_TOKEN}):
            answer = httpx.post(f'{limited.url}/reload', headers=headers)
            assert answer.status_code == 401 and 'admin token' in answer.json()['detail']
        assert httpx.post(f'{limited.url}/reload', headers=ADMIN).status_code == 200
        for path_ in ('/click', '/recommend', '/end'):
            for kind in ('text/plain', 'application/x-www-form-urlencoded', None):
                answer = httpx.post(f'{limited.url}{path_}', content=b'{"session_id": 1, "item_id": 1}',
                                    headers={'content-type': kind} if kind else {})
                assert answer.status_code == 415 and 'application/json' in answer.json()['detail'], answer.text
        big = httpx.post(f'{limited.url}/click', json={'session_id': 1, 'item_id': 1, 'items': ['x' * 700]})
        assert big.status_code == 413 and 'limit of 600 bytes' in big.json()['detail']
        long_id = httpx.post(f'{limited.url}/click', json={'session_id': 's' * 17, 'item_id': int(ITEM_IDS[0])})
        assert long_id.status_code == 422 and 'at most 16 characters' in str(long_id.json()['detail'])
        many = httpx.post(f'{limited.url}/click', json={'session_id': 1, 'item_id': int(ITEM_IDS[0]),
                                                        'items': [int(i) for i in ITEM_IDS[:6]]})
        assert many.status_code == 422 and 'at most 5 items' in str(many.json()['detail'])
        huge_int = httpx.post(f'{limited.url}/click', json={'session_id': 2 ** 70, 'item_id': int(ITEM_IDS[0])})
        assert huge_int.status_code == 422
        fine = httpx.post(f'{limited.url}/click', json={'session_id': 's' * 16, 'item_id': int(ITEM_IDS[0]),
                                                        'items': [int(i) for i in ITEM_IDS[:5]]})
        assert fine.status_code == 200 and len(fine.json()['items']) == 5
    finally:
        closed.stop()
        printed = limited.stop()
    assert f'serving {path} (12 items' in printed and 'sessions in in-process memory' in printed
    assert '/reload on' in printed


@pytest.mark.parametrize('options, message', [
    (['--port', '105043'], '105043 is not a TCP port (1-65535)'),
    (['--port', '0'], '0 is not a TCP port'),
    (['--capacity', str(10 ** 12)], 'capacity=1,000,000,000,000 sessions need'),
    (['--workers', '2'], '--workers above 1 needs --state-store redis://'),
    (['--state-store', 'redis://127.0.0.1:1/0'], 'cannot use the state store redis://127.0.0.1:1/0'),
    (['--admin-token', 'short'], 'the admin token must be at least 16 characters'),
])
def test_refused_options_say_why(model_file, options, message):
    _, path = model_file
    port = [] if options[0] == '--port' else ['--port', str(free_port())]
    result = subprocess.run([sys.executable, 'run.py', 'serve', str(path), *port, *options],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_sigkill_mid_stream_and_restart_continue_exactly(model_file, redis):
    """Clicks streamed to a service keeping its sessions in Redis; the service is killed with SIGKILL
    in the middle of the stream and started again: every session goes on as in an uninterrupted twin."""
    model, path = model_file
    services = [Service(path, '--state-store', redis.url)]

    def kill_and_restart():
        services[-1].kill()
        services.append(Service(path, '--state-store', redis.url))
        return services[-1]
    try:
        stream_with_a_fault(model, services[0], stream(), kill_and_restart)
    finally:
        services[-1].stop()


def test_two_services_on_one_redis_answer_as_one(model_file, redis):
    """Two services on the same Redis answer one session's clicks in turn, equal to one service."""
    model, path = model_file
    twin = Twin(model)
    a, b = Service(path, '--state-store', redis.url), Service(path, '--state-store', redis.url)
    try:
        with httpx.Client(base_url=a.url, timeout=10) as ca, httpx.Client(base_url=b.url, timeout=10) as cb:
            for n, (session, item) in enumerate(stream(seed=6)):
                twin.check(click((ca, cb)[n % 2], session, item), session, item)
            recommended = cb.post('/recommend', json={'session_id': 'user3', 'k': 5}).json()
            assert recommended['items'] == twin.live.recommend('user3', k=5)[0].tolist()
            assert ca.post('/end', json={'session_id': 'user3'}).json()['ended']
            assert cb.post('/recommend', json={'session_id': 'user3'}).status_code == 404
            assert cb.get('/health').json()['live_sessions'] is None  # shared: not counted per process
    finally:
        a.stop()
        b.stop()


def test_redis_killed_and_restarted_loses_nothing_acknowledged(model_file, redis):
    """Redis with its append-only file synced on every write, killed with SIGKILL mid-stream and
    started again on the same files: the service goes on with every acknowledged click."""
    model, path = model_file
    service = Service(path, '--state-store', redis.url)

    def restart_redis():
        redis.kill()
        redis.start()
        return service
    try:
        stream_with_a_fault(model, service, stream(seed=7), restart_redis)
    finally:
        service.stop()


def test_workers_share_sessions_and_reloads(model_file, redis):
    """--workers 2 on one port with Redis: the clicks, whichever worker answers them, equal the twin's;
    a /reload answered by one worker reaches the other (a message through Redis)."""
    model, path = model_file
    twin = Twin(model)
    service = Service(path, '--state-store', redis.url, '--workers', 2)
    try:
        for session, item in stream(n_sessions=6, seed=8):
            with httpx.Client(base_url=service.url, timeout=10) as client:  # a new connection: any worker
                twin.check(click(client, session, item), session, item)
        assert httpx.post(f'{service.url}/reload', headers=ADMIN, timeout=30).json()['kept_states']
        deadline = time.time() + 20
        while True:
            reloads = {httpx.get(f'{service.url}/health', timeout=5).json()['reloads'] for _ in range(12)}
            if reloads == {1} or time.time() > deadline:
                break
        assert reloads == {1}
    finally:
        service.stop()
