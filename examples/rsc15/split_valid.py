"""Cuts a time-based validation split from a training file, so that a search never sees the test set.

    python examples/rsc15/split_valid.py data/rsc15_train_full.tsv
    python examples/rsc15/split_valid.py ../shared/data/yoochoose1_64_train_full.tsv.gz --sessions 15233 \
        -o data/yoochoose1_64

writes PREFIX_train_tr and PREFIX_train_valid (PREFIX: the input's name before _train_full, or -o; same
format suffix as the input) for paropt.py. The rule is the RSC15 preprocessing's (preprocess.py, whose
code this reuses): the validation part holds the sessions that end in the last day of the file (--days,
default 1; on an RSC15 train_full this gives exactly preprocess.py's train_tr and train_valid). Logs
whose Time column only orders the events (the yoochoose1_64 and diginetica files in ../shared/data)
take --sessions N instead: the last N sessions by start time; give the test split's session count, so
that validation is as large as the test split, as the one-day rule makes it for RSC15. Either way the
validation part keeps only items of the training part and sessions still of length 2 or more.
"""
import sys
from pathlib import Path

from preprocess import split_last_day, split_sessions

import run
from atomicfile import write_atomically

KEYS = ('SessionId', 'ItemId', 'Time')


def split_last_sessions(data, n_sessions):
    """(train, valid) with the last n_sessions sessions by start time (ties by session id) in valid."""
    starts = data.groupby('SessionId').Time.min().reset_index().sort_values(['Time', 'SessionId'], kind='stable')
    return split_sessions(data, starts.SessionId.iloc[len(starts) - n_sessions:])


def output_paths(source, output=None):
    """PREFIX_train_tr and PREFIX_train_valid with the suffix of `source` (e.g. .tsv.gz)."""
    name = Path(source).name
    stem, sep, suffix = name.partition('_train_full')
    if not sep and output is None:
        raise run.InputError(f'{source} is not named *_train_full*: give the output prefix with -o')
    suffix = suffix if sep else name[len(name.split('.')[0]):]
    prefix = Path(output) if output is not None else Path(source).parent / stem
    return {split: prefix.parent / f'{prefix.name}_{split}{suffix or ".tsv"}' for split in ('train_tr', 'train_valid')}


def main(argv=None):
    parser = run.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('train_full', metavar='TRAIN_FULL',
                        help='the training file to cut (e.g. data/rsc15_train_full.tsv)')
    size = parser.add_mutually_exclusive_group()
    size.add_argument('--days', type=float, default=1,
                      help='validation: the sessions ending in the last DAYS days (Time in unix seconds; default: 1)')
    size.add_argument('--sessions', type=int, metavar='N', help='validation: the last N sessions by start time')
    parser.add_argument('-o', '--output', metavar='PREFIX', help='prefix of the output files (default: the input name '
                        'before _train_full)')
    args = parser.parse_args(argv)
    if args.days <= 0 or (args.sessions is not None and args.sessions < 1):
        parser.error('--days and --sessions must be positive')

    def cut():
        paths = output_paths(args.train_full, args.output)
        data = run.read_log(args.train_full, KEYS, what='training data')
        if args.sessions is not None and args.sessions >= data.SessionId.nunique():
            raise run.InputError(f'--sessions {args.sessions} leaves no training session: {args.train_full} has '
                                 f'{data.SessionId.nunique()}')
        train, valid = split_last_sessions(data, args.sessions) if args.sessions else split_last_day(data, args.days)
        for path in paths.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        for (split, path), part in zip(paths.items(), (train, valid)):
            write_atomically(path, lambda partial: part.to_csv(partial, sep='\t', index=False))
            print(f'{split}: {len(part)} events, {part.SessionId.nunique()} sessions, {part.ItemId.nunique()} items '
                  f'-> {path}')
    return run.exit_status(parser.prog, cut)


if __name__ == '__main__':
    sys.exit(main())
