"""Accuracy on real data (RSC15, first 100k events) with the two published settings, 10 epochs each
(about a minute and two on two cores). The floors are a little under what the original (cross-entropy)
and the official PyTorch port (BPR-max) reach on these files.

They run with the rest of the suite, so in CI too; `pytest -m "not accuracy"` leaves them out.
"""
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
        0.665, 0.350),
    'rsc15_bprmax_elu_no_embedding': (
        dict(loss='bpr-max', final_act='elu-0.5', layers=[100], batch_size=32, learning_rate=0.2, momentum=0.3,
             bpreg=1.0, sample_alpha=0.0, n_sample=2048, adapt='adagrad', n_epochs=10),
        0.570, 0.280),
}


@pytest.mark.parametrize('name', sorted(TRAININGS))
def test_rsc15_100k_accuracy(data_dir, name):
    params, min_recall, min_mrr = TRAININGS[name]
    train = read_log(data_dir / 'rsc15_100k_train_full.tsv.gz')
    test = read_log(data_dir / 'rsc15_100k_test.tsv.gz')
    model = GRU4Rec(**params).fit(train)
    recall, mrr = evaluate_gpu(model, test, cut_off=[20], batch_size=512)
    print(f'{name}: Recall@20 {recall[20]:.4f} MRR@20 {mrr[20]:.4f}')
    assert recall[20] >= min_recall
    assert mrr[20] >= min_mrr
