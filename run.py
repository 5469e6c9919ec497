"""Command line for GRU4Rec: train a model (or load one), save it, evaluate it on test sets.

    python run.py TRAIN -pf paramfiles/rsc15_xe_shared_100_best.py -t TEST -m 5 10 20 -s model.gru4rec
    python run.py TRAIN -ps loss=bpr-max,final_act=elu-0.5,layers=100,n_epochs=1 -t TEST
    python run.py model.gru4rec -l -t TEST1 TEST2
    python run.py TRAIN -b markov -t TEST        (a baseline, evaluated by the same code)

The original's options are accepted too, with their underscores (--parameter_string, --load_model,
--sample_store_size, ...); --sample_store_on_cpu and -g/--gru4rec_model have no effect here.

Data files are TAB separated with a header (optionally compressed: .gz, .bz2, .xz, .zip), Parquet
(.parquet, needs pyarrow), or pickled pandas DataFrames (.pickle, .pkl) with --allow-pickle.
Results are printed as `Recall@20: 0.xxxxxx MRR@20: 0.xxxxxx`, one line per cut-off and test set.
Exit status: 0 on success, 2 on bad input (reported in one line), 1 when training diverges.
"""
import argparse
import ast
import importlib
import sys
import textwrap
import time
from collections import OrderedDict
from pathlib import Path

import pandas as pd

from baselines import BASELINES, make_baseline
from evaluation import TIE_MODES, evaluate_gpu
from gru4rec import BACKENDS, GRU4Rec, validate_log
from hyperparams import parse_hyperparameters

EVAL_BATCH_SIZE = 512


class InputError(Exception):
    """Bad input (a file, a parameter, an option): reported in one line, exit status 2."""


def exit_status(prog, body):
    """Runs a command-line tool's body(): exit status 0, or 2 after printing `prog: error: ...` for bad input
    (InputError) or a file that cannot be read or written (OSError, whose message names the file)."""
    try:
        body()
    except (InputError, OSError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------------
# Parameters: `k=v,k=v` strings and parameter files.

def parse_param_string(text):
    """OrderedDict of the `name=value,name=value` string; values stay strings (GRU4Rec.set_params and
    the baselines read them). List values use '/' as separator: layers=200/200."""
    params = OrderedDict()
    for item in text.split(','):
        name, sep, value = item.partition('=')
        name = name.strip()
        if not sep or not name:
            raise InputError(f'bad parameter string {text!r}: {item.strip()!r} is not name=value '
                             '(separate parameters with commas, list values with /)')
        if name in params:
            raise InputError(f'bad parameter string {text!r}: {name} is given twice')
        params[name] = value.strip()
    return params


def format_param_string(params):
    """The `name=value,...` string of a parameter dict, for parse_param_string (lists joined by '/')."""
    items = []
    for name, value in params.items():
        if isinstance(value, (list, tuple)):
            value = '/'.join(str(v) for v in value)
        value = str(value)
        if ',' in value or '=' in value:
            raise ValueError(f'{name}={value!r} cannot go into a parameter string (it holds "," or "=")')
        items.append(f'{name}={value}')
    return ','.join(items)


def read_paramfile(path):
    """The `gru4rec_params` dict of a parameter file, read without executing the file.

    The file assigns `gru4rec_params` a dict literal, `OrderedDict([(name, value), ...])` or
    `OrderedDict(name=value, ...)` (also spelled `collections.OrderedDict` or `dict`) of literal values;
    imports and other statements are ignored, since nothing in the file runs.
    """
    try:
        source = Path(path).read_text(encoding='utf-8')
        tree = ast.parse(source, filename=str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f'cannot read parameter file {path}: {getattr(e, "strerror", None) or e}') from None
    except SyntaxError as e:
        raise InputError(f'parameter file {path} is not valid Python (line {e.lineno}): {e.msg}') from None
    values = [node.value for node in tree.body if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == 'gru4rec_params' for t in node.targets)]
    if not values:
        raise InputError(f'parameter file {path} assigns no gru4rec_params')
    node = values[-1]
    try:
        params = _literal_dict(node)
    except (ValueError, TypeError, SyntaxError):
        raise InputError(f'parameter file {path}, line {node.lineno}: gru4rec_params must be a dict literal or '
                         'OrderedDict([(name, value), ...]) of literal values (the file is read, not run)') from None
    bad = [name for name in params if not isinstance(name, str)]
    if bad:
        raise InputError(f'parameter file {path}: parameter names must be strings, got {bad}')
    return params


def _literal_dict(node):
    """OrderedDict of a dict literal or of an OrderedDict(...)/dict(...) call with literal arguments."""
    if isinstance(node, ast.Dict):
        return OrderedDict(ast.literal_eval(node))
    if not isinstance(node, ast.Call) or ast.unparse(node.func) not in ('OrderedDict', 'collections.OrderedDict',
                                                                         'dict'):
        raise ValueError('not a dict')
    if len(node.args) > 1 or any(k.arg is None for k in node.keywords):
        raise ValueError('unexpected arguments')
    params = OrderedDict(ast.literal_eval(node.args[0])) if node.args else OrderedDict()
    params.update((k.arg, ast.literal_eval(k.value)) for k in node.keywords)
    return params


# ---------------------------------------------------------------------------------------------------
# Data files.

def read_log(path, keys, allow_pickle=False, what='data'):
    """The session log in `path` (TSV, Parquet or, with allow_pickle, a pickled DataFrame), checked to
    have the columns `keys` (session, item, time) with usable values."""
    name = Path(path).name.lower()
    try:
        if name.endswith(('.parquet', '.pq')):
            data = pd.read_parquet(path)
        elif name.endswith(('.pickle', '.pkl')):
            if not allow_pickle:
                raise InputError(f'{path} is a pickle: loading one can run arbitrary code, so it needs '
                                 '--allow-pickle (only for files you trust)')
            data = pd.read_pickle(path)
        else:
            data = pd.read_csv(path, sep='\t')
    except ImportError as e:
        raise InputError(f'cannot read {path}: {e}') from None
    except OSError as e:
        raise InputError(f'cannot read {what} file {path}: {e.strerror or e}') from None
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, EOFError) as e:
        raise InputError(f'cannot read {what} file {path}: {str(e).strip() or type(e).__name__}') from None
    if not isinstance(data, pd.DataFrame):
        raise InputError(f'{path} holds a {type(data).__name__}, not a pandas DataFrame')
    missing = [key for key in keys if key not in data.columns]
    if missing:
        raise InputError(f'{what} file {path} has no column(s) {missing} (it has {list(data.columns)}); '
                         'name the session, item and time columns with -sk, -ik and -tk')
    try:
        return validate_log(data, *keys, what=f'{what} file {path}')
    except ValueError as e:
        raise InputError(e) from None


# ---------------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """Reports a bad command line in one line (no usage dump) with exit status 2."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


# Subcommands `gru4rec NAME ...` dispatches to other modules: name -> (module whose main(argv) runs it, what it does).
# Without one of these names first, the command line trains or loads a model (build_parser).
SUBCOMMANDS = {
    'serve': ('serve', ('serve a trained model over HTTP: recommendations for live sessions, click by click '
                        '(needs the serve extra)')),
}


def _commands_text(prog):
    """The --help section that lists what the command does without a subcommand and with each one."""
    rows = [(f'{prog} PATH [options]', ('train a model (-ps / -pf) or load one (-l), save it, evaluate it '
                                        '(the options below)'))]
    rows += [(f'{prog} {name} MODEL [options]', f'{text}; see {prog} {name} --help')
             for name, (_, text) in SUBCOMMANDS.items()]
    width = max(len(usage) for usage, _ in rows) + 2
    indent = ' ' * (2 + width)
    lines = ['commands:']
    for usage, text in rows:
        wrapped = textwrap.wrap(text, 100 - len(indent))
        lines.append(f'  {usage:<{width}}{wrapped[0]}')
        lines += [indent + line for line in wrapped[1:]]
    return '\n'.join(lines)


def build_parser():
    p = ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter)
    p.description = '\n'.join(textwrap.wrap(
        'Train GRU4Rec (or a baseline) on a session log, or load a trained model; optionally save it and evaluate '
        'it on test sets (Recall@k and MRR@k against all items).', 100)) + '\n\n' + _commands_text(p.prog)
    p.epilog = '\n'.join(textwrap.wrap(
        'Give -ps or -pf (or both: -ps then overrides the file) to train, or -l to load. Data files: TAB separated '
        'with a header (also .gz, .bz2, .xz, .zip), Parquet (.parquet, needs pyarrow), pickled DataFrames (.pickle, '
        '.pkl) with --allow-pickle. Exit status: 0 on success, 2 on bad input, 1 when training diverges.', 100))
    p.add_argument('path', metavar='PATH', help='training data, or with -l a model file written by -s / savemodel')
    source = p.add_argument_group('model')
    source.add_argument('-ps', '--parameter-string', '--parameter_string', metavar='PARAMS',
                        help='hyper-parameters as name=value pairs separated by commas, lists separated by /, '
                        'booleans as True/False: e.g. loss=bpr-max,final_act=elu-0.5,layers=100,n_epochs=5. '
                        'Unset ones keep their defaults.')
    source.add_argument('-pf', '--parameter-file', '--parameter_file', metavar='FILE',
                        help='Python file assigning a dict or OrderedDict named gru4rec_params, e.g. '
                        'paramfiles/rsc15_xe_shared_100_best.py. The file is parsed, never executed.')
    source.add_argument('-l', '--load-model', '--load_model', action='store_true',
                        help='PATH is a trained model: load it instead of training')
    source.add_argument('-b', '--baseline', choices=sorted(BASELINES),
                        help='train this baseline instead of GRU4Rec (pop, session popularity, item-kNN, '
                        "first-order Markov chain, random scores, the original's session-level BPR-MF); "
                        '-ps / -pf then set its parameters')
    source.add_argument('--backend', choices=sorted(BACKENDS),
                        help="PyTensor compile mode: 'c' (default) or 'jax' (sets the backend "
                        'hyper-parameter; also for a loaded model)')
    source.add_argument('-s', '--save-model', '--save_model', metavar='FILE', help='save the trained model to FILE')
    source.add_argument('-ss', '--sample-store', '--sample_store_size', metavar='N', type=int, default=10000000,
                        help='number of negative sample ids drawn ahead of training in one go (default: 10000000)')
    source.add_argument('--sample_store_on_cpu', action='store_true',
                        help="accepted for the original's command lines; no effect here (the samples are drawn "
                        'on the CPU)')
    source.add_argument('-g', '--gru4rec_model', metavar='GRFILE',
                        help="accepted for the original's command lines; no effect here (there is one GRU4Rec "
                        'class)')
    evaluation = p.add_argument_group('evaluation')
    evaluation.add_argument('-t', '--test', metavar='TEST', nargs='+', default=[],
                            help='test data file(s), each evaluated on its own')
    evaluation.add_argument('-m', '--measure', metavar='K', type=int, nargs='+', default=[20],
                            help='cut-offs of Recall@K and MRR@K (default: 20)')
    evaluation.add_argument('-e', '--eval-type', '--eval_type', choices=TIE_MODES, default='standard',
                            help='how a target tied with other items is ranked: standard (ahead of its ties), '
                            'conservative (behind them), median (in the middle), tiebreaking (randomly); '
                            'default: standard')
    evaluation.add_argument('-pm', '--primary-metric', '--primary_metric', choices=('recall', 'mrr'), default='recall',
                            help='the metric -lpm reports (default: recall)')
    evaluation.add_argument('-lpm', '--log-primary-metric', '--log_primary_metric', action='store_true',
                            help='print only "PRIMARY METRIC: value" per test set, the primary metric at the first '
                            'cut-off (for hyper-parameter search), instead of the Recall/MRR lines; while training, '
                            'also "EPOCH METRIC: epoch value" on the first test set after every epoch')
    data = p.add_argument_group('data')
    data.add_argument('-sk', '--session-key', '--session_key', metavar='NAME', default='SessionId',
                      help='session id column of all data files (default: SessionId)')
    data.add_argument('-ik', '--item-key', '--item_key', metavar='NAME', default='ItemId',
                      help='item id column (default: ItemId)')
    data.add_argument('-tk', '--time-key', '--time_key', metavar='NAME', default='Time',
                      help='timestamp column (default: Time)')
    data.add_argument('--allow-pickle', action='store_true',
                      help='read .pickle / .pkl data files (pickled DataFrames). Loading a pickle can run '
                      'arbitrary code: only for files you trust')
    return p


def _check_args(parser, args):
    if args.load_model and (args.parameter_string or args.parameter_file or args.baseline):
        parser.error('-l loads a trained model: it takes no -ps, -pf or -b')
    if not args.load_model and not (args.parameter_string or args.parameter_file or args.baseline):
        parser.error('give -ps and/or -pf to train a model, or -l to load one')
    if args.baseline and args.save_model:
        parser.error('-s saves GRU4Rec models only, not baselines')
    if min(args.measure) < 1:
        parser.error(f'-m cut-offs must be positive, got {args.measure}')
    if args.sample_store < 0:
        parser.error(f'-ss must not be negative, got {args.sample_store}')


def _model_params(args):
    params = read_paramfile(args.parameter_file) if args.parameter_file else OrderedDict()
    if args.parameter_string:
        params.update(parse_param_string(args.parameter_string))
    if args.backend:
        params['backend'] = args.backend
    return params


def make_model(args):
    """The untrained GRU4Rec or baseline that the parsed command line describes."""
    params = _model_params(args)
    try:
        if args.baseline:
            return make_baseline(args.baseline, **params)
        # The column names come from -sk / -ik / -tk, which name the columns of every data file. The
        # model holds the parsed values (e.g. layers=[16, 8] for '16/8'), as a program would give them.
        return GRU4Rec(**parse_hyperparameters(**dict(params, session_key=args.session_key, item_key=args.item_key,
                                                      time_key=args.time_key)))
    except ValueError as e:
        raise InputError(e) from None


def _train(args, keys, valid=None):
    """The trained model; with `valid` (and -lpm) it prints `EPOCH METRIC: n value` after every epoch,
    the primary metric on `valid`, which a pruned search (paropt.py) reads as the epoch ends."""
    model = make_model(args)
    train = read_log(args.path, keys, args.allow_pickle, what='training data')
    print(f'Training data {args.path}: {len(train)} events, {train[keys[0]].nunique()} sessions, '
          f'{train[keys[1]].nunique()} items', flush=True)
    t0 = time.time()
    try:
        if args.baseline:
            model.fit(train, *keys)
        else:
            metric = f'{args.primary_metric}@{args.measure[0]}'
            model.fit(train, sample_store=args.sample_store, valid_data=valid, valid_cutoff=args.measure[0],
                      valid_metric=args.primary_metric, callback=None if valid is None else (
                          lambda epoch: print(f'EPOCH METRIC: {epoch["epoch"]} {epoch[metric]:.6f}', flush=True)))
    except ValueError as e:
        raise InputError(f'cannot train on {args.path}: {e}') from None
    seconds = time.time() - t0
    epochs = getattr(model, 'history_', [])
    per_epoch = f', {sum(e["seconds"] for e in epochs) / len(epochs):.2f}s per epoch' if epochs else ''
    print(f'Trained in {seconds:.2f}s{per_epoch}', flush=True)
    return model


def _load(args):
    try:
        model = GRU4Rec.loadmodel(args.path)
        if args.backend:
            model.set_params(backend=args.backend)
    except ValueError as e:
        raise InputError(e) from None
    print(f'Loaded model {args.path}: {model.n_items} items', flush=True)
    return model


def run(args):
    """Does what the parsed command line asks; raises InputError on bad input."""
    keys = (args.session_key, args.item_key, args.time_key)
    if args.sample_store_on_cpu or args.gru4rec_model:
        print('note: --sample_store_on_cpu and -g/--gru4rec_model are accepted for the original\'s command lines '
              'and have no effect here', file=sys.stderr, flush=True)
    if args.save_model and not Path(args.save_model).resolve().parent.is_dir():  # now, not after the training
        raise InputError(f'cannot save the model to {args.save_model}: no such directory '
                         f'{Path(args.save_model).resolve().parent}')
    tests = [read_log(path, keys, args.allow_pickle, what='test data') for path in args.test]
    valid = tests[0] if args.log_primary_metric and tests and not args.baseline else None
    model = _load(args) if args.load_model else _train(args, keys, valid)
    if args.save_model:
        try:
            model.savemodel(args.save_model)
        except OSError as e:  # the model file's writer names the file in its message
            raise InputError(e.strerror or f'cannot save the model to {args.save_model}: {e}') from None
        print(f'Saved the model to {args.save_model}', flush=True)
    for path, test in zip(args.test, tests):
        t0 = time.time()
        try:
            recall, mrr = evaluate_gpu(model, test, session_key=keys[0], item_key=keys[1], time_key=keys[2],
                                       cut_off=args.measure, batch_size=EVAL_BATCH_SIZE, mode=args.eval_type)
        except ValueError as e:
            raise InputError(f'cannot evaluate on {path}: {e}') from None
        if args.log_primary_metric:
            primary = (recall if args.primary_metric == 'recall' else mrr)[args.measure[0]]
            print(f'PRIMARY METRIC: {primary:.6f}', flush=True)
            continue
        print(f'Evaluation on {path} ({args.eval_type} ties) took {time.time() - t0:.2f}s', flush=True)
        for k in recall:
            print(f'Recall@{k}: {recall[k]:.6f} MRR@{k}: {mrr[k]:.6f}', flush=True)


def main(argv=None):
    """Entry point of `run.py` and of the `gru4rec` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:  # e.g. `gru4rec serve MODEL ...`: another module's command line
        name = argv[0]
        try:
            module = importlib.import_module(SUBCOMMANDS[name][0])
        except ImportError as e:
            print(f'gru4rec {name}: error: {e}; install the {name} extra: pip install gru4rec[{name}]', file=sys.stderr)
            return 2
        return module.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        return exit_status(parser.prog, lambda: run(args))
    except FloatingPointError as e:  # the model diverged
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
