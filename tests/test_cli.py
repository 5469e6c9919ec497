"""run.py: parameters from strings and files, data readers, training / loading / saving, evaluation
output, baselines, and one-line errors with exit status 2."""
import contextlib
import importlib.metadata
import io
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

import run
from baselines import BPR, MarkovChain, RandomPred
from evaluation import evaluate_gpu
from gru4rec import GRU4Rec
from sessionlogs import synthetic_log

REPO = Path(__file__).resolve().parents[1]
TINY = 'layers=8,n_epochs=2,batch_size=8,n_sample=8,loss=bpr-max,final_act=elu-0.5,seed=3'
CUTOFFS = ['1', '5', '10']
RESULT = re.compile(r'^Recall@(\d+): (\d\.\d{6}) MRR@\d+: (\d\.\d{6})$', re.M)


def cli(*args):
    """Runs run.main in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = run.main([str(a) for a in args])
        except SystemExit as e:  # argparse exits by itself on bad options
            status = e.code
    return status, out.getvalue(), err.getvalue()


def results(stdout):
    return [line for line in stdout.splitlines() if RESULT.match(line)]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp('cli')
    train, test = synthetic_log(120, seed=1), synthetic_log(30, seed=2, first_session=1001, first_time=1e5)
    train.to_csv(folder / 'train.tsv', sep='\t', index=False)
    test.to_csv(folder / 'test.tsv', sep='\t', index=False)
    test.to_csv(folder / 'test.tsv.gz', sep='\t', index=False)
    test.to_parquet(folder / 'test.parquet')
    test.to_pickle(folder / 'test.pickle')
    test.rename(columns={'SessionId': 'sid', 'ItemId': 'iid', 'Time': 'ts'}).to_csv(folder / 'renamed.tsv', sep='\t',
                                                                                    index=False)
    test.head(0).to_csv(folder / 'empty.tsv', sep='\t', index=False)
    (folder / 'broken.tsv.gz').write_text('not gzip')
    return folder


@pytest.fixture(scope='module')
def trained(files):
    """The tiny model trained and saved by run.py, with what run.py printed."""
    status, out, err = cli(files / 'train.tsv', '-ps', TINY, '-t', files / 'test.tsv', '-m', *CUTOFFS,
                           '-s', files / 'model.gru4rec')
    assert status == 0, err
    return files / 'model.gru4rec', out


def test_a_model_that_cannot_be_saved_is_refused_before_training_or_named_once(files):
    target = files / 'missing' / 'model.gru4rec'
    status, out, err = cli(files / 'train.tsv', '-ps', TINY, '-s', target)
    assert status == 2 and 'Epoch1' not in out
    assert err.strip().endswith(f'error: cannot save the model to {target}: no such directory {target.parent}')
    folder = files / 'model-as-folder.gru4rec'
    folder.mkdir()
    status, out, err = cli(files / 'train.tsv', '-ps', TINY, '-s', folder)  # found out only when writing
    assert status == 2 and 'Epoch2' in out
    assert err.strip().endswith(f'error: cannot save the model to {str(folder)!r}: Is a directory')


def test_training_output_is_one_line_per_cutoff(trained):
    _, out = trained
    assert [RESULT.match(line).group(1) for line in results(out)] == CUTOFFS
    assert 'Epoch2 -->' in out


def test_run_py_and_the_python_api_give_the_same_numbers(files, trained):
    import pandas as pd
    model = GRU4Rec().set_params(**run.parse_param_string(TINY))
    model.fit(pd.read_csv(files / 'train.tsv', sep='\t'))
    recall, mrr = evaluate_gpu(model, pd.read_csv(files / 'test.tsv', sep='\t'), cut_off=[int(k) for k in CUTOFFS],
                               batch_size=run.EVAL_BATCH_SIZE)
    assert results(trained[1]) == [f'Recall@{k}: {recall[k]:.6f} MRR@{k}: {mrr[k]:.6f}' for k in recall]


def test_a_loaded_model_scores_as_the_trained_one(trained, files):
    path, out = trained
    status, loaded, _ = cli(path, '-l', '-t', files / 'test.tsv', '-m', *CUTOFFS)
    assert status == 0 and results(loaded) == results(out)


@pytest.mark.parametrize('test_file, extra', [('test.tsv.gz', []), ('test.parquet', []),
                                              ('test.pickle', ['--allow-pickle']),
                                              ('renamed.tsv', ['-sk', 'sid', '-ik', 'iid', '-tk', 'ts'])])
def test_data_formats_and_column_names(trained, files, test_file, extra):
    path, out = trained
    status, loaded, err = cli(path, '-l', '-t', files / test_file, '-m', *CUTOFFS, *extra)
    assert status == 0, err
    assert results(loaded) == results(out)


def test_several_test_sets_tie_modes_and_the_primary_metric(trained, files):
    path, out = trained
    status, loaded, _ = cli(path, '-l', '-t', files / 'test.tsv', files / 'test.tsv.gz', '-m', '5', '1',
                            '-e', 'conservative')
    assert status == 0 and len(results(loaded)) == 4 and loaded.count('(conservative ties)') == 2
    recall_5 = dict(RESULT.match(line).groups()[:2] for line in results(out))['5']
    mrr_5 = RESULT.match(results(out)[1]).group(3)
    for metric, expected in (('recall', recall_5), ('mrr', mrr_5)):
        status, logged, _ = cli(path, '-l', '-t', files / 'test.tsv', '-m', '5', '1', '-pm', metric, '-lpm')
        assert status == 0 and logged.splitlines()[-1] == f'PRIMARY METRIC: {expected}'
        assert not results(logged)


def test_baselines_run_through_the_same_evaluation(files):
    import pandas as pd
    status, out, _ = cli(files / 'train.tsv', '-b', 'markov', '-ps', 'n_successors=50', '-t', files / 'test.tsv',
                         '-m', '5')
    recall, mrr = evaluate_gpu(MarkovChain(n_successors=50).fit(pd.read_csv(files / 'train.tsv', sep='\t')),
                               pd.read_csv(files / 'test.tsv', sep='\t'), cut_off=[5])
    assert status == 0 and results(out) == [f'Recall@5: {recall[5]:.6f} MRR@5: {mrr[5]:.6f}']


@pytest.mark.parametrize('name, params, model', [
    ('bpr', 'n_factors=8,n_iterations=2,init_normal=True', lambda: BPR(n_factors=8, n_iterations=2, init_normal=True)),
    ('random', 'seed=3', lambda: RandomPred(seed=3))])
def test_the_originals_bpr_and_random_baselines_run_from_the_command_line(files, name, params, model):
    import pandas as pd
    status, out, _ = cli(files / 'train.tsv', '-b', name, '-ps', params, '-t', files / 'test.tsv', '-m', '5')
    recall, mrr = evaluate_gpu(model().fit(pd.read_csv(files / 'train.tsv', sep='\t')),
                               pd.read_csv(files / 'test.tsv', sep='\t'), cut_off=[5])
    assert status == 0 and results(out) == [f'Recall@5: {recall[5]:.6f} MRR@5: {mrr[5]:.6f}']


def test_the_parameter_string_overrides_the_parameter_file(tmp_path):
    paramfile = tmp_path / 'p.py'
    paramfile.write_text("gru4rec_params = {'loss': 'top1', 'layers': [32], 'n_epochs': 3}\n")
    args = run.build_parser().parse_args(['train.tsv', '-pf', str(paramfile), '-ps', 'layers=16/8,item_key=x',
                                          '--backend', 'jax', '-ik', 'item'])
    model = run.make_model(args)
    assert (model.loss, model.layers, model.n_epochs, model.backend) == ('top1', [16, 8], 3, 'jax')
    assert model.item_key == 'item'  # -ik names the column of the data files


# -- parameters ---------------------------------------------------------------------------------------

def test_parameter_strings_round_trip():
    params = run.parse_param_string('loss=bpr-max, layers=200/100,constrained_embedding=True,adapt=None')
    assert params == OrderedDict([('loss', 'bpr-max'), ('layers', '200/100'), ('constrained_embedding', 'True'),
                                  ('adapt', 'None')])
    typed = OrderedDict([('layers', [200, 100]), ('learning_rate', 0.05), ('constrained_embedding', True)])
    assert run.parse_param_string(run.format_param_string(typed)) == OrderedDict(
        [('layers', '200/100'), ('learning_rate', '0.05'), ('constrained_embedding', 'True')])
    with pytest.raises(ValueError, match='cannot go into a parameter string'):
        run.format_param_string({'final_act': 'a,b'})


@pytest.mark.parametrize('text, expected', [
    ("from collections import OrderedDict\ngru4rec_params = OrderedDict([('loss', 'top1'), ('layers', [10])])\n",
     [('loss', 'top1'), ('layers', [10])]),
    ("import collections\ngru4rec_params = collections.OrderedDict(loss='top1', n_epochs=2)\n",
     [('loss', 'top1'), ('n_epochs', 2)]),
    ("gru4rec_params = {'b': 1, 'a': (1, 2)}\n", [('b', 1), ('a', (1, 2))]),
    ("gru4rec_params = dict([('a', None)], b=False)\n", [('a', None), ('b', False)]),
])
def test_parameter_files_are_read_in_order(tmp_path, text, expected):
    path = tmp_path / 'params.py'
    path.write_text(text)
    assert list(run.read_paramfile(path).items()) == expected


def test_parameter_files_are_never_executed(tmp_path):
    marker = tmp_path / 'executed'
    path = tmp_path / 'params.py'
    path.write_text(f"open({str(marker)!r}, 'w').close()\ngru4rec_params = {{'loss': 'top1'}}\n")
    assert run.read_paramfile(path) == {'loss': 'top1'}
    assert not marker.exists()
    path.write_text(f"gru4rec_params = dict(loss=open({str(marker)!r}, 'w').name)\n")
    with pytest.raises(run.InputError, match='line 1: gru4rec_params must be a dict literal'):
        run.read_paramfile(path)
    assert not marker.exists()


# The tuned settings of SPEC section 10 (all: constrained embedding, embedding 0, 10 epochs, 2048
# samples, adagrad): loss, final_act, layers, batch, dropout embed/hidden, lr, momentum, sample_alpha,
# bpreg, logq.
TUNED = {
    'rsc15_xe_shared_100_best': ('cross-entropy', 'softmax', [100], 32, 0, .4, .2, .2, .5, 0, 1),
    'yoochoose_xe_shared_best': ('cross-entropy', 'softmax', [480], 48, 0, .2, .07, 0, .2, 0, 1),
    'rees46_xe_shared_best': ('cross-entropy', 'softmax', [512], 240, .45, 0, .065, 0, .5, 0, 1),
    'retailrocket_bprmax_shared_best': ('bpr-max', 'elu-0.5', [224], 80, .5, .05, .05, .4, .4, 1.95, 0),
    'diginetica_bprmax_shared_best': ('bpr-max', 'elu-1', [512], 128, .5, .3, .05, .15, .3, .9, 0),
    'coveo_bprmax_shared_best': ('bpr-max', 'elu-1', [512], 144, .35, 0, .05, .4, .2, 1.85, 0),
}
TUNED_NAMES = ('loss', 'final_act', 'layers', 'batch_size', 'dropout_p_embed', 'dropout_p_hidden',
               'learning_rate', 'momentum', 'sample_alpha', 'bpreg', 'logq')
TOPK = {  # RSC15 settings of the Top-k paper: layers [100], batch 32, 2048 samples, sample_alpha 0
    'rsc15_topk_bprmax': dict(loss='bpr-max', final_act='elu-0.5', learning_rate=.2, momentum=.3, bpreg=1,
                              constrained_embedding=False),
    'rsc15_topk_bprmax_shared': dict(loss='bpr-max', final_act='elu-0.5', learning_rate=.2, momentum=.1, bpreg=.5,
                                     constrained_embedding=True),
    'rsc15_topk_xe': dict(loss='cross-entropy', final_act='softmax', dropout_p_hidden=.3, learning_rate=.1,
                          momentum=.7, constrained_embedding=False),
}


@pytest.mark.parametrize('name', sorted(TUNED) + sorted(TOPK))
def test_shipped_parameter_files_hold_the_published_settings(name):
    params = run.read_paramfile(REPO / 'paramfiles' / f'{name}.py')
    model = GRU4Rec().set_params(**params)
    if name in TUNED:
        expected = dict(zip(TUNED_NAMES, TUNED[name]), constrained_embedding=True)
    else:
        expected = dict(TOPK[name], layers=[100], batch_size=32, sample_alpha=0)
    expected.update(embedding=0, n_epochs=10, n_sample=2048, adapt='adagrad')
    assert {k: getattr(model, k) for k in expected} == expected


# -- errors -------------------------------------------------------------------------------------------

def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize('make_args, message', [
    (lambda d: ['missing.tsv', '-ps', 'n_epochs=1'], 'cannot read training data file missing.tsv'),
    (lambda d: [d / 'train.tsv', '-ps', 'n_epochs=1', '-t', 'missing.tsv'], 'cannot read test data file'),
    (lambda d: [d / 'broken.tsv.gz', '-ps', 'n_epochs=1'], 'cannot read training data file'),
    (lambda d: [d / 'empty.tsv', '-ps', 'n_epochs=1'], 'is empty'),
    (lambda d: [d / 'train.tsv', '-ps', 'layers'], "'layers' is not name=value"),
    (lambda d: [d / 'train.tsv', '-ps', 'n_layers=2'], r"unknown hyper-parameter\(s\) \['n_layers'\]"),
    (lambda d: [d / 'train.tsv', '-ps', 'layers=abc'], 'layers'),
    (lambda d: [d / 'train.tsv', '-ps', 'loss=xe'], 'unknown loss'),
    (lambda d: [d / 'train.tsv', '-pf', d / 'missing.py'], 'cannot read parameter file'),
    (lambda d: [d / 'train.tsv', '-pf', write(d / 'syntax.py', 'gru4rec_params = {')], 'is not valid Python'),
    (lambda d: [d / 'train.tsv', '-pf', write(d / 'none.py', 'params = {}')], 'assigns no gru4rec_params'),
    (lambda d: [d / 'train.tsv', '-ps', 'n_epochs=1', '-ik', 'Item'], r"has no column\(s\) \['Item'\]"),
    (lambda d: [d / 'train.tsv', '-ps', 'n_epochs=1', '-t', d / 'test.pickle'], 'needs --allow-pickle'),
    (lambda d: [d / 'train.tsv', '-l'], 'is not a GRU4Rec model file'),
    (lambda d: [d / 'train.tsv', '-b', 'itemknn', '-ps', 'k=5'], r"unknown parameter\(s\) \['k'\]"),
    (lambda d: [d / 'train.tsv', '-l', '-ps', 'n_epochs=1'], '-l loads a trained model'),
    (lambda d: [d / 'train.tsv'], 'give -ps and/or -pf'),
    (lambda d: [d / 'train.tsv', '-b', 'pop', '-s', d / 'pop.model'], '-s saves GRU4Rec models only'),
    (lambda d: [d / 'train.tsv', '-b', 'pop', '-m', '0'], '-m cut-offs must be positive'),
    (lambda d: [d / 'train.tsv', '-b', 'pop', '--verbose'], 'unrecognized arguments'),
])
def test_bad_input_exits_with_status_2_and_one_line(files, make_args, message):
    status, out, err = cli(*make_args(files))
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and 'error: ' in err and re.search(message, err), err
    assert 'Traceback' not in err


@pytest.mark.parametrize('args, message', [
    (['missing.tsv', '-ps', 'n_epochs=1'], 'run.py: error: cannot read training data file missing.tsv'),
    (['train.tsv', '-ps', 'layers=1,layers=2'], 'run.py: error: bad parameter string'),
    (['train.tsv', '--no-such-flag'], 'run.py: error: unrecognized arguments: --no-such-flag'),
])
def test_run_py_exit_status_and_message_in_a_real_process(files, args, message):
    proc = subprocess.run([sys.executable, str(REPO / 'run.py'), *args], cwd=files, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
    assert 'Traceback' not in proc.stderr and proc.stdout == ''


def undocumented(parser):
    """The entries of the parser's --help with no text after them: an entry's line starts with two spaces;
    its help follows on the same line (after two spaces or more) or on the next, indented further."""
    lines = parser.format_help().splitlines() + ['']
    return [line.strip() for line, after in zip(lines, lines[1:])
            if re.match(r'  \S', line) and not re.search(r'\S\s{2,}\S', line.strip())
            and not re.match(r'\s{6,}\S', after)]


def test_the_help_check_sees_a_flag_without_help():
    parser = run.build_parser()
    parser.add_argument('--silent-flag')
    parser.add_argument_group('more').add_argument('--other', help='explained')
    assert undocumented(parser) == ['--silent-flag SILENT_FLAG']


def test_help_explains_every_flag():
    parser = run.build_parser()
    assert not undocumented(parser)
    text = parser.format_help()
    for flag in ('-ps', '-pf', '-l', '-s', '-t', '-m', '-e', '-ss', '-ik', '-sk', '-tk', '-pm', '-lpm', '-b',
                 '--backend', '--allow-pickle'):
        assert re.search(rf'(^|\s){re.escape(flag)}[\s,]', text), flag


def test_console_entry_point():
    scripts = [e for e in importlib.metadata.entry_points(group='console_scripts') if e.name == 'gru4rec']
    if not scripts:
        pytest.skip('the gru4rec package is not installed (pip install -e .)')
    assert scripts[0].value == 'run:main'
    executable = shutil.which('gru4rec', path=Path(sys.executable).parent)
    if executable is None:
        pytest.skip(f'the gru4rec script is not installed next to {sys.executable}')
    proc = subprocess.run([executable, '--help'], capture_output=True, text=True)
    assert proc.returncode == 0 and '--parameter-file' in proc.stdout


def test_help_lists_every_subcommand_with_what_it_does():
    status, out, _ = cli('--help')
    assert status == 0
    commands = out.split('commands:\n', 1)[1].split('\n\n', 1)[0]
    assert re.search(r'^  \S+ PATH \[options\]\s+train a model', commands, re.MULTILINE)
    for name, (_, text) in run.SUBCOMMANDS.items():
        row = re.search(rf'^  \S+ {name} MODEL \[options\]\s+(.*(\n {{6,}}.*)*)', commands, re.MULTILINE)
        assert row, f'{name} is missing from --help:\n{commands}'
        assert ' '.join(row.group(1).split()).startswith(text), row.group(1)


@pytest.mark.parametrize('name', sorted(run.SUBCOMMANDS))
def test_each_subcommand_help_says_what_it_does(name):
    module = run.SUBCOMMANDS[name][0]
    pytest.importorskip(module, reason=f"the {name} extra is not installed (pip install -e '.[test]')")
    proc = subprocess.run([sys.executable, str(REPO / 'run.py'), name, '--help'], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    usage, description = proc.stdout.split('\n\n')[:2]
    assert usage.startswith(f'usage: gru4rec {name} ')
    assert len(description.split()) >= 5, f'gru4rec {name} --help does not say what it does: {description!r}'
