"""Simple session-based baselines, evaluated by evaluation.evaluate_gpu exactly as GRU4Rec is.

- Pop: global item popularity, the same list for every session.
- SessionPop: items already clicked in the session by how often, ties broken by global popularity.
- ItemKNN: items similar to the session's last item by co-occurrence in training sessions
  (the item-kNN baseline of the GRU4Rec papers).
- MarkovChain: first-order Markov chain, successors of the last item by transition count.
- RandomPred: a random score for every item at every step (the floor every model must clear).
- BPR: session-level BPR-MF (Rendle et al., UAI 2009), the matrix factorisation baseline of the ICLR 2016
  paper's table: sessions are the users in training, and a test session is the mean of the factors of
  its items so far.

Each baseline is fitted on a session log (same format as GRU4Rec's training data) and then exposes the
interface evaluate_gpu scores a model through: `itemidmap`, `state_sizes`, `symbolic_step` and
`compile_function`. Scores are float32 and compiled in GRU4Rec's mode (see backends.compile_function),
so a baseline runs on the same backend as the model it is compared with.

    >>> from baselines import MarkovChain
    >>> from evaluation import evaluate_gpu
    >>> recall, mrr = evaluate_gpu(MarkovChain().fit(train), test, cut_off=[20])

Ties: SessionPop, ItemKNN and MarkovChain rank the items their own score leaves tied (most items:
those not clicked in the session, or not neighbours of the last item) by global popularity. Without
that, evaluate_gpu's default 'standard' tie mode would rank a target that the model knows nothing
about ahead of all its ties, e.g. first of all items after an item that was never followed.
"""
import inspect

import numba
import numpy as np
import pandas as pd
import pytensor
import pytensor.tensor as pt
import scipy.sparse as sp

from backends import check_backend, compile_function
from sessions import FLOAT, session_arrays, validate_log


class Baseline:
    """Common part of the baselines: the item map, item supports and the compile mode.

    Subclasses implement `_fit(items, offsets)` (item indices of all events sorted by session then
    time, and session start offsets) and `_scores(X, H_prev)`, returning the new states and the
    scores of all items.
    """

    def __init__(self, backend='c'):
        self.backend = backend

    def get_params(self):
        """The constructor's parameters and their current values."""
        return {name: getattr(self, name) for name in inspect.signature(type(self)).parameters}

    def _check_params(self):
        check_backend(self.backend)

    def fit(self, data, session_key='SessionId', item_key='ItemId', time_key='Time'):
        """Fits on a session log (a DataFrame with session, item and time columns); returns self."""
        self._check_params()
        data = validate_log(data, session_key, item_key, time_key, what='training data')
        self.itemidmap = pd.Index(pd.unique(data[item_key]))
        items, offsets, _ = session_arrays(data, self.itemidmap, session_key, item_key, time_key,
                                           what='training data')
        self.support = np.bincount(items, minlength=len(self.itemidmap)).astype(FLOAT)
        self._fit(items, offsets)
        return self

    @property
    def n_items(self):
        return len(self.itemidmap)

    @property
    def state_sizes(self):
        """Widths of the per-session states carried between steps. Most baselines look at the last item
        only: they carry one state of width 0 (evaluate_gpu sizes its batch from the states)."""
        return [0]

    def symbolic_step(self, X, H_prev, candidates=None, ranking=False):
        """New states and the scores (M x C) of all items, or of the item indices `candidates`,
        for sessions reading items X (M). (ranking: see GRU4Rec.symbolic_step; no effect here.)"""
        if getattr(self, 'itemidmap', None) is None:
            raise ValueError(f'this {type(self).__name__} is not fitted yet: call fit(data) first')
        H, scores = self._scores(X, H_prev)
        return H, scores if candidates is None else scores[:, candidates]

    def compile_function(self, inputs, outputs, updates=None):
        return compile_function(inputs, outputs, updates, self.backend)


def _popularity_tiebreak(support, scale):
    """Popularity scaled into [0, scale): added to scores that differ by at least `scale` where they
    differ, it orders items only among equal scores."""
    return pytensor.shared((support / (support.max() + 1) * scale).astype(FLOAT), name='tiebreak')


class Pop(Baseline):
    """Most popular items (by number of training events), the same list for every session."""

    def _fit(self, items, offsets):
        self._support = pytensor.shared(self.support, name='support')

    def _scores(self, X, H_prev):
        return H_prev, pt.broadcast_to(self._support[None, :], (X.shape[0], self.n_items))


class SessionPop(Baseline):
    """Items by how often the session clicked them so far; ties (unclicked items included) by global
    popularity. The state is each session's item counts (width n_items)."""

    def _fit(self, items, offsets):
        self._tiebreak = _popularity_tiebreak(self.support, 1.0)

    @property
    def state_sizes(self):
        return [self.n_items]

    def _scores(self, X, H_prev):
        counts = H_prev[0] + pt.eq(X[:, None], pt.arange(self.n_items)[None, :]).astype(FLOAT)  # M x n_items
        return [counts], counts + self._tiebreak[None, :]


class _NeighbourTable(Baseline):
    """Scores from a sparse item x item table: the row of the session's last item, of which only the
    `n_neighbours` largest entries are kept; ties (the items outside them) are broken by popularity.
    Truncation changes no rank within the first n_neighbours, so neither Recall nor MRR at cut-offs up
    to n_neighbours."""

    def _fit(self, items, offsets):
        table = self._table(items, offsets).tocoo()
        table.sum_duplicates()
        keep = table.data > 0
        rows, cols, values = table.row[keep], table.col[keep], table.data[keep]
        order = np.lexsort((cols, -self.support[cols], -values, rows))  # by row, then as ranked when scoring
        rows, cols, values = rows[order], cols[order], values[order]
        row_start = np.searchsorted(rows, np.arange(self.n_items))
        place = np.arange(len(rows)) - row_start[rows]  # rank of the entry within its row
        kept = place < self.n_neighbours
        width = int(place[kept].max()) + 1 if kept.any() else 1
        # Padding points at item 0 with value 0: scattered by addition, it leaves the scores unchanged.
        index = np.zeros((self.n_items, width), dtype=np.int32)
        value = np.zeros((self.n_items, width), dtype=FLOAT)
        index[rows[kept], place[kept]] = cols[kept]
        value[rows[kept], place[kept]] = values[kept]
        self._index = pytensor.shared(index, name='neighbour_index')
        self._value = pytensor.shared(value, name='neighbour_value')
        # The tie-break stays below the smallest gap between stored scores (0 included), so that it only
        # orders equal scores.
        levels = np.unique(np.concatenate([[0], value.ravel()]))
        self._tiebreak = _popularity_tiebreak(self.support, np.diff(levels).min() if len(levels) > 1 else 1.0)

    def neighbours(self, item):
        """The kept entries of `item`'s row (an item id of the training data): a Series of weights indexed
        by item id, in the order they rank."""
        row = self.itemidmap.get_indexer([item])[0]
        if row < 0:
            raise KeyError(f'item {item!r} is not in the training data')
        index, value = self._index.get_value()[row], self._value.get_value()[row]
        return pd.Series(value[value > 0], index=self.itemidmap[index[value > 0]], name='weight')

    def _scores(self, X, H_prev):
        M = X.shape[0]
        flat = (pt.arange(M)[:, None] * self.n_items + self._index[X]).flatten()  # M * width
        scores = pt.inc_subtensor(pt.zeros(M * self.n_items, dtype=FLOAT)[flat], self._value[X].flatten())
        return H_prev, scores.reshape((M, self.n_items)) + self._tiebreak[None, :]


class ItemKNN(_NeighbourTable):
    """Item-to-item kNN over session co-occurrence (the item-kNN baseline of the GRU4Rec papers).

    sim(i, j) = cooc(i, j) / ((supp(i) + lmbd)^alpha * (supp(j) + lmbd)^(1 - alpha)), where cooc(i, j)
    sums count_i * count_j over the training sessions and supp is an item's number of events; lmbd
    damps the similarity of rare items. The n_sims most similar items of each item are kept, and a
    session is scored by the similarities to its last item.
    """

    def __init__(self, n_sims=100, lmbd=20.0, alpha=0.5, backend='c'):
        super().__init__(backend)
        self.n_sims = n_sims
        self.lmbd = lmbd
        self.alpha = alpha

    @property
    def n_neighbours(self):
        return self.n_sims

    def _check_params(self):
        super()._check_params()
        if self.n_sims < 1:
            raise ValueError(f'n_sims={self.n_sims!r}: must be positive')
        if self.lmbd < 0:
            raise ValueError(f'lmbd={self.lmbd!r}: must not be negative')
        if not 0 <= self.alpha <= 1:
            raise ValueError(f'alpha={self.alpha!r}: must be in [0, 1]')

    def _table(self, items, offsets):
        session = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        counts = sp.csr_matrix((np.ones(len(items)), (session, items)), shape=(len(offsets) - 1, self.n_items))
        cooc = (counts.T @ counts).tocoo()
        supp = self.support.astype(np.float64) + self.lmbd  # >= 1: every item has a training event
        sim = cooc.data / (supp[cooc.row] ** self.alpha * supp[cooc.col] ** (1 - self.alpha))
        sim[cooc.row == cooc.col] = 0
        return sp.coo_matrix((sim, (cooc.row, cooc.col)), shape=cooc.shape)


class MarkovChain(_NeighbourTable):
    """First-order Markov chain: items by how often they followed the session's last item in the
    training sessions. The n_successors most frequent successors of each item are kept."""

    def __init__(self, n_successors=100, backend='c'):
        super().__init__(backend)
        self.n_successors = n_successors

    @property
    def n_neighbours(self):
        return self.n_successors

    def _check_params(self):
        super()._check_params()
        if self.n_successors < 1:
            raise ValueError(f'n_successors={self.n_successors!r}: must be positive')

    def _table(self, items, offsets):
        follows = np.ones(len(items), dtype=bool)
        follows[offsets[:-1]] = False  # a session's first event follows nothing
        source, target = items[np.flatnonzero(follows) - 1], items[follows]
        return sp.coo_matrix((np.ones(len(target)), (source, target)), shape=(self.n_items, self.n_items))


class RandomPred(Baseline):
    """Scores every item by a uniform random number, drawn afresh at every step (the original's
    RandomPred): Recall@k is k / n_items in expectation. seed: the first draw's state; each compiled
    evaluation draws on from it. symbolic_step leaves the update of its random generator in
    `random_updates`, which a compiled function must apply (evaluate_gpu does)."""

    def __init__(self, seed=42, backend='c'):
        super().__init__(backend)
        self.seed = seed

    def _fit(self, items, offsets):
        pass

    def _scores(self, X, H_prev):
        rng = pt.random.shared_rng(seed=int(self.seed))
        next_rng, scores = rng.uniform(0, 1, size=(X.shape[0], self.n_items))  # M x n_items
        self.random_updates = {rng: next_rng}
        return H_prev, scores.astype(FLOAT)


@numba.njit(cache=True)
def bpr_sgd(U, V, sessions, positives, negatives, learning_rate, lambda_session, lambda_item):
    """SGD on BPR's log-likelihood (Rendle et al., UAI 2009), one triple after the other, in place:
    for session u, clicked item p and sampled item n, with x = <U_u, V_p> - <U_u, V_n>, c = 1 - sigmoid(x)
    (the derivative of ln sigmoid(x)) and the factors of before the step on the right-hand sides,
        U_u += lr (c (V_p - V_n) - lambda_session U_u)
        V_p += lr (c U_u - lambda_item V_p),   V_n += lr (-c U_u - lambda_item V_n).
    U: sessions x F, V: items x F (float64). Returns the sum of ln sigmoid(x) over the triples."""
    total = 0.0
    for t in range(len(sessions)):
        u, p, n = sessions[t], positives[t], negatives[t]
        uf, pf, nf = U[u].copy(), V[p].copy(), V[n].copy()
        x = np.dot(uf, pf) - np.dot(uf, nf)
        sigmoid = 1.0 / (1.0 + np.exp(-x))
        c = 1.0 - sigmoid
        U[u] += learning_rate * (c * (pf - nf) - lambda_session * uf)
        V[p] += learning_rate * (c * uf - lambda_item * pf)
        V[n] += learning_rate * (-c * uf - lambda_item * nf)
        total += np.log(sigmoid)
    return total


class BPR(Baseline):
    """Session-level BPR-MF, as the original's baselines.BPR (the BPR-MF row of the ICLR 2016 paper).

    Training: every training session is a user with factors U_s, every item has factors V_i (n_factors
    each, drawn uniformly from [-sigma, sigma], or N(0, sigma^2) with init_normal); n_iterations passes
    over the training events in random order, each an SGD step (bpr_sgd) on the event's session, its item
    and an item drawn uniformly as the negative. Prediction: a test session's vector is the mean of the
    item factors of its items so far, and item i scores <mean, V_i>. The state carried along a session is
    the sum of those factors and their count. The original's item biases start at zero and are never
    updated, so they are left out; its negatives are drawn from a fixed subset (see docs/differences.md).
    The defaults are the original's. item_factors_ and session_factors_ are the learned factors (float64).
    """

    def __init__(self, n_factors=100, n_iterations=10, learning_rate=0.01, lambda_session=0.0, lambda_item=0.0,
                 sigma=0.05, init_normal=False, seed=42, backend='c'):
        super().__init__(backend)
        self.n_factors = n_factors
        self.n_iterations = n_iterations
        self.learning_rate = learning_rate
        self.lambda_session = lambda_session
        self.lambda_item = lambda_item
        self.sigma = sigma
        self.init_normal = init_normal
        self.seed = seed

    def _check_params(self):
        super()._check_params()
        for name in ('n_factors', 'n_iterations'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name}={getattr(self, name)!r}: must be positive')
        for name in ('learning_rate', 'lambda_session', 'lambda_item', 'sigma'):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f'{name}={value!r}: must be a finite number >= 0')

    @property
    def state_sizes(self):
        return [self.n_factors, 1]  # the sum of the session's item factors, and their count

    def _init_factors(self, rng, rows):
        if self.init_normal:
            return rng.standard_normal((rows, self.n_factors)) * self.sigma
        return rng.uniform(-self.sigma, self.sigma, (rows, self.n_factors))

    def _fit(self, items, offsets):
        rng = np.random.default_rng(self.seed)
        n_sessions = len(offsets) - 1
        sessions = np.repeat(np.arange(n_sessions), np.diff(offsets))  # the session of every event
        self.session_factors_ = self._init_factors(rng, n_sessions)
        self.item_factors_ = self._init_factors(rng, self.n_items)
        self.log_likelihood_ = []  # mean ln sigmoid(x) of each pass, as the original printed
        for _ in range(int(self.n_iterations)):
            order = rng.permutation(len(items))
            negatives = rng.integers(0, self.n_items, len(items))
            total = bpr_sgd(self.session_factors_, self.item_factors_, sessions[order], items[order], negatives,
                            float(self.learning_rate), float(self.lambda_session), float(self.lambda_item))
            self.log_likelihood_.append(total / len(items))
        self._V = pytensor.shared(self.item_factors_.astype(FLOAT), name='item_factors')

    def _scores(self, X, H_prev):
        total = H_prev[0] + self._V[X]  # M x F
        count = H_prev[1] + 1  # M x 1
        return [total, count], pt.dot(total / count, self._V.T)  # M x n_items


BASELINES = {'pop': Pop, 'spop': SessionPop, 'itemknn': ItemKNN, 'markov': MarkovChain, 'random': RandomPred,
             'bpr': BPR}


def make_baseline(name, **params):
    """A baseline by name (a key of BASELINES), with parameters given as values or as command-line
    strings ('20', '0.5'), each read as the type of the parameter's default."""
    if name not in BASELINES:
        raise ValueError(f'unknown baseline {name!r}; use one of {sorted(BASELINES)}')
    cls = BASELINES[name]
    defaults = {n: p.default for n, p in inspect.signature(cls).parameters.items()}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f'unknown parameter(s) {unknown} for baseline {name!r}; it takes {sorted(defaults)}')
    parsed = {}
    for key, value in params.items():
        if isinstance(defaults[key], bool) and isinstance(value, str):
            if value not in ('True', 'False'):
                raise ValueError(f'{name} parameter {key}={value!r}: expected True or False')
            parsed[key] = value == 'True'
            continue
        try:
            parsed[key] = type(defaults[key])(value)
        except (TypeError, ValueError):
            raise ValueError(f'{name} parameter {key}={value!r}: expected a {type(defaults[key]).__name__}') from None
    return cls(**parsed)
