"""serve.py against a real uvicorn server on 127.0.0.1 (started and stopped here, `gru4rec serve`):
answers equal to SessionRecommender's, 4xx JSON errors, reload without dropped requests, and a
schemathesis property run of the service's own OpenAPI description (no 5xx, no schema violation)."""
import asyncio
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from conftest import ITEM_IDS, MODELS
from live import SessionRecommender
from servers import ADMIN, ROOT, Service, free_port, saved_model


@pytest.fixture(scope='module')
def model_file(tmp_path_factory):
    return saved_model(tmp_path_factory, MODELS['embedding'])


@pytest.fixture(scope='module')
def server(model_file):
    """`python run.py serve MODEL` (the gru4rec console script's main) on a free port, with an admin token."""
    service = Service(model_file[1], '--capacity', 50)
    yield service.url
    service.stop()


def test_click_recommend_end(server, model_file):
    model, _ = model_file
    live = SessionRecommender(model)
    with httpx.Client(base_url=server) as client:
        for item in (ITEM_IDS[0], ITEM_IDS[3], ITEM_IDS[3]):
            answer = client.post('/click', json={'session_id': 'u1', 'item_id': int(item), 'k': 5}).json()
            ids, scores = live.update('u1', item, k=5)
            assert answer['items'] == ids.tolist() and answer['item_known']
            np.testing.assert_allclose(answer['scores'], scores, rtol=1e-6)
        answer = client.post('/recommend', json={'session_id': 'u1', 'k': 3, 'exclude_seen': True,
                                                 'items': [int(i) for i in ITEM_IDS[:5]]}).json()
        ids, _ = live.recommend('u1', k=3, exclude_seen=True, items=ITEM_IDS[:5])
        assert answer['items'] == ids.tolist() and len(ids) == 3
        unknown = client.post('/click', json={'session_id': 'u1', 'item_id': 'nope'}).json()
        assert not unknown['item_known'] and len(unknown['items']) == 20 - 8  # only 12 items
        assert client.post('/end', json={'session_id': 'u1'}).json() == {'session_id': 'u1', 'ended': True}
        assert client.post('/end', json={'session_id': 'u1'}).json()['ended'] is False
        health = client.get('/health').json()
        assert health['status'] == 'ok' and health['n_items'] == len(ITEM_IDS) and health['capacity'] == 50


@pytest.mark.parametrize('path, body, status, message', [
    ('/recommend', {'session_id': 'nobody'}, 404, 'no live session'),
    ('/click', {'session_id': 1, 'item_id': int(ITEM_IDS[0]), 'items': [1, 2]}, 400, 'does not know'),
    ('/click', {'session_id': 1, 'item_id': int(ITEM_IDS[0]), 'k': 0}, 422, 'greater than or equal to 1'),
    ('/click', {'session_id': 1}, 422, 'item_id'),
    ('/click', {'session_id': 1, 'item_id': 1, 'colour': 'red'}, 422, 'colour'),
    ('/end', {'session_id': None}, 422, 'session_id'),
])
def test_bad_requests_get_4xx_json(server, path, body, status, message):
    answer = httpx.post(f'{server}{path}', json=body)
    assert answer.status_code == status
    assert message in str(answer.json()['detail'])
    assert httpx.post(f'{server}/click', content=b'{not json', headers={'content-type': 'application/json'}
                      ).status_code == 422


def test_reload_without_dropping_requests(server, model_file):
    """Clicks keep being answered while the model file is read again and swapped in; the states are
    kept (the same model). A corrupt file is refused with a 400 and the old model keeps serving."""
    model, path = model_file
    statuses, stop = [], threading.Event()

    def clicks():
        with httpx.Client(base_url=server) as client:
            n = 0
            while not stop.is_set():
                statuses.append(client.post('/click', json={'session_id': n % 7, 'item_id': int(ITEM_IDS[n % 12])}
                                            ).status_code)
                n += 1
    thread = threading.Thread(target=clicks)
    thread.start()
    try:
        time.sleep(0.3)
        answer = httpx.post(f'{server}/reload', headers=ADMIN, timeout=60).json()
        assert answer['kept_states'] and answer['n_items'] == len(ITEM_IDS)
        original = path.read_bytes()
        path.write_bytes(original[:-10])
        try:
            bad = httpx.post(f'{server}/reload', headers=ADMIN, timeout=60)
        finally:
            path.write_bytes(original)
        assert bad.status_code == 400 and 'corrupted' in bad.json()['detail']
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert len(statuses) > 10 and set(statuses) == {200}
    assert httpx.get(f'{server}/health').json()['reloads'] == 1


def test_concurrent_clicks_answer_as_sequential_ones(server, model_file):
    """Many sessions clicking at once (so that the server scores the clicks that queue up together,
    with mixed k, exclude_seen and items) get the answers of the same clicks fed one by one, in each
    session's order; a bad click among them gets its 400 and spoils no other answer."""
    model, _ = model_file
    rng = np.random.default_rng(7)
    sessions = {f'c{s}': [int(i) for i in rng.choice(ITEM_IDS, 6)] + ['unknown'] for s in range(24)}

    def options(n):
        return {'k': 3 + n % 4, 'exclude_seen': n % 2 == 0, **({'items': [int(i) for i in ITEM_IDS[:8]]}
                                                                if n % 3 == 0 else {})}

    async def session(client, n, session_id):
        answers = []
        for item in sessions[session_id]:
            answer = await client.post('/click', json={'session_id': session_id, 'item_id': item, **options(n)})
            answers.append(answer.json())
        return answers

    async def bad(client):
        return [await client.post('/click', json={'session_id': 'bad', 'item_id': int(ITEM_IDS[0]),
                                                  'items': [int(ITEM_IDS[0]), -1]}) for _ in range(6)]

    async def all_at_once():
        limits = httpx.Limits(max_connections=len(sessions) + 1)
        async with httpx.AsyncClient(base_url=server, limits=limits, timeout=30) as client:
            return await asyncio.gather(bad(client), *(session(client, n, s) for n, s in enumerate(sessions)))
    refused, *answers = asyncio.run(all_at_once())
    assert all(r.status_code == 400 and 'does not know' in r.json()['detail'] for r in refused)
    live = SessionRecommender(model)
    for n, (session_id, items) in enumerate(sessions.items()):
        for item, answer in zip(items, answers[n]):
            ids, scores = live.update(session_id, item, **options(n))
            assert answer['items'] == ids.tolist() and answer['item_known'] == live.knows(item)
            # Clicks answered together are one batched product, summed in another order than one click's:
            # float32 scores of about 0.1 then differ in their last bits (3e-8 seen), not more.
            np.testing.assert_allclose(answer['scores'], scores, rtol=1e-6, atol=1e-6)
    with httpx.Client(base_url=server) as client:
        for session_id in sessions:
            assert client.post('/end', json={'session_id': session_id}).json()['ended']


def test_serve_reports_a_bad_model_file(tmp_path):
    bad = tmp_path / 'bad.gru4rec'
    bad.write_bytes(b'not a model')
    result = subprocess.run([sys.executable, 'run.py', 'serve', str(bad), '--port', str(free_port())], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and 'not a GRU4Rec model file' in result.stderr


def test_openapi_property_run(server):
    """Requests generated from the service's own OpenAPI description, valid and invalid ones, for
    every operation: never a 5xx, every answer as the description says (status, content type, body).
    All of schemathesis's checks but positive_data_acceptance: a request can follow the schema and
    still name items the model does not know (a 400 that says so), which no schema can express."""
    schema = schemathesis.openapi.from_url(f'{server}/openapi.json')
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {'/click', '/recommend', '/end', '/health', '/reload'}
    for operation in operations:
        strategy = operation.as_strategy()

        @given(case=strategy)
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])
        check()
