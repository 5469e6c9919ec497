"""BPR-MF's negatives: drawn uniformly from all items (baselines.BPR), or as the original's baselines.BPR drew
them, the item of a uniformly drawn one of the first n_items rows of the training data (a fixed subset of
the items, weighted by how often they occur there). Same seed, hyper-parameters (the original's defaults)
and SGD otherwise; prints Recall and MRR at 5, 10, 20 on the test set for both.

    OMP_NUM_THREADS=1 python benchmarks/bpr_negatives.py --data rsc15_100k yoochoose1_64
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pytensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_log  # noqa: E402

from baselines import BPR, bpr_sgd  # noqa: E402
from evaluation import evaluate_gpu  # noqa: E402
from sessions import FLOAT  # noqa: E402


class OriginalNegativesBPR(BPR):
    """BPR whose negatives are the items of the first n_items rows of the training log, as the original's
    `data.ItemIdx.values[np.random.randint(self.n_items)]` (its merged frame keeps the log's row order)."""

    def fit(self, data, **keys):
        self.first_rows = data['ItemId'].to_numpy()
        return super().fit(data, **keys)

    def _fit(self, items, offsets):
        rng = np.random.default_rng(self.seed)
        sessions = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        self.session_factors_ = self._init_factors(rng, len(offsets) - 1)
        self.item_factors_ = self._init_factors(rng, self.n_items)
        pool = self.itemidmap.get_indexer(self.first_rows[:self.n_items])
        print(f'the original draws its negatives from {len(np.unique(pool))} of {self.n_items} items', flush=True)
        for _ in range(int(self.n_iterations)):
            order = rng.permutation(len(items))
            negatives = pool[rng.integers(0, self.n_items, len(items))]
            bpr_sgd(self.session_factors_, self.item_factors_, sessions[order], items[order], negatives,
                    float(self.learning_rate), float(self.lambda_session), float(self.lambda_item))
        self._V = pytensor.shared(self.item_factors_.astype(FLOAT), name='item_factors')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', nargs='+', default=['rsc15_100k'], help='<data>_train_full / _test in ../shared/data')
    args = parser.parse_args()
    for data in args.data:
        train, test = load_log(f'{data}_train_full'), load_log(f'{data}_test')
        for name, model in (('uniform', BPR()), ("the original's", OriginalNegativesBPR())):
            recall, mrr = evaluate_gpu(model.fit(train), test, cut_off=[5, 10, 20])
            print(f'{data}, {name} negatives: ' + ' '.join(f'R@{k} {recall[k]:.4f}' for k in recall) + ' '
                  + ' '.join(f'MRR@{k} {mrr[k]:.4f}' for k in mrr), flush=True)


if __name__ == '__main__':
    main()
