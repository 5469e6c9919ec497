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

This module holds the model: activations, losses, the GRU network and the GRU4Rec estimator. Behind it,
imported one way (tests/test_layers.py checks the order): training.py (the padded sparse training step,
the optimisers, the sample store), evaluation.py, sessions.py (session logs and session-parallel
mini-batches), backends.py (the only place that knows about backends) with cbackend.py, and
modelfile.py (the file format).
"""
import copy
import functools
import inspect
import math
import uuid
import warnings
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytensor
import pytensor.tensor as pt
from pytensor.gradient import disconnected_grad

import modelfile
from backends import BACKENDS, call, compile_function, set_shared, to_host
from evaluation import evaluate_gpu
from sessions import FLOAT, pad, session_arrays, session_parallel_batches, sort_log, validate_log
from training import (ADAPT_DEFAULTS, OPT_STATE_KINDS, Optimizer, SampleStore, TrainingStep, row_loss_op, sample_cdf,
                      static_shared, train_epochs)
from training import distinct_rows, inverse_cdf  # noqa: F401  (public names of gru4rec before issue 13)


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
    C backend from vectorising the loops around exp."""
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
# marks the scored columns when the batch is padded to a fixed size (see training.TrainingStep);
# None means all columns count.

def _diag(Yhat):
    """Yhat[i, i] for every row i, read from the flattened matrix: the gradient of that gather is a
    scatter into a vector, which has C code, where a two-index gather's ran in Python."""
    M, N = Yhat.shape
    return Yhat.reshape((-1,))[pt.arange(M) * (N + 1)]  # M


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
# The GRU network (ICLR 2016, section 3): its parameters, their initialisation and one step of a layer.
# Wx{l} (n_in x 3L), Wrz{l} (L x 2L), Wh{l} (L x L) and Bh{l} (3L) hold the r, z and candidate blocks of
# layer l; Wy (n_items x L_last) and By (n_items) score the items. The first layer reads one-hot items
# through Wx0 (n_items x 3L0), an item embedding E (n_items x K), or Wy (constrained embedding).

def embedding_size(params):
    """K of the separate item embedding E (0: none) for the parsed hyper-parameters."""
    if params['constrained_embedding']:
        return 0
    return params['layers'][0] if params['embedding'] == 'layersize' else params['embedding']


def item_parameters(params):
    """The parameters with one row per item, in the order of parameter_shapes."""
    return ['Wy', 'By'] + (['E'] if embedding_size(params) else [] if params['constrained_embedding'] else ['Wx0'])


def parameter_shapes(params, n_items):
    """{name: shape} of the weights that the (parsed) hyper-parameters declare for n_items items, as
    init_weights makes them."""
    layers, constrained, K = params['layers'], params['constrained_embedding'], embedding_size(params)
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


def init_matrix(rng, rows, cols, n_blocks=1, fan_rows=None, sigma=0.0, normal=False):
    """Uniform in [-s, s] with s = sqrt(6 / (fan_rows + cols)) per block (or N(0, s)); `sigma` overrides
    s. fan_rows defaults to rows; more when the rows extend a matrix (new items on retraining)."""
    blocks = []
    for _ in range(n_blocks):
        s = sigma if sigma else np.sqrt(6.0 / ((fan_rows or rows) + cols))
        blocks.append(rng.normal(0, s, size=(rows, cols)) if normal else rng.uniform(-s, s, size=(rows, cols)))
    return np.hstack(blocks).astype(FLOAT)


def init_weights(params, n_items, rng, n_rows=None):
    """Initial weights {name: array} for n_items items: biases zero, each matrix block (r, z, c) drawn by
    init_matrix. With n_rows, only n_rows fresh rows of the item-indexed parameters, scaled for
    matrices of n_items rows: new items on retraining get the scale of the grown matrix, as the
    original's extend_weights (on the retraining benchmark, better for the new items than the scale
    of their rows alone)."""
    items = item_parameters(params)
    weights = OrderedDict()
    for name, shape in parameter_shapes(params, n_items).items():
        if n_rows is not None:
            if name not in items:
                continue
            shape = (n_rows,) + shape[1:]
        if name.startswith('B'):
            weights[name] = np.zeros(shape, dtype=FLOAT)
            continue
        n_blocks = 3 if name.startswith('Wx') else 2 if name.startswith('Wrz') else 1
        weights[name] = init_matrix(rng, shape[0], shape[1] // n_blocks, n_blocks, n_items if name in items else None,
                                    params['sigma'], params['init_as_normal'])
    return weights


def gru_step(x_proj, h, Wrz, Wh, act, Bhc=None):
    """One GRU step of a layer of width L. x_proj = x·Wx + Bh (M x 3L: the r, z, c blocks), h the
    previous state (M x L), Wrz = [Ur | Uz] (L x 2L), Wh = Uh (L x L).
    r = σ(x·Wr + h·Ur), z = σ(x·Wz + h·Uz), h' = (1-z)*h + z*c, and the candidate
    c = act(x·Wc + (r*h)·Uh)          reset before the recurrent product (the original's cell), or
    c = act(x·Wc + r*(h·Uh + bhc))    reset after it (reset_after=True; Bhc holds bhc).
    The second is the cell of cuDNN (CUDNN_GRU in cudnnRNNMode_t) and of torch.nn.GRUCell, whose
    n = tanh(W_in x + b_in + r*(W_hn h + b_hn)) it is with W_in x + b_in = x·Wc + bc and
    b_hn = bhc. Its hidden-side bias is a parameter of its own: r scales it, so unlike the
    hidden-side biases of r and z it cannot be folded into Bh."""
    L = Wh.type.shape[0] if Wh.type.shape[0] is not None else Wh.shape[0]
    rz = pt.sigmoid(x_proj[:, :2 * L] + pt.dot(h, Wrz))  # M x 2L
    r, z = rz[:, :L], rz[:, L:]
    if Bhc is not None:
        recurrent = r * (pt.dot(h, Wh) + Bhc)  # M x L
    else:
        recurrent = pt.dot(r * h, Wh)  # M x L
    c = act(x_proj[:, 2 * L:] + recurrent)  # M x L
    return (1 - z) * h + z * c


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


# name -> (default, parser, description): the one list of the hyper-parameters. The names and defaults are
# the original implementation's; GRU4Rec's signature, its docstring and parse_hyperparameters derive from it.
HYPERPARAMETERS = OrderedDict([
    ('loss', ('bpr-max', _as_str, "'cross-entropy' (with final_act='softmax'), 'xe_logit' (with "
                                  "'softmax_logit'), 'bpr', 'top1', 'bpr-max', 'top1-max'")),
    ('final_act', ('linear', _as_str, "activation of the scores: 'linear', 'relu', 'tanh', 'leaky-X', 'elu-X', "
                                      "'selu-X-Y', 'softmax', 'softmax_logit'")),
    ('hidden_act', ('tanh', _as_str, "activation of the GRU candidate state (as final_act, without the softmaxes)")),
    ('layers', ([100], _as_int_list, "GRU layer sizes, e.g. [100] or '200/200'")),
    ('n_epochs', (10, int, 'epochs that fit trains')),
    ('batch_size', (32, int, 'sessions trained in parallel (ICLR 2016, section 3.1.1)')),
    ('dropout_p_hidden', (0.0, float, 'dropout on the GRU layers\' outputs')),
    ('dropout_p_embed', (0.0, float, 'dropout on the item embedding')),
    ('learning_rate', (0.1, float, 'step size (Adadelta takes steps of its own size)')),
    ('momentum', (0.0, float, 'heavy-ball momentum')),
    ('lmbd', (0.0, float, 'L2 regularisation, as decoupled weight decay')),
    ('embedding', (0, _as_embedding, "0 (the first layer reads one-hot items through an n_items x 3L matrix), K "
                                     "or 'layersize' (a separate K-dimensional item embedding)")),
    ('n_sample', (2048, int, 'extra negatives per step, shared by the mini-batch (CIKM 2018)')),
    ('sample_alpha', (0.75, float, 'negatives drawn by support ** sample_alpha')),
    ('smoothing', (0.0, float, 'label smoothing of the cross-entropy losses')),
    ('constrained_embedding', (False, _as_bool, 'True uses the output weights Wy as the input embedding')),
    ('adapt', ('adagrad', _as_adapt, "'adagrad', 'rmsprop', 'adadelta', 'adam' or None (SGD)")),
    ('adapt_params', ([], _as_float_list, 'the decay of rmsprop and adadelta, or the betas of adam')),
    ('grad_cap', (0.0, float, 'clips the gradients to this global norm (0: no clipping)')),
    ('bpreg', (1.0, float, 'weight of the score regularisation of BPR-max')),
    ('logq', (0.0, float, 'weight of the logQ correction of sampled softmax (with cross-entropy)')),
    ('sigma', (0.0, float, 'the scale of the initial weights (0: sqrt(6 / (rows + columns)) per block)')),
    ('init_as_normal', (False, _as_bool, 'normal instead of uniform initial weights')),
    ('train_random_order', (False, _as_bool, 'shuffles the sessions in every epoch')),
    ('time_sort', (True, _as_bool, 'sessions enter training by the time of their first event (else by id)')),
    ('session_key', ('SessionId', _as_str, 'the session column of the data')),
    ('item_key', ('ItemId', _as_str, 'the item column of the data')),
    ('time_key', ('Time', _as_str, 'the time column of the data')),
    ('seed', (42, int, 'seeds initialisation, sampling, dropout and session order: same seed and data, same model')),
    ('backend', ('c', _as_str, "how PyTensor compiles the graphs: 'c' (C virtual machine) or 'jax'")),
    ('verbose', (True, _as_bool, 'prints the loss of each epoch and shows progress')),
    ('reset_after', (False, _as_bool, "(not in the original) False is the original's GRU cell, the reset gate "
                                      'applied to the previous state before the recurrent product; True applies '
                                      'it after, with a hidden-side candidate bias, as cuDNN and torch.nn.GRUCell '
                                      'do (see gru_step)')),
])
SIGNATURE = inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
                               for name, (default, _, _) in HYPERPARAMETERS.items()])
# Changing these changes the model's parameters or what they mean: they are fixed once a model is trained.
ARCHITECTURE = ('layers', 'embedding', 'constrained_embedding', 'reset_after')
# What a retrain keeps besides the weights. 'carried': the optimiser state and the item supports (sampling,
# logq) of all data trained on so far. 'fresh': neither, as the original's retrain (hidasib/GRU4Rec 4b91663),
# which built new zero accumulators and velocities at every fit and drew samples by the new data's
# popularity. The default is the one that scored better on rsc15_100k halves (benchmarks/retrain_state.py).
RETRAIN_STATES = ('carried', 'fresh')
RETRAIN_STATE = 'carried'


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


def parse_hyperparameters(**values):
    """All hyper-parameters parsed and validated, the defaults for those not given (strings from a
    command line are accepted)."""
    unknown = sorted(set(values) - set(HYPERPARAMETERS))
    if unknown:
        raise ValueError(f'unknown hyper-parameter(s) {unknown}; known ones: {list(HYPERPARAMETERS)}')
    parsed = {}
    for name, (default, parse, _) in HYPERPARAMETERS.items():
        raw = values.get(name, default)
        try:
            parsed[name] = parse(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f'hyper-parameter {name}={raw!r} cannot be read: {e}') from None
    _check_hyperparameters(parsed)
    return parsed


class GRU4Rec:
    """GRU4Rec model (see the module docstring). Construct with hyper-parameters, then `fit`.

    Learned state (set by fit, retrain and loadmodel; the original's names without the '_' are
    aliases): itemidmap_ (item ids in index order), weights_, opt_values_ (optimiser state), support_
    (training events per item; after a retrain with retrain_state='fresh', the new data's), history_ (per-epoch records), hyperparameters_ (the parsed
    hyper-parameters trained with), training_step_.

    Hyper-parameters (names and defaults of the original implementation; see HYPERPARAMETERS):
    """

    def __init__(self, *args, **kwargs):
        # The signature is SIGNATURE's (inspect.signature(GRU4Rec) shows it); binding raises Python's
        # TypeError for an unknown or repeated name, as a written-out signature would.
        given = SIGNATURE.bind(*args, **kwargs).arguments
        for name, (default, _, _) in HYPERPARAMETERS.items():
            setattr(self, name, given[name] if name in given else copy.deepcopy(default))

    __init__.__signature__ = SIGNATURE.replace(
        parameters=[inspect.Parameter('self', inspect.Parameter.POSITIONAL_OR_KEYWORD), *SIGNATURE.parameters.values()])

    # -- hyper-parameters ----------------------------------------------------------------------------

    def get_params(self):
        return {name: getattr(self, name) for name in HYPERPARAMETERS}

    def _parsed_params(self, **overrides):
        return parse_hyperparameters(**dict(self.get_params(), **overrides))

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
    itemidmap_ = None  # learned state ends in '_'; the original's names below are aliases

    def _alias(name):
        return property(lambda self: getattr(self, name), lambda self, value: setattr(self, name, value),
                        doc=f'The original\'s name of {name}.')
    itemidmap = _alias('itemidmap_')  # item ids in index order (a pandas Index)
    weights = _alias('weights_')  # {parameter name: float32 array}, the trained weights
    opt_values = _alias('opt_values_')  # {optimiser state name: array}
    support = _alias('support_')  # number of training events of each item (see retrain_state)
    del _alias

    def _graph_key(self):
        p = self._parsed_params()
        shape = (('n_items', self.n_items),)  # the graphs have static shapes
        return tuple((k, str(p[k])) for k in HYPERPARAMETERS if k not in ('n_epochs', 'verbose')) + shape

    @property
    def n_items(self):
        return len(self.itemidmap_)

    @property
    def embedding_size(self):
        return embedding_size(self._parsed_params())

    # -- parameters ----------------------------------------------------------------------------------

    # -- the network ---------------------------------------------------------------------------------

    def _dropout(self, x, p):
        """Inverted dropout: x times a mask of 0 (probability p) and 1 / (1 - p). The masks are inputs of
        the training step, drawn by numpy from the model's seed (see training.TrainingStep): as fast as a random op
        in the graph on the C backend, reproducible on every backend, and a plain product keeps the
        fused element-wise loop around it vectorised (a comparison inside it did not)."""
        if p == 0:
            return x
        mask = pt.tensor(f'dropout_mask{len(self._dropout_masks)}', dtype=FLOAT, shape=x.type.shape)
        self._dropout_masks.append((mask, p))
        return x * mask

    def _forward(self, X, H_prev, training, input_rows=None):
        """Hidden states after reading items X (M) from states H_prev (list of M x L).
        input_rows, when given, holds the input table's rows already gathered for X (the sparse
        training path)."""
        p_embed = self.hyperparameters_['dropout_p_embed'] if training else 0.0
        p_hidden = self.hyperparameters_['dropout_p_hidden'] if training else 0.0
        table = 'Wx0' if self._onehot_input else 'E' if 'E' in self.params else 'Wy'
        rows = self.params[table][X] if input_rows is None else input_rows  # M x 3L (one-hot) or M x K
        if self._onehot_input:
            x_proj = rows + self.params['Bh0']  # M x 3L
        else:
            x = self._dropout(rows, p_embed)  # M x K
            x_proj = pt.dot(x, self.params['Wx0']) + self.params['Bh0']  # M x 3L
        H = []
        for l in range(len(self.layers_)):
            if l > 0:
                x_proj = pt.dot(H[-1], self.params[f'Wx{l}']) + self.params[f'Bh{l}']
            h = gru_step(x_proj, H_prev[l], self.params[f'Wrz{l}'], self.params[f'Wh{l}'], self._hidden_act,
                         self.params.get(f'Bhc{l}'))  # M x L
            H.append(self._dropout(h, p_hidden))
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
        final_act = self.hyperparameters_['final_act']
        if ranking and is_strictly_increasing(final_act):
            return H, scores
        if final_act == 'softmax_logit':
            return H, _softmax(scores)
        return H, self._final_act(scores)

    # -- the training graph --------------------------------------------------------------------------

    def _build(self):
        """Creates the shared variables from self.weights_ and the training step's graph (compiled when
        training starts: loading a model to predict does not compile it).

        Every graph has static shapes (the JAX backend needs them): the mini-batch always has
        batch_size rows, and the item-indexed parameters one extra row, after the n_items real ones,
        that padded rows read and write."""
        hp = self.hyperparameters_ = self._parsed_params()
        self.layers_ = hp['layers']
        self._onehot_input = not hp['constrained_embedding'] and not self.embedding_size
        self._hidden_act = parse_activation(hp['hidden_act'])
        self._final_act = parse_activation(hp['final_act'], final=True)
        item_params = [n for n in ('E', 'Wx0', 'Wy', 'By') if n in self.weights_ and (n != 'Wx0' or self._onehot_input)]
        with_pad_row = lambda n, w: np.concatenate([w, np.zeros((1,) + w.shape[1:], FLOAT)]) if n in item_params else w
        with pytensor.config.change_flags(floatX=FLOAT):
            self.params = OrderedDict((n, static_shared(with_pad_row(n, w), n)) for n, w in self.weights_.items())
            self.H = self._state_buffers(hp['batch_size'])
            self.P_target = static_shared(np.zeros(self.n_items + 1, dtype=FLOAT), 'logq_target')
            self.P_sample = static_shared(np.zeros(self.n_items + 1, dtype=FLOAT), 'logq_sample')
            optimizer = Optimizer(hp['adapt'], hp['adapt_params'], hp['learning_rate'], hp['momentum'], hp['lmbd'],
                                  hp['grad_cap'])
            input_table = 'Wy' if hp['constrained_embedding'] else 'E' if 'E' in self.params else 'Wx0'
            self.training_step_ = TrainingStep(
                self.params, item_params, self.H, input_table, self._training_network, self._output,
                self._training_loss, optimizer, hp['batch_size'], hp['n_sample'], self.n_items,
                hp['constrained_embedding'], self.compile_function, hp['backend'])
        self._compiled_for = self._graph_key()
        self._fns = {}
        self._push_state()

    def _log_support(self, alpha):
        return np.append(alpha * np.log(np.maximum(self.support_, 1)), 0).astype(FLOAT)

    def _training_network(self, X, H_prev, input_rows):
        """The network of the training step (dropout on), reading the gathered input rows; returns the new
        states and the dropout masks it takes as inputs, with their p."""
        self._dropout_masks = []
        H = self._forward(X, H_prev, training=True, input_rows=input_rows)
        return H, self._dropout_masks

    def _training_loss(self, logits, T, samples, cols):
        """The loss of each row of the training scores (B x N), with the logQ correction of sampled softmax."""
        hp = self.hyperparameters_
        if hp['logq']:
            log_q = pt.concatenate([self.P_target[T], self.P_sample[samples]])  # N
            logits = logits - np.float32(hp['logq']) * log_q
        Yhat = self._final_act(logits)  # B x N
        loss = functools.partial(LOSSES[hp['loss']], smoothing=np.float32(hp['smoothing']))
        return row_loss_op(hp['loss'], loss, Yhat, cols, hp['bpreg'])

    def compile_function(self, inputs, outputs, updates=None):
        return compile_function(inputs, outputs, updates, self._parsed_params()['backend'])

    # -- training ------------------------------------------------------------------------------------

    def fit(self, data, sample_store=10000000, store_type='gpu', *, retrain=False, retrain_state=RETRAIN_STATE,
            n_epochs=None, valid_data=None, valid_cutoff=20, valid_metric='mrr', keep_best=False, patience=None,
            callback=None):
        """Trains on a session log (DataFrame with session, item and time columns); returns self.

        sample_store: how many negative sample ids to draw ahead in one go. store_type ('gpu' or 'cpu')
        is accepted for scripts written for the original, where it chose where the sample store lived;
        it has no effect here. Everything after it is keyword-only.

        retrain=False builds a new model. retrain=True continues training the current (trained or
        loaded) one: its weights are kept and items never seen before are appended with fresh rows.
        retrain_state says what else is kept (see RETRAIN_STATES): 'carried' keeps the optimiser state
        (Adagrad accumulators, momentum, Adam's moments and step count) and adds the new data's events
        to the item supports that sampling and logq read; 'fresh' does as the original's retrain (commit
        4b91663) did: the optimiser state restarts from zero and the supports are the new data's alone,
        so items absent from it are not sampled. n_epochs overrides the hyper-parameter for this call.
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
        if retrain_state not in RETRAIN_STATES:
            raise ValueError(f'retrain_state={retrain_state!r}: use one of {list(RETRAIN_STATES)}')
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
            itemidmap = self.itemidmap_.append(pd.Index(seen[~pd.Index(seen).isin(self.itemidmap_)]))
        else:
            itemidmap = pd.Index(np.sort(seen) if _sortable(seen) else seen)
        items, offsets, order = session_arrays(data, itemidmap, *keys, params['time_sort'], 'training data')
        if (np.diff(offsets) < 2).all():
            raise ValueError('the training data has no session with two or more events: nothing to learn from')

        if params['adapt'] == 'adadelta' and params['learning_rate'] != 1.0:
            warnings.warn(f"adapt='adadelta' takes steps of its own size: learning_rate={params['learning_rate']} "
                          'is ignored (as in the original, which set it to 1.0)', stacklevel=2)

        # Checks passed: from here on the model changes (its hyper-parameters stay as they were given).
        self.hyperparameters_ = params
        self._pred_sessions = None  # sessions of predict_next_batch restart with the new weights
        self.history_ = self.history_ if retrain else []
        self._rng = np.random.default_rng([params['seed'], len(self.history_)])
        if retrain:
            self._pull_state()
            before = (self.itemidmap_, self.support_.copy(), OrderedDict(self.weights_), dict(self.opt_values_),
                      len(self.history_))
            self._grow(itemidmap[self.n_items:])
            if retrain_state == 'fresh':
                self.opt_values_ = {}  # missing accumulators are zero (TrainingStep.set_state)
                self.support_ = np.zeros(self.n_items)
        else:
            self.itemidmap_ = itemidmap
            self.lineage_ = uuid.uuid4().hex
            self.support_ = np.zeros(self.n_items)
            self.weights_ = init_weights(params, self.n_items, self._rng)
            self.opt_values_ = {}
            self._architecture = self._architecture_of(params)
        counts = data[params['item_key']].value_counts()
        self.support_[self.itemidmap_.get_indexer(counts.index)] += counts.to_numpy()
        if self._compiled_for != self._graph_key():
            self._build()
        else:
            self._push_state()
        self.training_step_.rng = np.random.default_rng([params['seed'], len(self.history_), 1])  # dropout masks
        try:
            max_steps = n_epochs * (len(items) - (len(offsets) - 1))  # a step trains on one event or more
            with SampleStore(sample_cdf(self.support_, params['sample_alpha']), params['n_sample'], sample_store,
                             np.random.default_rng([params['seed'], len(self.history_), 2]), max_steps) as samples:
                self._train(samples, items, offsets, order, n_epochs, valid_data, valid_cutoff, valid_metric,
                            keep_best, patience, callback)
        finally:
            if retrain and len(self.history_) == before[-1]:  # NaN or Ctrl-C before an epoch of the new data ended
                self.itemidmap_, self.support_, self.weights_, self.opt_values_, _ = before
                if self._compiled_for != self._graph_key():
                    self._build()
                else:
                    self._push_state()
        return self

    def retrain(self, data, sample_store=10000000, n_epochs=None, retrain_state=RETRAIN_STATE, **fit_options):
        """Continues training on new data: fit(data, retrain=True, ...). retrain_state: 'carried' keeps
        the optimiser state and accumulates the item supports; 'fresh' restarts both, as the original did
        (see fit and RETRAIN_STATES)."""
        return self.fit(data, sample_store=sample_store, retrain=True, retrain_state=retrain_state,
                        n_epochs=n_epochs, **fit_options)

    @staticmethod
    def _architecture_of(params):
        return {name: params[name] for name in ARCHITECTURE}

    def _check_retrainable(self, params):
        if self.itemidmap_ is None:
            raise ValueError('retrain needs a trained or loaded model; call fit(data) first')
        changed = {n: (v, params[n]) for n, v in self._architecture.items() if params[n] != v}
        if changed:
            raise ValueError(f'cannot retrain with a different architecture {changed} (trained, now); '
                             'these shape the weights: build a new GRU4Rec and fit it instead')

    def _train(self, samples, items, offsets, order, n_epochs, valid_data, valid_cutoff, valid_metric, keep_best,
               patience, callback):
        """The epochs of session-parallel training (training.train_epochs) on the session arrays."""
        p = self.hyperparameters_
        min_slots = 1 if p['n_sample'] else 2  # without samples a lone session has no negative

        def epoch_batches():
            session_order = self._rng.permutation(order) if p['train_random_order'] else order
            return session_parallel_batches(items, offsets, session_order, p['batch_size'], min_slots)

        def save():
            self._pull_state()
            return self.weights_, self.opt_values_

        def restore(snapshot):
            if snapshot is not None:
                self.weights_, self.opt_values_ = snapshot
            self._push_state()

        def validate():
            recall, mrr = evaluate_gpu(self, valid_data, session_key=p['session_key'], item_key=p['item_key'],
                                       time_key=p['time_key'], cut_off=[valid_cutoff])
            return {f'recall@{valid_cutoff}': float(recall[valid_cutoff]),
                    f'mrr@{valid_cutoff}': float(mrr[valid_cutoff])}
        train_epochs(self.training_step_, samples, epoch_batches, len(items) - (len(offsets) - 1), n_epochs,
                     self.history_, save, restore, validate if valid_data is not None else None,
                     f'{valid_metric}@{valid_cutoff}', keep_best, patience, callback, p['verbose'])

    def _pull_state(self):
        """Copies weights and optimiser state out of the compiled graph (self.weights_, self.opt_values_):
        the snapshot that a failed or interrupted epoch returns to."""
        self.weights_, self.opt_values_ = self.training_step_.get_state()

    def _push_state(self):
        """Loads self.weights_ and self.opt_values_ into the compiled graph's shared variables."""
        self.training_step_.set_state(self.weights_, self.opt_values_)
        backend = self.hyperparameters_['backend']
        set_shared(self.P_target, self._log_support(1.0), backend)
        set_shared(self.P_sample, self._log_support(self.hyperparameters_['sample_alpha']), backend)

    def _grow(self, added):
        """Appends items never seen before: fresh parameter rows, zero optimiser state and support."""
        if len(added) == 0:
            return
        self.itemidmap_ = self.itemidmap_.append(pd.Index(added))
        fresh = init_weights(self._parsed_params(), self.n_items, self._rng, n_rows=len(added))
        for name, rows in fresh.items():
            self.weights_[name] = np.concatenate([self.weights_[name], rows])
        self.support_ = np.concatenate([self.support_, np.zeros(len(added))])
        for name in fresh:
            for key in (f'{kind}_{name}' for kind in OPT_STATE_KINDS if f'{kind}_{name}' in self.opt_values_):
                value = self.opt_values_[key]
                self.opt_values_[key] = np.concatenate([value, np.zeros((len(added),) + value.shape[1:], FLOAT)])

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
                          lambda: self._state_buffers(batch))
        step = self.compiled(('predict_next_batch', batch, with_items),
                             lambda: self._compile_stateful_step(H, with_items))
        if self._pred_sessions is None or len(self._pred_sessions) != batch:
            self._pred_sessions = np.full(batch, None, dtype=object)
        keep = (session_ids == self._pred_sessions).astype(FLOAT)
        self._pred_sessions = session_ids.astype(object)
        (scores,) = to_host([call(step, X, keep, items)])  # batch x C
        index = pd.Index(np.asarray(predict_for_item_ids)) if with_items else self.itemidmap_
        return pd.DataFrame(scores.T, index=index)

    def _state_buffers(self, batch):
        """Shared variables for the hidden states of `batch` sessions (zeros; on the device for JAX)."""
        H = [static_shared(np.zeros((batch, L), dtype=FLOAT), f'H{l}') for l, L in enumerate(self.layers_)]
        for h in H:
            set_shared(h, h.get_value(borrow=True), self.hyperparameters_['backend'])
        return H

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
        p = self._parsed_params()
        if int(k) < 1:
            raise ValueError(f'k must be a positive number of items, got {k!r}')
        if int(batch_size) < 1:
            raise ValueError(f'batch_size must be a positive number of sessions, got {batch_size!r}')
        k = min(int(k), self.n_items)
        if isinstance(sessions, dict):
            rows = [(sid, pos, item) for sid, its in sessions.items() for pos, item in enumerate(its)]
            sessions = pd.DataFrame(rows, columns=[p['session_key'], p['time_key'], p['item_key']])
        items, offsets, _ = session_arrays(sessions, self.itemidmap_, p['session_key'], p['item_key'],
                                           p['time_key'], what='sessions')
        ordered = sort_log(sessions, p['session_key'], p['time_key'])  # positions, not labels: the index may repeat
        known = ordered[p['item_key']].isin(self.itemidmap_).to_numpy()
        session_ids = pd.unique(ordered[p['session_key']].to_numpy()[known])
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
                p['session_key']: np.repeat(session_ids[batch], k), 'rank': np.tile(np.arange(1, k + 1), len(batch)),
                p['item_key']: self.itemidmap_[top.ravel()], 'score': np.take_along_axis(scores, top, 1).ravel()}))
        result = pd.concat(results, ignore_index=True)
        if exclude_seen:  # when k exceeds the unseen items, the seen ones (score -inf) filled the top k
            result = result[result['score'] > -np.inf].reset_index(drop=True)
        return result

    def _item_indices(self, item_ids, what):
        idx = self.itemidmap_.get_indexer(np.asarray(item_ids))
        if (idx < 0).any():
            unknown = np.asarray(item_ids)[idx < 0][:5].tolist()
            raise ValueError(f'{what} holds items the model was not trained on, e.g. {unknown}')
        return idx.astype(np.int32)

    def _require_trained(self):
        if self.itemidmap_ is None:
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
        arrays = {f'param/{n}': w for n, w in self.weights_.items()}
        arrays.update({f'opt/{n}': np.asarray(v) for n, v in self.opt_values_.items()})
        arrays['support'] = self.support_
        modelfile.write(path, self.get_params(), self.history_, self.itemidmap_, arrays, self.lineage_)

    @classmethod
    def loadmodel(cls, path):
        """Loads a model written by savemodel. The file is untrusted input: modelfile.read checks all of it
        against the architecture its hyper-parameters declare before anything is built (tests/README.md
        lists the checks), and never executes code from it."""
        params, history, itemidmap, arrays, lineage = modelfile.read(
            path, lambda raw: cls()._parsed_params(**raw), model_file_layout)
        if (arrays['support'] < 0).any() or arrays.get('opt/t', 0) < 0:
            raise ValueError(f'{str(path)!r}: item supports and the optimiser step count cannot be negative')
        model = cls(**params)
        model.itemidmap_ = itemidmap
        model.support_ = arrays['support']
        model.history_ = history
        model.lineage_ = lineage
        model.weights_ = OrderedDict((k[len('param/'):], v) for k, v in arrays.items() if k.startswith('param/'))
        model.opt_values_ = {k[len('opt/'):]: v for k, v in arrays.items() if k.startswith('opt/')}
        model._architecture = model._architecture_of(params)
        model._build()
        return model


GRU4Rec.__doc__ = GRU4Rec.__doc__.rstrip() + '\n' + ''.join(f'    {name}={default!r}: {text}.\n'
                                                               for name, (default, _, text) in HYPERPARAMETERS.items())


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


def _sortable(values):
    try:
        np.sort(values)
        return True
    except TypeError:
        return False
