"""GRU4Rec's activations and losses, as functions of symbolic tensors (PyTensor).

The losses are those of the papers that GRU4Rec's module docstring cites: TOP1 and BPR (ICLR 2016,
section 3.1.2), TOP1-max and BPR-max (CIKM 2018, section 4), the cross-entropy of a softmax over the
scored items with its logit form, label smoothing and logQ correction (applied by the model). The final
activation turns the scores into what the loss expects; hyperparams.py checks that the two fit.
"""
import numpy as np
import pytensor.tensor as pt
from pytensor.gradient import disconnected_grad

from sessions import FLOAT

# ---------------------------------------------------------------------------------------------------

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


def softmax(x):
    return pt.special.softmax(x, axis=1)  # one op, whose gradient reuses its output


ACTIVATIONS = {'linear': _linear, 'relu': _relu, 'tanh': pt.tanh, 'sigmoid': pt.sigmoid}
PARAMETRIC_ACTIVATIONS = {'leaky': (1, _leaky), 'elu': (1, _elu), 'selu': (2, _selu)}
FINAL_ONLY_ACTIVATIONS = {'softmax': softmax, 'softmax_logit': _linear}


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
