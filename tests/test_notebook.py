"""examples/quickstart.ipynb runs from top to bottom (issue "Retrain, and the notebook workflow"): it is
executed with nbclient in a kernel on this interpreter, and any failing cell fails the test."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'examples' / 'quickstart.ipynb'
DATA_DIR = ROOT.parent / 'shared' / 'data'
KERNEL = 'gru4rec-test-python'


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip('nbformat', reason="nbformat is not installed (pip install -e '.[test]')")
    nbclient = pytest.importorskip('nbclient', reason="nbclient is not installed (pip install -e '.[test]')")
    pytest.importorskip('ipykernel', reason="ipykernel is not installed (pip install -e '.[test]')")
    pytest.importorskip('matplotlib', reason="matplotlib is not installed (pip install -e '.[test]')")
    if not (DATA_DIR / 'rsc15_100k_train_tr.tsv.gz').exists():
        pytest.skip(f'real data not found: {DATA_DIR} (../shared/data from the repository root) is absent')
    # A kernel spec for the interpreter running the tests, whatever kernels are installed elsewhere.
    spec = tmp_path / 'kernels' / KERNEL
    spec.mkdir(parents=True)
    (spec / 'kernel.json').write_text(json.dumps({
        'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
        'display_name': 'gru4rec tests', 'language': 'python'}))
    monkeypatch.setenv('JUPYTER_PATH', str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name=KERNEL, timeout=900,
                                     resources={'metadata': {'path': str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
    outputs = [out for cell in notebook.cells if cell.cell_type == 'code' for out in cell.get('outputs', [])]
    assert not [out for out in outputs if out.output_type == 'error']
    assert any('image/png' in out.get('data', {}) for out in outputs), 'the training curves were not drawn'
    assert 'True' in ''.join(out.get('text', '') for out in outputs if out.output_type == 'stream')
