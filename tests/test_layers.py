"""The project's modules import one way: each module imports only modules below it in LAYERS, so there
is no import circle and no lower module reaches back up (checked on the source with ast, imports inside
functions included)."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lowest first: a module may import only the modules listed before it.
LAYERS = ['atomicfile', 'modelfile', 'sessions', 'cbackend', 'backends', 'evaluation', 'losses', 'training', 'network',
          'hyperparams', 'recommend', 'gru4rec', 'baselines',
          'synthetic', 'sessionstore', 'itemindex', 'live', 'serve', 'run', 'paropt']


def project_imports(module):
    path = ROOT / f'{module}.py'
    if not path.exists():
        return set()
    tree = ast.parse(path.read_text(encoding='utf-8'))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names & set(LAYERS)


def test_every_module_is_in_the_layers():
    modules = {p.stem for p in ROOT.glob('*.py') if p.stem != 'setup'}
    assert modules <= set(LAYERS), f'add new modules to LAYERS at their place: {sorted(modules - set(LAYERS))}'


def test_setup_installs_every_module():
    setup = ast.parse((ROOT / 'setup.py').read_text(encoding='utf-8'))
    keywords = {k.arg: k.value for node in ast.walk(setup) if isinstance(node, ast.Call) for k in node.keywords}
    installed = set(ast.literal_eval(keywords['py_modules']))
    modules = {p.stem for p in ROOT.glob('*.py') if p.stem != 'setup'}
    assert installed == modules, f'setup.py py_modules misses {sorted(modules - installed)}, or lists extra ones'


@pytest.mark.parametrize('module', LAYERS)
def test_imports_point_down(module):
    below = set(LAYERS[:LAYERS.index(module)])
    upward = project_imports(module) - below
    assert not upward, f'{module} imports {sorted(upward)}, which are not below it in {LAYERS}'


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    (tmp_path / 'sessions.py').write_text('def f():\n    from gru4rec import GRU4Rec\n')
    monkeypatch.setattr(sys.modules[__name__], 'ROOT', tmp_path)
    assert project_imports('sessions') == {'gru4rec'}
