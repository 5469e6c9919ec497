"""The GRU network of GRU4Rec (ICLR 2016, section 3; CIKM 2018 for the shared negative samples and the
constrained embedding): its weights, their initialisation, one step of a layer, and GRUNetwork, the
forward pass over the weights' shared variables that the training step and the prediction graphs use.
"""
from collections import OrderedDict

import numpy as np
import pytensor.tensor as pt

from losses import is_strictly_increasing, parse_activation, softmax
from sessions import FLOAT

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


class GRUNetwork:
    """The forward pass of the trained network over the shared variables `params` ({name: shared
    variable}, the item-indexed ones with one padding row after the n_items real ones), for the parsed
    hyper-parameters `hp`. The training step reads it through training_network and output, the
    prediction graphs through step."""

    def __init__(self, params, hp, n_items):
        self.params, self.n_items = params, n_items
        self.layers = list(hp['layers'])
        self.onehot_input = not hp['constrained_embedding'] and not embedding_size(hp)
        self.hidden_act = parse_activation(hp['hidden_act'])
        self.final_act_name = hp['final_act']
        self.final_act = parse_activation(hp['final_act'], final=True)
        self.p_embed, self.p_hidden = hp['dropout_p_embed'], hp['dropout_p_hidden']
        self.dropout_masks = []

    def dropout(self, x, p):
        """Inverted dropout: x times a mask of 0 (probability p) and 1 / (1 - p). The masks are inputs of
        the training step, drawn by numpy from the model's seed (see training.TrainingStep): as fast as a random op
        in the graph on the C backend, reproducible on every backend, and a plain product keeps the
        fused element-wise loop around it vectorised (a comparison inside it did not)."""
        if p == 0:
            return x
        mask = pt.tensor(f'dropout_mask{len(self.dropout_masks)}', dtype=FLOAT, shape=x.type.shape)
        self.dropout_masks.append((mask, p))
        return x * mask

    def forward(self, X, H_prev, training, input_rows=None):
        """Hidden states after reading items X (M) from states H_prev (list of M x L).
        input_rows, when given, holds the input table's rows already gathered for X (the sparse
        training path)."""
        p_embed = self.p_embed if training else 0.0
        p_hidden = self.p_hidden if training else 0.0
        table = 'Wx0' if self.onehot_input else 'E' if 'E' in self.params else 'Wy'
        rows = self.params[table][X] if input_rows is None else input_rows  # M x 3L (one-hot) or M x K
        if self.onehot_input:
            x_proj = rows + self.params['Bh0']  # M x 3L
        else:
            x = self.dropout(rows, p_embed)  # M x K
            x_proj = pt.dot(x, self.params['Wx0']) + self.params['Bh0']  # M x 3L
        H = []
        for l in range(len(self.layers)):
            if l > 0:
                x_proj = pt.dot(H[-1], self.params[f'Wx{l}']) + self.params[f'Bh{l}']
            h = gru_step(x_proj, H_prev[l], self.params[f'Wrz{l}'], self.params[f'Wh{l}'], self.hidden_act,
                         self.params.get(f'Bhc{l}'))  # M x L
            H.append(self.dropout(h, p_hidden))
        return H  # list of M x L

    @staticmethod
    def output(h, Wy, By):
        """Scores of the items whose output rows are Wy, By: o = h·Wyᵀ + By (M x number of rows)."""
        return pt.dot(h, Wy.T) + By

    def training_network(self, X, H_prev, input_rows):
        """The network of the training step (dropout on), reading the gathered input rows; returns the new
        states and the dropout masks it takes as inputs, with their p."""
        self.dropout_masks = []
        H = self.forward(X, H_prev, training=True, input_rows=input_rows)
        return H, self.dropout_masks

    def step(self, X, H_prev, candidates=None, ranking=False):
        """One step of the network: the new states and the final scores of all items (or of the item
        indices `candidates`) for sessions reading items X (M). Scores: M x C.
        ranking=True: scores in the same order are enough, so a strictly increasing final activation
        (all but relu) is skipped; this also avoids ties that only float32 rounding of the activation
        makes (e.g. softmax probabilities that underflow to 0). Otherwise final_act='softmax_logit'
        gives the softmax of the scores, as the original's prediction did (it trains on the logits)."""
        H = self.forward(X, H_prev, training=False)
        Wy, By = self.params['Wy'][:self.n_items], self.params['By'][:self.n_items]
        if candidates is not None:
            Wy, By = Wy[candidates], By[candidates]
        scores = self.output(H[-1], Wy, By)  # M x C
        if ranking and is_strictly_increasing(self.final_act_name):
            return H, scores
        if self.final_act_name == 'softmax_logit':
            return H, softmax(scores)
        return H, self.final_act(scores)
