"""Hyper-parameter search for GRU4Rec with Optuna: each trial trains and evaluates in its own run.py
process (a crash or a diverging model fails that trial only), optimising Recall@k or MRR@k.

    python paropt.py rsc15_train_tr.tsv rsc15_train_valid.tsv -pf paramfiles/rsc15_xe_shared_100_best.py \\
        -opf paramspaces/gru4rec_xe_shared_parspace.json -nt 100 -pm mrr -m 20 --storage rsc15.db

The trials live in an Optuna storage: an SQLite file by default, so an interrupted search resumes
where it stopped when started again with the same storage and study name; any Optuna database URL
(e.g. postgresql://...) works too, and several workers (processes, machines) started with the same
storage and study name share one search. -nt is the number of finished trials of the whole study.

Pruning: run.py reports the validation metric after every epoch (`EPOCH METRIC: epoch value`), paropt
passes it on to Optuna as it comes, and ends the trial's process as soon as the pruner (--pruner,
Hyperband by default) finds it hopeless, or its value is below --prune-below times the best any other
trial reached after the same epoch; the trial is then PRUNED, with the last reported value kept as an
intermediate value. --timeout gives a worker a time budget. Workers send a heartbeat to the storage
(--heartbeat); a trial whose worker died (machine lost, process killed) is marked FAIL by another worker
after two missed heartbeats and retried once with the same parameters (a new trial, whose system
attribute failed_trial names it).

Search spaces (paramspaces/): gru4rec_xe_standard_parspace.json and gru4rec_bprmax_standard_parspace.json
are the original's (momentum in [0, 0.9]); gru4rec_*_shared_parspace.json are this library's, which the
tuned files of paramfiles/ (*_tuned.py) were searched in: momentum in [0, 0.5], and logq (cross-entropy)
and reset_after added. The parameter space file lists one parameter per line as JSON (or a JSON list of
them), as in the original's paropt: {"name": "learning_rate", "dtype": "float", "values": [0.01, 0.25], "step": 0.005}
with dtype int or float (values: [low, high]; optional "step" and "log") or categorical (values: the
choices, e.g. ["elu-0.5", "elu-1"], or "200/200" for two layers). Fixed parameters come from -pf and
-ps as in run.py; the searched ones override them. --enqueue name=value,... makes the study try a given
setting of the searched parameters first (e.g. the original's tuned one), once however many workers give it.

Requires optuna: pip install 'gru4rec[paropt]'.
"""
import ast
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import run
from atomicfile import write_atomically
from evaluation import TIE_MODES
from gru4rec import BACKENDS, HYPERPARAMETERS, GRU4Rec

PRIMARY = re.compile(r'^PRIMARY METRIC: (\S+)$')
EPOCH = re.compile(r'^EPOCH METRIC: (\d+) (\S+)$')
PRUNERS = ('hyperband', 'median', 'none')
DTYPES = ('int', 'float', 'categorical')


class TrialError(RuntimeError):
    """A trial whose run.py process failed (bad parameters, divergence, timeout)."""


def read_space(path):
    """The search space: a list of dicts (name, dtype, values, optional step and log), checked."""
    try:
        text = Path(path).read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        raise run.InputError(f'cannot read parameter space file {path}: {getattr(e, "strerror", None) or e}') from None
    if text.lstrip().startswith('['):
        space = _json(text, path, 0)
    else:
        space = [_json(line, path, number) for number, line in enumerate(text.splitlines()) if line.strip()]
    if not space:
        raise run.InputError(f'parameter space file {path} names no parameter')
    for entry in space:
        _check_space_entry(path, entry)
    names = [entry['name'] for entry in space]
    if len(set(names)) < len(names):
        raise run.InputError(f'parameter space file {path} names a parameter twice')
    return space


def _json(text, path, first_line):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise run.InputError(f'parameter space file {path} is not JSON (line {first_line + e.lineno}): '
                             f'{e.msg}') from None


def _check_space_entry(path, entry):
    def fail(what):
        raise run.InputError(f'parameter space file {path}: {json.dumps(entry)}: {what}')
    if not isinstance(entry, dict) or not {'name', 'dtype', 'values'} <= set(entry):
        fail('each parameter needs "name", "dtype" and "values"')
    unknown = set(entry) - {'name', 'dtype', 'values', 'step', 'log'}
    if unknown:
        fail(f'unknown key(s) {sorted(unknown)}')
    if entry['name'] not in HYPERPARAMETERS:
        fail('not a GRU4Rec hyper-parameter')
    if entry['dtype'] not in DTYPES:
        fail(f'dtype must be one of {list(DTYPES)}')
    values = entry['values']
    if entry['dtype'] == 'categorical':
        if not isinstance(values, list) or not values or \
                not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
            fail('values must be a non-empty list of choices (strings, numbers, booleans)')
        return
    number = int if entry['dtype'] == 'int' else (int, float)
    if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, number) for v in values)
            and values[0] <= values[1]):
        fail(f'values must be [low, high] with {entry["dtype"]} low <= high')
    if entry.get('step') is not None and entry.get('log'):
        fail('give either step or log, not both')


def suggest(trial, space):
    """The trial's values for the searched parameters."""
    params = OrderedDict()
    for entry in space:
        name, values = entry['name'], entry['values']
        if entry['dtype'] == 'categorical':
            params[name] = trial.suggest_categorical(name, values)
        elif entry['dtype'] == 'int':
            params[name] = trial.suggest_int(name, values[0], values[1], step=entry.get('step') or 1,
                                             log=entry.get('log', False))
        else:
            value = trial.suggest_float(name, values[0], values[1], step=entry.get('step'),
                                        log=entry.get('log', False))
            params[name] = round(value, 12)  # 0.15, not the 0.15000000000000002 of stepping by 0.05
    return params


def enqueued(text, space):
    """The searched parameters' values that an --enqueue string (name=value,... as run.py -ps) gives the
    study's next trial, each checked against its entry of the space: a choice of a categorical parameter,
    or a number within [low, high] on the step grid of a numeric one (Optuna would otherwise draw another)."""
    entries = {entry['name']: entry for entry in space}
    params = OrderedDict()
    for name, raw in run.parse_param_string(text).items():
        entry = entries.get(name)
        if entry is None:
            raise run.InputError(f'--enqueue {text!r}: {name} is not a searched parameter (fix the others with -pf '
                                 'or -ps)')
        values = entry['values']
        if entry['dtype'] == 'categorical':
            matches = [v for v in values if str(v) == raw]
            if not matches:
                raise run.InputError(f'--enqueue {text!r}: {name}={raw} is not one of the choices {values}')
            params[name] = matches[0]
            continue
        try:
            value = int(raw) if entry['dtype'] == 'int' else float(raw)
        except ValueError:
            raise run.InputError(f'--enqueue {text!r}: {name}={raw} is not an {entry["dtype"]}') from None
        step = entry.get('step') or (1 if entry['dtype'] == 'int' else None)
        steps = (value - values[0]) / step if step else 0
        on_grid = abs(steps - round(steps)) < 1e-6
        if not values[0] <= value <= values[1] or not on_grid:
            grid = f' in steps of {step}' if step else ''
            raise run.InputError(f'--enqueue {text!r}: {name}={raw} is outside the space: {values[0]} to {values[1]}'
                                 f'{grid}')
        params[name] = value
    return params


def run_command(args, params):
    """The run.py arguments that train with `params` on the training file and report the primary metric."""
    command = [args.train, '-ps', run.format_param_string(params), '-t', args.valid, '-m', str(args.measure),
               '-pm', args.primary_metric, '-e', args.eval_type, '-lpm', '-ss', str(args.sample_store),
               '-sk', args.session_key, '-ik', args.item_key, '-tk', args.time_key]
    return command + (['--backend', args.backend] if args.backend else [])


def evaluate_trial(command, timeout=None, report=None):
    """Runs run.py with `command` in a new process; returns the primary metric it printed.

    report(epoch, value) is called with each epoch's validation metric as run.py prints it; an exception
    it raises (optuna.TrialPruned) ends the process and propagates."""
    with tempfile.TemporaryFile('w+') as stderr:
        proc = subprocess.Popen([sys.executable, run.__file__, *command], stdout=subprocess.PIPE, stderr=stderr,
                                text=True)
        timed_out = threading.Event()

        def expire():
            timed_out.set()
            proc.kill()
        timer = threading.Timer(timeout, expire) if timeout else None
        if timer:
            timer.start()
        primary = None
        try:
            for line in proc.stdout:
                line = line.rstrip('\n')
                epoch, found = EPOCH.match(line), PRIMARY.match(line)
                if epoch and report:
                    report(int(epoch[1]), float(epoch[2]))
                elif found:
                    primary = float(found[1])
            proc.wait()
        finally:
            if timer:
                timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if timed_out.is_set():
            raise TrialError(f'the trial ran longer than {timeout} s')
        if proc.returncode != 0 or primary is None:
            stderr.seek(0)
            lines = stderr.read().strip().splitlines() or ['no output']
            raise TrialError(f'run.py exited with status {proc.returncode}: {lines[-1]}')
    return primary


def storage_url(storage):
    """An Optuna database URL; a plain path means an SQLite file."""
    return storage if '://' in storage else f'sqlite:///{Path(storage).resolve()}'


def make_pruner(optuna, name, floor=0.0):
    """The pruner named by --pruner. Median prunes a trial whose best value so far is below the median of
    the completed trials' values at the same epoch (once 5 trials have completed); Hyperband (successive
    halving in brackets, reduction factor 3) compares the trials of a bracket at epochs 1, 3, 9, ...
    With a `floor` (--prune-below), a trial whose value after an epoch is below floor times the best that
    any other trial reached after that epoch is pruned whatever the pruner says: in a small search a
    bracket holds few trials, and Hyperband lets a diverged setting (MRR .0009 where others had .10)
    run to the end for want of a rival in its own bracket."""
    if name == 'median':
        pruner = optuna.pruners.MedianPruner(n_startup_trials=5)
    elif name == 'hyperband':
        pruner = optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    else:
        pruner = optuna.pruners.NopPruner()
    if not floor:
        return pruner

    class FloorPruner(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            epoch = trial.last_step
            if epoch is None:
                return False
            others = [t.intermediate_values[epoch] for t in study.get_trials(deepcopy=False)
                      if t.number != trial.number and epoch in t.intermediate_values]
            return bool(others) and trial.intermediate_values[epoch] < floor * max(others) \
                or pruner.prune(study, trial)
    return FloorPruner()


def open_study(optuna, url, name, seed, pruner, heartbeat, attempts=5):
    """Creates or loads the study. Workers started together on a new database race to create its
    tables; the losers see an integrity or locking error and try again."""
    from sqlalchemy.exc import IntegrityError, OperationalError
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # the heartbeat is marked experimental
                warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
            return optuna.create_study(storage=storage, study_name=name, direction='maximize', load_if_exists=True,
                                       sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def build_parser():
    p = run.ArgumentParser(description='Hyper-parameter search for GRU4Rec with Optuna: every trial is a run.py '
                           'process that trains on TRAIN and is evaluated on VALID.',
                           epilog='The parameter space file and the storage are described in the docstring of '
                           'paropt.py. Exit status: 0 on success, 2 on bad input.')
    p.add_argument('train', metavar='TRAIN', help='training data (e.g. the train_tr file of preprocess.py)')
    p.add_argument('valid', metavar='VALID', help='validation data the trials are scored on (e.g. train_valid)')
    p.add_argument('-opf', '--optuna-parameter-file', '--optuna_parameter_file', metavar='FILE', required=True,
                   help='the search space: JSON, one parameter per line (see paramspaces/: the original\'s '
                   'gru4rec_*_standard_parspace.json, or this library\'s gru4rec_*_shared_parspace.json)')
    p.add_argument('-pf', '--parameter-file', metavar='FILE',
                   help='fixed hyper-parameters, a run.py parameter file (the searched ones override it)')
    p.add_argument('-ps', '--parameter-string', '-fp', '--fixed_parameters', metavar='PARAMS',
                   help="fixed hyper-parameters as name=value,... (override -pf; -fp is the original's name)")
    p.add_argument('-nt', '--n-trials', '--ntrials', metavar='N', type=int, default=50,
                   help='finished trials the study should reach, all workers together (default: 50)')
    p.add_argument('-m', '--measure', metavar='K', type=int, default=20, help='the cut-off k (default: 20)')
    p.add_argument('-pm', '--primary-metric', choices=('recall', 'mrr'), default='recall',
                   help='the metric to maximise at k (default: recall)')
    p.add_argument('-e', '--eval-type', choices=TIE_MODES,
                   default='standard', help='tie mode of the evaluation (see run.py; default: standard)')
    p.add_argument('--storage', default='paropt.db',
                   help='Optuna storage: an SQLite file path, or a database URL shared by several workers '
                   '(default: paropt.db)')
    p.add_argument('--study', default='gru4rec', help='study name within the storage (default: gru4rec)')
    p.add_argument('--seed', type=int, help="seed of Optuna's sampler (give each worker its own)")
    p.add_argument('--pruner', choices=PRUNERS, default='hyperband',
                   help='ends hopeless trials early by their validation metric after each epoch: hyperband, median '
                   'or none (default: hyperband, chosen by the replay in docs/tuning.md)')
    p.add_argument('--prune-below', metavar='FRACTION', type=float, default=0.5,
                   help='also prune a trial whose metric after an epoch is below FRACTION times the best any other '
                   'trial reached after that epoch (default: 0.5; 0 turns it off)')
    p.add_argument('--heartbeat', metavar='SECONDS', type=int, default=60,
                   help="a worker's heartbeat interval: a trial silent for twice as long is failed and retried "
                   'once (default: 60)')
    p.add_argument('--trial-timeout', metavar='SECONDS', type=float,
                   help='fail a trial that runs longer than this (default: no limit)')
    p.add_argument('--enqueue', metavar='PARAMS', action='append', default=[],
                   help='a setting the study tries before sampling (name=value,... of searched parameters, as -ps; '
                   'the others are sampled), e.g. the original\'s tuned one; once per study, however many workers '
                   'give it; repeatable')
    p.add_argument('--timeout', metavar='SECONDS', type=float,
                   help="this worker's time budget: it starts no trial after SECONDS, and lets the running one "
                   'finish (default: no limit; the search resumes with the same --storage and --study)')
    p.add_argument('-ss', '--sample-store', metavar='N', type=int, default=10000000,
                   help='sample store size passed to run.py (default: 10000000)')
    p.add_argument('-sk', '--session-key', metavar='NAME', default='SessionId', help='session id column')
    p.add_argument('-ik', '--item-key', metavar='NAME', default='ItemId', help='item id column')
    p.add_argument('-tk', '--time-key', metavar='NAME', default='Time', help='timestamp column')
    p.add_argument('--backend', choices=sorted(BACKENDS), help='PyTensor compile mode of the trials')
    p.add_argument('--best-paramfile', metavar='FILE',
                   help='write the best trial\'s parameters (fixed and searched) to FILE as a run.py parameter file, '
                   'with the summary of the search in comments')
    p.add_argument('--trials-csv', metavar='FILE',
                   help='write every trial of the study (state, value, seconds, parameters, the metric after each '
                   'epoch) to FILE as CSV')
    return p


def search(args):
    """Runs (or resumes) the study; raises run.InputError on bad input."""
    try:
        import optuna
    except ImportError:
        raise run.InputError("paropt needs optuna: pip install 'gru4rec[paropt]'") from None
    space = read_space(args.optuna_parameter_file)
    fixed = run.read_paramfile(args.parameter_file) if args.parameter_file else OrderedDict()
    if args.parameter_string:
        fixed.update(run.parse_param_string(args.parameter_string))
    try:
        GRU4Rec().set_params(**fixed)
        run.format_param_string(fixed)
    except ValueError as e:
        raise run.InputError(e) from None
    queued = [enqueued(text, space) for text in args.enqueue]
    for path in (args.train, args.valid):
        if not Path(path).is_file():
            raise run.InputError(f'no such data file: {path}')
    for path in (args.best_paramfile, args.trials_csv):  # checked now, not after hours of search
        if path and not Path(path).resolve().parent.is_dir():
            raise run.InputError(f'cannot write {path}: no such directory {Path(path).resolve().parent}')
    try:
        study = open_study(optuna, storage_url(args.storage), args.study, args.seed,
                           make_pruner(optuna, args.pruner, args.prune_below), args.heartbeat)
    except Exception as e:  # SQLAlchemy and Optuna raise many kinds for a bad URL or an unusable database
        raise run.InputError(f'cannot open the Optuna storage {args.storage}: {str(e).splitlines()[0]}') from None
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    for params in queued:
        study.enqueue_trial(dict(params), skip_if_exists=True)

    def objective(trial):
        command = run_command(args, OrderedDict(fixed, **suggest(trial, space)))
        trial.set_user_attr('command', command)
        trial.set_user_attr('worker', f'{socket.gethostname()}:{os.getpid()}')

        def report(epoch, value):
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f'{args.primary_metric}@{args.measure} = {value:.6f} after epoch {epoch}')

        try:
            return evaluate_trial(command, args.trial_timeout, report)
        except TrialError as e:
            trial.set_user_attr('error', str(e))
            print(f'Trial {trial.number} failed: {e}', file=sys.stderr, flush=True)
            return None  # Optuna marks the trial failed and goes on

    remaining = args.n_trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, timeout=args.timeout,
                       callbacks=[optuna.study.MaxTrialsCallback(args.n_trials, states=finished)])
    if args.trials_csv:
        write_trials(args.trials_csv, study.get_trials(deepcopy=False))
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        print('No trial has completed yet.')
        return
    best = study.best_trial
    lines = [summary(study.get_trials(deepcopy=False, states=finished)),
             f'Best trial #{best.number}: {args.primary_metric}@{args.measure} = {best.value:.6f} on {args.valid}']
    print(*lines, sep='\n')
    print('Train with them: python run.py', shlex.join(best.user_attrs['command'][:3]), '-t TEST ...')
    if args.best_paramfile:
        params = run.parse_param_string(best.user_attrs['command'][2])
        write_paramfile(args.best_paramfile, OrderedDict((name, _literal(value)) for name, value in params.items()),
                        [f'Found by paropt.py, study {args.study}.'] + lines)
        print(f'Wrote them to {args.best_paramfile}')


def summary(trials):
    """One line on finished trials: how many completed, were pruned, failed; epochs trained; wall time."""
    states = [t.state.name for t in trials]
    epochs = sum(len(t.intermediate_values) for t in trials)
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    hours = (max(ends) - min(starts)).total_seconds() / 3600 if ends and starts else 0.0
    return (f'Trials: {states.count("COMPLETE")} complete, {states.count("PRUNED")} pruned, {states.count("FAIL")} '
            f'failed; {epochs} epochs trained; {hours:.2f} h from the first start to the last end')


def write_trials(path, trials):
    """Writes every trial as a CSV row, atomically: number, state, value, seconds, worker, the searched
    parameters, and the validation metric after each epoch (epoch_1, epoch_2, ...)."""
    import pandas as pd
    rows = []
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append({'number': t.number, 'state': t.state.name, 'value': t.value, 'seconds': seconds,
                     'worker': t.user_attrs.get('worker'),
                     **{name: round(v, 12) if isinstance(v, float) else v for name, v in t.params.items()},
                     **{f'epoch_{epoch}': value for epoch, value in sorted(t.intermediate_values.items())}})
    write_atomically(path, lambda partial: pd.DataFrame(rows).to_csv(partial, index=False))


def _literal(text):
    """A parameter string's value as the Python literal it spells (480, 0.2, True, [200, 200]), else the text."""
    parts = text.split('/')
    try:
        values = [ast.literal_eval(part) for part in parts]
    except (ValueError, SyntaxError):
        return text
    return values if len(values) > 1 else values[0]


def write_paramfile(path, params, comments):
    """Writes a run.py parameter file (read by run.read_paramfile), atomically."""
    body = ''.join(f'    ({name!r}, {value!r}),\n' for name, value in params.items())
    text = ''.join(f'# {line}\n' for line in comments) + \
        f'from collections import OrderedDict\n\ngru4rec_params = OrderedDict([\n{body}])\n'
    write_atomically(path, lambda partial: partial.write_text(text, encoding='utf-8'))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n_trials < 1:
        parser.error(f'-nt must be positive, got {args.n_trials}')
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f'--timeout must be a positive number of seconds, got {args.timeout}')
    if not 0 <= args.prune_below < 1:
        parser.error(f'--prune-below must be at least 0 and below 1, got {args.prune_below}')
    if args.heartbeat < 1:
        parser.error(f'--heartbeat must be a positive number of seconds, got {args.heartbeat}')
    return run.exit_status(parser.prog, lambda: search(args))


if __name__ == '__main__':
    sys.exit(main())
