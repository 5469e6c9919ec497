"""Top-k recommendations for sessions given their events so far: the network reads each session's
items, and the scores after its last one rank every item. The model provides the interface that
evaluation.py scores through: itemidmap, state_sizes, symbolic_step, compile_function, and compiled (a
cache of compiled functions)."""
import numpy as np
import pandas as pd
import pytensor
import pytensor.tensor as pt

from backends import call, to_host
from sessions import FLOAT, pad, session_arrays, sort_log


def session_reader(model, batch):
    """Two stateless functions: (X, *H) -> new states, and (X, *H) -> scores of all items."""
    X = pt.tensor('X', dtype='int32', shape=(batch,))
    H = [pt.tensor(f'H{l}', dtype=FLOAT, shape=(batch, L)) for l, L in enumerate(model.state_sizes)]
    with pytensor.config.change_flags(floatX=FLOAT):
        H_new, scores = model.symbolic_step(X, H)
    return model.compile_function([X] + H, H_new), model.compile_function([X] + H, scores)


def top_k(model, sessions, k, exclude_seen, batch_size, session_key, item_key, time_key):
    """GRU4Rec.recommend's DataFrame of the top-k items of each session (see there), the sessions read
    batch_size at a time, longest first, each scored after its last known item."""
    if int(k) < 1:
        raise ValueError(f'k must be a positive number of items, got {k!r}')
    if int(batch_size) < 1:
        raise ValueError(f'batch_size must be a positive number of sessions, got {batch_size!r}')
    k = min(int(k), len(model.itemidmap))
    if isinstance(sessions, dict):
        rows = [(sid, pos, item) for sid, its in sessions.items() for pos, item in enumerate(its)]
        sessions = pd.DataFrame(rows, columns=[session_key, time_key, item_key])
    items, offsets, _ = session_arrays(sessions, model.itemidmap, session_key, item_key,
                                       time_key, what='sessions')
    ordered = sort_log(sessions, session_key, time_key)  # positions, not labels: the index may repeat
    known = ordered[item_key].isin(model.itemidmap).to_numpy()
    session_ids = pd.unique(ordered[session_key].to_numpy()[known])
    step, score = model.compiled(('recommend', batch_size), lambda: session_reader(model, batch_size))
    lengths = np.diff(offsets)
    results = []
    for first in range(0, len(lengths), batch_size):
        batch = np.arange(first, min(first + batch_size, len(lengths)))
        batch = batch[np.argsort(-lengths[batch], kind='stable')]  # longest first: the active ones are a prefix
        H = [np.zeros((batch_size, L), dtype=FLOAT) for L in model.state_sizes]
        scores = np.empty((len(batch), len(model.itemidmap)), dtype=FLOAT)
        for t in range(lengths[batch[0]]):
            n_active = int((lengths[batch] > t).sum())
            n_going_on = int((lengths[batch] > t + 1).sum())
            X = pad(items[offsets[batch[:n_active]] + t], batch_size, 0)  # padding rows are ignored
            ending = slice(n_going_on, n_active)
            if n_active > n_going_on:
                scores[ending] = to_host([call(score, X, *H)])[0][ending]
            H = call(step, X, *H)
        back = np.argsort(batch)  # the sessions in the order of the log again
        batch, scores = batch[back], scores[back]
        if exclude_seen:
            for row, s in enumerate(batch):
                scores[row, items[offsets[s]:offsets[s + 1]]] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
        results.append(pd.DataFrame({
            session_key: np.repeat(session_ids[batch], k), 'rank': np.tile(np.arange(1, k + 1), len(batch)),
            item_key: model.itemidmap[top.ravel()], 'score': np.take_along_axis(scores, top, 1).ravel()}))
    result = pd.concat(results, ignore_index=True)
    if exclude_seen:  # when k exceeds the unseen items, the seen ones (score -inf) filled the top k
        result = result[result['score'] > -np.inf].reset_index(drop=True)
    return result
