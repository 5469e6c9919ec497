"""Helpers shared by the benchmark scripts: loading a data set (or generating one), hyper-parameters
from a k=v string or a parameter file, peak memory."""
import os
import resource
import sys
from collections import OrderedDict
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from run import read_paramfile  # noqa: E402  (after the path: the repository's own module)
DATA_DIR = ROOT.parent / 'shared' / 'data'

PRESETS = {
    'rsc15_xe_shared_100_best': 'loss=cross-entropy,final_act=softmax,layers=100,batch_size=32,dropout_p_embed=0.0,'
                                'dropout_p_hidden=0.4,learning_rate=0.2,momentum=0.2,sample_alpha=0.5,bpreg=0.0,'
                                'logq=1.0,constrained_embedding=True,embedding=0,n_sample=2048,adapt=adagrad',
    'retailrocket_bprmax_shared_best': 'loss=bpr-max,final_act=elu-0.5,layers=224,batch_size=80,dropout_p_embed=0.5,'
                                       'dropout_p_hidden=0.05,learning_rate=0.05,momentum=0.4,sample_alpha=0.4,'
                                       'bpreg=1.95,logq=0.0,constrained_embedding=True,embedding=0,n_sample=2048,'
                                       'adapt=adagrad',
}


def add_common_arguments(parser):
    parser.add_argument('--data', default='rsc15_100k_train_full',
                        help='a file in ../shared/data (name without .tsv.gz), a path to a TSV, or '
                             'synthetic:EVENTS:ITEMS[:SEED] for a generated log (default %(default)s)')
    parser.add_argument('-ps', '--params', default='',
                        help='hyper-parameters as k=v,k=v, or the name of a preset: ' + ', '.join(PRESETS))
    parser.add_argument('-pf', '--paramfile', help='a Python file defining an ordered dict gru4rec_params')
    parser.add_argument('--backend', help="'c' or 'jax' (overrides the parameters)")


def load_log(spec):
    """A session log from ../shared/data, a TSV path or 'synthetic:EVENTS:ITEMS[:SEED]'."""
    if spec.startswith('synthetic:'):
        from synthetic import generate_sessions
        n_events, n_items, *seed = (int(float(v)) for v in spec.split(':')[1:])
        return generate_sessions(n_events, n_items, seed=seed[0] if seed else 0)
    path = Path(spec)
    if not path.exists():
        path = DATA_DIR / f'{spec}.tsv.gz'
    if not path.exists():
        sys.exit(f'{spec}: no such file, and no {path} (is ../shared/data there?)')
    return pd.read_csv(path, sep='\t', dtype={'SessionId': 'int64', 'ItemId': 'int64', 'Time': 'float64'})


def read_params(args):
    params = OrderedDict()
    if args.paramfile:
        params.update(read_paramfile(args.paramfile))
    text = PRESETS.get(args.params, args.params)
    for pair in filter(None, text.split(',')):
        key, _, value = pair.partition('=')
        params[key.strip()] = value.strip()
    if args.backend:
        params['backend'] = args.backend
    return params


def peak_rss_mb():
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def describe_blas(backend):
    if backend != 'c':
        return "the backend's own"
    import pytensor
    try:
        from backends import c_kernels  # the C kernels link their own BLAS; PyTensor's plain C mode does not
        kernels = c_kernels()
    except ImportError:  # a version of GRU4Rec before the kernels became optional
        import cbackend as kernels
    flags = kernels.blas_ldflags() if kernels is not None else pytensor.config.blas__ldflags
    return ' '.join(f for f in flags.split() if not f.startswith('-D')) if flags else 'none'


def threads():
    return os.environ.get('OMP_NUM_THREADS') or os.environ.get('OPENBLAS_NUM_THREADS') or 'default'
