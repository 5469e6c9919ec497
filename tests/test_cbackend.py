"""The C backend's own ops (cbackend.py) against float64 numpy, on the shapes and memory layouts that
GRU4Rec's graphs give them, and the check that the rewrites really put them into the compiled training
and evaluation graphs."""
import functools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

from backends import compile_function
import cbackend
from cbackend import (MatrixReduce, OutputLayer, RowAdagrad, RowBPRMax, RowCount, RowCrossEntropy, RowGather,
                      RowScatter, RowSoftmax, ThreadedDot22, ThreadedGemm, bpr_max_rows)
from conftest import SMALL, SMALL_STORE, RecordingModel, fit_small, make_log
from evaluation import evaluate_gpu
from gru4rec import GRU4Rec
from losses import LOSSES, loss_bpr_max, loss_cross_entropy
from training import Optimizer, row_loss_op

REDUCTIONS = {'add': (pt.sum, np.sum), 'maximum': (pt.max, np.max), 'minimum': (pt.min, np.min)}


def compiled_reduction(ufunc, x, axis):
    fn = compile_function([x], REDUCTIONS[ufunc][0](x, axis=axis), backend='c')
    ops = [type(node.op) for node in fn.maker.fgraph.toposort()]
    assert MatrixReduce in ops, f'the reduction was not rewritten into MatrixReduce: {ops}'
    return fn


@pytest.mark.parametrize('ufunc', sorted(REDUCTIONS))
@pytest.mark.parametrize('axis', [0, 1, None])
@pytest.mark.parametrize('layout', ['contiguous', 'transposed', 'every other column'])
@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_matrix_reduce_equals_numpy(ufunc, axis, layout, dtype):
    rng = np.random.default_rng(0)
    source = pt.matrix('source', dtype=dtype)
    view = {'contiguous': source, 'transposed': source.T, 'every other column': source[:, ::2]}[layout]
    fn = compile_function([source], REDUCTIONS[ufunc][0](view, axis=axis), backend='c')
    assert MatrixReduce in [type(node.op) for node in fn.maker.fgraph.toposort()]
    for shape in [(32, 2080), (3, 7), (1, 5)]:
        values = (rng.standard_normal(shape) * 100).astype(dtype)
        expected = REDUCTIONS[ufunc][1](np.asarray({'contiguous': values, 'transposed': values.T,
                                                    'every other column': values[:, ::2]}[layout], np.float64),
                                        axis=axis)
        np.testing.assert_allclose(fn(values), expected, rtol=1e-6 if dtype == 'float32' else 1e-12)


@pytest.mark.parametrize('ufunc', sorted(REDUCTIONS))
def test_vector_reduce_equals_numpy(ufunc):
    values = np.random.default_rng(1).standard_normal(4097).astype('float32')
    fn = compiled_reduction(ufunc, pt.vector('v', dtype='float32'), None)
    np.testing.assert_allclose(fn(values), REDUCTIONS[ufunc][1](values.astype(np.float64)), rtol=1e-6)


def test_float32_sums_accumulate_in_float64():
    values = np.full((2, 2 ** 25 // 2), 1.0, dtype=np.float32)
    values[0, 0] = 2.0 ** 25  # a float32 accumulator would stop counting the ones
    fn = compiled_reduction('add', pt.matrix('x', dtype='float32'), None)
    assert fn(values) == 2.0 ** 25 + values.size - 1


@pytest.mark.parametrize('ufunc', ['maximum', 'minimum'])
@pytest.mark.parametrize('axis', [0, 1, None])
def test_max_and_min_propagate_nan(ufunc, axis):
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    values[1, 2] = np.nan
    fn = compiled_reduction(ufunc, pt.matrix('x', dtype='float32'), axis)
    np.testing.assert_array_equal(np.isnan(fn(values)), np.isnan(REDUCTIONS[ufunc][1](values, axis=axis)))


def test_max_of_nothing_is_an_error():
    fn = compiled_reduction('maximum', pt.matrix('x', dtype='float32'), 1)
    assert fn(np.zeros((0, 3), np.float32)).shape == (0,)
    with pytest.raises(ValueError, match='zero-size array to reduction operation maximum'):
        fn(np.zeros((3, 0), np.float32))


def test_rewrites_leave_other_row_sums_alone(caplog):
    """A row sum of a product of three matrices is no comparison to count (RowCount) and must compile
    without a rewrite failing on it."""
    a, b, c = (pt.matrix(name, dtype='float32') for name in 'abc')
    fn = compile_function([a, b, c], (a * b * c).sum(axis=1), backend='c')
    values = np.random.default_rng(2).standard_normal((3, 3, 40)).astype(np.float32)
    np.testing.assert_allclose(fn(*values), (values.astype(np.float64).prod(axis=0)).sum(axis=1), rtol=1e-5)
    assert not [r for r in caplog.records if 'Rewrite failure' in r.getMessage()], caplog.text


@pytest.mark.parametrize('rows', [1, 3])
def test_element_wise_loops_with_broadcast_and_strided_inputs(rows):
    """The loops that local_contiguous_elemwise_inputs gives copied inputs (a column broadcast, a row
    broadcast and a column slice into exp and tanh) compute what numpy does, also for a single row,
    where the row broadcast is no broadcast (the rewrite once re-applied itself there forever)."""
    x = pt.matrix('x', dtype='float32', shape=(rows, 40))
    column = pt.matrix('column', dtype='float32', shape=(rows, 1))
    row = pt.matrix('row', dtype='float32', shape=(1, 40))
    wide = pt.matrix('wide', dtype='float32', shape=(rows, 60))
    outputs = [x - x * column, pt.exp(x + row), pt.tanh(wide[:, 20:]) * x]
    fn = compile_function([x, column, row, wide], outputs, backend='c')
    rng = np.random.default_rng(3)
    X, C, R, W = (rng.standard_normal(s).astype(np.float32) for s in [(rows, 40), (rows, 1), (1, 40), (rows, 60)])
    for got, expected in zip(fn(X, C, R, W), [X - X * C, np.exp(X + R), np.tanh(W[:, 20:]) * X]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize('layout', ['contiguous', 'column slice', 'transposed'])
@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_row_gather_equals_numpy_take_and_checks_its_indices(layout, dtype):
    """x[idx] of a matrix (RowGather on the C backend) for repeated, negative and out-of-order rows, from a
    contiguous matrix, a column slice of a wider one and a transposed one, twice (the second call reuses
    the output)."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((50, 12)).astype(dtype)
    x = pt.matrix('x', dtype=dtype)
    idx = pt.vector('idx', dtype='int64')
    view = {'contiguous': lambda m: m, 'column slice': lambda m: m[:, 2:9], 'transposed': lambda m: m.T}[layout]
    fn = compile_function([x, idx], view(x)[idx] * 1)
    assert RowGather in {type(node.op) for node in fn.maker.fgraph.toposort()}
    source = view(X)
    for rows in ([3, 11, 0, 3, -1, -12, 7], [8, 7]):
        np.testing.assert_array_equal(fn(X, np.array(rows)), source[rows])
    n = len(source)
    with pytest.raises(IndexError, match=f'index {n} is out of bounds for axis 0 with size {n}'):
        fn(X, np.array([1, n]))
    with pytest.raises(IndexError, match=f'index {-n - 1} is out of bounds'):
        fn(X, np.array([-n - 1]))



@pytest.mark.parametrize('layout', ['contiguous', 'strided', 'int32'])
def test_row_gather_of_a_vector_equals_numpy_take_and_checks_its_indices(layout):
    """v[idx] of a vector (the scored items' biases and logQ, an index composed of two): RowGather on the C
    backend, for a contiguous vector, a column of a matrix and integers; repeated and negative indices."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((50, 3)).astype(np.float32)
    if layout == 'int32':
        X = rng.integers(-1000, 1000, (50, 3)).astype(np.int32)
    x = pt.matrix('x', dtype=X.dtype)
    idx = pt.vector('idx', dtype='int32')
    vector = x[:, 1] if layout == 'strided' else x.flatten()
    fn = compile_function([x, idx], vector[idx] * 1)
    assert RowGather in {type(node.op) for node in fn.maker.fgraph.toposort()}
    source = X[:, 1] if layout == 'strided' else X.flatten()
    for rows in ([3, 11, 0, 3, -1, -12, 7], [8, 7]):
        np.testing.assert_array_equal(fn(X, np.array(rows, dtype=np.int32)), source[rows])
    n = len(source)
    with pytest.raises(IndexError, match=f'index {n} is out of bounds for axis 0 with size {n}'):
        fn(X, np.array([1, n], dtype=np.int32))

def test_a_gather_of_gathered_rows_reads_the_rows_once():
    """x[a][b] (the step's distinct item rows, then the scored columns' rows from them) is computed as x[a[b]],
    one RowGather of the matrix, when only gathers read x[a]: same values, negative indices included; where
    something else reads x[a] it stays as written."""
    rng = np.random.default_rng(6)
    X = rng.standard_normal((40, 5)).astype(np.float32)
    x = pt.matrix('x', dtype='float32')
    a, b = pt.ivector('a'), pt.ivector('b')
    rows, cols = np.array([3, 39, 0, -2, 17], dtype=np.int32), np.array([4, 0, 0, -1, 2, 1, 3], dtype=np.int32)
    once = compile_function([x, a, b], [x[a][b], x[a][b[:3]]])
    gathers = [node for node in once.maker.fgraph.toposort()
               if isinstance(node.op, RowGather) and node.inputs[0].ndim == 2]  # the index's own gather aside
    assert len(gathers) == 2 and all(node.inputs[0] is once.maker.fgraph.inputs[0] for node in gathers)
    for got, expected in zip(once(X, rows, cols), [X[rows][cols], X[rows][cols[:3]]]):
        np.testing.assert_array_equal(got, expected)
    kept = compile_function([x, a, b], [x[a][b], x[a].sum()])
    gathered = [node for node in kept.maker.fgraph.toposort()
                if isinstance(node.op, RowGather) and node.inputs[0].ndim == 2]
    assert any(node.inputs[0].owner is not None for node in gathered)
    got, total = kept(X, rows, cols)
    np.testing.assert_array_equal(got, X[rows][cols])
    np.testing.assert_allclose(total, X[rows].sum(), rtol=1e-5)


def test_pieces_that_tile_a_zero_matrix_become_one_join():
    """z[:, :a] += A; z[:, a:b] += B; z[:, b:] += C on a zero matrix (the gradient of a product sliced into
    the GRU's gates) is Join(1, A, B, C) on the C backend; pieces that leave columns out stay as written."""
    rng = np.random.default_rng(8)
    values = [rng.standard_normal((4, w)).astype(np.float32) for w in (2, 3, 1)]
    a, b, c = (pt.tensor(n, dtype='float32', shape=v.shape) for n, v in zip('abc', values))
    z = pt.zeros((4, 6), dtype='float32')
    tiled = pt.inc_subtensor(pt.inc_subtensor(pt.inc_subtensor(z[:, 5:], c)[:, :2], a)[:, 2:5], b)
    gap = pt.inc_subtensor(pt.inc_subtensor(z[:, :2], a)[:, 3:6], b)
    fn = compile_function([a, b, c], [tiled, gap])
    ops = [type(node.op).__name__ for node in fn.maker.fgraph.toposort()]
    assert ops.count('Join') == 1 and ops.count('IncSubtensor') == 2, ops
    A, B, C = values
    got_tiled, got_gap = fn(*values)
    np.testing.assert_array_equal(got_tiled, np.concatenate([A, B, C], axis=1))
    expected_gap = np.zeros((4, 6), dtype=np.float32)
    expected_gap[:, :2], expected_gap[:, 3:6] = A, B
    np.testing.assert_array_equal(got_gap, expected_gap)


def c_ops(fn):
    return {type(node.op) for node in fn.maker.fgraph.toposort()} & {
        RowAdagrad, RowScatter, MatrixReduce, RowSoftmax, RowCrossEntropy, RowCount, RowGather, OutputLayer}


def test_the_c_ops_are_in_the_real_training_and_evaluation_graphs():
    """The rewrites of the C mode find their patterns in the graphs GRU4Rec and evaluate_gpu build (the
    graphs are written backend-neutrally, so a change to them could silently lose an op)."""
    log = make_log([4] * 60, seed=1)
    model = fit_small(log, loss='cross-entropy', final_act='softmax', adapt='adagrad', momentum=0.2, n_epochs=1)
    layer = {OutputLayer} if cbackend.worker_threads() > 1 else {RowCrossEntropy}
    assert c_ops(model.training_step_.function) == {RowAdagrad, MatrixReduce, RowGather} | layer
    recording = RecordingModel(model)
    evaluate_gpu(recording, log, cut_off=[5])
    assert [c_ops(fn) for fn in recording.functions] == [{MatrixReduce, RowCount, RowGather}]



class FreshBuffers(GRU4Rec):
    """GRU4Rec whose training step allocates every intermediate result anew at each call."""

    def compile_function(self, inputs, outputs, updates=None, keep_buffers=False):
        return super().compile_function(inputs, outputs, updates, keep_buffers=False)


@pytest.mark.parametrize('settings', [
    dict(loss='cross-entropy', final_act='softmax', layers=[100], n_sample=40),
    dict(loss='bpr-max', final_act='elu-0.5', layers=[600], n_sample=40, learning_rate=0.01),
    dict(loss='top1', final_act='tanh', layers=[8], embedding=5)])
def test_the_training_step_writes_into_its_last_calls_arrays_and_trains_the_same(settings):
    """A compiled training step whose intermediate results fit in KEPT_BUFFERS_BYTES keeps their arrays between
    mini-batches (each op writes over the array it made at the step before): every weight ends the same, bit for
    bit, as when each step allocates afresh, on graphs with OutputLayer and with others; a larger step (600
    units) hands its arrays back to the allocator after their last reader."""
    log = make_log([4] * 60, seed=1)
    params = dict(SMALL, batch_size=32, n_epochs=2, **settings)
    kept, fresh = (cls(**params).fit(log, sample_store=SMALL_STORE) for cls in (GRU4Rec, FreshBuffers))
    assert kept.training_step_.function.maker.linker.allow_gc == (settings['layers'] == [600])
    assert fresh.training_step_.function.maker.linker.allow_gc
    losses = [[record['loss'] for record in model.history_] for model in (kept, fresh)]
    assert losses[0] == losses[1] and losses[0][1] < losses[0][0]
    for name, weights in kept.weights.items():
        np.testing.assert_array_equal(weights, fresh.weights[name], err_msg=name)


def sparse_adagrad_both_ways(values, rows, grad, momentum, before_c=None):
    """training.Optimizer's sparse Adagrad step of the rows `rows` of values['w'] (its state from values; rows
    None: the dense step of the whole matrix) compiled on the C backend (where RowAdagrad computes it;
    before_c(fn, w) runs first) and run as written by PyTensor's Python linker, after they agree: [weights,
    state...] of each."""
    shape = values['w'].shape
    results = []
    for compile_with in ('c', 'python'):
        w = pytensor.shared(values['w'].astype(np.float32), name='w', shape=shape)
        optimizer = Optimizer('adagrad', [], 0.05, momentum, 0.0, 0.0)
        for kind in ('adagrad', 'velocity') if momentum else ('adagrad',):
            optimizer.accumulator(w, kind).set_value(values[kind].astype(np.float32))
        r, g = pt.ivector('rows'), pt.tensor('g', dtype='float32', shape=(None,) + shape[1:])
        inputs, args = ([g], [grad]) if rows is None else ([r, g], [rows, grad])
        updates = optimizer.updates([(w, None if rows is None else r)], [g])
        if compile_with == 'c':
            fn = compile_function(inputs, [], updates, backend='c')
            assert RowAdagrad in c_ops(fn)
            if before_c is not None:
                before_c(fn, w)
        else:
            fn = pytensor.function(inputs, [], updates=updates, mode='FAST_COMPILE')
        fn(*args)
        results.append([w.get_value()] + [v.get_value() for v in optimizer.state['w'].values()])
    for got, expected in zip(*results):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    return results

@pytest.mark.parametrize('momentum', [0.0, 0.3])
@pytest.mark.parametrize('shape', [(30, 6), (30,), (3000, 64)])
def test_the_sparse_adagrad_graph_becomes_row_adagrad_and_computes_the_same(momentum, shape):
    """training.Optimizer writes the sparse Adagrad step as a graph; on the C backend a rewrite computes it
    with RowAdagrad, elsewhere the graph runs as written (here PyTensor's Python linker): same values.
    An index out of bounds is an error before any row changes."""
    rng = np.random.default_rng(4)
    values = {'w': rng.standard_normal(shape), 'adagrad': rng.uniform(0.1, 1, shape),
              'velocity': rng.standard_normal(shape)}
    rows = (np.array([7, 2, 29, 0, 13], dtype=np.int32) if shape[0] == 30
            else rng.choice(shape[0], 1500, replace=False).astype(np.int32))
    grad = rng.standard_normal((len(rows),) + shape[1:]).astype(np.float32)

    def out_of_bounds(fn, w):
        bad = rows.copy()
        bad[-1] = shape[0]
        with pytest.raises(IndexError, match=f'RowAdagrad: index {shape[0]} out of bounds for {shape[0]} rows'):
            fn(bad, grad)
        np.testing.assert_array_equal(w.get_value(), values['w'].astype(np.float32))
    results = sparse_adagrad_both_ways(values, rows, grad, momentum, before_c=out_of_bounds)
    acc = values['adagrad'].astype(np.float32).astype(np.float64)
    acc[rows] += grad.astype(np.float64) ** 2
    np.testing.assert_allclose(results[0][1], acc, rtol=1e-6)


@pytest.mark.parametrize('momentum', [0.0, 0.3])
@pytest.mark.parametrize('shape', [(30, 6), (30,), (700, 300)])
def test_the_dense_adagrad_graph_becomes_row_adagrad_of_every_row_and_computes_the_same(momentum, shape):
    """The dense Adagrad step of a weight matrix (or vector) that every step updates whole, as training.Optimizer
    writes it, is RowAdagrad of all its rows on the C backend (a matrix of wide rows in pieces of fewer rows on
    every core), the graph elsewhere: same values, against float64 for the accumulator; and with weight decay
    (a step it does not match) the graph stays and is right."""
    rng = np.random.default_rng(5)
    values = {'w': rng.standard_normal(shape), 'adagrad': rng.uniform(0.1, 1, shape),
              'velocity': rng.standard_normal(shape)}
    grad = rng.standard_normal(shape).astype(np.float32)
    results = sparse_adagrad_both_ways(values, None, grad, momentum)
    acc = values['adagrad'].astype(np.float32).astype(np.float64) + grad.astype(np.float64) ** 2
    np.testing.assert_allclose(results[0][1], acc, rtol=1e-6)
    w = pytensor.shared(values['w'].astype(np.float32), name='w', shape=shape)
    g = pt.tensor('g', dtype='float32', shape=shape)
    decayed = compile_function([g], [], Optimizer('adagrad', [], 0.05, momentum, 0.01, 0.0).updates([(w, None)], [g]),
                               backend='c')
    assert RowAdagrad not in c_ops(decayed)
    decayed(grad)
    step = 0.05 * (grad / np.sqrt(grad.astype(np.float64) ** 2 + 1e-6) + 0.01 * values['w'].astype(np.float32))
    np.testing.assert_allclose(w.get_value(), values['w'].astype(np.float32) - step, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape', [(7, 5, 9), (128, 512, 800)])
def test_products_on_one_or_more_threads_equal_float64(shape):
    """Products below and above cbackend.THREADED_PRODUCT_MACS (one and product_threads() BLAS threads),
    as matrix products and as an update z += a x . y (Gemm), against float64 numpy; a small product
    after a threaded one runs on one thread again and is right too."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    X, Y, Z = (rng.standard_normal(s).astype(np.float32) for s in [(m, k), (k, n), (m, n)])
    x, y = pt.matrix('x', dtype='float32'), pt.matrix('y', dtype='float32')
    z = pytensor.shared(Z.copy(), name='z')
    product = compile_function([x, y], pt.dot(x, y))
    update = compile_function([x, y], [], {z: z + np.float32(0.5) * pt.dot(x, y)})
    if cbackend.product_threads() > 1:
        assert [{type(node.op) for node in fn.maker.fgraph.toposort()} & {ThreadedDot22, ThreadedGemm}
                for fn in (product, update)] == [{ThreadedDot22}, {ThreadedGemm}]
    expected = X.astype(np.float64) @ Y
    np.testing.assert_allclose(product(X, Y), expected, rtol=1e-4, atol=1e-3)
    update(X, Y)
    np.testing.assert_allclose(z.get_value(), Z + 0.5 * expected, rtol=1e-4, atol=1e-3)
    small = compile_function([x, y], pt.dot(x, y))
    np.testing.assert_allclose(small(X[:3, :4], Y[:4, :2]), X[:3, :4].astype(np.float64) @ Y[:4, :2], rtol=1e-5)



@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('shape', [(7, 5, 300), (300, 5, 7), (80, 224, 672), (3, 2, 1)])
@pytest.mark.parametrize('threads', [2, 3, 5])
def test_products_in_pieces_equal_float64(dtype, shape, threads):
    """A product in pieces (split: along the result's longer side, a one-thread BLAS call each, on the calling
    thread and the process's workers): x . y with either operand transposed or strided, and the update
    b z + a x . y, against float64 numpy."""
    m, k, n = shape
    rng = np.random.default_rng(2)
    X, Y, Z = (rng.standard_normal(s).astype(dtype) for s in [(m, k), (k, n), (m, n)])
    x, y, z = (pt.matrix(name, dtype=dtype) for name in 'xyz')
    dot = ThreadedDot22(threads, threshold=0, split=True)
    gemm = ThreadedGemm(threads, inplace=False, threshold=0, split=True)
    a, b = pt.constant(np.asarray(0.5, dtype)), pt.constant(np.asarray(2.0, dtype))
    fn = compile_function([x, y, z], [dot(x, y), dot(y.T, x.T), dot(x[:, ::1], y[::1]), gemm(z, a, x, y, b)])
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == 'float32' else dict(rtol=1e-12, atol=1e-12)
    for got, expected in zip(fn(X, Y, Z), [X64 @ Y64, (X64 @ Y64).T, X64 @ Y64, 2 * Z + 0.5 * X64 @ Y64]):
        np.testing.assert_allclose(got, expected, **tolerance)
    strided = compile_function([x, y], dot(x[:, ::2], y[::2]))
    X2, Y2 = (rng.standard_normal(s).astype(dtype) for s in [(m, 2 * k), (2 * k, n)])
    np.testing.assert_allclose(strided(X2, Y2), X2[:, ::2].astype(np.float64) @ Y2[::2], **tolerance)


@pytest.mark.skipif(cbackend.product_threads() == 1, reason='one BLAS thread: no product is threaded')
def test_a_graph_with_large_products_threads_its_mid_sized_ones_too():
    """Where the largest product (static shapes) reaches THREADED_PRODUCT_MACS, every product from
    STEADY_PRODUCT_MACS gets the threads, so that OpenBLAS's thread count does not switch within a step;
    a graph of mid-sized products alone keeps the per-size rule. Results against float64 numpy."""
    rng = np.random.default_rng(1)
    big, mid = (128, 512, 640), (80, 224, 224)  # 42M and 4M multiply-adds
    assert big[0] * big[1] * big[2] >= cbackend.THREADED_PRODUCT_MACS > mid[0] * mid[1] * mid[2]
    assert mid[0] * mid[1] * mid[2] >= cbackend.STEADY_PRODUCT_MACS
    values = [rng.standard_normal(s).astype(np.float32) for s in [big[:2], big[1:], mid[:2], mid[1:]]]
    a, b, c, d = (pt.tensor(n, dtype='float32', shape=v.shape) for n, v in zip('abcd', values))
    both = compile_function([a, b, c, d], [pt.dot(a, b), pt.dot(c, d)])
    alone = compile_function([c, d], pt.dot(c, d))
    thresholds = [sorted(node.op.threshold for node in fn.maker.fgraph.toposort() if isinstance(node.op, ThreadedDot22))
                  for fn in (both, alone)]
    assert thresholds == [[cbackend.STEADY_PRODUCT_MACS] * 2, [cbackend.THREADED_PRODUCT_MACS]]
    A, B, C, D = (v.astype(np.float64) for v in values)
    for got, expected in zip(both(*values) + [alone(*values[2:])], [A @ B, C @ D, C @ D]):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)

def test_the_training_step_runs_no_python_ops():
    """Every op of a training step has C code (an op without runs in Python, one call per step)."""
    for loss, final_act in [('cross-entropy', 'softmax'), ('bpr-max', 'elu-1'), ('top1', 'tanh')]:
        model = fit_small(make_log([4] * 60, seed=1), loss=loss, final_act=final_act, n_epochs=1)
        python_ops = [node.op for node in model.training_step_.function.maker.fgraph.toposort()
                      if not hasattr(node.op, 'c_code') or type(node.op).c_code is pytensor.link.c.op.COp.c_code]
        assert python_ops == [], loss


@pytest.mark.parametrize('elu_alpha', [None, 0.5])
def test_bpr_max_reference_gradient_is_the_numeric_one(elu_alpha):
    """The gradient RowBPRMax computes (its numpy perform, float64) against central differences of
    bpr_max_rows (of the ELU of the logits, where the op computes one), the target column included;
    padded columns get none. Its loss output is bpr_max_rows' loss."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((4, 9)) * 2
    cols, bpreg, g = np.array([1.0] * 7 + [0.0] * 2), 0.7, rng.uniform(0.5, 1.5, 4)
    op = RowBPRMax(grad=True, elu=elu_alpha is not None, alpha=elu_alpha or 0.0)

    def scores(X):
        return X if elu_alpha is None else np.where(X > 0, X, elu_alpha * np.expm1(np.minimum(X, 0)))
    node = op.make_node(pt.dmatrix(), pt.dvector(), pt.dscalar(), pt.dvector())
    out = [[None], [None]]
    op.perform(node, [X, cols, np.float64(bpreg), g], out)
    numeric = np.zeros_like(X)
    for index in np.ndindex(X.shape):
        step = np.zeros_like(X)
        step[index] = 1e-6
        up, down = bpr_max_rows(scores(X + step), cols, bpreg)[0], bpr_max_rows(scores(X - step), cols, bpreg)[0]
        numeric[index] = (g @ up - g @ down) / 2e-6
    np.testing.assert_allclose(out[0][0], bpr_max_rows(scores(X), cols, bpreg)[0], rtol=1e-12)
    np.testing.assert_allclose(out[1][0], numeric, rtol=1e-5, atol=1e-8)
    assert not out[1][0][:, 7:].any()


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('final_act', ['linear', 'elu-0.5', 'tanh', 'relu'])
def test_bpr_max_op_equals_the_graph(dtype, final_act):
    """training.row_loss_op wraps BPR-max of the final activation; on the C backend RowBPRMax computes the
    loss and its gradient in one op (the ELU inside; tanh, which it does not compute, before it), elsewhere
    the graph runs as
    written (PyTensor's Python linker): same values, on scores with padded columns and a target far above
    its negatives."""
    rng = np.random.default_rng(5)
    M, N = 6, 40
    values = (rng.standard_normal((M, N)) * 3).astype(dtype)
    values[2, 2] = 300  # the target far above the negatives of its row
    values[3, 5] = 0  # the ELU's kink
    cols_value = np.r_[np.ones(N - 5), np.zeros(5)].astype(dtype)
    weights = rng.uniform(0.5, 1.5, M).astype(dtype)
    results = []
    for compile_with in ('c', 'python'):
        with pytensor.config.change_flags(floatX=dtype):  # a graph of that precision throughout
            Y, cols, w = pt.matrix('Y', dtype=dtype), pt.vector('cols', dtype=dtype), pt.vector('w', dtype=dtype)
            loss = row_loss_op('bpr-max', loss_bpr_max, Y, cols, 0.9, final_act)
            outputs = [loss, pytensor.grad((loss * w).sum(), Y)]
            if compile_with == 'c':
                fn = compile_function([Y, cols, w], outputs, backend='c')
                ops = [type(n.op) for n in fn.maker.fgraph.toposort()]
                assert ops.count(RowBPRMax) == 1, ops
            else:
                fn = pytensor.function([Y, cols, w], outputs, mode='FAST_COMPILE')
        results.append(fn(values, cols_value, weights))
    tolerance = {'float32': dict(rtol=2e-4, atol=2e-5), 'float64': dict(rtol=1e-9, atol=1e-12)}[dtype]
    for got, expected in zip(*results):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, **tolerance)



def test_cross_entropy_reference_gradient_is_the_numeric_one():
    """The gradient RowCrossEntropy computes (its numpy perform, float64) against central differences of
    -log(softmax_ii + 1e-24) weighted by g, the target column included; its loss output is that loss."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((4, 9)) * 2
    X[:, 7:] -= 1e9  # padded columns
    g = rng.uniform(0.5, 1.5, 4)

    def losses(X):
        e = np.exp(X - X.max(axis=1, keepdims=True))
        return -np.log(np.diagonal(e / e.sum(axis=1, keepdims=True)) + 1e-24)
    op = RowCrossEntropy(grad=True)
    out = [[None], [None]]
    op.perform(op.make_node(pt.dmatrix(), pt.dvector()), [X, g], out)
    numeric = np.zeros_like(X)
    for index in np.ndindex(X.shape):
        step = np.zeros_like(X)
        step[index] = 1e-6
        numeric[index] = (g @ losses(X + step) - g @ losses(X - step)) / 2e-6
    np.testing.assert_allclose(out[0][0], losses(X), rtol=1e-12)
    np.testing.assert_allclose(out[1][0], numeric, rtol=1e-5, atol=1e-8)
    assert not out[1][0][:, 7:].any()


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_cross_entropy_op_equals_the_graph(dtype, smoothing):
    """training.row_loss_op wraps cross-entropy of a softmax; on the C backend RowCrossEntropy computes the loss
    and its gradient in one op without label smoothing (with it, the graph runs), elsewhere the graph runs as
    written (PyTensor's Python linker): same values, on logits with padded columns and a target far above
    the rest of its row."""
    rng = np.random.default_rng(5)
    M, N = 6, 40
    values = (rng.standard_normal((M, N)) * 3).astype(dtype)
    values[2, 2] = 300
    values[:, -5:] -= 1e9
    weights = rng.uniform(0.5, 1.5, M).astype(dtype)
    results = []
    for compile_with in ('c', 'python'):
        with pytensor.config.change_flags(floatX=dtype):
            Y, cols, w = pt.matrix('Y', dtype=dtype), pt.vector('cols', dtype=dtype), pt.vector('w', dtype=dtype)
            loss = row_loss_op('cross-entropy', functools.partial(loss_cross_entropy, smoothing=np.float32(smoothing)),
                               Y, cols, 0.0, 'softmax')
            outputs = [loss, pytensor.grad((loss * w).sum(), Y)]
            inputs = [Y, cols, w]
            if compile_with == 'c':
                fn = compile_function(inputs, outputs, backend='c')
                ops = [type(n.op) for n in fn.maker.fgraph.toposort()]
                assert ops.count(RowCrossEntropy) == (0 if smoothing else 1), ops
            else:
                fn = pytensor.function(inputs, outputs, mode='FAST_COMPILE', on_unused_input='ignore')
        results.append(fn(values, np.r_[np.ones(N - 5), np.zeros(5)].astype(dtype), weights))
    tolerance = {'float32': dict(rtol=2e-5, atol=1e-6), 'float64': dict(rtol=1e-10, atol=1e-13)}[dtype]
    for got, expected in zip(*results):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, **tolerance)

@pytest.mark.parametrize('name', sorted(LOSSES))
def test_every_row_loss_runs_as_written_in_the_python_linker(name):
    """row_loss_op's op runs its graph inside where no backend rewrites it (mode FAST_COMPILE, the Python
    linker), loss and gradient equal to the loss's graph itself; an input the graph inside leaves unused
    (bpreg for every loss but BPR-max, cols for cross-entropy's) was an UnusedInputError there."""
    rng = np.random.default_rng(7)
    values = rng.standard_normal((5, 12))
    cols_value = np.r_[np.ones(9), np.zeros(3)]
    final = {'cross-entropy': pt.special.softmax, 'xe_logit': lambda x: x - x.max(axis=1, keepdims=True)}
    results = []
    for wrapped in (True, False):
        Y, cols = pt.dmatrix('Y'), pt.dvector('cols')
        Yhat = final.get(name, lambda x: x)(Y)
        loss = (row_loss_op(name, LOSSES[name], Yhat, cols, 0.7) if wrapped
                else LOSSES[name](Yhat, bpreg=np.float32(0.7), cols=cols))
        fn = pytensor.function([Y, cols], [loss, pytensor.grad(loss.sum(), Y)], mode='FAST_COMPILE',
                               on_unused_input='ignore')  # cross-entropy's graph reads no cols
        results.append(fn(values, cols_value))
    for got, expected in zip(*results):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_bpr_max_of_another_precision_than_its_scores_is_inlined_not_left_to_python(caplog):
    """float32 scores in a graph built under floatX=float64 give a float64 BPR-max, which RowBPRMax (in the
    scores' precision) cannot stand for: the rewrite declines and inlines the graph instead of failing and
    leaving the op to run in Python; the values are the graph's."""
    rng = np.random.default_rng(8)
    values = (rng.standard_normal((6, 30)) * 3).astype(np.float32)
    cols_value = np.r_[np.ones(26), np.zeros(4)].astype(np.float32)
    with pytensor.config.change_flags(floatX='float64'):
        Y, cols = pt.matrix('Y', dtype='float32'), pt.vector('cols', dtype='float32')
        loss = row_loss_op('bpr-max', loss_bpr_max, Y, cols, 0.9)
        assert loss.dtype == 'float64'
        outputs = [loss, pytensor.grad(loss.sum(), Y)]
        fn = compile_function([Y, cols], outputs, backend='c')
        reference = pytensor.function([Y, cols], outputs, mode='FAST_COMPILE')
    ops = {type(node.op).__name__ for node in fn.maker.fgraph.toposort()}
    assert 'OpFromGraph' not in ops and 'RowBPRMax' not in ops, ops
    assert not [r for r in caplog.records if 'Rewrite failure' in r.getMessage()], caplog.text
    for got, expected in zip(fn(values, cols_value), reference(values, cols_value)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)



def test_row_adagrad_steps_the_padding_rows_that_fill_the_list_by_zero():
    """A step's list of distinct rows is filled up with the padding row (zero gradient, zero velocity):
    RowAdagrad leaves it unchanged however often it repeats, and steps the other rows as the graph does."""
    rng = np.random.default_rng(5)
    shape, pad = (30, 8), 29
    values = {'w': rng.standard_normal(shape), 'adagrad': rng.uniform(0.1, 1, shape),
              'velocity': rng.standard_normal(shape)}
    values['velocity'][pad] = 0
    rows = np.array([7, 2, 0, 13, pad, pad, pad, pad], dtype=np.int32)
    grad = rng.standard_normal((len(rows), shape[1])).astype(np.float32)
    grad[rows == pad] = 0
    results = sparse_adagrad_both_ways(values, rows, grad, 0.3)
    np.testing.assert_array_equal(results[0][0][pad], values['w'][pad].astype(np.float32))
    assert not np.allclose(results[0][0][[7, 2, 0, 13]], values['w'][[7, 2, 0, 13]].astype(np.float32))

def test_precompiled_headers_are_built_once_and_left_out_where_they_cannot_be(tmp_path):
    """precompiled_headers() builds its header once per compile directory and flags (a second call finds
    it), and gives no flag, rather than failing the compilation, where it cannot write."""
    flags = cbackend.compile_flags()['gcc__cxxflags']
    flag = cbackend.precompiled_headers(flags, str(tmp_path))
    folder = flag[len('-I'):]
    assert flag.startswith('-I') and sorted(p.name for p in Path(folder).iterdir()) == ['Python.h', 'Python.h.gch']
    built = (Path(folder) / 'Python.h.gch').stat().st_mtime_ns
    cbackend.precompiled_headers.cache_clear()
    assert cbackend.precompiled_headers(flags, str(tmp_path)) == flag
    assert (Path(folder) / 'Python.h.gch').stat().st_mtime_ns == built
    blocked = tmp_path / 'a file'
    blocked.write_text('not a directory')
    assert cbackend.precompiled_headers(flags, str(blocked)) == ''


PARALLEL_BUILD = r'''
import json, sys, threading, time
import numpy as np
import pytensor.link.c.cmodule as cmodule
import pytensor.tensor as pt
runs = []
compiler = cmodule.output_subprocess_Popen

def timed(command, **kwargs):  # every compiler run, with its start and end
    start = time.perf_counter()
    try:
        return compiler(command, **kwargs)
    finally:
        runs.append((start, time.perf_counter(), ([c for c in command if c.endswith('.cpp')] + [''])[0]))
cmodule.output_subprocess_Popen = timed
import pytensor
import cbackend
from backends import compile_function
x, y = pt.matrix('x'), pt.matrix('y')
f = compile_function([x, y], [pt.exp(x) * y + 1, x[1:, :3].sum(axis=0), pt.concatenate([x, y]).max(axis=1)])
a, b = np.arange(12, dtype='float32').reshape(3, 4) / 7, np.ones((3, 4), 'float32')
with pytensor.config.change_flags(**cbackend.compile_flags()):  # the flags are part of a module's key
    left = cbackend.module_builds(f.maker.fgraph.toposort())
print(json.dumps(dict(runs=runs, left=len(left), results=[r.tolist() for r in f(a, b)])))
'''


def test_a_cold_compile_builds_every_new_module_once_and_several_at_a_time(tmp_path):
    """In an empty compile directory, the modules of a graph are compiled in parallel, each once, and
    PyTensor takes them as built; afterwards module_builds() finds none left to build."""
    env = dict(os.environ, PYTENSOR_FLAGS=f'compiledir={tmp_path}', PYTHONPATH=str(Path(cbackend.__file__).parent))
    done = subprocess.run([sys.executable, '-c', PARALLEL_BUILD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    a, b = np.arange(12, dtype='float32').reshape(3, 4) / 7, np.ones((3, 4), 'float32')
    expected = [np.exp(a) * b + 1, a[1:, :3].sum(axis=0), np.concatenate([a, b]).max(axis=1)]
    for result, reference in zip(report['results'], expected):
        np.testing.assert_allclose(result, reference, rtol=1e-6)
    modules = [p for p in tmp_path.glob('tmp*') if p.is_dir()]
    op_runs = [run for run in report['runs'] if 'gru4rec-build-' in run[2]]
    again = [run for run in report['runs'] if Path(run[2]).parent in modules]
    assert len(op_runs) == len(modules) >= 3 and not again  # each module compiled once, ahead
    overlapping = sum(1 for i, (start, end, _) in enumerate(op_runs) for later, _, _ in op_runs[i + 1:]
                      if start <= later < end)
    assert overlapping > 0 if cbackend.usable_cores() > 1 else overlapping == 0
    assert report['left'] == 0


def output_layer_graph(loss, final_act, dtype, M, K, N, items=300, seed=0):
    """The output layer as GRU4Rec's step writes it (scores of gathered item rows plus their biases, the padded
    columns masked, a loss of row_loss_op weighted per row) and its gradients w.r.t. the hidden state, the item
    table and the biases, with values: h, the table, the biases, the rows (repeats among them), the columns'
    mask and the rows' weights."""
    rng = np.random.default_rng(seed)
    with pytensor.config.change_flags(floatX=dtype):
        h, table = pt.matrix('h', dtype=dtype), pt.matrix('table', dtype=dtype)
        bias, rows = pt.vector('bias', dtype=dtype), pt.vector('rows', dtype='int32')
        cols, w = pt.vector('cols', dtype=dtype), pt.vector('w', dtype=dtype)
        scores = pt.dot(h, table[rows].T) + bias[rows][None, :] - 1e9 * (1 - cols)[None, :]
        losses = row_loss_op(loss, LOSSES[loss], scores, cols, 0.9, final_act)
        outputs = [losses, *pytensor.grad((losses * w).sum(), [h, table, bias])]
    values = [(rng.standard_normal((M, K)) * 0.5).astype(dtype), (rng.standard_normal((items, K)) * 0.5).astype(dtype),
              rng.standard_normal(items).astype(dtype),
              np.r_[rng.permutation(items)[:M], rng.integers(0, items, N - M)].astype('int32'),
              np.r_[np.ones(N - 5), np.zeros(5)].astype(dtype), rng.uniform(0.5, 1.5, M).astype(dtype)]
    return [h, table, bias, rows, cols, w], outputs, values


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('loss, final_act', [('cross-entropy', 'softmax'), ('bpr-max', 'elu-0.5'),
                                             ('bpr-max', 'linear')])
@pytest.mark.parametrize('M, K, N', [(6, 8, 40), (32, 100, 2080)])
def test_output_layer_equals_the_graph(dtype, loss, final_act, M, K, N):
    """On a machine with more than one core the C backend computes the output layer (gather, scores, loss,
    gradient, the three products and the biases' gradient) as one OutputLayer split over the cores; elsewhere
    the graph runs as written (PyTensor's Python linker): same losses and gradients, the item table's summed
    over repeated rows."""
    inputs, outputs, values = output_layer_graph(loss, final_act, dtype, M, K, N)
    fn = compile_function(inputs, outputs, backend='c')
    ops = [type(n.op) for n in fn.maker.fgraph.toposort()]
    assert ops.count(OutputLayer) == (1 if cbackend.worker_threads() > 1 else 0), ops
    expected = pytensor.function(inputs, outputs, mode='FAST_COMPILE')(*values)
    tolerance = {'float32': dict(rtol=2e-4, atol=2e-5), 'float64': dict(rtol=1e-9, atol=1e-11)}[dtype]
    for got, want in zip(fn(*values), expected):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, **tolerance)


def output_layer_function(op, dtype):
    h, table, offset, g, cols = (pt.tensor(name, dtype=dtype, shape=(None,) * ndim)
                                 for name, ndim in [('h', 2), ('table', 2), ('offset', 1), ('g', 1), ('cols', 1)])
    rows, bpreg = pt.vector('rows', dtype='int64'), pt.scalar('bpreg', dtype=dtype)
    extra = [cols, bpreg] if op.loss == 'bpr-max' else []
    inputs = [h, table, rows, offset, g, *extra]
    return compile_function(inputs, op(*inputs), backend='c')


def output_layer_values(M, K, N, items, dtype, seed=0, bpr_max=True):
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal((M, K)), rng.standard_normal((items, K)), rng.integers(-items, items, N),
              rng.standard_normal(N), rng.uniform(0.5, 1.5, M)]
    if bpr_max:
        values += [np.r_[np.ones(N - 3), np.zeros(3)], 0.7]
    return [np.asarray(v, dtype='int64' if i == 2 else dtype) for i, v in enumerate(values)]


@pytest.mark.parametrize('loss', ['cross-entropy', 'bpr-max'])
def test_output_layer_gradients_are_the_numeric_ones(loss):
    """OutputLayer's dh, dW and db (float64, split over two threads in chunks of columns) against central
    differences of its loss output weighted by g, w.r.t. h, the gathered rows (a table row that two columns
    gather gets both columns' gradients, so the rows are distinct here) and the offset."""
    M, K, N = 3, 4, 40
    op = OutputLayer(loss, elu=loss == 'bpr-max', alpha=0.5, threads=2)
    fn = output_layer_function(op, 'float64')
    h, table, rows, offset, g, *extra = output_layer_values(M, K, N, 50, 'float64', seed=2, bpr_max=loss == 'bpr-max')
    rows = np.random.default_rng(3).permutation(50)[:N]
    _, dh, dW, db = fn(h, table, rows, offset, g, *extra)

    def cost(h, W, offset):
        return g @ fn(h, W, np.arange(N), offset, g, *extra)[0]
    W = table[rows]
    for value, analytic, args in [(h, dh, lambda v: (v, W, offset)), (W, dW, lambda v: (h, v, offset)),
                                  (offset, db, lambda v: (h, W, v))]:
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            step = np.zeros_like(value)
            step[index] = 1e-6
            numeric[index] = (cost(*args(value + step)) - cost(*args(value - step))) / 2e-6
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize('loss', ['cross-entropy', 'bpr-max'])
def test_output_layer_on_more_threads_equals_one_thread(loss):
    """The columns' chunks shared by 1, 2 and 5 threads (more than the cores: the workers that come late find
    the chunks taken) give the same results bit for bit: the chunks and the order of every sum are the same
    whichever thread computed which chunk (training is reproducible)."""
    values = output_layer_values(32, 24, 700, 400, 'float32', bpr_max=loss == 'bpr-max')
    results = [output_layer_function(OutputLayer(loss, elu=True, alpha=0.5, threads=t), 'float32')(*values)
               for t in (1, 2, 5)]
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('M', [3, 17, 80])
@pytest.mark.parametrize('strided', [False, True])
def test_output_layer_on_any_batch_and_table_layout(M, strided):
    """The scores are computed a few columns at a time with the batch's rows in the vector lanes (3, 17 and 80
    rows: one vector, a padded second, four and one), read from the table's rows where they are, or from a
    gathered copy where a row's values are strided: the same as the op's own numpy code (float32, BPR-max)."""
    values = output_layer_values(M, 24, 300, 400, 'float32', seed=M)
    if strided:
        wide = np.zeros((400, 48), dtype='float32')
        wide[:, ::2] = values[1]
        values[1] = wide[:, ::2]
    op = OutputLayer('bpr-max', elu=True, alpha=0.5, threads=2)
    fn = output_layer_function(op, 'float32')
    inputs = [pt.tensor(dtype=v.dtype, shape=(None,) * v.ndim) for v in values]
    expected = pytensor.function(inputs, op(*inputs), mode='FAST_COMPILE')(*values)
    for got, want in zip(fn(*values), expected):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_output_layer_rejects_bad_rows_and_shapes():
    """An index outside the table and more rows of h than scored columns (row i's target is column i) are
    errors that say so, raised before any output is computed."""
    fn = output_layer_function(OutputLayer('bpr-max', threads=2), 'float32')
    values = output_layer_values(4, 3, 20, 10, 'float32')
    values[2][7] = 10
    with pytest.raises(IndexError, match='index 10 is out of bounds for 10 rows'):
        fn(*values)
    values = output_layer_values(4, 3, 20, 10, 'float32')
    short = [values[0], values[1], values[2][:3], values[3][:3], values[4], values[5][:3], values[6]]
    with pytest.raises(ValueError, match='rows must not outnumber columns'):
        fn(*short)


@pytest.mark.skipif(cbackend.worker_threads() < 2, reason='one core (or not Linux): no workers to share out')
def test_a_step_with_large_products_runs_them_in_pieces_beside_the_output_layer():
    """Where the GRU's own products are large (a 600-unit layer), they run in pieces on the process's workers
    (ThreadedDot22 / ThreadedGemm with split), never on OpenBLAS's threads, which would spin on the core the
    workers share; the output layer is one OutputLayer and the item rows' update is shared out too."""
    log = make_log([4] * 60, seed=1)
    model = fit_small(log, layers=[600], batch_size=32, n_sample=40, n_epochs=1)
    nodes = model.training_step_.function.maker.fgraph.toposort()
    products = [node.op for node in nodes if isinstance(node.op, (ThreadedDot22, ThreadedGemm))]
    assert products and all(op.split and op.threads == cbackend.worker_threads() for op in products), products
    assert OutputLayer in {type(node.op) for node in nodes} and RowBPRMax not in {type(node.op) for node in nodes}


@pytest.mark.parametrize('momentum', [0.0, 0.3])
@pytest.mark.parametrize('threads', [1, 2, 5])
def test_row_adagrad_of_scattered_sources_equals_the_scatters_into_zeros(momentum, threads):
    """RowAdagrad with sources (pairs of rows and their places among the indices), which the rewrite makes of a
    zero matrix that RowScatters fill for RowAdagrad alone, steps each row by the sum of the rows that land on
    its place, added in the sources' order, bit for bit as those separate ops; places that nothing lands on
    step by a zero gradient, repeated places sum, a repeated index (the padding row) is stepped once; places out
    of range are an error that changes no weight."""
    rng = np.random.default_rng(5)
    n, L, k = 3000, 100, 700
    rows = np.r_[rng.permutation(n - 1)[:k - 20], np.full(20, n - 1)].astype('int32')
    every = np.r_[rng.permutation(k - 20), rng.integers(0, k - 20, 220)]  # each non-padding place, some twice
    sources = [(rng.standard_normal((len(places), L)).astype(np.float32), places.astype('int32'))
               for places in [rng.integers(0, k - 20, 40), every]]
    state = [rng.standard_normal((n, L)).astype(np.float32), rng.uniform(0.1, 1, (n, L)).astype(np.float32)]
    if momentum:
        state.append(rng.standard_normal((n, L)).astype(np.float32) * 0.1)
    results = []
    for fused in (False, True):  # fn ends as the fused one
        inputs = [pt.matrix(dtype='float32') for _ in state] + [pt.vector(dtype='int32')]
        pairs = [(pt.matrix(dtype='float32'), pt.vector(dtype='int32')) for _ in sources]
        if fused:
            op = RowAdagrad(0.05, momentum, 1e-6, threads=threads, sources=len(pairs))
            outputs = op(*inputs, *[v for pair in pairs for v in pair], return_list=True)
        else:
            grad = pt.zeros((k, L), dtype='float32')
            for values, places in pairs:
                grad = pt.inc_subtensor(grad[places], values)
            # grad an output too: read elsewhere, the scatters stay (local_row_adagrad_of_scatters leaves them)
            outputs = RowAdagrad(0.05, momentum, 1e-6, threads=threads)(*inputs, grad, return_list=True) + [grad]
        fn = compile_function(inputs + [v for pair in pairs for v in pair], outputs)
        ops = [n.op for n in fn.maker.fgraph.toposort()]
        assert [op.sources for op in ops if isinstance(op, RowAdagrad)] == [2 if fused else 0]
        assert any(isinstance(op, RowScatter) for op in ops) != fused
        results.append(fn(*state, rows, *[v for pair in sources for v in pair])[:len(state)])
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)
    grad = np.zeros((k, L), np.float64)
    for values, places in sources:
        np.add.at(grad, places, values)
    acc = state[1][rows[:k - 19]] + grad[:k - 19] ** 2  # the padding row once
    np.testing.assert_allclose(results[0][1][rows[:k - 19]], acc, rtol=1e-5)
    bad = [v.copy() for pair in sources for v in pair]
    bad[-1][3] = k
    before = [v.copy() for v in state]
    with pytest.raises(IndexError, match=f'place {k} out of bounds for {k} indices'):
        fn(*state, rows, *bad)
    for got, want in zip(state, before):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('momentum', [0.0, 0.3])
def test_row_adagrad_on_more_threads_equals_one_thread(momentum):
    """RowAdagrad's rows shared by 2 and 5 threads (pieces of rows claimed as the threads come, the padding row
    repeated at the end) give the same weights and state bit for bit as one thread: each row is stepped once,
    by one thread."""
    rng = np.random.default_rng(4)
    n, L, k = 5000, 100, 2112
    rows = np.r_[rng.permutation(n - 1)[:k - 40], np.full(40, n - 1)].astype('int64')
    grad = rng.standard_normal((k, L)).astype(np.float32)
    grad[-40:] = 0
    state = [rng.standard_normal((n, L)).astype(np.float32), rng.uniform(0.1, 1, (n, L)).astype(np.float32)]
    if momentum:
        state.append(np.zeros((n, L), np.float32))
    results = []
    for threads in (1, 2, 5):
        inputs = [pt.matrix(dtype='float32') for _ in state] + [pt.vector(dtype='int64'), pt.matrix(dtype='float32')]
        fn = compile_function(inputs, RowAdagrad(0.05, momentum, 1e-6, threads=threads)(*inputs, return_list=True))
        results.append(fn(*state, rows, grad))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_array_equal(got, want)
    assert not np.array_equal(results[0][0], state[0])


POOL_SCRIPT = """
import json, os, sys
import numpy as np, pytensor.tensor as pt
sys.path[:0] = sys.argv[1:]
from backends import compile_function
from cbackend import OutputLayer, RowAdagrad
from test_cbackend import output_layer_function, output_layer_values
threads = lambda: len(os.listdir('/proc/self/task'))
layer = output_layer_function(OutputLayer('cross-entropy', threads=2), 'float32')
inputs = [pt.matrix(dtype='float32'), pt.matrix(dtype='float32'), pt.vector(dtype='int64'), pt.matrix(dtype='float32')]
update = compile_function(inputs, RowAdagrad(0.05, 0.0, 1e-6, threads=2)(*inputs, return_list=True))
values = output_layer_values(32, 100, 2080, 3000, 'float32', bpr_max=False)
state = [np.ones((3000, 100), np.float32), np.ones((3000, 100), np.float32)]
counts = [threads()]
for _ in range(3):
    expected = layer(*values)
    counts.append(threads())
    update(*state, np.arange(2000), np.ones((2000, 100), np.float32))
    counts.append(threads())
output_layer_function(OutputLayer('cross-entropy', threads=5), 'float32')(*values)
counts.append(threads())
same = all(all(np.array_equal(a, b) for a, b in zip(layer(*values), expected)) for _ in range(50))
print(json.dumps([counts, same]))
"""


@pytest.mark.skipif(cbackend.worker_threads() < 2, reason='one core (or not Linux): the kernels start no workers')
def test_the_kernels_of_every_module_share_one_worker_pool():
    """OutputLayer and RowAdagrad, two compiled modules, run their tasks on the same workers: a process that runs
    both, one after the other, has one worker thread more than before, where a pool per module would start two
    (and the second would wait, spinning, for tasks that go to the first). Once a 5-thread OutputLayer has made
    the pool four workers, the 2-thread OutputLayer computes the same as before."""
    here = Path(__file__).parent
    out = subprocess.run([sys.executable, '-c', POOL_SCRIPT, str(here.parent), str(here)], capture_output=True,
                         text=True, timeout=600, check=True)
    counts, same = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts[1:] == [counts[0] + 1] * 6 + [counts[0] + 4] and same, counts


def test_the_training_step_splits_its_item_rows_update():
    """In a 100-unit step and in a 600-unit one (whose products run in pieces on the same workers) RowAdagrad of the
    item matrix runs on worker_threads() threads."""
    log = make_log([4] * 60, seed=1)
    for layers in [100], [600]:
        model = fit_small(log, layers=layers, batch_size=32, n_sample=40, n_epochs=1)
        matrices = [node.op.threads for node in model.training_step_.function.maker.fgraph.toposort()
                    if isinstance(node.op, RowAdagrad) and node.inputs[0].ndim == 2]
        assert matrices and set(matrices) == {cbackend.worker_threads()}, (layers, matrices)


def test_output_layer_stays_out_where_the_gradient_is_read_elsewhere(caplog):
    """A graph that also reads the loss's gradient itself (here: as an output) keeps the separate ops, without
    the rewrite failing on the reader it does not know."""
    inputs, outputs, values = output_layer_graph('bpr-max', 'elu-0.5', 'float32', 6, 8, 40)
    scores_gradient = pytensor.grad((outputs[0] * inputs[-1]).sum(), outputs[0].owner.inputs[0])
    fn = compile_function(inputs, outputs + [scores_gradient], backend='c')
    assert OutputLayer not in {type(n.op) for n in fn.maker.fgraph.toposort()}
    assert not [r for r in caplog.records if r.levelname == 'ERROR'], caplog.text
    for got, want in zip(fn(*values)[:4], pytensor.function(inputs, outputs, mode='FAST_COMPILE')(*values)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_output_layer_from_many_python_threads_and_a_forked_child():
    """Python threads that each call a compiled OutputLayer (the process's one pool of workers) many times at
    once, and a child forked while the workers exist (it has none and starts its own), all get the results of
    a lone call bit for bit; bounded in time."""
    values = output_layer_values(32, 24, 700, 400, 'float32')
    op = OutputLayer('bpr-max', elu=True, alpha=0.5, threads=2)
    fns = [output_layer_function(op, 'float32') for _ in range(4)]
    expected = fns[0](*values)
    mismatches = []

    def calls(fn):
        for _ in range(100):
            if not all(np.array_equal(got, want) for got, want in zip(fn(*values), expected)):
                mismatches.append(fn)

    threads = [threading.Thread(target=calls, args=(fn,)) for fn in fns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads) and mismatches == []
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        ok = all(np.array_equal(got, want) for got, want in zip(fns[1](*values), expected))
        os.write(write, b'1' if ok else b'0')
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(child, 0)
    assert os.read(read, 1) == b'1' and os.waitstatus_to_exitcode(status) == 0
