"""The backends that PyTensor compiles GRU4Rec's graphs for, and the one place that knows about them.

The model, its training step and the evaluation build backend-neutral graphs and compile them with
compile_function. The C backend's own kernels (cbackend.py) enter only through the graph rewrites of its
compile mode; JAX needs every shape static, which needs_static_shapes tells the code that pads batches.
"""
import pytensor
from pytensor.compile.mode import get_mode

import cbackend

# backend -> PyTensor's compile mode. PyTensor's Numba mode is not offered: compiling a tiny model's
# training step took about a minute there, too long for a test to train it (see benchmarks/README.md).
BACKENDS = {'c': 'CVM', 'jax': 'JAX'}


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f'backend={backend!r}: use one of {sorted(BACKENDS)}')


def needs_static_shapes(backend):
    """Whether the backend compiles only graphs whose shapes are all known (padded batches)."""
    return backend == 'jax'


def compile_function(inputs, outputs, updates=None, backend='c'):
    """pytensor.function in the compile mode of `backend` (a key of BACKENDS); GRU4Rec, the evaluation
    and the baselines compile every graph through it."""
    check_backend(backend)
    if backend == 'c':
        with pytensor.config.change_flags(**cbackend.compile_flags()):
            return pytensor.function(inputs, outputs, updates=updates, mode=cbackend.c_mode(),
                                     on_unused_input='ignore')
    return pytensor.function(inputs, outputs, updates=updates, mode=get_mode(BACKENDS[backend]),
                             on_unused_input='ignore')
