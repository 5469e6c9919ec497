"""What a second core could give the training step's output layer, in a model of it written in C
(two_core_output.c): the output layer alone, on one core, and on two cores split two ways.

    python benchmarks/two_core_output.py                                   # the four tuned settings: 1-2 minutes
    python benchmarks/two_core_output.py --settings rsc15_xe_shared_100_best --steps 3000 --rounds 3

Per step the model gathers the scored items' rows of Wy, computes logits = h·Wyᵀ, a softmax cross-entropy
and its gradient, dh = dlogits·Wy, dWy = dlogitsᵀ·h summed per distinct item, and Adagrad with momentum on
those rows (weights, accumulator, velocity): the output layer of the training step, whose parts are
`RowGather`, three products, the loss kernel, `RowScatter` and `RowAdagrad` there. The items are those of
the setting's first mini-batches (targets, and samples drawn as training draws them: roofline.step_items),
the shapes the setting's (batch, last layer's width, scored columns). Modes, each timed per step (the first
fifth of the steps untimed), in alternating rounds:
- one core: the whole output layer on one thread;
- two cores: the columns split by the parity of (item + step); each core gathers, scores, differentiates
  and updates its columns' items, whose rows change from step to step;
- two cores, rows owned: the same, each core with the items of one parity in every step, so that their rows
  stay in its caches from step to step;
- two cores, update crossed: as "two cores", but each core updates the rows of the other core's columns, so
  their gradient and rows cross between the cores once a step, as when each op of the step is split
  between the cores on its own (BLAS threads for the products, the rows' update by position);
- two cores, update only: one core gathers, scores and differentiates every column, then each core updates
  half of the distinct rows (a two-thread RowAdagrad in the step as it is).
The row maxima and sums of the softmax and the two halves of dh are combined across the cores; each product
is one single-threaded call of the BLAS the training links (scipy-openblas32).
"""
import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, load_log
from compare_port import SETTINGS, data_file
from roofline import step_items

from hyperparams import parse_hyperparameters  # noqa: E402
from run import read_paramfile  # noqa: E402

MODES = {0: 'one core', 1: 'two cores', 2: 'two cores, rows owned', 3: 'two cores, update crossed',
         4: 'two cores, update only'}


def build(workdir):
    """two_core_output.c compiled into workdir and loaded (gcc, linked to scipy-openblas32)."""
    import scipy_openblas32
    lib_dir = scipy_openblas32.get_lib_dir()
    target = Path(workdir) / 'two_core_output.so'
    command = ['gcc', '-O3', '-march=native', '-mprefer-vector-width=512', '-ffast-math', '-shared', '-fPIC',
               '-pthread', str(ROOT / 'benchmarks' / 'two_core_output.c'), '-o', str(target), f'-L{lib_dir}',
               f'-l{scipy_openblas32.get_library()}', f'-Wl,-rpath,{lib_dir}', '-lmvec', '-lm']
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f'gcc failed:\n{done.stderr}')
    lib = ctypes.CDLL(str(target))
    lib.run.restype = ctypes.c_double
    lib.run.argtypes = [ctypes.c_int] * 6 + [ctypes.c_void_p, ctypes.c_int]
    return lib


def scored_items(name, steps, workdir):
    """(steps x N int32 items: each step's targets then samples, hyper-parameters, n_items + 1 rows)."""
    setting = SETTINGS[name]
    hp = parse_hyperparameters(**read_paramfile(ROOT / 'paramfiles' / setting.paramfile))
    data = load_log(str(data_file(setting, setting.sessions, workdir)))
    batches = list(step_items(data, hp, steps))
    if len(batches) < steps:
        sys.exit(f'{name}: only {len(batches)} mini-batches in an epoch, fewer than --steps {steps}')
    items = np.stack([np.concatenate([T, samples]) for _, T, samples, _ in batches])
    n_items = batches[0][3]
    return np.ascontiguousarray(items, dtype=np.int32), hp, n_items + 1  # and the pad item of padded batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--settings', nargs='+', choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument('--steps', type=int, help='steps per mode and round (default: 3000 / 1500 / 1000 / 300 '
                                                  'by setting, a few seconds each)')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--workdir', type=Path, default=Path(tempfile.gettempdir()) / 'gru4rec_compare_port',
                        help="where compare_port.py's data files are (written if missing)")
    args = parser.parse_args()
    default_steps = {'rsc15_xe_shared_100_best': 3000, 'rsc15_topk_bprmax': 1500,
                     'retailrocket_bprmax_shared_best': 1000, 'diginetica_bprmax_shared_best': 300}
    args.workdir.mkdir(parents=True, exist_ok=True)
    lib = build(args.workdir)
    load = os.getloadavg()[0]
    lines = ['| setting (layers, batch) | N | ' + ' | '.join(f'{m}, µs/step' for m in MODES.values()) +
             ' | one core / two cores |', '|---|---|' + '---|' * (len(MODES) + 1)]
    for name in args.settings:
        steps = args.steps or default_steps[name]
        items, hp, rows = scored_items(name, steps, args.workdir)
        B, H, N = hp['batch_size'], hp['layers'][-1], items.shape[1]
        times = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                seconds = lib.run(B, H, N, rows, steps, steps // 5, items.ctypes.data, mode)
                if not seconds:
                    sys.exit('two_core_output.c: out of memory')
                times[mode].append(seconds * 1e6)
        medians = {mode: float(np.median(t)) for mode, t in times.items()}
        cells = ' | '.join(f"{medians[m]:,.0f} ({', '.join(f'{t:,.0f}' for t in times[m])})" for m in MODES)
        lines.append(f'| {SETTINGS[name].label} | {N:,} | {cells} | x{medians[0] / medians[1]:.2f} |')
        print(lines[-1], flush=True)
    print(f'\nMeasured {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, 1-minute load average {load:.1f} '
          f'before; medians of {args.rounds} rounds (each round in brackets).\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
