"""The roofline of the training step: how fast each tuned setting could train on this machine, and where
the time outside that bound goes (issue 30).

    python benchmarks/roofline.py --out roofline.md                      # every setting: 2 minutes idle, 5-6 shared
    python benchmarks/roofline.py --no-train --out bound.md              # only the bound: about 20 s
    python benchmarks/roofline.py --settings retailrocket_bprmax_shared_best --steps 500 --out rr.md

For each tuned setting of compare_port.py (its data files, cut to the same first sessions, written by
its code into --workdir) it counts, from the shapes of the step (batch B, units per layer, N = B +
n_sample scored columns):
- the FLOPs of the matrix products, 2 per multiply-add: the output layer's three (logits = h·Wyᵀ,
  B x H x N; dh = dlogits·Wy and dWy = dlogitsᵀ·h), and per GRU layer the forward products with
  their two backward products each: the input's x·Wx (B x in x 3H) where the input is a product (an
  embedding's or a constrained embedding's rows; a one-hot input is a row gather, no product), and
  the hidden state's h·Wrz (B x H x 2H) and (r*h)·Wh (B x H x H), together B x H x 3H. Those of the
  step's graph: the previous states are inputs of the step, not trained through, so h·Wrz's backward
  product towards h (drz·Wrzᵀ) is not computed, while (r*h)·Wh's is (it carries r's gradient);
- the bytes of the item rows: the step gathers each row of Wy/By it scores (and of the input table
  when that is not Wy) once, and Adagrad reads and writes the row's weights, accumulator and momentum
  velocity: 7 passes over the row (fewer without momentum or accumulator). The rows are the expected
  number of DISTINCT rows of a step, measured on the setting's first mini-batches with samples drawn
  as training draws them (the graph reads N + B rows, padded, but repeats of a row stay in cache); and
  the same read and write of the dense weights (the GRU's) and their optimiser state, which every step
  updates whole (issue 30's count left these out: 0.7-38 MB a step here);
- this machine's sgemm rate at each product's exact shape and transposition, through the BLAS the
  training links (scipy-openblas32's cblas_sgemm, called by ctypes), on one thread and on every core,
  each call timed alone and the fastest of 0.15 s of calls kept (on a shared machine most calls on two
  threads wait for a core); and the copy bandwidth (a 128 MiB np.copyto, read + write counted), on one
  core and split over every core, the better counted (the machine's, as for the products).
The bound is time = sum over products of FLOPs / (the better of the two rates at its shape) + bytes /
bandwidth, in mini-batches/s. Beside it: train_speed.py's measured speed for --steps mini-batches of
the same data (each run its own process; the median of --runs runs, each listed), the fraction measured /
bound, the same with every product on one BLAS thread (unless --no-one-thread), and (unless --no-profile) a
train_speed.py --profile run whose per-op profile (PyTensor's, thread CPU time, every apply) is grouped by
op: the products against their share of the bound, the row gathers (RowGather), the rows' optimiser
(RowAdagrad) and the dense weights' (RowAdagrad of all their rows; the fused loops that read an optimiser
state where it does not apply) against the bytes' shares, every other op whole, the compiled function's
overhead (its wall time minus the ops' CPU time) and the host's time per step (outside
the step's calls, from the run without the profile, whose bookkeeping after each call PyTensor does outside
the call's clock). The per-setting tables and one table of where each step goes are
printed and written to --out.
"""
import argparse
import ctypes
import glob
import os
import re
import statistics
import subprocess
import sys
import time
from collections import OrderedDict, namedtuple
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np

from common import ROOT, load_log, threads
from compare_port import SETTINGS, data_file

from atomicfile import write_atomically  # noqa: E402
from hyperparams import parse_hyperparameters  # noqa: E402
from network import embedding_size, item_parameters, parameter_shapes  # noqa: E402
from run import read_paramfile  # noqa: E402
from sessions import pad, session_arrays, session_parallel_batches  # noqa: E402
from training import distinct_rows, inverse_cdf, sample_cdf  # noqa: E402

# Mini-batches that train_speed.py trains per setting unless --steps says otherwise: 5-10 s each here.
DEFAULT_STEPS = {'rsc15_xe_shared_100_best': 3000, 'rsc15_topk_bprmax': 1600,
                 'retailrocket_bprmax_shared_best': 800, 'diginetica_bprmax_shared_best': 250}
# Accumulators per row that each adaptive optimiser reads and writes (training.Optimizer).
ACCUMULATORS = {None: 0, 'adagrad': 1, 'rmsprop': 1, 'adadelta': 2, 'adam': 2}
# The ops of PyTensor's profile that are matrix products (cbackend's ThreadedProduct included).
# OutputLayer (the step's output layer in one op) counts with the products: its three are most of its time, and
# it also gathers the scored rows and computes the loss, which the bound leaves to the gathers and to nothing.
PRODUCT_OPS = {'Dot22', 'Dot22Scalar', 'Gemm', 'Gemv', 'Ger', 'Dot', 'ThreadedDot22', 'ThreadedGemm', 'OutputLayer'}
GATHER_OPS = {'RowGather', 'AdvancedSubtensor1'}  # row gathers (item rows, states' rows): the bytes' gather pass
OPTIMISER_OPS = {'RowAdagrad', 'AdvancedIncSubtensor1'}  # the rows' optimiser step: its read + write passes
SPEED = re.compile(r'^speed: ([0-9.]+) mini-batches/s', re.M)
HOST = re.compile(r'^host: ([0-9.]+) ms per mini-batch', re.M)
CALLS = re.compile(r'Time in (\d+) calls to Function\.__call__: ([0-9.e+-]+)s')
# A line of the profile's Apply section: apply time, calls, id, the apply (op and inputs).
APPLY_LINE = re.compile(r'^\s+[0-9.]+%\s+[0-9.]+%\s+([0-9.]+)s\s+[0-9.e+-]+s\s+(\d+)\s+(\d+)\s+(.+)$')
# The steps of the dense weights: RowAdagrad of every row (its rows a constant, printed as an array), or where
# it does not apply the fused element-wise loops that update a weight with its optimiser state (adagrad_W, ...).
DENSE_OPTIMISER = 'dense weights\' optimiser'
DENSE_ROWS = re.compile(r'^RowAdagrad\{[^}]*\}\((\w+, ){2,3}\[')
DENSE_STATE = re.compile(r'\b(adagrad|rmsprop|adadelta_g|adam_m|velocity)_')

# (M, K, N): C (M x N) = op(A) (M x K) · op(B) (K x N); transposed operands as the step's graph has them.
Product = namedtuple('Product', 'name m k n trans_a trans_b')


def step_products(hp):
    """The matrix products of one training step for the parsed hyper-parameters hp, as its graph has them
    (the previous states are not trained through: no gradient of h_prev through Wrz)."""
    B, layers = hp['batch_size'], hp['layers']
    N, H, K = B + hp['n_sample'], layers[-1], embedding_size(hp)
    onehot = not hp['constrained_embedding'] and not K
    products = [Product('logits = h·Wyᵀ', B, H, N, False, True),
                Product('dh = dlogits·Wy', B, N, H, False, False),
                Product('dWy = dlogitsᵀ·h', N, B, H, True, False)]
    for l, L in enumerate(layers):
        width = layers[l - 1] if l else K or H  # the input: the previous layer, E's or Wy's rows
        if l or not onehot:
            products += [Product(f'x·Wx{l}', B, width, 3 * L, False, False),
                         Product(f'dx = dxp·Wx{l}ᵀ', B, 3 * L, width, False, True),
                         Product(f'dWx{l} = xᵀ·dxp', width, B, 3 * L, True, False)]
        products += [Product(f'h·Wrz{l}', B, L, 2 * L, False, False),
                     Product(f'dWrz{l} = hᵀ·drz', L, B, 2 * L, True, False),
                     Product(f'(r*h)·Wh{l}', B, L, L, False, False),
                     Product(f'd(r*h) = dc·Wh{l}ᵀ', B, L, L, False, True),
                     Product(f'dWh{l} = (r*h)ᵀ·dc', L, B, L, True, False)]
    return products


def flops(p):
    return 2.0 * p.m * p.k * p.n


class Sgemm:
    """cblas_sgemm of the BLAS that the training's products link (cbackend.blas_ldflags: scipy-openblas32,
    whose symbols carry a scipy_ prefix), with its thread control."""
    ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

    def __init__(self):
        import scipy_openblas32
        paths = sorted(glob.glob(os.path.join(scipy_openblas32.get_lib_dir(),
                                              f'lib{scipy_openblas32.get_library()}.*')))
        if not paths:
            sys.exit(f'no scipy-openblas32 library in {scipy_openblas32.get_lib_dir()}')
        self.lib = lib = ctypes.CDLL(paths[0])
        i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        lib.scipy_cblas_sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        lib.scipy_cblas_sgemm.restype = None
        lib.scipy_openblas_get_config.restype = ctypes.c_char_p
        self.name = f'{lib.scipy_openblas_get_config().decode()} ({Path(paths[0]).name})'

    def rate(self, p, n_threads, seconds=0.15, min_calls=10):
        """The best GFLOP/s of single calls C = op(A)·op(B) at p's shape on n_threads threads, over
        `seconds` (at least min_calls calls): on a shared machine a call whose thread was descheduled takes
        many times longer, so each call is timed alone and the fastest counts."""
        self.lib.scipy_openblas_set_num_threads(n_threads)
        rng = np.random.default_rng(0)
        a = rng.random((p.k, p.m) if p.trans_a else (p.m, p.k), dtype=np.float32)
        b = rng.random((p.n, p.k) if p.trans_b else (p.k, p.n), dtype=np.float32)
        c = np.empty((p.m, p.n), dtype=np.float32)
        args = (self.ROW_MAJOR, self.TRANS if p.trans_a else self.NO_TRANS, self.TRANS if p.trans_b else self.NO_TRANS,
                p.m, p.n, p.k, 1.0, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], 0.0, c.ctypes.data, p.n)
        call, clock = self.lib.scipy_cblas_sgemm, time.perf_counter
        for _ in range(3):  # warm: threads started, operands in cache as in a step
            call(*args)
        best, calls, start = np.inf, 0, clock()
        while calls < min_calls or clock() - start < seconds:
            before = clock()
            call(*args)
            best, calls = min(best, clock() - before), calls + 1
        return flops(p) / best / 1e9


def copy_bandwidth(n_threads, mib=128, repeats=5):
    """GB/s of a large np.copyto, its read and its write counted, split into n_threads equal parts copied
    at once by as many threads (numpy's copy releases the GIL); the fastest of `repeats` copies."""
    src = np.ones(mib * 2 ** 18, dtype=np.float32)
    dst = np.empty_like(src)
    parts = list(zip(np.array_split(dst, n_threads), np.array_split(src, n_threads)))
    best = np.inf
    with ThreadPoolExecutor(n_threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda part: np.copyto(*part), parts))
            best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def step_items(data, hp, n_steps, seed=0):
    """(X, T, samples, n_items) of the first n_steps mini-batches of an epoch, padded to the batch size (the
    pad item is n_items), with samples drawn as training draws them (sample_cdf, inverse_cdf)."""
    keys = hp['session_key'], hp['item_key'], hp['time_key']
    itemidmap = np.sort(data[hp['item_key']].unique())
    import pandas as pd
    items, offsets, order = session_arrays(data, pd.Index(itemidmap), *keys, hp['time_sort'])
    n_items, B = len(itemidmap), hp['batch_size']
    cdf = sample_cdf(np.bincount(items, minlength=n_items), hp['sample_alpha'])
    rng = np.random.default_rng(seed)
    for X, T, _, _ in islice(session_parallel_batches(items, offsets, order, B), n_steps):
        samples = np.minimum(inverse_cdf(cdf, rng.random(hp['n_sample'])), n_items - 1).astype(np.int32)
        yield pad(X, B, n_items), pad(T, B, n_items), samples, n_items


def distinct_item_rows(data, hp, n_steps=200, seed=0):
    """The mean number of distinct item rows a step reads, over the first n_steps mini-batches of an
    epoch with samples drawn as training draws them (training.distinct_rows, step_items): (rows of Wy,
    rows of By, rows of the input table when it is not Wy; 0 when it is), and the number of items."""
    counts, n_items = [], None
    for X, T, samples, n_items in step_items(data, hp, n_steps, seed):
        slot = np.zeros(n_items + 1, dtype=np.int32)
        rows_Y, _, rows_X, _ = distinct_rows(X, T, samples, hp['constrained_embedding'], slot, n_items)
        if hp['constrained_embedding']:
            counts.append((len(np.unique(np.concatenate([rows_Y, rows_X]))), len(np.unique(rows_Y)), 0))
        else:
            counts.append((len(np.unique(rows_Y)), len(np.unique(rows_Y)), len(np.unique(rows_X))))
    return tuple(np.mean(counts, axis=0)), n_items


def row_bytes(hp, rows):
    """(gather bytes, optimiser bytes) of a step's item rows: one read to gather each row, a read and a write
    of its weights and of each optimiser array (accumulators, velocity) per row."""
    wy_rows, by_rows, input_rows = rows
    K = embedding_size(hp)
    input_width = K if K else 3 * hp['layers'][0]  # E's rows, or Wx0's of a one-hot input
    floats = wy_rows * hp['layers'][-1] + by_rows + input_rows * input_width
    arrays = 1 + ACCUMULATORS[hp['adapt']] + (hp['momentum'] > 0)
    return 4.0 * floats, 4.0 * floats * 2 * arrays


def dense_bytes(hp, n_items):
    """Bytes of the optimiser's read and write of the dense weights (every parameter but the item-indexed
    ones) and their state, a step."""
    items = set(item_parameters(hp))
    floats = sum(int(np.prod(shape)) for name, shape in parameter_shapes(hp, n_items).items() if name not in items)
    return 4.0 * floats * 2 * (1 + ACCUMULATORS[hp['adapt']] + (hp['momentum'] > 0))


# Runs train_speed.py (its path and arguments follow) with PyTensor's profile summary printing every apply,
# not its first 20 (train_speed.py calls summary() with its defaults).
TRAIN_SPEED_FULL_PROFILE = """
import os, runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path[:0] = [os.path.dirname(script), os.path.dirname(os.path.dirname(script))]
from pytensor.compile.debug.profiling import ProfileStats
summary = ProfileStats.summary
ProfileStats.summary = lambda self, file=sys.stderr, n_ops_to_print=20, n_apply_to_print=20: summary(
    self, file, 100000, 100000)
runpy.run_path(script, run_name='__main__')
"""


def train_speed(name, data, paramfile, steps, workdir, profile=False, one_thread=False, run=0):
    """train_speed.py's output for `steps` mini-batches (with its per-op profile, every apply, when `profile`;
    every product on one BLAS thread when `one_thread`), in its own process; its log goes to workdir/logs
    (numbered by `run` after the first)."""
    command = [sys.executable, *(['-c', TRAIN_SPEED_FULL_PROFILE] if profile else []),
               str(ROOT / 'benchmarks' / 'train_speed.py'), '--data', str(data), '-pf', str(paramfile),
               '--steps', str(steps)] + ['--profile'] * profile
    env = dict(os.environ)
    if one_thread:  # cbackend.product_threads() then gives every product one thread
        env['OPENBLAS_NUM_THREADS'] = '1'
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    suffix = '.profile' * profile + '.one_thread' * one_thread + f'.{run}' * bool(run)
    log = workdir / 'logs' / f'roofline_{name}{suffix}.log'
    log.write_text(' '.join(command[:1] + command[3 if profile else 1:]) + '\n\n' + done.stdout)
    if done.returncode or not SPEED.search(done.stdout):
        tail = '\n'.join(done.stdout.splitlines()[-15:])
        sys.exit(f'train_speed.py failed (exit status {done.returncode}; full output in {log}):\n{tail}')
    return done.stdout


def op_profile(output):
    """From train_speed.py --profile's output: ms per step of each op kind (the name before its '{'; the steps
    of the dense weights with their optimiser state apart, as DENSE_OPTIMISER), with
    its number of applies, the function's wall time per call, and the step's wall time."""
    calls, call_seconds = CALLS.search(output).groups()
    calls = int(calls)
    ops = OrderedDict()
    section = output[output.index('\nApply\n'):]
    for line in section.splitlines():
        match = APPLY_LINE.match(line)
        if match:
            seconds, _, _, apply = match.groups()
            kind = re.split(r'[{(]', apply, maxsplit=1)[0]
            if DENSE_ROWS.match(apply) or kind == 'Composite' and DENSE_STATE.search(apply):
                kind = DENSE_OPTIMISER
            ms, n = ops.get(kind, (0.0, 0))
            ops[kind] = ms + 1e3 * float(seconds) / calls, n + 1
    step_ms = 1e3 / float(SPEED.search(output).group(1))
    return ops, 1e3 * float(call_seconds) / calls, step_ms


def attribution(ops, call_ms, host_ms, bound):
    """Rows (what, applies, ms/step, ms in the bound, ms outside it) of a profiled step: products, gathers and
    optimiser steps of the item rows, the dense weights' optimiser steps against their parts of the bound,
    every other op, the function's overhead and the host (host_ms: from the run without the profile, whose
    bookkeeping after each call would count as the host's)."""
    groups = [('products (' + ', '.join(k for k in ops if k in PRODUCT_OPS) + ')', PRODUCT_OPS, bound['products']),
              ('row gathers (' + ', '.join(k for k in ops if k in GATHER_OPS) + ')', GATHER_OPS,
               bound['gather']),
              ('item-row optimiser (' + ', '.join(k for k in ops if k in OPTIMISER_OPS) + ')', OPTIMISER_OPS,
               bound['optimiser']),
              (DENSE_OPTIMISER, {DENSE_OPTIMISER}, bound['dense'])]
    rows = [(label, sum(ops[k][1] for k in ops if k in kinds), sum(ops[k][0] for k in ops if k in kinds), ms)
            for label, kinds, ms in groups]
    known = PRODUCT_OPS | GATHER_OPS | OPTIMISER_OPS | {DENSE_OPTIMISER}
    others = sorted(((k, n, ms) for k, (ms, n) in ops.items() if k not in known), key=lambda r: -r[2])
    rows += [(k, n, ms, 0.0) for k, n, ms in others]
    thunks = sum(ms for ms, _ in ops.values())
    rows.append(('function overhead (its wall time - the ops\' CPU time)', '', call_ms - thunks, 0.0))
    rows.append(('host (outside the step\'s calls, in the run without the profile)', '', host_ms, 0.0))
    return [(label, n, ms, in_bound, ms - in_bound) for label, n, ms, in_bound in rows]


def analyse(name, args, sgemm, bandwidth, cores):
    """The bound of one setting and, unless --no-train, its measured speed and profile: a dict of results."""
    setting = SETTINGS[name]
    paramfile = ROOT / 'paramfiles' / setting.paramfile
    path = data_file(setting, setting.sessions, args.workdir)
    hp = parse_hyperparameters(**read_paramfile(paramfile))
    data = load_log(str(path))
    rows, n_items = distinct_item_rows(data, hp)
    gather_bytes, optimiser_bytes = row_bytes(hp, rows)
    dense = dense_bytes(hp, n_items)
    products = []
    for p in step_products(hp):
        one, every = sgemm.rate(p, 1), sgemm.rate(p, cores)
        products.append((p, one, every, flops(p) / max(one, every) / 1e6))  # ms
    bound = {'products': sum(ms for *_, ms in products), 'gather': gather_bytes / bandwidth / 1e6,
             'optimiser': optimiser_bytes / bandwidth / 1e6, 'dense': dense / bandwidth / 1e6}
    result = dict(name=name, setting=setting, hp=hp, n_items=n_items, events=len(data), rows=rows,
                  bytes=gather_bytes + optimiser_bytes, dense_bytes=dense, products=products, bound=bound, cores=cores,
                  bound_ms=sum(bound.values()), data_label=setting.data.replace('_train_full', '') + (
                      f', first {setting.sessions:,} sessions' if setting.sessions else ''))
    if args.train:
        steps = args.steps or DEFAULT_STEPS.get(name, 500)
        result['steps'] = steps
        outputs = [train_speed(name, path, paramfile, steps, args.workdir, run=run) for run in range(args.runs)]
        result['speeds'] = [float(SPEED.search(output).group(1)) for output in outputs]
        result['speed'] = statistics.median(result['speeds'])
        host_ms = statistics.median(float(HOST.search(output).group(1)) for output in outputs)
        if args.one_thread:
            output = train_speed(name, path, paramfile, steps, args.workdir, one_thread=True)
            result['speed_one_thread'] = float(SPEED.search(output).group(1))
        if args.profile:
            output = train_speed(name, path, paramfile, steps, args.workdir, profile=True)
            ops, call_ms, step_ms = op_profile(output)
            result['profile'] = attribution(ops, call_ms, host_ms, bound), step_ms
    return result


def summary_table(results):
    lines = ['| setting (layers, batch) | data | N | GFLOP/step | item rows/step (distinct; of N + B read) | '
             'MB/step (item rows + dense weights) | bound ms/step (products + item rows + dense weights) | '
             'bound mb/s | measured mb/s (median of the runs) | measured / bound | '
             'measured, one BLAS thread | / bound |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in results:
        hp, (wy, by, inp) = r['hp'], r['rows']
        N = hp['batch_size'] + hp['n_sample']
        if hp['constrained_embedding']:
            rows = f"Wy {wy:,.0f} of {N + hp['batch_size']:,}, By {by:,.0f} of {N:,}"
        else:
            rows = f"Wy/By {wy:,.0f} of {N:,}, input {inp:,.0f} of {hp['batch_size']}"
        b = r['bound']
        runs = f" ({', '.join(f'{v:.1f}' for v in r['speeds'])})" if len(r.get('speeds', [])) > 1 else ''
        measured = ' | '.join(f"{r[k]:.1f}{runs if k == 'speed' else ''} | {r[k] * r['bound_ms'] / 1e3:.0%}"
                              if k in r else '- | -' for k in ('speed', 'speed_one_thread'))
        lines.append(f"| {r['setting'].label} | {r['data_label']} | {N:,} | "
                     f"{sum(flops(p) for p, *_ in r['products']) / 1e9:.3f} | {rows} | "
                     f"{r['bytes'] / 1e6:.1f} + {r['dense_bytes'] / 1e6:.1f} | {r['bound_ms']:.3f} "
                     f"({b['products']:.3f} + {b['gather'] + b['optimiser']:.3f} + {b['dense']:.3f}) | "
                     f"{1e3 / r['bound_ms']:,.0f} | {measured} |")
    return '\n'.join(lines) + '\n'


def products_table(r):
    lines = [f"| product | M x K x N | MFLOP | GFLOP/s 1 thread | GFLOP/s {r['cores']} threads | ms at the better |",
             '|---|---|---|---|---|---|']
    for p, one, every, ms in r['products']:
        t = ('ᵀ' if p.trans_a else '') + ('·ᵀ' if p.trans_b else '')
        lines.append(f'| {p.name} | {p.m:,} x {p.k:,} x {p.n:,}{" (" + t + ")" if t else ""} | {flops(p) / 1e6:.1f} | '
                     f'{one:.0f} | {every:.0f} | {ms:.4f} |')
    return '\n'.join(lines) + '\n'


def profile_table(r):
    rows, step_ms = r['profile']
    lines = [f'| op (applies) | ms/step | share of the step ({step_ms:.3f} ms) | ms in the bound | ms outside it |',
             '|---|---|---|---|---|']
    for label, n, ms, in_bound, outside in rows:
        lines.append(f"| {label}{f' ({n})' if n != '' else ''} | {ms:.3f} | {ms / step_ms:.0%} | "
                     f"{in_bound:.3f} | {outside:.3f} |")
    return '\n'.join(lines) + '\n'


def where_the_step_goes(results):
    """One table of every profiled setting: ms per step of each group of profile_table (before its
    parentheses), with its part of the bound in brackets where it has one."""
    profiled = [r for r in results if 'profile' in r]
    cells = [{label.split(' (')[0]: (ms, in_bound) for label, _, ms, in_bound, _ in r['profile'][0]} for r in profiled]
    groups = list(cells[0])[:4]
    tail = [g for g in cells[0] if g.startswith(('function', 'host'))]
    ops = {g for c in cells for g in c} - set(groups) - set(tail)
    groups += sorted(ops, key=lambda g: -max(c.get(g, (0, 0))[0] for c in cells)) + tail
    lines = ['| ms/step [in the bound] | ' + ' | '.join(r['name'] for r in profiled) + ' |',
             '|---|' + '---|' * len(profiled)]
    for g in groups:
        row = [f'{c[g][0]:.3f}' + (f' [{c[g][1]:.3f}]' if c[g][1] else '') if g in c else '-' for c in cells]
        lines.append(f'| {g} | ' + ' | '.join(row) + ' |')
    steps = ' | '.join(f"{r['profile'][1]:.3f}" for r in profiled)
    lines.append(f'| the step (wall time, of the profiled run) | {steps} |')
    return '\n'.join(lines) + '\n'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--settings', nargs='+', choices=SETTINGS, default=list(SETTINGS), help='rows (default: all)')
    parser.add_argument('--steps', type=int,
                        help='mini-batches that train_speed.py trains (default: per setting, ' +
                             ', '.join(f'{k} {v}' for k, v in DEFAULT_STEPS.items()) + ')')
    parser.add_argument('--out', type=Path, help='write the tables to this markdown file')
    parser.add_argument('--no-train', dest='train', action='store_false', help='only the bound (no training)')
    parser.add_argument('--runs', type=int, default=3,
                        help='train_speed.py runs of the measured speed, their median counted (default 3: one run '
                             'of a few seconds moves by 5-10%% on a shared machine)')
    parser.add_argument('--profile', action=argparse.BooleanOptionalAction, default=True,
                        help="the per-op profile of the step (a second train_speed.py run; default on)")
    parser.add_argument('--one-thread', action=argparse.BooleanOptionalAction, default=True,
                        help='also train with every product on one BLAS thread (OPENBLAS_NUM_THREADS=1; default on)')
    parser.add_argument('--workdir', type=Path, default=Path('/tmp/gru4rec_compare_port'),
                        help="compare_port.py's: the data files and the logs (default %(default)s)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error('--runs must be at least 1')
    if args.steps is not None and args.steps < 2:
        parser.error('--steps must be at least 2 (train_speed.py leaves the first step out of the speed)')
    if args.out is not None and args.out.suffix != '.md':
        parser.error(f'--out {args.out}: give a .md path')
    (args.workdir / 'logs').mkdir(parents=True, exist_ok=True)

    load_before = os.getloadavg()
    sgemm = Sgemm()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    copy_rates = {n: copy_bandwidth(n) for n in sorted({1, cores})}
    bandwidth = max(copy_rates.values())
    copy_note = ', '.join(f"{rate:.1f} GB/s on {n} {'core' if n == 1 else 'cores'}" for n, rate in copy_rates.items())
    print(f'BLAS: {sgemm.name}; copy bandwidth {copy_note} (read + write; the better counted)', flush=True)
    results = []
    for name in args.settings:
        print(f'{name}: ', end='', flush=True)
        results.append(analyse(name, args, sgemm, bandwidth, cores))
        r = results[-1]
        print(f"bound {1e3 / r['bound_ms']:,.0f} mb/s" + (f", measured {r['speed']:.1f}" if 'speed' in r else ''),
              flush=True)
    load_after = os.getloadavg()
    note = (f'Measured {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} on {os.cpu_count()} CPUs; 1-minute load '
            f'average {load_before[0]:.1f} before, {load_after[0]:.1f} after. BLAS: {sgemm.name}; copy bandwidth '
            f'{copy_note} (the better counted); training threads: {threads()}. Item rows: the mean distinct rows '
            'of the first 200 mini-batches, samples drawn as training draws them. Command: '
            f'`{" ".join(["python", "benchmarks/roofline.py", *sys.argv[1:]])}`')
    text = [note, '', summary_table(results)]
    if any('profile' in r for r in results):
        text += ['Where the step goes (train_speed.py --profile: the ops in thread CPU time, the rest wall time):',
                 '', where_the_step_goes(results)]
    for r in results:
        text += [f"### {r['name']} ({r['data_label']}: {r['events']:,} events, {r['n_items']:,} items)", '',
                 products_table(r)]
        if 'profile' in r:
            text += [f"Per-op profile of {r['steps']:,} steps (train_speed.py --profile, thread CPU time):", '',
                     profile_table(r)]
    text = '\n'.join(text)
    print('\n' + text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(args.out, lambda partial: Path(partial).write_text(text))
        print(f'wrote {args.out}; logs in {args.workdir / "logs"}')


if __name__ == '__main__':
    main()
