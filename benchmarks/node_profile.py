"""A per-op profile for graphs compiled by PyTensor's Numba or JAX backends, which compile the whole
graph into one function and so cannot report per-op times themselves.

Each apply node of the compiled (already rewritten) graph is compiled on its own in the same backend
and timed on the values that the graph really computes at that step; the time of calling an empty
function of the same backend is subtracted. Times are therefore per node in isolation: fusion across
nodes that the backend's compiler might do inside the whole graph is not seen, and the sum is an
estimate of the whole step's work, not a measurement of it.
"""
import time
from collections import defaultdict

import numpy as np
import pytensor
from pytensor.compile.mode import Mode
from pytensor.graph.rewriting.db import RewriteDatabaseQuery


def _node_function(node, linker):
    inputs = [v.type() for v in node.inputs]
    destroyed = {i for ids in getattr(node.op, 'destroy_map', {}).values() for i in ids}
    ins = [pytensor.In(v, mutable=i in destroyed) for i, v in enumerate(inputs)]
    outputs = node.op.make_node(*inputs).outputs
    mode = Mode(linker, RewriteDatabaseQuery(include=['minimum_compile']))
    return pytensor.function(ins, outputs, mode=mode, accept_inplace=True), destroyed


def profile_nodes(fn, input_values, repeat=50):
    """Per-node seconds for one call of the compiled function `fn` on `input_values` (its explicit
    inputs). Returns a list of (seconds per call, node) sorted by time, and the baseline call cost."""
    fgraph = fn.maker.fgraph
    linker = type(fn.maker.linker)()
    values = {}
    explicit = [i.variable for i in fn.maker.inputs if not i.shared]
    for var, value in zip(fgraph.inputs, list(input_values) + [s.data for s in fn.input_storage[len(explicit):]]):
        values[var] = value
    for const in (v for n in fgraph.toposort() for v in n.inputs if v.owner is None and v not in values):
        values[const] = const.data
    x = pytensor.tensor.scalar('x')
    empty = pytensor.function([x], x * 1,
                              mode=Mode(type(fn.maker.linker)(), RewriteDatabaseQuery(include=['minimum_compile'])))
    empty(np.float64(1))
    t = time.process_time()
    for _ in range(repeat * 10):
        empty(np.float64(1))
    baseline = (time.process_time() - t) / (repeat * 10)
    timings = []
    for node in fgraph.toposort():
        f, destroyed = _node_function(node, linker)
        args = [values[v] for v in node.inputs]
        copy = lambda: [a.copy() if i in destroyed and hasattr(a, 'copy') else a for i, a in enumerate(args)]
        outs = f(*copy())
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        batches = [copy() for _ in range(repeat)]
        t = time.process_time()
        for b in batches:
            f(*b)
        seconds = (time.process_time() - t) / repeat - baseline
        timings.append((max(seconds, 0.0), node))
        for var, out in zip(node.outputs, outs):
            values[var] = out
    return sorted(timings, key=lambda t: -t[0]), baseline


def print_node_profile(fn, input_values, repeat=50, top=30):
    timings, baseline = profile_nodes(fn, input_values, repeat)
    total = sum(t for t, _ in timings)
    print(f'Per-node profile ({type(fn.maker.linker).__name__}; each node compiled and timed alone, '
          f'{baseline * 1e6:.1f} us call overhead subtracted): {total * 1e3:.3f} ms per step in {len(timings)} nodes')
    by_op = defaultdict(float)
    for t, node in timings:
        by_op[type(node.op).__name__] += t
    print('<% time> <ms per call> <op class>')
    for name, t in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f'{100 * t / total:6.1f}% {t * 1e3:9.3f}  {name}')
    print('<% time> <ms per call> <apply>')
    for t, node in timings[:top]:
        shapes = ','.join(str(getattr(o.type, 'shape', '')) for o in node.outputs)
        print(f'{100 * t / total:6.1f}% {t * 1e3:9.3f}  {str(node)[:150]} -> {shapes}')
