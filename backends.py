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

On JAX the arrays live on the device (a GPU when JAX has one): the shared variables hold device arrays
(set_shared), a call's varying inputs travel by one explicit upload (call), results come back by one
explicit download of many values at once (to_host), and every buffer that a step's updates replace is
donated to it (DonatingJAXLinker). Nothing moves between host and device behind the code's back, which
tests/test_backends.py checks under jax.transfer_guard('disallow').
"""
import functools
import os
import warnings

import numpy as np
import pytensor
from pytensor.compile.builders import OpFromGraph
from pytensor.compile.mode import Mode, get_mode
from pytensor.graph.rewriting.basic import in2out, node_rewriter
from pytensor.link.jax.linker import JAXLinker
from pytensor.tensor.rewriting.ofg import inline_ofg_node


class DonatingJAXLinker(JAXLinker):
    """PyTensor's JAX linker, with the buffers of the inputs that the function's updates replace donated
    to the compiled program (jax.jit's donate_argnums; see "Buffer donation" in JAX's documentation).

    PyTensor stores each update's output in its shared variable after the call, so the old value is never
    read again; without donation XLA must write the new item matrix and optimiser tables beside the old
    ones, a full copy of each on every step and twice the memory (benchmarks/README.md). An input whose
    value is still referenced elsewhere (a numpy view of it on a CPU) is copied by JAX instead, so
    donation never changes a result. Graphs whose shapes are scalar inputs (none of GRU4Rec's) keep
    PyTensor's own jit."""

    def donated_inputs(self):
        """The positions of the inputs that an update replaces (the jitted function's arguments are the
        function graph's inputs, in order)."""
        return tuple(sorted(set((self.fgraph.update_mapping or {}).values())))

    def jit_compile(self, fn):
        if self.scalar_shape_inputs:
            return super().jit_compile(fn)
        import jax
        return jax.jit(fn, donate_argnums=self.donated_inputs())


# backend -> PyTensor's compile mode. PyTensor's Numba mode is not offered: compiling a tiny model's
# training step took about a minute there, too long for a test to train it (see benchmarks/README.md).
BACKENDS = {'c': 'CVM', 'jax': 'JAX'}
# PyTensor's JAX mode (its graph rewrites), linked with donation.
JAX_MODE = Mode(DonatingJAXLinker(), get_mode('JAX').provided_optimizer)

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


def compile_function(inputs, outputs, updates=None, backend='c', keep_buffers=False):
    """pytensor.function in the compile mode of `backend` (a key of BACKENDS); GRU4Rec, the evaluation
    and the baselines compile every graph through it.

    keep_buffers: a function called many times on inputs of one shape (the training step); with the C
    kernels it keeps its intermediate results' arrays between calls where they fit in the cache
    (cbackend.KeptBuffersVMLinker)."""
    check_backend(backend)
    if backend == 'c':
        kernels = c_kernels()
        if kernels is not None:
            with pytensor.config.change_flags(**kernels.compile_flags()):
                return pytensor.function(inputs, outputs, updates=updates, mode=kernels.c_mode(keep_buffers),
                                         on_unused_input='ignore')
        return pytensor.function(inputs, outputs, updates=updates, mode=plain_c_mode(), on_unused_input='ignore')
    return pytensor.function(inputs, outputs, updates=updates, mode=JAX_MODE, on_unused_input='ignore')


def set_shared(var, value, backend):
    """var.set_value(value), checked and converted by var's type as set_value does, then kept on the
    device on JAX: a compiled function reads it there, where a numpy value would be uploaded on every
    call (PyTensor itself stores a JAX function's updates in the shared variables as device arrays)."""
    var.set_value(value)  # a copy: the caller's array is never donated or aliased
    if backend == 'jax':
        import jax
        var.container.storage[0] = jax.device_put(var.container.storage[0])


def call(fn, *values):
    """fn(*values) for a function that compile_function compiled. On JAX the host values are checked and
    converted by the types of fn's inputs, as the call itself checks them, then uploaded together by one
    explicit device_put (device arrays, the outputs of earlier calls, pass as they are), and the call
    trusts them: it transfers nothing itself (a JAX function that checks its inputs reads device arrays
    back to the host to do it)."""
    if not isinstance(fn.maker.linker, JAXLinker):
        return fn(*values)
    import jax
    containers = fn.input_storage[:len(values)]
    if len(values) != sum(not i.implicit for i in fn.maker.inputs):
        raise TypeError(f'the function takes {sum(not i.implicit for i in fn.maker.inputs)} inputs, got {len(values)}')
    checked = [v if isinstance(v, jax.Array) else c.type.filter(v, strict=c.strict, allow_downcast=c.allow_downcast)
               for c, v in zip(containers, values)]
    trusted = fn.trust_input
    fn.trust_input = True
    try:
        return fn(*jax.device_put(checked))
    finally:
        fn.trust_input = trusted


def to_host(values):
    """Numpy copies of a list of results (device arrays, numpy arrays or scalars), fetched in one go:
    a device array is waited for and copied only here, so the code that collects results never stops the
    device. The copies are the caller's own: a view of a device buffer (what a CPU device gives) would
    change when a later step reuses the buffer, and would keep JAX from donating it."""
    if any(type(v).__module__.startswith('jax') for v in values):
        import jax
        values = jax.device_get(list(values))
    return [np.array(v) for v in values]
