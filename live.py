"""Live sessions: recommend the next click of many concurrent sessions, one click at a time.

`predict_next_batch` was built for evaluation (fixed batch slots, a compiled graph). A service sees a
stream of clicks from many users instead; SessionRecommender keeps one hidden state per live session
and runs the trained network's step (gru4rec's `gru_step`, ICLR 2016 eq. 1-4 with the reset gate applied
to h before the recurrent product) in plain numpy float32, so it needs no graph compiler and starts in
milliseconds. Its scores are the model's own (predict_next_batch's) to float32 rounding.

Rules (documented in the README, section "Live sessions"):
- A new session starts from the zero state, as a session does in training and evaluation.
- Every click of a known item is one step of the network, a repeated click too (training and
  evaluation feed repeated clicks as steps as well).
- A click of an item the model does not know is skipped, as evaluation and `recommend` skip such
  events: the state does not change (no session is created), and the recommendations are those of
  the stored state (none for a session without a known click).
- exclude_seen=True never recommends the items of the session's last `history` known clicks.
- items=[ids] ranks only those items (the final activation, softmax too, is taken over them, as in
  predict_next_batch(predict_for_item_ids=...)); ids the model does not know are an error.
- States live in a preallocated store of `capacity` rows: a new session beyond it ends the least
  recently used one, and a session idle for more than `idle_timeout` seconds is ended; an ended
  session starts over from the zero state at its next click.
- swap_model(new) keeps the live states when the new model is the old one retrained (same layer
  sizes, and the old items keep their positions at the front of its item map, as GRU4Rec.retrain
  appends new items): the states stay meaningful for a network that continued training. Any other
  model ends all live sessions, since a state of one network means nothing to another.
- All methods may be called from several threads at once.
"""
import threading
import time
from collections import OrderedDict

import numba
import numpy as np

FLOAT = np.float32
# Scores of at most this many (session, item) pairs are held at once (64 MiB): 256 sessions over 1M
# items are scored in slices instead of one 1 GiB matrix.
MAX_SCORE_CELLS = 1 << 24


# ---------------------------------------------------------------------------------------------------
# The network's functions in numpy, mirroring gru4rec.parse_activation's names.

def _sigmoid(x):
    return FLOAT(1) / (FLOAT(1) + np.exp(-x))


def _elu(alpha):
    return lambda x: np.where(x > 0, x, FLOAT(alpha) * np.expm1(np.minimum(x, 0)))


ACTIVATIONS = {'linear': lambda x: x, 'relu': lambda x: np.maximum(x, FLOAT(0)), 'tanh': np.tanh,
               'sigmoid': _sigmoid}
PARAMETRIC_ACTIVATIONS = {'leaky': lambda a: (lambda x: np.where(x >= 0, x, FLOAT(a) * x)),
                          'elu': _elu,
                          'selu': lambda scale, a: (lambda x: FLOAT(scale) * _elu(a)(x))}


def numpy_activation(name):
    """The element-wise numpy function of an activation name ('tanh', 'elu-0.5', 'selu-1.05-1.67');
    'softmax' and 'softmax_logit' (scored as the softmax, as predict_next_batch does) are not element-wise
    and are handled by the scoring (see _Network.finish)."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    head, *args = name.split('-')
    return PARAMETRIC_ACTIVATIONS[head](*(float(a) for a in args))


def gru_step(x_proj, h, Wrz, Wh, act, Bhc=None):
    """One GRU step, as gru4rec.gru_step. x_proj = x·Wx + Bh (M x 3L), h the previous state (M x L).
    r = σ(x·Wr + h·Ur), z = σ(x·Wz + h·Uz), h' = (1-z)*h + z*c with
    c = act(x·Wc + (r*h)·Uh) (the original's cell), or c = act(x·Wc + r*(h·Uh + bhc)) when the model
    was trained with reset_after=True (Bhc is then its bhc)."""
    L = h.shape[1]
    rz = _sigmoid(x_proj[:, :2 * L] + h @ Wrz)  # M x 2L
    r, z = rz[:, :L], rz[:, L:]
    recurrent = (r * h) @ Wh if Bhc is None else r * (h @ Wh + Bhc)  # M x L
    c = act(x_proj[:, 2 * L:] + recurrent)  # M x L
    return (1 - z) * h + z * c


class _Network:
    """A trained GRU4Rec's weights as float32 numpy arrays, with its forward step and scoring.
    Immutable once built: a model swap replaces the whole object, so a call in flight keeps a
    consistent network."""

    def __init__(self, model):
        if getattr(model, 'itemidmap', None) is None:
            raise ValueError('SessionRecommender needs a trained GRU4Rec: call fit(data) or GRU4Rec.loadmodel(path)')
        weights = model.weights  # the trained weights (float32 numpy arrays), kept in step with training
        params = model.get_params()
        self.item_ids = np.asarray(model.itemidmap)  # n_items, in index order
        self.itemidmap = model.itemidmap
        self.n_items = len(self.item_ids)
        self.layers = [weights[f'Wh{l}'].shape[0] for l in range(sum(k.startswith('Wh') for k in weights))]
        self.w = {n: np.ascontiguousarray(v, dtype=FLOAT) for n, v in weights.items()}
        if 'E' in self.w:
            self.input_table, self.onehot = self.w['E'], False
        elif params['constrained_embedding']:
            self.input_table, self.onehot = self.w['Wy'], False
        else:
            self.input_table, self.onehot = self.w['Wx0'], True
        self.hidden_act = numpy_activation(params['hidden_act'])
        self.final_act = params['final_act']
        self.Wy, self.By = self.w['Wy'], self.w['By']

    def item_index(self, item_id):
        """The index of one item id, or -1 when the model does not know it."""
        try:
            index = self.itemidmap.get_loc(item_id)
        except (KeyError, TypeError, ValueError, OverflowError):
            return -1
        return index if isinstance(index, (int, np.integer)) else -1

    def item_indices(self, item_ids):
        return self.itemidmap.get_indexer(np.asarray(item_ids, dtype=object if _mixed(item_ids) else None))

    def step(self, X, H):
        """The states after reading items X (M indices) from states H (list of M x L)."""
        if self.onehot:
            x_proj = self.input_table[X] + self.w['Bh0']  # M x 3L
        else:
            x_proj = self.input_table[X] @ self.w['Wx0'] + self.w['Bh0']  # M x 3L
        H_new = []
        for l in range(len(self.layers)):
            if l > 0:
                x_proj = H_new[-1] @ self.w[f'Wx{l}'] + self.w[f'Bh{l}']
            H_new.append(gru_step(x_proj, H[l], self.w[f'Wrz{l}'], self.w[f'Wh{l}'], self.hidden_act,
                                  self.w.get(f'Bhc{l}')))
        return H_new

    def logits(self, h, candidates=None):
        """o = h·Wyᵀ + By over all items or the candidate indices: M x C."""
        if candidates is None:
            return h @ self.Wy.T + self.By
        return h @ self.Wy[candidates].T + self.By[candidates]

    def finish(self, logits, selected):
        """Final scores of the selected logits (M x k) of rows whose logits over all scored items are
        `logits` (M x C), which softmax overwrites: it needs each row's normaliser, computed in place
        to save two M x C temporaries; the other activations are element-wise."""
        if self.final_act in ('softmax', 'softmax_logit'):
            top = logits.max(axis=1, keepdims=True)
            np.exp(np.subtract(logits, top, out=logits), out=logits)
            return np.exp(selected - top) / logits.sum(axis=1, keepdims=True)
        return numpy_activation(self.final_act)(selected)


def _mixed(values):
    return len({type(v) for v in values}) > 1


def top_k(logits, k):
    """Column indices of the k largest entries of each row, best first, ties by lower index (M x k)."""
    k = min(k, logits.shape[1])
    top = np.empty((logits.shape[0], k), dtype=np.int64)
    _top_k_rows(np.ascontiguousarray(logits), top, np.empty(k, dtype=logits.dtype))
    return top


@numba.njit(cache=True, nogil=True)
def _top_k_rows(logits, top, best):
    """One pass over each row keeping its k best entries sorted by insertion: a new entry enters only
    when it beats the k-th best, which over all items is rare, so the pass costs about a comparison per
    item (np.argpartition costs several times that, and as much again as the scoring product)."""
    k = top.shape[1]
    for m in range(logits.shape[0]):
        n = 0
        for j in range(logits.shape[1]):
            v = logits[m, j]
            if n < k:
                p = n
                n += 1
            elif v > best[k - 1]:
                p = k - 1
            else:
                continue
            while p > 0 and best[p - 1] < v:
                best[p] = best[p - 1]
                top[m, p] = top[m, p - 1]
                p -= 1
            best[p] = v
            top[m, p] = j


class UnknownSession(KeyError):
    """recommend() for a session that is not live (never seen, ended, evicted or timed out)."""


class SessionRecommender:
    """Next-click recommendations for many concurrent live sessions of a trained GRU4Rec.

    model: a trained or loaded GRU4Rec (its weights are read now; retraining the model later does not
    change this recommender until swap_model). capacity: the most live sessions kept; the least
    recently used one is ended to make room. idle_timeout: seconds after which an idle session is
    ended (None: never). history: how many of a session's last known clicks exclude_seen excludes.
    clock: the time source for idle_timeout (time.monotonic; tests pass a fake one).
    See the module docstring for the rules. Memory: `bytes_per_session` per live session, allocated up
    front for `capacity` sessions (touched as sessions arrive), plus the session id map.
    """

    def __init__(self, model, capacity=100_000, idle_timeout=1800.0, history=20, clock=time.monotonic):
        if int(capacity) < 1:
            raise ValueError(f'capacity={capacity!r}: give the most live sessions to keep (>= 1)')
        if idle_timeout is not None and not float(idle_timeout) > 0:
            raise ValueError(f'idle_timeout={idle_timeout!r}: give seconds (> 0), or None for no time-out')
        if int(history) < 0:
            raise ValueError(f'history={history!r}: give how many last clicks exclude_seen excludes (>= 0)')
        self.capacity, self.history = int(capacity), int(history)
        self.idle_timeout = None if idle_timeout is None else float(idle_timeout)
        self.clock = clock
        self._lock = threading.Lock()
        self._net = _Network(model)
        self._allocate()

    def _allocate(self):
        self._states = [np.zeros((self.capacity, L), dtype=FLOAT) for L in self._net.layers]  # capacity x L
        self._seen = np.zeros((self.capacity, self.history), dtype=np.int32)  # capacity x history, a ring
        self._n_clicks = np.zeros(self.capacity, dtype=np.int64)  # known clicks so far
        self._last = np.zeros(self.capacity, dtype=np.float64)  # time of the last click
        self._rows = OrderedDict()  # session id -> row, least recently used first
        self._free = list(range(self.capacity - 1, -1, -1))

    @property
    def bytes_per_session(self):
        """Bytes of preallocated state per session (without the session id map's entry)."""
        return 4 * sum(self._net.layers) + 4 * self.history + 8 + 8

    @property
    def n_items(self):
        return self._net.n_items

    def knows(self, item_id):
        """Whether the model knows an item id (a click of an unknown item is skipped)."""
        return self._net.item_index(item_id) >= 0

    def __len__(self):
        with self._lock:
            self._expire(self.clock())
            return len(self._rows)

    def __contains__(self, session_id):
        with self._lock:
            self._expire(self.clock())
            return session_id in self._rows

    # -- the state store (call with the lock held) ---------------------------------------------------

    def _expire(self, now):
        """Ends the sessions idle for longer than idle_timeout: the least recently used come first."""
        if self.idle_timeout is None:
            return
        while self._rows:
            session_id, row = next(iter(self._rows.items()))
            if now - self._last[row] <= self.idle_timeout:
                return
            del self._rows[session_id]
            self._free.append(row)

    def _row(self, session_id, now):
        """The row of a session, made most recently used; a new one (zero state) if it is not live."""
        row = self._rows.get(session_id)
        if row is not None:
            self._rows.move_to_end(session_id)
        else:
            if not self._free:
                _, evicted = self._rows.popitem(last=False)
                self._free.append(evicted)
            row = self._free.pop()
            for states in self._states:
                states[row] = 0
            self._n_clicks[row] = 0
            self._rows[session_id] = row
        self._last[row] = now
        return row

    def _seen_of(self, row):
        return self._seen[row, :min(self._n_clicks[row], self.history)].copy()

    # -- the API -------------------------------------------------------------------------------------

    def update(self, session_id, item_id, k=20, exclude_seen=False, items=None):
        """Feeds one click; returns the session's top-k next items as (item ids, scores), best first.
        Fewer than k when exclude_seen leaves fewer, none when the item is unknown to the model and
        the session has no state. k=0 only updates the state (e.g. to replay a session's past clicks)."""
        return self.update_many([session_id], [item_id], k, exclude_seen, items)[0]

    def update_many(self, session_ids, item_ids, k=20, exclude_seen=False, items=None):
        """Feeds the clicks (session_ids[i], item_ids[i]) in order and scores all of them in one matrix
        product; returns a list of (item ids, scores), one per click. A session that clicks more than
        once in the call reads its clicks in order (its result at each click is after that click)."""
        session_ids, item_ids = list(session_ids), list(item_ids)
        if len(session_ids) != len(item_ids):
            raise ValueError(f'update_many got {len(session_ids)} session ids and {len(item_ids)} item ids; '
                             'give one item per session id')
        net = self._net
        k, candidates = self._check_query(net, k, items)
        X = net.item_indices(item_ids) if len(item_ids) > 1 else np.array([net.item_index(item_ids[0])])
        H_last = np.zeros((len(X), net.layers[-1]), dtype=FLOAT)  # after each click
        has_state = np.zeros(len(X), dtype=bool)
        seen = [None] * len(X)
        with self._lock:
            if self._net is not net:  # swapped since the item indices were looked up
                return self.update_many(session_ids, item_ids, k, exclude_seen, items)
            now = self.clock()
            self._expire(now)
            todo = np.arange(len(X))
            distinct = len(set(session_ids)) == len(session_ids)
            while len(todo):  # rounds of distinct sessions: a session's later clicks wait for the next round
                if distinct:
                    batch = todo
                else:
                    first = {}
                    for i in todo:
                        first.setdefault(session_ids[i], i)
                    batch = np.fromiter(first.values(), dtype=np.int64, count=len(first))
                known = batch[X[batch] >= 0]
                if len(known):
                    rows = np.array([self._row(session_ids[i], now) for i in known])
                    H = net.step(X[known], [states[rows] for states in self._states])
                    for states, h in zip(self._states, H):
                        states[rows] = h
                    H_last[known] = H[-1]
                    if self.history:
                        self._seen[rows, self._n_clicks[rows] % self.history] = X[known]
                    self._n_clicks[rows] += 1
                    has_state[known] = True
                    if exclude_seen:
                        for i, row in zip(known, rows):
                            seen[i] = self._seen_of(row)
                for i in batch[X[batch] < 0]:  # unknown items: the stored state, unchanged
                    row = self._rows.get(session_ids[i])
                    if row is not None:
                        self._rows.move_to_end(session_ids[i])
                        self._last[row] = now
                        H_last[i], has_state[i] = self._states[-1][row], True
                        seen[i] = self._seen_of(row)
                todo = todo[len(batch):] if distinct else np.setdiff1d(todo, batch, assume_unique=True)
        return self._recommendations(net, H_last, has_state, k, candidates, seen if exclude_seen else None)

    def recommend(self, session_id, k=20, exclude_seen=False, items=None):
        """The top-k next items of a live session from its stored state, without a click, as
        (item ids, scores); it counts as use for the LRU order and the time-out. Raises
        UnknownSession when the session is not live."""
        net = self._net
        k, candidates = self._check_query(net, k, items)
        with self._lock:
            if self._net is not net:
                return self.recommend(session_id, k, exclude_seen, items)
            now = self.clock()
            self._expire(now)
            row = self._rows.get(session_id)
            if row is None:
                raise UnknownSession(f'no live session {session_id!r} (never seen, ended, evicted or timed out)')
            self._rows.move_to_end(session_id)  # a recommendation is use, as a click is
            self._last[row] = now
            h = self._states[-1][row][None, :].copy()  # 1 x L
            seen = self._seen_of(row)
        return self._recommendations(net, h, np.ones(1, dtype=bool), k, candidates,
                                     [seen] if exclude_seen else None)[0]

    def end(self, session_id):
        """Ends a session (its state is dropped); returns whether it was live."""
        with self._lock:
            self._expire(self.clock())
            row = self._rows.pop(session_id, None)
            if row is None:
                return False
            self._free.append(row)
            return True

    def scores(self, session_ids, items=None):
        """The final scores of all items (or of `items`) for live sessions: len(session_ids) x C,
        the columns in the order of the model's item map (or of `items`)."""
        net = self._net
        _, candidates = self._check_query(net, 1, items)
        with self._lock:
            self._expire(self.clock())
            missing = [s for s in session_ids if s not in self._rows]
            if missing:
                raise UnknownSession(f'no live session {missing[0]!r}')
            h = self._states[-1][[self._rows[s] for s in session_ids]]  # M x L
        logits = net.logits(h, candidates)
        return net.finish(logits, logits.copy())

    def swap_model(self, model):
        """Serves `model` (e.g. retrained) from now on. The live states are kept when it is this
        model retrained (same layer sizes, the old items first in its item map, in the same order),
        else every live session is ended. Returns whether the states were kept."""
        new = _Network(model)
        with self._lock:
            old = self._net
            keep = (new.layers == old.layers and new.n_items >= old.n_items
                    and np.array_equal(new.item_ids[:old.n_items], old.item_ids))
            self._net = new
            if not keep:
                self._allocate()
            return keep

    # -- scoring -------------------------------------------------------------------------------------

    def _check_query(self, net, k, items):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f'k={k!r}: give the number of items to recommend (an integer >= 1, or 0 for none)')
        if items is None:
            return min(int(k), net.n_items), None
        items = list(items)
        if not items:
            raise ValueError('items is empty: give the item ids to rank, or None for all items')
        candidates = net.item_indices(items)
        if (candidates < 0).any():
            unknown = [items[i] for i in np.flatnonzero(candidates < 0)[:5]]
            raise ValueError(f'items holds ids the model does not know, e.g. {unknown}')
        return min(int(k), len(candidates)), candidates

    def _recommendations(self, net, H, has_state, k, candidates, seen):
        """(item ids, scores) of the top k for each row of H (M x L) that has a state."""
        results = [(net.item_ids[:0], np.zeros(0, dtype=FLOAT))] * len(H)
        rows = np.flatnonzero(has_state) if k else []
        n_cols = net.n_items if candidates is None else len(candidates)
        step = max(1, MAX_SCORE_CELLS // n_cols)
        for first in range(0, len(rows), step):
            part = rows[first:first + step]
            logits = net.logits(H[part], candidates)  # m x C
            if seen is None:
                masked = logits
            else:
                masked = logits.copy()
                for j, i in enumerate(part):
                    cols = seen[i] if candidates is None else np.flatnonzero(np.isin(candidates, seen[i]))
                    masked[j, cols] = -np.inf
            top = top_k(masked, k)  # m x k
            valid = np.take_along_axis(masked, top, 1) > -np.inf
            scores = net.finish(logits, np.take_along_axis(logits, top, 1))
            ids = net.item_ids[top if candidates is None else candidates[top]]
            for j, i in enumerate(part):
                results[i] = (ids[j], scores[j]) if valid[j].all() else (ids[j][valid[j]], scores[j][valid[j]])
        return results
