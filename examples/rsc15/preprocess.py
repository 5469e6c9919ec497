"""Preprocesses the RecSys Challenge 2015 clicks (yoochoose-clicks.dat) as in the GRU4Rec papers.

    python examples/rsc15/preprocess.py yoochoose-clicks.dat data/rsc15

writes data/rsc15_train_full.tsv, data/rsc15_test.tsv (the last day's sessions), and, split the same
way from train_full, data/rsc15_train_tr.tsv and data/rsc15_train_valid.tsv for tuning. An output that
is an existing folder gets files named rsc15_*.tsv inside it.

The raw file has lines `session,ISO-8601 time,item,category` and no header. Sessions with one event
are dropped, then items with fewer than 5 events, then sessions left with fewer than 2 events. Sessions
whose last event is in the final day (time >= last time - 86400 s) form the test set, which keeps only
items of the training set and sessions still of length 2 or more. Times are UTC unix seconds (the
original read them as local time, which shifts them by a constant and changes nothing else).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

DAY = 86400
MIN_ITEM_SUPPORT = 5
MIN_SESSION_LENGTH = 2
SPLITS = ('train_full', 'test', 'train_tr', 'train_valid')


def read_clicks(path):
    """The raw clicks as a DataFrame with SessionId, ItemId and Time (unix seconds) columns."""
    data = pd.read_csv(path, sep=',', header=None, usecols=[0, 1, 2], dtype={0: np.int64, 1: str, 2: np.int64})
    data.columns = ['SessionId', 'TimeStr', 'ItemId']
    times = pd.to_datetime(data.pop('TimeStr'), utc=True, format='ISO8601')
    data['Time'] = ((times - pd.Timestamp(0, tz='UTC')) / pd.Timedelta(seconds=1)).round(3)  # ms, as in the file
    return data


def _sessions_with(data, min_length):
    lengths = data.groupby('SessionId').size()
    return data[data.SessionId.isin(lengths.index[lengths >= min_length])]


def filter_clicks(data):
    """Drops one-event sessions, then items with fewer than 5 events, then sessions shorter than 2."""
    data = _sessions_with(data, 2)
    supports = data.groupby('ItemId').size()
    data = data[data.ItemId.isin(supports.index[supports >= MIN_ITEM_SUPPORT])]
    return _sessions_with(data, MIN_SESSION_LENGTH)


def split_sessions(data, sessions):
    """(train, test): test holds the given sessions, restricted to training items and to sessions of
    length 2 or more; train holds the others."""
    in_test = data.SessionId.isin(sessions)
    train, test = data[~in_test], data[in_test]
    return train, _sessions_with(test[test.ItemId.isin(train.ItemId)], MIN_SESSION_LENGTH)


def split_last_day(data, days=1):
    """(train, test): test holds the sessions that end in the last day, or days (see split_sessions)."""
    session_end = data.groupby('SessionId').Time.max()
    return split_sessions(data, session_end.index[session_end >= data.Time.max() - days * DAY])


def preprocess(clicks):
    """The four splits (train_full, test, train_tr, train_valid), sorted by session and time."""
    data = filter_clicks(clicks).sort_values(['SessionId', 'Time'], kind='stable')
    train_full, test = split_last_day(data)
    train_tr, train_valid = split_last_day(train_full)
    return dict(zip(SPLITS, (train_full, test, train_tr, train_valid)))


def output_paths(output, compress=False):
    """File names of the splits: OUTPUT_train_full.tsv, ... or, for an existing folder, OUTPUT/rsc15_*.tsv."""
    output = Path(output)
    prefix = output / 'rsc15' if output.is_dir() else output
    suffix = '.tsv.gz' if compress else '.tsv'
    return {split: prefix.parent / f'{prefix.name}_{split}{suffix}' for split in SPLITS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('input', help='the raw yoochoose-clicks.dat (or a sample in the same format)')
    parser.add_argument('output', help='prefix of the output files (e.g. data/rsc15), or an existing folder')
    parser.add_argument('--gzip', action='store_true', help='write gzipped files (.tsv.gz)')
    args = parser.parse_args(argv)
    paths = output_paths(args.output, args.gzip)
    source = Path(args.input).resolve()
    if source in {path.resolve() for path in paths.values()}:
        parser.exit(2, f'{parser.prog}: error: refusing to overwrite the input {args.input} with an output file\n')
    try:
        clicks = read_clicks(args.input)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        parser.exit(2, f'{parser.prog}: error: cannot read {args.input} as yoochoose clicks: '
                       f'{getattr(e, "strerror", None) or str(e).splitlines()[0]}\n')
    splits = preprocess(clicks)
    for split, data in splits.items():
        path = paths[split]
        path.parent.mkdir(parents=True, exist_ok=True)
        data.to_csv(path, sep='\t', index=False)
        print(f'{split}: {len(data)} events, {data.SessionId.nunique()} sessions, {data.ItemId.nunique()} items '
              f'-> {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
