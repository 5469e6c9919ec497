"""GRU4Rec's C kernels (cbackend.py) are an optional accelerator: with them off (GRU4REC_C_KERNELS=0), or
with a PyTensor that lacks an internal they rely on, the C backend trains the plain PyTensor graphs, to
the same losses, weights and Recall/MRR up to float32 rounding; `import gru4rec` and JAX never import
cbackend."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import backends
from conftest import SMALL, SMALL_STORE, make_log, make_train_log
from evaluation import evaluate_gpu
from gru4rec import GRU4Rec

ROOT = Path(__file__).resolve().parent.parent

# Each exercises other kernels: BPR-max with momentum (RowBPRMax, RowAdagrad with velocity), the
# cross-entropy with a softmax and dropout over an embedding (RowSoftmax, RowGather, RowScatter).
SETTINGS = {
    'bpr-max': dict(momentum=0.3),
    'cross-entropy': dict(loss='cross-entropy', final_act='softmax', embedding=5, dropout_p_embed=0.2,
                          dropout_p_hidden=0.1, smoothing=0.1, logq=0.5, layers=[8, 6]),
}


def run_python(code, **env):
    """Runs `code` in a fresh interpreter at the repository root; returns its stdout (fails on an error)."""
    done = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def linker_name(model):
    return type(model.training_step_.function.maker.linker).__name__


def test_import_gru4rec_does_not_import_cbackend():
    out = run_python("""
        import sys
        import gru4rec, evaluation, baselines, run
        print('cbackend' in sys.modules)
    """)
    assert out.split() == ['False']


@pytest.mark.jax
def test_a_jax_fit_does_not_import_cbackend():
    pytest.importorskip('jax', reason='the JAX backend needs jax: pip install gru4rec[jax]')
    out = run_python("""
        import sys
        sys.path.insert(0, 'tests')
        from conftest import SMALL, fit_small, make_log
        from evaluation import evaluate_gpu
        model = fit_small(backend='jax', n_epochs=1)
        evaluate_gpu(model, make_log([3, 4, 2], seed=5), cut_off=[5])
        model.recommend({1: list(model.itemidmap[:3])}, k=3)
        print(model.history_[-1]['loss'] > 0, 'cbackend' in sys.modules)
    """)
    assert out.split() == ['True', 'False']


def test_the_variable_takes_0_or_1(monkeypatch):
    monkeypatch.setenv(backends.C_KERNELS_VARIABLE, 'off')
    with pytest.raises(ValueError, match="GRU4REC_C_KERNELS='off': set it to 1 .* or 0"):
        backends.c_kernels_wanted()


def trained(monkeypatch, kernels, **settings):
    monkeypatch.setenv(backends.C_KERNELS_VARIABLE, kernels)
    model = GRU4Rec(**dict(SMALL, **settings))
    return model.fit(make_train_log(), sample_store=SMALL_STORE)


@pytest.mark.parametrize('name', sorted(SETTINGS))
def test_kernels_on_and_off_train_and_evaluate_alike(name, monkeypatch):
    monkeypatch.setenv(backends.C_KERNELS_VARIABLE, '1')
    if backends.c_kernels() is None:
        pytest.skip('the C kernels are unavailable here: there is nothing to compare the plain graphs with')
    on, off = trained(monkeypatch, '1', **SETTINGS[name]), trained(monkeypatch, '0', **SETTINGS[name])
    assert linker_name(on) == 'KeptBuffersVMLinker' and linker_name(off) == 'VMLinker'
    np.testing.assert_allclose([r['loss'] for r in off.history_], [r['loss'] for r in on.history_], rtol=1e-5)
    assert list(off.weights) == list(on.weights)
    for weight in on.weights:
        np.testing.assert_allclose(off.weights[weight], on.weights[weight], rtol=1e-4, atol=1e-6, err_msg=weight)
    for kind in on.opt_values:
        np.testing.assert_allclose(off.opt_values[kind], on.opt_values[kind], rtol=1e-4, atol=1e-6, err_msg=kind)
    test = make_log([2, 5, 3, 6, 2, 4, 3, 2, 5, 4, 3, 6], seed=2, first_session=501)
    for mode in ('standard', 'conservative', 'median'):
        monkeypatch.setenv(backends.C_KERNELS_VARIABLE, '1')
        recall_on, mrr_on = evaluate_gpu(on, test, cut_off=[1, 5, 10], batch_size=4, mode=mode)
        monkeypatch.setenv(backends.C_KERNELS_VARIABLE, '0')
        recall_off, mrr_off = evaluate_gpu(off, test, cut_off=[1, 5, 10], batch_size=4, mode=mode)
        for k in recall_on:
            assert recall_off[k] == pytest.approx(recall_on[k], abs=1e-6)
            assert mrr_off[k] == pytest.approx(mrr_on[k], abs=1e-6)


# A PyTensor that differs in one probed internal, simulated before gru4rec is imported; each keeps
# PyTensor's own compilation working.
CHANGED_PYTENSOR = {
    'compile_str': ("""
        from pytensor.link.c.cmodule import GCC_compiler
        original = GCC_compiler.compile_str
        GCC_compiler.compile_str = staticmethod(lambda module_name, src_code, **options: original(
            module_name, src_code, **options))
     """, 'GCC_compiler.compile_str('),
    'rewrite': ("""
        from pytensor.compile.mode import optdb
        def drop(db, name):
            table = getattr(db, '__db__', {})
            table.pop(name, None)
            for rewriters in table.values():
                for rewriter in rewriters:
                    if hasattr(rewriter, '__db__') and rewriter is not db:
                        drop(rewriter, name)
        drop(optdb, 'local_dot22_to_dot22scalar')
     """, "the rewrite 'local_dot22_to_dot22scalar'"),
    'import': ("""
        import pytensor.graph.features as features
        del features.ReplaceValidate
     """, 'importing cbackend failed: ImportError'),
}


@pytest.mark.parametrize('change', sorted(CHANGED_PYTENSOR))
def test_a_pytensor_without_a_probed_internal_trains_on_the_plain_graphs(change):
    simulate, named = CHANGED_PYTENSOR[change]
    out = run_python(textwrap.dedent(simulate) + textwrap.dedent("""
        import json, sys, warnings
        sys.path.insert(0, 'tests')
        from conftest import fit_small, make_log
        from evaluation import evaluate_gpu
        from backends import CKernelsUnavailable
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            model = fit_small(n_epochs=1)
            recall, mrr = evaluate_gpu(model, make_log([3, 4, 2], seed=5), cut_off=[5])
        messages = [str(w.message) for w in caught if issubclass(w.category, CKernelsUnavailable)]
        print(json.dumps(dict(messages=messages, loss=model.history_[-1]['loss'], recall=recall[5],
                              linker=type(model.training_step_.function.maker.linker).__name__)))
    """))
    result = json.loads(out.splitlines()[-1])
    assert len(result['messages']) == 1, result['messages']  # warned once, for every compilation
    assert named in result['messages'][0] and 'GRU4REC_C_KERNELS=0' in result['messages'][0]
    assert result['linker'] == 'VMLinker'
    assert np.isfinite(result['loss']) and result['loss'] > 0 and 0 <= result['recall'] <= 1


def test_kernels_off_on_purpose_warn_nothing():
    out = run_python("""
        import sys, warnings
        sys.path.insert(0, 'tests')
        from conftest import fit_small
        from backends import CKernelsUnavailable
        with warnings.catch_warnings():
            warnings.simplefilter('error', CKernelsUnavailable)
            model = fit_small(n_epochs=1)
        print(type(model.training_step_.function.maker.linker).__name__)
    """, GRU4REC_C_KERNELS='0')
    assert out.split() == ['VMLinker']
