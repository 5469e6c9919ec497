"""Session logs: input checks, sorting, the arrays training and evaluation read, and session-parallel
mini-batches (ICLR 2016, section 3.1.1). Used by the model, the evaluation and the baselines.

A log is a DataFrame with session, item and time columns. It is never modified: a sorted or trimmed
copy is made when needed.
"""
import numpy as np
import pandas as pd

FLOAT = 'float32'


def validate_log(data, session_key, item_key, time_key, what='data'):
    """Checks a session log and returns it (never modified; a new frame when columns are dropped)."""
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f'{what} must be a pandas DataFrame, got {type(data).__name__}')
    missing = [k for k in (session_key, item_key, time_key) if k not in data.columns]
    if missing:
        raise ValueError(f'{what} has no column(s) {missing} (it has {list(data.columns)}); '
                         'rename them or set session_key / item_key / time_key')
    repeated = [k for k in (session_key, item_key, time_key) if (data.columns == k).sum() > 1]
    if repeated:
        raise ValueError(f'{what} has more than one column named {repeated}')
    if len(data) == 0:
        raise ValueError(f'{what} is empty')
    for key in (session_key, item_key, time_key):
        n_null = int(data[key].isna().sum())
        if n_null:
            raise ValueError(f'{what}: column {key!r} has {n_null} missing (NaN/None) value(s); drop or fill them')
    types = {type(v) for v in data[item_key].to_numpy()[:100000]}
    if len({t for t in types if not issubclass(t, (int, np.integer))}) and \
            len({t for t in types if issubclass(t, (int, np.integer))}):
        names = sorted(t.__name__ for t in types)
        raise ValueError(f'{what}: column {item_key!r} mixes integer and non-integer ids ({names}); '
                         'convert them to one type')
    times = data[time_key]
    if pd.api.types.is_complex_dtype(times) or not (pd.api.types.is_numeric_dtype(times)
                                                    or pd.api.types.is_datetime64_any_dtype(times)):
        raise ValueError(f'{what}: column {time_key!r} must be numeric or datetime, got {times.dtype}')
    return data[[session_key, item_key, time_key]]


def session_arrays(data, itemidmap, session_key, item_key, time_key, time_sort=True, what='data'):
    """Checks a session log and returns (item indices, session offsets, session order) without
    touching the caller's DataFrame. Events of items not in `itemidmap` are dropped.

    offsets[s]:offsets[s+1] are session s's events; sessions are ordered by their first event's
    time (time_sort) or by session id."""
    data = sort_log(validate_log(data, session_key, item_key, time_key, what), session_key, time_key)
    item_idx = pd.Series(np.arange(len(itemidmap), dtype=np.int32), index=itemidmap)
    mapped = data[item_key].map(item_idx)
    known = mapped.notna().to_numpy()
    if not known.any():
        raise ValueError(f'{what} has no event of an item the model knows (none of its {item_key!r} values '
                         'is in the training item map)')
    items = mapped[known].to_numpy(dtype=np.int32)
    sessions = data[session_key].to_numpy()[known]
    boundaries = np.flatnonzero(sessions[1:] != sessions[:-1]) + 1
    offsets = np.concatenate([[0], boundaries, [len(sessions)]]).astype(np.int64)
    if time_sort:
        order = np.argsort(data[time_key].to_numpy()[known][offsets[:-1]], kind='stable')
    else:
        order = np.argsort(sessions[offsets[:-1]], kind='stable')
    return items, offsets, order


def sort_log(data, session_key, time_key):
    """Sorts by session then time, only if needed, without modifying the input."""
    sessions = data[session_key].to_numpy()
    times = data[time_key].to_numpy()
    same = sessions[1:] == sessions[:-1]
    contiguous = len(same) - same.sum() + 1 == data[session_key].nunique()
    if contiguous and (times[1:][same] >= times[:-1][same]).all():
        return data
    return data.sort_values([session_key, time_key], kind='stable')


def session_parallel_batches(items, offsets, session_order, batch_size, min_slots=1):
    """Yields (inputs, targets, prev_rows, keep) for every step of one epoch.

    items: item indices of all events, sorted by session then time; offsets: start of each session in
    `items` (length n_sessions + 1); session_order: the order in which sessions enter the slots.
    Each of the M active slots feeds its session's current item (inputs) and is trained to predict
    the next one (targets). Row i of the previous step's hidden state to carry into slot i is
    prev_rows[i]; keep[i] is 0 where slot i took a new session (its state is reset to zero).
    When no unused session is left, finished slots are dropped and the batch shrinks; the epoch ends
    when fewer than `min_slots` slots remain.
    """
    n_sessions = len(session_order)
    n_slots = min(batch_size, n_sessions)
    slot_session = np.arange(n_slots)  # position in session_order of each slot's session
    next_session = n_slots
    start = offsets[session_order[slot_session]]
    end = offsets[session_order[slot_session] + 1]
    prev_rows = np.zeros(n_slots, dtype=np.int32)  # any existing row: keep = 0 zeroes the state
    keep = np.zeros(n_slots, dtype=FLOAT)
    while len(slot_session) >= min_slots:
        steps = (end - start).min() - 1
        for i in range(steps):
            yield items[start + i], items[start + i + 1], prev_rows, keep
            if i == 0:
                prev_rows, keep = np.arange(len(start), dtype=np.int32), np.ones(len(start), dtype=FLOAT)
        start = start + steps
        finished = end - start <= 1
        n_finished = int(finished.sum())
        n_new = min(n_finished, n_sessions - next_session)
        refill = np.flatnonzero(finished)[:n_new]
        alive = ~finished
        alive[refill] = True
        slot_session[refill] = np.arange(next_session, next_session + n_new)
        next_session += n_new
        start[refill] = offsets[session_order[slot_session[refill]]]
        end[refill] = offsets[session_order[slot_session[refill]] + 1]
        # Composed with the mapping still pending when no step ran (a slot held a one-event session).
        keep = keep.copy()
        keep[refill] = 0
        prev_rows, keep = prev_rows[alive], keep[alive]
        slot_session, start, end = slot_session[alive], start[alive], end[alive]


def pad(values, size, fill):
    """values (a vector) extended to `size` entries with `fill`."""
    padded = np.full(size, fill, dtype=values.dtype)
    padded[:len(values)] = values
    return padded
