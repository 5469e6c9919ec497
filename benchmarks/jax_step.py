"""The training step before and after a change (first written for issue 31's JAX step), side by side in one
run: milliseconds per mini-batch on the tuned settings, and the JAX step's memory with and without buffer
donation.

    python benchmarks/jax_step.py --baseline 0773b7b --steps 300 --rounds 2
    python benchmarks/jax_step.py --memory-only --memory-data synthetic:1000000:500000
    python benchmarks/jax_step.py --backend c --steps 3000      # the C backend's step, before and after
    python benchmarks/jax_step.py --backend c --baseline fdf2aa5 --only topk retailrocket diginetica --steps 1000

Each measurement is one run of benchmarks/train_speed.py (--backend, --steps N) in a subprocess: the
baseline's own copy from a checkout of --baseline (git archive of its files), and this checkout's,
in alternating order, --rounds times, after one untimed run of each (their compile caches filled); the
figure is the median. The memory runs use this checkout with and
without --no-donate on a log with many items, where the item tables dominate: XLA's memory plan of the
step (its device memory) and the peak RSS of the process (on a CPU the device memory is host memory).
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

from common import DATA_DIR, ROOT

SETTINGS = {
    'rsc15 (yoochoose1_64, 100 units, batch 32)': ('yoochoose1_64_train_full', 'rsc15_xe_shared_100_best'),
    'diginetica (512 units, batch 128)': ('diginetica_train_full', 'diginetica_bprmax_shared_best'),
    'topk (rsc15_100k, Top-k BPR-max, one-hot, 100 units, batch 32)': ('rsc15_100k_train_full', 'rsc15_topk_bprmax'),
    'retailrocket (224 units, batch 80)': ('retailrocket_train_full', 'retailrocket_bprmax_shared_best'),
}


def train_speed(root, data, paramfile, steps, *extra, backend='jax'):
    """The figures train_speed.py (of the checkout at `root`) prints for `steps` mini-batches."""
    if not data.startswith('synthetic:'):
        data = str(DATA_DIR / f'{data}.tsv.gz')  # a checkout elsewhere has no ../shared/data
    command = [sys.executable, os.path.join(root, 'benchmarks', 'train_speed.py'), '--data', data, '--backend',
               backend, '-pf', str(ROOT / 'paramfiles' / f'{paramfile}.py'), '--steps', str(steps), *extra]
    out = subprocess.run(command, capture_output=True, text=True, cwd=root, env=dict(os.environ, PYTHONPATH=root),
                         check=False)
    if out.returncode:
        sys.exit(f'{" ".join(command)} failed:\n{out.stderr[-3000:]}')
    # ms per mini-batch from the seconds per epoch (train_speed prints mini-batches/s with one decimal only)
    epoch = re.search(r'seconds per epoch(?: \(extrapolated from [\d,]+ of ([\d,]+) mini-batches\))?: ([\d.]+)',
                      out.stdout)
    trained = re.search(r'trained: ([\d,]+) mini-batches', out.stdout).group(1)
    figures = {'ms': 1000 * float(epoch.group(2)) / int((epoch.group(1) or trained).replace(',', '')),
               'peak RSS MiB': float(re.search(r'peak RSS: ([\d,]+) MiB', out.stdout).group(1).replace(',', ''))}
    xla = re.search(r'XLA step memory: (.*)', out.stdout)
    if xla:
        figures['XLA'] = xla.group(1)
    return figures


def checkout(revision, folder):
    """The files of the repository at `revision` in `folder` (all of them: the C kernels' sources too)."""
    archive = subprocess.run(['git', '-C', str(ROOT), 'archive', revision], capture_output=True, check=True).stdout
    subprocess.run(['tar', '-x', '-C', folder], input=archive, check=True)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--baseline', default='0773b7b', help='the revision before the change (default %(default)s)')
    parser.add_argument('--steps', type=int, default=300, help='mini-batches per run (default %(default)s)')
    parser.add_argument('--rounds', type=int, default=2, help='runs of each version, alternating (default %(default)s)')
    parser.add_argument('--memory-data', default='synthetic:1000000:500000',
                        help='the log of the memory runs (default %(default)s: 500k items)')
    parser.add_argument('--memory-only', action='store_true', help='only the memory with and without donation')
    parser.add_argument('--only', nargs='+', choices=[name.split()[0] for name in SETTINGS],
                        help='time only these settings (default: rsc15 and diginetica)')
    parser.add_argument('--backend', default='jax', help="the backend timed: 'jax' (default) or 'c', to check that "
                        'the changes to the step cost the C backend nothing (no memory runs then)')
    args = parser.parse_args()
    print(f'python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}', flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.memory_only:
            before = checkout(args.baseline, tmp)
            versions = [(f'before ({args.baseline})', before), ('after (this checkout)', str(ROOT))]
            print(f'\nms per mini-batch, {args.backend} backend on this CPU, {args.steps} mini-batches a run, '
                  f'median of {args.rounds}')
            for name, (data, paramfile) in SETTINGS.items():
                if name.split()[0] not in (args.only or ['rsc15', 'diginetica']):
                    continue
                runs = {label: [] for label, _ in versions}
                for _, root in versions:  # untimed: fills each version's PyTensor and numba caches
                    train_speed(root, data, paramfile, 2, backend=args.backend)
                for r in range(args.rounds):
                    for label, root in versions if r % 2 == 0 else versions[::-1]:
                        runs[label].append(train_speed(root, data, paramfile, args.steps, backend=args.backend)['ms'])
                medians = {label: statistics.median(ms) for label, ms in runs.items()}
                cells = ' | '.join(f'{label}: {ms:.2f} ({", ".join(f"{m:.2f}" for m in runs[label])})'
                                   for label, ms in medians.items())
                speedup = medians[versions[0][0]] / medians[versions[1][0]]
                print(f'{name}: {cells} | x{speedup:.2f}', flush=True)
    if args.backend != 'jax':
        return
    print(f'\nmemory of the step on {args.memory_data}, rsc15 setting, this checkout (30 mini-batches a run)')
    for label, extra in (('without donation (--no-donate)', ('--no-donate',)), ('with donation', ())):
        figures = train_speed(str(ROOT), args.memory_data, 'rsc15_xe_shared_100_best', 30, *extra)
        print(f'{label}: process peak RSS {figures["peak RSS MiB"]:,.0f} MiB; XLA: {figures["XLA"]}', flush=True)


if __name__ == '__main__':
    main()
