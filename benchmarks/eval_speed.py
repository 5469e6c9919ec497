"""Evaluation speed of GRU4Rec: next-item events ranked against all items per second.

    python benchmarks/eval_speed.py --data yoochoose1_64_train_full --test yoochoose1_64_test \
        -ps rsc15_xe_shared_100_best

Trains a model briefly (--train-steps mini-batches; evaluation speed does not depend on how well it is
trained) or loads one (--model), then runs evaluate_gpu twice: the first run includes compiling the
evaluation graph, the second is timed. --profile prints the per-op profile of the evaluation step.
"""
import argparse
import time

from common import add_common_arguments, describe_blas, load_log, peak_rss_mb, read_params, threads

import gru4rec
from evaluation import evaluate_gpu
from gru4rec import GRU4Rec
from sessions import first_steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument('--test', default='rsc15_100k_test', help='test set, as --data')
    parser.add_argument('--model', help='a model file written by savemodel (instead of training)')
    parser.add_argument('--train-steps', type=int, default=200)
    parser.add_argument('--batch-size', type=int, default=512, help='sessions evaluated in parallel')
    parser.add_argument('-m', '--cutoffs', type=int, nargs='+', default=[1, 5, 10, 20])
    parser.add_argument('--mode', default='standard', help='tie handling')
    parser.add_argument('--profile', action='store_true', help='print the per-op profile of the evaluation step')
    args = parser.parse_args()

    test = load_log(args.test)
    if args.model:
        model = GRU4Rec.loadmodel(args.model)
        if args.backend:
            model.set_params(backend=args.backend)
    else:
        data = load_log(args.data)
        params = read_params(args)
        params.update(n_epochs=1, verbose=False)
        blocks = gru4rec.session_parallel_blocks
        gru4rec.session_parallel_blocks = lambda *a, **kw: first_steps(blocks(*a, **kw), args.train_steps)
        model = GRU4Rec()
        model.set_params(**params)
        model.fit(data)
        gru4rec.session_parallel_blocks = blocks

    import pytensor
    c_profile = args.profile and model.backend == 'c'
    if c_profile:
        import types
        import pytensor.link.vm as vm
        vm.time = types.SimpleNamespace(perf_counter=time.thread_time)
    compiled = []  # evaluate_gpu compiles its step through the model: --profile prints that step's profile
    compile_function = model.compile_function

    def recorded_compile(*a, **kw):
        compiled.append(compile_function(*a, **kw))
        return compiled[-1]
    model.compile_function = recorded_compile
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        with pytensor.config.change_flags(profile=c_profile):
            recall, mrr = evaluate_gpu(model, test, cut_off=args.cutoffs, batch_size=args.batch_size, mode=args.mode)
        runs.append(time.perf_counter() - t0)
    known = test[model.item_key].isin(model.itemidmap)
    n_events = int(known.sum() - test[known].groupby(model.session_key).ngroups)

    print(f'test: {args.test} ({len(test):,} events, {n_events:,} predicted, against {model.n_items:,} items)')
    print(f"backend: {model.backend} (mode {gru4rec.BACKENDS[model.backend]}); BLAS: {describe_blas(model.backend)}; "
          f"threads: {threads()}")
    print(f'first run (with compiling): {runs[0]:.2f}s; second run: {runs[1]:.2f}s')
    print(f'speed: {n_events / runs[1]:,.0f} events/s (batch {args.batch_size})')
    print(f'peak RSS: {peak_rss_mb():,.0f} MiB')
    print('  '.join(f'Recall@{k}: {recall[k]:.4f} MRR@{k}: {mrr[k]:.4f}' for k in args.cutoffs))
    if c_profile:
        compiled[0].profile.summary()


if __name__ == '__main__':
    main()
