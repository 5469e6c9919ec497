"""Baselines: fitted tables checked by hand, metrics from evaluate_gpu checked against a plain
per-event reference, and the sanity floors on the real data."""
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from baselines import BPR, ItemKNN, MarkovChain, Pop, RandomPred, SessionPop, bpr_sgd, make_baseline
from evaluation import evaluate_gpu
from sessionlogs import synthetic_log

CUTOFFS = [1, 3, 5, 10]


@pytest.fixture(scope='module')
def train():
    return synthetic_log(150, seed=1)


@pytest.fixture(scope='module')
def test():
    return synthetic_log(40, seed=2, first_session=1001)


def sessions_of(log):
    ordered = log.sort_values(['SessionId', 'Time'])
    return [group.ItemId.tolist() for _, group in ordered.groupby('SessionId', sort=False)]


def reference_scorer(name, train, **params):
    """score(history) -> {item: score} for every training item, written from the definitions."""
    sessions = sessions_of(train)
    support = Counter(train.ItemId)
    items = sorted(support)
    if name == 'pop':
        return lambda history: dict(support)
    if name == 'spop':
        return lambda history: {i: history.count(i) for i in items}
    if name == 'markov':
        follows = Counter((a, b) for s in sessions for a, b in zip(s, s[1:]))
        return lambda history: {i: follows[history[-1], i] for i in items}
    lmbd, alpha = params.get('lmbd', 20.0), params.get('alpha', 0.5)
    counts = [Counter(s) for s in sessions]

    def knn(history):
        last = history[-1]
        return {j: 0.0 if j == last else sum(c[last] * c[j] for c in counts)
                / ((support[last] + lmbd) ** alpha * (support[j] + lmbd) ** (1 - alpha)) for j in items}
    return knn


def reference_metrics(scorer, train, test, cutoffs, popularity_ties, candidates=None):
    """Recall and MRR with every next event ranked among all training items (or among the candidates,
    a target that is not one a miss): 1 + #(higher score), plus, where the model breaks ties by
    popularity, #(same score and more popular)."""
    support = Counter(train.ItemId)
    known = test[test.ItemId.isin(support)]
    ranks = []
    for session in sessions_of(known):
        for t in range(1, len(session)):
            scores = scorer(session[:t])
            target = session[t]
            s, p = scores[target], support[target]
            if candidates is not None and target not in candidates:
                ranks.append(np.inf)
                continue
            rivals = scores.items() if candidates is None else [(i, scores[i]) for i in candidates if i != target]
            ahead = sum(1 for i, v in rivals if v > s or (popularity_ties and v == s and support[i] > p))
            ranks.append(1 + ahead)
    ranks = np.asarray(ranks)
    recall = {k: np.mean(ranks <= k) for k in cutoffs}
    return recall, {k: np.mean(np.where(ranks <= k, 1 / ranks, 0)) for k in cutoffs}


@pytest.mark.parametrize('name', ['itemknn', 'markov', 'pop', 'spop'])  # bpr and random: tests of their own
def test_evaluate_gpu_scores_baselines_as_their_definition_ranks(name, train, test):
    model = make_baseline(name).fit(train)
    recall, mrr = evaluate_gpu(model, test, cut_off=CUTOFFS, batch_size=16)
    expected_recall, expected_mrr = reference_metrics(reference_scorer(name, train), train, test, CUTOFFS,
                                                      popularity_ties=name != 'pop')
    for k in CUTOFFS:
        assert recall[k] == pytest.approx(expected_recall[k], abs=1e-9), k
        assert mrr[k] == pytest.approx(expected_mrr[k], abs=1e-6), k


def test_truncated_neighbourhoods_keep_the_metrics_up_to_their_size(train, test):
    full = evaluate_gpu(MarkovChain().fit(train), test, cut_off=[1, 2, 3])
    top3 = MarkovChain(n_successors=3).fit(train)
    widths = [len(top3.neighbours(item)) for item in top3.itemidmap]
    assert max(widths) == 3 and max(len(MarkovChain().fit(train).neighbours(item)) for item in top3.itemidmap) > 3
    assert evaluate_gpu(top3, test, cut_off=[1, 2, 3]) == full


def test_markov_chain_counts_transitions_within_sessions_only():
    log = pd.DataFrame({'SessionId': [1, 1, 1, 2, 2, 3, 3], 'ItemId': ['a', 'b', 'a', 'a', 'b', 'c', 'a'],
                        'Time': range(7)})
    model = MarkovChain().fit(log)
    table = {(i, j): v for i in 'abc' for j, v in model.neighbours(i).items()}
    assert table == {('a', 'b'): 2, ('b', 'a'): 1, ('c', 'a'): 1}  # no b -> a across sessions 1 and 2
    with pytest.raises(KeyError, match="item 'd' is not in the training data"):
        model.neighbours('d')


def test_item_knn_similarity_follows_the_formula():
    log = pd.DataFrame({'SessionId': [1, 1, 2, 2, 2, 3], 'ItemId': [1, 2, 1, 2, 3, 3], 'Time': range(6)})
    model = ItemKNN(lmbd=1.0, alpha=0.25).fit(log)
    sims = model.neighbours(1)
    # supports: item 1 twice, item 2 twice, item 3 twice; cooc(1, 2) = 2, cooc(1, 3) = 1
    assert sims[2] == pytest.approx(2 / ((2 + 1) ** 0.25 * (2 + 1) ** 0.75))
    assert sims[3] == pytest.approx(1 / 3)
    assert list(sims.index) == [2, 3]  # ranked, and not the item itself


def test_session_popularity_resets_between_sessions():
    train = pd.DataFrame({'SessionId': [1, 1, 2, 2], 'ItemId': [1, 2, 2, 3], 'Time': range(4)})
    # With one slot, session 11 follows session 10 in it: carried over, item 1 would outrank item 3.
    test = pd.DataFrame({'SessionId': [10, 10, 10, 11, 11], 'ItemId': [1, 1, 1, 3, 3], 'Time': range(5)})
    recall, mrr = evaluate_gpu(SessionPop().fit(train), test, cut_off=[1], batch_size=1)
    assert recall[1] == 1.0 and mrr[1] == 1.0


def test_baselines_rank_against_candidate_items(train, test):
    candidates = sorted(set(train.ItemId))[::2]
    model = MarkovChain().fit(train)
    recall, mrr = evaluate_gpu(model, test, items=candidates, cut_off=[5])
    expected_recall, expected_mrr = reference_metrics(reference_scorer('markov', train), train, test, [5],
                                                      popularity_ties=True, candidates=candidates)
    assert recall[5] == pytest.approx(expected_recall[5]) and mrr[5] == pytest.approx(expected_mrr[5])


def test_scores_are_float32(train):
    import pytensor.tensor as pt
    model = ItemKNN().fit(train)
    X = pt.ivector('X')
    (H,), scores = model.symbolic_step(X, [pt.fmatrix('H')])
    assert scores.dtype == 'float32'
    assert model.compile_function([X], scores)(np.arange(3, dtype=np.int32)).shape == (3, model.n_items)


def test_make_baseline_reads_command_line_strings():
    model = make_baseline('itemknn', n_sims='50', lmbd='10', alpha='0.75')
    assert (model.n_sims, model.lmbd, model.alpha) == (50, 10.0, 0.75)
    assert model.get_params() == {'n_sims': 50, 'lmbd': 10.0, 'alpha': 0.75, 'backend': 'c'}
    with pytest.raises(ValueError, match='unknown baseline'):
        make_baseline('svd')
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['n_sim'\]"):
        make_baseline('itemknn', n_sim=5)
    with pytest.raises(ValueError, match='expected a int'):
        make_baseline('markov', n_successors='many')


@pytest.mark.parametrize('model, message', [(ItemKNN(n_sims=0), 'n_sims'), (ItemKNN(alpha=2), 'alpha'),
                                            (MarkovChain(n_successors=0), 'n_successors'),
                                            (Pop(backend='gpu'), 'backend')])
def test_bad_parameters_are_named_when_fitting(model, message, train):
    with pytest.raises(ValueError, match=message):
        model.fit(train)


def test_an_unfitted_baseline_says_so():
    import pytensor.tensor as pt
    with pytest.raises(ValueError, match='not fitted'):
        Pop().symbolic_step(pt.ivector(), [])


@pytest.mark.parametrize('model, floor', [(MarkovChain(), (0.591, 0.344)), (Pop(), (0.089, 0.026)),
                                          (BPR(), (0.424, 0.260)), (RandomPred(), (0.007, 0.001))])
def test_sanity_floors_on_rsc15_100k(model, floor, data_dir):
    train = pd.read_csv(data_dir / 'rsc15_100k_train_full.tsv.gz', sep='\t')
    test = pd.read_csv(data_dir / 'rsc15_100k_test.tsv.gz', sep='\t')
    recall, mrr = evaluate_gpu(model.fit(train), test, cut_off=[20])
    assert (round(recall[20], 3), round(mrr[20], 3)) == floor


# -- the original's RandomPred and BPR ----------------------------------------------------------------

def bpr_log_posterior(u, p, n, lambda_session, lambda_item):
    """What a step of BPR-MF climbs: ln sigmoid(<u, p> - <u, n>) - the L2 penalties (float64)."""
    x = u @ p - u @ n
    return -np.log1p(np.exp(-x)) - lambda_session / 2 * u @ u - lambda_item / 2 * (p @ p + n @ n)


def test_a_bpr_step_is_the_gradient_of_the_log_posterior_times_the_learning_rate():
    rng = np.random.default_rng(3)
    U, V = rng.normal(0, 0.5, (3, 4)), rng.normal(0, 0.5, (5, 4))
    lr, ls, li = 0.05, 0.1, 0.2
    U_new, V_new = U.copy(), V.copy()
    total = bpr_sgd(U_new, V_new, np.array([1]), np.array([2]), np.array([4]), lr, ls, li)
    u, p, n = U[1], V[2], V[4]
    assert total == pytest.approx(-np.log1p(np.exp(-(u @ p - u @ n))), rel=1e-12)
    # By hand: c = 1 - sigmoid(x) = sigmoid(-x).
    c = 1 / (1 + np.exp(u @ p - u @ n))
    np.testing.assert_allclose(U_new[1], u + lr * (c * (p - n) - ls * u), rtol=1e-12)
    np.testing.assert_allclose(V_new[2], p + lr * (c * u - li * p), rtol=1e-12)
    np.testing.assert_allclose(V_new[4], n + lr * (-c * u - li * n), rtol=1e-12)
    # Numerically: each step is lr times the gradient of the log posterior at the factors before it.
    point = np.concatenate([u, p, n])
    h = 1e-6
    gradient = np.array([(bpr_log_posterior(*np.split(point + h * e, 3), ls, li)
                          - bpr_log_posterior(*np.split(point - h * e, 3), ls, li)) / (2 * h)
                         for e in np.eye(len(point))])
    np.testing.assert_allclose(np.concatenate([U_new[1], V_new[2], V_new[4]]) - point, lr * gradient,
                               rtol=1e-6, atol=1e-10)
    untouched = np.ones(len(U), bool)
    untouched[1] = False
    np.testing.assert_array_equal(U_new[untouched], U[untouched])
    np.testing.assert_array_equal(V_new[[0, 1, 3]], V[[0, 1, 3]])


def test_bpr_steps_run_in_order_on_the_updated_factors():
    """Two triples sharing a session: the second step reads the factors the first one wrote."""
    rng = np.random.default_rng(4)
    U, V = rng.normal(0, 0.5, (2, 3)), rng.normal(0, 0.5, (4, 3))
    expected_U, expected_V = U.copy(), V.copy()
    for u, p, n in [(0, 1, 2), (0, 3, 1)]:
        uf, pf, nf = expected_U[u].copy(), expected_V[p].copy(), expected_V[n].copy()
        c = 1 / (1 + np.exp(uf @ pf - uf @ nf))
        expected_U[u] += 0.1 * c * (pf - nf)
        expected_V[p] += 0.1 * c * uf
        expected_V[n] -= 0.1 * c * uf
    bpr_sgd(U, V, np.array([0, 0]), np.array([1, 3]), np.array([2, 1]), 0.1, 0.0, 0.0)
    np.testing.assert_allclose(U, expected_U, rtol=1e-12)
    np.testing.assert_allclose(V, expected_V, rtol=1e-12)


def test_bpr_defaults_are_the_originals():
    assert BPR().get_params() == {'n_factors': 100, 'n_iterations': 10, 'learning_rate': 0.01,
                                  'lambda_session': 0.0, 'lambda_item': 0.0, 'sigma': 0.05,
                                  'init_normal': False, 'seed': 42, 'backend': 'c'}


@pytest.mark.parametrize('init_normal', [False, True])
def test_bpr_learns_and_scores_sessions_by_the_mean_of_their_item_factors(train, test, init_normal):
    model = BPR(n_factors=8, n_iterations=15, learning_rate=0.05, sigma=0.1, init_normal=init_normal).fit(train)
    assert model.item_factors_.shape == (train.ItemId.nunique(), 8)
    assert model.session_factors_.shape == (train.SessionId.nunique(), 8)
    assert model.log_likelihood_[-1] > model.log_likelihood_[0] + 0.05, model.log_likelihood_
    V = pd.DataFrame(model.item_factors_.astype(np.float32).astype(np.float64), index=model.itemidmap)
    recall, mrr = evaluate_gpu(model, test, cut_off=CUTOFFS, batch_size=16)
    expected = reference_metrics(lambda history: dict(zip(V.index, V.to_numpy() @ V.loc[history].mean().to_numpy())),
                                 train, test, CUTOFFS, popularity_ties=False)
    for k in CUTOFFS:
        assert recall[k] == pytest.approx(expected[0][k], abs=1e-9), k
        assert mrr[k] == pytest.approx(expected[1][k], abs=1e-6), k
    assert recall[10] > 10 / len(V) + 0.1, 'well above random'


def test_bpr_is_reproducible_by_seed(train):
    first, again, other = (BPR(n_factors=4, n_iterations=2, seed=s).fit(train) for s in (1, 1, 2))
    np.testing.assert_array_equal(first.item_factors_, again.item_factors_)
    assert not np.array_equal(first.item_factors_, other.item_factors_)


def test_random_scores_are_uniform_fresh_at_every_step_and_seeded(train, test):
    import pytensor.tensor as pt
    model = RandomPred().fit(train)
    X = pt.ivector('X')
    _, scores = model.symbolic_step(X, [pt.fmatrix('H')])
    draw = model.compile_function([X], scores, model.random_updates)
    first, second = draw(np.arange(3, dtype=np.int32)), draw(np.arange(3, dtype=np.int32))
    assert first.shape == (3, model.n_items) and first.dtype == np.float32
    assert ((first >= 0) & (first < 1)).all() and not np.array_equal(first, second)
    assert evaluate_gpu(model, test, cut_off=[5]) == evaluate_gpu(RandomPred().fit(train), test, cut_off=[5])
    assert evaluate_gpu(model, test, cut_off=[5]) != evaluate_gpu(RandomPred(seed=7).fit(train), test, cut_off=[5])


def test_random_recall_is_k_over_the_number_of_items(train):
    """Recall@k of random scores is k / n_items, within 4 standard errors over many predictions."""
    log = synthetic_log(400, seed=5, first_session=5001)
    n_items = train.ItemId.nunique()
    known = log[log.ItemId.isin(set(train.ItemId))]
    n = (known.groupby('SessionId').size() - 1).clip(lower=0).sum()
    recall, _ = evaluate_gpu(RandomPred().fit(train), log, cut_off=[1, 5, 10])
    for k in (1, 5, 10):
        p = k / n_items
        assert abs(recall[k] - p) <= 4 * np.sqrt(p * (1 - p) / n), (k, recall[k], p)


def test_make_baseline_reads_bpr_and_random_strings():
    model = make_baseline('bpr', n_factors='8', learning_rate='0.05', init_normal='True')
    assert (model.n_factors, model.learning_rate, model.init_normal) == (8, 0.05, True)
    assert make_baseline('bpr', init_normal='False').init_normal is False
    with pytest.raises(ValueError, match=r"init_normal='yes': expected True or False"):
        make_baseline('bpr', init_normal='yes')
    assert make_baseline('random', seed='3').seed == 3


@pytest.mark.parametrize('model, message', [(BPR(n_factors=0), 'n_factors'), (BPR(learning_rate=-1), 'learning_rate'),
                                            (BPR(sigma=float('nan')), 'sigma')])
def test_bad_bpr_parameters_are_named_when_fitting(model, message, train):
    with pytest.raises(ValueError, match=message):
        model.fit(train)
