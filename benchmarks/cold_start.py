"""Cold and warm start: the README's one-epoch rsc15_100k run with an empty compile cache, then again
with the cache it left, side by side with another checkout of the project (the code before a change).

    python benchmarks/cold_start.py
    python benchmarks/cold_start.py --baseline /tmp/before --rounds 2
    python benchmarks/cold_start.py --baseline /tmp/before --load
    python benchmarks/cold_start.py --baseline /tmp/before --serve

Each run is `python run.py ../shared/data/rsc15_100k_train_full.tsv.gz -pf paramfiles/rsc15_xe_shared_100_best.py
-ps n_epochs=1 -t ../shared/data/rsc15_100k_test.tsv.gz` in its own process, with PyTensor's compile
directory (PYTENSOR_FLAGS=compiledir=...) a fresh temporary one for the cold run and the same one again for
the warm run. The table gives the wall-clock seconds of the whole process, the seconds of its training
epoch and of its evaluation as run.py prints them, and the compiled modules the cold run left. Cold minus
warm is what compiling costs a first run; the warm run still loads the cached modules and rewrites the graphs.
With --load the runs are `python run.py MODEL -l -t ../shared/data/rsc15_100k_test.tsv.gz` instead, what a
process that only evaluates or serves a trained model pays: MODEL is that run's model, trained and saved
once beforehand by this checkout. With --serve they start `python run.py serve MODEL`, timed until the server
accepts connections.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_DIR, ROOT
from http_speed import free_port, start_server

EPOCH = re.compile(r'^Epoch1 --> loss: \S+\s+\(([0-9.]+)s\)', re.M)
EVALUATION = re.compile(r'took ([0-9.]+)s', re.M)


TRAIN = [str(DATA_DIR / 'rsc15_100k_train_full.tsv.gz'), '-pf', 'paramfiles/rsc15_xe_shared_100_best.py', '-ps',
         'n_epochs=1']
TEST = ['-t', str(DATA_DIR / 'rsc15_100k_test.tsv.gz')]


def run_once(checkout, compiledir, arguments):
    """(wall s, epoch s or None, evaluation s) of `python run.py ARGUMENTS` in checkout with that compile cache."""
    env = dict(os.environ, PYTENSOR_FLAGS=f'compiledir={compiledir}', PYTHONWARNINGS='ignore')
    start = time.perf_counter()
    done = subprocess.run([sys.executable, 'run.py', *arguments], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=1800)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f'{checkout}: run.py failed:\n{done.stderr[-2000:]}')
    epoch, evaluation = EPOCH.search(done.stdout), EVALUATION.search(done.stdout)
    return wall, epoch and float(epoch.group(1)), float(evaluation.group(1))


def serve_once(checkout, compiledir, model):
    """(wall s, None, None): from starting `run.py serve MODEL` in checkout until it accepts connections."""
    start = time.perf_counter()
    server = start_server(model, free_port(), checkout, {'PYTENSOR_FLAGS': f'compiledir={compiledir}'})
    wall = time.perf_counter() - start
    server.terminate()
    server.wait(timeout=30)
    return wall, None, None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--baseline', type=Path, help='another checkout of the project, run in turn with this one')
    parser.add_argument('--rounds', type=int, default=1, help='cold + warm runs per checkout')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--load', action='store_true', help='time loading a trained model and evaluating it')
    mode.add_argument('--serve', action='store_true', help='time starting the HTTP service of a trained model')
    args = parser.parse_args()
    checkouts = [('this checkout', ROOT)] + ([('baseline', args.baseline.resolve())] if args.baseline else [])
    with tempfile.TemporaryDirectory(prefix='gru4rec_cold_') as tmp:
        model = str(Path(tmp) / 'rsc15_100k.gru4rec')
        if args.load or args.serve:
            subprocess.run([sys.executable, 'run.py', *TRAIN, '-s', model], cwd=ROOT, check=True, capture_output=True)
        if args.serve:
            run = lambda checkout, compiledir: serve_once(checkout, compiledir, model)
        else:
            arguments = [model, '-l'] + TEST if args.load else TRAIN + TEST
            run = lambda checkout, compiledir: run_once(checkout, compiledir, arguments)
        print('| code | round | cold wall s | warm wall s | cold - warm | cold epoch / evaluation s | '
              'warm epoch / evaluation s | modules |')
        print('|---|---|---|---|---|---|---|---|')
        for round_ in range(1, args.rounds + 1):
            for name, checkout in checkouts:
                with tempfile.TemporaryDirectory(prefix='gru4rec_cold_') as compiledir:
                    cold = run(checkout, compiledir)
                    modules = sum(1 for p in Path(compiledir).iterdir() if (p / 'mod.cpp').exists())
                    warm = run(checkout, compiledir)
                print(f'| {name} | {round_} | {cold[0]:.1f} | {warm[0]:.1f} | {cold[0] - warm[0]:.1f} | '
                      f'{seconds(cold[1])} / {seconds(cold[2])} | {seconds(warm[1])} / {seconds(warm[2])} | '
                      f'{modules} |', flush=True)


def seconds(value):
    return '—' if value is None else f'{value:.1f}'


if __name__ == '__main__':
    main()
