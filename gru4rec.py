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

This module holds the GRU4Rec estimator. Behind it, imported one way (tests/test_layers.py checks the
order): hyperparams.py (the table of hyper-parameters, their parsing and checks), network.py (the
weights and the GRU network), losses.py (activations and losses), recommend.py (top-k for sessions),
training.py (the padded sparse training step, the optimisers, the sample store), evaluation.py,
sessions.py (session logs and session-parallel mini-batches), backends.py (the only place that knows
about backends; cbackend.py's optional C kernels) and modelfile.py (the file format).
"""
import copy
import functools
import inspect
import math
import os
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytensor
import pytensor.tensor as pt
from numpy.typing import ArrayLike
from pytensor.tensor.variable import TensorVariable

import modelfile
from backends import BACKENDS, call, compile_function, set_shared, to_host  # noqa: F401  (BACKENDS: public)
from evaluation import evaluate_gpu
from hyperparams import ARCHITECTURE, HYPERPARAMETERS, SIGNATURE, parse_hyperparameters
from hyperparams import docstring as hyperparams_docstring
from losses import LOSSES
from network import GRUNetwork, embedding_size, init_weights, parameter_shapes
from recommend import top_k
from sessions import FLOAT, session_arrays, session_parallel_blocks, validate_log
from training import (OPT_STATE_KINDS, Optimizer, SampleStore, TrainingStep, row_loss_op, sample_cdf,
                      static_shared, train_epochs)
from training import distinct_rows, inverse_cdf  # noqa: F401  (public names of gru4rec before issue 13)
from losses import parse_activation  # noqa: F401  (public names of gru4rec before issue 27)
from network import gru_step  # noqa: F401

# What a retrain keeps besides the weights. 'carried': the optimiser state and the item supports (sampling,
# logq) of all data trained on so far. 'fresh': neither, as the original's retrain (hidasib/GRU4Rec 4b91663),
# which built new zero accumulators and velocities at every fit and drew samples by the new data's
# popularity. The default is the one that scored better on rsc15_100k and yoochoose1_64 halves
# (benchmarks/retrain_state.py).
RETRAIN_STATES = ('carried', 'fresh')
RETRAIN_STATE = 'carried'

class GRU4Rec:
    """GRU4Rec model (see the module docstring), a scikit-learn style estimator: the constructor and
    set_params only store the hyper-parameters, as given; fit learns. sklearn.base.clone works on it.

    Learned state (set by fit, retrain and loadmodel; the original's names without the '_' are
    aliases): itemidmap_ (item ids in index order), weights_, opt_values_ (optimiser state), support_
    (training events per item; after a retrain with retrain_state='fresh', the new data's), history_
    (per-epoch records), lineage_ (an id drawn when a model is fitted from scratch and kept by every
    retrain: a live service keeps its sessions' states only within one lineage), hyperparameters_ (the parsed
    hyper-parameters trained with), layers_, and the compiled graph's parts: params_ (the weights' shared
    variables), H_ (the training step's hidden states), P_target_ and P_sample_ (logQ of the targets
    and the samples), network_ (network.GRUNetwork) and training_step_ (training.TrainingStep).

    Hyper-parameters (names and defaults of the original implementation; see hyperparams.py):
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The signature is SIGNATURE's (inspect.signature(GRU4Rec) shows it); binding raises Python's
        # TypeError for an unknown or repeated name, as a written-out signature would.
        given = SIGNATURE.bind(*args, **kwargs).arguments
        for name, h in HYPERPARAMETERS.items():
            setattr(self, name, given[name] if name in given else copy.deepcopy(h.default))

    __init__.__signature__ = SIGNATURE.replace(
        parameters=[inspect.Parameter('self', inspect.Parameter.POSITIONAL_OR_KEYWORD), *SIGNATURE.parameters.values()])

    # -- hyper-parameters ----------------------------------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The hyper-parameters as stored by the constructor and set_params ({name: value as given}).
        deep is scikit-learn's: no hyper-parameter is an estimator, so it changes nothing."""
        return {name: getattr(self, name) for name in HYPERPARAMETERS}

    def _parsed_params(self, **overrides):
        return parse_hyperparameters(**dict(self.get_params(), **overrides))

    def set_params(self, **params: Any) -> 'GRU4Rec':
        """Sets hyper-parameters as the constructor does: stored as given (values or command-line strings
        such as '200/200', 'True', '0.1'), after checking them all together. Those that shape the weights
        (hyperparams.ARCHITECTURE) cannot change on a trained model."""
        parsed = self._parsed_params(**params)
        if self.itemidmap_ is not None:
            current = self._parsed_params()
            changed = [n for n in ARCHITECTURE if n in params and parsed[n] != current[n]]
            if changed:
                raise ValueError(f'{changed} change the shape of a trained model; build a new GRU4Rec instead')
        for name, value in params.items():
            setattr(self, name, value)
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
    support = _alias('support_')  # number of training events of each item
    params = _alias('params_')  # {parameter name: shared variable} of the compiled graphs
    H = _alias('H_')  # the training step's hidden states (shared variables)
    P_target = _alias('P_target_')
    P_sample = _alias('P_sample_')
    del _alias

    def _graph_key(self):
        p = self._parsed_params()
        shape = (('n_items', self.n_items),)  # the graphs have static shapes
        return tuple((k, str(p[k])) for k in HYPERPARAMETERS if k not in ('n_epochs', 'verbose')) + shape

    @property
    def n_items(self) -> int:
        return len(self.itemidmap_)

    @property
    def embedding_size(self) -> int:
        return embedding_size(self._parsed_params())

    # The interface that evaluation.py scores a model through (the baselines implement it too).

    @property
    def state_sizes(self) -> list[int]:
        """Widths of the per-session states carried between steps (one per GRU layer)."""
        self._require_trained()
        return list(self.layers_)

    def symbolic_step(self, X: TensorVariable, H_prev: Sequence[TensorVariable],
                      candidates: TensorVariable | None = None,
                      ranking: bool = False) -> tuple[list[TensorVariable], TensorVariable]:
        """One step of the trained network (network.GRUNetwork.step): the new states and the scores of all
        items, or of the item indices `candidates`, for sessions reading items X."""
        self._require_trained()
        return self.network_.step(X, H_prev, candidates, ranking)

    # -- the training graph --------------------------------------------------------------------------

    def _build(self):
        """Creates the shared variables from self.weights_ and the training step's graph (compiled when
        training starts: loading a model to predict does not compile it).

        Every graph has static shapes (the JAX backend needs them): the mini-batch always has
        batch_size rows, and the item-indexed parameters one extra row, after the n_items real ones,
        that padded rows read and write."""
        hp = self.hyperparameters_ = self._parsed_params()
        self.layers_ = hp['layers']
        onehot_input = not hp['constrained_embedding'] and not self.embedding_size
        item_params = [n for n in ('E', 'Wx0', 'Wy', 'By') if n in self.weights_ and (n != 'Wx0' or onehot_input)]
        with_pad_row = lambda n, w: np.concatenate([w, np.zeros((1,) + w.shape[1:], FLOAT)]) if n in item_params else w
        with pytensor.config.change_flags(floatX=FLOAT):
            self.params_ = OrderedDict((n, static_shared(with_pad_row(n, w), n)) for n, w in self.weights_.items())
            self.network_ = GRUNetwork(self.params_, hp, self.n_items)
            self.H_ = self._state_buffers(hp['batch_size'])
            self.P_target_ = static_shared(np.zeros(self.n_items + 1, dtype=FLOAT), 'logq_target')
            self.P_sample_ = static_shared(np.zeros(self.n_items + 1, dtype=FLOAT), 'logq_sample')
            optimizer = Optimizer(hp['adapt'], hp['adapt_params'], hp['learning_rate'], hp['momentum'], hp['lmbd'],
                                  hp['grad_cap'])
            input_table = 'Wy' if hp['constrained_embedding'] else 'E' if 'E' in self.params_ else 'Wx0'
            self.training_step_ = TrainingStep(
                self.params_, item_params, self.H_, input_table, self.network_.training_network, self.network_.output,
                self._training_loss, optimizer, hp['batch_size'], hp['n_sample'], self.n_items,
                hp['constrained_embedding'], self.compile_function, hp['backend'])
        self._compiled_for = self._graph_key()
        self._fns = {}
        self._push_state()

    def _log_support(self, alpha):
        return np.append(alpha * np.log(np.maximum(self.support_, 1)), 0).astype(FLOAT)

    def _training_loss(self, logits, T, samples, cols):
        """The loss of each row of the training scores (B x N), with the logQ correction of sampled softmax."""
        hp = self.hyperparameters_
        if hp['logq']:
            log_q = pt.concatenate([self.P_target_[T], self.P_sample_[samples]])  # N
            logits = logits - np.float32(hp['logq']) * log_q
        loss = functools.partial(LOSSES[hp['loss']], smoothing=np.float32(hp['smoothing']))
        return row_loss_op(hp['loss'], loss, logits, cols, hp['bpreg'], hp['final_act'])  # the final activation inside

    def compile_function(self, inputs, outputs, updates=None, keep_buffers=False) -> Callable[..., Any]:
        return compile_function(inputs, outputs, updates, self._parsed_params()['backend'], keep_buffers)

    # -- training ------------------------------------------------------------------------------------

    def fit(self, data: pd.DataFrame, sample_store: int = 10000000, store_type: str = 'gpu', *, retrain: bool = False,
            retrain_state: str = RETRAIN_STATE, n_epochs: int | None = None, valid_data: pd.DataFrame | None = None,
            valid_cutoff: int = 20,
            valid_metric: str = 'mrr', keep_best: bool = False, patience: int | None = None,
            callback: Callable[[dict], Any] | None = None) -> 'GRU4Rec':
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

    def retrain(self, data: pd.DataFrame, sample_store: int = 10000000, n_epochs: int | None = None,
                retrain_state: str = RETRAIN_STATE, **fit_options: Any) -> 'GRU4Rec':
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
            return session_parallel_blocks(items, offsets, session_order, p['batch_size'], min_slots)

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
        set_shared(self.P_target_, self._log_support(1.0), backend)
        set_shared(self.P_sample_, self._log_support(self.hyperparameters_['sample_alpha']), backend)

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

    def predict_next_batch(self, session_ids: ArrayLike, input_item_ids: ArrayLike,
                           predict_for_item_ids: ArrayLike | None = None, batch: int = 100) -> pd.DataFrame:
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

    def recommend(self, sessions: pd.DataFrame | dict[Any, Sequence[Any]], k: int = 20, exclude_seen: bool = False,
                  batch_size: int = 512) -> pd.DataFrame:
        """Top-k next items for each session, given its events so far (recommend.top_k).

        sessions: a DataFrame in the training format (session, item, time columns) or a dict
        {session id: [item ids in order]}. Items the model does not know are skipped; sessions with no
        known item get no recommendation. exclude_seen=True never recommends an item already in the
        session (so a session gets fewer than k items when fewer than k are unseen). Returns a DataFrame
        with columns session key, 'rank' (1 = best), item key, 'score', the sessions in the order of the
        input (the dict's, or the log's when its sessions are contiguous and in time order, else by session id).
        """
        self._require_trained()
        p = self._parsed_params()
        return top_k(self, sessions, k, exclude_seen, batch_size, p['session_key'], p['item_key'], p['time_key'])

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

    def savemodel(self, path: str | os.PathLike) -> None:
        """Saves hyper-parameters, item map, weights, optimiser state and item supports to `path`, atomically
        (see modelfile.py: JSON and a numpy archive, no pickled objects). Item ids must be integers,
        floats or strings (a ValueError says so before anything is written)."""
        self._require_trained()
        self._pull_state()
        arrays = {f'param/{n}': w for n, w in self.weights_.items()}
        arrays.update({f'opt/{n}': np.asarray(v) for n, v in self.opt_values_.items()})
        arrays['support'] = self.support_
        modelfile.write(path, self._parsed_params(), self.history_, self.itemidmap_, arrays, self.lineage_)

    @classmethod
    def loadmodel(cls, path: str | os.PathLike) -> 'GRU4Rec':
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


GRU4Rec.__doc__ = GRU4Rec.__doc__.rstrip() + '\n' + hyperparams_docstring()


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
