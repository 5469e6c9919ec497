"""Chooses paropt.py's pruner by replaying the learning curves of a search run without pruning.

    python paropt.py TRAIN_TR VALID ... --pruner none --storage curves.db --study nopruning
    python benchmarks/pruner_replay.py --storage curves.db --study nopruning --orders 200

Every completed trial of that search reported its validation metric after each epoch. The replay feeds
these curves, trial after trial in a random order, to a fresh study with each pruner, and counts the
epochs the pruner lets run and whether the best trial of the search survives (and, when not, how far
below it the best surviving trial is). Repeating over many orders averages out which trials come first.
--trials N replays searches of N trials drawn with replacement from the recorded ones, to see the pruners
at the scale of a real search (the median pruner spares its first 5 completed trials, whatever N).
The sampler's reaction to pruning is not replayed: the trials are the ones the unpruned search drew.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import paropt  # noqa: E402


def curves(optuna, storage, study):
    """(epoch values per epoch, final value) of the completed trials that reported every epoch."""
    trials = optuna.load_study(study_name=study, storage=paropt.storage_url(storage)).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    n_epochs = max(len(t.intermediate_values) for t in trials)
    return [([t.intermediate_values[e] for e in range(1, n_epochs + 1)], t.value) for t in trials
            if len(t.intermediate_values) == n_epochs]


def replay(optuna, pruner_name, runs, order):
    """(epochs run, best surviving final value) of one pass over the trials in `order`."""
    study = optuna.create_study(direction='maximize', pruner=paropt.make_pruner(optuna, pruner_name))
    epochs, best = 0, -np.inf
    for index in order:
        values, final = runs[index]
        trial = study.ask()
        for epoch, value in enumerate(values, 1):
            trial.report(value, epoch)
            epochs += 1
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, final)
            best = max(best, final)
    return epochs, best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--storage', required=True, help='the storage of the unpruned search (path or URL)')
    parser.add_argument('--study', required=True, help='its study name')
    parser.add_argument('--orders', type=int, default=200, help='random trial orders to average over (default: 200)')
    parser.add_argument('--trials', type=int,
                        help='trials per replayed search, drawn with replacement (default: each recorded trial once)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = curves(optuna, args.storage, args.study)
    n_epochs = len(runs[0][0])
    n_trials = args.trials or len(runs)
    print(f'{len(runs)} recorded trials of {n_epochs} epochs; searches of {n_trials} trials')
    print('| pruner | epochs run (of all) | best trial kept | best kept / best (mean, worst) | best kept (mean) |')
    print('|---|---|---|---|---|')
    rng = np.random.default_rng(args.seed)
    orders = [rng.choice(len(runs), n_trials) if args.trials else rng.permutation(len(runs))
              for _ in range(args.orders)]
    true_best = np.array([max(runs[i][1] for i in order) for order in orders])  # of each replayed search
    for name in paropt.PRUNERS:
        results = np.array([replay(optuna, name, runs, order) for order in orders])
        share = results[:, 0].mean() / (n_trials * n_epochs)
        ratio = results[:, 1] / true_best
        print(f'| {name} | {share:.0%} | {np.mean(results[:, 1] == true_best):.0%} of orders | '
              f'{ratio.mean():.4f}, {ratio.min():.4f} | {results[:, 1].mean():.4f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
