"""synthetic.generate_sessions: a session log in the training format, reproducible, with structure."""
import numpy as np
import pytest

from synthetic import generate_sessions


def test_log_format_and_reproducibility():
    log = generate_sessions(20000, 500, seed=3)
    assert list(log.columns) == ['SessionId', 'ItemId', 'Time'] and len(log) == 20000
    assert log.equals(generate_sessions(20000, 500, seed=3))
    assert not log.equals(generate_sessions(20000, 500, seed=4))
    lengths = log.groupby('SessionId').size()
    assert lengths.min() >= 2 and 3 < lengths.mean() < 5
    assert log['ItemId'].between(1, 500).all()
    same = (log['SessionId'].diff() == 0).to_numpy()
    assert (np.diff(log['SessionId'].to_numpy()) >= 0).all()
    assert (np.diff(log['Time'].to_numpy())[same[1:]] > 0).all()
    starts = log.groupby('SessionId')['Time'].first().to_numpy()
    assert (np.diff(starts) >= 0).all()  # sessions are numbered in time order


def test_popularity_is_skewed_and_transitions_repeat():
    log = generate_sessions(50000, 2000, seed=0)
    counts = log['ItemId'].value_counts().to_numpy()
    assert counts[:20].sum() > 0.2 * len(log)  # Zipf head
    pairs = log.assign(Next=log.groupby('SessionId')['ItemId'].shift(-1)).dropna()
    top_share = pairs.groupby('ItemId')['Next'].agg(lambda s: s.value_counts().iloc[0] / len(s))
    assert top_share[pairs['ItemId'].value_counts().index[:50]].mean() > 0.1  # typical successors


def test_rejects_degenerate_sizes():
    with pytest.raises(ValueError):
        generate_sessions(1, 10)
    with pytest.raises(ValueError):
        generate_sessions(100, 10, mean_length=2)
