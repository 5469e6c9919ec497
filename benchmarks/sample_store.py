"""The negative samples' store before and after a change, side by side: seconds per block of samples
(training.SampleStore.draw, which the training runs in a background thread) and the peak memory of the
process, with a checksum of the blocks, which must be equal.

    python benchmarks/sample_store.py --baseline 17e874d
    python benchmarks/sample_store.py --baseline 17e874d --items 17376 1000000 --rounds 3

Each measurement runs in its own process with the code of one version (the baseline's files from git archive,
as jax_step.py does, or this checkout's), alternating, --rounds times: it builds a store of 10M samples
(n_sample 2048, alpha 0.5) over the supports of N items (a Pareto draw, seed 0), waits for its first block,
then times --blocks more. The figure is the median block time and the largest peak RSS.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from common import ROOT
from jax_step import checkout

CHILD = r'''
import json, resource, sys, time
import numpy as np
from training import SampleStore, sample_cdf
n_items, blocks = int(sys.argv[1]), int(sys.argv[2])
support = np.ceil(np.random.default_rng(0).pareto(1.0, n_items) * 10)
with SampleStore(sample_cdf(support, 0.5), 2048, 10_000_000, np.random.default_rng(1)) as store:
    checksum = int(store.pending.result().sum(dtype=np.int64))
    seconds = []
    for _ in range(blocks):
        start = time.perf_counter()
        checksum += int(store.draw().sum(dtype=np.int64))
        seconds.append(time.perf_counter() - start)
print(json.dumps({'seconds': seconds, 'checksum': checksum,
                  'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def measure(root, n_items, blocks):
    done = subprocess.run([sys.executable, '-c', CHILD, str(n_items), str(blocks)], capture_output=True, text=True,
                          cwd=root, env=dict(os.environ, PYTHONPATH=root))
    if done.returncode:
        sys.exit(f'the store of {root} failed:\n{done.stderr[-3000:]}')
    return json.loads(done.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--baseline', required=True, help='the revision before the change')
    parser.add_argument('--items', type=int, nargs='+', default=[17376, 1000000],
                        help='catalogue sizes (default: yoochoose1_64\'s 17,376 and a million)')
    parser.add_argument('--blocks', type=int, default=3, help='blocks timed per run (default %(default)s)')
    parser.add_argument('--rounds', type=int, default=2, help='runs of each version, alternating (default %(default)s)')
    args = parser.parse_args()
    print(f'load average {os.getloadavg()[0]:.1f}; blocks of 10M samples (4,882 steps of 2,048), '
          f'median seconds per block and peak RSS over {args.rounds} runs of each version\n')
    print('| items | before: s/block | after: s/block | before: peak RSS MiB | after: peak RSS MiB | same samples |')
    print('|---|---|---|---|---|---|')
    with tempfile.TemporaryDirectory() as tmp:
        versions = {'before': checkout(args.baseline, tmp), 'after': str(ROOT)}
        for n_items in args.items:
            runs = {label: [] for label in versions}
            for r in range(args.rounds):
                for label in versions if r % 2 == 0 else list(versions)[::-1]:
                    runs[label].append(measure(versions[label], n_items, args.blocks))
            seconds = {label: statistics.median(s for run in rs for s in run['seconds']) for label, rs in runs.items()}
            rss = {label: max(run['rss'] for run in rs) for label, rs in runs.items()}
            same = len({run['checksum'] for rs in runs.values() for run in rs}) == 1
            print(f"| {n_items:,} | {seconds['before']:.3f} | {seconds['after']:.3f} | {rss['before']:,.0f} | "
                  f"{rss['after']:,.0f} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == '__main__':
    main()
