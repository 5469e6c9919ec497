"""Retraining: carry the optimiser state and item supports over, or start them fresh as the original did?

Splits a training log in time, into halves A and B by session start (the median start), fits on A for
--epochs epochs, then retrains copies of that model on B for --epochs more: once with
retrain_state='carried' (Adagrad accumulators, momentum and the sampling supports of A kept) and once
with 'fresh' (all restarted, the supports B's alone: the original's retrain at hidasib/GRU4Rec 4b91663).
Prints Recall@20 and MRR@20 on the test log, overall (evaluate_gpu) and on the test events whose target
is an item new in B (from recommend's top 20), for every seed, then a mean +- sd table. --full also fits
a model on A+B for 2 * --epochs epochs (as many passes over each event of B), the reference the
retrained models are measured against.

    OMP_NUM_THREADS=1 python benchmarks/retrain_state.py --seeds 1 2 3
    OMP_NUM_THREADS=1 python benchmarks/retrain_state.py --data yoochoose1_64 --seeds 1 2 3
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESETS, load_log  # noqa: E402

from evaluation import evaluate_gpu  # noqa: E402
from gru4rec import RETRAIN_STATES, GRU4Rec  # noqa: E402



def new_item_targets(test, new_items):
    """{(session, position): the items before it} and {(session, position): target} for every test event
    whose target is a new item."""
    histories, targets = {}, {}
    for sid, session in test.groupby('SessionId'):
        items = session.ItemId.tolist()
        for i in range(1, len(items)):
            if items[i] in new_items:
                histories[(sid, i)], targets[(sid, i)] = items[:i], items[i]
    return histories, targets


def top20_metrics(model, histories, targets):
    """Recall@20 and MRR@20 of the targets in the model's top 20 for each history."""
    recs = model.recommend(histories, k=20)
    rank = {key: dict(zip(group.ItemId, group['rank'])).get(targets[key])
            for key, group in recs.groupby('SessionId', sort=False)}
    ranks = np.array([rank.get(key) or np.inf for key in targets], dtype=float)
    return np.mean(ranks <= 20), np.mean(np.where(ranks <= 20, 1 / ranks, 0))

def split_in_time(train):
    """Halves of a log by session start: A the sessions starting up to the median start, B the rest."""
    start = train.groupby('SessionId').Time.transform('min')
    cut = train.groupby('SessionId').Time.min().median()
    return train[start <= cut], train[start > cut]


def measure(model, test, histories, targets):
    recall, mrr = evaluate_gpu(model, test, cut_off=[20])
    recall_new, mrr_new = top20_metrics(model, histories, targets)
    return {'Recall@20': recall[20], 'MRR@20': mrr[20], 'new Recall@20': recall_new, 'new MRR@20': mrr_new}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', default='rsc15_100k', help='<data>_train_full and <data>_test in ../shared/data')
    parser.add_argument('-ps', '--params', default='rsc15_xe_shared_100_best', help='a preset of benchmarks/common.py')
    parser.add_argument('--epochs', type=int, default=5, help='epochs on A, then on B (default %(default)s)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    parser.add_argument('--full', action='store_true', help='also fit A+B for 2 * --epochs epochs')
    args = parser.parse_args()
    params = dict(pair.split('=') for pair in PRESETS[args.params].split(','))
    train, test = load_log(f'{args.data}_train_full'), load_log(f'{args.data}_test')
    A, B = split_in_time(train)
    new_items = set(B.ItemId) - set(A.ItemId)
    test = test[test.ItemId.isin(train.ItemId)]
    histories, targets = new_item_targets(test, new_items)
    print(f'{args.data}: A {len(A)} events, B {len(B)} events, {len(new_items)} items new in B of '
          f'{train.ItemId.nunique()}; {len(targets)} of the test events target one. {args.params}, '
          f'{args.epochs} + {args.epochs} epochs', flush=True)
    results = {name: [] for name in RETRAIN_STATES + (('full',) if args.full else ())}
    for seed in args.seeds:
        t0 = time.time()
        fitted = GRU4Rec(n_epochs=args.epochs, seed=seed, verbose=False, **params).fit(A)
        runs = [(name, lambda name=name, fitted=fitted: copy.deepcopy(fitted).retrain(B, retrain_state=name))
                for name in RETRAIN_STATES]
        if args.full:
            runs.append(('full', lambda seed=seed: GRU4Rec(n_epochs=2 * args.epochs, seed=seed, verbose=False,
                                                           **params).fit(train)))
        for name, train_model in runs:
            figures = measure(train_model(), test, histories, targets)
            results[name].append(figures)
            print(f'seed {seed} {name}: ' + ', '.join(f'{k} {v:.4f}' for k, v in figures.items())
                  + f' ({time.time() - t0:.0f} s)', flush=True)
    keys = list(results[RETRAIN_STATES[0]][0])
    print(f'\n| retrain_state ({len(args.seeds)} seeds, mean +- sd) | ' + ' | '.join(keys) + ' |')
    print('|---' * (len(keys) + 1) + '|')
    for name, rows in results.items():
        cells = [f'{np.mean([r[k] for r in rows]):.4f} +- {np.std([r[k] for r in rows], ddof=1):.4f}'
                 if len(rows) > 1 else f'{rows[0][k]:.4f}' for k in keys]
        print(f'| {name} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main()
