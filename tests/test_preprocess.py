"""examples/rsc15: preprocess.py (filtering and last-day splits of the raw clicks) and run_rsc15.py."""
import contextlib
import importlib.util
import io
import shutil
from pathlib import Path

import pandas as pd
import pytest

import run

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples' / 'rsc15'
DAY = 86400


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess = load_example('preprocess')


def call(main, *args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


def iso(seconds):
    return pd.Timestamp(seconds, unit='s', tz='UTC').strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3] + 'Z'


def write_raw(path, events):
    """events: (session, unix seconds, item) triples, written as raw yoochoose clicks."""
    path.write_text(''.join(f'{s},{iso(t)},{i},0\n' for s, t, i in events))
    return path


def test_filters_and_splits_follow_the_rules(tmp_path):
    t0 = 1_400_000_000
    end = t0 + 10 * DAY
    events = [(1, t0, 100)]  # a one-event session: dropped first
    for s in range(2, 7):  # items 100 and 101 get support 5 in sessions two days apart
        events += [(s, t0 + (s - 2) * 2 * DAY, 100), (s, t0 + (s - 2) * 2 * DAY + 1, 101)]
    events += [(7, t0 + 500, 100), (7, t0 + 501, 102)]  # item 102 has support 1: session 7 shrinks to 1 event
    events += [(8, end - DAY + 10, 100), (8, end - DAY + 20, 101)]  # ends in the last day: test
    events += [(9, end - DAY - 10, 101), (9, end - DAY + 5, 100)]  # starts before, ends in the last day: test
    events += [(10, end - 5, 100), (10, end, 103)] + [(11 + k, t0 + k, 103) for k in range(4)]  # 103 only singly
    status, out, err = call(preprocess.main, write_raw(tmp_path / 'clicks.dat', events), tmp_path / 'out')
    assert status == 0, err
    read = {split: pd.read_csv(tmp_path / f'out_{split}.tsv', sep='\t') for split in preprocess.SPLITS}
    assert list(read['test'].columns) == ['SessionId', 'ItemId', 'Time']
    assert sorted(read['train_full'].SessionId.unique()) == [2, 3, 4, 5, 6]
    assert sorted(read['test'].SessionId.unique()) == [8, 9]
    assert read['test'].Time.iloc[0] == end - DAY + 10
    assert sorted(read['train_tr'].SessionId.unique()) == [2, 3, 4, 5]
    assert sorted(read['train_valid'].SessionId.unique()) == [6]  # the last day of train_full


def test_the_rsc15_sample_yields_files_that_run_py_trains_on(tmp_path, data_dir):
    status, out, err = call(preprocess.main, data_dir / 'raw' / 'yoochoose-clicks-sample.dat', tmp_path, '--gzip')
    assert status == 0, err
    splits = {split: pd.read_csv(tmp_path / f'rsc15_{split}.tsv.gz', sep='\t') for split in preprocess.SPLITS}
    for train, test in (('train_full', 'test'), ('train_tr', 'train_valid')):
        assert not splits[test].empty
        assert set(splits[test].ItemId) <= set(splits[train].ItemId)
        assert splits[test].groupby('SessionId').size().min() >= 2
        assert splits[train].groupby('SessionId').Time.max().max() < splits[test].Time.max() - DAY
    assert splits['train_full'].groupby('SessionId').size().min() >= 2
    status, out, err = call(run.main, tmp_path / 'rsc15_train_tr.tsv.gz', '-ps', 'layers=8,n_epochs=1,n_sample=8',
                            '-t', tmp_path / 'rsc15_train_valid.tsv.gz')
    assert status == 0, err
    assert 'Recall@20: ' in out


def test_run_rsc15_trains_and_evaluates_the_preprocessed_files(tmp_path, data_dir):
    call(preprocess.main, data_dir / 'raw' / 'yoochoose-clicks-sample.dat', tmp_path / 'rsc15')
    status, out, err = call(load_example('run_rsc15').main, tmp_path / 'rsc15', '--epochs', '1')
    assert status == 0, err
    assert 'paramfiles/rsc15_xe_shared_100_best.py' in out.splitlines()[0]
    assert [line.split()[0] for line in out.splitlines() if line.startswith('Recall@')] == \
        ['Recall@5:', 'Recall@10:', 'Recall@20:']


def test_the_generated_fallback_log_is_in_the_data_format(tmp_path):
    train, test = (pd.read_csv(path, sep='\t') for path in load_example('run_rsc15').write_synthetic(tmp_path, 2000))
    for log in (train, test):
        assert list(log.columns) == ['SessionId', 'ItemId', 'Time'] and len(log) > 0
    assert train.groupby('SessionId').Time.min().max() <= test.groupby('SessionId').Time.min().min()
    assert not set(train.SessionId) & set(test.SessionId)


def test_refuses_to_overwrite_its_input(tmp_path, data_dir):
    source = data_dir / 'raw' / 'yoochoose-clicks-sample.dat'
    raw = shutil.copy(source, tmp_path / 'x_test.tsv')
    status, out, err = call(preprocess.main, raw, tmp_path / 'x')
    assert status == 2 and 'refusing to overwrite the input' in err
    assert Path(raw).read_bytes() == source.read_bytes()


@pytest.mark.parametrize('content', [None, 'SessionId\tItemId\tTime\n1\t2\t3\n', '1,yesterday,5,0\n'])
def test_unreadable_input_exits_with_status_2(tmp_path, content):
    path = tmp_path / 'clicks.dat'
    if content is not None:
        path.write_text(content)
    status, out, err = call(preprocess.main, path, tmp_path / 'out')
    assert status == 2 and len(err.strip().splitlines()) == 1 and 'cannot read' in err
