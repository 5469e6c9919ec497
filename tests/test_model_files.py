"""Model files (issue "Reliability and security"): savemodel writes atomically a versioned, checksummed
file of arrays plus JSON; loadmodel refuses anything else with a clear ValueError and never runs code
from the file (no pickle, no object arrays). Issue 14: a file with a valid checksum is still untrusted:
crafted headers and arrays are refused clearly before anything is allocated (tests/README.md lists them);
item ids keep their dtype (issue 12, bug 3); concurrent saves leave one valid file."""
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import re
import threading
import tracemalloc
import zipfile

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import modelfile
from gru4rec import GRU4Rec
from network import parameter_shapes


def session_log(n_sessions=40, n_items=15, seed=0, item_prefix=None):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 7, n_sessions)
    items = rng.integers(0, n_items, lengths.sum()) * 3 + 100
    log = pd.DataFrame({'SessionId': np.repeat(np.arange(n_sessions), lengths), 'ItemId': items,
                        'Time': np.arange(lengths.sum(), dtype=float)})
    if item_prefix is not None:
        log['ItemId'] = item_prefix + log['ItemId'].astype(str)
    return log


PARAMS = dict(layers=[8], n_epochs=1, batch_size=4, n_sample=5, momentum=0.3, learning_rate=0.1,
              loss='bpr-max', final_act='elu-1', verbose=False, seed=3)


@pytest.fixture(scope='module')
def model():
    return GRU4Rec(**PARAMS).fit(session_log())


@pytest.fixture(scope='module')
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp('model') / 'm.gru4rec'
    model.savemodel(path)
    return path


def predictions(model, log):
    """Scores of all items after each event of the first sessions (4 parallel slots)."""
    first = log[log.SessionId < 4].groupby('SessionId').head(2)
    out = []
    for step in range(2):
        rows = first.groupby('SessionId').nth(step)
        out.append(model.predict_next_batch(rows.SessionId.to_numpy(), rows.ItemId.to_numpy(), batch=4).to_numpy())
    return np.stack(out)


def no_temp_files(directory):
    return [p for p in os.listdir(directory) if p.startswith('.tmp')] == []


def split(blob):
    """(header dict, {name: array}) of a model file's bytes, read with json and numpy's own reader."""
    n = int.from_bytes(blob[8:16], 'little')
    with np.load(io.BytesIO(blob[16 + n:-32]), allow_pickle=False) as npz:
        return json.loads(blob[16:16 + n]), {k: npz[k] for k in npz.files}


def join(meta, arrays, archive=None):
    """A model file of this header and these arrays (or archive bytes), with a valid checksum."""
    if archive is None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        archive = buffer.getvalue()
    header = json.dumps(meta).encode()
    blob = modelfile.MAGIC + len(header).to_bytes(8, 'little') + header + archive
    return blob + hashlib.sha256(blob).digest()


def load_error(path):
    with pytest.raises(ValueError) as info:
        GRU4Rec.loadmodel(path)
    return str(info.value)


# -- round trip -------------------------------------------------------------------------------------

@pytest.mark.parametrize('item_prefix', [None, 'item-'])
def test_load_gives_back_the_same_model(tmp_path, item_prefix):
    log = session_log(item_prefix=item_prefix)
    model = GRU4Rec(**PARAMS).fit(log)
    model.savemodel(tmp_path / 'm.gru4rec')
    loaded = GRU4Rec.loadmodel(tmp_path / 'm.gru4rec')
    assert loaded.get_params() == model.get_params()
    assert loaded.itemidmap.equals(model.itemidmap)
    assert loaded.itemidmap.dtype == model.itemidmap.dtype
    assert loaded.history_ == model.history_
    assert set(loaded.weights) == set(model.weights)
    for name in model.weights:
        np.testing.assert_array_equal(loaded.weights[name], model.weights[name], err_msg=name)
    assert set(loaded.opt_values) == set(model.opt_values)
    for name in model.opt_values:
        np.testing.assert_array_equal(loaded.opt_values[name], model.opt_values[name], err_msg=name)
    np.testing.assert_array_equal(loaded.support, model.support)
    np.testing.assert_array_equal(predictions(loaded, log), predictions(model, log))


def test_the_file_records_format_and_version(model_file):
    meta, _ = split(model_file.read_bytes())
    assert meta['format'] == modelfile.FORMAT
    assert meta['version'] == modelfile.VERSION


# -- atomic writing ---------------------------------------------------------------------------------

def test_save_leaves_no_temporary_file(model, tmp_path):
    model.savemodel(tmp_path / 'm.gru4rec')
    assert sorted(os.listdir(tmp_path)) == ['m.gru4rec']


@pytest.mark.parametrize('failure', [OSError(28, 'No space left on device'), KeyboardInterrupt()])
def test_a_failing_write_leaves_the_existing_file_intact(model, tmp_path, monkeypatch, failure):
    path = tmp_path / 'm.gru4rec'
    model.savemodel(path)
    before = path.read_bytes()
    other = GRU4Rec(**dict(PARAMS, seed=4)).fit(session_log(seed=1))

    def fail(fd):
        raise failure
    monkeypatch.setattr(os, 'fsync', fail)
    with pytest.raises(type(failure)):
        other.savemodel(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['m.gru4rec'], 'the temporary file was left behind'
    GRU4Rec.loadmodel(path)


def test_a_failing_write_to_a_new_path_creates_nothing(model, tmp_path, monkeypatch):
    def fail(src, dst):
        raise OSError(5, 'Input/output error')
    monkeypatch.setattr(os, 'replace', fail)
    with pytest.raises(OSError):
        model.savemodel(tmp_path / 'new.gru4rec')
    assert os.listdir(tmp_path) == []


# -- files that are not intact model files ----------------------------------------------------------

def test_future_format_version_is_refused(model_file, tmp_path):
    meta, arrays = split(model_file.read_bytes())
    path = tmp_path / 'future.gru4rec'
    path.write_bytes(join(dict(meta, version=modelfile.VERSION + 1), arrays))
    message = load_error(path)
    assert 'newer' in message and str(modelfile.VERSION + 1) in message


def test_truncated_files_are_refused(model_file, tmp_path):
    blob = model_file.read_bytes()
    for size in [0, 1, 7, 8, 12, 16, 100, len(blob) // 2, len(blob) - 33, len(blob) - 32, len(blob) - 1]:
        path = tmp_path / f'cut{size}.gru4rec'
        path.write_bytes(blob[:size])
        message = load_error(path)
        assert str(path) in message, message
        assert any(w in message for w in ('truncated', 'corrupted', 'not a GRU4Rec model file')), message


def test_every_flipped_byte_is_detected(model_file, tmp_path):
    """A flip anywhere (magic, header length, JSON header with the hyper-parameters, arrays, checksum)
    is refused: nothing loads with silently changed values."""
    blob = model_file.read_bytes()
    path = tmp_path / 'flipped.gru4rec'
    header_end = 16 + int.from_bytes(blob[8:16], 'little')
    # Every byte of the magic, length and JSON header and of the trailing checksum; every 13th of the arrays.
    positions = [*range(header_end), *range(header_end, len(blob) - 64, 13), *range(len(blob) - 64, len(blob))]
    undetected = []
    for pos in positions:
        for bit in (0x01, 0x20):
            damaged = bytearray(blob)
            damaged[pos] ^= bit
            path.write_bytes(bytes(damaged))
            try:
                GRU4Rec.loadmodel(path)
            except ValueError:
                continue
            undetected.append((pos, bit))
        if len(undetected) > 5:
            break
    assert undetected == []
    # The same through the public API, for a few positions.
    for pos in [0, 9, 40, len(blob) // 2, len(blob) - 40, len(blob) - 1]:
        damaged = bytearray(blob)
        damaged[pos] ^= 0x04
        path.write_bytes(bytes(damaged))
        load_error(path)


def _zip_bytes():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as z:
        z.writestr('readme.txt', 'not a model')
    return buffer.getvalue()


def _npz_bytes():
    buffer = io.BytesIO()
    np.savez(buffer, itemids=np.arange(5), support=np.ones(5), **{'param/Wy': np.zeros((5, 8), np.float32)})
    return buffer.getvalue()


@pytest.mark.parametrize('content', [
    pytest.param(lambda: b'', id='empty'),
    pytest.param(lambda: np.random.default_rng(0).bytes(5000), id='random-bytes'),
    pytest.param(_zip_bytes, id='zip'),
    pytest.param(_npz_bytes, id='npz'),
    pytest.param(lambda: json.dumps({'format': 'gru4rec-npz', 'version': 2}).encode(), id='json'),
    pytest.param(lambda: b'SessionId\tItemId\tTime\n1\t2\t3\n', id='tsv'),
    pytest.param(lambda: modelfile.MAGIC + np.random.default_rng(1).bytes(3000), id='magic-then-garbage'),
    pytest.param(lambda: modelfile.MAGIC + (2).to_bytes(8, 'little') + b'[]', id='magic-json-list'),
])
def test_foreign_files_are_refused(tmp_path, content):
    path = tmp_path / 'foreign.bin'
    path.write_bytes(content())
    assert str(path) in load_error(path)


def test_missing_file_and_directory_give_a_clear_error(tmp_path):
    assert 'cannot read model file' in load_error(tmp_path / 'nowhere.gru4rec')
    assert 'cannot read model file' in load_error(tmp_path)


# -- no code from the file is ever run ---------------------------------------------------------------

class _Payload:
    """Unpickling this creates a directory: the marker that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_pickle_files_are_refused_with_an_explanation(tmp_path, protocol):
    path = tmp_path / 'original.pickle'
    path.write_bytes(pickle.dumps({'layers': [100], 'Wy': np.zeros((3, 2))}, protocol=protocol))
    message = load_error(path)
    assert 'pickle' in message and 'refused' in message


@pytest.mark.parametrize('protocol', range(pickle.HIGHEST_PROTOCOL + 1))
def test_loading_a_malicious_pickle_runs_no_code(tmp_path, protocol):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.gru4rec'
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=protocol))
    pickle.loads(path.read_bytes())  # the payload works: unpickling it creates the marker ...
    assert marker.exists()
    os.rmdir(marker)
    load_error(path)  # ... but loadmodel refuses the file without unpickling it
    assert not marker.exists()


def test_object_arrays_inside_an_intact_model_file_are_refused_unexecuted(model, tmp_path, monkeypatch):
    """A file with the right format, version and checksum whose arrays hold a pickled object."""
    marker = tmp_path / 'marker'
    savez = np.savez

    def savez_with_payload(file, **arrays):
        arrays['param/Wy'] = np.array([_Payload(marker)], dtype=object)
        return savez(file, **arrays)
    monkeypatch.setattr(np, 'savez', savez_with_payload)
    model.savemodel(tmp_path / 'evil.gru4rec')
    monkeypatch.undo()
    assert not marker.exists()
    load_error(tmp_path / 'evil.gru4rec')
    assert not marker.exists()


def test_loading_never_unpickles(model_file, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError('loadmodel unpickled something')
    monkeypatch.setattr(pickle, 'load', forbidden)
    monkeypatch.setattr(pickle, 'loads', forbidden)
    monkeypatch.setattr(pickle, 'Unpickler', forbidden)
    loaded = GRU4Rec.loadmodel(model_file)
    assert loaded.n_items > 0


# -- crafted files: intact checksum, untrusted content (issue 14) ---------------------------------------
# Each case edits the header and/or arrays of a valid file (split/join recompute the checksum); the loader
# must refuse it with a ValueError that names the file and the problem, before building anything.

def _edit(arrays, name, value):
    return dict(arrays, **{name: value})


def _drop(arrays, name):
    return {k: v for k, v in arrays.items() if k != name}


def _params(**changes):
    return lambda meta, arrays: (dict(meta, params=dict(meta['params'], **changes)), arrays)


def _arrays(change):
    return lambda meta, arrays: (meta, change(arrays))


def _header(**changes):
    return lambda meta, arrays: ({k: v for k, v in dict(meta, **changes).items() if v is not ...}, arrays)


CRAFTED = {
    # header disagrees with the arrays
    'Wy-wrong-shape': (_arrays(lambda a: _edit(a, 'param/Wy', a['param/Wy'][:, :4])),
                       r'array param/Wy has shape \(15, 4\); the header declares \(15, 8\)'),
    'layers-disagree': (_params(layers=[16]), r'array param/Wy has shape \(15, 8\); the header declares \(15, 16\)'),
    'one-layer-more': (_params(layers=[8, 8]), r"missing \['param/Bh1', 'param/Wh1', 'param/Wrz1', 'param/Wx1'\]"),
    'embedding-disagrees': (_params(embedding=5), r"do not match the architecture its header declares \(layers=\[8\], "
                                                  r"embedding=5, constrained_embedding=False, 15 items\): "
                                                  r"missing \['param/E'\]"),
    'constrained-disagrees': (_params(constrained_embedding=True),
                              r'array param/Wx0 has shape \(15, 24\); the header declares \(8, 24\)'),
    'array-missing': (_arrays(lambda a: _drop(a, 'param/Wh0')), r"missing \['param/Wh0'\]"),
    'array-unknown': (_arrays(lambda a: _edit(a, 'param/Wq', a['param/Wh0'])), r"unexpected \['param/Wq'\]"),
    'support-missing': (_arrays(lambda a: _drop(a, 'support')), r"missing \['support'\]"),
    'support-wrong-length': (_arrays(lambda a: _edit(a, 'support', a['support'][:-1])),
                             r'array support has shape \(14,\); the header declares \(15,\)'),
    'optimiser-state-wrong-shape': (_arrays(lambda a: _edit(a, 'opt/adagrad_Wy', a['opt/adagrad_Wy'][:, :2])),
                                    r'array opt/adagrad_Wy has shape \(15, 2\)'),
    'optimiser-state-unknown': (_arrays(lambda a: _edit(a, 'opt/adagrad_Wq', a['opt/adagrad_Wy'])),
                                r"unexpected \['opt/adagrad_Wq'\]"),
    'step-counter-a-vector': (_arrays(lambda a: _edit(a, 'opt/t', np.zeros(2, np.float32))),
                              r'array opt/t has shape \(2,\); the header declares \(\)'),
    # values
    'NaN-weight': (_arrays(lambda a: _edit(a, 'param/Wy', np.where(np.arange(8) == 3, np.nan, a['param/Wy']))),
                   'array param/Wy holds NaN or infinite values'),
    'inf-optimiser-state': (_arrays(lambda a: _edit(a, 'opt/velocity_By', a['opt/velocity_By'] + np.inf)),
                            'array opt/velocity_By holds NaN or infinite values'),
    'float64-overflowing-float32': (_arrays(lambda a: _edit(a, 'param/Wh0', a['param/Wh0'].astype(np.float64) * 1e300)),
                                    r'array param/Wh0 holds NaN or infinite values \(after casting to float32\)'),
    'integer-weights': (_arrays(lambda a: _edit(a, 'param/Wh0', a['param/Wh0'].astype(np.int32))),
                        r'array param/Wh0 has dtype int32; expected float32 \(float64 is cast\)'),
    'float16-weights': (_arrays(lambda a: _edit(a, 'param/Wh0', a['param/Wh0'].astype(np.float16))),
                        'array param/Wh0 has dtype float16'),
    'complex-weights': (_arrays(lambda a: _edit(a, 'param/Wh0', a['param/Wh0'].astype(np.complex64))),
                        'array param/Wh0 has dtype complex64'),
    'structured-array': (_arrays(lambda a: _edit(a, 'param/Bh0', np.zeros(24, [('x', 'f4')]))),
                         'array param/Bh0 has dtype .* never objects'),
    'negative-support': (_arrays(lambda a: _edit(a, 'support', -a['support'])),
                         'item supports and the optimiser step count cannot be negative'),
    # item ids
    'duplicate-item-ids': (_arrays(lambda a: _edit(a, 'itemids', np.r_[a['itemids'][:-1], a['itemids'][0]])),
                           r'the item ids are not unique, e.g. \[100\]'),
    'item-ids-a-matrix': (_arrays(lambda a: _edit(a, 'itemids', a['itemids'].reshape(3, 5))),
                          r'itemids must be a non-empty vector, its shape is \(3, 5\)'),
    'no-item-ids': (_arrays(lambda a: _drop(a, 'itemids')), r'has no item ids'),
    'boolean-item-ids': (_arrays(lambda a: _edit(a, 'itemids', a['itemids'] > 120)), 'itemids has dtype bool'),
    'item-ids-not-the-declared-dtype': (_arrays(lambda a: _edit(a, 'itemids', a['itemids'].astype(np.int32))),
                                        "itemids has dtype int32, the header declares 'int64'"),
    'NaN-item-id': (lambda m, a: (dict(m, itemids={'dtype': 'float64'}),
                                  _edit(a, 'itemids', np.r_[a['itemids'][:-1], np.nan])),
                    'the item ids include NaN or infinity'),
    # header schema and field types
    'layers-as-a-string': (_params(layers='8'), r"hyper-parameter layers='8' is not in the form savemodel writes"),
    'n_epochs-a-float': (_params(n_epochs=1.5), r'hyper-parameter n_epochs=1.5 is not in the form'),
    'n_epochs-a-boolean': (_params(n_epochs=True), r'hyper-parameter n_epochs=True is not in the form'),
    'unknown-loss': (_params(loss='hinge'), r"hyper-parameters: loss='hinge': unknown loss"),
    'NaN-learning-rate': (_params(learning_rate=float('nan')), r'learning_rate=nan: must be a finite number'),
    'unknown-hyper-parameter': (_params(hidden_size=100), r"unknown hyper-parameter\(s\) \['hidden_size'\]"),
    'a-dict-as-hyper-parameter': (_params(layers={'a': 1}), 'header field params must map names to'),
    'params-a-list': (_header(params=[1, 2]), 'header field params must map names to'),
    'history-a-string': (_header(history='none'), r'header field history must be a list of \{name: number\}'),
    'history-with-a-string': (_header(history=[{'loss': 'low'}]), 'header field history must be a list'),
    'extra-header-field': (_header(author='me'), r"its header fields are \['author', "),
    'header-field-missing': (_header(history=...),
                             r"its header fields are \['format', 'itemids', 'lineage', 'params', 'version'\]"),
    'unknown-item-id-dtype': (_header(itemids={'dtype': 'complex128'}), 'header field itemids must record'),
    'implausible-batch-size': (_params(batch_size=10 ** 9), r'batch_size=1000000000 with layers=\[8\] needs 8000000000 '
                                                             'hidden state values'),
}


@pytest.mark.parametrize('case', sorted(CRAFTED))
def test_crafted_files_are_refused_clearly(model_file, tmp_path, case):
    edit, error = CRAFTED[case]
    path = tmp_path / f'{case}.gru4rec'
    path.write_bytes(join(*edit(*split(model_file.read_bytes()))))
    message = load_error(path)
    assert message.startswith(f"{str(path)!r}: "), message
    assert re.search(error, message), message


def _archive_bytes(arrays, compression=zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', compression) as z:
        for name, value in arrays.items():
            with z.open(f'{name}.npy', 'w', force_zip64=True) as f:
                if isinstance(value, bytes):
                    f.write(value)
                else:
                    np.lib.format.write_array(f, value, allow_pickle=True)
    return buffer.getvalue()


def _npy(value):
    buffer = io.BytesIO()
    np.save(buffer, value)
    return buffer.getvalue()


def _with_archive(change):
    """A file whose archive bytes are change(archive of the valid arrays)."""
    def make(blob):
        meta, arrays = split(blob)
        return join(meta, None, archive=change(arrays))
    return make


ARCHIVES = {
    'compressed-entries': (lambda a: _archive_bytes(a, zipfile.ZIP_DEFLATED), 'array itemids is compressed'),
    'object-array': (lambda a: _archive_bytes(dict(a, **{'param/By': np.array([None] * 15)})),
                     'array param/By has dtype object; .* never objects'),
    'a-text-entry': (lambda a: _zip_bytes(), "its archive holds 'readme.txt', which is not a .npy array"),
    'entry-shorter-than-its-npy-header': (
        lambda a: _archive_bytes(dict(a, **{'param/Wy': _npy(a['param/Wy'][:, :4]).replace(b'(15, 4)', b'(15, 8)')})),
        r'array param/Wy declares shape \(15, 8\) of float32 \(480 bytes\) but its entry holds 240 bytes'),
    'not-an-archive': (lambda a: b'PK' + bytes(100), 'its arrays are not a readable archive'),
}


@pytest.mark.parametrize('case', sorted(ARCHIVES))
def test_crafted_archives_are_refused_clearly(model_file, tmp_path, case):
    change, error = ARCHIVES[case]
    path = tmp_path / f'{case}.gru4rec'
    path.write_bytes(_with_archive(change)(model_file.read_bytes()))
    message = load_error(path)
    assert message.startswith(f"{str(path)!r}"), message
    assert re.search(error, message), message


def test_duplicate_header_fields_are_refused(model_file, tmp_path):
    meta, arrays = split(model_file.read_bytes())
    blob = join(meta, arrays)
    header = json.dumps(meta).encode()
    forged = json.dumps(meta)[:-1].encode() + b', "version": 1}'
    blob = blob[:8] + len(forged).to_bytes(8, 'little') + forged + blob[16 + len(header):-32]
    path = tmp_path / 'twice.gru4rec'
    path.write_bytes(blob + hashlib.sha256(blob).digest())
    assert "a field appears twice: ['version']" in load_error(path)


def test_float64_arrays_are_cast_to_float32(model, model_file, tmp_path):
    meta, arrays = split(model_file.read_bytes())
    widened = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in arrays.items()}
    path = tmp_path / 'float64.gru4rec'
    path.write_bytes(join(meta, widened))
    loaded = GRU4Rec.loadmodel(path)
    for name, value in loaded.weights.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, model.weights[name])
    reference = GRU4Rec.loadmodel(model_file)  # a fresh model: predict_next_batch keeps session state
    np.testing.assert_array_equal(predictions(loaded, session_log()), predictions(reference, session_log()))


def test_format_version_1_files_still_load(model, model_file, tmp_path):
    """Files written before the item ids' dtype was recorded (int64 or str ids) load as before."""
    meta, arrays = split(model_file.read_bytes())
    path = tmp_path / 'v1.gru4rec'
    path.write_bytes(join(dict({k: v for k, v in meta.items() if k not in ('itemids', 'lineage')}, version=1),
                          arrays))
    loaded = GRU4Rec.loadmodel(path)
    assert loaded.itemidmap.equals(model.itemidmap) and loaded.itemidmap.dtype == np.int64
    assert loaded.lineage_ is None
    reference = GRU4Rec.loadmodel(model_file)  # a fresh model: predict_next_batch keeps session state
    np.testing.assert_array_equal(predictions(loaded, session_log()), predictions(reference, session_log()))


def test_lineage_is_drawn_by_fit_kept_by_retrain_and_saved(model, model_file, tmp_path):
    """A model fitted from scratch gets a new lineage, even on the same data with the same seed;
    retraining and saving keep it; format 2 files (before lineages) load without one."""
    loaded = GRU4Rec.loadmodel(model_file)
    assert loaded.lineage_ == model.lineage_ and len(model.lineage_) == 32
    loaded.retrain(session_log(), n_epochs=1)
    assert loaded.lineage_ == model.lineage_
    refit = GRU4Rec(**model.get_params()).fit(session_log())
    assert refit.lineage_ != model.lineage_
    meta, arrays = split(model_file.read_bytes())
    assert meta['lineage'] == model.lineage_
    path = tmp_path / 'v2.gru4rec'
    path.write_bytes(join(dict({k: v for k, v in meta.items() if k != 'lineage'}, version=2), arrays))
    assert GRU4Rec.loadmodel(path).lineage_ is None
    for bad in ('', 'XYZ' * 8, 42, 'a' * 65):
        path.write_bytes(join(dict(meta, lineage=bad), arrays))
        assert 'header field lineage must be 16 to 64 lower-case hex digits' in load_error(path)


# -- item ids of every dtype pandas gives (issue 12, bug 3) ----------------------------------------------

ID_DTYPES = {
    'int8': lambda ids: ids.astype(np.int8), 'int16': lambda ids: ids.astype(np.int16),
    'int32': lambda ids: ids.astype(np.int32), 'int64': lambda ids: ids, 'uint8': lambda ids: ids.astype(np.uint8),
    'uint16': lambda ids: ids.astype(np.uint16), 'uint32': lambda ids: ids.astype(np.uint32),
    'uint64': lambda ids: ids.astype(np.uint64) + np.uint64(2 ** 63), 'float32': lambda ids: ids / np.float32(8),
    'float64': lambda ids: ids / 3, 'str': lambda ids: pd.array(ids.astype(str), dtype='str'),
    'string': lambda ids: pd.array(ids.astype(str), dtype='string'),
    'object-str': lambda ids: np.array([f'item {i} é' for i in ids], dtype=object),
    'object-int': lambda ids: np.array([int(i) for i in ids], dtype=object),
}


@pytest.mark.parametrize('kind', sorted(ID_DTYPES))
def test_item_ids_of_every_dtype_encode_exactly(kind):
    index = pd.Index(ID_DTYPES[kind](np.arange(100, 140, 3)))
    values, record = modelfile.encode_itemids(index)
    decoded = modelfile.decode_itemids(values, json.loads(json.dumps(record)))
    assert decoded.equals(index) and decoded.dtype == index.dtype
    assert [type(v) for v in decoded] == [type(v) for v in index]


@pytest.mark.parametrize('ids', [
    pytest.param(lambda ids: ids / 3, id='float64'),
    pytest.param(lambda ids: ids.astype(np.uint64) + np.uint64(2 ** 63), id='uint64'),
    pytest.param(lambda ids: pd.Categorical(ids.astype(str)), id='categorical'),
])
def test_item_ids_survive_save_and_load(tmp_path, ids):
    log = session_log()
    log['ItemId'] = ids(log['ItemId'].to_numpy())
    model = GRU4Rec(**PARAMS).fit(log)
    model.savemodel(tmp_path / 'm.gru4rec')
    loaded = GRU4Rec.loadmodel(tmp_path / 'm.gru4rec')
    assert loaded.itemidmap.equals(model.itemidmap) and loaded.itemidmap.dtype == model.itemidmap.dtype
    np.testing.assert_array_equal(predictions(loaded, log), predictions(model, log))
    top = loaded.recommend({1: log['ItemId'][:2].tolist()}, k=3)
    assert top['ItemId'].isin(log['ItemId']).all()


def test_item_ids_that_cannot_round_trip_are_refused_at_save(tmp_path):
    log = session_log()
    log['ItemId'] = pd.to_datetime(log['ItemId'], unit='D')
    model = GRU4Rec(**PARAMS).fit(log)
    with pytest.raises(ValueError, match=r"cannot save the model to '.*m.gru4rec': item ids of dtype datetime64\[.s\] "
                                         r'cannot be saved in a model file; integer, float and string ids can'):
        model.savemodel(tmp_path / 'm.gru4rec')
    assert os.listdir(tmp_path) == []
    for index in [pd.Index([True, False]), pd.Index(['a', 1.5], dtype=object), pd.Index(['a\x00', 'b'])]:
        with pytest.raises(ValueError, match='cannot be saved|NUL character'):
            modelfile.encode_itemids(index)


# -- saving: bad places, concurrent writers ------------------------------------------------------------

@pytest.mark.parametrize('place, error', [
    (lambda tmp: tmp / 'missing' / 'm.gru4rec', FileNotFoundError),
    (lambda tmp: tmp / 'a-file' / 'm.gru4rec', NotADirectoryError),
    (lambda tmp: tmp / 'a-directory', IsADirectoryError),
])
def test_saving_to_an_impossible_place_fails_clearly_and_leaves_nothing(model, tmp_path, place, error):
    (tmp_path / 'a-file').write_text('keep me')
    (tmp_path / 'a-directory').mkdir()
    before = sorted(os.listdir(tmp_path))
    path = place(tmp_path)
    with pytest.raises(error, match=f"cannot save the model to {re.escape(repr(str(path)))}: "):
        model.savemodel(path)
    assert sorted(os.listdir(tmp_path)) == before
    assert os.listdir(tmp_path / 'a-directory') == [] and (tmp_path / 'a-file').read_text() == 'keep me'


@pytest.fixture(scope='module')
def other_model():
    return GRU4Rec(**dict(PARAMS, seed=4)).fit(session_log(seed=1))


def assert_one_of(path, models):
    loaded = GRU4Rec.loadmodel(path)
    assert any(all(np.array_equal(loaded.weights[n], m.weights[n]) for n in m.weights) for m in models)
    assert no_temp_files(path.parent)


def test_concurrent_saves_from_threads_leave_one_valid_file(model, other_model, tmp_path):
    path = tmp_path / 'm.gru4rec'
    errors = []

    def save(m):
        try:
            for _ in range(3):
                m.savemodel(path)
        except BaseException as e:  # reported below: a thread's exception is otherwise lost
            errors.append(e)
    threads = [threading.Thread(target=save, args=(m,)) for m in [model, other_model] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert_one_of(path, [model, other_model])


def _save_repeatedly(m, path, n):
    for _ in range(n):
        m.savemodel(path)


def test_concurrent_saves_from_processes_leave_one_valid_file(model, other_model, tmp_path):
    path = tmp_path / 'm.gru4rec'
    model.savemodel(path)
    context = multiprocessing.get_context('fork')
    workers = [context.Process(target=_save_repeatedly, args=(m, path, 4)) for m in [model, other_model] * 2]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):  # readers meanwhile always see a whole file
        meta, _ = split(path.read_bytes())
        assert meta['format'] == modelfile.FORMAT
    for w in workers:
        w.join()
    assert [w.exitcode for w in workers] == [0] * 4
    assert_one_of(path, [model, other_model])


# -- memory: a small file cannot make the loader allocate much ------------------------------------------

def _forge_stored_size(archive, name, size):
    """The archive with entry `name` claiming, in the central directory, `size` bytes it does not hold."""
    position = zipfile.ZipFile(io.BytesIO(archive)).start_dir
    while archive[position + 46:position + 46 + len(name)] != name.encode():
        n_name, n_extra, n_comment = (int.from_bytes(archive[position + k:position + k + 2], 'little')
                                      for k in (28, 30, 32))
        position += 46 + n_name + n_extra + n_comment
    forged = bytearray(archive)
    for offset in (position + 20, position + 24):  # compressed and uncompressed size
        forged[offset:offset + 4] = size.to_bytes(4, 'little')
    return bytes(forged)


def _huge_npy_header(shape, dtype='<f4'):
    header = np.lib.format.header_data_from_array_1_0(np.zeros(0, dtype))
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, dict(header, shape=shape))
    return buffer.getvalue()


def _deflate_bomb(arrays, n_bytes):
    """Wy's entry deflated, and inflating to n_bytes of zeros (under 1 MB in the file)."""
    meta_rows = n_bytes // 4 // 8
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED) as z:
        for name, value in arrays.items():
            with z.open(f'{name}.npy', 'w', force_zip64=True) as f:
                if name == 'param/Wy':
                    f.write(_huge_npy_header((meta_rows, 8)))
                    chunk = bytes(2 ** 24)
                    for _ in range(meta_rows * 32 // len(chunk)):
                        f.write(chunk)
                else:
                    np.lib.format.write_array(f, value)
    return buffer.getvalue()


@pytest.mark.parametrize('attack', ['declared-size', 'deflate-bomb', 'huge-model-declared'])
def test_a_small_crafted_file_cannot_make_loading_allocate_much(model_file, tmp_path, attack):
    meta, arrays = split(model_file.read_bytes())
    if attack == 'declared-size':  # Wy's .npy header and zip entry both claim 3 GB; the file holds 480 bytes
        rows = 3 * 2 ** 30 // 32
        npy = _huge_npy_header((rows, 8))
        archive = _archive_bytes(dict(arrays, **{'param/Wy': npy + arrays['param/Wy'].tobytes()}))
        archive = _forge_stored_size(archive, 'param/Wy.npy', len(npy) + rows * 32)
        blob = join(dict(meta, itemids={'dtype': 'int64'}), None, archive=archive)
    elif attack == 'deflate-bomb':  # 256 MB of zeros, deflated
        blob = join(meta, None, archive=_deflate_bomb(arrays, 2 ** 28))
    else:  # the item ids declare 10^8 items (800 MB), the file holds 15
        npy = _huge_npy_header((10 ** 8,), '<i8')
        blob = join(meta, None, archive=_forge_stored_size(
            _archive_bytes(dict(arrays, itemids=npy + arrays['itemids'].tobytes())), 'itemids.npy',
            len(npy) + 8 * 10 ** 8))
    assert len(blob) < 2 ** 20
    path = tmp_path / f'{attack}.gru4rec'
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        message = load_error(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in message
    assert peak < 20 * len(blob) + 2 ** 20, f'loading a {len(blob)}-byte file allocated {peak} bytes ({message})'


# -- property: whatever a file says, loading gives the model of its arrays or a clear error ---------------

PROPERTY_PARAMS = dict(layers=[4], n_epochs=1, batch_size=4, n_sample=3, loss='bpr-max', final_act='linear',
                       hidden_act='tanh', verbose=False, seed=1)
ACTIVATIONS = ['linear', 'tanh', 'relu', 'sigmoid', 'elu-0.5', 'leaky-0.1', 'selu-1.05-1.67', 'softmax']


def _numpy_activation(name):
    """float64 numpy versions of the activations the property test can write into a header."""
    kind, *args = name.split('-')
    args = [float(a) for a in args]
    return {'linear': lambda x: x, 'tanh': np.tanh, 'relu': lambda x: np.maximum(x, 0),
            'sigmoid': lambda x: 1 / (1 + np.exp(-x)),
            'elu': lambda x: np.where(x > 0, x, args[0] * np.expm1(np.minimum(x, 0))) if args else None,
            'leaky': lambda x: np.where(x > 0, x, args[0] * x) if args else None,
            'selu': lambda x: args[0] * np.where(x > 0, x, args[1] * np.expm1(np.minimum(x, 0))) if args else None,
            'softmax': lambda x: (np.exp(x - x.max(1, keepdims=True))
                                  / np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)),
            }[kind]


def reference_scores(meta, arrays, positions):
    """Scores (batch x items) after each step of reading the items at `positions`, computed in float64 from
    a file's header and arrays (a one-layer GRU with one-hot input, SPEC section 2)."""
    p = meta['params']
    w = {k[len('param/'):]: v.astype(np.float64) for k, v in arrays.items() if k.startswith('param/')}
    hidden, final = _numpy_activation(p['hidden_act']), _numpy_activation(p['final_act'])
    L = w['Wh0'].shape[0]
    h = np.zeros((len(positions[0]), L))
    out = []
    for X in positions:
        x = w['Wx0'][X] + w['Bh0']
        rz = 1 / (1 + np.exp(-(x[:, :2 * L] + h @ w['Wrz0'])))
        r, z = rz[:, :L], rz[:, L:]
        h = (1 - z) * h + z * hidden(x[:, 2 * L:] + (r * h) @ w['Wh0'])
        out.append(final(h @ w['Wy'].T + w['By']))
    return out


@pytest.fixture(scope='module')
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('property') / 'small.gru4rec'
    GRU4Rec(**PROPERTY_PARAMS).fit(session_log(n_sessions=20, n_items=8)).savemodel(path)
    return path.read_bytes()


def _header_mutation():
    value = st.one_of(st.none(), st.booleans(), st.integers(-2, 40), st.floats(allow_nan=True), st.text(max_size=6),
                      st.sampled_from(ACTIVATIONS + ['cross-entropy', 'bpr', '4', '4/4', 'layersize', 'adam']),
                      st.lists(st.integers(-1, 5), max_size=2))
    return st.tuples(st.just('header'), st.sampled_from(sorted(PROPERTY_PARAMS) + ['embedding', 'adapt', 'momentum']),
                     value)


def _array_mutation(arrays):
    def values(name):
        shape = arrays[name].shape
        same = hnp.arrays(st.sampled_from([np.float32, np.float64]), shape,
                          elements=st.floats(-2, 2, width=32))
        other = st.one_of(
            hnp.arrays(st.sampled_from([np.float32, np.int32, np.float16]), hnp.array_shapes(max_dims=2, max_side=9)),
            st.just(np.full(shape, np.nan, np.float32)), st.just(arrays[name][..., :-1] if shape else arrays[name]))
        if name == 'itemids':
            same = st.permutations(arrays[name]).map(np.array)
            other = st.one_of(other, st.just(np.r_[arrays[name][1:], arrays[name][1]]))
        return st.one_of(same, other)
    return st.sampled_from(sorted(arrays)).flatmap(
        lambda name: st.tuples(st.just('array'), st.just(name), values(name)))


def _byte_mutation(size):
    return st.tuples(st.just('bytes'), st.integers(0, size - 33), st.integers(1, 255))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_loading_any_edit_of_a_file_gives_its_model_or_a_clear_error(small_file, tmp_path, data):
    meta, arrays = split(small_file)
    kind, where, what = data.draw(st.one_of(_header_mutation(), _array_mutation(arrays),
                                            _byte_mutation(len(small_file))))
    if kind == 'header':
        blob = join(dict(meta, params=dict(meta['params'], **{where: what})), arrays)
    elif kind == 'array':
        blob = join(meta, dict(arrays, **{where: what}))
    else:
        damaged = bytearray(small_file[:-32])
        damaged[where] ^= what
        blob = bytes(damaged) + hashlib.sha256(damaged).digest()
    path = tmp_path / 'edited.gru4rec'
    path.write_bytes(blob)
    try:
        loaded = GRU4Rec.loadmodel(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    meta, arrays = split(blob)  # what the file says, read by json and numpy's own reader
    ids = arrays['itemids']
    assert list(loaded.itemidmap) == list(ids)
    positions = [np.array([0, 3]), np.array([5, 1])]
    expected = reference_scores(meta, arrays, positions)
    for X, scores in zip(positions, expected):
        got = loaded.predict_next_batch(np.array([1, 2]), ids[X], batch=2)
        assert list(got.index) == list(ids)
        assert np.isfinite(got.to_numpy()).all()
        np.testing.assert_allclose(got.to_numpy().T, scores, rtol=1e-4, atol=1e-5)


# -- the layout the loader checks against is the one training makes -------------------------------------

@pytest.mark.parametrize('name', ['onehot', 'embedding', 'layersize', 'constrained', 'two_layers'])
def test_the_declared_layout_is_the_trained_one(models, name):
    model = models(name)
    shapes = parameter_shapes(model.get_params(), model.n_items)
    assert shapes == {n: w.shape for n, w in model.weights.items()}


@pytest.mark.parametrize('adapt', ['adadelta', 'adam'])
def test_every_optimisers_state_saves_and_loads(tmp_path, adapt):
    model = GRU4Rec(**dict(PARAMS, adapt=adapt)).fit(session_log())
    model.savemodel(tmp_path / 'm.gru4rec')
    loaded = GRU4Rec.loadmodel(tmp_path / 'm.gru4rec')
    assert loaded.opt_values.keys() == model.opt_values.keys()
    for name in model.opt_values:
        np.testing.assert_array_equal(loaded.opt_values[name], model.opt_values[name])
