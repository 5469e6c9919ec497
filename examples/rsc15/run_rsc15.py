"""Trains GRU4Rec on RSC15 with a published setting and evaluates it, through the run.py command line.

    python examples/rsc15/preprocess.py yoochoose-clicks.dat data/rsc15
    python examples/rsc15/run_rsc15.py data/rsc15

PREFIX names the files preprocess.py writes (PREFIX_train_full.tsv and PREFIX_test.tsv, or .tsv.gz).
Without it, the 100k-event RSC15 extract in ../shared/data (next to the repository) is used when it is
there, and otherwise a generated session log, so that the example runs anywhere. The settings are the
RSC15 parameter files in paramfiles/: the tuned cross-entropy one by default, or a Top-k paper setting.
The equivalent run.py command is printed first.
"""
import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import run
from synthetic import generate_sessions

REPO = Path(__file__).resolve().parents[2]
SHARED_PREFIX = REPO.parent / 'shared' / 'data' / 'rsc15_100k'
SETTINGS = sorted(path.stem for path in (REPO / 'paramfiles').glob('rsc15_*.py'))


def find_split(prefix, split):
    """PREFIX_split.tsv or PREFIX_split.tsv.gz, whichever exists (None if neither)."""
    for suffix in ('.tsv', '.tsv.gz'):
        path = Path(f'{prefix}_{split}{suffix}')
        if path.exists():
            return path
    return None


def write_synthetic(folder, n_events=40000, n_items=1000, seed=0):
    """A generated session log (synthetic.generate_sessions) split by session start into train and test
    files: the sessions of the last tenth of the time span are the test set."""
    log = generate_sessions(n_events, n_items, seed=seed)
    starts = log.groupby('SessionId').Time.transform('min')
    is_test = starts > starts.quantile(0.9)
    paths = Path(folder) / 'synthetic_train_full.tsv', Path(folder) / 'synthetic_test.tsv'
    log[~is_test].to_csv(paths[0], sep='\t', index=False)
    log[is_test].to_csv(paths[1], sep='\t', index=False)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('prefix', nargs='?', help=f'prefix of the preprocessed files (default: {SHARED_PREFIX} '
                        'when present, else a generated log)')
    parser.add_argument('--setting', choices=SETTINGS, default='rsc15_xe_shared_100_best',
                        help='parameter file in paramfiles/ (default: rsc15_xe_shared_100_best)')
    parser.add_argument('--epochs', type=int, help="override the setting's number of epochs")
    parser.add_argument('--backend', choices=('c', 'jax'), help='PyTensor compile mode')
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        if args.prefix or find_split(SHARED_PREFIX, 'train_full'):
            prefix = args.prefix or SHARED_PREFIX
            train, test = find_split(prefix, 'train_full'), find_split(prefix, 'test')
            if train is None or test is None:
                parser.exit(2, f'{parser.prog}: error: no {prefix}_train_full.tsv[.gz] and {prefix}_test.tsv[.gz]; '
                               'write them with preprocess.py\n')
        else:
            print(f'{SHARED_PREFIX}_* not found: using a generated session log', flush=True)
            train, test = write_synthetic(folder)
        command = [str(train), '-pf', str(REPO / 'paramfiles' / f'{args.setting}.py'), '-t', str(test),
                   '-m', '5', '10', '20']
        if args.epochs:
            command += ['-ps', f'n_epochs={args.epochs}']
        if args.backend:
            command += ['--backend', args.backend]
        print(shlex.join(['python', str(REPO / 'run.py'), *command]), flush=True)
        return run.main(command)


if __name__ == '__main__':
    sys.exit(main())
