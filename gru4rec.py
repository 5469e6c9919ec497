"""GRU4Rec: session-based recommendations with recurrent neural networks, on PyTensor.

A GRU reads the items clicked so far in a session and scores every item as the next click.

References:
1) B. Hidasi, A. Karatzoglou, L. Baltrunas, D. Tikk: "Session-based Recommendations with Recurrent
   Neural Networks", ICLR 2016, arXiv:1511.06939. (GRU over session-parallel mini-batches, TOP1 and
   BPR losses, in-batch negatives.)
2) B. Hidasi, A. Karatzoglou: "Recurrent Neural Networks with Top-k Gains for Session-based
   Recommendations", CIKM 2018, arXiv:1706.03847. (Extra shared negative samples drawn by
   popularity^alpha, BPR-max and TOP1-max, constrained embedding.)

The original implementation was written for Theano, which no longer runs on current Python; this one
builds the same symbolic graphs with PyTensor, Theano's maintained continuation. Notation follows the
papers: X are the input items of a mini-batch, Y = [targets | samples] the scored items,
M the number of active sessions in the mini-batch and N = M + n_sample the number of scored items.
"""
import math
import sys
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pandas as pd
import pytensor
import pytensor.tensor as pt
from pytensor.compile.mode import get_mode
from pytensor.gradient import disconnected_grad
from tqdm import tqdm

import cbackend
import modelfile

FLOAT = 'float32'
BACKENDS = {'c': 'CVM', 'numba': 'NUMBA', 'jax': 'JAX'}


# ---------------------------------------------------------------------------------------------------
# Activations: name -> function of a symbolic tensor. 'elu-0.5' means elu with alpha 0.5.

def _linear(x):
    return x


def _relu(x):
    return pt.maximum(x, 0)


def _leaky(alpha):
    return lambda x: pt.switch(x >= 0, x, alpha * x)


def _elu(alpha):
    return lambda x: _positive_part(x) + np.float32(alpha) * pt.expm1(_negative_part(x))


def _selu(scale, alpha):
    return lambda x: np.float32(scale) * _elu(alpha)(x)


def _positive_part(x):
    """max(x, 0), and _negative_part min(x, 0), written with |x|: their gradients, (1 ± sign(x)) / 2, need
    no boolean mask. A boolean array passed between the fused loops of an ELU and its gradient kept the
    C backend from vectorising the loops around exp (a third of a BPR-max step)."""
    return (x + abs(x)) * np.float32(0.5)


def _negative_part(x):
    return (x - abs(x)) * np.float32(0.5)


def _row_max(x):
    """Row maxima to subtract before exp so that it cannot overflow. The results do not depend on the
    shift, so no gradient flows through it (autodiff would spend a pass and a reduction on a zero)."""
    return disconnected_grad(x.max(axis=1, keepdims=True))


def _softmax(x):
    return pt.special.softmax(x, axis=1)  # one op, whose gradient reuses its output


ACTIVATIONS = {'linear': _linear, 'relu': _relu, 'tanh': pt.tanh, 'sigmoid': pt.sigmoid}
PARAMETRIC_ACTIVATIONS = {'leaky': (1, _leaky), 'elu': (1, _elu), 'selu': (2, _selu)}
FINAL_ONLY_ACTIVATIONS = {'softmax': _softmax, 'softmax_logit': _linear}


def parse_activation(name, final=False):
    """Returns the activation function for a name like 'tanh', 'elu-0.5' or 'selu-1.05-1.67'."""
    if not isinstance(name, str):
        raise ValueError(f'activation must be a string, got {name!r}')
    table = dict(ACTIVATIONS, **FINAL_ONLY_ACTIVATIONS) if final else ACTIVATIONS
    if name in table:
        return table[name]
    head, *args = name.split('-')
    if head in PARAMETRIC_ACTIVATIONS:
        n_args, make = PARAMETRIC_ACTIVATIONS[head]
        try:
            values = [float(a) for a in args]
        except ValueError:
            values = []
        if len(values) == n_args:
            return make(*values)
    allowed = sorted(table) + ['leaky-X', 'elu-X', 'selu-X-Y']
    raise ValueError(f'unknown activation {name!r}; use one of {allowed}')


def is_strictly_increasing(name):
    """Whether the activation (a valid name) keeps the order of the scores, row by row for softmax."""
    head, *args = name.split('-')
    if head in PARAMETRIC_ACTIVATIONS:
        return all(float(a) > 0 for a in args)
    return head != 'relu'  # relu ties every negative score at zero


# ---------------------------------------------------------------------------------------------------
# Losses over the score matrix Yhat (M x N, after the final activation). Row i's target is column i;
# the other columns are the other rows' targets and the shared samples. Each returns the per-row loss
# (a vector of M); the caller sums it and divides by the configured batch size. `cols` (N, 1 or 0)
# marks the scored columns when the batch is padded to a fixed size (see GRU4Rec._compile_train);
# None means all columns count.

def _diag(Yhat):
    M = Yhat.shape[0]
    return Yhat[pt.arange(M), pt.arange(M)]  # M


def _row_sum(A, cols):
    return (A if cols is None else A * cols).sum(axis=1)


def _n_cols(Yhat, cols):
    return Yhat.shape[1].astype(FLOAT) if cols is None else cols.sum()


def _softmax_negatives(Yhat, cols):
    """Softmax over each row's negatives only (the target column gets weight 0), as in BPR-max.

    The shift before exp is the maximum over the negatives alone, as in the original: with the target
    included, a target scored far above every negative made all of exp underflow to 0 (0 / 0 = NaN).
    The target's own exp is taken of 0 instead, so that it cannot overflow before its weight 0 applies."""
    negatives = pt.neq(pt.arange(Yhat.shape[0])[:, None], pt.arange(Yhat.shape[1])[None, :])  # M x N
    if cols is not None:
        negatives = negatives * cols
    lowest = np.finfo(FLOAT).min
    shift = disconnected_grad(pt.switch(negatives, Yhat, lowest).max(axis=1, keepdims=True))  # M x 1
    e = pt.exp(pt.switch(negatives, Yhat - shift, 0)) * negatives  # M x N
    return e / e.sum(axis=1, keepdims=True)


def _smoothed(nll, nll_sum, N, smoothing):
    """Label smoothing: weight 1 - smoothing on the target, smoothing / (N - 1) on every other column."""
    if smoothing == 0:
        return nll
    return (1 - smoothing * N / (N - 1)) * nll + smoothing / (N - 1) * nll_sum


def loss_cross_entropy(Yhat, smoothing=0.0, cols=None, **_):
    """-log softmax probability of the target (Yhat holds probabilities), with label smoothing."""
    nll = -pt.log(_diag(Yhat) + 1e-24)
    if smoothing == 0:
        return nll
    return _smoothed(nll, _row_sum(-pt.log(Yhat + 1e-24), cols), _n_cols(Yhat, cols), smoothing)


def loss_xe_logit(Yhat, smoothing=0.0, cols=None, **_):
    """Cross-entropy computed stably from logits (use with final_act='softmax_logit')."""
    m = _row_max(Yhat)
    logsumexp = m[:, 0] + pt.log(_row_sum(pt.exp(Yhat - m), cols))
    nll = logsumexp - _diag(Yhat)
    if smoothing == 0:
        return nll
    N = _n_cols(Yhat, cols)
    return _smoothed(nll, N * logsumexp - _row_sum(Yhat, cols), N, smoothing)


def loss_bpr(Yhat, cols=None, **_):
    """BPR (ICLR 2016): -sum_j log sigmoid(d - yhat_j) over all N columns."""
    return _row_sum(-pt.log(pt.sigmoid(_diag(Yhat)[:, None] - Yhat)), cols)


def loss_top1(Yhat, cols=None, **_):
    """TOP1 (ICLR 2016): mean_j(sigmoid(yhat_j - d) + sigmoid(yhat_j^2)) - sigmoid(d^2)/N."""
    d = _diag(Yhat)
    N = _n_cols(Yhat, cols)
    return (_row_sum(pt.sigmoid(Yhat - d[:, None]) + pt.sigmoid(Yhat ** 2), cols) - pt.sigmoid(d ** 2)) / N


def loss_bpr_max(Yhat, bpreg=1.0, cols=None, **_):
    """BPR-max (CIKM 2018): -log sum_j s_j sigmoid(d - yhat_j) + bpreg sum_j s_j yhat_j^2."""
    s = _softmax_negatives(Yhat, cols)  # M x N
    d = _diag(Yhat)
    return -pt.log((s * pt.sigmoid(d[:, None] - Yhat)).sum(axis=1) + 1e-24) + bpreg * (s * Yhat ** 2).sum(axis=1)


def loss_top1_max(Yhat, cols=None, **_):
    """TOP1-max (CIKM 2018): sum_j s_j (sigmoid(yhat_j - d) + sigmoid(yhat_j^2))."""
    s = _softmax_negatives(Yhat, cols)  # M x N
    d = _diag(Yhat)
    return (s * (pt.sigmoid(Yhat - d[:, None]) + pt.sigmoid(Yhat ** 2))).sum(axis=1)


LOSSES = {'cross-entropy': loss_cross_entropy, 'xe_logit': loss_xe_logit, 'bpr': loss_bpr,
          'top1': loss_top1, 'bpr-max': loss_bpr_max, 'top1-max': loss_top1_max}
REQUIRED_FINAL_ACT = {'cross-entropy': 'softmax', 'xe_logit': 'softmax_logit'}


# ---------------------------------------------------------------------------------------------------
# Session-parallel mini-batches (ICLR 2016, section 3.1.1), as a plain numpy generator.

def session_parallel_batches(items, offsets, session_order, batch_size, min_slots=1):
    """Yields (inputs, targets, prev_rows, keep) for every step of one epoch.

    items: item indices of all events, sorted by session then time; offsets: start of each session in
    `items` (length n_sessions + 1); session_order: the order in which sessions enter the slots.
    Each of the M active slots feeds its session's current item (inputs) and is trained to predict
    the next one (targets). Row i of the previous step's hidden state to carry into slot i is
    prev_rows[i]; keep[i] is 0 where slot i took a new session (its state is reset to zero).
    When no unused session is left, finished slots are dropped and the batch shrinks; the epoch ends
    when fewer than `min_slots` slots remain.
    """
    n_sessions = len(session_order)
    n_slots = min(batch_size, n_sessions)
    slot_session = np.arange(n_slots)  # position in session_order of each slot's session
    next_session = n_slots
    start = offsets[session_order[slot_session]]
    end = offsets[session_order[slot_session] + 1]
    prev_rows = np.zeros(n_slots, dtype=np.int32)  # any existing row: keep = 0 zeroes the state
    keep = np.zeros(n_slots, dtype=FLOAT)
    while len(slot_session) >= min_slots:
        steps = (end - start).min() - 1
        for i in range(steps):
            yield items[start + i], items[start + i + 1], prev_rows, keep
            if i == 0:
                prev_rows, keep = np.arange(len(start), dtype=np.int32), np.ones(len(start), dtype=FLOAT)
        start = start + steps
        finished = end - start <= 1
        n_finished = int(finished.sum())
        n_new = min(n_finished, n_sessions - next_session)
        refill = np.flatnonzero(finished)[:n_new]
        alive = ~finished
        alive[refill] = True
        slot_session[refill] = np.arange(next_session, next_session + n_new)
        next_session += n_new
        start[refill] = offsets[session_order[slot_session[refill]]]
        end[refill] = offsets[session_order[slot_session[refill]] + 1]
        # Composed with the mapping still pending when no step ran (a slot held a one-event session).
        keep = keep.copy()
        keep[refill] = 0
        prev_rows, keep = prev_rows[alive], keep[alive]
        slot_session, start, end = slot_session[alive], start[alive], end[alive]


# ---------------------------------------------------------------------------------------------------

def compile_function(inputs, outputs, updates=None, backend='c'):
    """pytensor.function in the compile mode of `backend` (a key of BACKENDS); GRU4Rec and the
    baselines compile every graph through it."""
    if backend == 'c':
        with pytensor.config.change_flags(**cbackend.compile_flags()):
            return pytensor.function(inputs, outputs, updates=updates, mode=cbackend.c_mode(),
                                     on_unused_input='ignore')
    return pytensor.function(inputs, outputs, updates=updates, mode=get_mode(BACKENDS[backend]),
                             on_unused_input='ignore')


# ---------------------------------------------------------------------------------------------------

def _as_bool(value):
    if isinstance(value, str):
        if value.strip().lower() in ('true', '1', 'yes'):
            return True
        if value.strip().lower() in ('false', '0', 'no'):
            return False
        raise ValueError(f'cannot read {value!r} as a boolean; use True/False or 1/0')
    return bool(value)


def _as_int_list(value):
    if isinstance(value, str):
        return [int(v) for v in value.split('/') if v.strip()]
    if isinstance(value, (int, np.integer)):
        return [int(value)]
    return [int(v) for v in value]


def _as_float_list(value):
    if isinstance(value, str):
        return [float(v) for v in value.split('/') if v.strip()]
    if isinstance(value, (int, float, np.number)):
        return [float(value)]
    return [float(v) for v in value]


def _as_embedding(value):
    if isinstance(value, str) and value.strip() == 'layersize':
        return 'layersize'
    return int(value)


def _as_adapt(value):
    if value is None or (isinstance(value, str) and value.strip().lower() in ('none', '', 'false', 'sgd')):
        return None
    return str(value)


def _as_str(value):
    return str(value)


# name -> (default, parser). The names and defaults are the original implementation's.
HYPERPARAMETERS = OrderedDict([
    ('loss', ('bpr-max', _as_str)), ('final_act', ('linear', _as_str)), ('hidden_act', ('tanh', _as_str)),
    ('layers', ([100], _as_int_list)), ('n_epochs', (10, int)), ('batch_size', (32, int)),
    ('dropout_p_hidden', (0.0, float)), ('dropout_p_embed', (0.0, float)), ('learning_rate', (0.1, float)),
    ('momentum', (0.0, float)), ('lmbd', (0.0, float)), ('embedding', (0, _as_embedding)),
    ('n_sample', (2048, int)), ('sample_alpha', (0.75, float)), ('smoothing', (0.0, float)),
    ('constrained_embedding', (False, _as_bool)), ('adapt', ('adagrad', _as_adapt)),
    ('adapt_params', ([], _as_float_list)), ('grad_cap', (0.0, float)), ('bpreg', (1.0, float)),
    ('logq', (0.0, float)), ('sigma', (0.0, float)), ('init_as_normal', (False, _as_bool)),
    ('train_random_order', (False, _as_bool)), ('time_sort', (True, _as_bool)),
    ('session_key', ('SessionId', _as_str)), ('item_key', ('ItemId', _as_str)), ('time_key', ('Time', _as_str)),
    ('seed', (42, int)), ('backend', ('c', _as_str)), ('verbose', (True, _as_bool)),
    ('reset_after', (False, _as_bool)),  # not in the original: its cell is reset_after=False
])
# Changing these changes the model's parameters or what they mean: they are fixed once a model is trained.
ARCHITECTURE = ('layers', 'embedding', 'constrained_embedding', 'reset_after')
ADAPT_DEFAULTS = {None: [], 'adagrad': [], 'rmsprop': [0.9], 'adadelta': [0.95], 'adam': [0.9, 0.999]}


def _check_hyperparameters(p):
    def fail(name, what):
        raise ValueError(f'{name}={p[name]!r}: {what}')
    if p['loss'] not in LOSSES:
        fail('loss', f'unknown loss; use one of {sorted(LOSSES)}')
    parse_activation(p['final_act'], final=True)
    parse_activation(p['hidden_act'])
    required = REQUIRED_FINAL_ACT.get(p['loss'])
    if required and p['final_act'] != required:
        fail('final_act', f"loss {p['loss']!r} needs final_act={required!r}")
    if p['final_act'] in REQUIRED_FINAL_ACT.values() and p['loss'] not in REQUIRED_FINAL_ACT:
        fail('final_act', "softmax final activations go with loss='cross-entropy' or 'xe_logit'")
    if not p['layers'] or min(p['layers']) <= 0:
        fail('layers', 'give one positive size per GRU layer, e.g. [100] or "200/200"')
    for name in ('n_epochs', 'batch_size'):
        if p[name] <= 0:
            fail(name, 'must be positive')
    if p['n_sample'] < 0:
        fail('n_sample', 'must not be negative')
    if p['n_sample'] == 0 and p['batch_size'] < 2:
        fail('batch_size', 'with n_sample=0 the other sessions of the mini-batch are the only negatives: use >= 2')
    for name in ('learning_rate', 'momentum', 'lmbd', 'grad_cap', 'bpreg', 'logq', 'sigma', 'sample_alpha'):
        if p[name] < 0 or not np.isfinite(p[name]):
            fail(name, 'must be a finite number >= 0')
    for name in ('dropout_p_hidden', 'dropout_p_embed', 'smoothing'):
        if not 0 <= p[name] < 1:
            fail(name, 'must be in [0, 1)')
    if p['embedding'] != 'layersize' and p['embedding'] < 0:
        fail('embedding', "must be 0 (none), a positive size or 'layersize'")
    if p['adapt'] not in ADAPT_DEFAULTS:
        fail('adapt', f"unknown optimiser; use one of {[k for k in ADAPT_DEFAULTS if k]} or None")
    if p['adapt_params'] and len(p['adapt_params']) != len(ADAPT_DEFAULTS[p['adapt']]):
        fail('adapt_params', f"{p['adapt']} takes {len(ADAPT_DEFAULTS[p['adapt']])} values")
    if p['backend'] not in BACKENDS:
        fail('backend', f'use one of {sorted(BACKENDS)}')


class GRU4Rec:
    """GRU4Rec model (see the module docstring). Construct with hyper-parameters, then `fit`.

    Hyper-parameters (names and defaults of the original implementation):
    loss: 'cross-entropy' (with final_act='softmax'), 'xe_logit' (with 'softmax_logit'), 'bpr',
        'top1', 'bpr-max', 'top1-max'.
    final_act, hidden_act: 'linear', 'relu', 'tanh', 'leaky-X', 'elu-X', 'selu-X-Y'
        (final_act also 'softmax', 'softmax_logit').
    layers: GRU layer sizes, e.g. [100] or '200/200'.
    embedding: 0 (the first layer reads one-hot items through an n_items x 3L matrix), K or
        'layersize' (a separate K-dimensional item embedding); constrained_embedding=True uses the
        output weights Wy as the input embedding.
    n_sample, sample_alpha: extra negatives per step, drawn by support^sample_alpha.
    adapt: 'adagrad', 'rmsprop', 'adadelta', 'adam' or None (SGD); adapt_params: decay or betas.
    logq: weight of the logQ correction of sampled softmax (with cross-entropy).
    seed: seeds initialisation, sampling, dropout and session order: same seed and data, same model.
    backend: how PyTensor compiles the graphs: 'c' (C virtual machine), 'numba' or 'jax'.
    reset_after (not in the original): False is the original's GRU cell, the reset gate applied to the
        previous state before the recurrent product; True applies it after, with a hidden-side
        candidate bias, as cuDNN and torch.nn.GRUCell do (see _gru).
    """

    def __init__(self, loss='bpr-max', final_act='linear', hidden_act='tanh', layers=[100], n_epochs=10,
                 batch_size=32, dropout_p_hidden=0.0, dropout_p_embed=0.0, learning_rate=0.1, momentum=0.0,
                 lmbd=0.0, embedding=0, n_sample=2048, sample_alpha=0.75, smoothing=0.0,
                 constrained_embedding=False, adapt='adagrad', adapt_params=[], grad_cap=0.0, bpreg=1.0,
                 logq=0.0, sigma=0.0, init_as_normal=False, train_random_order=False, time_sort=True,
                 session_key='SessionId', item_key='ItemId', time_key='Time', seed=42, backend='c',
                 verbose=True, reset_after=False):
        self.loss = loss
        self.final_act = final_act
        self.hidden_act = hidden_act
        self.layers = layers
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.dropout_p_hidden = dropout_p_hidden
        self.dropout_p_embed = dropout_p_embed
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.lmbd = lmbd
        self.embedding = embedding
        self.n_sample = n_sample
        self.sample_alpha = sample_alpha
        self.smoothing = smoothing
        self.constrained_embedding = constrained_embedding
        self.adapt = adapt
        self.adapt_params = adapt_params
        self.grad_cap = grad_cap
        self.bpreg = bpreg
        self.logq = logq
        self.sigma = sigma
        self.init_as_normal = init_as_normal
        self.train_random_order = train_random_order
        self.time_sort = time_sort
        self.session_key = session_key
        self.item_key = item_key
        self.time_key = time_key
        self.seed = seed
        self.backend = backend
        self.verbose = verbose
        self.reset_after = reset_after

    # -- hyper-parameters ----------------------------------------------------------------------------

    def get_params(self):
        return {name: getattr(self, name) for name in HYPERPARAMETERS}

    def _parsed_params(self, **overrides):
        """All hyper-parameters parsed and validated (strings from a command line are accepted)."""
        unknown = sorted(set(overrides) - set(HYPERPARAMETERS))
        if unknown:
            raise ValueError(f'unknown hyper-parameter(s) {unknown}; known ones: {list(HYPERPARAMETERS)}')
        raw = dict(self.get_params(), **overrides)
        parsed = {}
        for name, (_, parse) in HYPERPARAMETERS.items():
            try:
                parsed[name] = parse(raw[name])
            except (TypeError, ValueError) as e:
                raise ValueError(f'hyper-parameter {name}={raw[name]!r} cannot be read: {e}') from None
        _check_hyperparameters(parsed)
        return parsed

    def set_params(self, **kwargs):
        """Sets hyper-parameters, given as values or as command-line strings ('200/200', 'True', '0.1')."""
        parsed = self._parsed_params(**kwargs)
        if getattr(self, 'itemidmap', None) is not None:
            changed = [n for n in ARCHITECTURE if n in kwargs and parsed[n] != getattr(self, n)]
            if changed:
                raise ValueError(f'{changed} change the shape of a trained model; build a new GRU4Rec instead')
        for name in kwargs:
            setattr(self, name, parsed[name])
        if self._compiled_for is not None and self._compiled_for != self._graph_key():
            self._compiled_for = None
        self._pred_sessions = None  # the sessions of predict_next_batch start again
        return self

    _compiled_for = None
    _pred_sessions = None  # the session id of each predict_next_batch slot (None: all start afresh)
    itemidmap = None

    def _graph_key(self):
        p = self._parsed_params()
        shape = (('n_items', self.n_items),)  # the graphs have static shapes
        return tuple((k, str(p[k])) for k in HYPERPARAMETERS if k not in ('n_epochs', 'verbose')) + shape

    @property
    def n_items(self):
        return len(self.itemidmap)

    @property
    def embedding_size(self):
        p = self._parsed_params()
        if p['constrained_embedding']:
            return 0
        return p['layers'][0] if p['embedding'] == 'layersize' else p['embedding']

    # -- parameters ----------------------------------------------------------------------------------

    def _init_matrix(self, rng, rows, cols, n_blocks=1, fan_rows=None):
        """Uniform in [-s, s] with s = sqrt(6 / (fan_rows + cols)) per block (or N(0, s)); `sigma` overrides
        s. fan_rows defaults to rows; more when the rows extend a matrix (new items on retraining)."""
        blocks = []
        for _ in range(n_blocks):
            s = self.sigma if self.sigma else np.sqrt(6.0 / ((fan_rows or rows) + cols))
            if self.init_as_normal:
                blocks.append(rng.normal(0, s, size=(rows, cols)))
            else:
                blocks.append(rng.uniform(-s, s, size=(rows, cols)))
        return np.hstack(blocks).astype(FLOAT)

    def _init_item_rows(self, rng, n_rows, n_items=None):
        """Fresh rows of the item-indexed parameters, scaled for matrices of n_items rows (default n_rows).
        New items on retraining get the scale of the grown matrix, as the original's extend_weights
        (on the retraining benchmark, better for the new items than the scale of their rows alone)."""
        p = self._parsed_params()
        L0, L_last = p['layers'][0], p['layers'][-1]
        fan = n_items or n_rows
        rows = {'Wy': self._init_matrix(rng, n_rows, L_last, fan_rows=fan), 'By': np.zeros(n_rows, dtype=FLOAT)}
        if self.embedding_size:
            rows['E'] = self._init_matrix(rng, n_rows, self.embedding_size, fan_rows=fan)
        elif not p['constrained_embedding']:
            rows['Wx0'] = self._init_matrix(rng, n_rows, L0, 3, fan_rows=fan)
        return rows

    def _init_weights(self, rng):
        p = self._parsed_params()
        layers = p['layers']
        weights = self._init_item_rows(rng, self.n_items)
        for l, L in enumerate(layers):
            if l > 0 or 'Wx0' not in weights:
                n_in = layers[l - 1] if l > 0 else (self.embedding_size or layers[-1])
                weights[f'Wx{l}'] = self._init_matrix(rng, n_in, L, 3)
            weights[f'Wrz{l}'] = self._init_matrix(rng, L, L, 2)
            weights[f'Wh{l}'] = self._init_matrix(rng, L, L)
            weights[f'Bh{l}'] = np.zeros(3 * L, dtype=FLOAT)
            if p['reset_after']:
                weights[f'Bhc{l}'] = np.zeros(L, dtype=FLOAT)
        return weights

    # -- the network ---------------------------------------------------------------------------------

    def _dropout(self, x, p):
        """Inverted dropout: x times a mask of 0 (probability p) and 1 / (1 - p). The masks are inputs of
        the training step, drawn by numpy from the model's seed (see _step_inputs): as fast as a random op
        in the graph on the C backend, reproducible on every backend, and a plain product keeps the
        fused element-wise loop around it vectorised (a comparison inside it did not)."""
        if p == 0:
            return x
        mask = pt.tensor(f'dropout_mask{len(self._dropout_masks)}', dtype=FLOAT, shape=x.type.shape)
        self._dropout_masks.append((mask, p))
        return x * mask

    def _gru(self, l, x_proj, h):
        """One GRU step of layer l. x_proj = x·Wx + Bh (M x 3L: the r, z, c blocks), h the previous
        state (M x L). r = σ(x·Wr + h·Ur), z = σ(x·Wz + h·Uz), h' = (1-z)*h + z*c, and the candidate
        c = act(x·Wc + (r*h)·Uh)          reset before the recurrent product (the original's cell), or
        c = act(x·Wc + r*(h·Uh + bhc))    reset after it (reset_after=True; Bhc holds bhc).
        The second is the cell of cuDNN (CUDNN_GRU in cudnnRNNMode_t) and of torch.nn.GRUCell, whose
        n = tanh(W_in x + b_in + r*(W_hn h + b_hn)) it is with W_in x + b_in = x·Wc + bc and
        b_hn = bhc. Its hidden-side bias is a parameter of its own: r scales it, so unlike the
        hidden-side biases of r and z it cannot be folded into Bh."""
        L = self.layers_[l]
        rz = pt.sigmoid(x_proj[:, :2 * L] + pt.dot(h, self.params[f'Wrz{l}']))  # M x 2L
        r, z = rz[:, :L], rz[:, L:]
        if self._parsed_params()['reset_after']:
            recurrent = r * (pt.dot(h, self.params[f'Wh{l}']) + self.params[f'Bhc{l}'])  # M x L
        else:
            recurrent = pt.dot(r * h, self.params[f'Wh{l}'])  # M x L
        c = self._hidden_act(x_proj[:, 2 * L:] + recurrent)  # M x L
        return (1 - z) * h + z * c

    def _forward(self, X, H_prev, training, item_rows=None):
        """Hidden states after reading items X (M) from states H_prev (list of M x L).
        item_rows, when given, holds rows already gathered for X (the sparse training path)."""
        p_embed = self.dropout_p_embed if training else 0.0
        p_hidden = self.dropout_p_hidden if training else 0.0
        rows = item_rows if item_rows is not None else {}
        if self._onehot_input:
            x_proj = rows.get('Wx0', self.params['Wx0'][X]) + self.params['Bh0']  # M x 3L
        else:
            table = 'E' if 'E' in self.params else 'Wy'
            x = self._dropout(rows.get(table, self.params[table][X]), p_embed)  # M x K
            x_proj = pt.dot(x, self.params['Wx0']) + self.params['Bh0']  # M x 3L
        H = []
        for l in range(len(self.layers_)):
            if l > 0:
                x_proj = pt.dot(H[-1], self.params[f'Wx{l}']) + self.params[f'Bh{l}']
            H.append(self._dropout(self._gru(l, x_proj, H_prev[l]), p_hidden))
        return H  # list of M x L

    @staticmethod
    def _output(h, Wy, By):
        """Scores of the items whose output rows are Wy, By: o = h·Wyᵀ + By (M x number of rows)."""
        return pt.dot(h, Wy.T) + By

    # The interface that evaluation.py scores a model through (the baselines implement it too).

    @property
    def state_sizes(self):
        """Widths of the per-session states carried between steps (one per GRU layer)."""
        self._require_trained()
        return list(self.layers_)

    def symbolic_step(self, X, H_prev, candidates=None, ranking=False):
        """One step of the trained network: the new states and the final scores of all items (or of
        the item indices `candidates`) for sessions reading items X (M). Scores: M x C.
        ranking=True: scores in the same order are enough, so a strictly increasing final activation
        (all but relu) is skipped; this also avoids ties that only float32 rounding of the activation
        makes (e.g. softmax probabilities that underflow to 0). Otherwise final_act='softmax_logit'
        gives the softmax of the scores, as the original's prediction did (it trains on the logits)."""
        self._require_trained()
        H = self._forward(X, H_prev, training=False)
        Wy, By = self.params['Wy'][:self.n_items], self.params['By'][:self.n_items]
        if candidates is not None:
            Wy, By = Wy[candidates], By[candidates]
        scores = self._output(H[-1], Wy, By)
        if ranking and is_strictly_increasing(self.final_act):
            return H, scores
        if self.final_act == 'softmax_logit':
            return H, _softmax(scores)
        return H, self._final_act(scores)

    # -- the training graph --------------------------------------------------------------------------

    def _build(self):
        """Creates the shared variables from self.weights and compiles the training step.

        Every graph has static shapes (the JAX backend needs them): the mini-batch always has
        batch_size rows, and the item-indexed parameters one extra row, after the n_items real ones,
        that padded rows read and write."""
        self.layers_ = self._parsed_params()['layers']
        self._onehot_input = not self.constrained_embedding and not self.embedding_size
        self._item_params = [n for n in ('E', 'Wx0', 'Wy', 'By') if n in self.weights
                             and (n != 'Wx0' or self._onehot_input)]
        self._pad_item = self.n_items
        self._hidden_act = parse_activation(self.hidden_act)
        self._final_act = parse_activation(self.final_act, final=True)
        self._dropout_masks = []  # the training step's dropout mask inputs, with their p
        with pytensor.config.change_flags(floatX=FLOAT):
            self.params = OrderedDict((n, _static_shared(self._with_pad_row(n, w), n)) for n, w in self.weights.items())
            self.H = [_static_shared(np.zeros((self.batch_size, L), dtype=FLOAT), f'H{l}')
                      for l, L in enumerate(self.layers_)]
            self.P_target = _static_shared(np.zeros(self.n_items + 1, dtype=FLOAT), 'logq_target')
            self.P_sample = _static_shared(np.zeros(self.n_items + 1, dtype=FLOAT), 'logq_sample')
            self.opt_state = OrderedDict()
            self.opt_step = pytensor.shared(np.float32(0), name='t')
            self._train_fn = self._compile_train()
        self._compiled_for = self._graph_key()
        self._fns = {}
        self._push_state()

    def _with_pad_row(self, name, value):
        """An item-indexed parameter (or its optimiser state) with the padding row appended."""
        if name.rsplit('_', 1)[-1] not in self._item_params:
            return value
        return np.concatenate([value, np.zeros((1,) + value.shape[1:], dtype=value.dtype)])

    def _without_pad_row(self, name, value):
        return value[:-1] if name.rsplit('_', 1)[-1] in self._item_params else value

    def _log_support(self, alpha):
        return np.append(alpha * np.log(np.maximum(self.support, 1)), 0).astype(FLOAT)

    def _compile_train(self):
        B, N = self.batch_size, self.batch_size + self.n_sample
        X = pt.tensor('X', dtype='int32', shape=(B,))  # input items (padded rows read the pad item)
        T = pt.tensor('T', dtype='int32', shape=(B,))  # target items
        prev_rows = pt.tensor('prev_rows', dtype='int32', shape=(B,))  # rows of the previous state to carry
        keep = pt.tensor('keep', dtype=FLOAT, shape=(B,))  # 0 resets a slot's state
        active = pt.tensor('active', dtype=FLOAT, shape=(B,))  # 1 for the M sessions in the batch, 0 for padding
        # The item rows a step reads, each listed once (see _step_inputs), so that a row read several
        # times gets one optimiser step with its summed gradient.
        rows_Y = pt.tensor('rows_Y', dtype='int32', shape=(N,))  # distinct items of Y = [T | samples]
        inv_Y = pt.tensor('inv_Y', dtype='int32', shape=(N,))  # Y = rows_Y[inv_Y]
        rows_X = pt.tensor('rows_X', dtype='int32', shape=(B,))  # distinct inputs (constrained: those not in rows_Y)
        inv_X = pt.tensor('inv_X', dtype='int32', shape=(B,))  # X = input rows[inv_X]
        Y = rows_Y[inv_Y]  # N scored items
        cols = pt.concatenate([active, pt.ones(self.n_sample, dtype=FLOAT)])  # N: the columns that count

        # Sparse path: gather the item rows a step touches, differentiate w.r.t. the gathered rows.
        input_table = 'Wy' if self.constrained_embedding else 'E' if 'E' in self.params else 'Wx0'
        if self.constrained_embedding:  # the inputs' rows are Wy rows: in rows_Y, or after it
            reads = OrderedDict([('Wy', pt.concatenate([rows_Y, rows_X])), ('By', rows_Y)])
        else:
            reads = OrderedDict([(input_table, rows_X), ('Wy', rows_Y), ('By', rows_Y)])
        gathered = OrderedDict((name, self.params[name][idx]) for name, idx in reads.items())
        H_prev = [H[prev_rows] * keep[:, None] for H in self.H]
        H_new = self._forward(X, H_prev, training=True, item_rows={input_table: gathered[input_table][inv_X]})
        logits = self._output(H_new[-1], gathered['Wy'][inv_Y], gathered['By'][inv_Y])  # B x N
        if self.logq:
            log_q = pt.concatenate([self.P_target[T], self.P_sample[Y[B:]]])  # N
            logits = logits - np.float32(self.logq) * log_q
        logits = logits - np.float32(1e9) * (1 - cols)  # padded columns score as impossible items
        Yhat = self._final_act(logits)  # B x N
        row_loss = LOSSES[self.loss](Yhat, smoothing=np.float32(self.smoothing), bpreg=np.float32(self.bpreg), cols=cols)
        cost = (row_loss * active).sum() / np.float32(B)

        dense = [v for n, v in self.params.items() if n not in reads]
        grads = pytensor.grad(cost, dense + list(gathered.values()))
        targets = [(p, None) for p in dense] + [(self.params[n], idx) for n, idx in reads.items()]
        updates = self._optimizer_updates(targets, grads)
        for H, h in zip(self.H, H_new):
            updates[H] = h
        return self.compile_function([X, T, prev_rows, keep, active, rows_Y, inv_Y, rows_X, inv_X]
                                     + [mask for mask, _ in self._dropout_masks], cost, updates)

    def compile_function(self, inputs, outputs, updates=None):
        return compile_function(inputs, outputs, updates, self.backend)

    # -- optimisation --------------------------------------------------------------------------------

    def _state(self, key, like):
        """Optimiser accumulator (zeros shaped like a parameter), created once per parameter."""
        if key not in self.opt_state:
            self.opt_state[key] = _static_shared(np.zeros_like(like.get_value(borrow=True)), key)
        return self.opt_state[key]

    def _adapted_step(self, name, grad, rows):
        """The optimiser's step direction for one gradient; `rows` is None for a dense parameter,
        else the indices the gradient's rows belong to (accumulators are gathered and scattered)."""
        updates = OrderedDict()

        def read(kind):
            acc = self._state(f'{kind}_{name}', self.params[name])
            return acc, (acc if rows is None else acc[rows])

        def write(acc, value):
            updates[acc] = value if rows is None else pt.set_subtensor(acc[rows], value)

        eps = np.float32(1e-6)
        args = [np.float32(a) for a in (self.adapt_params or ADAPT_DEFAULTS[self.adapt])]
        if self.adapt is None:
            return grad, updates
        if self.adapt == 'adagrad':
            acc, a = read('adagrad')
            a_new = a + grad ** 2
            write(acc, a_new)
            return grad / pt.sqrt(a_new + eps), updates
        if self.adapt == 'rmsprop':
            (decay,) = args
            acc, a = read('rmsprop')
            a_new = decay * a + (1 - decay) * grad ** 2
            write(acc, a_new)
            return grad / pt.sqrt(a_new + eps), updates
        if self.adapt == 'adadelta':
            (rho,) = args
            acc, a = read('adadelta_g')
            acc_d, ad = read('adadelta_d')
            a_new = rho * a + (1 - rho) * grad ** 2
            step = grad * pt.sqrt(ad + eps) / pt.sqrt(a_new + eps)
            write(acc, a_new)
            write(acc_d, rho * ad + (1 - rho) * step ** 2)
            return step, updates
        # Adam with both bias corrections right (the original used beta1 for both and fed g^2 into
        # the first moment on the sparse path).
        beta1, beta2 = args
        acc_m, m = read('adam_m')
        acc_v, v = read('adam_v')
        m_new = beta1 * m + (1 - beta1) * grad
        v_new = beta2 * v + (1 - beta2) * grad ** 2
        write(acc_m, m_new)
        write(acc_v, v_new)
        t = self.opt_step + 1
        return (m_new / (1 - beta1 ** t)) / pt.sqrt(v_new / (1 - beta2 ** t) + eps), updates

    def _optimizer_updates(self, targets, grads):
        """Updates for (parameter, rows) pairs given the gradients w.r.t. the parameter (rows=None) or
        w.r.t. its gathered rows: optional global-norm clipping (grad_cap), the adaptive step, L2 (lmbd)
        added to the step as decoupled weight decay (after the adaptive scaling, so it never enters the
        accumulators; rows only when a step reads them), heavy-ball momentum. As in the original,
        Adadelta takes steps of its own size (learning rate 1)."""
        updates = OrderedDict()
        lr = np.float32(1.0 if self.adapt == 'adadelta' else self.learning_rate)
        if self.grad_cap > 0:
            norm = pt.sqrt(sum((g ** 2).sum() for g in grads))
            scale = pt.minimum(np.float32(1), np.float32(self.grad_cap) / (norm + np.float32(1e-12)))
            grads = [g * scale for g in grads]
        for (param, rows), grad in zip(targets, grads):
            if rows is not None and self.adapt == 'adagrad' and self.backend == 'c' and not self.lmbd:  # fused
                vel = self._state(f'velocity_{param.name}', param) if self.momentum else None
                updates.update(cbackend.row_adagrad_updates(param, self._state(f'adagrad_{param.name}', param), vel,
                                                            rows, grad, self.learning_rate, self.momentum, 1e-6))
                continue
            step, opt_updates = self._adapted_step(param.name, grad, rows)
            updates.update(opt_updates)
            if self.lmbd:
                step = step + np.float32(self.lmbd) * (param if rows is None else param[rows])
            delta = -lr * step
            if self.momentum:
                vel = self._state(f'velocity_{param.name}', param)
                delta = np.float32(self.momentum) * (vel if rows is None else vel[rows]) + delta
                updates[vel] = delta if rows is None else pt.set_subtensor(vel[rows], delta)
            updates[param] = param + delta if rows is None else pt.inc_subtensor(param[rows], delta)
        if self.adapt == 'adam':
            updates[self.opt_step] = self.opt_step + 1
        return updates

    # -- sampling ------------------------------------------------------------------------------------

    def _sample_cdf(self):
        p = self.support.astype(np.float64) ** self.sample_alpha
        cdf = np.cumsum(p)
        return cdf / cdf[-1]

    # -- training ------------------------------------------------------------------------------------

    def fit(self, data, sample_store=10000000, store_type='gpu', *, retrain=False, n_epochs=None, valid_data=None,
            valid_cutoff=20, valid_metric='mrr', keep_best=False, patience=None, callback=None):
        """Trains on a session log (DataFrame with session, item and time columns); returns self.

        sample_store: how many negative sample ids to draw ahead in one go. store_type ('gpu' or 'cpu')
        is accepted for scripts written for the original, where it chose where the sample store lived;
        it has no effect here. Everything after it is keyword-only.

        retrain=False builds a new model. retrain=True continues training the current (trained or
        loaded) one: weights and optimiser state are kept, items never seen before are appended with
        fresh rows, and the sampling supports grow with the new data. n_epochs overrides the
        hyper-parameter for this call.
        valid_data: a session log evaluated after every epoch (Recall or MRR at valid_cutoff, by
        valid_metric); its figures go into history_. keep_best=True ends with the weights of the best
        epoch; patience=K stops after K epochs without improvement.
        callback: called with each epoch's history_ record (a dict) as soon as the epoch (and its
        validation) is done, e.g. to report progress to a hyper-parameter search.
        A NaN/inf loss stops training with an error and leaves the weights of the last completed epoch;
        so does Ctrl-C (KeyboardInterrupt), which returns the model trained so far.
        """
        params = self._parsed_params()
        if store_type not in ('gpu', 'cpu'):
            raise ValueError(f"store_type={store_type!r}: use 'gpu' or 'cpu' (it has no effect here); pass "
                             'retrain, n_epochs and the other options by keyword')
        if retrain:
            self._check_retrainable(params)
        if valid_metric not in ('mrr', 'recall'):
            raise ValueError(f"valid_metric={valid_metric!r}: use 'mrr' or 'recall'")
        if (keep_best or patience) and valid_data is None:
            raise ValueError('keep_best and patience need valid_data to measure progress on')
        if callback is not None and not callable(callback):
            raise ValueError(f'callback={callback!r}: give a function of one epoch\'s history_ record, or None')
        if patience is not None and int(patience) < 1:
            raise ValueError(f'patience={patience!r}: give a positive number of epochs')
        n_epochs = self._parsed_params(n_epochs=n_epochs)['n_epochs'] if n_epochs is not None else params['n_epochs']
        keys = params['session_key'], params['item_key'], params['time_key']
        data = validate_log(data, *keys, what='training data')
        n_duplicates = int(data.duplicated().sum())
        if n_duplicates:
            warnings.warn(f'the training data has {n_duplicates} duplicate event(s) (same session, item and time); '
                          'they are trained on as repeated clicks, as in the original. Drop them first '
                          '(data.drop_duplicates()) if they are logging errors.', stacklevel=2)
        if int(sample_store) < 0:
            raise ValueError(f'sample_store={sample_store!r}: give the number of sample ids to precompute (>= 0)')
        if valid_data is not None:
            validate_log(valid_data, *keys, what='valid_data')
        seen = pd.unique(data[params['item_key']])
        if retrain:
            itemidmap = self.itemidmap.append(pd.Index(seen[~pd.Index(seen).isin(self.itemidmap)]))
        else:
            itemidmap = pd.Index(np.sort(seen) if _sortable(seen) else seen)
        items, offsets, order = session_arrays(data, itemidmap, *keys, params['time_sort'], 'training data')
        if (np.diff(offsets) < 2).all():
            raise ValueError('the training data has no session with two or more events: nothing to learn from')

        if params['adapt'] == 'adadelta' and params['learning_rate'] != 1.0:
            warnings.warn(f"adapt='adadelta' takes steps of its own size: learning_rate={params['learning_rate']} "
                          'is ignored (as in the original, which set it to 1.0)', stacklevel=2)

        # Checks passed: from here on the model changes.
        for name in HYPERPARAMETERS:
            setattr(self, name, params[name])
        self._pred_sessions = None  # sessions of predict_next_batch restart with the new weights
        self.history_ = self.history_ if retrain else []
        self._rng = np.random.default_rng([self.seed, len(self.history_)])
        if retrain:
            self._pull_state()
            before = (self.itemidmap, self.support.copy(), OrderedDict(self.weights), dict(self.opt_values),
                      len(self.history_))
            self._grow(itemidmap[self.n_items:])
        else:
            self.itemidmap = itemidmap
            self.support = np.zeros(self.n_items)
            self.weights = self._init_weights(self._rng)
            self.opt_values = {}
            self._architecture = self._architecture_of(params)
        counts = data[self.item_key].value_counts()
        self.support[self.itemidmap.get_indexer(counts.index)] += counts.to_numpy()
        if self._compiled_for != self._graph_key():
            self._build()
        else:
            self._push_state()
        self._dropout_rng = np.random.default_rng([self.seed, len(self.history_), 1])
        try:
            max_steps = n_epochs * (len(items) - (len(offsets) - 1))  # a step trains on one event or more
            with SampleStore(self._sample_cdf(), self.n_sample, sample_store,
                             np.random.default_rng([self.seed, len(self.history_), 2]), max_steps) as samples:
                self._train(samples, items, offsets, order, n_epochs, valid_data, valid_cutoff, valid_metric,
                            keep_best, patience, callback)
        finally:
            if retrain and len(self.history_) == before[-1]:  # NaN or Ctrl-C before an epoch of the new data ended
                self.itemidmap, self.support, self.weights, self.opt_values, _ = before
                if self._compiled_for != self._graph_key():
                    self._build()
                else:
                    self._push_state()
        return self

    def retrain(self, data, sample_store=10000000, n_epochs=None, **fit_options):
        """Continues training on new data: fit(data, retrain=True, ...)."""
        return self.fit(data, sample_store=sample_store, retrain=True, n_epochs=n_epochs, **fit_options)

    @staticmethod
    def _architecture_of(params):
        return {name: params[name] for name in ARCHITECTURE}

    def _check_retrainable(self, params):
        if self.itemidmap is None:
            raise ValueError('retrain needs a trained or loaded model; call fit(data) first')
        changed = {n: (v, params[n]) for n, v in self._architecture.items() if params[n] != v}
        if changed:
            raise ValueError(f'cannot retrain with a different architecture {changed} (trained, now); '
                             'these shape the weights: build a new GRU4Rec and fit it instead')

    def _train(self, samples, items, offsets, order, n_epochs, valid_data, valid_cutoff, valid_metric, keep_best,
               patience, callback):
        """The epochs of session-parallel training, with a snapshot after each completed epoch."""
        min_slots = 1 if self.n_sample else 2  # without samples a lone session has no negative
        n_pairs = len(items) - (len(offsets) - 1)
        self._slot = np.zeros(self.n_items + 1, dtype=np.int32)  # scratch space of _step_inputs
        best, since_best = None, 0
        for epoch in range(1, n_epochs + 1):
            t0 = time.time()
            session_order = self._rng.permutation(order) if self.train_random_order else order
            total, n_steps, n_events = 0.0, 0, 0
            progress = tqdm(total=n_pairs, desc=f'Epoch{epoch}', leave=False, unit='e',
                            disable=None if self.verbose else True)
            # The batches have exactly the graph's input types, so the per-call input checks (about
            # 35 us, 10x the rest of the call's overhead) are skipped while training.
            self._train_fn.trust_input = True
            try:
                for X, T, prev_rows, keep in session_parallel_batches(items, offsets, session_order,
                                                                      self.batch_size, min_slots):
                    cost = self._train_fn(*self._step_inputs(X, T, prev_rows, keep, samples.next()))
                    if not np.isfinite(cost):
                        self._push_state()
                        raise FloatingPointError(
                            f'the loss became {cost} at epoch {epoch}, step {n_steps + 1}; the model keeps the '
                            f'weights of the last completed epoch. Lower learning_rate or set grad_cap.')
                    total += cost * len(X)  # the epoch's loss weighs each step by its sessions, as the original
                    n_steps += 1
                    n_events += len(X)
                    if n_steps % 256 == 0:
                        seconds = time.time() - t0
                        progress.set_postfix(loss=f'{total / n_events:.4f}', mb_s=f'{n_steps / seconds:.0f}',
                                             refresh=False)
                        progress.update(n_events - progress.n)
            except KeyboardInterrupt:
                self._push_state()
                print(f'Training interrupted in epoch {epoch}: the model keeps the weights of the '
                      f'{len(self.history_)} completed epoch(s).', file=sys.stderr, flush=True)
                return
            finally:
                self._train_fn.trust_input = False
                progress.close()
            seconds = time.time() - t0
            record = {'epoch': len(self.history_) + 1, 'loss': float(total) / max(n_events, 1), 'seconds': seconds}
            self._pull_state()
            line = (f'Epoch{epoch} --> loss: {record["loss"]:.6f} \t({seconds:.2f}s) \t'
                    f'[{n_steps / seconds:.2f} mb/s | {n_events / seconds:.0f} e/s]')
            if valid_data is not None:
                from evaluation import evaluate_gpu
                recall, mrr = evaluate_gpu(self, valid_data, session_key=self.session_key, item_key=self.item_key,
                                           time_key=self.time_key, cut_off=[valid_cutoff])
                record[f'recall@{valid_cutoff}'] = float(recall[valid_cutoff])
                record[f'mrr@{valid_cutoff}'] = float(mrr[valid_cutoff])
                score = record[f'{valid_metric}@{valid_cutoff}']
                line += f' \tvalid {valid_metric}@{valid_cutoff}: {score:.6f}'
                if best is None or score > best[0]:
                    best, since_best = (score, self.weights, self.opt_values, len(self.history_) + 1), 0
                else:
                    since_best += 1
            self.history_.append(record)
            if self.verbose:
                print(line, flush=True)
            if callback is not None:
                callback(dict(record))
            if patience and since_best >= patience:
                if self.verbose:
                    print(f'Stopping early: no progress on {valid_metric}@{valid_cutoff} for {patience} epoch(s)')
                break
        if keep_best and best is not None and best[3] != len(self.history_):
            _, self.weights, self.opt_values, best_epoch = best
            self._push_state()
            if self.verbose:
                print(f'Keeping the weights of epoch {best_epoch} (best valid {valid_metric}@{valid_cutoff})')

    def _step_inputs(self, X, T, prev_rows, keep, samples):
        """The training step's inputs for a mini-batch of M <= batch_size sessions and the step's samples.

        The batch is padded to the graph's fixed size. Every item row the step reads is listed once,
        with where each read finds it, so a row read several times (an item sampled twice, or both a
        target and a sample) gets its summed gradient and ONE optimiser step: the exact sparse
        gradient. The original applied adagrad and momentum once per read, which slows and destabilises
        the rows that are read most often."""
        M, B, pad_item = len(X), self.batch_size, self._pad_item
        active = np.ones(B, dtype=FLOAT)
        if M < B:
            X, T, prev_rows, keep = pad(X, B, pad_item), pad(T, B, pad_item), pad(prev_rows, B, 0), pad(keep, B, 0)
            active[M:] = 0
        rows_Y, inv_Y, rows_X, inv_X = distinct_rows(X, T, samples, self.constrained_embedding, self._slot, pad_item)
        masks = [(self._dropout_rng.random(mask.type.shape, dtype=np.float32) < np.float32(1 - p))
                 * np.float32(1 / (1 - p)) for mask, p in self._dropout_masks]
        return X, T, prev_rows, keep, active, rows_Y, inv_Y, rows_X, inv_X, *masks

    def _pull_state(self):
        """Copies weights and optimiser state out of the compiled graph (self.weights, self.opt_values):
        the snapshot that a failed or interrupted epoch returns to."""
        self.weights = OrderedDict((n, self._without_pad_row(n, v.get_value())) for n, v in self.params.items())
        self.opt_values = {n: self._without_pad_row(n, v.get_value()) for n, v in self.opt_state.items()}
        self.opt_values['t'] = self.opt_step.get_value()

    def _push_state(self):
        """Loads self.weights and self.opt_values into the compiled graph's shared variables."""
        for name, var in self.params.items():
            var.set_value(self._with_pad_row(name, self.weights[name]))
        for name, acc in self.opt_state.items():
            value = self.opt_values.get(name)
            if value is None:
                value = np.zeros_like(self.weights[name.rsplit('_', 1)[-1]])
            acc.set_value(self._with_pad_row(name, value))
        self.opt_step.set_value(np.float32(self.opt_values.get('t', 0)))
        self.P_target.set_value(self._log_support(1.0))
        self.P_sample.set_value(self._log_support(self.sample_alpha))

    def _grow(self, added):
        """Appends items never seen before: fresh parameter rows, zero optimiser state and support."""
        if len(added) == 0:
            return
        self.itemidmap = self.itemidmap.append(pd.Index(added))
        fresh = self._init_item_rows(self._rng, len(added), self.n_items)
        for name, rows in fresh.items():
            self.weights[name] = np.concatenate([self.weights[name], rows])
        self.support = np.concatenate([self.support, np.zeros(len(added))])
        for key, value in self.opt_values.items():
            if key.rsplit('_', 1)[-1] in fresh:
                self.opt_values[key] = np.concatenate([value, np.zeros((len(added),) + value.shape[1:], FLOAT)])

    # -- prediction ----------------------------------------------------------------------------------

    def compiled(self, key, make):
        """The function make() compiles, kept until the graph is rebuilt (used by evaluation too)."""
        if key not in self._fns:
            self._fns[key] = make()
        return self._fns[key]

    def predict_next_batch(self, session_ids, input_item_ids, predict_for_item_ids=None, batch=100):
        """One step for a batch of sessions: scores (items x batch) as a DataFrame indexed by item id.

        Slot i keeps its session's hidden state between calls, whether or not predict_for_item_ids is
        given, and resets it when session_ids[i] changes; fit, retrain and set_params restart every slot.
        Pass `batch` sessions at every call. The scores are the final activation's (for
        final_act='softmax_logit' the softmax, as in the original)."""
        self._require_trained()
        session_ids, input_item_ids = np.asarray(session_ids), np.asarray(input_item_ids)
        if len(session_ids) != batch or len(input_item_ids) != batch:
            raise ValueError(f'predict_next_batch needs exactly batch={batch} session and item ids per call')
        X = self._item_indices(input_item_ids, 'input_item_ids')
        with_items = predict_for_item_ids is not None
        items = self._item_indices(predict_for_item_ids, 'predict_for_item_ids') if with_items else X[:0]
        H = self.compiled(('predict_next_batch states', batch),  # shared by both output modes
                          lambda: [_static_shared(np.zeros((batch, L), dtype=FLOAT), f'H{l}')
                                   for l, L in enumerate(self.layers_)])
        step = self.compiled(('predict_next_batch', batch, with_items),
                             lambda: self._compile_stateful_step(H, with_items))
        if self._pred_sessions is None or len(self._pred_sessions) != batch:
            self._pred_sessions = np.full(batch, None, dtype=object)
        keep = (session_ids == self._pred_sessions).astype(FLOAT)
        self._pred_sessions = session_ids.astype(object)
        scores = step(X, keep, items)  # batch x C
        index = pd.Index(np.asarray(predict_for_item_ids)) if with_items else self.itemidmap
        return pd.DataFrame(scores.T, index=index)

    def _compile_stateful_step(self, H, with_items):
        """(X, keep, items) -> scores; the hidden state stays in the shared variables H between calls."""
        batch = H[0].type.shape[0]
        X = pt.tensor('X', dtype='int32', shape=(batch,))
        keep = pt.tensor('keep', dtype=FLOAT, shape=(batch,))
        items = pt.ivector('items')
        with pytensor.config.change_flags(floatX=FLOAT):
            H_new, scores = self.symbolic_step(X, [h * keep[:, None] for h in H], items if with_items else None)
        return self.compile_function([X, keep, items], scores, OrderedDict(zip(H, H_new)))

    def _compile_session_reader(self, batch):
        """Two stateless functions: (X, *H) -> new states, and (X, *H) -> scores of all items."""
        X = pt.tensor('X', dtype='int32', shape=(batch,))
        H = [pt.tensor(f'H{l}', dtype=FLOAT, shape=(batch, L)) for l, L in enumerate(self.layers_)]
        with pytensor.config.change_flags(floatX=FLOAT):
            H_new, scores = self.symbolic_step(X, H)
        return self.compile_function([X] + H, H_new), self.compile_function([X] + H, scores)

    def recommend(self, sessions, k=20, exclude_seen=False, batch_size=512):
        """Top-k next items for each session, given its events so far.

        sessions: a DataFrame in the training format (session, item, time columns) or a dict
        {session id: [item ids in order]}. Items the model does not know are skipped; sessions with no
        known item get no recommendation. exclude_seen=True never recommends an item already in the
        session (so a session gets fewer than k items when fewer than k are unseen). Returns a DataFrame
        with columns session key, 'rank' (1 = best), item key, 'score', the sessions in the order of the
        input (the dict's, or the log's when its sessions are contiguous and in time order, else by session id).
        """
        self._require_trained()
        if int(k) < 1:
            raise ValueError(f'k must be a positive number of items, got {k!r}')
        if int(batch_size) < 1:
            raise ValueError(f'batch_size must be a positive number of sessions, got {batch_size!r}')
        k = min(int(k), self.n_items)
        if isinstance(sessions, dict):
            rows = [(sid, pos, item) for sid, its in sessions.items() for pos, item in enumerate(its)]
            sessions = pd.DataFrame(rows, columns=[self.session_key, self.time_key, self.item_key])
        items, offsets, _ = session_arrays(sessions, self.itemidmap, self.session_key, self.item_key,
                                           self.time_key, what='sessions')
        ordered = sort_log(sessions, self.session_key, self.time_key)  # positions, not labels: the index may repeat
        known = ordered[self.item_key].isin(self.itemidmap).to_numpy()
        session_ids = pd.unique(ordered[self.session_key].to_numpy()[known])
        step, score = self.compiled(('recommend', batch_size), lambda: self._compile_session_reader(batch_size))
        lengths = np.diff(offsets)
        results = []
        for first in range(0, len(lengths), batch_size):
            batch = np.arange(first, min(first + batch_size, len(lengths)))
            batch = batch[np.argsort(-lengths[batch], kind='stable')]  # longest first: the active ones are a prefix
            H = [np.zeros((batch_size, L), dtype=FLOAT) for L in self.layers_]
            scores = np.empty((len(batch), self.n_items), dtype=FLOAT)
            for t in range(lengths[batch[0]]):
                n_active = int((lengths[batch] > t).sum())
                n_going_on = int((lengths[batch] > t + 1).sum())
                X = pad(items[offsets[batch[:n_active]] + t], batch_size, 0)  # padding rows are ignored
                ending = slice(n_going_on, n_active)
                if n_active > n_going_on:
                    scores[ending] = score(X, *H)[ending]
                H = step(X, *H)
            back = np.argsort(batch)  # the sessions in the order of the log again
            batch, scores = batch[back], scores[back]
            if exclude_seen:
                for row, s in enumerate(batch):
                    scores[row, items[offsets[s]:offsets[s + 1]]] = -np.inf
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
            results.append(pd.DataFrame({
                self.session_key: np.repeat(session_ids[batch], k), 'rank': np.tile(np.arange(1, k + 1), len(batch)),
                self.item_key: self.itemidmap[top.ravel()], 'score': np.take_along_axis(scores, top, 1).ravel()}))
        result = pd.concat(results, ignore_index=True)
        if exclude_seen:  # when k exceeds the unseen items, the seen ones (score -inf) filled the top k
            result = result[result['score'] > -np.inf].reset_index(drop=True)
        return result

    def _item_indices(self, item_ids, what):
        idx = self.itemidmap.get_indexer(np.asarray(item_ids))
        if (idx < 0).any():
            unknown = np.asarray(item_ids)[idx < 0][:5].tolist()
            raise ValueError(f'{what} holds items the model was not trained on, e.g. {unknown}')
        return idx.astype(np.int32)

    def _require_trained(self):
        if self.itemidmap is None:
            raise ValueError('this GRU4Rec is not trained yet: call fit(data) or GRU4Rec.loadmodel(path)')
        if self._compiled_for is None:
            self._build()

    # -- saving and loading --------------------------------------------------------------------------

    def savemodel(self, path):
        """Saves hyper-parameters, item map, weights, optimiser state and item supports to `path`, atomically
        (see modelfile.py: JSON and a numpy archive, no pickled objects). Item ids must be integers,
        floats or strings (a ValueError says so before anything is written)."""
        self._require_trained()
        self._pull_state()
        arrays = {f'param/{n}': w for n, w in self.weights.items()}
        arrays.update({f'opt/{n}': np.asarray(v) for n, v in self.opt_values.items()})
        arrays['support'] = self.support
        modelfile.write(path, self.get_params(), self.history_, self.itemidmap, arrays)

    @classmethod
    def loadmodel(cls, path):
        """Loads a model written by savemodel. The file is untrusted input: modelfile.read checks all of it
        against the architecture its hyper-parameters declare before anything is built (tests/README.md
        lists the checks), and never executes code from it."""
        params, history, itemidmap, arrays = modelfile.read(path, lambda raw: cls()._parsed_params(**raw),
                                                            model_file_layout)
        if (arrays['support'] < 0).any() or arrays.get('opt/t', 0) < 0:
            raise ValueError(f'{str(path)!r}: item supports and the optimiser step count cannot be negative')
        model = cls(**params)
        model.itemidmap = itemidmap
        model.support = arrays['support']
        model.history_ = history
        model.weights = OrderedDict((k[len('param/'):], v) for k, v in arrays.items() if k.startswith('param/'))
        model.opt_values = {k[len('opt/'):]: v for k, v in arrays.items() if k.startswith('opt/')}
        model._architecture = model._architecture_of(params)
        model._build()
        return model


# The optimiser accumulators that a model file may hold for a parameter P are named f'{kind}_P' (see
# _adapted_step and _optimizer_updates); 't' is the step counter.
OPT_STATE_KINDS = ('adagrad', 'rmsprop', 'adadelta_g', 'adadelta_d', 'adam_m', 'adam_v', 'velocity')


def parameter_shapes(params, n_items):
    """{name: shape} of the weights that the (parsed) hyper-parameters declare for n_items items, as
    _init_weights makes them."""
    layers, constrained = params['layers'], params['constrained_embedding']
    K = 0 if constrained else layers[0] if params['embedding'] == 'layersize' else params['embedding']
    shapes = OrderedDict([('Wy', (n_items, layers[-1])), ('By', (n_items,))])
    if K:
        shapes['E'] = (n_items, K)
    elif not constrained:
        shapes['Wx0'] = (n_items, 3 * layers[0])
    for l, L in enumerate(layers):
        if l > 0 or 'Wx0' not in shapes:
            shapes[f'Wx{l}'] = (layers[l - 1] if l > 0 else K or layers[-1], 3 * L)
        shapes[f'Wrz{l}'] = (L, 2 * L)
        shapes[f'Wh{l}'] = (L, L)
        shapes[f'Bh{l}'] = (3 * L,)
        if params['reset_after']:
            shapes[f'Bhc{l}'] = (L,)
    return shapes


def model_file_layout(params, n_items):
    """(required, optional) {array name: (shape, dtype)} of a model file (see modelfile.read). The hidden
    state buffers that loading allocates (batch_size x layers) must be plausible for the model's size:
    a file must not make the loader allocate far more than the weights it holds."""
    shapes = parameter_shapes(params, n_items)
    n_weights = sum(math.prod(shape) for shape in shapes.values())
    n_state = params['batch_size'] * sum(params['layers'])
    if n_state > max(n_weights, 2 ** 24):
        raise ValueError(f"batch_size={params['batch_size']} with layers={params['layers']} needs {n_state} hidden "
                         f'state values, more than the model has weights ({n_weights}): refused as implausible')
    required = OrderedDict((f'param/{name}', (shape, FLOAT)) for name, shape in shapes.items())
    required['support'] = ((n_items,), 'float64')
    optional = {f'opt/{kind}_{name}': (shape, FLOAT) for name, shape in shapes.items() for kind in OPT_STATE_KINDS}
    optional['opt/t'] = ((), FLOAT)
    return required, optional


def _static_shared(value, name):
    """A shared variable whose shape is fixed when the graph is compiled."""
    return pytensor.shared(value, name=name, shape=value.shape)


def pad(values, size, fill):
    """values (a vector) extended to `size` entries with `fill`."""
    padded = np.full(size, fill, dtype=values.dtype)
    padded[:len(values)] = values
    return padded


@numba.njit(cache=True)
def distinct_rows(X, T, samples, constrained, slot, pad_item):
    """The item rows a training step reads, each listed once, and where each read finds its row.

    Y = [T | samples] (N items) is read from rows_Y (padded to N with pad_item): Y == rows_Y[inv_Y].
    The inputs X (B items) are read from rows_X (padded to B): X == rows_X[inv_X]; with a constrained
    embedding they are Wy rows, read from [rows_Y | rows_X], where rows_X holds only the inputs not in
    rows_Y. slot is scratch space indexed by item, its entries for the step's items set before use.
    O(N) in a compiled loop: numpy needed ~100 us a step (9% of an RSC15 step) for the same."""
    B, N = len(X), len(T) + len(samples)
    rows_Y, inv_Y = np.full(N, pad_item, np.int32), np.empty(N, np.int32)
    rows_X, inv_X = np.full(B, pad_item, np.int32), np.empty(B, np.int32)
    for i in range(N):
        slot[T[i] if i < B else samples[i - B]] = -1
    n_Y = 0
    for i in range(N):
        item = T[i] if i < B else samples[i - B]
        if slot[item] < 0:
            slot[item], rows_Y[n_Y] = n_Y, item
            n_Y += 1
        inv_Y[i] = slot[item]
    for item in X:  # an input that is in rows_Y keeps its slot there when the embedding is constrained
        if not (constrained and 0 <= slot[item] < n_Y and rows_Y[slot[item]] == item):
            slot[item] = -1
    offset, n_X = N if constrained else 0, 0
    for i in range(B):
        item = X[i]
        if slot[item] < 0:
            slot[item], rows_X[n_X] = offset + n_X, item
            n_X += 1
        inv_X[i] = slot[item]
    return rows_Y, inv_Y, rows_X, inv_X


class SampleStore:
    """The negative samples of the training steps, n_sample item indices per step, drawn from `cdf` in
    blocks of about `size` (the original's sample store; size 0 draws for one step at a time).

    The next block is drawn in a background thread while the training uses the current one: numpy
    releases the GIL while it draws, so with a core to spare the refills cost the training loop nothing
    (drawing 10M samples takes ~0.4 s, 4% of an RSC15 step, amortised). One generator draws the
    blocks in order, so training stays reproducible. A block holds at most max_steps steps: a small
    training does not pay for 10M samples."""

    def __init__(self, cdf, n_sample, size, rng, max_steps=None):
        self.cdf, self.n_sample, self.rng = cdf, n_sample, rng
        self.n_steps = max(1, min(int(size) // max(n_sample, 1), max_steps or np.inf))
        self.block, self.position = None, self.n_steps
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix='gru4rec-samples') if n_sample else None
        self.pending = self.worker.submit(self.draw) if n_sample else None

    def draw(self):
        """A block of n_steps x n_sample item indices, item i drawn with probability cdf[i] - cdf[i - 1]."""
        indices = inverse_cdf(self.cdf, self.rng.random(self.n_steps * self.n_sample))
        np.minimum(indices, len(self.cdf) - 1, out=indices)  # u so close to 1 that it rounds past the last cdf
        return indices.astype(np.int32).reshape(self.n_steps, self.n_sample)

    def next(self):
        """The samples of the next training step (an empty vector when n_sample is 0)."""
        if not self.n_sample:
            return np.zeros(0, dtype=np.int32)
        if self.position == self.n_steps:
            self.block, self.position = self.pending.result(), 0
            self.pending = self.worker.submit(self.draw)
        self.position += 1
        return self.block[self.position - 1]

    def __enter__(self):
        return self

    def __exit__(self, *_):
        if self.worker is not None:
            self.worker.shutdown(wait=False, cancel_futures=True)


def inverse_cdf(cdf, u, max_steps=4):
    """np.searchsorted(cdf, u, side='right') for many u, in O(1) per value. A guide table gives, for each
    of 4 * len(cdf) equal bins of [0, 1), the first index whose cdf exceeds the bin's start; a few
    vectorised steps forward from there reach the answer, and binary search finishes any that remain."""
    bins = 4 * len(cdf)
    guide = np.searchsorted(cdf, np.arange(bins + 1) / bins, side='right').astype(np.int32)
    cdf = np.append(cdf, np.inf)  # stepping stops at the end
    index = guide[(u * bins).astype(np.int32)]
    todo = np.flatnonzero(cdf[index] <= u)
    for _ in range(max_steps):
        if not len(todo):
            return index
        index[todo] += 1
        todo = todo[cdf[index[todo]] <= u[todo]]
    index[todo] = np.searchsorted(cdf, u[todo], side='right')
    return index


def _sortable(values):
    try:
        np.sort(values)
        return True
    except TypeError:
        return False


# ---------------------------------------------------------------------------------------------------
# Input checks shared by training, prediction and evaluation.

def validate_log(data, session_key, item_key, time_key, what='data'):
    """Checks a session log and returns it (never modified; a new frame when columns are dropped)."""
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f'{what} must be a pandas DataFrame, got {type(data).__name__}')
    missing = [k for k in (session_key, item_key, time_key) if k not in data.columns]
    if missing:
        raise ValueError(f'{what} has no column(s) {missing} (it has {list(data.columns)}); '
                         'rename them or set session_key / item_key / time_key')
    repeated = [k for k in (session_key, item_key, time_key) if (data.columns == k).sum() > 1]
    if repeated:
        raise ValueError(f'{what} has more than one column named {repeated}')
    if len(data) == 0:
        raise ValueError(f'{what} is empty')
    for key in (session_key, item_key, time_key):
        n_null = int(data[key].isna().sum())
        if n_null:
            raise ValueError(f'{what}: column {key!r} has {n_null} missing (NaN/None) value(s); drop or fill them')
    types = {type(v) for v in data[item_key].to_numpy()[:100000]}
    if len({t for t in types if not issubclass(t, (int, np.integer))}) and \
            len({t for t in types if issubclass(t, (int, np.integer))}):
        raise ValueError(f'{what}: column {item_key!r} mixes integer and non-integer ids ({sorted(t.__name__ for t in types)}); '
                         'convert them to one type')
    times = data[time_key]
    if pd.api.types.is_complex_dtype(times) or not (pd.api.types.is_numeric_dtype(times)
                                                    or pd.api.types.is_datetime64_any_dtype(times)):
        raise ValueError(f'{what}: column {time_key!r} must be numeric or datetime, got {times.dtype}')
    return data[[session_key, item_key, time_key]]


def session_arrays(data, itemidmap, session_key, item_key, time_key, time_sort=True, what='data'):
    """Checks a session log and returns (item indices, session offsets, session order) without
    touching the caller's DataFrame. Events of items not in `itemidmap` are dropped.

    offsets[s]:offsets[s+1] are session s's events; sessions are ordered by their first event's
    time (time_sort) or by session id."""
    data = sort_log(validate_log(data, session_key, item_key, time_key, what), session_key, time_key)
    item_idx = pd.Series(np.arange(len(itemidmap), dtype=np.int32), index=itemidmap)
    mapped = data[item_key].map(item_idx)
    known = mapped.notna().to_numpy()
    if not known.any():
        raise ValueError(f'{what} has no event of an item the model knows (none of its {item_key!r} values '
                         'is in the training item map)')
    items = mapped[known].to_numpy(dtype=np.int32)
    sessions = data[session_key].to_numpy()[known]
    boundaries = np.flatnonzero(sessions[1:] != sessions[:-1]) + 1
    offsets = np.concatenate([[0], boundaries, [len(sessions)]]).astype(np.int64)
    if time_sort:
        order = np.argsort(data[time_key].to_numpy()[known][offsets[:-1]], kind='stable')
    else:
        order = np.argsort(sessions[offsets[:-1]], kind='stable')
    return items, offsets, order


def sort_log(data, session_key, time_key):
    """Sorts by session then time, only if needed, without modifying the input."""
    sessions = data[session_key].to_numpy()
    times = data[time_key].to_numpy()
    same = sessions[1:] == sessions[:-1]
    contiguous = len(same) - same.sum() + 1 == data[session_key].nunique()
    if contiguous and (times[1:][same] >= times[:-1][same]).all():
        return data
    return data.sort_values([session_key, time_key], kind='stable')
