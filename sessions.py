"""Session logs: input checks, sorting, the arrays training and evaluation read, and session-parallel
mini-batches (ICLR 2016, section 3.1.1). Used by the model, the evaluation and the baselines.

A log is a DataFrame with session, item and time columns. It is never modified: a sorted or trimmed
copy is made when needed.
"""
import numba
import numpy as np
import pandas as pd

FLOAT = 'float32'
# session_parallel_blocks walks this many steps of an epoch at a time.
BLOCK_STEPS = 64


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
    when fewer than `min_slots` slots remain. The steps of session_parallel_blocks, one at a time.
    """
    for sizes, X, T, prev_rows, keep in session_parallel_blocks(items, offsets, session_order, batch_size,
                                                                 min_slots):
        ends = np.cumsum(sizes)
        for end, M in zip(ends.tolist(), sizes.tolist()):
            yield X[end - M:end], T[end - M:end], prev_rows[end - M:end], keep[end - M:end]


def session_parallel_blocks(items, offsets, session_order, batch_size, min_slots=1, block_steps=BLOCK_STEPS):
    """The steps of session_parallel_batches, up to block_steps at a time: yields (sizes, inputs, targets,
    prev_rows, keep), step j's M = sizes[j] entries of the other four following step j - 1's. A compiled loop
    walks the slots (_next_steps): sessions of a few events refill slots at nearly every step, and numpy's
    calls for each refill were most of the training loop's time on the host."""
    n_slots = min(int(batch_size), len(session_order))
    items = np.asarray(items).view()
    items.flags.writeable = False  # one compiled loop for the read-only arrays of a log and the writable others
    offsets = np.asarray(offsets, dtype=np.int64)
    order = np.asarray(session_order, dtype=np.int64)
    slots = np.zeros((4, max(n_slots, 1)), dtype=np.int64)  # each slot's session, start, end, prev_row
    slots[0, :n_slots] = np.arange(n_slots)
    slots[1, :n_slots] = offsets[order[:n_slots]]
    slots[2, :n_slots] = offsets[order[:n_slots] + 1]
    keep = np.zeros(max(n_slots, 1), dtype=FLOAT)
    # active slots, the next unused session, the step within the stretch (-1: before the first), its steps
    state = np.array([n_slots, n_slots, -1, 0], dtype=np.int64)
    while True:
        sizes = np.empty(block_steps, dtype=np.int64)
        X, T = np.empty(block_steps * n_slots, dtype=items.dtype), np.empty(block_steps * n_slots, dtype=items.dtype)
        P, K = np.empty(block_steps * n_slots, dtype=np.int32), np.empty(block_steps * n_slots, dtype=FLOAT)
        n = _next_steps(items, offsets, order, min_slots, state, slots, keep, sizes, X, T, P, K)
        if n:
            end = sizes[:n].sum()
            yield sizes[:n], X[:end], T[:end], P[:end], K[:end]
        if n < block_steps:
            return


def first_steps(blocks, n_steps):
    """The blocks of session_parallel_blocks up to their first n_steps steps (all of them when n_steps is None)."""
    for sizes, X, T, prev_rows, keep in blocks:
        if n_steps is not None:
            if n_steps <= 0:
                return
            sizes = sizes[:n_steps]
            n_steps -= len(sizes)
            end = sizes.sum()
            X, T, prev_rows, keep = X[:end], T[:end], prev_rows[:end], keep[:end]
        yield sizes, X, T, prev_rows, keep


@numba.njit(cache=True)
def _next_steps(items, offsets, order, min_slots, state, slots, keep, sizes, X, T, P, K):
    """Up to len(sizes) more steps of the epoch into sizes and X, T, P (prev_rows), K (keep); returns how many
    (fewer: the epoch ended). state and slots (see session_parallel_blocks) carry the walk between calls.

    Every slot steps through a stretch of as many steps as its shortest session has left; then finished slots
    take the unused sessions in order (keep 0) or, when none is left, are dropped, the others moving up (the
    state rows they carry, prev_rows, move with them)."""
    n_alive, next_session, i, steps = state
    n, pos = 0, 0
    while n < len(sizes):
        if 0 <= i < steps:
            for s in range(n_alive):
                X[pos + s] = items[slots[1, s] + i]
                T[pos + s] = items[slots[1, s] + i + 1]
                P[pos + s] = slots[3, s]
                K[pos + s] = keep[s]
            sizes[n] = n_alive
            pos += n_alive
            n += 1
            if i == 0:  # from the stretch's second step on each slot carries its own row
                for s in range(n_alive):
                    slots[3, s], keep[s] = s, 1
            i += 1
            continue
        if i >= 0:  # the stretch is over: refill or drop the finished slots
            alive = 0
            for s in range(n_alive):
                slots[1, s] += steps
                if slots[2, s] - slots[1, s] <= 1:
                    if next_session == len(order):
                        continue
                    slots[0, s], slots[1, s] = next_session, offsets[order[next_session]]
                    slots[2, s], keep[s] = offsets[order[next_session] + 1], 0
                    next_session += 1
                for r in range(4):
                    slots[r, alive] = slots[r, s]
                keep[alive] = keep[s]
                alive += 1
            n_alive = alive
        if n_alive < min_slots:
            break
        steps = slots[2, 0] - slots[1, 0]
        for s in range(1, n_alive):
            steps = min(steps, slots[2, s] - slots[1, s])
        steps, i = steps - 1, 0
    state[0], state[1], state[2], state[3] = n_alive, next_session, i, steps
    return n


def pad(values, size, fill):
    """values (a vector) extended to `size` entries with `fill`."""
    padded = np.full(size, fill, dtype=values.dtype)
    padded[:len(values)] = values
    return padded
