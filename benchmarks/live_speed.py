"""Live-session scoring speed: SessionRecommender.update / update_many against predict_next_batch fed
the same click stream, and the memory of 1M live sessions.

    python benchmarks/live_speed.py --model /tmp/yc64.gru4rec --data yoochoose1_64_test
    python benchmarks/live_speed.py --synthetic 1000000
    python benchmarks/live_speed.py --model /tmp/yc64.gru4rec --memory 1000000
    python benchmarks/live_speed.py --model /tmp/yc64.gru4rec --memory 100000 --state-store redis://127.0.0.1:6379/0

Both sides return the exact top 20 of every click (predict_next_batch's scores are ranked with
argpartition, as a caller would; the item index of large catalogues is measured by catalog_scale.py).
The stream runs `batch` sessions side by side in slots, a slot
taking the next session when its session ends (with batch 1: one session after another). Every
figure is measured for at most --events events and --seconds seconds per configuration.
"""
import argparse
import os
import time

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # one BLAS thread per process (see benchmarks/README.md)

import numpy as np
import pandas as pd

from common import load_log  # noqa: F401 - puts the repository root on sys.path
from gru4rec import GRU4Rec
from live import SessionRecommender, top_k


def random_model(n_items, layers=100, seed=0):
    """A GRU4Rec with random weights over item ids 0..n_items-1 (constrained embedding, softmax),
    ready to predict and to serve, without a training run."""
    rng = np.random.default_rng(seed)
    model = GRU4Rec(loss='cross-entropy', final_act='softmax', layers=[layers], constrained_embedding=True,
                    n_sample=0, batch_size=2, verbose=False)
    s = np.float32(np.sqrt(6 / (n_items + layers)))
    # The attributes that fit (or loadmodel) leaves on a trained model.
    model.itemidmap = pd.Index(np.arange(n_items))
    model.support = np.ones(n_items)
    model.history_, model.opt_values = [], {}
    model.weights = {'Wy': rng.uniform(-s, s, (n_items, layers)).astype(np.float32),
                     'By': np.zeros(n_items, dtype=np.float32),
                     'Wx0': rng.uniform(-0.1, 0.1, (layers, 3 * layers)).astype(np.float32),
                     'Wrz0': rng.uniform(-0.1, 0.1, (layers, 2 * layers)).astype(np.float32),
                     'Wh0': rng.uniform(-0.1, 0.1, (layers, layers)).astype(np.float32),
                     'Bh0': np.zeros(3 * layers, dtype=np.float32)}
    return model


def slot_stream(items, offsets, batch, n_steps):
    """Up to n_steps steps of `batch` slots: (session ids, item ids) per step, every slot active."""
    n_sessions = len(offsets) - 1
    session = np.arange(batch)
    position = offsets[session].copy()
    next_session = batch
    for _ in range(n_steps):
        yield session.copy(), items[position]
        position += 1
        done = np.flatnonzero(position >= offsets[session + 1])
        if next_session + len(done) > n_sessions:
            return
        session[done] = np.arange(next_session, next_session + len(done))
        position[done] = offsets[session[done]]
        next_session += len(done)


def timed(calls, seconds):
    """Per-call wall times of the calls (a generator of thunks), stopping after `seconds`."""
    times, start = [], time.perf_counter()
    for call in calls:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if t0 - start > seconds:
            break
    return np.array(times)


def run_speed(model, items, offsets, args):
    print(f'{"batch":>5} {"method":<22} {"events":>7} {"events/s":>10} {"us/event":>9} '
          f'{"call p50 ms":>11} {"call p99 ms":>11}')
    for batch in args.batch:
        n_steps = max(1, args.events // batch)
        live = SessionRecommender(model, capacity=max(1000, 4 * batch), index='exact')
        if batch == 1:
            run_live = (lambda s=s, i=i: live.update(int(s[0]), i[0], k=20)
                        for s, i in slot_stream(items, offsets, 1, n_steps))
            name = 'update'
        else:
            run_live = (lambda s=s, i=i: live.update_many(s.tolist(), i.tolist(), k=20)
                        for s, i in slot_stream(items, offsets, batch, n_steps))
            name = 'update_many'

        def predict(s, i):
            scores = model.predict_next_batch(s, i, batch=batch).to_numpy().T  # batch x n_items
            return model.itemidmap[top_k(scores, 20).ravel()]
        model.predict_next_batch(np.arange(batch), items[:batch], batch=batch)  # compile outside the timing
        run_pnb = (lambda s=s, i=i: predict(s, i) for s, i in slot_stream(items, offsets, batch, n_steps))
        for method, calls in ((name, run_live), ('predict_next_batch', run_pnb)):
            t = timed(calls, args.seconds)
            n = len(t) * batch
            print(f'{batch:>5} {method:<22} {n:>7} {n / t.sum():>10.0f} {1e6 * t.sum() / n:>9.1f} '
                  f'{1e3 * np.median(t):>11.3f} {1e3 * np.quantile(t, 0.99):>11.3f}', flush=True)


def run_interleaved(model, log, args):
    """Clicks in time order across sessions, one at a time, top 20 each. predict_next_batch's slot
    holds one session, so a click of a session other than the slot's last one replays the session's
    clicks so far (the only way to get its state back); update reads the stored state."""
    log = log.sort_values('Time', kind='stable')
    clicks = list(zip(log.SessionId.tolist(), log.ItemId.tolist()))[:args.events]
    live = SessionRecommender(model, capacity=100_000, index='exact')
    history, slot = {}, {'session': None, 'token': None}

    def predict(s, i):
        history.setdefault(s, []).append(i)
        if slot['session'] != s:  # a new token resets the slot, then the session's clicks are replayed
            slot['session'], slot['token'] = s, f'{s}/{len(history[s])}'
            replay = history[s]
        else:
            replay = history[s][-1:]
        for item in replay:
            scores = model.predict_next_batch(np.array([slot['token']]), np.array([item]), batch=1)
        return model.itemidmap[top_k(scores.to_numpy().T, 20).ravel()]
    model.predict_next_batch(np.array(['warm-up']), log.ItemId.to_numpy()[:1], batch=1)
    print(f'interleaved stream: {len(clicks)} clicks of {len({s for s, _ in clicks})} sessions in time order')
    for method, calls in (('update', (lambda s=s, i=i: live.update(s, i, k=20) for s, i in clicks)),
                          ('predict_next_batch', (lambda s=s, i=i: predict(s, i) for s, i in clicks))):
        t = timed(calls, args.seconds)
        print(f'{1:>5} {method:<22} {len(t):>7} {len(t) / t.sum():>10.0f} {1e6 * t.mean():>9.1f} '
              f'{1e3 * np.median(t):>11.3f} {1e3 * np.quantile(t, 0.99):>11.3f}', flush=True)


def rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def run_memory(model, n_sessions, state_store=None):
    """The memory of n_sessions live sessions: this process's resident memory, or with a Redis state
    store, Redis's used_memory (Redis's own count, with its keys, TTLs and allocator overhead)."""
    if state_store:
        import redis
        client = redis.Redis.from_url(state_store)
        client.flushdb()
        measure = lambda: client.info('memory')['used_memory']  # noqa: E731
    else:
        measure = rss_bytes
    before = measure()
    live = SessionRecommender(model, capacity=n_sessions, idle_timeout=None if not state_store else 3600,
                              state_store=state_store, index='exact')
    rng = np.random.default_rng(0)
    ids = np.asarray(model.itemidmap)
    t0 = time.perf_counter()
    for first in range(0, n_sessions, 10000):
        sessions = list(range(first, min(first + 10000, n_sessions)))
        live.update_many(sessions, ids[rng.integers(len(ids), size=len(sessions))].tolist(), k=0)
    seconds = time.perf_counter() - t0
    used = measure() - before
    where = 'in Redis' if state_store else 'resident'
    print(f'{len(live)} live sessions of a {model.layers}-unit model: {used / 2**20:.0f} MiB {where} '
          f'({used / len(live):.0f} bytes/session; {live.bytes_per_session} of state), filled in {seconds:.1f} s')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', help='a model file (GRU4Rec.savemodel)')
    parser.add_argument('--data', default='yoochoose1_64_test', help='click stream for --model (default %(default)s)')
    parser.add_argument('--synthetic', type=int, help='a random-weight model with this many items instead')
    parser.add_argument('--batch', type=int, nargs='+', default=[1, 16, 256])
    parser.add_argument('--events', type=int, default=5000, help='at most this many events per configuration')
    parser.add_argument('--seconds', type=float, default=10, help='at most about this long per configuration')
    parser.add_argument('--interleaved', action='store_true',
                        help='instead: clicks in time order across sessions, batch 1 (see run_interleaved)')
    parser.add_argument('--memory', type=int, help='instead: the memory of this many live sessions')
    parser.add_argument('--state-store', help='with --memory: keep them in this Redis (redis://...; its db is emptied)')
    args = parser.parse_args()
    if args.synthetic:
        model = random_model(args.synthetic)
        from synthetic import generate_sessions
        log = generate_sessions(max(args.events * 2, 100000), args.synthetic, seed=1)
    else:
        model = GRU4Rec.loadmodel(args.model)
        log = load_log(args.data)
    if args.memory:
        return run_memory(model, args.memory, args.state_store)
    log = log[log.ItemId.isin(model.itemidmap)].sort_values(['SessionId', 'Time'], kind='stable')
    sessions = log.SessionId.to_numpy()
    offsets = np.r_[0, np.flatnonzero(sessions[1:] != sessions[:-1]) + 1, len(sessions)]
    print(f'{model.n_items} items, layers {model.layers}, final_act {model.final_act}; '
          f'{len(offsets) - 1} sessions, {len(log)} events in the stream')
    if args.interleaved:
        return run_interleaved(model, log, args)
    run_speed(model, log.ItemId.to_numpy(), offsets, args)


if __name__ == '__main__':
    main()
