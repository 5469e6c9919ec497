"""paropt.py: search space files, trial commands, and two workers sharing one SQLite study."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import paropt
import run
from gru4rec import GRU4Rec
from hyperparams import parse_hyperparameters
from sessionlogs import synthetic_log

optuna = pytest.importorskip('optuna')
REPO = Path(__file__).resolve().parents[1]
SPACE = [{'name': 'layers', 'dtype': 'int', 'values': [4, 8], 'step': 4},
         {'name': 'learning_rate', 'dtype': 'float', 'values': [0.05, 0.2], 'step': 0.05},
         {'name': 'final_act', 'dtype': 'categorical', 'values': ['elu-1', 'linear']}]


def write_space(path, entries, lines=True):
    path.write_text('\n'.join(json.dumps(e) for e in entries) if lines else json.dumps(entries))
    return path


@pytest.mark.parametrize('lines', [True, False])
def test_space_files_as_json_lines_or_a_list(tmp_path, lines):
    assert paropt.read_space(write_space(tmp_path / 'space.json', SPACE, lines)) == SPACE


@pytest.mark.parametrize('entry, message', [
    ({'name': 'layer', 'dtype': 'int', 'values': [1, 2]}, 'not a GRU4Rec hyper-parameter'),
    ({'name': 'layers', 'dtype': 'integer', 'values': [1, 2]}, 'dtype must be one of'),
    ({'name': 'layers', 'dtype': 'int', 'values': [2, 1]}, r'values must be \[low, high\]'),
    ({'name': 'layers', 'dtype': 'int', 'values': [1.5, 2]}, r'values must be \[low, high\]'),
    ({'name': 'loss', 'dtype': 'categorical', 'values': []}, 'non-empty list of choices'),
    ({'name': 'momentum', 'dtype': 'float', 'values': [0, 1], 'step': 0.1, 'log': True}, 'either step or log'),
    ({'name': 'momentum', 'values': [0, 1]}, 'needs "name", "dtype" and "values"'),
    ({'name': 'momentum', 'dtype': 'float', 'values': [0, 1], 'stride': 1}, r"unknown key\(s\) \['stride'\]"),
])
def test_bad_space_entries_are_named(tmp_path, entry, message):
    with pytest.raises(run.InputError, match=message):
        paropt.read_space(write_space(tmp_path / 'space.json', [entry]))


def test_bad_space_files(tmp_path):
    with pytest.raises(run.InputError, match='cannot read parameter space file'):
        paropt.read_space(tmp_path / 'missing.json')
    (tmp_path / 'bad.json').write_text(json.dumps(SPACE[0]) + '\n{oops}')
    with pytest.raises(run.InputError, match=r'is not JSON \(line 2\)'):
        paropt.read_space(tmp_path / 'bad.json')
    with pytest.raises(run.InputError, match='names a parameter twice'):
        paropt.read_space(write_space(tmp_path / 'twice.json', [SPACE[0], SPACE[0]]))


def test_trials_suggest_rounded_values_and_run_py_reads_their_command():
    trial = optuna.trial.FixedTrial({'layers': 8, 'learning_rate': 0.15000000000000002, 'final_act': 'linear'})
    params = paropt.suggest(trial, SPACE)
    assert dict(params) == {'layers': 8, 'learning_rate': 0.15, 'final_act': 'linear'}
    args = paropt.build_parser().parse_args(['train.tsv', 'valid.tsv', '-opf', 'space.json', '-pm', 'mrr', '-m', '10'])
    command = paropt.run_command(args, dict(params, n_epochs=1))
    parsed = run.build_parser().parse_args(command)
    assert (parsed.path, parsed.test, parsed.measure) == ('train.tsv', ['valid.tsv'], [10])
    assert parsed.primary_metric == 'mrr'
    assert parsed.log_primary_metric
    assert run.parse_param_string(parsed.parameter_string) == {
        'layers': '8', 'learning_rate': '0.15', 'final_act': 'linear', 'n_epochs': '1'}


def test_a_failing_trial_reports_run_py_error_line(tmp_path):
    with pytest.raises(paropt.TrialError, match='status 2: run.py: error: cannot read test data file'):
        paropt.evaluate_trial([str(tmp_path / 'train.tsv'), '-ps', 'n_epochs=1', '-t', 'missing.tsv', '-lpm'])


def write_logs(folder):
    synthetic_log(60, seed=1).to_csv(folder / 'train.tsv', sep='\t', index=False)
    synthetic_log(20, seed=2, first_session=501, first_time=1e5).to_csv(folder / 'valid.tsv', sep='\t', index=False)


def test_trials_report_every_epoch_and_a_stopped_trial_ends_its_process(tmp_path):
    write_logs(tmp_path)
    command = [str(tmp_path / 'train.tsv'), '-t', str(tmp_path / 'valid.tsv'), '-lpm', '-pm', 'recall', '-m', '5',
               '-ps', 'n_epochs=3,batch_size=8,n_sample=4,loss=bpr-max,layers=8']
    reports = []
    final = paropt.evaluate_trial(command, report=lambda epoch, value: reports.append((epoch, value)))
    assert [epoch for epoch, _ in reports] == [1, 2, 3]
    assert reports[-1][1] == final and all(0 <= value <= 1 for _, value in reports)

    class Stop(Exception):
        pass

    def stop(epoch, value):
        raise Stop(epoch)
    started = time.time()
    with pytest.raises(Stop, match='1'):  # after the first of 1000 epochs
        paropt.evaluate_trial(command[:-1] + ['n_epochs=1000,batch_size=8,n_sample=4,loss=bpr-max,layers=8'],
                              report=stop)
    assert time.time() - started < 120


def test_a_hopeless_trial_is_pruned_after_its_first_epoch(tmp_path):
    write_logs(tmp_path)
    storage = f'sqlite:///{tmp_path / "search.db"}'
    study = optuna.create_study(storage=storage, study_name='pruned', direction='maximize')
    for _ in range(5):  # earlier trials that scored a perfect MRR at every epoch
        study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={e: 1.0 for e in range(1, 101)},
                                                  user_attrs={'command': ['train.tsv', '-ps', 'layers=8']}))
    started = time.time()
    assert paropt.main([str(tmp_path / 'train.tsv'), str(tmp_path / 'valid.tsv'),
                        '-opf', str(write_space(tmp_path / 'space.json', SPACE)), '-nt', '6', '-pm', 'mrr',
                        '-ps', 'n_epochs=100,batch_size=8,n_sample=4,loss=bpr-max', '--storage', storage,
                        '--study', 'pruned', '--pruner', 'median']) == 0
    trial = study.get_trials()[-1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1] and trial.intermediate_values[1] < 1
    assert time.time() - started < 120  # not the 100 epochs



def test_a_worker_starts_no_trial_after_its_time_budget_and_the_search_resumes(tmp_path):
    write_logs(tmp_path)
    storage = f'sqlite:///{tmp_path / "search.db"}'
    space = write_space(tmp_path / 'space.json', SPACE)
    args = [str(tmp_path / 'train.tsv'), str(tmp_path / 'valid.tsv'), '-opf', str(space),
            '-ps', 'n_epochs=1,batch_size=8,n_sample=4,loss=bpr-max', '-nt', '3', '-pm', 'mrr', '--storage', storage,
            '--study', 'budget', '--seed', '1', '--pruner', 'none']
    assert paropt.main(args + ['--timeout', '0.5']) == 0  # the first trial outlasts the budget and finishes
    study = optuna.load_study(study_name='budget', storage=storage)
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE]
    assert paropt.main(args) == 0
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE] * 3


@pytest.mark.parametrize('name', paropt.PRUNERS)
def test_a_diverged_trial_is_pruned_below_the_floor_whatever_the_pruner(name):
    """A trial at a tenth of another trial's metric after the same epoch is pruned at once with a floor of
    0.5; without the floor none of the pruners ends it there (one earlier trial is no quorum for them).
    Above the floor, the pruner alone decides."""
    for floor, diverged in ((0.5, True), (0.0, False)):
        study = optuna.create_study(direction='maximize', pruner=paropt.make_pruner(optuna, name, floor),
                                    sampler=optuna.samplers.RandomSampler(seed=0))
        study.add_trial(optuna.trial.create_trial(value=0.3, intermediate_values={1: 0.1, 2: 0.2, 3: 0.3}))
        trial = study.ask()
        for epoch, value in ((1, 0.01), (2, 0.06)):  # below half of 0.1 and of 0.2
            trial.report(value, epoch)
            assert trial.should_prune() is diverged, (floor, epoch)
        trial.report(0.2, 3)  # two thirds of 0.3
        alone = paropt.make_pruner(optuna, name).prune(study, study.get_trials(deepcopy=False)[-1])
        assert trial.should_prune() is alone

def test_storage_paths_become_sqlite_urls(tmp_path):
    assert paropt.storage_url(str(tmp_path / 's.db')) == f'sqlite:///{tmp_path / "s.db"}'
    assert paropt.storage_url('postgresql://user@host/db') == 'postgresql://user@host/db'


def test_bad_input_exits_with_status_2(tmp_path, capsys):
    space = write_space(tmp_path / 'space.json', SPACE)
    assert paropt.main([str(tmp_path / 'missing.tsv'), 'v.tsv', '-opf', str(space)]) == 2
    assert 'no such data file' in capsys.readouterr().err
    assert paropt.main(['t.tsv', 'v.tsv', '-opf', str(space), '-ps', 'loss=xe']) == 2
    assert 'unknown loss' in capsys.readouterr().err
    write_logs(tmp_path)
    for flag in ('--trials-csv', '--best-paramfile'):  # refused before the search, which may last hours
        assert paropt.main([str(tmp_path / 'train.tsv'), str(tmp_path / 'valid.tsv'), '-opf', str(space),
                            '--storage', str(tmp_path / 's.db'), flag, str(tmp_path / 'missing' / 'out')]) == 2
        assert f"cannot write {tmp_path / 'missing' / 'out'}: no such directory" in capsys.readouterr().err
    assert not (tmp_path / 's.db').exists()
    with pytest.raises(SystemExit) as exit_:
        paropt.main(['t.tsv', 'v.tsv', '-opf', str(space), '--prune-below', '1'])
    assert exit_.value.code == 2 and '--prune-below must be at least 0 and below 1' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        paropt.main(['t.tsv', 'v.tsv', '-opf', str(space), '--timeout', '0'])
    assert exit_.value.code == 2 and '--timeout must be a positive number of seconds' in capsys.readouterr().err


def test_an_enqueued_setting_is_the_first_trial_once_per_study(tmp_path):
    write_logs(tmp_path)
    storage = f'sqlite:///{tmp_path / "search.db"}'
    args = [str(tmp_path / 'train.tsv'), str(tmp_path / 'valid.tsv'),
            '-opf', str(write_space(tmp_path / 'space.json', SPACE)),
            '-ps', 'n_epochs=1,batch_size=8,n_sample=4,loss=bpr-max', '-pm', 'mrr', '--storage', storage,
            '--study', 'seeded', '--seed', '3', '--pruner', 'none',
            '--enqueue', 'layers=8,learning_rate=0.15,final_act=linear']
    assert paropt.main(args + ['-nt', '1']) == 0
    study = optuna.load_study(study_name='seeded', storage=storage)
    assert study.get_trials()[0].params == {'layers': 8, 'learning_rate': 0.15, 'final_act': 'linear'}
    assert 'layers=8,learning_rate=0.15,final_act=linear' in ','.join(study.get_trials()[0].user_attrs['command'])
    assert paropt.main(args + ['-nt', '2']) == 0  # a second worker, or a resumed one, does not queue it again
    fixed = [t for t in study.get_trials() if 'fixed_params' in t.system_attrs]
    assert len(study.get_trials()) == 2 and len(fixed) == 1


@pytest.mark.parametrize('setting, message', [
    ('n_epochs=3', 'n_epochs is not a searched parameter (fix the others with -pf or -ps)'),
    ('layers=6', 'layers=6 is outside the space: 4 to 8 in steps of 4'),
    ('layers=12', 'layers=12 is outside the space: 4 to 8 in steps of 4'),
    ('learning_rate=0.12', 'learning_rate=0.12 is outside the space: 0.05 to 0.2 in steps of 0.05'),
    ('layers=four', 'layers=four is not an int'),
    ('final_act=tanh', "final_act=tanh is not one of the choices ['elu-1', 'linear']"),
    ('layers', 'bad parameter string'),
])
def test_a_bad_enqueued_setting_is_refused_before_the_search(tmp_path, capsys, setting, message):
    write_logs(tmp_path)
    assert paropt.main([str(tmp_path / 'train.tsv'), str(tmp_path / 'valid.tsv'),
                        '-opf', str(write_space(tmp_path / 'space.json', SPACE)), '--storage', str(tmp_path / 's.db'),
                        '--enqueue', setting]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 's.db').exists()


def test_two_workers_share_one_sqlite_study_and_a_finished_search_resumes(tmp_path):
    write_logs(tmp_path)
    command = [sys.executable, str(REPO / 'paropt.py'), 'train.tsv', 'valid.tsv',
               '-opf', str(write_space(tmp_path / 'space.json', SPACE)),
               '-ps', 'n_epochs=1,batch_size=8,n_sample=4,loss=bpr-max', '-nt', '2', '-pm', 'mrr',
               '--storage', 'search.db', '--study', 'shared',
               '--pruner', 'none', '--prune-below', '0']  # every trial runs to its end: a pruned third one would not
    workers = [subprocess.Popen(command + ['--seed', str(seed)], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
        assert 'Best trial #' in out
    study = optuna.load_study(study_name='shared', storage=f'sqlite:///{tmp_path / "search.db"}')
    trials = study.get_trials()
    # Each worker stops once the study has 2 finished trials; one may start another while the other
    # still runs its first.
    assert 2 <= len(trials) <= 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE and 0 <= t.value <= 1 for t in trials)
    assert {t.user_attrs['worker'].split(':')[1] for t in trials} == {str(w.pid) for w in workers}
    resumed = subprocess.run(command + ['--best-paramfile', 'best.py', '--trials-csv', 'trials.csv'], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and f'Best trial #{study.best_trial.number}' in resumed.stdout
    assert len(study.get_trials()) == len(trials)  # already finished: no new trial
    # Every trial as a CSV row: its state, value, worker, parameters and the metric after each epoch.
    table = pd.read_csv(tmp_path / 'trials.csv')
    assert table.number.tolist() == [t.number for t in trials] and set(table.state) == {'COMPLETE'}
    assert table.value.tolist() == pytest.approx([t.value for t in trials])
    assert table.epoch_1.tolist() == pytest.approx([t.intermediate_values[1] for t in trials])
    assert table.layers.tolist() == [t.params['layers'] for t in trials] and (table.seconds > 0).all()
    assert table.worker.tolist() == [t.user_attrs['worker'] for t in trials]
    # The best setting as a parameter file: the fixed and the searched parameters, typed, and the summary.
    best = run.read_paramfile(tmp_path / 'best.py')
    searched = paropt.suggest(optuna.trial.FixedTrial(study.best_params), SPACE)
    assert best == dict(n_epochs=1, batch_size=8, n_sample=4, loss='bpr-max', **searched)
    GRU4Rec().set_params(**best)
    assert f'# Trials: {len(trials)} complete, 0 pruned, 0 failed; {len(trials)} epochs trained' in \
        (tmp_path / 'best.py').read_text()


@pytest.mark.parametrize('path', sorted((REPO / 'paramspaces').glob('*.json')), ids=lambda p: p.name)
def test_shipped_search_spaces_are_valid(path):
    assert paropt.read_space(path)


def space_by_name(path):
    return {entry['name']: entry for entry in paropt.read_space(path)}


@pytest.mark.parametrize('loss, ours_add', [('xe', {'logq', 'reset_after'}), ('bprmax', {'reset_after'})])
def test_the_originals_spaces_and_ours_differ_as_documented(loss, ours_add):
    """paramspaces/gru4rec_{loss}_standard_parspace.json is the original's; ours (shared) searches momentum
    in [0, 0.5] instead of [0, 0.9] and adds its own parameters; everything else is the same."""
    original = space_by_name(REPO / 'paramspaces' / f'gru4rec_{loss}_standard_parspace.json')
    ours = space_by_name(REPO / 'paramspaces' / f'gru4rec_{loss}_shared_parspace.json')
    assert set(ours) - set(original) == ours_add and set(original) <= set(ours)
    assert original['momentum']['values'] == [0.0, 0.9] and ours['momentum']['values'] == [0.0, 0.5]
    for name in set(original) - {'momentum'}:
        assert ours[name] == original[name], name


@pytest.mark.parametrize('path', sorted((REPO / 'paramspaces').glob('*.json')), ids=lambda p: p.name)
def test_every_space_suggests_settings_run_py_accepts(path):
    optuna = pytest.importorskip('optuna')
    space = paropt.read_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(20):
        params = paropt.suggest(study.ask(), space)
        model = GRU4Rec().set_params(**run.parse_param_string(run.format_param_string(params)))
        parsed = parse_hyperparameters(**model.get_params())  # set_params stores the strings as given
        assert parsed['momentum'] == params['momentum'] <= space_by_name(path)['momentum']['values'][1]


def test_the_originals_flag_names_are_accepted():
    args = paropt.build_parser().parse_args(['train.tsv', 'valid.tsv', '--optuna_parameter_file',
                                             'paramspaces/gru4rec_xe_standard_parspace.json', '-fp',
                                             'loss=cross-entropy,final_act=softmax', '--ntrials', '7'])
    assert args.parameter_string == 'loss=cross-entropy,final_act=softmax' and args.n_trials == 7
    assert args.optuna_parameter_file == 'paramspaces/gru4rec_xe_standard_parspace.json'
