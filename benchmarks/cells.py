"""Both GRU cells side by side: the original's (reset_after=False, the default) and the reset-after cell
of cuDNN / torch.nn.GRUCell (reset_after=True), each data set with its tuned parameter file.

    python benchmarks/cells.py                           # all data sets found in ../shared/data
    python benchmarks/cells.py --data rsc15_100k --seeds 42 1 --output cells.md

Every row is one run.py command (printed in the table, relative to the repository root), run in its own
process as in reproduce.py: train on DATA_train_full, evaluate on DATA_test against all items (standard
ties), Recall@20 and MRR@20. The two cells of a data set and seed differ only in reset_after.
"""
import argparse
import shlex
import sys

from reproduce import DATA, REPO, run_row, write_table

SETTINGS = {  # data set -> its tuned parameter file
    'rsc15_100k': 'rsc15_xe_shared_100_best',
    'yoochoose1_64': 'rsc15_xe_shared_100_best',
    'diginetica': 'diginetica_bprmax_shared_best',
    'retailrocket': 'retailrocket_bprmax_shared_best',
}
CELLS = {False: 'original (reset before)', True: 'reset after'}


def arguments(data, reset_after, seed, backend=None):
    """run.py arguments that train one cell on one data set and evaluate it at 20."""
    params = f'reset_after={reset_after}' + (f',seed={seed}' if seed is not None else '')
    return [str(DATA / f'{data}_train_full.tsv.gz'), '-t', str(DATA / f'{data}_test.tsv.gz'), '-m', '20',
            '-pf', f'paramfiles/{SETTINGS[data]}.py', '-ps', params] + (['--backend', backend] if backend else [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', nargs='+', choices=sorted(SETTINGS), default=sorted(SETTINGS),
                        help='data sets (default: all of them that are present)')
    parser.add_argument('--seeds', nargs='+', type=int, help="seeds to train each cell with (default: the model's)")
    parser.add_argument('--backend', choices=('c', 'jax'), help='PyTensor compile mode')
    parser.add_argument('--output', help='also write the markdown table to this file')
    parser.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
    args = parser.parse_args(argv)
    lines = ['| data | parameter file | cell | seed | R@20 | MRR@20 | s/epoch | command |', '|' + '---|' * 8]
    for data in args.data:
        if not (REPO / DATA / f'{data}_train_full.tsv.gz').exists():
            print(f'{REPO / DATA}/{data}_* not found: skipped', file=sys.stderr)
            continue
        for seed in args.seeds or [None]:
            for reset_after, cell in CELLS.items():
                command = arguments(data, reset_after, seed, args.backend)
                print(f'{data} / {cell}: python run.py {shlex.join(command)}', file=sys.stderr, flush=True)
                if args.dry_run:
                    continue
                metrics, _, epoch_s, error = run_row(command)
                figures = f'{error} | —' if error else f'{metrics[20][0]:.4f} | {metrics[20][1]:.4f}'
                lines.append(f'| {data} | {SETTINGS[data]} | {cell} | {seed if seed is not None else "default"} | '
                             f'{figures} | {epoch_s or "—"} | `python {shlex.join(["run.py", *command])}` |')
    write_table(lines, args.output)
    return 0


if __name__ == '__main__':
    sys.exit(main())
