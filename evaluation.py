"""Next-item evaluation of GRU4Rec: Recall@k and MRR@k against all training items.

Every event of a test session but the first is a prediction target. Sessions run in parallel slots as
in training (without sampling), and one compiled graph per mini-batch does the forward pass, ranks
the targets among all item scores and sums the metrics, so the work stays on the accelerator when
the model is compiled for one. Test events of items unknown to the model are dropped first (their
neighbours become adjacent), as in the original implementation.

evaluate_sessions_batch and evaluate_sessions keep the original's other entry points for scripts
written against it; both are computed by evaluate_gpu.
"""
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytensor
import pytensor.tensor as pt

from backends import call, needs_static_shapes, set_shared, to_host
from sessions import FLOAT, pad, session_arrays, session_parallel_batches

TIE_MODES = ('standard', 'conservative', 'median', 'tiebreaking')


def rank_of_target(scores, target_scores, mode, uniform=None):
    """Rank (1 = best) of each row's target among the row's scores, the target included.

    standard: 1 + #(score > target); conservative: #(score >= target);
    median: 1 + #(score > target) + (#(score == target) - 1) / 2;
    tiebreaking: the target's place among its ties drawn uniformly (uniform: M numbers in [0, 1)).
    """
    greater = pt.gt(scores, target_scores[:, None]).sum(axis=1).astype(FLOAT)  # M
    if mode == 'standard':
        return 1 + greater
    equal = pt.eq(scores, target_scores[:, None]).sum(axis=1).astype(FLOAT)  # M, the target included
    if mode == 'conservative':
        return greater + equal
    if mode == 'median':
        return 1 + greater + (equal - 1) / 2
    return 1 + greater + pt.floor(uniform * equal)


def _compile_eval_step(model, H, cutoffs, mode, with_candidates, seed):
    """Compiled step: (X, T, prev_rows, keep, active, candidates) -> metric sums for each cut-off.
    The batch has H's static size (JAX needs static shapes: the tail is padded), or shrinks at the tail.
    With candidates, each target is ranked against the candidate items; one not among them is a miss."""
    B = H[0].type.shape[0]
    X = pt.tensor('X', dtype='int32', shape=(B,))
    T = pt.tensor('T', dtype='int32', shape=(B,))  # target items
    prev_rows = pt.tensor('prev_rows', dtype='int32', shape=(B,))
    keep = pt.tensor('keep', dtype=FLOAT, shape=(B,))
    active = pt.tensor('active', dtype=FLOAT, shape=(B,))  # 0 for padding rows
    candidates = pt.ivector('candidates')
    with pytensor.config.change_flags(floatX=FLOAT):
        H_prev = [h[prev_rows] * keep[:, None] for h in H]
        M = X.shape[0]
        if with_candidates:
            H_new, scores = model.symbolic_step(X, H_prev, pt.concatenate([T, candidates]), ranking=True)  # M x (M + C)
            target_scores = scores[pt.arange(M), pt.arange(M)]  # M
            scores = scores[:, M:]  # M x C
        else:
            H_new, scores = model.symbolic_step(X, H_prev, None, ranking=True)  # M x n_items
            target_scores = scores[pt.arange(M), T]  # M
        updates = OrderedDict(zip(H, H_new))
        updates.update(getattr(model, 'random_updates', {}))  # a model that draws random numbers (RandomPred)
        uniform = None
        if mode == 'tiebreaking':
            rng = pt.random.shared_rng(seed=seed)
            updates[rng], uniform = rng.uniform(0, 1, size=X.shape)
        rank = rank_of_target(scores, target_scores, mode, uniform)
        if with_candidates:
            # A target that is not a candidate cannot be recommended: a miss in every mode (rank inf, so
            # 1 / rank = 0), where counting only the candidates ahead of it ranked it anyway, even first,
            # and conservative ranked it 0 when none was ahead (1 / 0 = inf).
            listed = pt.eq(T[:, None], candidates[None, :]).any(axis=1)  # M
            rank = pt.switch(listed, rank, np.float32(np.inf))
        cut = pt.as_tensor(np.asarray(cutoffs, dtype=FLOAT))[None, :]  # 1 x K
        hit = pt.le(rank[:, None], cut).astype(FLOAT) * active[:, None]  # B x K
        outputs = [hit.sum(axis=0), (hit / rank[:, None]).sum(axis=0)]
        return model.compile_function([X, T, prev_rows, keep, active, candidates], outputs, updates)


def evaluate_gpu(gru: Any, test_data: pd.DataFrame, items: Sequence[Any] | None = None, session_key: str = 'SessionId',
                 item_key: str = 'ItemId', time_key: str = 'Time', cut_off: int | Sequence[int] = (20,),
                 batch_size: int = 512, mode: str = 'standard',
                 seed: int = 42) -> tuple[OrderedDict[int, float], OrderedDict[int, float]]:
    """Recall@k and MRR@k of a trained GRU4Rec (or of a baseline) on test sessions.

    The model provides `itemidmap` (item ids in index order), `state_sizes` (widths of the states it
    carries along a session) and `symbolic_step(X, H_prev, candidates, ranking=True)`, returning the
    new states and scores of all items (or of the candidate indices) in the order of the final scores
    (GRU4Rec ranks by the scores before a strictly increasing final activation), `compile_function`, and
    `get_params()['backend']`, the backend it compiles for (see backends.py). A model whose scores are
    random leaves the updates of its generators in `random_updates` when symbolic_step builds them.

    items: optional candidate item ids to rank each target against (default: every training item); as in
    the original, every test event of a known item is still read and predicted, but a target that is not
    a candidate is a miss in every mode (the original ranked it against the candidates anyway, which in
    'conservative' could give rank 0). Ids the model does not know and repeated ids are left out of the
    candidates. cut_off: one k or a list. mode: how ties with the target are ranked (see
    rank_of_target). Returns (recall, mrr), two dicts keyed by cut-off.
    """
    if mode not in TIE_MODES:
        raise ValueError(f'unknown tie mode {mode!r}; use one of {list(TIE_MODES)}')
    cutoffs = [int(k) for k in np.atleast_1d(cut_off)]
    if not cutoffs or min(cutoffs) < 1:
        raise ValueError(f'cut_off must be positive integers, got {cut_off!r}')
    if int(batch_size) < 1:
        raise ValueError(f'batch_size must be positive, got {batch_size!r}')
    state_sizes = gru.state_sizes
    candidates = np.zeros(0, dtype=np.int32)
    if items is not None:
        candidates = gru.itemidmap.get_indexer(pd.unique(np.asarray(items))).astype(np.int32)
        candidates = candidates[candidates >= 0]
        if len(candidates) == 0:
            raise ValueError('none of the candidate items is known to the model')
    event_items, offsets, order = session_arrays(test_data, gru.itemidmap, session_key, item_key, time_key,
                                             what='test data')
    if len(event_items) - (len(offsets) - 1) <= 0:
        raise ValueError('the test data has no event to predict: no session has two or more events of items '
                         'the model knows')
    B = int(batch_size)
    static = needs_static_shapes(gru.get_params()['backend'])

    def make():
        H = [pytensor.shared(np.zeros((B, L), dtype=FLOAT), shape=(B if static else None, L)) for L in state_sizes]
        return _compile_eval_step(gru, H, cutoffs, mode, items is not None, seed), H
    compiled = getattr(gru, 'compiled', lambda key, make: make())
    step, H = compiled(('evaluate', B, tuple(cutoffs), mode, items is not None, seed), make)
    backend = gru.get_params()['backend']
    for h, L in zip(H, state_sizes):
        set_shared(h, np.zeros((B, L), dtype=FLOAT), backend)
    n = 0
    positions = np.arange(len(event_items))
    sums = []  # each batch's (hits, reciprocal ranks), read in one go at the end: a device never waits
    for pos_in, pos_out, prev_rows, keep in session_parallel_batches(positions, offsets, order, B):
        M = len(pos_in)
        size = B if static else M  # padding rows read item 0 and are masked out of the sums
        sums += call(step, pad(event_items[pos_in], size, 0), pad(event_items[pos_out], size, 0),
                     pad(prev_rows, size, 0), pad(keep, size, 0), pad(np.ones(M, dtype=FLOAT), size, 0), candidates)
        n += len(pos_in)
    recall_sum = np.zeros(len(cutoffs))
    mrr_sum = np.zeros(len(cutoffs))
    sums = to_host(sums)
    for hits, rr in zip(sums[::2], sums[1::2]):  # in the order of the batches, as they were added before
        recall_sum += hits
        mrr_sum += rr
    recall = OrderedDict((k, float(recall_sum[i] / n)) for i, k in enumerate(cutoffs))
    mrr = OrderedDict((k, float(mrr_sum[i] / n)) for i, k in enumerate(cutoffs))
    return recall, mrr


def evaluate_sessions_batch(pr, test_data, items=None, cut_off=20, batch_size=100, mode='standard',
                            session_key='SessionId', item_key='ItemId', time_key='Time'):
    """The original's legacy evaluation (through predict_next_batch), with its argument order: returns
    (Recall@cut_off, MRR@cut_off) as two floats, computed by evaluate_gpu."""
    recall, mrr = evaluate_gpu(pr, test_data, items, session_key, item_key, time_key, [cut_off], batch_size, mode)
    return recall[int(cut_off)], mrr[int(cut_off)]


def evaluate_sessions(pr, test_data, train_data, items=None, cut_off=20, session_key='SessionId', item_key='ItemId',
                      time_key='Time'):
    """The original's event-by-event evaluation of the baselines, with its argument order: returns
    (Recall@cut_off, MRR@cut_off), ties broken randomly, computed by evaluate_gpu. train_data chose the
    ranked items there; here they are the model's items, which it was fitted on. (The original counted a
    hit at rank < cut_off; this counts rank <= cut_off, like evaluate_gpu.)"""
    return evaluate_sessions_batch(pr, test_data, items, cut_off, mode='tiebreaking', session_key=session_key,
                                   item_key=item_key, time_key=time_key)
