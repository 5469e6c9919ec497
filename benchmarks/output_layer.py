"""The training step's output layer alone, on each tuned setting's shapes: cbackend.OutputLayer on worker_threads()
threads, against the same layer as the separate ops that the step runs without it (the rows' gather, the three
products on OpenBLAS's threads, the loss kernel, the column sum), in microseconds per call.

    python benchmarks/output_layer.py
    python benchmarks/output_layer.py --settings rsc15_topk_bprmax --calls 1000 --rounds 3

Each call scores new rows (random rows of a 20,000-row table), as training does; the three versions alternate,
--rounds times. The separate ops are the same graph with the loss's gradient also an output of the function,
which keeps the rewrite (cbackend.local_output_layer) from fusing it.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import pytensor
import pytensor.tensor as pt

from common import ROOT

sys.path.insert(0, str(ROOT))
from backends import compile_function  # noqa: E402
import cbackend  # noqa: E402
from losses import LOSSES  # noqa: E402
from run import read_paramfile  # noqa: E402
from training import row_loss_op  # noqa: E402

SETTINGS = ['rsc15_xe_shared_100_best', 'rsc15_topk_bprmax', 'retailrocket_bprmax_shared_best',
            'diginetica_bprmax_shared_best']
TABLE_ROWS = 20_000


def functions(hp):
    """The layer of the setting `hp` as OutputLayer and as separate ops, in float32 as GRU4Rec builds it."""
    with pytensor.config.change_flags(floatX='float32'):
        return _functions(hp)


def _functions(hp):
    h, table = pt.matrix('h', dtype='float32'), pt.matrix('table', dtype='float32')
    rows = pt.vector('rows', dtype='int64')
    offset, g, cols = (pt.vector(name, dtype='float32') for name in ('offset', 'g', 'cols'))
    bpreg = pt.scalar('bpreg', dtype='float32')
    loss_name = hp['loss']
    inputs = [h, table, rows, offset, g] + ([cols, bpreg] if loss_name == 'bpr-max' else [])
    elu = cbackend.kernel_activation(hp['final_act']) if loss_name == 'bpr-max' else (False, 0.0)
    threads = cbackend.worker_threads()
    op = cbackend.OutputLayer(loss_name, *elu, threads=threads)
    made = {f'OutputLayer, {threads} thread{"s" * (threads > 1)}': compile_function(inputs, op(*inputs))}
    W = table[rows]
    scores = pt.dot(h, W.T) + offset[None, :]
    losses = row_loss_op(loss_name, LOSSES[loss_name], scores, cols, float(hp.get('bpreg', 0.0)), hp['final_act'])
    G = pytensor.grad((losses * g).sum(), scores)
    # bpreg is the graph's constant here, as in the step: the function takes every input but it.
    made['separate ops'] = compile_function([v for v in inputs if v is not bpreg],
                                            [losses, pt.dot(G, W), pt.dot(G.T, h), G.sum(axis=0), G])
    return made


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--settings', nargs='+', choices=SETTINGS, default=SETTINGS)
    parser.add_argument('--calls', type=int, default=500, help='timed calls per version and round')
    parser.add_argument('--rounds', type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f'load average {os.getloadavg()[0]:.1f}; µs per call, median of {args.rounds} rounds (each round in '
          'brackets)\n')
    header = None
    for name in args.settings:
        hp = read_paramfile(os.path.join(ROOT, 'paramfiles', name + '.py'))
        M, K = hp['batch_size'], hp['layers'][-1]
        N = M + hp['n_sample']
        fns = functions(hp)
        if header is None:
            header = list(fns)
            print('| setting | M x K x N | ' + ' | '.join(header) + ' |')
            print('|---|---|' + '---|' * len(header))
        values = [rng.standard_normal((M, K)).astype(np.float32) * 0.3,
                  rng.standard_normal((TABLE_ROWS, K)).astype(np.float32) * 0.3, None,
                  rng.standard_normal(N).astype(np.float32), rng.uniform(0.5, 1.5, M).astype(np.float32)]
        if hp['loss'] == 'bpr-max':
            values += [np.ones(N, np.float32), np.float32(hp['bpreg'])]
        row_draws = [np.r_[rng.permutation(TABLE_ROWS)[:M], rng.integers(0, TABLE_ROWS, N - M)]
                     for _ in range(args.calls + 20)]
        times = {label: [] for label in fns}
        for _ in range(args.rounds):
            for label, fn in fns.items():
                rest = values[3:len(fn.maker.inputs)]  # bpreg, last, only where the function takes it
                for rows in row_draws[:20]:
                    fn(*values[:2], rows, *rest)
                start = time.perf_counter()
                for rows in row_draws[20:]:
                    fn(*values[:2], rows, *rest)
                times[label].append((time.perf_counter() - start) / args.calls * 1e6)
        cells = [f"{statistics.median(t):,.0f} ({', '.join(f'{x:,.0f}' for x in t)})" for t in times.values()]
        print(f'| {name} | {M} x {K} x {N:,} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
    main()
