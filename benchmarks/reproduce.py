"""Reproduction table: GRU4Rec with the published settings and the baselines on the benchmark data.

    python benchmarks/reproduce.py                       # all data sets found in ../shared/data
    python benchmarks/reproduce.py --data rsc15_100k --output results.md
    python benchmarks/reproduce.py --data yoochoose1_64 --settings yoochoose1_64_xe_tuned --baselines --seeds 1 2 3

Every row is one run.py command (printed in the table, relative to the repository root), run in its
own process: train on DATA_train_full, evaluate on DATA_test against all items (standard ties),
Recall@k and MRR@k for k = 5, 10, 20. 'train s' is the whole fit; 's/epoch' is GRU4Rec's mean epoch
time (the baselines have no epochs). With --seeds, every GRU4Rec setting runs once per seed and a last
row gives the mean and standard deviation over the seeds. With --jobs N, N rows run at once, each with
its share of the cores for BLAS (OPENBLAS_NUM_THREADS, unless already set); the table keeps the rows'
order, and each output line starts with its row's name. Progress and each command's output go to stderr as
they come.
Settings whose parameter file does not exist (a search not yet run) are skipped.
"""
import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT as REPO  # common also puts the repository on sys.path
from cbackend import usable_cores

DATA = Path('..') / 'shared' / 'data'  # relative to the repository root, as in the printed commands
CUTOFFS = (5, 10, 20)
SETTINGS = {  # data set -> GRU4Rec parameter files: the original's, then ours tuned on a validation split
    'rsc15_100k': ['rsc15_xe_shared_100_best', 'rsc15_topk_bprmax'],
    'yoochoose1_64': ['rsc15_xe_shared_100_best', 'yoochoose1_64_xe_tuned', 'yoochoose1_64_bprmax_tuned'],
    'diginetica': ['diginetica_bprmax_shared_best', 'diginetica_xe_tuned', 'diginetica_bprmax_tuned'],
    'retailrocket': ['retailrocket_bprmax_shared_best', 'retailrocket_xe_tuned', 'retailrocket_bprmax_tuned'],
}
BASELINES = ['pop', 'spop', 'itemknn', 'markov', 'random', 'bpr']
RESULT = re.compile(r'^Recall@(\d+): (\S+) MRR@\d+: (\S+)$')
TRAINED = re.compile(r'^Trained in (\S+)s(?:, (\S+)s per epoch)?$')


def rows(data, settings, baselines, seeds=(None,), backend=None, epochs=None):
    """(setting or baseline, model name, run.py arguments) for every row of one data set."""
    base = [str(DATA / f'{data}_train_full.tsv.gz'), '-t', str(DATA / f'{data}_test.tsv.gz'),
            '-m', *map(str, CUTOFFS)]
    extra = (['--backend', backend] if backend else [])
    for setting in settings:
        if not (REPO / 'paramfiles' / f'{setting}.py').exists():
            print(f'paramfiles/{setting}.py not found: skipped', file=sys.stderr)
            continue
        for seed in seeds:
            params = ','.join(([f'n_epochs={epochs}'] if epochs else []) + ([f'seed={seed}'] if seed else []))
            name = f'GRU4Rec {setting}' + (f', seed {seed}' if seed else '')
            params = ['-ps', params] if params else []
            yield setting, name, base + ['-pf', f'paramfiles/{setting}.py'] + params + extra
    for name in baselines:
        yield name, name, base + ['-b', name] + extra


def run_row(arguments, name='', env=None):
    """Runs run.py, echoing its output to stderr after `name`; returns (metrics by cut-off, train s, s/epoch,
    error)."""
    proc = subprocess.Popen([sys.executable, 'run.py', *arguments], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    metrics, train_s, epoch_s, last = {}, None, None, ''
    for line in proc.stdout:
        print(f'    {name}{line.rstrip()}', file=sys.stderr, flush=True)
        line = line.strip()
        last = line or last
        if match := RESULT.match(line):
            metrics[int(match.group(1))] = (float(match.group(2)), float(match.group(3)))
        elif match := TRAINED.match(line):
            train_s, epoch_s = match.group(1), match.group(2)
    error = None if proc.wait() == 0 and metrics else f'failed: {last}'
    return metrics, train_s, epoch_s, error


def table_row(data, model, arguments, metrics, train_s, epoch_s, error):
    command = '`python ' + shlex.join(['run.py', *arguments]) + '`'
    if error:
        return f'| {data} | {model} | {error} |' + ' |' * 7 + f' {command} |'
    figures = [f'{metrics[k][0]:.4f}' for k in CUTOFFS] + [f'{metrics[k][1]:.4f}' for k in CUTOFFS]
    return f'| {data} | {model} | ' + ' | '.join(figures) + f' | {train_s} | {epoch_s or "—"} | {command} |'


def spread_row(data, setting, results):
    """The mean and standard deviation over the seeds of one setting's results (metrics by cut-off)."""
    cells = []
    for which in (0, 1):
        for k in CUTOFFS:
            values = [metrics[k][which] for metrics in results]
            cells.append(f'{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}')
    return f'| {data} | GRU4Rec {setting}, mean ± sd of {len(results)} seeds | ' + ' | '.join(cells) + ' | | | |'


def job_environment(jobs):
    """The environment of each run.py when `jobs` run at once: the cores shared out among them for BLAS,
    so that they do not oversubscribe the machine (a choice already made in OPENBLAS_NUM_THREADS stays)."""
    if jobs == 1 or 'OPENBLAS_NUM_THREADS' in os.environ:
        return None
    return dict(os.environ, OPENBLAS_NUM_THREADS=str(max(1, usable_cores() // jobs)))


def write_table(lines, output=None):
    """Prints the markdown table's lines, and writes them to `output` when given."""
    table = '\n'.join(lines) + '\n'
    print(table)
    if output:
        Path(output).write_text(table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', nargs='+', choices=sorted(SETTINGS), default=sorted(SETTINGS),
                        help='data sets (default: all of them that are present)')
    parser.add_argument('--settings', nargs='+', metavar='NAME',
                        help='GRU4Rec parameter files (names in paramfiles/) instead of those of each data set')
    parser.add_argument('--baselines', nargs='*', choices=BASELINES, default=BASELINES, metavar='NAME',
                        help=f'baselines to run (default: {" ".join(BASELINES)}; none with an empty list)')
    parser.add_argument('--seeds', nargs='+', type=int, metavar='SEED',
                        help="train every GRU4Rec setting once per seed (default: the parameter file's seed)")
    parser.add_argument('--backend', choices=('c', 'jax'), help='PyTensor compile mode')
    parser.add_argument('--epochs', type=int, help="override the settings' number of epochs (quick checks)")
    parser.add_argument('--jobs', type=int, default=1, metavar='N',
                        help='run N rows at once, the cores shared out among them (default: 1)')
    parser.add_argument('--output', help='also write the markdown table to this file')
    parser.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f'--jobs must be at least 1, got {args.jobs}')
    header = ['data', 'model'] + [f'R@{k}' for k in CUTOFFS] + [f'MRR@{k}' for k in CUTOFFS] + \
        ['train s', 's/epoch', 'command']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for data in args.data:
        if not (REPO / DATA / f'{data}_train_full.tsv.gz').exists():
            print(f'{REPO / DATA}/{data}_* not found: skipped', file=sys.stderr)
            continue
        planned = list(rows(data, args.settings or SETTINGS[data], args.baselines, args.seeds or (None,),
                            args.backend, args.epochs))
        for _, model, arguments in planned:
            print(f'{data} / {model}: python run.py {shlex.join(arguments)}', file=sys.stderr, flush=True)
        if args.dry_run:
            continue
        env = job_environment(args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            outcomes = pool.map(lambda row: run_row(row[2], f'[{row[1]}] ' if args.jobs > 1 else '', env), planned)
            results = {}
            for (setting, model, arguments), outcome in zip(planned, outcomes):
                lines.append(table_row(data, model, arguments, *outcome))
                if not outcome[-1]:
                    results.setdefault(setting, []).append(outcome[0])
        lines += [spread_row(data, setting, runs) for setting, runs in results.items()
                  if len(runs) > 1 and setting not in BASELINES]
    write_table(lines, args.output)
    return 0


if __name__ == '__main__':
    sys.exit(main())
