"""Retraining: which scale for the rows of items new in the retraining data?

Fits the settings of tests/test_retrain.py on the first half of rsc15_100k_train_full (by session start),
then retrains copies on the second half: with the new rows scaled by the whole grown matrix's fan,
sigma = sqrt(6 / (n_old + n_new + L)), as the original's extend_weights (commit 4b91663) and this library
since, and by the new rows' own fan, sigma = sqrt(6 / (n_new + L)), as this library did before (passed as
the `sigma` hyper-parameter, which only the new rows read when retraining).
Prints MRR@20 and Recall@20 on rsc15_100k_test, overall and
on the test events whose target is an item new in the second half (from recommend's top 20).

    python benchmarks/retrain_sigma.py --seeds 1 2
"""
import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation import evaluate_gpu  # noqa: E402
from gru4rec import GRU4Rec  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
SETTINGS = dict(loss='cross-entropy', final_act='softmax', constrained_embedding=True, embedding=0, layers=[64],
                batch_size=32, n_sample=512, sample_alpha=0.5, logq=1.0, learning_rate=0.2, momentum=0.2,
                dropout_p_hidden=0.2, verbose=False)
EPOCHS = 2


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[1])
    args = parser.parse_args()
    train = pd.read_csv(DATA / 'rsc15_100k_train_full.tsv.gz', sep='\t')
    test = pd.read_csv(DATA / 'rsc15_100k_test.tsv.gz', sep='\t')
    start = train.groupby('SessionId').Time.transform('min')
    cut = train.groupby('SessionId').Time.min().median()
    A, B = train[start <= cut], train[start > cut]
    new_items = set(B.ItemId) - set(A.ItemId)
    test = test[test.ItemId.isin(train.ItemId)]
    histories, targets = new_item_targets(test, new_items)
    n_all, L = train.ItemId.nunique(), SETTINGS['layers'][-1]
    print(f'{len(new_items)} items new in B of {n_all}; {len(targets)} test events target one')
    for seed in args.seeds:
        fitted = GRU4Rec(n_epochs=EPOCHS, seed=seed, **SETTINGS).fit(A)
        for name, sigma in (('sqrt(6 / (n_old + n_new + L)), original and default', 0.0),
                            ('sqrt(6 / (n_new + L)), before', np.sqrt(6.0 / (len(new_items) + L)))):
            model = copy.deepcopy(fitted).set_params(sigma=sigma).retrain(B)
            recall, mrr = evaluate_gpu(model, test, cut_off=[20])
            recall_new, mrr_new = top20_metrics(model, histories, targets)
            print(f'seed {seed}, new rows {name}: MRR@20 {mrr[20]:.4f} Recall@20 {recall[20]:.4f}; '
                  f'new-item targets MRR@20 {mrr_new:.4f} Recall@20 {recall_new:.4f}', flush=True)


if __name__ == '__main__':
    main()
