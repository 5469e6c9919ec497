"""Accuracy on real data (RSC15, first 100k events) with the two published settings, 10 epochs each. The
floors are a little under what the original (cross-entropy) and the official PyTorch port (BPR-max) reach
on these files.

The BPR-max setting (lr 0.2, momentum 0.3, elu-0.5 scores) trains chaotically: over fifteen seeds its
Recall@20 spreads over .54-.61 (.591 ± .021, docs/results.md), and any change in the order of floating-point
operations redraws each seed's result (16-wide vectors moved seeds 42 and 1 from .569 and .601 to .565 and
.560, the fifteen seeds' mean not at all); its check is on the mean of four seeds, 42 (the default), 1, 2
and 3 (standard deviation about .011). The five trainings run in two processes, one per core (about three
minutes).

They run with the rest of the suite, so in CI too; `pytest -m "not accuracy"` leaves them out.
"""
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from conftest import read_log
from evaluation import evaluate_gpu
from gru4rec import GRU4Rec

pytestmark = pytest.mark.accuracy

TRAININGS = {
    'rsc15_xe_shared_100_best': (
        dict(loss='cross-entropy', final_act='softmax', layers=[100], batch_size=32, dropout_p_hidden=0.4,
             learning_rate=0.2, momentum=0.2, sample_alpha=0.5, bpreg=0.0, logq=1.0, constrained_embedding=True,
             n_sample=2048, adapt='adagrad', n_epochs=10),
        [42], 0.665, 0.350),
    'rsc15_bprmax_elu_no_embedding': (
        dict(loss='bpr-max', final_act='elu-0.5', layers=[100], batch_size=32, learning_rate=0.2, momentum=0.3,
             bpreg=1.0, sample_alpha=0.0, n_sample=2048, adapt='adagrad', n_epochs=10),
        [42, 1, 2, 3], 0.570, 0.280),
}


def train_and_evaluate(data_dir, name, seed):
    """Recall@20 and MRR@20 on rsc15_100k_test of a model trained with TRAININGS[name] and `seed`."""
    train = read_log(data_dir / 'rsc15_100k_train_full.tsv.gz')
    test = read_log(data_dir / 'rsc15_100k_test.tsv.gz')
    model = GRU4Rec(**TRAININGS[name][0], seed=seed, verbose=False).fit(train)
    recall, mrr = evaluate_gpu(model, test, cut_off=[20], batch_size=512)
    return recall[20], mrr[20]


@pytest.fixture(scope='module')
def results(data_dir):
    jobs = [(name, seed) for name, (_, seeds, _, _) in TRAININGS.items() for seed in seeds]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context('spawn')) as pool:
        futures = {job: pool.submit(train_and_evaluate, data_dir, *job) for job in jobs}
        return {job: future.result() for job, future in futures.items()}


@pytest.mark.parametrize('name', sorted(TRAININGS))
def test_rsc15_100k_accuracy(results, name):
    _, seeds, min_recall, min_mrr = TRAININGS[name]
    for seed in seeds:
        print(f'{name}, seed {seed}: Recall@20 {results[name, seed][0]:.4f} MRR@20 {results[name, seed][1]:.4f}')
    recall, mrr = np.mean([results[name, seed] for seed in seeds], axis=0)
    assert recall >= min_recall, f'Recall@20 {recall:.4f} (mean over seeds {seeds}) < {min_recall}'
    assert mrr >= min_mrr, f'MRR@20 {mrr:.4f} (mean over seeds {seeds}) < {min_mrr}'
