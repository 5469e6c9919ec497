"""examples/rsc15/split_valid.py: a validation split cut from a training file, the test set untouched."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import DATA_DIR, read_log

REPO = Path(__file__).resolve().parents[1]
DAY = 86400


def split_valid(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / 'examples' / 'rsc15' / 'split_valid.py'), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def days_log(n_sessions=300, n_days=5, seed=0):
    """Sessions of 1-6 events, one minute apart, starting at random over n_days; ids skewed so that
    some items are rare (and may be missing from the training part)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, size=n_sessions)
    starts = np.sort(rng.uniform(0, n_days * DAY, size=n_sessions)) + 1.4e9
    sessions = rng.permutation(n_sessions) + 1  # session ids not in time order
    return pd.DataFrame({'SessionId': np.repeat(sessions, lengths),
                         'ItemId': (rng.zipf(1.5, size=lengths.sum()) % 200) + 1,
                         'Time': np.concatenate([start + 60.0 * np.arange(n) for start, n in zip(starts, lengths)])
                         }).sort_values(['SessionId', 'Time'], kind='stable')


def check_split(full, train, valid, chosen):
    """train + valid come from full, valid is the sessions `chosen` as far as the rule keeps them."""
    assert not set(train.SessionId) & set(valid.SessionId)
    assert set(valid.ItemId) <= set(train.ItemId)
    assert valid.groupby('SessionId').size().min() >= 2
    pd.testing.assert_frame_equal(train.reset_index(drop=True),
                                  full[~full.SessionId.isin(chosen)].reset_index(drop=True))
    # Every chosen session is in valid unless it has fewer than 2 events of training items.
    known = full[full.SessionId.isin(chosen) & full.ItemId.isin(train.ItemId)]
    sizes = known.groupby('SessionId').size()
    pd.testing.assert_frame_equal(valid.reset_index(drop=True),
                                  known[known.SessionId.isin(sizes.index[sizes >= 2])].reset_index(drop=True))


def test_the_last_day_of_a_training_file_becomes_validation(tmp_path):
    full = days_log()
    full.to_csv(tmp_path / 'log_train_full.tsv.gz', sep='\t', index=False)
    result = split_valid('log_train_full.tsv.gz', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train, valid = read_log(tmp_path / 'log_train_tr.tsv.gz'), read_log(tmp_path / 'log_train_valid.tsv.gz')
    ends = full.groupby('SessionId').Time.max()
    last_day = ends.index[ends >= full.Time.max() - DAY]
    assert 0 < len(last_day) < full.SessionId.nunique()
    check_split(full, train, valid, last_day)
    assert f'train_valid: {len(valid)} events, {valid.SessionId.nunique()} sessions' in result.stdout


def test_the_last_sessions_by_start_time_become_validation(tmp_path):
    full = days_log(seed=1)
    full.to_csv(tmp_path / 'log.tsv', sep='\t', index=False)
    result = split_valid('log.tsv', '--sessions', 50, '-o', tmp_path / 'out' / 'cut', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train, valid = read_log(tmp_path / 'out' / 'cut_train_tr.tsv'), read_log(tmp_path / 'out' / 'cut_train_valid.tsv')
    starts = full.groupby('SessionId').Time.min().sort_values()
    check_split(full, train, valid, starts.index[-50:])
    assert 0 < valid.SessionId.nunique() <= 50


def test_rsc15_train_full_gives_the_preprocessing_s_train_tr_and_train_valid(tmp_path):
    if not (DATA_DIR / 'rsc15_100k_train_full.tsv.gz').exists():
        pytest.skip(f'real data not found: {DATA_DIR} (../shared/data from the repository root) is absent')
    result = split_valid(DATA_DIR / 'rsc15_100k_train_full.tsv.gz', '-o', tmp_path / 'rsc15_100k', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for split in ('train_tr', 'train_valid'):
        pd.testing.assert_frame_equal(read_log(tmp_path / f'rsc15_100k_{split}.tsv.gz'),
                                      read_log(DATA_DIR / f'rsc15_100k_{split}.tsv.gz'))


def test_bad_input_is_named_and_writes_nothing(tmp_path):
    days_log(n_sessions=20).to_csv(tmp_path / 'log.tsv', sep='\t', index=False)
    result = split_valid('log.tsv', cwd=tmp_path)
    assert result.returncode == 2 and 'is not named *_train_full*: give the output prefix with -o' in result.stderr
    result = split_valid('log.tsv', '--sessions', 20, '-o', 'cut', cwd=tmp_path)
    assert result.returncode == 2 and '--sessions 20 leaves no training session: log.tsv has 20' in result.stderr
    result = split_valid('missing_train_full.tsv', cwd=tmp_path)
    assert result.returncode == 2 and 'cannot read training data file missing_train_full.tsv' in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['log.tsv']
