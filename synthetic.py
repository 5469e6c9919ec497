"""Synthetic session logs with the shape of real click data, for benchmarks and for trying GRU4Rec
without a data set.

Items have Zipf-like popularity, session lengths are geometric (at least two events, as after the
usual preprocessing), and a session moves through items in a Markov-like way: each item has a few
typical successors that the next click follows with probability `p_follow`, otherwise the next click
is a popularity draw. A sequence model therefore has something to learn beyond popularity. Generation
is vectorised over sessions (one numpy pass per position in a session), so tens of millions of events
take seconds.
"""
import numpy as np
import pandas as pd


def generate_sessions(n_events, n_items, seed=0, mean_length=4.0, zipf_exponent=1.0, n_successors=8,
                      p_follow=0.6, session_key='SessionId', item_key='ItemId', time_key='Time'):
    """A session log of about `n_events` events (exactly n_events, the last session cut to fit) over
    item ids 1..n_items, sorted by session then time.

    mean_length: mean events per session (geometric, at least 2). zipf_exponent: popularity of the
    item of popularity rank r is proportional to r^-zipf_exponent. n_successors, p_follow: each item's
    number of typical next items, and how often the next click is one of them. Returns a DataFrame with
    integer session ids (in time order), item ids and unix-second timestamps. Same seed, same log.
    """
    if n_events < 2 or n_items < 2:
        raise ValueError('generate_sessions needs n_events >= 2 and n_items >= 2')
    if mean_length <= 2:
        raise ValueError('mean_length must be above 2 (sessions have at least two events)')
    rng = np.random.default_rng(seed)

    # Popularity: rank r has weight r^-s; item ids are shuffled so that popularity is not the id order.
    weights = np.arange(1, n_items + 1, dtype=np.float64) ** -zipf_exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    item_of_rank = rng.permutation(n_items).astype(np.int64) + 1

    def popular(size):
        return np.minimum(np.searchsorted(cdf, rng.random(size), side='right'), n_items - 1)

    successors = popular((n_items, n_successors)).astype(np.int32)  # by rank

    # Session lengths: 2 + geometric, enough sessions to cover n_events.
    n_sessions = int(n_events / mean_length * 1.1) + 2
    lengths = 1 + rng.geometric(1.0 / (mean_length - 1), size=n_sessions)
    ends = np.cumsum(lengths)
    n_sessions = int(np.searchsorted(ends, n_events)) + 1
    lengths = lengths[:n_sessions]
    lengths[-1] -= ends[n_sessions - 1] - n_events
    if lengths[-1] < 2:  # too short to keep: give its events to the session before
        lengths[-2] += lengths[-1]
        lengths = lengths[:-1]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])

    # Walk all sessions one position at a time (the longest session sets the number of passes).
    ranks = np.empty(n_events, dtype=np.int32)
    ranks[offsets] = popular(len(offsets))
    active = np.arange(len(lengths))
    for position in range(1, int(lengths.max())):
        active = active[lengths[active] > position]
        previous = ranks[offsets[active] + position - 1]
        follow = rng.random(len(active)) < p_follow
        nxt = popular(len(active)).astype(np.int32)
        nxt[follow] = successors[previous[follow], rng.integers(n_successors, size=int(follow.sum()))]
        ranks[offsets[active] + position] = nxt

    # Times: sessions start in order over the days the log spans, clicks 5-120 s apart.
    n_sessions = len(lengths)
    starts = 1_400_000_000 + np.sort(rng.integers(0, max(86400, n_sessions * 10), size=n_sessions))
    session_of_event = np.repeat(np.arange(n_sessions), lengths)
    gaps = rng.integers(5, 121, size=n_events)
    gaps[offsets] = 0
    within = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[offsets], lengths)
    return pd.DataFrame({session_key: session_of_event + 1,
                         item_key: item_of_rank[ranks],
                         time_key: starts[session_of_event] + within})
