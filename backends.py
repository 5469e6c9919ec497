"""The backends that PyTensor compiles GRU4Rec's graphs for, and the one place that knows about them.

The model, its training step and the evaluation build backend-neutral graphs and compile them with
compile_function. On the C backend, GRU4Rec's own C kernels (cbackend.py) are an optional accelerator:
they enter only through the graph rewrites of their compile mode, and they rest on PyTensor internals
that a PyTensor release may change. So cbackend is imported only when a C-backend function is compiled,
only when the kernels are wanted (the environment variable GRU4REC_C_KERNELS, read at every compilation:
0 turns them off), and only used when the internals it probes are there; otherwise (after one warning
naming what is missing) the plain PyTensor graphs, the definition of every computation, compile in
PyTensor's own C mode. JAX never imports cbackend. JAX needs every shape static, which
needs_static_shapes tells the code that pads batches.
"""
import functools
import os
import warnings

import pytensor
from pytensor.compile.builders import OpFromGraph
from pytensor.compile.mode import get_mode
from pytensor.graph.rewriting.basic import in2out, node_rewriter
from pytensor.tensor.rewriting.ofg import inline_ofg_node

# backend -> PyTensor's compile mode. PyTensor's Numba mode is not offered: compiling a tiny model's
# training step took about a minute there, too long for a test to train it (see benchmarks/README.md).
BACKENDS = {'c': 'CVM', 'jax': 'JAX'}
# The environment variable that turns the C kernels off ('0') or on ('1', the default).
C_KERNELS_VARIABLE = 'GRU4REC_C_KERNELS'


class CKernelsUnavailable(UserWarning):
    """The C kernels cannot be used with this PyTensor: training runs on the plain graphs."""


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f'backend={backend!r}: use one of {sorted(BACKENDS)}')


def needs_static_shapes(backend):
    """Whether the backend compiles only graphs whose shapes are all known (padded batches)."""
    return backend == 'jax'


def c_kernels_wanted():
    """Whether GRU4REC_C_KERNELS asks for the C kernels: '1' or unset yes, '0' no."""
    value = os.environ.get(C_KERNELS_VARIABLE, '1').strip()
    if value not in ('0', '1'):
        raise ValueError(f'{C_KERNELS_VARIABLE}={value!r}: set it to 1 (the C kernels, the default) or 0 '
                         '(the plain PyTensor graphs)')
    return value == '1'


@functools.cache
def _usable_cbackend():
    """The cbackend module when it imports and finds the PyTensor internals it probes, else None after
    one CKernelsUnavailable warning that names what is missing."""
    if not pytensor.config.cxx:
        return None  # no C compiler: PyTensor runs every op in Python, and says so itself
    try:
        import cbackend
    except Exception as error:  # noqa: BLE001  (whatever a changed PyTensor breaks, the kernels step aside)
        missing = [f'importing cbackend failed: {type(error).__name__}: {error}']
    else:
        missing = cbackend.missing_internals()
    if missing:
        warnings.warn(f'GRU4Rec trains without its C kernels (slower, same results) because PyTensor '
                      f'{pytensor.__version__} lacks internals they rely on: {"; ".join(missing)}. Set '
                      f'{C_KERNELS_VARIABLE}=0 to silence this, or install the PyTensor version that setup.py '
                      'names for the kernels.', CKernelsUnavailable, stacklevel=3)
        return None
    return cbackend


def c_kernels():
    """The cbackend module when the C kernels are wanted and usable, else None."""
    return _usable_cbackend() if c_kernels_wanted() else None


@node_rewriter([OpFromGraph])
def local_inline_row_loss(fgraph, node):
    """Inlines the losses of training.row_loss_op (and their gradients), which a backend with a kernel
    for them replaces: left in the graph, an OpFromGraph runs as a Python call into its own function."""
    if not (node.op.name or '').startswith('row_loss:'):
        return None
    return inline_ofg_node(node)


@functools.cache
def plain_c_mode():
    """PyTensor's C virtual machine with its own rewrites: the C backend without GRU4Rec's kernels."""
    return get_mode(BACKENDS['c']).register((in2out(local_inline_row_loss), 0.01))


def compile_function(inputs, outputs, updates=None, backend='c'):
    """pytensor.function in the compile mode of `backend` (a key of BACKENDS); GRU4Rec, the evaluation
    and the baselines compile every graph through it."""
    check_backend(backend)
    if backend == 'c':
        kernels = c_kernels()
        if kernels is not None:
            with pytensor.config.change_flags(**kernels.compile_flags()):
                return pytensor.function(inputs, outputs, updates=updates, mode=kernels.c_mode(),
                                         on_unused_input='ignore')
        return pytensor.function(inputs, outputs, updates=updates, mode=plain_c_mode(), on_unused_input='ignore')
    return pytensor.function(inputs, outputs, updates=updates, mode=get_mode(BACKENDS[backend]),
                             on_unused_input='ignore')
