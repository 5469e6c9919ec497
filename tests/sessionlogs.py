"""A generated session log with something to learn, for the command-line, baseline and search tests."""
import numpy as np
import pandas as pd


def synthetic_log(n_sessions, n_items=40, seed=0, first_session=1, first_time=0.0):
    """Sessions of 2-7 events whose next item is mostly the current item id + 1 (so that there is
    something to learn), with ids starting at 1000 and times increasing along the log."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 8, size=n_sessions)
    items = []
    for length in lengths:
        item = rng.integers(n_items)
        for _ in range(length):
            items.append(item)
            item = (item + 1) % n_items if rng.random() < 0.8 else rng.integers(n_items)
    n = int(lengths.sum())
    return pd.DataFrame({'SessionId': np.repeat(np.arange(first_session, first_session + n_sessions), lengths),
                         'ItemId': np.asarray(items) + 1000,
                         'Time': first_time + np.arange(n, dtype=np.float64) * 10.0})
