"""The training engine behind the GRU4Rec estimator: the padded sparse training step, the optimisers as
graph definitions, the negative sample store, and the epoch loop (validation, early stopping, NaN and
Ctrl-C rollback).

The estimator (gru4rec.py) hands this module its network; nothing here knows the model's equations.
A step reads a session-parallel mini-batch (sessions.py) padded to a static shape, gathers only the
item rows it touches, and updates them with their summed gradient: the exact sparse gradient.
"""
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytensor
import pytensor.tensor as pt
from pytensor.compile.builders import OpFromGraph
from pytensor.gradient import DisconnectedType
from pytensor.graph.replace import clone_replace
from pytensor.graph.traversal import graph_inputs
from tqdm import tqdm

from backends import call, set_shared, to_host
from losses import parse_activation
from sessions import FLOAT, session_parallel_blocks

# TrainingStep.packed prepares the inputs of this many steps at a time, at most this many bytes of them.
PACKED_BLOCK_STEPS, PACKED_BLOCK_BYTES = 64, 4 << 20
# SampleStore draws this many uniforms at a time into one buffer and maps them to items in one compiled call
# that runs without the GIL (as the draw does): a block of 10M samples needs 8 MB of uniforms, not 80 MB and
# as much again in numpy's temporaries, and the training loop's thread never waits for the GIL long.
SAMPLE_CHUNK = 1 << 20
# SplitMix64 (Steele, Lea and Flood 2014): its increment and the multipliers of its output function.
SPLITMIX_GAMMA, SPLITMIX_M1, SPLITMIX_M2 = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9),
                                           np.uint64(0x94D049BB133111EB))

# adapt -> its adapt_params' defaults (decay, or the betas of Adam); None is SGD.
ADAPT_DEFAULTS = {None: [], 'adagrad': [], 'rmsprop': [0.9], 'adadelta': [0.95], 'adam': [0.9, 0.999]}
# The optimiser accumulators that a parameter may have; a model file names them f'{kind}_{parameter}'.
OPT_STATE_KINDS = ('adagrad', 'rmsprop', 'adadelta_g', 'adadelta_d', 'adam_m', 'adam_v', 'velocity')
# Training steps between two reads of their losses (the non-finite check and the progress bar). A read waits
# for the device to finish every step queued before it; between reads the host prepares the next
# mini-batches while the device trains on the previous ones.
CHECK_EVERY = 256


def static_shared(value, name):
    """A shared variable whose shape is fixed when the graph is compiled."""
    return pytensor.shared(value, name=name, shape=value.shape)


class Optimizer:
    """The parameter updates of one training step as a graph: optional global-norm clipping (grad_cap),
    the adaptive step (adapt: None (SGD), 'adagrad', 'rmsprop', 'adadelta', 'adam'), L2 (lmbd) added
    to the step as decoupled weight decay (after the adaptive scaling, so it never enters the
    accumulators; rows only when a step reads them), heavy-ball momentum. As in the original,
    Adadelta takes steps of its own size (learning rate 1).

    state[parameter name][kind] holds the accumulators (shared variables, shaped like the parameter),
    created as the graph needs them; t counts Adam's steps."""

    def __init__(self, adapt, adapt_params, learning_rate, momentum, lmbd, grad_cap):
        self.adapt, self.momentum, self.lmbd, self.grad_cap = adapt, momentum, lmbd, grad_cap
        self.args = [np.float32(a) for a in (adapt_params or ADAPT_DEFAULTS[adapt])]
        self.learning_rate = np.float32(1.0 if adapt == 'adadelta' else learning_rate)
        self.state = OrderedDict()
        self.t = pytensor.shared(np.float32(0), name='t')

    def accumulator(self, param, kind):
        """The accumulator `kind` of a parameter (zeros shaped like it), created once."""
        state = self.state.setdefault(param.name, OrderedDict())
        if kind not in state:
            state[kind] = static_shared(np.zeros_like(param.get_value(borrow=True)), f'{kind}_{param.name}')
        return state[kind]

    def adapted_step(self, param, grad, rows):
        """The step direction for one gradient, and the accumulator updates; `rows` is None for a dense
        parameter, else the indices the gradient's rows belong to (accumulators are gathered and
        scattered)."""
        updates = OrderedDict()

        def read(kind):
            acc = self.accumulator(param, kind)
            return acc, (acc if rows is None else acc[rows])

        def write(acc, value):
            updates[acc] = value if rows is None else pt.set_subtensor(acc[rows], value)

        eps = np.float32(1e-6)
        if self.adapt is None:
            return grad, updates
        if self.adapt == 'adagrad':
            acc, a = read('adagrad')
            a_new = a + grad ** 2
            write(acc, a_new)
            return grad / pt.sqrt(a_new + eps), updates
        if self.adapt == 'rmsprop':
            (decay,) = self.args
            acc, a = read('rmsprop')
            a_new = decay * a + (1 - decay) * grad ** 2
            write(acc, a_new)
            return grad / pt.sqrt(a_new + eps), updates
        if self.adapt == 'adadelta':
            (rho,) = self.args
            acc, a = read('adadelta_g')
            acc_d, ad = read('adadelta_d')
            a_new = rho * a + (1 - rho) * grad ** 2
            step = grad * pt.sqrt(ad + eps) / pt.sqrt(a_new + eps)
            write(acc, a_new)
            write(acc_d, rho * ad + (1 - rho) * step ** 2)
            return step, updates
        # Adam with both bias corrections right (the original used beta1 for both and fed g^2 into
        # the first moment on the sparse path).
        beta1, beta2 = self.args
        acc_m, m = read('adam_m')
        acc_v, v = read('adam_v')
        m_new = beta1 * m + (1 - beta1) * grad
        v_new = beta2 * v + (1 - beta2) * grad ** 2
        write(acc_m, m_new)
        write(acc_v, v_new)
        t = self.t + 1
        return (m_new / (1 - beta1 ** t)) / pt.sqrt(v_new / (1 - beta2 ** t) + eps), updates

    def updates(self, targets, grads):
        """Updates for (parameter, rows) pairs given the gradients w.r.t. the parameter (rows=None) or
        w.r.t. its gathered rows."""
        updates = OrderedDict()
        if self.grad_cap > 0:
            norm = pt.sqrt(sum((g ** 2).sum() for g in grads))
            scale = pt.minimum(np.float32(1), np.float32(self.grad_cap) / (norm + np.float32(1e-12)))
            grads = [g * scale for g in grads]
        for (param, rows), grad in zip(targets, grads):
            step, opt_updates = self.adapted_step(param, grad, rows)
            updates.update(opt_updates)
            if self.lmbd:
                step = step + np.float32(self.lmbd) * (param if rows is None else param[rows])
            delta = -self.learning_rate * step
            if self.momentum:
                vel = self.accumulator(param, 'velocity')
                delta = np.float32(self.momentum) * (vel if rows is None else vel[rows]) + delta
                updates[vel] = delta if rows is None else pt.set_subtensor(vel[rows], delta)
            updates[param] = param + delta if rows is None else pt.inc_subtensor(param[rows], delta)
        if self.adapt == 'adam':
            updates[self.t] = self.t + 1
        return updates


def row_loss_op(name, loss, logits, cols, bpreg, final_act='linear'):
    """loss(final_act(logits), bpreg=bpreg, cols=cols) (the loss of each row of the scores, see gru4rec's
    losses) as one op, named f'row_loss:{name}:{final_act}', of inputs (logits, cols, bpreg), with the
    activation's and the loss's graph inside. A backend with a kernel for the loss computes the activation,
    the loss and its gradient in a few passes over each row while the row is in cache (the C backend's
    RowBPRMax for BPR-max, with an ELU or no final activation inside); any other runs the graph inside.
    The gradient is the op f'row_loss:{name}:{final_act}_LOp' of inputs (logits, cols, bpreg, loss, upstream
    gradient); it is the gradient of the graph inside, w.r.t. logits only (cols and bpreg are not trained).
    Of cols and bpreg, the op takes those the loss reads (bpreg: BPR-max's only): an unused input of the
    graph inside is an error where PyTensor runs it as written (the Python linker, e.g. mode FAST_COMPILE)."""
    activation = parse_activation(final_act, final=True)
    inner = [logits.type(), cols.type(), pt.scalar('bpreg', dtype=FLOAT)]
    scores = activation(inner[0])
    scores.name = 'row_loss:scores'  # where a kernel that computes the loss but not the activation takes over
    output = loss(scores, bpreg=inner[2], cols=inner[1])
    read = set(graph_inputs([output]))
    kept = [i for i, var in enumerate(inner) if i == 0 or var in read]
    inner = [inner[i] for i in kept]
    outer = [[logits, cols, pt.constant(np.float32(bpreg), dtype=FLOAT)][i] for i in kept]

    def gradient(inputs, outputs, output_grads):
        return ([pytensor.grad(None, inputs[0], known_grads={outputs[0]: output_grads[0]})]
                + [DisconnectedType()() for _ in inputs[1:]])

    op = OpFromGraph(inner, [output], pullback=gradient, connection_pattern=[[True]] + [[False]] * (len(inner) - 1),
                     name=f'row_loss:{name}:{final_act}')
    return op(*outer)


def packed(variables, name):
    """A vector input holding `variables` (tensors of static shapes and one dtype) one after another, and
    (variable, its part of the vector) pairs to replace them with in a graph."""
    sizes = [int(np.prod(v.type.shape)) for v in variables]
    vector = pt.tensor(name, dtype=variables[0].dtype, shape=(sum(sizes),))
    ends = np.cumsum(sizes)
    return vector, [(v, vector[end - size:end].reshape(v.type.shape)) for v, size, end in zip(variables, sizes, ends)]


class TrainingStep:
    """One compiled training step of session-parallel mini-batches, with static shapes (the JAX backend
    needs them): the batch always has batch_size rows, and the item-indexed parameters one extra row,
    after the n_items real ones, that padded rows read and write.

    params: the network's shared variables by name, the item-indexed ones (item_params) with the pad
    row; states: the hidden states (batch_size x L each) carried between steps; input_table: the
    item-indexed parameter that the inputs read ('Wx0', 'E', or 'Wy' with a constrained embedding);
    network(X, H_prev, input_rows) -> (H_new, dropout): the network's new states for inputs whose
    input_table rows are input_rows, and its dropout (mask input, p) pairs; output(h, Wy, By): the
    scores of the items whose output rows are Wy, By; row_loss(logits, T, samples, cols): the loss of
    each row (see gru4rec's losses); compile_function(inputs, outputs, updates, keep_buffers=True) compiles
    it for `backend`, where set_state keeps the values (on the device for JAX). Call the step with a mini-batch of
    M <= batch_size sessions and its samples; it returns the cost.
    """

    def __init__(self, params, item_params, states, input_table, network, output, row_loss, optimizer,
                 batch_size, n_sample, n_items, constrained_embedding, compile_function, backend='c'):
        self.params, self.item_params, self.states, self.backend = params, item_params, states, backend
        self.optimizer, self.batch_size, self.n_sample = optimizer, batch_size, n_sample
        self.constrained_embedding, self.pad_item = constrained_embedding, n_items
        self.slot = np.zeros(n_items + 1, dtype=np.int32)  # scratch space of distinct_rows
        self.rng = np.random.default_rng(0)  # draws the dropout masks; the estimator seeds it
        B, N = batch_size, batch_size + n_sample
        X = pt.tensor('X', dtype='int32', shape=(B,))  # input items (padded rows read the pad item)
        T = pt.tensor('T', dtype='int32', shape=(B,))  # target items
        prev_rows = pt.tensor('prev_rows', dtype='int32', shape=(B,))  # rows of the previous state to carry
        keep = pt.tensor('keep', dtype=FLOAT, shape=(B,))  # 0 resets a slot's state
        active = pt.tensor('active', dtype=FLOAT, shape=(B,))  # 1 for the M sessions in the batch, 0 for padding
        # The item rows a step reads, each listed once (see distinct_rows), so that a row read several
        # times gets one optimiser step with its summed gradient.
        rows_Y = pt.tensor('rows_Y', dtype='int32', shape=(N,))  # distinct items of Y = [T | samples]
        inv_Y = pt.tensor('inv_Y', dtype='int32', shape=(N,))  # Y = rows_Y[inv_Y]
        rows_X = pt.tensor('rows_X', dtype='int32', shape=(B,))  # distinct inputs (constrained: those not in rows_Y)
        inv_X = pt.tensor('inv_X', dtype='int32', shape=(B,))  # X = input rows[inv_X]
        Y = rows_Y[inv_Y]  # N scored items
        cols = pt.concatenate([active, pt.ones(n_sample, dtype=FLOAT)])  # N: the columns that count

        # Sparse path: gather the item rows a step touches, differentiate w.r.t. the gathered rows.
        if constrained_embedding:  # the inputs' rows are Wy rows: in rows_Y, or after it
            reads = OrderedDict([('Wy', pt.concatenate([rows_Y, rows_X])), ('By', rows_Y)])
        else:
            reads = OrderedDict([(input_table, rows_X), ('Wy', rows_Y), ('By', rows_Y)])
        gathered = OrderedDict((name, params[name][idx]) for name, idx in reads.items())
        H_prev = [H[prev_rows] * keep[:, None] for H in states]
        H_new, self.dropout = network(X, H_prev, gathered[input_table][inv_X])
        logits = output(H_new[-1], gathered['Wy'][inv_Y], gathered['By'][inv_Y])  # B x N
        logits = logits - np.float32(1e9) * (1 - cols)  # padded columns score as impossible items
        cost = (row_loss(logits, T, Y[B:], cols) * active).sum() / np.float32(B)

        dense = [v for n, v in params.items() if n not in reads]
        grads = pytensor.grad(cost, dense + list(gathered.values()))
        targets = [(p, None) for p in dense] + [(params[n], idx) for n, idx in reads.items()]
        updates = optimizer.updates(targets, grads)
        for H, h in zip(states, H_new):
            updates[H] = h
        # The step's inputs travel as two vectors, one of int32 and one of float32, so that a device
        # receives two arrays a step instead of a dozen (each copy to a GPU has its own fixed cost).
        layout = [X, T, prev_rows, rows_Y, inv_Y, rows_X, inv_X], [keep, active] + [m for m, _ in self.dropout]
        (ints, int_parts), (floats, float_parts) = (packed(v, name) for v, name in zip(layout, ('ints', 'floats')))
        outputs = clone_replace([cost] + list(updates.values()), replace=dict(int_parts + float_parts))
        # Compiled when training starts (compile()): a model loaded only to predict or to be served never
        # waits for its largest graph.
        self.mask_sizes = np.array([int(np.prod(m.type.shape)) for m, _ in self.dropout], dtype=np.int64)
        self.mask_keep = np.array([1 - p for _, p in self.dropout], dtype=np.float64)
        self.function = None
        self._graph = [ints, floats], outputs[0], OrderedDict(zip(updates, outputs[1:]))
        self._compile_function = compile_function

    def compile(self):
        """Compiles the step, once, and loads the compiled loops that prepare its inputs (numba compiles them,
        or reads them from its cache, on their first call: a second or so, which would otherwise land in the
        first epoch); returns the compiled function."""
        if self.function is None:
            with pytensor.config.change_flags(floatX=FLOAT):  # as when the graph was built: a float32 step
                self.function = self._compile_function(*self._graph, keep_buffers=True)
            next(session_parallel_blocks(np.zeros(2, dtype=np.int32), np.array([0, 2]), np.array([0]), 1))
            one = np.zeros(1, dtype=np.int32)
            pack_steps(np.ones(1, dtype=np.int64), one, one, one, np.zeros(1, dtype=FLOAT),
                       np.zeros((1, self.n_sample), dtype=np.int32), np.zeros(1, dtype=np.uint64), self.mask_sizes,
                       self.mask_keep, self.batch_size, self.constrained_embedding, self.slot, self.pad_item)
        return self.function

    def inputs(self, X, T, prev_rows, keep, samples):
        """The compiled function's inputs for a mini-batch of M <= batch_size sessions and its samples.

        The batch is padded to the graph's fixed size. Every item row the step reads is listed once,
        with where each read finds it, so a row read several times (an item sampled twice, or both a
        target and a sample) gets its summed gradient and ONE optimiser step: the exact sparse
        gradient. The original applied adagrad and momentum once per read, which slows and destabilises
        the rows that are read most often."""
        seed = np.uint64(self.rng.bit_generator.random_raw())  # the step's dropout masks
        return pack_inputs(X, T, prev_rows, keep, samples, seed, self.mask_sizes, self.mask_keep, self.batch_size,
                           self.constrained_embedding, self.slot, self.pad_item)

    def packed(self, blocks, samples):
        """(ints, floats, M) of each mini-batch of `blocks` (sessions.session_parallel_blocks: M sessions a step)
        with the next step's samples: the compiled function's inputs (see inputs), prepared a block of steps
        at a time in one compiled call (pack_steps). Right after a step the caches hold its rows and products,
        and the host's work for the next one ran four to five times slower than in a loop of its own (see
        benchmarks/README.md); the same draws in the same order as step by step."""
        per_step = sum(v.type.shape[0] * np.dtype(v.dtype).itemsize for v in self._graph[0])  # bytes of ints, floats
        block = int(np.clip(PACKED_BLOCK_BYTES // per_step, 1, PACKED_BLOCK_STEPS))
        for sizes, X, T, prev_rows, keep in blocks:
            ends = np.cumsum(sizes)
            for first in range(0, len(sizes), block):
                last = min(first + block, len(sizes))
                begin, end = ends[first] - sizes[first], ends[last - 1]
                ints, floats = pack_steps(sizes[first:last], X[begin:end], T[begin:end], prev_rows[begin:end],
                                          keep[begin:end], samples.take(last - first),
                                          self.rng.bit_generator.random_raw(last - first), self.mask_sizes,
                                          self.mask_keep, self.batch_size, self.constrained_embedding, self.slot,
                                          self.pad_item)
                yield from zip(ints, floats, sizes[first:last].tolist())

    def run(self, ints, floats):
        """One training step of the compiled function on its inputs (inputs, packed); returns its cost, which on
        JAX stays on the device until read."""
        return call(self.compile(), ints, floats)

    def __call__(self, X, T, prev_rows, keep, samples):
        """One training step of a mini-batch and its samples; returns its cost, as run."""
        return self.run(*self.inputs(X, T, prev_rows, keep, samples))

    def with_pad_row(self, name, value):
        """An item-indexed parameter's value (or its optimiser state's) with the padding row appended."""
        if name not in self.item_params:
            return value
        return np.concatenate([value, np.zeros((1,) + value.shape[1:], dtype=value.dtype)])

    def without_pad_row(self, name, value):
        return value[:-1] if name in self.item_params else value

    def get_state(self):
        """(weights, optimiser values) as numpy arrays (copies, read from a device in one go) without the
        pad row: {name: array} and {f'{kind}_{name}': array, 't': step count} (the names of a model file)."""
        accumulators = [(name, acc) for name, state in self.optimizer.state.items() for acc in state.values()]
        shared = list(self.params.values()) + [acc for _, acc in accumulators] + [self.optimizer.t]
        values = to_host([var.get_value(borrow=True) for var in shared])
        weights = OrderedDict((n, self.without_pad_row(n, v)) for n, v in zip(self.params, values))
        opt_values = {acc.name: self.without_pad_row(name, v)
                      for (name, acc), v in zip(accumulators, values[len(self.params):])}
        opt_values['t'] = values[-1]
        return weights, opt_values

    def set_state(self, weights, opt_values):
        """Loads weights and optimiser values (as get_state returns them; missing accumulators are zero),
        onto the device on JAX."""
        for name, var in self.params.items():
            set_shared(var, self.with_pad_row(name, weights[name]), self.backend)
        for name, state in self.optimizer.state.items():
            for acc in state.values():
                value = opt_values.get(acc.name)
                set_shared(acc, self.with_pad_row(name, np.zeros_like(weights[name]) if value is None else value),
                           self.backend)
        set_shared(self.optimizer.t, np.float32(opt_values.get('t', 0)), self.backend)
        for H in self.states:  # sessions start afresh
            set_shared(H, np.zeros(H.type.shape, dtype=H.dtype), self.backend)


def train_epochs(step, samples, epoch_batches, n_pairs, n_epochs, history, save, restore, validate=None,
                 valid_name=None, keep_best=False, patience=None, callback=None, verbose=True):
    """The epochs of session-parallel training, with a snapshot after each completed epoch.

    step: the TrainingStep; samples: the SampleStore; epoch_batches(): the next epoch's blocks of mini-batches
    (sessions.session_parallel_blocks); n_pairs: the events an epoch predicts (for the progress bar).
    history: the list that gets each completed epoch's record (epoch, loss, seconds and the validation
    figures). save() snapshots the trained state after an epoch and returns it; restore(snapshot) loads one
    back (None: the last saved).
    validate(): the validation figures {name: value} after an epoch, valid_name the one to maximise;
    keep_best ends with the best epoch's state, patience stops after that many epochs without progress.
    callback(record) is called after each epoch. A NaN or infinite loss restores the last completed epoch
    and raises FloatingPointError; Ctrl-C (KeyboardInterrupt) restores it and returns.

    The losses are read every CHECK_EVERY steps and at the end of the epoch (add_losses), not after each
    step: reading one waits for the step, which would keep the host from preparing the next mini-batch
    while a device trains on this one. A loss that turns NaN is found at the next read, which names its
    step; the steps run after it are lost with the rest of the epoch."""
    best, since_best = None, 0
    step.compile()  # before the first epoch's clock starts
    for epoch in range(1, n_epochs + 1):
        t0 = time.time()
        total, n_steps, n_events = 0.0, 0, 0
        costs, sizes = [], []  # the losses not read yet, as the step returns them, and their steps' sessions
        progress = tqdm(total=n_pairs, desc=f'Epoch{epoch}', leave=False, unit='e', disable=None if verbose else True)
        # The batches have exactly the graph's input types, so the per-call input checks (most of the
        # call's overhead) are skipped while training.
        step.function.trust_input = True
        try:
            for ints, floats, M in step.packed(epoch_batches(), samples):
                costs.append(step.run(ints, floats))
                sizes.append(M)
                n_steps += 1
                n_events += M
                if n_steps % CHECK_EVERY == 0:
                    total = add_losses(total, costs, sizes, epoch, n_steps, restore)
                    seconds = time.time() - t0
                    progress.set_postfix(loss=f'{total / n_events:.4f}', mb_s=f'{n_steps / seconds:.0f}', refresh=False)
                    progress.update(n_events - progress.n)
            total = add_losses(total, costs, sizes, epoch, n_steps, restore)
        except KeyboardInterrupt:
            restore(None)
            print(f'Training interrupted in epoch {epoch}: the model keeps the weights of the '
                  f'{len(history)} completed epoch(s).', file=sys.stderr, flush=True)
            return
        finally:
            step.function.trust_input = False
            progress.close()
        seconds = time.time() - t0
        record = {'epoch': len(history) + 1, 'loss': float(total) / max(n_events, 1), 'seconds': seconds}
        snapshot = save()
        line = (f'Epoch{epoch} --> loss: {record["loss"]:.6f} \t({seconds:.2f}s) \t'
                f'[{n_steps / seconds:.2f} mb/s | {n_events / seconds:.0f} e/s]')
        if validate is not None:
            record.update(validate())
            score = record[valid_name]
            line += f' \tvalid {valid_name}: {score:.6f}'
            if best is None or score > best[0]:
                best, since_best = (score, snapshot, len(history) + 1), 0
            else:
                since_best += 1
        history.append(record)
        if verbose:
            print(line, flush=True)
        if callback is not None:
            callback(dict(record))
        if patience and since_best >= patience:
            if verbose:
                print(f'Stopping early: no progress on {valid_name} for {patience} epoch(s)')
            break
    if keep_best and best is not None and best[2] != len(history):
        _, snapshot, best_epoch = best
        restore(snapshot)
        if verbose:
            print(f'Keeping the weights of epoch {best_epoch} (best valid {valid_name})')


def add_losses(total, costs, sizes, epoch, n_steps, restore):
    """total plus the losses of the steps not read yet (costs, emptied), each weighted by its step's sessions
    (sizes, emptied), as the original weighs them, added one at a time in the losses' float32. A NaN or
    infinite loss restores the last completed epoch (restore(None)) and raises FloatingPointError naming
    the epoch and the step (n_steps: the steps of the epoch so far) where it first appeared."""
    for i, (cost, size) in enumerate(zip(to_host(costs), sizes)):
        if not np.isfinite(cost):
            restore(None)
            raise FloatingPointError(
                f'the loss became {cost} at epoch {epoch}, step {n_steps - len(costs) + i + 1}; the model keeps '
                f'the weights of the last completed epoch. Lower learning_rate or set grad_cap.')
        total += cost * size
    costs.clear()
    sizes.clear()
    return total


@numba.njit(cache=True)
def distinct_rows(X, T, samples, constrained, slot, pad_item):
    """The item rows a training step reads, each listed once, and where each read finds its row.

    Y = [T | samples] (N items) is read from rows_Y (padded to N with pad_item): Y == rows_Y[inv_Y].
    The inputs X (B items) are read from rows_X (padded to B): X == rows_X[inv_X]; with a constrained
    embedding they are Wy rows, read from [rows_Y | rows_X], where rows_X holds only the inputs not in
    rows_Y. slot is scratch space indexed by item, its entries for the step's items set before use.
    O(N) in a compiled loop (numpy's np.unique was a noticeable part of a step)."""
    B, N = len(X), len(T) + len(samples)
    rows_Y, inv_Y = np.empty(N, np.int32), np.empty(N, np.int32)
    rows_X, inv_X = np.empty(B, np.int32), np.empty(B, np.int32)
    _distinct_rows_into(X, T, samples, constrained, slot, pad_item, rows_Y, inv_Y, rows_X, inv_X)
    return rows_Y, inv_Y, rows_X, inv_X


@numba.njit(cache=True, inline='always')
def _distinct_rows_into(X, T, samples, constrained, slot, pad_item, rows_Y, inv_Y, rows_X, inv_X):
    """distinct_rows into the given vectors."""
    B, N = len(X), len(T) + len(samples)
    rows_Y[:] = pad_item
    rows_X[:] = pad_item
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


@numba.njit(cache=True, inline='always')
def splitmix64(seed, j):
    """The j-th (from 0) output of SplitMix64 started at seed: a function of the counter, so that every entry of
    a dropout mask is its own draw, which the compiled loop computes many at a time."""
    z = seed + (j + np.uint64(1)) * SPLITMIX_GAMMA
    z = (z ^ (z >> np.uint64(30))) * SPLITMIX_M1
    z = (z ^ (z >> np.uint64(27))) * SPLITMIX_M2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def pack_inputs(X, T, prev_rows, keep, samples, seed, mask_sizes, mask_keep, B, constrained, slot, pad_item):
    """The training step's two input vectors for a mini-batch of M <= B sessions, in one compiled pass
    instead of a dozen numpy calls:
    ints = [X | T | prev_rows | rows_Y | inv_Y | rows_X | inv_X] (5B + 2N; the batch padded to B rows,
    reading the pad item, see distinct_rows) and floats = [keep | active | dropout masks] (2B + the masks'
    sizes). Entry j of the masks (counted over all of them, in order) keeps its value with probability
    mask_keep[k] of its mask k, where the upper 32 bits of splitmix64(seed, j) are below mask_keep[k] * 2^32,
    and is then 1 / mask_keep[k] in float32 (inverted dropout): a fraction of what numpy's uniforms cost the
    host (benchmarks/README.md, "Dropout masks from a counter")."""
    sizes, seeds = np.full(1, len(X), np.int64), np.full(1, seed, np.uint64)
    ints, floats = pack_steps(sizes, X, T, prev_rows, keep, samples.reshape(1, -1), seeds, mask_sizes, mask_keep, B,
                              constrained, slot, pad_item)
    return ints[0], floats[0]


@numba.njit(cache=True)
def pack_steps(sizes, X, T, prev_rows, keep, samples, seeds, mask_sizes, mask_keep, B, constrained, slot, pad_item):
    """pack_inputs of the steps of a block (sessions.session_parallel_blocks: step j's M = sizes[j] entries of X,
    T, prev_rows and keep following step j - 1's), step j with the samples' row j and seeds[j]: their rows of
    (steps x (5B + 2N), steps x (2B + the masks' sizes)), in one call."""
    n_steps, N = len(sizes), B + samples.shape[1]
    ints = np.empty((n_steps, 5 * B + 2 * N), np.int32)
    floats = np.zeros((n_steps, 2 * B + mask_sizes.sum()), np.float32)
    start = 0
    for step in range(n_steps):
        M, out, f = sizes[step], ints[step], floats[step]
        Xp, Tp = out[:B], out[B:2 * B]  # the batch padded, where the step reads it
        Xp[:] = pad_item
        Tp[:] = pad_item
        Xp[:M] = X[start:start + M]
        Tp[:M] = T[start:start + M]
        out[2 * B:3 * B] = 0
        out[2 * B:2 * B + M] = prev_rows[start:start + M]
        _distinct_rows_into(Xp, Tp, samples[step], constrained, slot, pad_item, out[3 * B:3 * B + N],
                            out[3 * B + N:3 * B + 2 * N], out[3 * B + 2 * N:4 * B + 2 * N], out[4 * B + 2 * N:])
        f[:M] = keep[start:start + M]
        f[B:B + M] = 1
        at = 0
        for k in range(len(mask_sizes)):
            threshold, scale = np.uint64(mask_keep[k] * 4294967296.0), np.float32(1 / mask_keep[k])
            for j in range(at, at + mask_sizes[k]):
                f[2 * B + j] = scale if splitmix64(seeds[step], np.uint64(j)) >> np.uint64(32) < threshold else 0
            at += mask_sizes[k]
        start += M
    return ints, floats


def sample_cdf(support, alpha):
    """The cumulative distribution of the negative samples: item i drawn with probability proportional
    to support[i] ** alpha (CIKM 2018, section 3.1)."""
    p = support.astype(np.float64) ** alpha
    cdf = np.cumsum(p)
    return cdf / cdf[-1]


class SampleStore:
    """The negative samples of the training steps, n_sample item indices per step, drawn from `cdf` in
    blocks of about `size` (the original's sample store; size 0 draws for one step at a time).

    The next block is drawn in a background thread while the training uses the current one: numpy's
    generator and the compiled mapping to items release the GIL, so with a core to spare the refills cost
    the training loop nothing (benchmarks/sample_store.py times a block). One generator draws the blocks in
    order, so training stays reproducible. A block holds at most max_steps steps: a small training does not
    pay for 10M samples."""

    def __init__(self, cdf, n_sample, size, rng, max_steps=None):
        self.cdf, self.n_sample, self.rng, self.inverse = cdf, n_sample, rng, None
        self.n_steps = max(1, min(int(size) // max(n_sample, 1), max_steps or np.inf))
        self.block, self.position, self.uniforms = None, self.n_steps, None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix='gru4rec-samples') if n_sample else None
        self.pending = self.worker.submit(self.draw) if n_sample else None

    def draw(self, into=None):
        """A block of n_steps x n_sample item indices, item i drawn with probability cdf[i] - cdf[i - 1]:
        the generator's uniforms in order, SAMPLE_CHUNK at a time; written into the used-up block `into` where
        there is one. Two blocks and the uniforms' buffer are allocated once: new ones for every block (40 MB
        each by default) had the kernel clear their pages again, most of the sampling thread's time, taken
        from the cores that train (benchmarks/README.md, "The samples' blocks written again")."""
        if self.inverse is None:  # built here, in the worker, on the first block
            self.inverse = InverseCDF(self.cdf)
        size = min(SAMPLE_CHUNK, self.n_steps * self.n_sample)
        if into is None:
            indices, uniforms = np.empty((self.n_steps, self.n_sample), dtype=np.int32), np.empty(size)
        else:  # the worker's refills, one at a time
            if self.uniforms is None:
                self.uniforms = np.empty(size)
            indices, uniforms = into, self.uniforms
        flat = indices.reshape(-1)
        for start in range(0, len(flat), SAMPLE_CHUNK):
            chunk = flat[start:start + SAMPLE_CHUNK]
            u = uniforms[:len(chunk)]
            self.inverse(self.rng.random(out=u), out=chunk)
        np.minimum(flat, len(self.cdf) - 1, out=flat)  # u so close to 1 that it rounds past the last cdf
        return indices

    def next(self):
        """The samples of the next training step (an empty vector when n_sample is 0), the caller's copy."""
        return self.take(1)[0].copy()

    def take(self, n):
        """The samples of the next n training steps, n x n_sample: a view of the block, valid until the next call,
        or the caller's own where it spans two blocks."""
        if not self.n_sample:
            return np.zeros((n, 0), dtype=np.int32)
        parts = []
        while n:
            if self.position == self.n_steps:
                parts = [part.copy() for part in parts]  # the used block is drawn again from now on
                used = self.block
                self.block, self.position = self.pending.result(), 0
                self.pending = self.worker.submit(self.draw, used)
            rows = min(n, self.n_steps - self.position)
            parts.append(self.block[self.position:self.position + rows])
            self.position += rows
            n -= rows
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        if self.worker is not None:
            self.worker.shutdown(wait=False, cancel_futures=True)


class InverseCDF:
    """np.searchsorted(cdf, u, side='right') for many u, in O(1) per value. A guide table gives, for each
    of 4 * len(cdf) equal bins of [0, 1), the first index whose cdf exceeds the bin's start; a few steps
    forward from there reach the answer, and binary search finishes any that max_steps did not."""

    def __init__(self, cdf):
        self.bins = 4 * len(cdf)
        self.guide = np.searchsorted(cdf, np.arange(self.bins + 1) / self.bins, side='right').astype(np.int32)
        self.cdf = np.append(cdf, np.inf)  # stepping stops at the end

    def __call__(self, u, max_steps=4, out=None):
        """The index of each u (int32), into `out` when given."""
        out = np.empty(len(u), dtype=np.int32) if out is None else out
        _inverse_cdf(u, self.guide, self.cdf, self.bins, max_steps, out)
        return out


@numba.njit(cache=True, nogil=True)
def _inverse_cdf(u, guide, cdf, bins, max_steps, out):
    for k in range(len(u)):
        i = guide[int(u[k] * bins)]
        steps = 0
        while cdf[i] <= u[k]:
            if steps == max_steps:
                i = np.searchsorted(cdf, u[k], side='right')
                break
            i += 1
            steps += 1
        out[k] = i


def inverse_cdf(cdf, u, max_steps=4):
    """np.searchsorted(cdf, u, side='right') for many u, through an InverseCDF built for this call."""
    return InverseCDF(cdf)(np.asarray(u, dtype=np.float64), max_steps)
