"""Model files (issue "Reliability and security"): savemodel writes atomically a versioned, checksummed
file of arrays plus JSON; loadmodel refuses anything else with a clear ValueError and never runs code
from the file (no pickle, no object arrays)."""
import hashlib
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pandas as pd
import pytest

import modelfile
from gru4rec import GRU4Rec


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
