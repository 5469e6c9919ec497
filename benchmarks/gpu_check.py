"""The GPU check of the JAX backend: one run on a machine with one NVIDIA GPU, from the repository root.

    bash benchmarks/gpu_check.sh                        # on the GPU machine
    bash benchmarks/gpu_check.sh --allow-cpu --quick    # a rehearsal on a CPU (see benchmarks/README.md)

1. Environment. A virtual environment (--venv) that sees every package of the machine's Python (--python):
   its own CUDA JAX is used as it is. pip adds only the requirements (setup.py's, and pytest) that are
   missing or too old, from the package index or, without a network, from --wheels DIR (made beforehand
   with --download DIR on a machine that has one). JAX is added only where there is none: jax[cuda12], or
   jax with --allow-cpu; an existing JAX is never replaced.
2. JAX must see a GPU: otherwise the check stops here (exit status 2), unless --allow-cpu.
3. The backend equivalence tests (tests/test_backends.py) with JAX_DEFAULT_MATMUL_PRECISION=highest: JAX's
   default on Ampere and Hopper GPUs multiplies float32 matrices in TF32 (10-bit mantissas), beyond the
   tests' float32 tolerances. A failure is reported at the end; the figures are still measured.
4. Training speed (benchmarks/train_speed.py): mini-batches/s of the rsc15 and diginetica settings, JAX
   on the GPU beside the C backend on the same machine's CPU.
5. Evaluation speed (benchmarks/eval_speed.py): events/s, JAX and C.
6. Accuracy: 10 epochs of rsc15_xe_shared_100_best on yoochoose1_64 with JAX (run.py), Recall@20 and
   MRR@20 on its test set against the C backend's .7004 / .3061 (docs/results.md); within 0.005 passes.

--quick shortens 4 and 6 for a rehearsal (fewer mini-batches, one epoch, whose figures are not compared).
Exit status: 0 when every step passed, 1 when a test or a figure failed, 2 when JAX sees no GPU.
"""
import argparse
import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Recall@20 and MRR@20 of rsc15_xe_shared_100_best on yoochoose1_64 with the C backend (README), and how far
# the JAX run may be from them: seeds move both by about 0.002.
CPU_ACCURACY, TOLERANCE = (0.7004, 0.3061), 0.005
SPEED_SETTINGS = {'rsc15': ('yoochoose1_64_train_full', 'rsc15_xe_shared_100_best'),
                  'diginetica': ('diginetica_train_full', 'diginetica_bprmax_shared_best')}
# Wheels for another machine: pip download takes only the platform tags it is given, and projects tag their
# wheels with different manylinux versions (pandas: manylinux_2_17/manylinux2014, jaxlib: manylinux_2_27).
PLATFORMS = ['manylinux_2_28_x86_64', 'manylinux_2_27_x86_64', 'manylinux_2_17_x86_64', 'manylinux2014_x86_64']


def requirements():
    """setup.py's install_requires (read, not run) and what the tests need."""
    tree = ast.parse((ROOT / 'setup.py').read_text())
    setup = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'id', '') == 'setup')
    install = next(k.value for k in setup.keywords if k.arg == 'install_requires')
    return ast.literal_eval(install) + ['pytest>=7', 'hypothesis>=6.0']


def run(command, env=None, timeout=None, echo=True):
    """Runs a command, its output passed through (and returned); returns (status, output)."""
    print('$', ' '.join(str(c) for c in command), flush=True)
    start = time.time()
    try:
        out = subprocess.run([str(c) for c in command], cwd=ROOT, env=env, timeout=timeout, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        status, output = out.returncode, out.stdout
    except subprocess.TimeoutExpired as e:
        status, output = 124, (e.stdout or b'').decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
    if echo:
        print(output, end='' if output.endswith('\n') else '\n')
    print(f'  ({time.time() - start:.0f}s, exit status {status})', flush=True)
    return status, output


def download(folder, python_version, with_jax):
    """Wheels of every requirement (and with_jax: of jax[cuda12]) for a Linux x86-64 machine's Python."""
    command = [sys.executable, '-m', 'pip', 'download', '--only-binary=:all:', '--python-version', python_version,
               '-d', folder] + [f'--platform={p}' for p in PLATFORMS] + requirements()
    if with_jax:
        command.append('jax[cuda12]')
    status, _ = run(command)
    sys.exit(status)


def environment(args):
    """A virtual environment that sees the machine's packages, with the missing ones added; its python."""
    venv = Path(args.venv)
    python = venv / 'bin' / 'python'
    if not python.exists():
        status, _ = run([args.python, '-m', 'venv', '--system-site-packages', venv])
        if status:  # e.g. Debian's Python without python3-venv: no ensurepip; the machine's pip installs
            run([args.python, '-m', 'venv', '--system-site-packages', '--without-pip', venv])
    has_pip = subprocess.run([python, '-m', 'pip', '--version'], capture_output=True, check=False).returncode == 0
    pip = [python, '-m', 'pip'] if has_pip else [args.python, '-m', 'pip', '--python', python]
    # The machine's site-packages after the environment's own (a .pth file): whether the machine's
    # Python is the system's, a virtual environment's or conda's, pip sees what it has.
    listing = 'import site; print("\\n".join(site.getsitepackages() + [site.getusersitepackages()]))'
    machine = subprocess.run([args.python, '-c', listing], capture_output=True, text=True, check=True).stdout
    own = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, 'gru4rec_machine.pth').write_text(machine)
    has_jax = subprocess.run([python, '-c', 'import jax'], capture_output=True, check=False).returncode == 0
    wanted = requirements() + ([] if has_jax else ['jax' if args.allow_cpu else 'jax[cuda12]'])
    source = ['--no-index', '--find-links', args.wheels] if args.wheels else []
    print("JAX: the machine's own" if has_jax else f'JAX: none yet, adding {wanted[-1]}', flush=True)
    status, out = run([*pip, 'install', '--disable-pip-version-check', *source, *wanted], echo=False)
    added = [line for line in out.splitlines() if line.startswith('Successfully installed')]
    print(added[0] if added else 'nothing to add: the machine has every requirement', flush=True)
    if status:
        sys.exit(f'{out}\ncould not add the missing packages (above); without a network give --wheels DIR, made by '
                 '--download DIR on a machine with one')
    return python


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--allow-cpu', action='store_true', help='go on when JAX sees no GPU (a rehearsal)')
    parser.add_argument('--quick', action='store_true', help='shortened runs (a rehearsal): 200 mini-batches a '
                        'speed run, one epoch whose figures are not compared')
    parser.add_argument('--python', default='python3', help="the machine's Python (default %(default)s)")
    parser.add_argument('--venv', default='/tmp/gru4rec-gpucheck', help='the environment to use (default %(default)s)')
    parser.add_argument('--wheels', help='install missing packages from this folder only (no network)')
    parser.add_argument('--data', default=str(ROOT.parent / 'shared' / 'data'),
                        help='the folder of the data sets (default %(default)s)')
    parser.add_argument('--download', metavar='DIR', help='only download the wheels for --wheels into DIR')
    parser.add_argument('--python-version', default='3.12', help='with --download: the GPU machine\'s Python')
    parser.add_argument('--with-jax', action='store_true', help='with --download: also jax[cuda12]')
    args = parser.parse_args()
    if args.download:
        download(args.download, args.python_version, args.with_jax)
    data = Path(args.data)
    missing = [f for f in ('yoochoose1_64_train_full', 'yoochoose1_64_test', 'diginetica_train_full')
               if not (data / f'{f}.tsv.gz').exists()]
    if missing:
        sys.exit(f'{data} lacks {missing}: give --data the folder of the data sets')

    print('== 1. environment', flush=True)
    python = environment(args)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    print('== 2. devices', flush=True)
    report = ('import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "backend", '
              'jax.default_backend(), jax.devices())')
    status, out = run([python, '-c', report], env)
    on_gpu = 'backend gpu' in out
    if status or not on_gpu:
        message = ('JAX sees no GPU' if not status else 'JAX does not start') + (
            ': install a CUDA build of JAX (pip install -U "jax[cuda12]", see docs/gpu.md) or check the driver '
            '(nvidia-smi)')
        if not args.allow_cpu or status:
            print(f'\n*** FAILED: {message}. Figures measured now would be the CPU\'s. ***', file=sys.stderr)
            sys.exit(2)
        print(f'*** {message}; going on because of --allow-cpu: every JAX figure below is the CPU\'s ***')
    device = 'GPU' if on_gpu else 'CPU (--allow-cpu)'
    results, failed = [], []

    print('== 3. backend equivalence, JAX_DEFAULT_MATMUL_PRECISION=highest', flush=True)
    status, out = run([python, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_backends.py'],
                      dict(env, JAX_DEFAULT_MATMUL_PRECISION='highest'), timeout=1200)
    summary = (re.findall(r'^\d+ (?:passed|failed).*$', out, re.MULTILINE) or [f'exit status {status}'])[-1]
    results.append(f'backend equivalence tests: {summary}')
    if status:
        failed.append('backend equivalence tests')

    steps = 200 if args.quick else 3000
    print(f'== 4. training speed, {steps} mini-batches a run', flush=True)
    for name, (train, paramfile) in SPEED_SETTINGS.items():
        speeds = {}
        for backend in ('jax', 'c'):
            status, out = run([python, 'benchmarks/train_speed.py', '--data', data / f'{train}.tsv.gz', '--backend',
                               backend, '-pf', f'paramfiles/{paramfile}.py', '--steps', steps], env, timeout=1800)
            found = re.search(r'speed: ([\d.]+) mini-batches/s', out)
            speeds[backend] = float(found.group(1)) if found and not status else None
            if speeds[backend] is None:
                failed.append(f'training speed {name} {backend}')
        results.append(f'training {name} ({paramfile}): JAX on the {device} '
                       f'{speeds["jax"] or float("nan"):.1f} mini-batches/s, C on this CPU '
                       f'{speeds["c"] or float("nan"):.1f} mini-batches/s')

    print('== 5. evaluation speed', flush=True)
    test = data / 'yoochoose1_64_test.tsv.gz'
    speeds = {}
    for backend in ('jax', 'c'):
        status, out = run([python, 'benchmarks/eval_speed.py', '--data', data / 'yoochoose1_64_train_full.tsv.gz',
                           '--test', test, '--backend', backend, '-pf', 'paramfiles/rsc15_xe_shared_100_best.py',
                           '--train-steps', 50], env, timeout=1800)
        found = re.search(r'speed: ([\d,]+) events/s', out)
        speeds[backend] = found.group(1) if found and not status else 'failed'
        if speeds[backend] == 'failed':
            failed.append(f'evaluation speed {backend}')
    results.append(f'evaluation on {test.name} (batch 512, all items): JAX on the {device} {speeds["jax"]} events/s, '
                   f'C on this CPU {speeds["c"]} events/s')

    epochs = 1 if args.quick else 10
    print(f'== 6. accuracy: rsc15_xe_shared_100_best, {epochs} epoch(s) on yoochoose1_64 with JAX', flush=True)
    status, out = run([python, 'run.py', data / 'yoochoose1_64_train_full.tsv.gz', '-pf',
                       'paramfiles/rsc15_xe_shared_100_best.py', '-ps', f'n_epochs={epochs}', '--backend', 'jax',
                       '-t', data / 'yoochoose1_64_test.tsv.gz', '-m', '20'], env, timeout=7200)
    found = re.search(r'Recall@20: ([\d.]+) MRR@20: ([\d.]+)', out)
    if status or not found:
        failed.append('accuracy run')
        results.append('accuracy: the run failed')
    else:
        recall, mrr = float(found.group(1)), float(found.group(2))
        line = (f'accuracy ({epochs} epoch(s), JAX on the {device}): Recall@20 {recall:.4f}, MRR@20 {mrr:.4f}; '
                f'C backend, 10 epochs: {CPU_ACCURACY[0]:.4f} / {CPU_ACCURACY[1]:.4f}')
        if args.quick:
            line += ' (not compared: --quick trains one epoch)'
        elif max(abs(recall - CPU_ACCURACY[0]), abs(mrr - CPU_ACCURACY[1])) > TOLERANCE:
            failed.append('accuracy')
            line += f' -> FAILED (more than {TOLERANCE} apart)'
        else:
            line += ' -> passed'
        results.append(line)

    print('\n== summary')
    for line in results:
        print(line)
    print(f'FAILED: {", ".join(failed)}' if failed else 'every step passed', flush=True)
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
