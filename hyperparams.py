"""GRU4Rec's hyper-parameters: one table, HYPERPARAMETERS, of their names, defaults, parsers, checks and
descriptions. The names and defaults are the original implementation's; GRU4Rec's signature (SIGNATURE),
its docstring, parse_hyperparameters and the command line (run.py, paropt.py) derive from it.

A value is given as Python value or as a command-line string ('200/200', 'True', '0.1'); the parser
reads it, and the check says what is wrong with it, given all the parsed values (some checks look at
two hyper-parameters, e.g. a loss and the final activation it needs).
"""
import inspect
from collections import OrderedDict
from typing import Any, Callable, NamedTuple

import numpy as np

from backends import BACKENDS
from losses import LOSSES, REQUIRED_FINAL_ACT, parse_activation
from training import ADAPT_DEFAULTS


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


# Checks: a function of (value, all parsed values) -> what is wrong with the value, or None.

def _ok(value, p):
    return None


def _positive(value, p):
    return None if value > 0 else 'must be positive'


def _finite_non_negative(value, p):
    return None if value >= 0 and np.isfinite(value) else 'must be a finite number >= 0'


def _probability(value, p):
    return None if 0 <= value < 1 else 'must be in [0, 1)'


def _loss(value, p):
    return None if value in LOSSES else f'unknown loss; use one of {sorted(LOSSES)}'


def _final_act(value, p):
    parse_activation(value, final=True)  # an unknown activation: its own error, listing the known ones
    required = REQUIRED_FINAL_ACT.get(p['loss'])
    if required and value != required:
        return f"loss {p['loss']!r} needs final_act={required!r}"
    if value in REQUIRED_FINAL_ACT.values() and p['loss'] not in REQUIRED_FINAL_ACT:
        return "softmax final activations go with loss='cross-entropy' or 'xe_logit'"
    return None


def _hidden_act(value, p):
    parse_activation(value)
    return None


def _layers(value, p):
    return None if value and min(value) > 0 else 'give one positive size per GRU layer, e.g. [100] or "200/200"'


def _batch_size(value, p):
    if value <= 0:
        return 'must be positive'
    if p['n_sample'] == 0 and value < 2:
        return 'with n_sample=0 the other sessions of the mini-batch are the only negatives: use >= 2'
    return None


def _n_sample(value, p):
    return None if value >= 0 else 'must not be negative'


def _embedding(value, p):
    return None if value == 'layersize' or value >= 0 else "must be 0 (none), a positive size or 'layersize'"


def _adapt(value, p):
    known = [k for k in ADAPT_DEFAULTS if k]
    return None if value in ADAPT_DEFAULTS else f'unknown optimiser; use one of {known} or None'


def _adapt_params(value, p):
    n_values = len(ADAPT_DEFAULTS.get(p['adapt'], ()))
    return None if not value or len(value) == n_values else f"{p['adapt']} takes {n_values} values"


def _backend(value, p):
    return None if value in BACKENDS else f'use one of {sorted(BACKENDS)}'


class HyperParameter(NamedTuple):
    default: Any
    parse: Callable[[Any], Any]
    check: Callable[[Any, dict], str | None]
    text: str


H = HyperParameter
# name -> HyperParameter, in the order of GRU4Rec's signature.
HYPERPARAMETERS = OrderedDict([
    ('loss', H('bpr-max', _as_str, _loss, "'cross-entropy' (with final_act='softmax'), 'xe_logit' (with "
                                          "'softmax_logit'), 'bpr', 'top1', 'bpr-max', 'top1-max'")),
    ('final_act', H('linear', _as_str, _final_act, "activation of the scores: 'linear', 'relu', 'tanh', 'leaky-X', "
                                                   "'elu-X', 'selu-X-Y', 'softmax', 'softmax_logit'")),
    ('hidden_act', H('tanh', _as_str, _hidden_act, 'activation of the GRU candidate state (as final_act, without the '
                                                   'softmaxes)')),
    ('layers', H([100], _as_int_list, _layers, "GRU layer sizes, e.g. [100] or '200/200'")),
    ('n_epochs', H(10, int, _positive, 'epochs that fit trains')),
    ('batch_size', H(32, int, _batch_size, 'sessions trained in parallel (ICLR 2016, section 3.1.1)')),
    ('dropout_p_hidden', H(0.0, float, _probability, 'dropout on the GRU layers\' outputs')),
    ('dropout_p_embed', H(0.0, float, _probability, 'dropout on the item embedding')),
    ('learning_rate', H(0.1, float, _finite_non_negative, 'step size (Adadelta takes steps of its own size)')),
    ('momentum', H(0.0, float, _finite_non_negative, 'heavy-ball momentum')),
    ('lmbd', H(0.0, float, _finite_non_negative, 'L2 regularisation, as decoupled weight decay')),
    ('embedding', H(0, _as_embedding, _embedding, "0 (the first layer reads one-hot items through an n_items x 3L "
                                                  "matrix), K or 'layersize' (a separate K-dimensional item "
                                                  'embedding)')),
    ('n_sample', H(2048, int, _n_sample, 'extra negatives per step, shared by the mini-batch (CIKM 2018)')),
    ('sample_alpha', H(0.75, float, _finite_non_negative, 'negatives drawn by support ** sample_alpha')),
    ('smoothing', H(0.0, float, _probability, 'label smoothing of the cross-entropy losses')),
    ('constrained_embedding', H(False, _as_bool, _ok, 'True uses the output weights Wy as the input embedding')),
    ('adapt', H('adagrad', _as_adapt, _adapt, "'adagrad', 'rmsprop', 'adadelta', 'adam' or None (SGD)")),
    ('adapt_params', H([], _as_float_list, _adapt_params, 'the decay of rmsprop and adadelta, or the betas of adam')),
    ('grad_cap', H(0.0, float, _finite_non_negative, 'clips the gradients to this global norm (0: no clipping)')),
    ('bpreg', H(1.0, float, _finite_non_negative, 'weight of the score regularisation of BPR-max')),
    ('logq', H(0.0, float, _finite_non_negative, 'weight of the logQ correction of sampled softmax (with '
                                                 'cross-entropy)')),
    ('sigma', H(0.0, float, _finite_non_negative, 'the scale of the initial weights (0: sqrt(6 / (rows + columns)) '
                                                  'per block)')),
    ('init_as_normal', H(False, _as_bool, _ok, 'normal instead of uniform initial weights')),
    ('train_random_order', H(False, _as_bool, _ok, 'shuffles the sessions in every epoch')),
    ('time_sort', H(True, _as_bool, _ok, 'sessions enter training by the time of their first event (else by id)')),
    ('session_key', H('SessionId', _as_str, _ok, 'the session column of the data')),
    ('item_key', H('ItemId', _as_str, _ok, 'the item column of the data')),
    ('time_key', H('Time', _as_str, _ok, 'the time column of the data')),
    ('seed', H(42, int, _ok, 'seeds initialisation, sampling, dropout and session order: same seed and data, same '
                             'model')),
    ('backend', H('c', _as_str, _backend, "how PyTensor compiles the graphs: 'c' (C virtual machine) or 'jax'")),
    ('verbose', H(True, _as_bool, _ok, 'prints the loss of each epoch and shows progress')),
    ('reset_after', H(False, _as_bool, _ok, "(not in the original) False is the original's GRU cell, the reset gate "
                                            'applied to the previous state before the recurrent product; True '
                                            'applies it after, with a hidden-side candidate bias, as cuDNN and '
                                            'torch.nn.GRUCell do (see gru_step)')),
])
del H
# The order in which the checks run: the first failing one is reported.
CHECK_ORDER = ('loss', 'final_act', 'hidden_act', 'layers', 'n_epochs', 'batch_size', 'n_sample', 'learning_rate',
               'momentum', 'lmbd', 'grad_cap', 'bpreg', 'logq', 'sigma', 'sample_alpha', 'dropout_p_hidden',
               'dropout_p_embed', 'smoothing', 'embedding', 'adapt', 'adapt_params', 'backend')
SIGNATURE = inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=h.default)
                               for name, h in HYPERPARAMETERS.items()])
# Changing these changes the model's parameters or what they mean: they are fixed once a model is trained.
ARCHITECTURE = ('layers', 'embedding', 'constrained_embedding', 'reset_after')


def docstring():
    """The hyper-parameters' lines of GRU4Rec's docstring."""
    return ''.join(f'    {name}={h.default!r}: {h.text}.\n' for name, h in HYPERPARAMETERS.items())


def parse_hyperparameters(**values: Any) -> dict:
    """All hyper-parameters parsed and validated, the defaults for those not given (strings from a
    command line are accepted). An unknown name, an unreadable value or one that fails its check gets a
    ValueError that names it and says what to give instead."""
    unknown = sorted(set(values) - set(HYPERPARAMETERS))
    if unknown:
        raise ValueError(f'unknown hyper-parameter(s) {unknown}; known ones: {list(HYPERPARAMETERS)}')
    parsed = {}
    for name, h in HYPERPARAMETERS.items():
        raw = values.get(name, h.default)
        try:
            parsed[name] = h.parse(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f'hyper-parameter {name}={raw!r} cannot be read: {e}') from None
    for name in CHECK_ORDER + tuple(n for n in HYPERPARAMETERS if n not in CHECK_ORDER):
        problem = HYPERPARAMETERS[name].check(parsed[name], parsed)
        if problem:
            raise ValueError(f'{name}={parsed[name]!r}: {problem}')
    return parsed
