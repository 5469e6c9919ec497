"""The sparse Adagrad step of a training step's item rows at 30k and 819k items, as the row layout varies.

    python benchmarks/row_layout.py

A training step updates about 2,080 distinct item rows (its targets and 2,048 samples drawn with
probability support^0.5) of the output weights, their Adagrad accumulator and their velocity
(cbackend.RowAdagrad). This times that update alone (a numba loop of the same arithmetic, without
RowAdagrad's prefetching) in thread CPU time per step, for three layouts of the rows, each against
the others in the same process, three rounds: three separate n x 100 matrices visited in the step's
order (as today), the same visited in ascending row order, and one n x 300 matrix holding each row's
weights, accumulator and velocity side by side (one memory stream per row instead of three).
Item popularity is Zipf (exponent 1, as synthetic.py's), item ids shuffled.
"""
import time

import numba
import numpy as np


@numba.njit
def three_arrays(w, acc, vel, rows, g):
    for i in range(len(rows)):
        r = rows[i]
        for j in range(w.shape[1]):
            a = acc[r, j] + g[i, j] * g[i, j]
            acc[r, j] = a
            vel[r, j] = np.float32(0.2) * vel[r, j] - np.float32(0.2) * g[i, j] / np.sqrt(a + np.float32(1e-6))
            w[r, j] += vel[r, j]


@numba.njit
def interleaved(wav, rows, g):
    L = g.shape[1]
    for i in range(len(rows)):
        r = rows[i]
        for j in range(L):
            a = wav[r, L + j] + g[i, j] * g[i, j]
            wav[r, L + j] = a
            v = np.float32(0.2) * wav[r, 2 * L + j] - np.float32(0.2) * g[i, j] / np.sqrt(a + np.float32(1e-6))
            wav[r, 2 * L + j] = v
            wav[r, j] += v


def step_rows(n_items, n_steps, rng):
    """The distinct sampled rows of n_steps steps, in first-appearance order (as training.distinct_rows)."""
    weights = np.arange(1, n_items + 1, dtype=np.float64) ** -1.0  # Zipf popularity by rank
    cdf = np.cumsum(weights ** 0.5)
    cdf /= cdf[-1]
    item_of_rank = rng.permutation(n_items)
    steps = []
    for _ in range(n_steps):
        drawn = item_of_rank[np.minimum(np.searchsorted(cdf, rng.random(2080)), n_items - 1)]
        _, first = np.unique(drawn, return_index=True)
        steps.append(drawn[np.sort(first)].astype(np.int64))
    return steps


def main():
    rng = np.random.default_rng(0)
    g = np.full((2080, 100), 0.01, dtype=np.float32)
    print(f'{"items":>9} {"layout":<28} ms per step (thread CPU), 3 rounds')
    for n_items in (30_000, 819_185):
        w, acc, vel = (np.ones((n_items, 100), dtype=np.float32) for _ in range(3))
        wav = np.ones((n_items, 300), dtype=np.float32)  # n x (weights | accumulator | velocity)
        steps = step_rows(n_items, 300, rng)
        ordered = [np.sort(s) for s in steps]
        layouts = {'three arrays, step order': lambda s, o: three_arrays(w, acc, vel, s, g),
                   'three arrays, ascending rows': lambda s, o: three_arrays(w, acc, vel, o, g),
                   'one interleaved array': lambda s, o: interleaved(wav, s, g)}
        times = {name: [] for name in layouts}
        for run in layouts.values():  # compile
            run(steps[0], ordered[0])
        for _ in range(3):
            for name, run in layouts.items():
                t0 = time.thread_time()
                for s, o in zip(steps, ordered):
                    run(s, o)
                times[name].append(1e3 * (time.thread_time() - t0) / len(steps))
        for name, t in times.items():
            print(f'{n_items:>9,} {name:<28} ' + ' '.join(f'{x:.3f}' for x in t), flush=True)


if __name__ == '__main__':
    main()
