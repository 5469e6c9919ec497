"""An HTTP service for live-session recommendations: `gru4rec serve MODEL` (FastAPI + uvicorn).

JSON endpoints (the OpenAPI description is at /openapi.json, a browsable one at /docs):
    POST /click      {"session_id", "item_id", "k", "exclude_seen", "items"} -> the top k after the click
    POST /recommend  {"session_id", "k", "exclude_seen", "items"}            -> the top k of a live session
    POST /end        {"session_id"}                                          -> whether it was live
    GET  /health                                                             -> model and store figures
    POST /reload     (admin: `Authorization: Bearer TOKEN`)                  -> reads the model file again
                           (e.g. after retraining wrote it) and swaps it in; the old model answers meanwhile
The rules for sessions, unknown items and model swaps are live.SessionRecommender's. A bad request
gets a 4xx answer {"detail": ...} that says what is wrong.

Production rules (docs/serving.md):
- The control plane is closed: /reload exists only when the service was started with an admin token
  (--admin-token or GRU4REC_ADMIN_TOKEN), and answers 401 without it (compared in constant time).
- Session endpoints take `Content-Type: application/json` only (415 otherwise), so a web page cannot
  post to them across origins without a CORS preflight, which this service never grants.
- Limits, each a 4xx JSON error naming it: the request body (413), the session id's length and the
  length of items= (422).
- With --state-store redis://..., the sessions live in Redis: they outlive the process, and any number
  of workers (--workers) and machines serve them. A /reload on one worker reaches the others of the
  same model file through Redis (a message on a channel they all listen to).

Clicks are micro-batched: one scoring task takes the clicks that queued up while it scored the previous
batch and scores them with one SessionRecommender.update_many (one read of the output matrix for all of
them, in a worker thread, so that the event loop meanwhile parses the next requests). A lone click is
scored at once, on the event loop; nothing waits for a batch to fill. The clicks are read in their arrival order, so a
session's clicks keep their order, and each answer equals the one the click would get scored alone.
"""
import argparse
import asyncio
import hmac
import json
import os
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Annotated, List, Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gru4rec import GRU4Rec
from live import AUTO_INDEX_ITEMS, SessionRecommender, UnknownSession

MAX_K = 1000
TOKEN_VARIABLE = 'GRU4REC_ADMIN_TOKEN'
CONFIG_VARIABLE = 'GRU4REC_SERVE_CONFIG'  # how `--workers N` hands the options to each worker process
SESSION_PATHS = ('/click', '/recommend', '/end')


@dataclass(frozen=True)
class Limits:
    """What one request may hold; beyond it, a 4xx answer that names the limit."""
    max_body_bytes: int = 1 << 20
    max_session_id: int = 256  # characters of a string session id
    max_items: int = 10_000  # ids in items=


def schemas(limits):
    """The request bodies, their limits in the schema (so that /openapi.json documents them)."""
    SessionId = Union[Annotated[int, Field(ge=-2 ** 63, le=2 ** 63 - 1)],
                       Annotated[str, Field(min_length=1, max_length=limits.max_session_id)]]
    ItemId = Union[Annotated[int, Field(ge=-2 ** 63, le=2 ** 63 - 1)], str]

    class Query(BaseModel):
        model_config = ConfigDict(extra='forbid')
        session_id: SessionId
        k: int = Field(20, ge=1, le=MAX_K, description='how many items to recommend')
        exclude_seen: bool = Field(False, description="never recommend the session's recent clicks")
        items: Optional[List[ItemId]] = Field(None, min_length=1, max_length=limits.max_items,
                                               description='rank only these item ids (default: all items)')

    class Click(Query):
        item_id: ItemId

    class End(BaseModel):
        model_config = ConfigDict(extra='forbid')
        session_id: SessionId

    return Query, Click, End


Id = Union[int, str]


class Recommendations(BaseModel):
    session_id: Id
    item_known: bool = Field(True, description='False when the clicked item is unknown to the model '
                                               '(the click was skipped)')
    items: List[Id]
    scores: List[float]


class Ended(BaseModel):
    session_id: Id
    ended: bool = Field(description='whether the session was live')


class Health(BaseModel):
    status: str
    model: str
    lineage: Optional[str] = Field(description='the model\'s lineage (null for files older than lineages)')
    n_items: int
    state_store: str
    index: str = Field(description="how the top k over all items is found: 'exact' or the item index's setting")
    score_kind: str = Field(description="what a top k's scores are: the final activation ('softmax', 'elu-0.5', "
                                        "...), or 'logit' for a softmax model served with an index")
    live_sessions: Optional[int] = Field(description='live sessions in this process (null with a shared store)')
    capacity: Optional[int] = Field(description='most live sessions in this process (null with a shared store)')
    reloads: int


class Reloaded(BaseModel):
    model: str
    n_items: int
    kept_states: bool


class Error(BaseModel):
    detail: Union[str, list]


ERRORS = {400: {'model': Error, 'description': 'bad request (e.g. item ids the model does not know)'},
          413: {'model': Error, 'description': 'the request body is larger than the limit'},
          415: {'model': Error, 'description': 'the body is not application/json'},
          422: {'model': Error, 'description': 'the request does not follow the schema, or exceeds a limit'}}


def _error(status, detail, headers=None):
    return JSONResponse(status_code=status, content={'detail': detail}, headers=headers)


class RequestLimits:
    """ASGI middleware that enforces the content type of the session endpoints and the body size
    limit before the application reads a byte of the body."""

    def __init__(self, app, limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http' or scope['method'] != 'POST':
            return await self.app(scope, receive, send)
        headers = dict(scope['headers'])
        if scope['path'] in SESSION_PATHS:
            kind = headers.get(b'content-type', b'').split(b';')[0].strip().lower()
            if kind != b'application/json':
                return await _error(415, f'{scope["path"]} takes Content-Type: application/json, '
                                         f'not {kind.decode("latin-1") or "none"}')(scope, receive, send)
        limit = self.limits.max_body_bytes
        too_large = _error(413, f'the request body is larger than the limit of {limit} bytes (--max-body)')
        if int(headers.get(b'content-length', b'0') or 0) > limit:
            return await too_large(scope, receive, send)
        body, more = b'', True
        while more:  # read it all (bounded), then hand it to the application as one message
            message = await receive()
            if message['type'] != 'http.request':
                return
            body += message.get('body', b'')
            if len(body) > limit:
                return await too_large(scope, receive, send)
            more = message.get('more_body', False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {'type': 'http.request', 'body': body, 'more_body': False}
        await self.app(scope, replay, send)


def _answer(session_id, known, result):
    """A Recommendations answer, serialised directly: pydantic re-validating what we built would cost
    as much as the scoring."""
    ids, scores = result
    return JSONResponse({'session_id': session_id, 'item_known': known, 'items': ids.tolist(),
                         'scores': scores.tolist()})


def score_clicks(recommender, clicks):
    """The results of queued clicks (Click bodies, in arrival order): ((item ids, scores), item known)
    or the exception that the click alone raises, one per click. Each run of consecutive clicks with
    the same k, exclude_seen and items is scored with one update_many (the usual case: all of them);
    update_many validates before it changes any state, so a run it refuses (ValueError) is scored click
    by click and only the clicks at fault get the error."""
    results, start = [], 0
    while start < len(clicks):
        options = (clicks[start].k, clicks[start].exclude_seen, clicks[start].items)
        end = start + 1
        while end < len(clicks) and (clicks[end].k, clicks[end].exclude_seen, clicks[end].items) == options:
            end += 1
        run = clicks[start:end]
        try:
            scored = recommender.update_many([c.session_id for c in run], [c.item_id for c in run], *options)
        except ValueError:
            scored = None
        except Exception as error:  # a fault of ours (500): the states may have changed, nothing is retried
            results.extend([error] * len(run))
            start = end
            continue
        for i, click in enumerate(run):
            try:
                result = (scored[i] if scored is not None else
                          recommender.update(click.session_id, click.item_id, *options))
                results.append((result, recommender.knows(click.item_id)))
            except Exception as error:  # this click's error (400 for a ValueError), not its neighbours'
                results.append(error)
        start = end
    return results


class ClickBatcher:
    """Queues /click requests; one scoring task scores all that queued up meanwhile together in a
    worker thread (numpy's product and selections run outside the GIL, next to the event loop, which
    meanwhile reads the next requests), a lone click on the event loop."""

    def __init__(self, recommender):
        self.recommender = recommender
        self.queue = asyncio.Queue()  # (Click, future)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix='gru4rec-score')

    async def click(self, body):
        """((item ids, scores), item known) after the click, once its batch is scored."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((body, future))
        return await future

    async def run(self):
        """The scoring task: waits for a click, takes every other one queued by then, scores them."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            clicks = [body for body, _ in batch]
            try:  # a lone click is scored at once: handing it to the thread would cost more than scoring it
                results = (score_clicks(self.recommender, clicks) if len(clicks) == 1 else
                           await loop.run_in_executor(self.worker, score_clicks, self.recommender, clicks))
            except Exception as error:  # the task must live on: this batch gets a 500
                results = [error] * len(batch)
            for (_, future), result in zip(batch, results):
                if future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class ReloadBroadcast:
    """Tells the other workers serving the same model file with the same Redis that it was reloaded:
    a message on a Redis channel named after the file, which every worker listens to in a thread of
    its own and answers by reloading the file itself. A worker ignores its own messages."""

    def __init__(self, url, model_path, reload):
        import redis
        self.client = redis.Redis.from_url(url)
        self.channel = f'gru4rec:reload:{model_path}'
        self.me = uuid.uuid4().hex
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(**{self.channel: self._heard})
        self.thread = self.pubsub.run_in_thread(sleep_time=0.5, daemon=True)
        self.reload = reload

    def _heard(self, message):
        if json.loads(message['data']).get('from') != self.me:
            try:
                self.reload()
            except ValueError as e:  # a bad file: this worker keeps its model, as the one that was asked did
                print(f'gru4rec serve: reload refused: {e}', file=sys.stderr, flush=True)

    def tell_others(self):
        self.client.publish(self.channel, json.dumps({'from': self.me}))

    def close(self):
        self.thread.stop()
        self.pubsub.close()
        self.client.close()


def create_app(model_path, capacity=100_000, idle_timeout=1800.0, history=20, state_store=None,
               admin_token=None, limits=Limits(), index='auto'):
    """The FastAPI application serving the model file at `model_path`; its sessions in this process, or in
    the Redis of `state_store` (redis://host:port/db); /reload only when `admin_token` is given. index:
    SessionRecommender's ('auto', 'exact', 'ivf' or 'hnsw'); a built index is saved beside the model file
    (MODEL.index) and read from there while it matches the model (a /reload of a retrained file rebuilds it)."""
    if admin_token is not None and len(admin_token) < 16:
        raise ValueError('the admin token must be at least 16 characters (e.g. python -c "import secrets; '
                         'print(secrets.token_urlsafe())")')
    recommender = SessionRecommender(GRU4Rec.loadmodel(model_path), capacity, idle_timeout, history,
                                     state_store=state_store, index=index, index_file=index_file(model_path))
    state = {'path': str(model_path), 'reloads': 0}
    swap_lock = threading.Lock()  # one reload at a time: the file is read and swapped in as one
    Query, Click, End = schemas(limits)

    def reload():
        with swap_lock:
            kept = recommender.swap_model(GRU4Rec.loadmodel(state['path']))  # ValueError: the old model stays
            state['reloads'] += 1
        return kept

    @asynccontextmanager
    async def lifespan(app):
        batcher = ClickBatcher(recommender)
        scoring = asyncio.create_task(batcher.run())
        app.state.batcher = batcher
        broadcast = ReloadBroadcast(state_store, state['path'], reload) if recommender.shared else None
        app.state.broadcast = broadcast
        try:
            yield
        finally:
            scoring.cancel()
            await asyncio.gather(scoring, return_exceptions=True)
            batcher.worker.shutdown(wait=True)
            if broadcast is not None:
                broadcast.close()
            recommender.close()

    app = FastAPI(title='GRU4Rec live sessions', version='1', lifespan=lifespan,
                  description='Next-click recommendations for live sessions of a GRU4Rec model.')
    app.add_middleware(RequestLimits, limits=limits)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, error: ValueError):
        return _error(400, str(error))

    @app.exception_handler(UnknownSession)
    async def unknown_session(request: Request, error: UnknownSession):
        return _error(404, error.args[0])

    # The hot path reads its body with pydantic's own JSON parser, in one pass, rather than through
    # FastAPI's body machinery (json.loads, then its own validation); the OpenAPI description and the
    # 422 answers are the same.
    @app.post('/click', response_model=Recommendations, responses=ERRORS, openapi_extra={'requestBody': {
        'required': True, 'content': {'application/json': {'schema': Click.model_json_schema()}}}})
    async def click(request: Request):
        """Feeds one click of a session and returns its top k next items."""
        try:
            body = Click.model_validate_json(await request.body())
        except ValidationError as error:  # the 422 FastAPI gives
            raise RequestValidationError([{**e, 'loc': ('body', *e['loc'])}
                                          for e in error.errors(include_url=False)])
        result, known = await app.state.batcher.click(body)
        return _answer(body.session_id, known, result)

    # A recommendation without a click is not batched: it runs on the event loop, which saves the
    # thread pool's hand-over.
    @app.post('/recommend', response_model=Recommendations,
              responses={**ERRORS, 404: {'model': Error, 'description': 'the session is not live'}})
    async def recommend(body: Query):
        """The top k next items of a live session, without a click."""
        return _answer(body.session_id, True,
                       recommender.recommend(body.session_id, body.k, body.exclude_seen, body.items))

    @app.post('/end', response_model=Ended, responses=ERRORS)
    async def end(body: End):
        """Ends a session."""
        return Ended(session_id=body.session_id, ended=recommender.end(body.session_id))

    @app.get('/health', response_model=Health)
    async def health():
        """The served model and where its sessions are kept."""
        shared = recommender.shared
        return Health(status='ok', model=state['path'], lineage=recommender.lineage, n_items=recommender.n_items,
                      state_store=recommender.state_store,
                      index='exact' if recommender.item_index is None else repr(recommender.item_index.setting),
                      score_kind=recommender.score_kind, live_sessions=None if shared else len(recommender),
                      capacity=None if shared else recommender.capacity, reloads=state['reloads'])

    if admin_token is not None:
        expected = admin_token.encode()

        @app.post('/reload', response_model=Reloaded, responses={
            400: ERRORS[400], 401: {'model': Error, 'description': 'no or a wrong admin token'}})
        async def reload_model(request: Request):
            """Reads the served model file again (a retraining writes it atomically) and serves it from now
            on; the old model answers until the new one is ready. Only the file given at start-up is read:
            a client cannot make the server open other files. Needs `Authorization: Bearer TOKEN`."""
            scheme, _, given = request.headers.get('authorization', '').partition(' ')
            if not (scheme.lower() == 'bearer' and hmac.compare_digest(given.strip().encode(), expected)):
                return _error(401, 'reloading needs the admin token: Authorization: Bearer TOKEN',
                              {'WWW-Authenticate': 'Bearer'})
            kept = await run_in_threadpool(reload)
            if app.state.broadcast is not None:
                await run_in_threadpool(app.state.broadcast.tell_others)
            return Reloaded(model=state['path'], n_items=recommender.n_items, kept_states=kept)

    app.state.recommender = recommender
    return app


def app_from_environment():
    """The application of one `--workers N` worker process, from the options main() put in the environment."""
    options = json.loads(os.environ[CONFIG_VARIABLE])
    return create_app(**dict(options, limits=Limits(**options['limits']),
                             admin_token=os.environ.get(TOKEN_VARIABLE)))


def index_file(model_path):
    """Where the item index of a model file is kept: beside it, MODEL.index."""
    return f'{model_path}.index'


def _port(text):
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f'{port} is not a TCP port (1-65535)')
    return port


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'{value} is not a positive integer')
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog='gru4rec serve', description=__doc__.split('\n')[0])
    parser.add_argument('model', help='a model file written by GRU4Rec.savemodel (run.py -s)')
    parser.add_argument('--host', default='127.0.0.1', help='address to listen on (default %(default)s)')
    parser.add_argument('--port', type=_port, default=8000, help='port, 1-65535 (default %(default)s)')
    parser.add_argument('--state-store', default='memory',
                        help="where the live sessions are kept: 'memory' (this process, lost when it ends) or "
                             'redis://HOST:PORT/DB (shared by workers and machines, kept across restarts) '
                             '(default %(default)s)')
    parser.add_argument('--workers', type=_positive, default=1,
                        help='worker processes on the port; more than one needs a redis:// state store '
                             '(default %(default)s)')
    parser.add_argument('--admin-token', default=None,
                        help=f'the token that /reload requires (Authorization: Bearer TOKEN); also read from '
                             f'{TOKEN_VARIABLE}, which keeps it out of the process list. Without one, /reload is off')
    parser.add_argument('--capacity', type=_positive, default=100_000,
                        help='most live sessions in memory; the least recently used is ended beyond it '
                             '(default %(default)s; with Redis, its maxmemory decides)')
    parser.add_argument('--idle-timeout', type=float, default=1800.0,
                        help='seconds after which an idle session is ended (default %(default)s)')
    parser.add_argument('--history', type=int, default=20,
                        help='how many last clicks exclude_seen excludes (default %(default)s)')
    parser.add_argument('--index', choices=['auto', 'exact', 'ivf', 'hnsw'], default='auto',
                        help="how the top k over all items is found: 'exact', 'ivf' or 'hnsw' (approximate indexes of "
                             f"the items, need faiss-cpu; saved as MODEL.index), or 'auto': ivf from "
                             f"{AUTO_INDEX_ITEMS:,} items on (default %(default)s). With an index a softmax "
                             "model's scores are its logits (see /health's score_kind)")
    parser.add_argument('--max-body', type=_positive, default=Limits.max_body_bytes,
                        help='largest request body in bytes (default %(default)s)')
    parser.add_argument('--max-session-id', type=_positive, default=Limits.max_session_id,
                        help='longest string session id in characters (default %(default)s)')
    parser.add_argument('--max-items', type=_positive, default=Limits.max_items,
                        help='most ids in a request\'s items= (default %(default)s)')
    parser.add_argument('--log-level', default='warning', help='uvicorn log level (default %(default)s)')
    return parser


def main(argv=None):
    """`gru4rec serve MODEL [--host H] [--port P] ...`: serves a model file until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    token = args.admin_token if args.admin_token is not None else os.environ.get(TOKEN_VARIABLE)
    store = None if args.state_store == 'memory' else args.state_store
    if args.workers > 1 and store is None:
        parser.error('--workers above 1 needs --state-store redis://...: each worker would keep sessions of its own')
    options = dict(model_path=args.model, capacity=args.capacity, idle_timeout=args.idle_timeout,
                   history=args.history, state_store=store, index=args.index)
    limits = Limits(args.max_body, args.max_session_id, args.max_items)
    try:  # also when workers load it: a bad file or store is refused here, once, with a clear message
        app = create_app(**options, admin_token=token, limits=limits)
    except ValueError as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 2
    recommender = app.state.recommender
    print(f'{parser.prog}: serving {args.model} ({recommender.n_items:,} items, lineage {recommender.lineage}) '
          f'on http://{args.host}:{args.port} with {args.workers} worker(s); sessions in {recommender.state_store}; '
          f'top k {"exact" if recommender.item_index is None else "from the item index"}, '
          f'scores: {recommender.score_kind}; '
          f"/reload {'on' if token else 'off (no admin token)'}", file=sys.stderr, flush=True)
    # uvloop and httptools (the [serve] extra installs both; 'auto' falls back to asyncio and h11), no
    # access log: a log record per request would cost as much as the request.
    common = dict(host=args.host, port=args.port, log_level=args.log_level, loop='auto', http='auto',
                  access_log=False)
    if args.workers == 1:
        uvicorn.run(app, workers=1, **common)
        return 0
    recommender.close()
    os.environ[CONFIG_VARIABLE] = json.dumps(dict(options, limits=asdict(limits)))
    if token is not None:
        os.environ[TOKEN_VARIABLE] = token
    uvicorn.run('serve:app_from_environment', factory=True, workers=args.workers, **common)
    return 0


if __name__ == '__main__':
    sys.exit(main())
