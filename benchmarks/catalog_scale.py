"""GRU4Rec on catalogues of 30k to 1M items: training, evaluation and live serving as the item count grows.

    python benchmarks/catalog_scale.py live --items 30000 300000 1000000 --model /tmp/yc64.gru4rec \
        /tmp/syn1m.gru4rec=synthetic:20000000:1000000:0
    python benchmarks/catalog_scale.py train --data synthetic:3000000:30000:0 synthetic:20000000:1000000:0
    python benchmarks/catalog_scale.py evaluate --items 30000 300000 1000000
    python benchmarks/catalog_scale.py model --data synthetic:20000000:1000000:0 --steps 20000 --out /tmp/syn1m.gru4rec

live: one click at a time (update, top 20), exactly and with each --index setting (itemindex.py),
clicks/s and per-click p50/p99, and the index's recall@20 against the exact top 20 on the
same clicks. Models: a random-weight model per --items count (benchmarks/live_speed.py's
random_model; its clicks a synthetic log's sessions) and each --model file with its --data clicks.
An index is built once per model and setting and kept in --index-dir ('load s': its build, or its read
by a later run).
train: benchmarks/train_speed.py on each --data log in turn, --rounds times interleaved (so that
a change in the machine's load hits every log alike), mini-batches/s each and its ratio to the first.
evaluate: evaluation.evaluate_gpu of a random-weight model over all items, events/s and peak memory.
model: trains a model on a synthetic log for its first --steps mini-batches, to measure `live` on
(--model): a random-weight model has no structure for an index to find (see benchmarks/README.md).
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # one BLAS thread per process (see benchmarks/README.md)
os.environ.setdefault('OMP_NUM_THREADS', '1')  # faiss's search of one click is single-threaded anyway

import numpy as np

from common import ROOT, load_log, peak_rss_mb

from gru4rec import GRU4Rec
import itemindex
from live import SessionRecommender
from live_speed import random_model


def click_stream(model, log, n_clicks):
    """The last n_clicks clicks of the log's sessions (known items), session after session: of a log
    that a model was trained on the first mini-batches of, clicks it did not see."""
    log = log[log.ItemId.isin(model.itemidmap)].sort_values(['SessionId', 'Time'], kind='stable').tail(n_clicks)
    return list(zip(log.SessionId.tolist(), log.ItemId.tolist()))


def time_clicks(live, clicks, seconds):
    """Per-click seconds of live.update over the clicks (at most about `seconds` in all), and the
    returned item ids."""
    times, results, start = [], [], time.perf_counter()
    for session, item in clicks:
        t0 = time.perf_counter()
        ids, _ = live.update(session, item, k=20)
        times.append(time.perf_counter() - t0)
        results.append(ids)
        if t0 - start > seconds:
            break
    return np.array(times), results


def index_setting(text):
    """'ivf' or 'hnsw', optionally with hyper-parameters: 'ivf:n_probe=128',
    'hnsw:ef_search=320,metric=inner_product'."""
    kind, _, params = text.partition(':')
    kwargs = dict(pair.split('=') for pair in filter(None, params.split(',')))
    kwargs = {k: v if k == 'metric' else int(v) for k, v in kwargs.items()}
    return {'ivf': itemindex.IVF, 'hnsw': itemindex.HNSW}[kind](**kwargs)


def row(name, n_items, method, t, extra=''):
    print(f'{name:<22} {n_items:>9,} {method:<52} {len(t):>6} {len(t) / t.sum():>9.0f} '
          f'{1e3 * np.median(t):>8.3f} {1e3 * np.quantile(t, 0.99):>8.3f}{extra}', flush=True)


def run_live(name, model, clicks, args):
    exact = SessionRecommender(model, index='exact', capacity=100_000)
    t_exact, top_exact = time_clicks(exact, clicks, args.seconds)
    row(name, model.n_items, 'exact', t_exact)
    for text in args.index:
        setting = index_setting(text)
        t0 = time.perf_counter()
        structure = '-'.join(f'{k}={v}' for k, v in setting.get_params().items() if k not in setting.SEARCH_PARAMS)
        indexed = SessionRecommender(model, index=setting, capacity=100_000,  # settings that differ in search only
                                     index_file=Path(args.index_dir) / f'{name}-{structure}.index')  # share one
        build = time.perf_counter() - t0  # or the read of an index built by an earlier run
        t_index, top_index = time_clicks(indexed, clicks[:len(t_exact)], args.seconds * 10)
        n = min(len(t_exact), len(t_index))
        recall = np.mean([len(np.intersect1d(a, b)) / max(len(a), 1) for a, b in zip(top_exact[:n], top_index[:n])])
        row(name, model.n_items, repr(setting).replace("metric='euclidean', ", '').replace("'", ''), t_index,
            f' {recall:>9.4f} {build:>7.1f}')


def live(args):
    Path(args.index_dir).mkdir(parents=True, exist_ok=True)
    print(f'{"model":<22} {"items":>9} {"top 20":<52} {"clicks":>6} {"clicks/s":>9} {"p50 ms":>8} {"p99 ms":>8} '
          f'{"recall@20":>9} {"load s":>7}')
    from synthetic import generate_sessions
    for n_items in args.items:
        model = random_model(n_items)
        log = generate_sessions(4 * args.clicks, n_items, seed=1)
        log['ItemId'] -= 1  # random_model's ids are 0..n_items-1
        run_live(f'random-{n_items}', model, click_stream(model, log, args.clicks), args)
    for spec in args.model or []:
        path, _, data = spec.partition('=')
        model = GRU4Rec.loadmodel(path)
        run_live(Path(path).stem, model, click_stream(model, load_log(data or args.data), args.clicks), args)


def train(args):
    """train_speed.py on each log in turn, args.rounds times: mini-batches/s and the ratio to the first log."""
    speeds = {spec: [] for spec in args.data}
    for round_ in range(args.rounds):
        for spec in args.data:
            out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'train_speed.py'), '--data', spec,
                                  '-ps', args.params, '--steps', str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout
            speed = float(re.search(r'speed: ([\d.]+) mini-batches/s', out).group(1))
            items = re.search(r'events, ([\d,]+) items', out).group(1)
            speeds[spec].append(speed)
            print(f'round {round_ + 1} {spec:<32} {items:>9} items {speed:8.1f} mini-batches/s', flush=True)
    base = np.median(speeds[args.data[0]])
    for spec, s in speeds.items():
        print(f'{spec:<32} median {np.median(s):8.1f} mini-batches/s ({np.median(s) / base:.2f} of the first)')


def evaluate(args):
    from evaluation import evaluate_gpu
    from synthetic import generate_sessions
    print(f'{"items":>9} {"events":>7} {"events/s":>9} {"peak RSS MiB":>12} {"recall@20":>9}')
    for n_items in args.items:
        model = random_model(n_items)
        test = generate_sessions(args.events, n_items, seed=2)
        test['ItemId'] -= 1
        evaluate_gpu(model, test.head(200), batch_size=args.batch)  # compiles outside the timing
        t0 = time.perf_counter()
        recall, _ = evaluate_gpu(model, test, batch_size=args.batch)
        seconds = time.perf_counter() - t0
        print(f'{n_items:>9,} {len(test):>7,} {len(test) / seconds:>9.0f} {peak_rss_mb():>12,.0f} '
              f'{recall[20]:>9.4f}', flush=True)


def make_model(args):
    """A model of a synthetic catalogue, trained for its first --steps mini-batches (as train_speed.py
    does): the popular items trained, the rare ones as initialised, as in a real shop's first epoch."""
    import gru4rec
    from common import read_params
    from sessions import first_steps
    data = load_log(args.data)
    blocks = gru4rec.session_parallel_blocks
    gru4rec.session_parallel_blocks = lambda *a, **kw: first_steps(blocks(*a, **kw), args.steps)
    model = GRU4Rec()
    model.set_params(**dict(read_params(args), n_epochs=1, verbose=False))
    t0 = time.perf_counter()
    model.fit(data)
    model.savemodel(args.out)
    print(f'{args.out}: {model.n_items:,} items, {args.steps} mini-batches in {time.perf_counter() - t0:.0f} s')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='what', required=True)
    p = sub.add_parser('live')
    p.add_argument('--items', type=int, nargs='*', default=[30_000, 300_000, 1_000_000])
    p.add_argument('--model', nargs='*', help='model files (GRU4Rec.savemodel) to measure too, as PATH or PATH=DATA '
                                              '(its clicks: a data set name or synthetic:EVENTS:ITEMS:SEED)')
    p.add_argument('--data', default='yoochoose1_64_test', help="the --model files' clicks (default %(default)s)")
    p.add_argument('--clicks', type=int, default=2000, help='clicks per model (default %(default)s)')
    p.add_argument('--seconds', type=float, default=30, help='at most about this long for the exact clicks')
    p.add_argument('--index', nargs='+', default=['ivf'],
                   help='index settings to measure: ivf or hnsw, e.g. ivf:n_probe=128 '
                        'hnsw:ef_search=320,metric=inner_product')
    p.add_argument('--index-dir', default='/tmp/gru4rec-catalog-scale', help='where the built indexes are kept')
    p = sub.add_parser('train')
    p.add_argument('--data', nargs='+', default=['synthetic:3000000:30000:0', 'synthetic:20000000:1000000:0'])
    p.add_argument('-ps', '--params', default='rsc15_xe_shared_100_best')
    p.add_argument('--steps', type=int, default=2000)
    p.add_argument('--rounds', type=int, default=2)
    p = sub.add_parser('evaluate')
    p.add_argument('--items', type=int, nargs='*', default=[30_000, 300_000, 1_000_000])
    p.add_argument('--events', type=int, default=20_000)
    p.add_argument('--batch', type=int, default=64)
    p = sub.add_parser('model')
    p.add_argument('--data', default='synthetic:20000000:1000000:0')
    p.add_argument('-ps', '--params', default='rsc15_xe_shared_100_best')
    p.add_argument('-pf', '--paramfile')
    p.add_argument('--backend')
    p.add_argument('--steps', type=int, default=20000)
    p.add_argument('--out', required=True)
    args = parser.parse_args()
    {'live': live, 'train': train, 'evaluate': evaluate, 'model': make_model}[args.what](args)


if __name__ == '__main__':
    main()
