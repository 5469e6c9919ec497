"""Session-parallel mini-batches (SPEC section 3): every (input, next item) pair of every session once
per epoch, and each slot's state carried exactly within its session.

Event e has item id e, so an item identifies its event, and a slot's state is modelled as the tuple of
events it has read: carried through prev_rows / keep exactly as the training graph does with H.
"""
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sessions import first_steps, session_parallel_batches, session_parallel_blocks
from training import distinct_rows, pack_inputs, pack_steps


def run_epoch(lengths, order, batch_size, min_slots=1):
    """Checks the state carried into every step; returns the (input, target) pairs fed."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    session_of = np.repeat(np.arange(len(lengths)), lengths)
    state = [()] * batch_size  # the hidden state starts as batch_size zero rows
    pairs, entered = [], []
    for X, T, prev_rows, keep in session_parallel_batches(np.arange(offsets[-1]), offsets, np.asarray(order),
                                                          batch_size, min_slots):
        assert len(X) == len(T) == len(prev_rows) == len(keep) >= min_slots
        assert set(np.unique(keep)) <= {0, 1}
        assert ((0 <= prev_rows) & (prev_rows < len(state))).all()
        new_state = []
        for x, t, row, k in zip(X, T, prev_rows, keep):
            carried = state[row] if k else ()
            s = session_of[x]
            # The carried state holds exactly the session's events before x: nothing from an earlier
            # session (reset at the boundary) and nothing of this session lost (carried within it).
            assert carried == tuple(range(offsets[s], x)), (x, carried)
            assert t == x + 1 and session_of[t] == s
            if not carried:
                entered.append(s)
            new_state.append(carried + (x,))
            pairs.append((x, t))
        state = new_state
    return pairs, entered, offsets


def all_pairs(lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [(e, e + 1) for s in range(len(lengths)) for e in range(offsets[s], offsets[s + 1] - 1)]


LENGTHS = [2, 5, 3, 2, 4, 6, 2, 3]
ORDER = [3, 0, 7, 1, 5, 2, 6, 4]


@pytest.mark.parametrize('batch_size', [1, 2, 3, len(LENGTHS), 20])
def test_every_pair_once_and_state_carried_within_sessions(batch_size):
    pairs, entered, _ = run_epoch(LENGTHS, ORDER, batch_size)
    assert Counter(pairs) == Counter(all_pairs(LENGTHS))
    assert entered == ORDER  # slots take the unused sessions in the given order


def splitmix64_upper(seed, n):
    """The upper 32 bits of SplitMix64's first n outputs from seed (Steele, Lea and Flood 2014), in numpy."""
    with np.errstate(over='ignore'):
        z = np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) >> np.uint64(32)


@pytest.mark.parametrize('p', [0.05, 0.3, 0.5, 0.9])
def test_dropout_masks_keep_each_entry_with_its_probability(p):
    """Over 200,000 entries of a mask (B = 4, no samples) the kept share is 1 - p within five standard errors,
    a kept entry's neighbour is kept as often as any entry (no correlation along the mask), and another step's
    seed draws another mask."""
    n, B = 200_000, 4
    zeros = np.zeros(B, dtype=np.int32)
    args = (zeros, zeros, zeros, np.zeros(B, dtype=np.float32), np.zeros(0, dtype=np.int32))
    rest = (np.array([n]), np.array([1 - p]), B, False, np.zeros(2, dtype=np.int32), 1)
    kept = pack_inputs(*args, np.uint64(7), *rest)[1][2 * B:] > 0
    other = pack_inputs(*args, np.uint64(8), *rest)[1][2 * B:] > 0
    error = np.sqrt(p * (1 - p) / n)
    assert abs(kept.mean() - (1 - p)) < 5 * error
    assert abs(kept[1:][kept[:-1]].mean() - (1 - p)) < 5 * error / np.sqrt(1 - p)
    assert (kept != other).mean() > 0.5 * 2 * p * (1 - p)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(2, 7), min_size=1, max_size=15), batch_size=st.integers(1, 18),
       seed=st.integers(0, 1000))
def test_every_pair_once_for_any_sessions(lengths, batch_size, seed):
    order = list(np.random.default_rng(seed).permutation(len(lengths)))
    pairs, entered, _ = run_epoch(lengths, order, batch_size)
    assert Counter(pairs) == Counter(all_pairs(lengths))
    assert entered == order


@pytest.mark.parametrize('batch_size', [2, 3, 20])
def test_min_slots_stops_when_one_slot_is_left(batch_size):
    """Without extra samples a single row has no negatives: the epoch ends when one slot is left, and
    only the tail of that last session goes untrained."""
    pairs, _, offsets = run_epoch(LENGTHS, ORDER, batch_size, min_slots=2)
    assert len(set(pairs)) == len(pairs)
    missing = sorted(set(all_pairs(LENGTHS)) - set(pairs))
    assert missing, 'the sessions do not end together, so the last one has an untrained tail'
    last = np.searchsorted(offsets, missing[0][0], side='right') - 1
    assert missing == [(e, e + 1) for e in range(missing[0][0], offsets[last + 1] - 1)]


@pytest.mark.parametrize('batch_size', [1, 2, 3, 20])
def test_sessions_of_one_event_are_skipped_without_disturbing_other_slots(batch_size):
    """A session can be left with one event, e.g. in evaluation after unknown items are dropped."""
    lengths = [3, 1, 4, 2, 1, 5, 1, 2, 3]
    pairs, entered, _ = run_epoch(lengths, range(len(lengths)), batch_size)
    assert Counter(pairs) == Counter(all_pairs(lengths))
    assert sorted(entered) == [s for s, n in enumerate(lengths) if n > 1]


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=15), batch_size=st.integers(1, 18),
       seed=st.integers(0, 1000))
def test_every_pair_once_for_any_sessions_including_single_events(lengths, batch_size, seed):
    order = list(np.random.default_rng(seed).permutation(len(lengths)))
    pairs, entered, _ = run_epoch(lengths, order, batch_size)
    assert Counter(pairs) == Counter(all_pairs(lengths))
    assert sorted(entered) == sorted(s for s in order if lengths[s] > 1)


def steps_of(blocks):
    """The (inputs, targets, prev_rows, keep) of each step of session_parallel_blocks' blocks."""
    steps = []
    for sizes, *arrays in blocks:
        assert len(sizes) and all(len(a) == sizes.sum() for a in arrays)
        ends = np.cumsum(sizes)
        steps += [tuple(a[end - M:end] for a in arrays) for end, M in zip(ends, sizes)]
    return steps


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 5), max_size=15), batch_size=st.integers(1, 18), min_slots=st.integers(1, 3),
       block_steps=st.integers(1, 7), seed=st.integers(0, 1000))
def test_blocks_of_any_size_are_the_same_steps(lengths, batch_size, min_slots, block_steps, seed):
    """session_parallel_blocks walks the epoch a block of steps at a time (full blocks but the last): the steps
    are the same for every block size, also with empty sessions, and first_steps keeps the first n of them."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.random.default_rng(seed).integers(0, 50, offsets[-1]).astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(lengths))
    one = steps_of(session_parallel_blocks(items, offsets, order, batch_size, min_slots, block_steps=1))
    blocks = list(session_parallel_blocks(items, offsets, order, batch_size, min_slots, block_steps=block_steps))
    assert all(len(sizes) == block_steps for sizes, *_ in blocks[:-1])
    for steps in (steps_of(blocks), list(session_parallel_batches(items, offsets, order, batch_size, min_slots))):
        assert len(steps) == len(one)
        for step, expected in zip(steps, one):
            for a, b in zip(step, expected):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b)
    n = len(one) // 2
    assert [len(X) for X, *_ in steps_of(first_steps(iter(blocks), n))] == [len(X) for X, *_ in one[:n]]
    assert len(steps_of(first_steps(iter(blocks), None))) == len(one)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 20), st.booleans(), st.integers(0, 2 ** 32 - 1))
def test_pack_steps_is_pack_inputs_of_each_step(B, n_steps, n_sample, constrained, seed):
    """A block of steps packed in one call (training.pack_steps): each row is the step's pack_inputs, with its
    row of samples and its seed."""
    rng = np.random.default_rng(seed)
    n_items = 25
    sizes = rng.integers(1, B + 1, n_steps)
    X, T = (rng.integers(0, n_items, sizes.sum()).astype(np.int32) for _ in range(2))
    prev_rows = rng.integers(0, B, sizes.sum()).astype(np.int32)
    keep = rng.integers(0, 2, sizes.sum()).astype(np.float32)
    samples = rng.integers(0, n_items, (n_steps, n_sample)).astype(np.int32)
    seeds = rng.integers(0, 2 ** 63, n_steps).astype(np.uint64)
    masks = (np.array([5, 9]), np.array([0.7, 0.4]))
    slot = np.zeros(n_items + 1, dtype=np.int32)
    ints, floats = pack_steps(sizes, X, T, prev_rows, keep, samples, seeds, *masks, B, constrained, slot, n_items)
    assert ints.shape[0] == floats.shape[0] == n_steps
    start = 0
    for j, M in enumerate(sizes):
        part = slice(start, start + M)
        expected = pack_inputs(X[part], T[part], prev_rows[part], keep[part], samples[j], seeds[j], *masks, B,
                               constrained, slot, n_items)
        np.testing.assert_array_equal(ints[j], expected[0])
        np.testing.assert_array_equal(floats[j], expected[1])
        start += M


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40), st.integers(0, 300), st.integers(1, 60), st.booleans(), st.integers(0, 2 ** 32 - 1))
def test_distinct_rows_lists_each_row_once_and_finds_every_read(B, n_sample, n_items, constrained, seed):
    """The rows a training step reads (see training.TrainingStep.inputs), against np.unique; the scratch slot
    array carries stale entries from the previous call, as it does between steps."""
    rng = np.random.default_rng(seed)
    X, T, samples = (rng.integers(0, n_items, n).astype(np.int32) for n in (B, B, n_sample))
    pad_item = n_items
    slot = rng.integers(-5, B + n_sample + B + 5, n_items + 1).astype(np.int32)
    rows_Y, inv_Y, rows_X, inv_X = distinct_rows(X, T, samples, constrained, slot, pad_item)
    Y = np.concatenate([T, samples])
    n_Y = len(np.unique(Y))
    assert sorted(rows_Y[:n_Y]) == list(np.unique(Y)) and (rows_Y[n_Y:] == pad_item).all()
    np.testing.assert_array_equal(rows_Y[inv_Y], Y)
    x_only = np.setdiff1d(X, Y) if constrained else np.unique(X)
    assert sorted(rows_X[:len(x_only)]) == list(x_only) and (rows_X[len(x_only):] == pad_item).all()
    table = np.concatenate([rows_Y, rows_X]) if constrained else rows_X
    np.testing.assert_array_equal(table[inv_X], X)
    assert len(rows_Y) == B + n_sample and len(rows_X) == B


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(0, 12), st.integers(0, 40), st.booleans(),
       st.lists(st.sampled_from([0.05, 0.3, 0.5, 0.9]), max_size=2), st.integers(0, 2 ** 32 - 1))
def test_pack_inputs_is_the_padded_batch_its_rows_and_dropout_masks(B, missing, n_sample, constrained, ps, seed):
    """The training step's two input vectors (training.pack_inputs) against numpy: the batch of M <= B
    sessions padded to B (inputs and targets read the pad item, padded slots carry row 0 and keep 0, and are
    inactive), the distinct rows of distinct_rows, and each dropout mask kept where the upper half of its entry's
    SplitMix64 draw (numpy's uint64 arithmetic here) is below (1 - p) 2^32, scaled by 1 / (1 - p) in float32
    (inverted dropout)."""
    M = max(1, B - missing)
    rng = np.random.default_rng(seed)
    n_items = 30
    X, T = (rng.integers(0, n_items, M).astype(np.int32) for _ in range(2))
    prev_rows, keep = rng.integers(0, B, M).astype(np.int32), rng.integers(0, 2, M).astype(np.float32)
    samples = rng.integers(0, n_items, n_sample).astype(np.int32)
    sizes = rng.integers(1, 50, len(ps))
    step_seed = np.uint64(rng.integers(0, 2 ** 63))
    ints, floats = pack_inputs(X, T, prev_rows, keep, samples, step_seed, sizes.astype(np.int64),
                               np.array([1 - p for p in ps]), B, constrained,
                               np.zeros(n_items + 1, dtype=np.int32), n_items)
    pad = np.full(B - M, n_items, dtype=np.int32)
    Xp, Tp = np.concatenate([X, pad]), np.concatenate([T, pad])
    rows = distinct_rows(Xp, Tp, samples, constrained, np.zeros(n_items + 1, dtype=np.int32), n_items)
    expected_ints = np.concatenate([Xp, Tp, prev_rows, np.zeros(B - M, np.int32), *rows])
    masks = [(d < np.uint64((1 - p) * 2 ** 32)) * np.float32(1 / (1 - p))
             for d, p in zip(np.split(splitmix64_upper(step_seed, int(sizes.sum())), np.cumsum(sizes)[:-1]), ps)]
    expected_floats = np.concatenate([keep, np.zeros(B - M), np.ones(M), np.zeros(B - M), *masks]).astype(np.float32)
    assert ints.dtype == np.int32 and floats.dtype == np.float32
    np.testing.assert_array_equal(ints, expected_ints)
    np.testing.assert_array_equal(floats, expected_floats)
