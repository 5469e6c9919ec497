"""An HTTP service for live-session recommendations: `gru4rec serve MODEL` (FastAPI + uvicorn).

JSON endpoints (the OpenAPI description is at /openapi.json, a browsable one at /docs):
    POST /click      {"session_id", "item_id", "k", "exclude_seen", "items"} -> the top k after the click
    POST /recommend  {"session_id", "k", "exclude_seen", "items"}            -> the top k of a live session
    POST /end        {"session_id"}                                          -> whether it was live
    GET  /health                                                             -> model and store figures
    POST /reload                                                             -> reads the model file again
                           (e.g. after retraining wrote it) and swaps it in; the old model answers meanwhile
The rules for sessions, unknown items and model swaps are live.SessionRecommender's. A bad request
gets a 4xx answer {"detail": ...} that says what is wrong. One process serves its sessions; to scale
past one, run several and route each session id to one of them (README, "Live sessions").

Clicks are micro-batched: one scoring task takes the clicks that queued up while it scored the previous
batch and scores them with one SessionRecommender.update_many (one read of the output matrix for all of
them, in a worker thread, so that the event loop meanwhile parses the next requests). A lone click is
scored at once, on the event loop; nothing waits for a batch to fill. The clicks are read in their arrival order, so a
session's clicks keep their order, and each answer equals the one the click would get scored alone.
"""
import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import List, Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gru4rec import GRU4Rec
from live import SessionRecommender, UnknownSession

Id = Union[int, str]
MAX_K = 1000
MAX_ITEMS = 100_000


class Query(BaseModel):
    model_config = ConfigDict(extra='forbid')
    session_id: Id
    k: int = Field(20, ge=1, le=MAX_K, description='how many items to recommend')
    exclude_seen: bool = Field(False, description="never recommend the session's recent clicks")
    items: Optional[List[Id]] = Field(None, min_length=1, max_length=MAX_ITEMS,
                                      description='rank only these item ids (default: all items)')


class Click(Query):
    item_id: Id


class End(BaseModel):
    model_config = ConfigDict(extra='forbid')
    session_id: Id


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
    n_items: int
    live_sessions: int
    capacity: int
    reloads: int


class Reloaded(BaseModel):
    model: str
    n_items: int
    kept_states: bool


class Error(BaseModel):
    detail: Union[str, list]


ERRORS = {400: {'model': Error, 'description': 'bad request (e.g. item ids the model does not know)'},
          422: {'model': Error, 'description': 'the request does not follow the schema'}}


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


def create_app(model_path, capacity=100_000, idle_timeout=1800.0, history=20):
    """The FastAPI application serving the model file at `model_path`."""
    recommender = SessionRecommender(GRU4Rec.loadmodel(model_path), capacity, idle_timeout, history)
    state = {'path': str(model_path), 'reloads': 0}
    reload_lock = asyncio.Lock()

    @asynccontextmanager
    async def lifespan(app):
        batcher = ClickBatcher(recommender)
        scoring = asyncio.create_task(batcher.run())
        app.state.batcher = batcher
        try:
            yield
        finally:
            scoring.cancel()
            await asyncio.gather(scoring, return_exceptions=True)
            batcher.worker.shutdown(wait=True)

    app = FastAPI(title='GRU4Rec live sessions', version='1', lifespan=lifespan,
                  description='Next-click recommendations for live sessions of a GRU4Rec model.')

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, error: ValueError):
        return JSONResponse(status_code=400, content={'detail': str(error)})

    @app.exception_handler(UnknownSession)
    async def unknown_session(request: Request, error: UnknownSession):
        return JSONResponse(status_code=404, content={'detail': error.args[0]})

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
        return Health(status='ok', model=state['path'], n_items=recommender.n_items, live_sessions=len(recommender),
                      capacity=recommender.capacity, reloads=state['reloads'])

    @app.post('/reload', response_model=Reloaded, responses=ERRORS)
    async def reload():
        """Reads the served model file again (a retraining writes it atomically) and serves it from now
        on; the old model answers until the new one is ready. Only the file given at start-up is read:
        a client cannot make the server open other files."""
        async with reload_lock:
            model = await run_in_threadpool(GRU4Rec.loadmodel, state['path'])  # ValueError -> 400, the old model stays
            kept = await run_in_threadpool(recommender.swap_model, model)
            state['reloads'] += 1
        return Reloaded(model=state['path'], n_items=recommender.n_items, kept_states=kept)

    app.state.recommender = recommender
    return app


def main(argv=None):
    """`gru4rec serve MODEL [--host H] [--port P] ...`: serves a model file until interrupted."""
    parser = argparse.ArgumentParser(prog='gru4rec serve', description=__doc__.split('\n')[0])
    parser.add_argument('model', help='a model file written by GRU4Rec.savemodel (run.py -s)')
    parser.add_argument('--host', default='127.0.0.1', help='address to listen on (default %(default)s)')
    parser.add_argument('--port', type=int, default=8000, help='port (default %(default)s)')
    parser.add_argument('--capacity', type=int, default=100_000,
                        help='most live sessions; the least recently used is ended beyond it (default %(default)s)')
    parser.add_argument('--idle-timeout', type=float, default=1800.0,
                        help='seconds after which an idle session is ended (default %(default)s)')
    parser.add_argument('--history', type=int, default=20,
                        help='how many last clicks exclude_seen excludes (default %(default)s)')
    parser.add_argument('--log-level', default='warning', help='uvicorn log level (default %(default)s)')
    args = parser.parse_args(argv)
    try:
        app = create_app(args.model, args.capacity, args.idle_timeout, args.history)
    except ValueError as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 2
    # uvloop and httptools (the [serve] extra installs both; 'auto' falls back to asyncio and h11), no
    # access log: a log record per request would cost as much as the request.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, workers=1,
                loop='auto', http='auto', access_log=False)
    return 0


if __name__ == '__main__':
    sys.exit(main())
