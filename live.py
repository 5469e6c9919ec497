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
- items=[ids] with an id twice ranks it once.
- States live in a state store (sessionstore.py): in this process, a preallocated store of `capacity`
  rows, where a new session beyond it ends the least recently used one; or in Redis, shared by any
  number of processes and kept when they end. A session idle for more than `idle_timeout` seconds is
  ended; an ended session starts over from the zero state at its next click.
- swap_model(new) keeps the live states when the new model is the old one retrained: the same lineage
  (an id drawn when a model is fitted from scratch, kept by GRU4Rec.retrain and saved in its file), the
  same layer sizes, and the old items at the front of its item map in the same order (retrain appends
  new items). The states stay meaningful for a network that continued training. Any other model ends
  all live sessions, since a state of one network means nothing to another, even one fitted anew on
  the same catalogue. (Models from files older than the lineage have none: between two of them the
  layer sizes and item map decide, as before.)
- Large catalogues (index='auto' at AUTO_INDEX_ITEMS items or more, or index='ivf' or 'hnsw'): the top k
  of a click comes from an approximate maximum-inner-product index of the output items (itemindex.py,
  needs faiss-cpu), which proposes candidates that are then rescored exactly: the returned items are
  in the model's order and their logits are the model's own; an item the index missed can be absent
  (recall@20 against the exact top 20 in benchmarks/README.md). Scores are the final activation of
  the exact logits when it is element-wise. A softmax needs the normaliser over all items, the very
  pass the index avoids, so with an index a softmax model's scores are its logits (score_kind says
  'logit'; the ranking is the same); index='exact' keeps probabilities. items=[ids] and scores() are
  always exact. The index is built when the model is (swap_model builds the new model's), or read
  from index_file when it was saved there from the same weights (else built and saved there).
- All methods may be called from several threads at once. A call reads the network and its store
  once, as one pair, and never waits on a lock while it holds another: a model swap in the middle of
  a call lets the call finish with the network it started with.
"""
import hashlib
import time
import warnings
from numbers import Integral, Real

import numba

import numpy as np

from hyperparams import parse_hyperparameters
from sessionstore import InProcessStore, RedisStore

FLOAT = np.float32
# Scores of at most this many (session, item) pairs are held at once (64 MiB): 256 sessions over 1M
# items are scored in slices instead of one 1 GiB matrix.
MAX_SCORE_CELLS = 1 << 24
# index='auto' serves catalogues of this many items or more from an approximate index: below it the exact
# top k is about as fast (benchmarks/README.md, "Catalogues of a million items").
AUTO_INDEX_ITEMS = 200_000
INDEX_CHOICES = ("'auto'", "'exact' (or None)", "'ivf'", "'hnsw'", 'an itemindex.IVF(...) or HNSW(...)')


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

    def __init__(self, model, index=None, index_file=None):
        if getattr(model, 'itemidmap', None) is None:
            raise ValueError('SessionRecommender needs a trained GRU4Rec: call fit(data) or GRU4Rec.loadmodel(path)')
        weights = model.weights  # the trained weights (float32 numpy arrays), kept in step with training
        # The hyper-parameters as trained with (set_params stores values as given, e.g. 'False')
        params = getattr(model, 'hyperparameters_', None) or parse_hyperparameters(**model.get_params())
        self.lineage = getattr(model, 'lineage_', None)
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
        self.index = None  # an itemindex.ItemIndex serving the top k of all items, or None for the exact one
        setting = index_setting(index, self.n_items)
        if setting is not None:
            if index_file is None:
                self.index = setting.build(self.Wy, self.By, self.lineage)
            else:
                self.index, _ = setting.load_or_build(index_file, self.Wy, self.By, self.lineage)
        # What the scores of a top k over all items are: the final activation, or the logits (see the
        # module docstring: a softmax with an index)
        self.score_kind = ('logit' if self.index is not None and self.final_act.startswith('softmax')
                           else self.final_act)

    def item_index(self, item_id):
        """The index of one item id, or -1 when the model does not know it."""
        try:
            index = self.itemidmap.get_loc(item_id)
        except (KeyError, TypeError, ValueError, OverflowError):
            return -1
        return index if isinstance(index, (int, np.integer)) else -1

    def item_indices(self, item_ids):
        """The indices of item ids (-1 for those the model does not know)."""
        if len(item_ids) == 1:
            return np.array([self.item_index(item_ids[0])])
        return self.itemidmap.get_indexer(np.asarray(item_ids, dtype=object if _mixed(item_ids) else None))

    def namespace(self, history):
        """The name under which a shared store keeps this network's states: its lineage (or, for a model
        without one, a digest of its output weights) and the state's shape."""
        if self.lineage is not None:
            origin = self.lineage
        else:
            digest = hashlib.blake2b(digest_size=12)
            digest.update(self.Wy.tobytes())
            digest.update(self.By.tobytes())
            origin = 'w' + digest.hexdigest()
        return f'{origin}:{"-".join(map(str, self.layers))}:h{history}'

    def continues(self, old):
        """Whether this network is `old` trained further (see the module docstring on swap_model)."""
        if (self.lineage is None) != (old.lineage is None) or self.lineage != old.lineage:
            return False
        return (self.layers == old.layers and self.n_items >= old.n_items
                and np.array_equal(self.item_ids[:old.n_items], old.item_ids))

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


def index_setting(index, n_items):
    """The itemindex setting that an `index` argument asks for at n_items items, or None for the exact
    top k. 'auto' is IVF's defaults from AUTO_INDEX_ITEMS items on; without faiss installed it serves
    exactly (with a warning)."""
    if index is None or (isinstance(index, str) and index == 'exact'):
        return None
    import itemindex  # only with an index: itself imports faiss only when an index is built or read
    if isinstance(index, itemindex.IndexSetting):
        return index
    if not (isinstance(index, str) and index in ('auto', 'ivf', 'hnsw')):
        raise ValueError(f'index={index!r}: give one of {", ".join(INDEX_CHOICES)}')
    if index == 'auto':
        if n_items < AUTO_INDEX_ITEMS:
            return None
        try:
            itemindex.require_faiss()
        except ImportError as e:
            warnings.warn(f'{n_items:,} items are served with the exact top k: {e}', stacklevel=3)
            return None
    return itemindex.HNSW() if index == 'hnsw' else itemindex.IVF()


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


def _check_ids(ids, what):
    """Session and item ids are integers or strings (item ids may also be floats, as pandas allows):
    anything else is refused before a state changes."""
    for value in ids:
        if isinstance(value, bool) or not isinstance(value, (str, Integral, Real)):
            raise ValueError(f'{what} {value!r} is a {type(value).__name__}: ids are integers or strings')


class SessionRecommender:
    """Next-click recommendations for many concurrent live sessions of a trained GRU4Rec.

    model: a trained or loaded GRU4Rec (its weights are read now; retraining the model later does not
    change this recommender until swap_model). state_store: None (or 'memory') keeps the states in this
    process; 'redis://host:port/db' keeps them in Redis, shared with every other recommender on it
    (see sessionstore.py). capacity: the most live sessions the in-process store keeps; the least
    recently used one is ended to make room (with Redis, its maxmemory and eviction policy decide, and
    capacity is how many states this process keeps a copy of, to save a read per click).
    idle_timeout: seconds after which an idle session is ended (None: never). history: how many of a
    session's last known clicks exclude_seen excludes. clock: the time source of the in-process store's
    idle_timeout (time.monotonic; tests pass a fake one). See the module docstring for the rules.
    Memory: `bytes_per_session` per live session, allocated up front for `capacity` sessions in
    process (checked against the memory available), plus the session id map.
    """

    def __init__(self, model, capacity=100_000, idle_timeout=1800.0, history=20, clock=time.monotonic,
                 state_store=None, index='auto', index_file=None):
        if isinstance(capacity, bool) or not isinstance(capacity, Integral) or capacity < 1:
            raise ValueError(f'capacity={capacity!r}: give the most live sessions to keep (an integer >= 1)')
        if idle_timeout is not None and not float(idle_timeout) > 0:
            raise ValueError(f'idle_timeout={idle_timeout!r}: give seconds (> 0), or None for no time-out')
        if isinstance(history, bool) or not isinstance(history, Integral) or history < 0:
            raise ValueError(f'history={history!r}: give how many last clicks exclude_seen excludes (>= 0)')
        self.capacity, self.history = int(capacity), int(history)
        self.idle_timeout = None if idle_timeout is None else float(idle_timeout)
        self.clock = clock
        index_setting(index, 0)  # a bad index argument is refused before the model is read
        self.index, self.index_file = index, index_file
        net = _Network(model, index, index_file)
        if state_store in (None, 'memory'):
            store = InProcessStore(net.layers, self.history, self.capacity, self.idle_timeout, clock)
        elif isinstance(state_store, str) and state_store.split('://')[0] in ('redis', 'rediss', 'unix'):
            store = RedisStore(state_store, net.layers, self.history, net.namespace(self.history), self.idle_timeout,
                               self.capacity)
        else:
            raise ValueError(f'state_store={state_store!r}: give None for this process\'s memory or a '
                             'redis://host:port/db URL')
        self._serving = (net, store)  # replaced as one, never changed: a call reads it once

    @property
    def bytes_per_session(self):
        """Bytes of state per session (without the session id map's entry or Redis's key)."""
        return self._serving[1].bytes_per_session

    @property
    def n_items(self):
        return self._serving[0].n_items

    @property
    def lineage(self):
        """The served model's lineage (None for a model from a file older than lineages)."""
        return self._serving[0].lineage

    @property
    def score_kind(self):
        """What the scores of a top k over all items are: the final activation's name ('softmax',
        'elu-0.5', ...), or 'logit' for a softmax model served with an index (see the module docstring)."""
        return self._serving[0].score_kind

    @property
    def item_index(self):
        """The served model's approximate item index (an itemindex.ItemIndex), or None when its top k
        is exact."""
        return self._serving[0].index

    @property
    def state_store(self):
        """A description of where the live states are kept (for logs and /health)."""
        return self._serving[1].describe()

    @property
    def shared(self):
        """Whether the live states are in a store shared with other processes (Redis)."""
        return isinstance(self._serving[1], RedisStore)

    def knows(self, item_id):
        """Whether the model knows an item id (a click of an unknown item is skipped)."""
        return self._serving[0].item_index(item_id) >= 0

    def __len__(self):
        return len(self._serving[1])

    def __contains__(self, session_id):
        return session_id in self._serving[1]

    # -- the API -------------------------------------------------------------------------------------

    def update(self, session_id, item_id, k=20, exclude_seen=False, items=None):
        """Feeds one click; returns the session's top-k next items as (item ids, scores), best first.
        Fewer than k when exclude_seen leaves fewer, none when the item is unknown to the model and
        the session has no state. k=0 only updates the state (e.g. to replay a session's past clicks)."""
        return self.update_many([session_id], [item_id], k, exclude_seen, items)[0]

    def update_many(self, session_ids, item_ids, k=20, exclude_seen=False, items=None):
        """Feeds the clicks (session_ids[i], item_ids[i]) in order and scores all of them in one matrix
        product; returns a list of (item ids, scores), one per click (none for no clicks). A session
        that clicks more than once in the call reads its clicks in order (its result at each click is
        after that click). Everything is checked before any state changes."""
        session_ids, item_ids = list(session_ids), list(item_ids)
        if len(session_ids) != len(item_ids):
            raise ValueError(f'update_many got {len(session_ids)} session ids and {len(item_ids)} item ids; '
                             'give one item per session id')
        _check_ids(session_ids, 'session id')
        _check_ids(item_ids, 'item id')
        net, store = self._serving
        k, candidates = self._check_query(net, k, items)
        if not session_ids:
            return []
        X = net.item_indices(item_ids)
        H_last = np.zeros((len(X), net.layers[-1]), dtype=FLOAT)  # after each click
        has_state = np.zeros(len(X), dtype=bool)
        seen = [None] * len(X)
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
                H_last[known], seen_known = store.advance([session_ids[i] for i in known], X[known], net.step)
                has_state[known] = True
                for i, s in zip(known, seen_known):
                    seen[i] = s
            unknown = batch[X[batch] < 0]  # unknown items: the stored state, unchanged
            if len(unknown):
                h, live, seen_unknown = store.read([session_ids[i] for i in unknown])
                H_last[unknown], has_state[unknown] = h, live
                for i, s in zip(unknown, seen_unknown):
                    seen[i] = s
            todo = todo[len(batch):] if distinct else np.setdiff1d(todo, batch, assume_unique=True)
        return self._recommendations(net, H_last, has_state, k, candidates, seen if exclude_seen else None)

    def recommend(self, session_id, k=20, exclude_seen=False, items=None):
        """The top-k next items of a live session from its stored state, without a click, as
        (item ids, scores); it counts as use for the LRU order and the time-out. Raises
        UnknownSession when the session is not live."""
        _check_ids([session_id], 'session id')
        net, store = self._serving
        k, candidates = self._check_query(net, k, items)
        h, live, seen = store.read([session_id])
        if not live[0]:
            raise UnknownSession(f'no live session {session_id!r} (never seen, ended, evicted or timed out)')
        return self._recommendations(net, h, live, k, candidates, seen if exclude_seen else None)[0]

    def end(self, session_id):
        """Ends a session (its state is dropped); returns whether it was live."""
        _check_ids([session_id], 'session id')
        return self._serving[1].end(session_id)

    def scores(self, session_ids, items=None):
        """The final scores of all items (or of `items`) for live sessions: len(session_ids) x C,
        the columns in the order of the model's item map (or of `items`, each id once)."""
        session_ids = list(session_ids)
        _check_ids(session_ids, 'session id')
        net, store = self._serving
        _, candidates = self._check_query(net, 1, items)
        h, live, _ = store.read(session_ids, touch=False)  # M x L
        if not live.all():
            raise UnknownSession(f'no live session {session_ids[int(np.argmin(live))]!r}')
        logits = net.logits(h, candidates)
        return net.finish(logits, logits.copy())

    def swap_model(self, model):
        """Serves `model` (e.g. retrained) from now on. The live states are kept when it is this
        model trained further (see the module docstring), else every live session is ended.
        Returns whether the states were kept. Calls in flight finish with the model they started with.
        The new model's index is built (or read from index_file) before it is swapped in."""
        new = _Network(model, self.index, self.index_file)
        old, store = self._serving
        keep = new.continues(old)
        if not keep:
            store = store.fresh(new.layers, new.namespace(self.history))
        self._serving = (new, store)
        return keep

    def close(self):
        """Releases the state store's connection (Redis); the in-process states are dropped with the object."""
        self._serving[1].close()

    # -- scoring -------------------------------------------------------------------------------------

    def _check_query(self, net, k, items):
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 0:
            raise ValueError(f'k={k!r}: give the number of items to recommend (an integer >= 1, or 0 for none)')
        if items is None:
            return min(int(k), net.n_items), None
        items = list(items)
        if not items:
            raise ValueError('items is empty: give the item ids to rank, or None for all items')
        _check_ids(items, 'items holds')
        items = list(dict.fromkeys(items))  # an id given twice is ranked once
        candidates = net.item_indices(items)
        if (candidates < 0).any():
            unknown = [items[i] for i in np.flatnonzero(candidates < 0)[:5]]
            raise ValueError(f'items holds ids the model does not know, e.g. {unknown}')
        return min(int(k), len(candidates)), candidates

    def _recommendations(self, net, H, has_state, k, candidates, seen):
        """(item ids, scores) of the top k for each row of H (M x L) that has a state."""
        results = [(net.item_ids[:0], np.zeros(0, dtype=FLOAT))] * len(H)
        rows = np.flatnonzero(has_state) if k else []
        if candidates is None and net.index is not None and len(rows):
            return self._indexed_recommendations(net, H, rows, k, seen, results)
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

    def _indexed_recommendations(self, net, H, rows, k, seen, results):
        """The top k of the rows of H (M x L) among the candidates the index proposes, rescored
        exactly: the order and logits among them are the model's (ties by lower item index)."""
        wanted = max(net.index.setting.candidates, k + (self.history if seen is not None else 0))
        found = np.sort(net.index.search(H[rows], wanted), axis=1)  # m x n, -1 (none) first
        valid = found >= 0
        cand = np.where(valid, found, 0)
        logits = np.einsum('mnl,ml->mn', net.Wy[cand], H[rows]) + net.By[cand]  # m x n
        masked = np.where(valid, logits, -np.inf)
        if seen is not None:
            for j, i in enumerate(rows):
                masked[j, np.isin(cand[j], seen[i])] = -np.inf
        top = top_k(masked, k)  # m x k
        selected = np.take_along_axis(masked, top, 1)
        keep = selected > -np.inf
        scores = selected if net.score_kind == 'logit' else numpy_activation(net.final_act)(selected)
        ids = net.item_ids[np.take_along_axis(cand, top, 1)]
        for j, i in enumerate(rows):
            results[i] = (ids[j], scores[j]) if keep[j].all() else (ids[j][keep[j]], scores[j][keep[j]])
        return results
