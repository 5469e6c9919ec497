"""Save and load times of a large model, for the current code and, side by side in the same run, for the
code at another revision (default a82a4f0, before model files were checked as untrusted input).

The model: the architecture of a hyper-parameter preset (default rsc15_xe_shared_100_best) with --items
items and random weights and adagrad state, written once with modelfile.write (format 2) and once with
its header rewritten to format 1, which both versions read. Each version runs in its own process:
loadmodel (the first call includes compiling the graphs), loadmodel again, savemodel; then peak RSS.

    python benchmarks/load_speed.py --items 1000000 --repeat 2
"""
import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(code, path, out):
    """Times loadmodel twice and savemodel once with the gru4rec in directory `code`; prints JSON."""
    sys.path.insert(0, code)
    from gru4rec import GRU4Rec
    times = {}
    t0 = time.perf_counter()
    model = GRU4Rec.loadmodel(path)
    times['first load (s)'] = time.perf_counter() - t0
    del model
    t0 = time.perf_counter()
    model = GRU4Rec.loadmodel(path)
    times['load (s)'] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.savemodel(out)
    times['save (s)'] = time.perf_counter() - t0
    os.unlink(out)
    times['peak RSS (GiB)'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps(times))


def write_model_files(directory, n_items, params):
    """(format 2 path, format 1 path) of a model with n_items items and random weights."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import pandas as pd

    import gru4rec
    import modelfile
    parsed = gru4rec.parse_hyperparameters(**params)
    rng = np.random.default_rng(0)
    arrays = {}
    for name, shape in gru4rec.parameter_shapes(parsed, n_items).items():
        arrays[f'param/{name}'] = rng.uniform(-0.1, 0.1, shape).astype(np.float32)
        arrays[f'opt/adagrad_{name}'] = rng.uniform(0, 1, shape).astype(np.float32)
    arrays['opt/t'] = np.asarray(np.float32(0))
    arrays['support'] = rng.integers(1, 100, n_items).astype(np.float64)
    history = [{'epoch': 1, 'loss': 1.0, 'seconds': 1.0}]
    v2 = os.path.join(directory, 'model-v2.gru4rec')
    modelfile.write(v2, parsed, history, pd.Index(np.arange(n_items, dtype=np.int64) * 7 + 1), arrays)
    blob = Path(v2).read_bytes()
    n = int.from_bytes(blob[8:16], 'little')
    meta = json.loads(blob[16:16 + n])
    del meta['itemids']
    # reset_after came after format 1 (--before's code refuses it as unknown); its files read as False.
    if meta['params'].pop('reset_after'):
        sys.exit('format 1 has only the original GRU cell: use a preset with reset_after=False')
    header = json.dumps(dict(meta, version=1)).encode()
    v1_blob = modelfile.MAGIC + len(header).to_bytes(8, 'little') + header + blob[16 + n:-32]
    v1 = os.path.join(directory, 'model-v1.gru4rec')
    Path(v1).write_bytes(v1_blob + hashlib.sha256(v1_blob).digest())
    return v2, v1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--items', type=int, default=1000000)
    parser.add_argument('--before', default='a82a4f0', help='the revision to compare with (default %(default)s)')
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from common import add_common_arguments, read_params
    add_common_arguments(parser)  # -ps, -pf, --backend (--data is not used)
    parser.set_defaults(params='rsc15_xe_shared_100_best')
    parser.add_argument('--repeat', type=int, default=2, help='runs of each version, alternating')
    parser.add_argument('--worker', nargs=3, metavar=('CODE', 'MODEL', 'OUT'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    params = read_params(args)
    with tempfile.TemporaryDirectory() as tmp:
        before = os.path.join(tmp, 'before')
        os.mkdir(before)
        # Every top-level module of that revision, so that none is taken from the current code instead.
        archive = subprocess.run(['git', '-C', str(ROOT), 'archive', args.before, '--', ':(glob)*.py'],
                                 check=True, capture_output=True).stdout
        subprocess.run(['tar', '-x', '-C', before], input=archive, check=True)
        v2, v1 = write_model_files(tmp, args.items, params)
        print(f'{args.items} items, {args.params}; files: format 2 {os.path.getsize(v2) / 2 ** 20:.0f} MiB, '
              f'format 1 {os.path.getsize(v1) / 2 ** 20:.0f} MiB', flush=True)
        runs = [('before ' + args.before, before, v1), ('now, format 1 file', str(ROOT), v1),
                ('now, format 2 file', str(ROOT), v2)]
        for _ in range(args.repeat):
            for label, code, path in runs:
                result = subprocess.run([sys.executable, __file__, '--worker', code, path,
                                         os.path.join(tmp, 'saved.gru4rec')],
                                        stdout=subprocess.PIPE, text=True, check=True)
                times = json.loads(result.stdout.strip().splitlines()[-1])
                print(f'{label:22s} ' + '  '.join(f'{k} {v:.2f}' for k, v in times.items()), flush=True)


if __name__ == '__main__':
    main()
