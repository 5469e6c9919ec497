"""The GRU4Rec model file: written atomically, read as untrusted input.

Model files are shared between people (papers' artefacts, colleagues, model registries), and a SHA-256
only detects accidents: anyone can edit a file and recompute it. So `read` checks everything a file
declares before it trusts or allocates anything, and every refusal is a ValueError naming the file.

Layout (format 'gru4rec-npz'):
    MAGIC | header length (8 bytes, little-endian) | JSON header | .npz archive | SHA-256 of all before it
The header holds the format, its version, the hyper-parameters, the training history, (version 2)
the item ids' dtype and (version 3) the model's lineage: an id drawn when a model is fitted from scratch
and kept by every retraining, so that a live service knows whether two files are one model's steps.
The archive is numpy's uncompressed .npz: one .npy entry per array, no pickles.

This module knows the file, not the model: the caller passes the hyper-parameter validation and the
layout (which arrays, of which shapes) that the hyper-parameters declare.
"""
import hashlib
import io
import json
import math
import zipfile

import numpy as np
import pandas as pd

from atomicfile import write_atomically

MAGIC = b'GRU4REC\x00'
FORMAT = 'gru4rec-npz'
VERSION = 3  # 1: item ids stored as int64 or str; 2: the header records the item ids' dtype; 3: the lineage
HEADER_FIELDS = {1: {'format', 'version', 'params', 'history'},
                 2: {'format', 'version', 'params', 'history', 'itemids'},
                 3: {'format', 'version', 'params', 'history', 'itemids', 'lineage'}}
LINEAGE_CHARS = frozenset('0123456789abcdef')
NUMERIC_IDS = ('int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64', 'float32', 'float64')
STRING_IDS = ('str', 'string')  # pandas' StringDtype with NaN resp. pd.NA as missing value


# ---------------------------------------------------------------------------------------------------
# Writing

def write(path, params, history, itemids, arrays, lineage):
    """Writes a model file to `path`: hyper-parameters, history and lineage (JSON), item ids (a pandas
    Index) and named float arrays, atomically (atomicfile.write_atomically): readers and concurrent writers see
    one whole file or the old one, and a failure leaves nothing behind. Item ids of a dtype that cannot
    round-trip exactly are refused (ValueError) before anything is written."""
    try:
        ids, ids_dtype = encode_itemids(itemids)
    except ValueError as e:
        raise ValueError(f'cannot save the model to {str(path)!r}: {e}') from None
    header = json.dumps({'format': FORMAT, 'version': VERSION, 'params': params, 'history': history,
                         'itemids': ids_dtype, 'lineage': lineage}).encode()
    payload = io.BytesIO()
    np.savez(payload, itemids=ids, **arrays)
    blob = MAGIC + len(header).to_bytes(8, 'little') + header + payload.getvalue()
    digest = hashlib.sha256(blob).digest()
    write_atomically(path, lambda partial: partial.write_bytes(blob + digest), action='save the model to')


def encode_itemids(index):
    """(array, dtype record) for an Index of item ids, such that decode_itemids gives it back exactly:
    integers of any width, floats, strings (pandas' str/string or object); a categorical column's ids
    reach the model as its categories' dtype."""
    dtype = index.dtype
    if isinstance(dtype, np.dtype) and dtype.name in NUMERIC_IDS:
        return index.to_numpy(), {'dtype': dtype.name}
    values = index.to_numpy(dtype=object)
    if isinstance(dtype, pd.StringDtype) or (dtype == object and all(isinstance(v, str) for v in values)):
        if any(v.endswith('\x00') for v in values):
            raise ValueError('item ids ending in a NUL character cannot be saved (numpy strips them); '
                             'rename those items')
        record = {'dtype': str(dtype)}
        if isinstance(dtype, pd.StringDtype):
            record['storage'] = dtype.storage
        return np.array(values, dtype=str), record
    if dtype == object and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        try:
            return np.array(values, dtype=np.int64), {'dtype': 'object'}
        except OverflowError:
            pass
    raise ValueError(f'item ids of dtype {dtype} cannot be saved in a model file; integer, float and string ids '
                     "can (e.g. convert the item column with .astype(str) before fit)")


def decode_itemids(values, record):
    """The Index that encode_itemids encoded as (values, record); None when they do not match."""
    name = record['dtype']
    if name in NUMERIC_IDS:
        return pd.Index(values, dtype=name) if values.dtype == np.dtype(name) else None
    if values.dtype.kind not in 'Ui' or (values.dtype.kind == 'i' and name != 'object'):
        return None
    if name == 'object':
        return pd.Index(values.astype(object), dtype=object)
    na_value = np.nan if name == 'str' else pd.NA
    try:
        dtype = pd.StringDtype(record.get('storage', 'python'), na_value=na_value)
    except ImportError:  # written with pyarrow strings, read where pyarrow is missing: same values
        dtype = pd.StringDtype('python', na_value=na_value)
    return pd.Index(values, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# Reading

def read(path, check_params, layout):
    """Reads and checks a model file; returns (params, history, itemids, arrays, lineage), the
    lineage None for files written before format 3.

    check_params(raw dict) returns the validated hyper-parameters or raises ValueError.
    layout(params, n_items) returns (required, optional): {array name: (shape, dtype)} for the arrays
    the hyper-parameters declare (dtype 'float32' or 'float64'), or raises ValueError.

    Checked, in this order, each refusal a ValueError naming the file: magic (and pickles), checksum,
    the header's schema and field types, the hyper-parameters, the archive's entries (uncompressed,
    sizes consistent) and every array's name, dtype and shape read from its .npy header, against the
    layout; only then are the arrays read: CRC, finite values, unique item ids. float64 arrays where
    float32 is declared are cast (refused when a value overflows float32)."""
    where = str(path)

    def refuse(what):
        raise ValueError(f'{where!r}: {what}')

    blob = _read_bytes(path)
    meta, body = _split(blob, where)
    params = _check_header(meta, check_params, refuse)
    with _open_archive(body, refuse) as archive:
        entries = {}
        infos = sorted(archive.infolist(), key=lambda info: info.header_offset)
        for info, end in zip(infos, [info.header_offset for info in infos[1:]] + [archive.start_dir]):
            name = _entry_name(info, entries, refuse)
            if info.header_offset + 30 + len(info.orig_filename) + info.compress_size > end:
                refuse(f'array {name} claims {info.compress_size} bytes, more than its place in the archive holds')
            entries[name] = (info, *_npy_header(archive, info, refuse))
        if 'itemids' not in entries:
            refuse('has no item ids (array itemids is missing)')
        _, ids_dtype, ids_shape = entries['itemids']
        if len(ids_shape) != 1 or ids_shape[0] == 0:
            refuse(f'itemids must be a non-empty vector, its shape is {ids_shape}')
        if ids_dtype.kind not in 'iufU' or ('itemids' not in meta and ids_dtype.kind not in 'iU'):
            refuse(f'itemids has dtype {ids_dtype}; item ids are integers, floats or strings')
        try:
            required, optional = layout(params, ids_shape[0])
        except ValueError as e:
            refuse(f'hyper-parameters: {e}')
        expected = {**required, **optional}
        missing = sorted(set(required) - set(entries))
        unknown = sorted(set(entries) - set(expected) - {'itemids'})
        if missing or unknown:
            refuse(f'its arrays do not match the architecture its header declares (layers={params.get("layers")}, '
                   f'embedding={params.get("embedding")!r}, constrained_embedding='
                   f'{params.get("constrained_embedding")}, {ids_shape[0]} items): '
                   + '; '.join(f'{what} {names}' for what, names in (('missing', missing), ('unexpected', unknown))
                               if names))
        for name, (shape, dtype) in expected.items():
            if name in entries:
                got_dtype, got_shape = entries[name][1:]
                if tuple(got_shape) != tuple(shape):
                    refuse(f'array {name} has shape {tuple(got_shape)}; the header declares {tuple(shape)}')
                if got_dtype.kind != 'f' or got_dtype.itemsize not in (4, 8):
                    refuse(f'array {name} has dtype {got_dtype}; expected {dtype} (float64 is cast)')
        # Every size is known and bounded by the file's own size: read.
        arrays = {name: _read_array(archive, entries[name][0], refuse) for name in entries}
    ids = arrays.pop('itemids')
    itemids = decode_itemids(ids, meta['itemids']) if 'itemids' in meta else pd.Index(ids)  # version 1: int64 or str
    if itemids is None:
        refuse(f"itemids has dtype {ids_dtype}, the header declares {meta['itemids']['dtype']!r}")
    if not itemids.is_unique:
        repeated = itemids[itemids.duplicated()][:5].tolist()
        refuse(f'the item ids are not unique, e.g. {repeated} appear more than once')
    if itemids.dtype.kind == 'f' and not _finite(itemids.to_numpy()):
        refuse('the item ids include NaN or infinity')
    for name, value in arrays.items():
        dtype = expected[name][1]
        with np.errstate(over='ignore'):
            value = value.astype(dtype, copy=False)
        if not _finite(value):
            refuse(f'array {name} holds NaN or infinite values' + (' (after casting to float32)'
                                                                   if value.dtype != arrays[name].dtype else ''))
        arrays[name] = value
    return params, meta['history'], itemids, arrays, meta.get('lineage')


def _read_bytes(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise ValueError(f'cannot read model file {str(path)!r}: {e.strerror}') from None


def _split(blob, where):
    """(header dict, archive bytes) of an intact model file."""
    if blob[:1] == b'\x80':
        raise ValueError(f'{where!r} is a pickle file (e.g. from the original GRU4Rec); pickles can run code '
                         'when loaded, so they are refused. Re-train, or export its weights with the original '
                         'code into a trusted format.')
    if blob[:len(MAGIC)] != MAGIC:
        raise ValueError(f'{where!r} is not a GRU4Rec model file (no {MAGIC!r} header)')
    if len(blob) < len(MAGIC) + 8 + 32 or hashlib.sha256(blob[:-32]).digest() != blob[-32:]:
        raise ValueError(f'{where!r} is truncated or corrupted (checksum mismatch)')
    start = len(MAGIC) + 8
    end = start + int.from_bytes(blob[len(MAGIC):start], 'little')
    if end > len(blob) - 32:
        raise ValueError(f'{where!r} is corrupted: its header length exceeds the file')
    try:
        meta = json.loads(blob[start:end], object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f'{where!r} is corrupted: its header cannot be read ({e})') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT or type(meta.get('version')) is not int:
        raise ValueError(f'{where!r} is not a GRU4Rec model file (its header has no format {FORMAT!r} and version)')
    if meta['version'] > VERSION:
        raise ValueError(f"{where!r} was written by a newer GRU4Rec (format {meta['version']}); "
                         f'this one reads up to {VERSION}: upgrade gru4rec')
    return meta, blob[end:-32]


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f'a field appears twice: {sorted(k for k in set(keys) if keys.count(k) > 1)}')
    return dict(pairs)


def _check_header(meta, check_params, refuse):
    """The validated hyper-parameters of a parsed header whose every field has its type."""
    fields = HEADER_FIELDS.get(meta['version'])
    if fields is None:
        refuse(f"its format version {meta['version']} is not one this GRU4Rec reads ({sorted(HEADER_FIELDS)})")
    if set(meta) != fields:
        refuse(f'its header fields are {sorted(meta)}, expected {sorted(fields)}')
    raw, history = meta['params'], meta['history']
    if not isinstance(raw, dict) or not all(_is_param_value(v) for v in raw.values()):
        refuse('header field params must map names to numbers, strings, booleans, null or lists of numbers')
    if not isinstance(history, list) or not all(
            isinstance(h, dict) and all(_is_number(v) for v in h.values()) for h in history):
        refuse('header field history must be a list of {name: number} records')
    if 'lineage' in meta:
        lineage = meta['lineage']
        if not isinstance(lineage, str) or not 16 <= len(lineage) <= 64 or not set(lineage) <= LINEAGE_CHARS:
            refuse(f'header field lineage must be 16 to 64 lower-case hex digits; it is {lineage!r}'[:200])
    if 'itemids' in meta:
        record = meta['itemids']
        if not isinstance(record, dict) or record.get('dtype') not in NUMERIC_IDS + STRING_IDS + ('object',) \
                or set(record) - {'dtype', 'storage'} or record.get('storage', 'python') not in ('python', 'pyarrow'):
            refuse(f'header field itemids must record the item ids\' dtype, one of '
                   f'{list(NUMERIC_IDS + STRING_IDS + ("object",))}; it is {record!r}')
    try:
        params = check_params(raw)
    except (ValueError, TypeError) as e:
        refuse(f'hyper-parameters: {e}')
    for name, value in raw.items():
        if not _same_value(value, params[name]):
            refuse(f'hyper-parameter {name}={value!r} is not in the form savemodel writes ({params[name]!r})')
    return params


def _is_number(v):
    return type(v) in (int, float)


def _is_param_value(v):
    return v is None or type(v) in (bool, int, float, str) or (type(v) is list and all(_is_number(x) for x in v))


def _same_value(raw, parsed):
    """raw (from JSON) is the parsed value in its own type: an int may stand for a float, nothing else."""
    if isinstance(parsed, list):
        return isinstance(raw, list) and len(raw) == len(parsed) and all(map(_same_value, raw, parsed))
    if type(parsed) is float:
        return _is_number(raw) and raw == parsed
    return type(raw) is type(parsed) and raw == parsed


def _open_archive(body, refuse):
    try:
        return zipfile.ZipFile(io.BytesIO(body))
    except Exception as e:  # zipfile's parser meets arbitrary bytes here: any failure means a corrupted file
        refuse(f'is corrupted: its arrays are not a readable archive ({type(e).__name__}: {e})')


def _entry_name(info, seen, refuse):
    """The array name of an archive entry: an uncompressed, unencrypted .npy entry listed once."""
    if not info.filename.endswith('.npy'):
        refuse(f'its archive holds {info.filename!r}, which is not a .npy array')
    name = info.filename[:-len('.npy')]
    if name in seen:
        refuse(f'array {name} appears twice in the archive')
    if info.flag_bits & 0x1:
        refuse(f'array {name} is encrypted')
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        refuse(f'array {name} is compressed (savemodel never compresses; a compressed entry could inflate '
               'to far more memory than the file takes)')
    return name


def _npy_header(archive, info, refuse):
    """(dtype, shape) from an entry's .npy header, read without reading its data; the entry must hold
    exactly the bytes the header declares."""
    name = info.filename[:-len('.npy')]
    header = None
    try:
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version in ((1, 0), (2, 0)):
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                header = read_header(f)
                header_size = f.tell()
    except Exception as e:  # as in _open_archive
        refuse(f'array {name} is corrupted: {type(e).__name__}: {e}')
    if header is None:
        refuse(f'array {name} has .npy format version {version}, not 1.0 or 2.0')
    shape, _, dtype = header
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize == 0:
        refuse(f'array {name} has dtype {dtype}; model files hold plain numbers and strings, never objects')
    if any(n < 0 for n in shape) or header_size + math.prod(shape) * dtype.itemsize != info.file_size:
        refuse(f'array {name} declares shape {shape} of {dtype} ({math.prod(shape) * dtype.itemsize} bytes) '
               f'but its entry holds {info.file_size - header_size} bytes')
    return dtype, shape


def _read_array(archive, info, refuse):
    name = info.filename[:-len('.npy')]
    try:
        with archive.open(info) as f:
            value = np.lib.format.read_array(f, allow_pickle=False)
            f.read(1)  # reaches the end of the entry, where its CRC is checked
    except Exception as e:  # as in _open_archive
        refuse(f'array {name} is corrupted: {type(e).__name__}: {e}')
    return value


def _finite(value):
    """All values finite, without a temporary array as large as the values."""
    return (value.size == 0 or value.dtype.kind not in 'fc'
            or bool(np.isfinite(value.min()) and np.isfinite(value.max())))
