"""PyTensor's C backend set up for GRU4Rec's graphs on a CPU.

A pip-installed PyTensor 3 runs much of these graphs slowly on its C backend (its default is now
Numba, whose element-wise exp/log are scalar calls and whose BLAS threads, on a shared machine, spin).
This module fixes each cause for the functions GRU4Rec compiles, leaving PyTensor's global
configuration alone (compile_flags() is applied only around GRU4Rec's own compilations):

1. No BLAS. PyTensor's C code calls BLAS through its Fortran names (sgemm_, ...) and links whatever
   `blas__ldflags` names; pip installs none that it finds, so every matrix product is a Python call
   into numpy. The scipy-openblas32 wheel ships OpenBLAS as a shared library whose symbols carry a
   `scipy_` prefix: we link it and map the names with the preprocessor. One BLAS thread.
2. Scalar math. The element-wise loops call expf, logf, ... one value at a time. glibc has vector
   versions (libmvec) that gcc calls when `__FAST_MATH__` is defined and errno is not needed
   (PyTensor already compiles with -fno-math-errno). Defining the macro alone turns them on without
   the rest of -ffast-math: no reassociation, NaN and infinity kept; results within a few ulp.
3. Row scatters in Python. Writing gathered rows back into a matrix (AdvancedIncSubtensor1 on a
   matrix: the sparse updates of item embeddings and their optimiser state) has no C code in PyTensor 3
   and runs numpy's np.add.at. `RowScatter` is a C loop over the rows, swapped in by a graph rewrite
   for in-place scatters of matrices.
4. Reductions. PyTensor's C reductions walk a generic strided loop one element at a time (a row sum
   of a matrix ran many times slower than numpy's), and numpy's, called from Python, cost a call each;
   `MatrixReduce` sums, maxima and minima of vectors and matrices over rows, columns or everything
   in a vectorised C loop. Element-wise work is not fused into reductions.
5. Softmax is an op that PyTensor 3's C backend runs in Python. `RowSoftmax` computes it in C, a row
   at a time while the row is in cache. (PyTensor's rewrite that turns a written-out softmax into the
   op is off: on a training graph it leaves the gradient recomputing the exponentials.)
6. A product whose gradient is used twice with different constant factors is computed once (the
   dot22scalar rewrite would fold each factor into its own copy of the product).
7. The sparse Adagrad step of the item matrices. As a graph it gathers the step's rows of the weights,
   of the accumulator and of the velocity, computes the step on the copies, and scatters three
   results back: a large part of a training step, mostly memory traffic and a fused element-wise
   loop (see 9.). `RowAdagrad` does it in one pass over each row, in place. The optimiser
   (training.py) writes the graph, the definition on every backend; `RowAdagradRewrite` recognises
   it in this mode and substitutes the op (the tests check that it does, and that the two agree). The dense
   weights' step too, as the op of all their rows, shared out over the cores (16).
   The rows' gradient itself was a zero matrix that the scored columns' and the inputs' rows were
   scattered into, read only by the update: `RowAdagrad` takes those rows and their places instead
   and sums each row's where it uses it (`local_row_adagrad_of_scatters`).
8. Ranking. Evaluation counts, per row, the scores above (or equal to) the target's: as a graph, a
   boolean matrix of all items and a reduction over it. `RowCount` counts in one pass.
9. Loops gcc would not vectorise. Its guessed branch probabilities mark each compiled op's run() as
   cold, so it compiled PyTensor's generated loops and ours for size, unvectorised:
   -fno-guess-branch-probability restores vectorisation (e.g. of a fused Adagrad update). A fused loop
   of a loss and its gradient reads and writes a dozen arrays that might
   overlap; gcc checks the overlaps at run time only up to 10 pairs and otherwise leaves the loop
   scalar: --param=vect-max-version-for-alias-checks=1000 (e.g. BPR-max's 9-input, 6-output loop).
   -fno-tree-sink: gcc sank a libm call into the branch of a select that uses it, and the
   branch stopped vectorisation (of switch(x >= 0, g, 0.5 * g * exp(x)), in an ELU's gradient).
   -fopenmp-simd honours `#pragma omp simd` (no OpenMP runtime), used for the max and sum reductions
   of RowSoftmax.
   -g0 overrides the -g of PyTensor's compile command: debug information for generated modules was
   a fifth of what compiling one cost (see 12.).
   -mprefer-vector-width=512: on a CPU with AVX-512, gcc still vectorises 8 floats at a time unless told
   otherwise; 16 at a time (and libmvec's 16-wide exp) made BPR-max's kernel a third faster and the fused
   element-wise loops a tenth (benchmarks/README.md). Without AVX-512 the flag changes nothing.
10. Element-wise loops over strided or broadcast operands (`local_contiguous_elemwise_inputs`) and
   boolean arrays between loops (the ELU is written without one, see gru4rec._positive_part) ran
   scalar; see the rewrite's docstring.
11. One BLAS thread for every product. OpenBLAS's worker threads spin between calls: on a small product
   they cost more than they share, on a large one (the 128 x 512 x 2,176 products of the large tuned
   settings) a second core nearly halves the product's time. `ThreadedDot22` and `ThreadedGemm` give
   OpenBLAS, before each call, the threads that the call's size wins with (THREADED_PRODUCT_MACS); in a
   step with large products the mid-sized ones get them too, rather than switching (STEADY_PRODUCT_MACS).
   Where the process has workers (worker_pool.c, see 16) those threads are its workers instead: the product
   in pieces, one per thread, each a one-thread BLAS call, so that OpenBLAS's threads never spin on the
   core that the step's other kernels share out.
12. Compile time. A first run compiles dozens of modules, each parsing the same Python and numpy
   headers first: precompiled_headers() precompiles them once (see benchmarks/cold_start.py). PyTensor
   compiles them one after another; ParallelBuildVMLinker runs the compilers on every core first.
13. The BPR-max loss and its gradient. As a graph they are a dozen element-wise passes and reductions
   over the whole batch x scored-items matrix, with copies of broadcast columns between them.
   training.row_loss_op hands every training loss, with the final activation before it, over as one
   op; `RowBPRMax` computes BPR-max's (with an ELU or no final activation inside) a row at a time while
   the row is in cache, the graphs of the other losses are inlined (`local_row_loss`), and the op of the
   gradient computes the loss in the same passes, standing for the loss's own op (`local_row_loss_once`):
   three exps per score instead of seven. Cross-entropy's (of a softmax, without label smoothing):
   `RowCrossEntropy`, one exp per score and one pass where the graph made five.
14. Row gathers. PyTensor's gather of a step's item rows (AdvancedSubtensor1) has numpy take them into a
   new array through an intermediate copy on every call; `RowGather` copies each row once, into the
   previous call's array, prefetching the rows ahead (`local_row_gather`). The step gathers its distinct item
   rows, then the scored columns' rows from those: one gather of the matrix instead (`local_gather_of_gather`).
   Vectors too (biases, logQ): numpy's take cost 7 ns an entry.
15. Gradients of a product sliced into column ranges (the GRU's gates) are written into a zero matrix one range
   at a time: where the ranges tile it, one Join instead (`local_column_pieces_as_join`).
16. The output layer on one core. Its gather, three products, loss kernel and column sum ran one after another,
   and only the products could use a second core (OpenBLAS's threads, product by product). `OutputLayer`
   computes the whole layer in chunks of columns that the calling thread and a worker thread claim as they
   come (`local_output_layer`); `RowAdagrad` shares a matrix's rows the same way, and the products their
   pieces (11). The workers (worker_pool.c) are the process's, one pool for every module that includes
   them; they wait for the next task for a millisecond, longer than a step's gaps, then sleep.
"""
import concurrent.futures
import contextlib
import ctypes
import functools
import glob
import hashlib
import inspect
import math
import os
import re
import shutil
import string
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings

import numpy as np
import pytensor
import pytensor.tensor as pt
from pytensor.compile.mode import Mode, optdb
import pytensor.link.c as c_package
from pytensor.compile.builders import OpFromGraph
from pytensor.graph.basic import Apply
from pytensor.graph.fg import FunctionGraph
from pytensor.graph.features import ReplaceValidate
from pytensor.graph.rewriting.basic import GraphRewriter, in2out, node_rewriter
from pytensor.graph.replace import clone_replace
from pytensor.graph.rewriting.db import RewriteDatabase
from pytensor.graph.traversal import ancestors
from pytensor.graph.utils import MethodNotDefined
from pytensor.link.c.basic import CLinker, get_module_cache
from pytensor.link.c.cmodule import GCC_compiler, dlimport, get_lib_extension, get_module_hash, std_include_dirs
from pytensor.link.c.op import COp
from pytensor.link.vm import VMLinker
from pytensor.scalar import basic as ps
from pytensor.tensor.elemwise import CAReduce, DimShuffle, Elemwise
from pytensor.tensor.special import Softmax
from pytensor.tensor.blas import Dot22, Gemm, GemmRelated
from pytensor.tensor.type import TensorType
from pytensor.tensor.exceptions import NotScalarConstantError
from pytensor.tensor.rewriting.ofg import inline_ofg_node
from pytensor.tensor.subtensor import (AdvancedIncSubtensor, AdvancedIncSubtensor1, AdvancedSubtensor,
                                      AdvancedSubtensor1, IncSubtensor, Subtensor, get_idx_list)

# The kernels' C source: one file per kernel, C with ${name} placeholders (see kernel()).
KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cbackend_kernels')


@functools.cache
def _kernel_template(name):
    with open(os.path.join(KERNEL_DIR, name), encoding='utf-8') as f:
        return string.Template(f.read())


def kernel(name, **values):
    """The C of cbackend_kernels/<name> with its ${...} placeholders filled in by `values`: PyTensor's names
    of a node's variables, dtypes, constants, and 0 or 1 for the preprocessor's #if of a variant."""
    return _kernel_template(name).substitute({k: int(v) if isinstance(v, bool) else v for k, v in values.items()})


# The rewrites of PyTensor's fast_run that c_mode() leaves out by name.
EXCLUDED_REWRITES = ('symbolic_op_recognition', 'local_careduce_fusion', 'local_dot22_to_dot22scalar')


def _rewrite_names(db, seen=None):
    """Every name and tag registered in PyTensor's rewrite database `db` and the databases inside it."""
    seen = set() if seen is None else seen
    if id(db) in seen:
        return set()
    seen.add(id(db))
    table = getattr(db, '__db__', None) or {}
    names = set(table)
    for rewriters in table.values():
        for rewriter in rewriters:
            if isinstance(rewriter, RewriteDatabase):
                names |= _rewrite_names(rewriter, seen)
    return names


def missing_internals():
    """What of PyTensor's compile and link machinery this module relies on is missing or different, in
    words ([] when everything is there). It probes the attributes, signatures and names that the module
    uses rather than trusting a version number: backends.py uses the kernels only when this is empty."""
    missing = []

    def need(ok, what):
        if not ok:
            missing.append(what)

    compile_str = getattr(GCC_compiler, 'compile_str', None)
    try:
        parameters = set(inspect.signature(compile_str).parameters) if callable(compile_str) else set()
    except (TypeError, ValueError):
        parameters = set()
    need({'module_name', 'src_code', 'location', 'include_dirs', 'lib_dirs', 'libs', 'preargs', 'py_module',
          'hide_symbols'} <= parameters,
         'GCC_compiler.compile_str(module_name, src_code, location, include_dirs, lib_dirs, libs, preargs, '
         'py_module, hide_symbols)')
    for method in ('accept', 'compile_args', 'cmodule_key', 'get_dynamic_module', 'header_dirs', 'lib_dirs',
                   'libraries'):
        need(callable(getattr(CLinker, method, None)), f'CLinker.{method}')
    need(callable(getattr(VMLinker, 'make_all', None)), 'VMLinker.make_all')
    try:
        need('use_cloop' in inspect.signature(VMLinker).parameters, 'VMLinker(use_cloop=...)')
    except (TypeError, ValueError):
        missing.append('VMLinker(use_cloop=...)')
    need(callable(getattr(pytensor.config, 'fetch_val_for_key', None)), 'pytensor.config.fetch_val_for_key')
    try:
        from pytensor.tensor.blas_headers import blas_header_text  # noqa: F401  (blas_ldflags imports it)
    except ImportError:
        missing.append('pytensor.tensor.blas_headers.blas_header_text')
    try:
        cache = get_module_cache()
    except Exception as error:  # noqa: BLE001  (a probe: any failure means the cache is not as expected)
        cache, _ = None, missing.append(f'get_module_cache() ({type(error).__name__}: {error})')
    if cache is not None:
        for table in ('entry_from_key', 'module_hash_to_key_data'):
            need(isinstance(getattr(cache, table, None), dict), f'the module cache\'s dict {table}')
    for op, methods in ((Dot22, ('c_code', 'c_support_code', 'c_code_cache_version')),
                        (Gemm, ('c_code', 'c_support_code', 'c_code_cache_version'))):
        for method in methods:
            need(callable(getattr(op, method, None)), f'{op.__name__}.{method}')
    need('inplace' in getattr(Gemm, '__props__', ()), "Gemm's property inplace")
    for op, props in ((AdvancedIncSubtensor1, ('inplace', 'set_instead_of_inc')), (Softmax, ('axis',)),
                      (DimShuffle, ('new_order',))):
        instance_props = set(getattr(op, '__props__', ()))
        for prop in props:
            need(prop in instance_props, f'{op.__name__}\'s property {prop}')
    need(callable(getattr(Mode, 'register', None)) and callable(getattr(Mode, 'excluding', None)),
         'Mode.register and Mode.excluding')
    names = _rewrite_names(optdb)
    for name in EXCLUDED_REWRITES:
        need(name in names, f'the rewrite {name!r}')
    need(os.path.isdir(os.path.join(os.path.dirname(c_package.__file__), 'c_code')), 'pytensor/link/c/c_code')
    if not os.path.isdir(KERNEL_DIR):  # not PyTensor's: an installation without the kernels' C files
        missing.append(f'(not in PyTensor) the kernels\' C source in {KERNEL_DIR}')
    return missing


@functools.cache
def blas_ldflags():
    """Link flags for BLAS: the user's (PYTENSOR_FLAGS or .pytensorrc), else scipy-openblas32's, else
    whatever PyTensor finds by itself (often nothing)."""
    try:
        pytensor.config.fetch_val_for_key('blas__ldflags')
        return pytensor.config.blas__ldflags
    except KeyError:
        pass
    try:
        import scipy_openblas32
    except ImportError:
        return pytensor.config.blas__ldflags
    from pytensor.tensor.blas_headers import blas_header_text
    lib_dir = scipy_openblas32.get_lib_dir()
    library = scipy_openblas32.get_library()
    if 'OPENBLAS_NUM_THREADS' not in os.environ:
        # One thread unless a product asks for more (see ThreadedDot22): on a small product, OpenBLAS's
        # spinning worker threads cost more than they share.
        for path in glob.glob(os.path.join(lib_dir, f'lib{library}.*')):
            ctypes.CDLL(path).scipy_openblas_set_num_threads(1)
    with warnings.catch_warnings():
        # Reading the flag's default makes PyTensor look for a BLAS of its own and warn that it found
        # none, which no longer matters: we link this one.
        warnings.filterwarnings('ignore', 'PyTensor could not link to a BLAS installation')
        with pytensor.config.change_flags(blas__ldflags='-l' + library):
            names = sorted(set(re.findall(r'\b([a-z][a-z0-9]*_)\s*\(', blas_header_text())))
    renames = [f'-D{name}=scipy_{name}' for name in names]
    return ' '.join([f'-L{lib_dir}', f'-l{library}', f'-Wl,-rpath,{lib_dir}'] + renames)


def product_threads():
    """The BLAS threads that a large product gets: the cores this process may run on. 1 (every
    product on one thread) when the user chose the threads (OPENBLAS_NUM_THREADS), or when the linked
    BLAS is not scipy-openblas32, whose thread control the threaded products call."""
    if 'OPENBLAS_NUM_THREADS' in os.environ or '-lscipy_openblas' not in blas_ldflags():
        return 1
    return usable_cores()


def usable_cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


# The multiply-adds (rows x inner x columns) from which a product runs on product_threads() threads: the
# 100-unit settings' output-layer products (32 x 100 x 2,080: 6.7M) win on two threads inside their step,
# smaller ones lose (benchmarks/README.md, "Threads per product").
THREADED_PRODUCT_MACS = 5_000_000
# In a graph whose largest product (by its static shape) reaches THREADED_PRODUCT_MACS, every product from
# this size runs on product_threads() threads too: changing OpenBLAS's thread count between the products of
# a step cost more than the mid-sized products lose on two threads (benchmarks/README.md, "Second round").
STEADY_PRODUCT_MACS = 2_000_000


class ThreadedProduct:
    """Dot22 or Gemm on `threads` threads from `threshold` multiply-adds, else one. Without split, OpenBLAS's
    own threads: the op first sets OpenBLAS's thread count for the product at hand (OpenBLAS keeps the count
    until the next call sets it, so every product of a compiled function sets its own). With split, the
    process's workers (worker_pool.c): the product in pieces, each a one-thread BLAS call, so that OpenBLAS's
    threads, which spin on a core for a while after each product, never start (split_product_support.c)."""

    def __init__(self, threads, *args, threshold=THREADED_PRODUCT_MACS, split=False, **kwargs):
        self.threads, self.threshold, self.split = threads, threshold, split
        super().__init__(*args, **kwargs)

    def in_pieces(self):
        """Whether the product goes in pieces: split, with a BLAS to link (without one, PyTensor's Gemm code calls
        its own numpy-based BLAS functions, in one piece; a copied function is compiled again that way)."""
        return self.split and bool(self.c_libraries())

    def c_support_code(self, **kwargs):
        code = super().c_support_code(**kwargs) + kernel('threaded_product_support.c')
        return code + kernel('worker_pool.c') + kernel('split_product_support.c') if self.in_pieces() else code

    def c_headers(self, **kwargs):
        return super().c_headers(**kwargs) + (worker_pool_headers() if self.in_pieces() else [])

    def c_code(self, node, name, inputs, outputs, sub):
        x, y = inputs[self.operands]
        product = super().c_code(node, name, inputs, outputs, sub)
        if not self.in_pieces():
            return kernel('threaded_product.c', x=x, y=y, threads=self.threads, threshold=self.threshold) + product
        calls = product.count('sgemm_(') + product.count('dgemm_(')
        if not calls:
            raise NotImplementedError('ThreadedProduct(split=True): no BLAS call found in the product code')
        product = product.replace('sgemm_(', 'split_product::gemm(split_threads, ').replace(
            'dgemm_(', 'split_product::gemm(split_threads, ')
        before = kernel('split_product.c', x=x, y=y, threads=self.threads, threshold=self.threshold)
        return '{\n' + before + product + '}\n'  # a block: the product's failures jump out of it

    def c_code_cache_version(self):
        version = super().c_code_cache_version()
        return version and (7, *version)


class ThreadedDot22(ThreadedProduct, Dot22):
    __props__ = ('threads', 'threshold', 'split')
    operands = slice(0, 2)  # x, y of x . y


class ThreadedGemm(ThreadedProduct, Gemm):
    __props__ = ('inplace', 'threads', 'threshold', 'split')
    operands = slice(2, 4)  # x, y of b * z + a * x . y


def static_macs(node):
    """The multiply-adds of a Dot22 or Gemm node, from its operands' static shapes (None where unknown)."""
    x, y = node.inputs[ThreadedDot22.operands if isinstance(node.op, Dot22) else ThreadedGemm.operands]
    dims = (*x.type.shape, y.type.shape[1])
    return None if None in dims else dims[0] * dims[1] * dims[2]


class ThreadedProductRewrite(GraphRewriter):
    """Every Dot22 and Gemm as ThreadedDot22 / ThreadedGemm (when more than one thread is to be had): each
    product on product_threads() threads from THREADED_PRODUCT_MACS, or, in a graph whose largest
    product with a static shape reaches that, from STEADY_PRODUCT_MACS (see there); in pieces on the
    process's worker_threads() workers where it has them (split), else on OpenBLAS's threads."""

    def apply(self, fgraph):
        threads = product_threads()
        products = [n for n in fgraph.toposort() if type(n.op) in (Dot22, Gemm)]
        if threads == 1 or not products:
            return
        largest = max((m for m in map(static_macs, products) if m is not None), default=0)
        threshold = STEADY_PRODUCT_MACS if largest >= THREADED_PRODUCT_MACS else THREADED_PRODUCT_MACS
        split = worker_threads() > 1  # on the process's workers, where it has them
        if split:
            threads = worker_threads()
        for node in products:
            if type(node.op) is Dot22:
                new = ThreadedDot22(threads, threshold=threshold, split=split)(*node.inputs, return_list=True)
            else:
                new = ThreadedGemm(threads, inplace=node.op.inplace, threshold=threshold, split=split)(
                    *node.inputs, return_list=True)
            fgraph.replace_all_validate(list(zip(node.outputs, new)), reason='threaded_product')

    def add_requirements(self, fgraph):
        fgraph.attach_feature(ReplaceValidate())


def compile_flags():
    """pytensor.config flags to compile GRU4Rec's functions with on the C backend."""
    cxxflags = (pytensor.config.gcc__cxxflags
                + ' -D__FAST_MATH__ -fno-guess-branch-probability -fno-tree-sink -fopenmp-simd'
                + ' --param=vect-max-version-for-alias-checks=1000 -mprefer-vector-width=512 -g0').strip()
    return {'blas__ldflags': blas_ldflags(),
            'gcc__cxxflags': f'{cxxflags} {precompiled_headers(cxxflags, pytensor.config.compiledir)}'.strip()}


# What every C module that PyTensor generates includes first, in its order.
MODULE_HEADERS = ['Python.h', 'pytensor_mod_helper.h', 'math.h', 'numpy/arrayobject.h', 'numpy/arrayscalars.h',
                  'numpy/npy_math.h', 'vector', 'algorithm']


@functools.cache
def precompiled_headers(cxxflags, compiledir):
    """'-IDIR' where DIR holds a Python.h that includes MODULE_HEADERS, and that header precompiled
    with the flags PyTensor compiles a module with (gcc__cxxflags = cxxflags). A module's first line,
    #include <Python.h>, then finds DIR first, and gcc loads the precompiled headers instead of parsing
    them again: about half of what compiling a small op costs, and a cold start compiles dozens. Where
    the .gch does not fit a module's flags, gcc reads DIR/Python.h, which includes the same headers.
    '' (no precompiled headers) when building them fails. Built once per compiler, flags and
    compile directory, into the compile directory, atomically."""
    if not pytensor.config.cxx:
        return ''
    x = pt.vector('x', dtype='float32')
    with pytensor.config.change_flags(gcc__cxxflags=cxxflags):
        args = CLinker().accept(FunctionGraph([x], [x + 1])).compile_args()
    include_dirs = std_include_dirs() + [os.path.join(os.path.dirname(c_package.__file__), 'c_code')]
    python_h = os.path.join(sysconfig.get_paths()['include'], 'Python.h')
    # Only a module's own first line (include level 1; 0 while precompiling) gets the other headers: a
    # numpy header that includes Python.h in the middle of its own definitions gets Python.h alone.
    header = ''.join([f'#include "{python_h}"\n#if __INCLUDE_LEVEL__ <= 1\n']
                     + [f'#include <{h}>\n' for h in MODULE_HEADERS[1:]] + ['#endif\n'])
    command = ([pytensor.config.cxx, '-x', 'c++-header', '-g'] + args + [f'-I{d}' for d in include_dirs]
               + ['-fvisibility=hidden'])
    # The headers' versions too: gcc would take a .gch made from older headers of the same names.
    versions = [np.__version__, pytensor.__version__, sysconfig.get_config_var('py_version_nodot') or '']
    digest = hashlib.sha256('\0'.join(command + [header] + versions).encode()).hexdigest()[:16]
    folder = os.path.join(compiledir, 'gru4rec_pch', digest)
    if not os.path.exists(os.path.join(folder, 'Python.h.gch')):
        building = None
        try:
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            building = tempfile.mkdtemp(dir=os.path.dirname(folder))
            with open(os.path.join(building, 'Python.h'), 'w') as f:
                f.write(header)
            done = subprocess.run(command + ['-o', os.path.join(building, 'Python.h.gch'),
                                             os.path.join(building, 'Python.h')], capture_output=True)
            if done.returncode != 0:
                return ''
            os.replace(building, folder)
        except OSError:  # a compile directory we cannot write, or another process built the header first
            if not os.path.exists(os.path.join(folder, 'Python.h.gch')):
                return ''
        finally:
            if building is not None:
                shutil.rmtree(building, ignore_errors=True)
    return f'-I{folder}'


def module_builds(nodes):
    """The arguments of GCC_compiler.compile_str for each C module that linking `nodes` will compile:
    those of the nodes whose module is in neither PyTensor's module cache (by key) nor, by the hash of its
    source, among the modules compiled for another key. Nodes without C code are left out."""
    cache = get_module_cache()
    builds = {}
    for node in nodes:
        if not isinstance(node.op, COp):
            continue
        try:
            # As COp.make_c_thunk makes the node's linker (VMLinker passes no no_recycling).
            linker = CLinker().accept(FunctionGraph(node.inputs, node.outputs), no_recycling=[])
            key = linker.cmodule_key()
            if key in cache.entry_from_key:
                continue
            module = linker.get_dynamic_module()
            source = module.code()
            if get_module_hash(source, key) in cache.module_hash_to_key_data:
                continue
            build = dict(module_name=module.code_hash, src_code=source, include_dirs=linker.header_dirs(),
                         lib_dirs=linker.lib_dirs(), libs=linker.libraries(), preargs=linker.compile_args())
        except (NotImplementedError, MethodNotDefined):  # no C code: the node runs in Python
            continue
        builds.setdefault(_build_key(build), build)
    return list(builds.values())


def _build_key(build):
    return (build['module_name'], build['src_code'], *(tuple(build[arg] or ()) for arg in
                                                        ('include_dirs', 'lib_dirs', 'libs', 'preargs')))


# Held while GCC_compiler.compile_str is replaced: a second thread linking at the same time waits (PyTensor's
# compile lock would have serialised its compilations anyway) instead of saving the replacement as the original.
_BUILDING = threading.RLock()


@contextlib.contextmanager
def modules_built_in_parallel(nodes):
    """While the body links `nodes`, PyTensor's compile of each new C module (one after another, under
    one lock per compile directory) takes the module that a compiler started on entry has built: on entry,
    every new module's compiler runs at once in a temporary folder, as many as the cores. A module whose
    early build failed is compiled again as PyTensor would, so that its errors are reported the same way."""
    cores = usable_cores()
    builds = module_builds(nodes) if cores > 1 else []
    if len(builds) < 2:
        yield
        return
    with _BUILDING, tempfile.TemporaryDirectory(prefix='gru4rec-build-') as staging, \
            concurrent.futures.ThreadPoolExecutor(cores) as pool:
        original = GCC_compiler.compile_str
        started = {}
        for i, build in enumerate(builds):
            folder = os.path.join(staging, str(i))
            os.mkdir(folder)
            started[_build_key(build)] = (pool.submit(original, location=folder, py_module=False, **build), folder)

        def compile_str(module_name, src_code, location=None, include_dirs=None, lib_dirs=None, libs=None,
                        preargs=None, py_module=True, hide_symbols=True):
            build = dict(module_name=module_name, src_code=src_code, include_dirs=include_dirs,
                         lib_dirs=lib_dirs, libs=libs, preargs=preargs)
            future, folder = started.pop(_build_key(build), (None, None))
            if future is None or future.exception() is not None or not (py_module and hide_symbols and location):
                return original(location=location, py_module=py_module, hide_symbols=hide_symbols, **build)
            library = f'{module_name}.{get_lib_extension()}'
            for name in (library, 'mod.cpp'):
                shutil.move(os.path.join(folder, name), os.path.join(location, name))
            open(os.path.join(location, '__init__.py'), 'w').close()
            return dlimport(os.path.join(location, library))

        GCC_compiler.compile_str = staticmethod(compile_str)
        try:
            yield
        finally:
            GCC_compiler.compile_str = staticmethod(original)
            for future, _ in started.values():
                future.cancel()


class ParallelBuildVMLinker(VMLinker):
    """PyTensor's C virtual machine linker, whose new C modules compile on every core at once
    (modules_built_in_parallel) instead of one after another."""

    def make_all(self, *args, **kwargs):
        with modules_built_in_parallel(self.fgraph.toposort()):
            return super().make_all(*args, **kwargs)


# The intermediate results' bytes up to which a function keeps their arrays between calls: the L2 caches of
# two cores. Beyond it, arrays handed back to the allocator after their last reader and handed out again to
# the next result kept diginetica's step in cache better (benchmarks/README.md, "Kept buffers").
KEPT_BUFFERS_BYTES = 4 << 20


def intermediate_bytes(fgraph):
    """The bytes of the results that fgraph's nodes allocate (not the views, the in-place results and the
    outputs), by their static shapes; None where a shape is unknown."""
    total = 0
    for node in fgraph.apply_nodes:
        if node.op.destroy_map or node.op.view_map:
            continue
        for var in node.outputs:
            if var in fgraph.outputs:
                continue
            shape = getattr(var.type, 'shape', None)
            if shape is None or None in shape:
                return None
            total += math.prod(shape) * np.dtype(var.type.dtype).itemsize
    return total


class KeptBuffersVMLinker(ParallelBuildVMLinker):
    """ParallelBuildVMLinker for a function called many times on inputs of one shape (the training step):
    where its intermediate results fit in KEPT_BUFFERS_BYTES, it keeps their arrays between calls
    (PyTensor's allow_gc=False) and each op writes into the array it made at the call before, instead of
    allocating a new one and freeing it after its last reader."""

    def make_all(self, *args, **kwargs):
        size = intermediate_bytes(self.fgraph)
        self._allow_gc = size is None or size > KEPT_BUFFERS_BYTES
        return super().make_all(*args, **kwargs)


def c_output(out, shape, typenum, fail):
    """C code that makes `out` a C-contiguous array of `shape` (C expressions, one per dimension),
    keeping the previous call's array when it already is one."""
    return kernel('output.c', out=out, ndim=len(shape), dims=', '.join(shape), typenum=typenum, fail=fail)


class RowGather(COp):
    """x[idx] for a matrix x (or a vector) and a vector of row indices (negative ones count from the end, as
    in numpy): the rows of a step's items (their biases, their logQ). PyTensor's AdvancedSubtensor1 has numpy
    take them into a new array on every call, through an intermediate copy (7 ns an entry of a vector);
    this copies each row once into the previous call's output and asks for a matrix's rows a few indices
    ahead early, the rows being scattered over a large matrix."""

    __props__ = ()

    def make_node(self, x, idx):
        shape = (idx.type.shape[0],) + x.type.shape[1:]
        return Apply(self, [x, idx], [pt.tensor(dtype=x.dtype, shape=shape)])

    def perform(self, node, inputs, output_storage):
        x, idx = inputs
        output_storage[0][0] = x[idx]

    def c_code_cache_version(self):
        return (3,)

    def c_code(self, node, name, inputs, outputs, sub):
        x, idx = inputs
        (out,) = outputs
        dims = ['k', 'L'][:node.inputs[0].ndim]
        return kernel('row_gather.c', x=x, idx=idx, out=out, fail=sub['fail'],
                      allocate=c_output(out, dims, f'PyArray_TYPE({x})', sub['fail']))

    def c_headers(self, **kwargs):
        return ['<cstring>']


@node_rewriter([AdvancedSubtensor1])
def local_gather_of_gather(fgraph, node):
    """x[a][b] as x[a[b]], where x[a] is read only by such gathers: the training step gathers its distinct
    item rows, then the scored columns' and the inputs' rows from those; one pass over the rows instead of
    two, and x[a] itself is no longer computed (its gradient is: it reaches RowAdagrad)."""
    inner, b = node.inputs
    if inner.owner is None or not isinstance(inner.owner.op, AdvancedSubtensor1):
        return None
    if not all(isinstance(client, Apply) and isinstance(client.op, AdvancedSubtensor1) and i == 0
               for client, i in fgraph.clients[inner]):
        return None
    x, a = inner.owner.inputs
    return [AdvancedSubtensor1()(x, AdvancedSubtensor1()(a, b))]


@node_rewriter([AdvancedSubtensor1])
def local_row_gather(fgraph, node):
    x, idx = node.inputs
    if x.ndim in (1, 2) and idx.ndim == 1:
        return [RowGather()(x, idx)]
    return None


class RowScatter(COp):
    """x[idx[i], :] += y[i, :] for every i in order (or = with set_instead_of_inc), in place on x."""

    __props__ = ('set_instead_of_inc',)

    def __init__(self, set_instead_of_inc):
        self.set_instead_of_inc = set_instead_of_inc
        self.destroy_map = {0: [0]}

    def make_node(self, x, y, idx):
        return Apply(self, [x, y, idx], [x.type()])

    def perform(self, node, inputs, output_storage):
        x, y, idx = inputs
        if self.set_instead_of_inc:
            x[idx] = y
        else:
            np.add.at(x, idx, y)
        output_storage[0][0] = x

    def c_code_cache_version(self):
        return (2,)

    def c_code(self, node, name, inputs, outputs, sub):
        x, y, idx = inputs
        (out,) = outputs
        return kernel('row_scatter.c', x=x, y=y, idx=idx, out=out, fail=sub['fail'],
                      op='=' if self.set_instead_of_inc else '+=')


@node_rewriter([AdvancedIncSubtensor1])
def local_row_scatter(fgraph, node):
    x, y, idx = node.inputs
    if node.op.inplace and x.ndim == 2 and y.ndim == 2 and x.dtype == y.dtype:
        return [RowScatter(node.op.set_instead_of_inc)(x, y, idx)]
    return None


class RowAdagrad(COp):
    """Adagrad with heavy-ball momentum on the rows `rows` of a matrix (or entries of a vector), in place.
    For each row r with
    gradient g: acc[r] += g^2; step = learning_rate * g / sqrt(acc[r] + epsilon);
    vel[r] = momentum * vel[r] - step; w[r] += vel[r] (without momentum, no vel: w[r] -= step).
    The rows must be distinct, except repeats of a row whose gradient is zero and whose velocity is
    zero (the padding row), which the step leaves unchanged: the C code skips a row that repeats the one
    before it (the padding that fills the list of a step's distinct rows, a quarter of Top-k's). With threads > 1
    the rows go in pieces to the calling thread and the process's workers (worker_pool.c), as OutputLayer's
    columns do.

    Inputs: w, acc[, vel], rows and the gradient (a row per index of rows); or, with sources = m > 0, m pairs
    (values, places) instead of the gradient: the gradient is then zeros with each source's rows added at their
    places (values[j] to place places[j]), in order, as scatters into a zero matrix would add them
    (`local_row_adagrad_of_scatters`), without the matrix: each row's sum is made where it is used."""

    __props__ = ('learning_rate', 'momentum', 'epsilon', 'inplace', 'threads', 'sources')

    def __init__(self, learning_rate, momentum, epsilon, inplace=False, threads=1, sources=0):
        self.learning_rate, self.momentum, self.epsilon = float(learning_rate), float(momentum), float(epsilon)
        self.inplace, self.threads, self.sources = inplace, int(threads), int(sources)
        self.n_state = 3 if self.momentum else 2  # w, acc[, vel]
        if inplace:
            self.destroy_map = {i: [i] for i in range(self.n_state)}

    def split_inputs(self, inputs):
        """(state, rows, gradient) of the node's inputs, the gradient as a list: [grad] or the sources' pairs."""
        return inputs[:self.n_state], inputs[self.n_state], inputs[self.n_state + 1:]

    def make_node(self, *inputs):
        state, rows, grad = self.split_inputs(inputs)
        if len(grad) != (2 * self.sources or 1):
            raise TypeError(f'RowAdagrad with {self.sources} sources takes {2 * self.sources or 1} gradient inputs, '
                            f'not {len(grad)}')
        return Apply(self, list(inputs), [v.type() for v in state])

    def perform(self, node, inputs, output_storage):
        state, rows, grad = self.split_inputs(inputs)
        if self.sources:
            values = grad
            grad = np.zeros((len(rows),) + state[0].shape[1:], dtype=state[0].dtype)
            for v, places in zip(values[::2], values[1::2]):
                np.add.at(grad, places, v)
        else:
            (grad,) = grad
        if not self.inplace:
            state = [v.copy() for v in state]
        w, acc = state[:2]
        acc[rows] += grad ** 2
        step = np.float32(self.learning_rate) * grad / np.sqrt(acc[rows] + np.float32(self.epsilon))
        if self.momentum:
            vel = state[2]
            vel[rows] = np.float32(self.momentum) * vel[rows] - step
            w[rows] += vel[rows]
        else:
            w[rows] -= step
        for storage, value in zip(output_storage, state):
            storage[0] = value

    def c_code_cache_version(self):
        return (36,)

    def c_support_code(self, **kwargs):
        return kernel('worker_pool.c')

    def c_headers(self, **kwargs):
        return worker_pool_headers() + ['<vector>']

    def c_code(self, node, name, inputs, outputs, sub):
        state, rows, grad = self.split_inputs(inputs)
        sources = dict(grad='NULL', values=', '.join(grad[::2]), places=', '.join(grad[1::2])) if self.sources else \
            dict(grad=grad[0], values='', places='')
        return kernel('row_adagrad.c', state_in=', '.join(state), state_out=', '.join(f'&{o}' for o in outputs),
                      n_state=len(outputs), inplace=self.inplace, momentum_on=bool(self.momentum), rows=rows,
                      w=outputs[0], learning_rate=repr(self.learning_rate), momentum=repr(self.momentum),
                      epsilon=repr(self.epsilon), threads=self.threads, sources=self.sources, fail=sub['fail'],
                      **sources)


@node_rewriter([RowAdagrad])
def local_row_adagrad_inplace(fgraph, node):
    op = node.op
    if op.inplace:
        return None
    return RowAdagrad(op.learning_rate, op.momentum, op.epsilon, inplace=True, threads=op.threads,
                      sources=op.sources)(*node.inputs, return_list=True)


@node_rewriter([RowAdagrad])
def local_row_adagrad_of_scatters(fgraph, node):
    """RowAdagrad whose gradient is a zero matrix with rows added by a chain of RowScatters, read by nothing else
    (the item rows' gradient of the training step: the scored columns' and the inputs' rows added at their
    places in the step's list of distinct rows): RowAdagrad of the scatters' sources, summed where each row is
    used; the zero matrix and the scatters, a write and two read-modify-writes of it, are gone."""
    op = node.op
    if op.sources:
        return None
    grad = node.inputs[-1]
    pairs = []
    while (grad.owner and isinstance(grad.owner.op, RowScatter) and not grad.owner.op.set_instead_of_inc
           and len(fgraph.clients[grad]) == 1):
        into, values, places = grad.owner.inputs
        pairs.append((values, places))
        grad = into
    if not pairs or grad.owner is None or not isinstance(grad.owner.op, pt.basic.Alloc) \
            or _constant(grad.owner.inputs[0]) != 0 or len(fgraph.clients[grad]) != 1:
        return None
    rows, w = node.inputs[op.n_state], node.inputs[0]
    if any(v.dtype != w.dtype or v.ndim != 2 for v, _ in pairs) or w.ndim != 2 \
            or None in grad.type.shape or grad.type.shape != (rows.type.shape[0], w.type.shape[1]):
        return None  # (a zero matrix of another shape than the update's rows: the error stays the update's)
    inputs = node.inputs[:-1] + [v for pair in reversed(pairs) for v in pair]
    return RowAdagrad(op.learning_rate, op.momentum, op.epsilon, op.inplace, op.threads, len(pairs))(
        *inputs, return_list=True)


def _constant(v):
    """The value of a scalar constant (also broadcast by a DimShuffle), else None."""
    try:
        return float(pt.get_underlying_scalar_constant_value(v))
    except NotScalarConstantError:
        return None


def _op_of(v, op_type, scalar_op=None):
    """v's node when v is computed by op_type (an Elemwise of scalar_op), else None."""
    node = v.owner
    if node is None or not isinstance(node.op, op_type):
        return None
    if scalar_op is not None and not isinstance(node.op.scalar_op, scalar_op):
        return None
    return node


def _gathered(v, rows):
    """The matrix x when v is x[rows], else None."""
    node = _op_of(v, (AdvancedSubtensor1, AdvancedSubtensor))
    return node.inputs[0] if node is not None and len(node.inputs) == 2 and node.inputs[1] is rows else None


def _is_row_scatter(node, set_instead_of_inc):
    """Whether node is x[rows] = y (or += y) with one vector of row indices, before or after PyTensor
    has specialised the indexing (AdvancedIncSubtensor1)."""
    return (isinstance(node.op, (AdvancedIncSubtensor1, AdvancedIncSubtensor)) and len(node.inputs) == 3
            and node.op.set_instead_of_inc == set_instead_of_inc and node.inputs[2].ndim == 1
            and node.inputs[2].dtype.startswith('int') and node.inputs[0].ndim in (1, 2))


def _scatter_client(fgraph, value, rows, set_instead_of_inc):
    """The node x[rows] = value (or += value) among value's clients, else None."""
    for client, _ in fgraph.clients.get(value, []):
        if _is_row_scatter(client, set_instead_of_inc) and client.inputs[1] is value and client.inputs[2] is rows:
            return client
    return None


def _match_adagrad(delta, read, write):
    """The Adagrad step of training.py in delta, as the optimiser writes it:
        a = A + g ** 2, written to acc;  step = -lr * (g / sqrt(a + eps))
        delta = step, or delta = momentum * V + step, written to vel,
    where A and V read acc and vel: read(A) is acc (None if A reads no state), write(value) the (variable to
    replace, state it writes) of value's write, else None. Returns (RowAdagrad op, [acc[, vel]], g, [the
    variables that write acc[ and vel]]), else None."""
    velocity, momentum = None, 0.0
    add = _op_of(delta, Elemwise, ps.Add)
    if add is not None and len(add.inputs) == 2:
        for i in (0, 1):
            decay = _op_of(add.inputs[i], Elemwise, ps.Mul)
            if decay is not None and len(decay.inputs) == 2 and _constant(decay.inputs[0]) is not None:
                vel = read(decay.inputs[1])
                if vel is not None:
                    velocity, momentum, step = vel, _constant(decay.inputs[0]), add.inputs[1 - i]
                    break
        else:
            return None
    else:
        step = delta
    scaled = _op_of(step, Elemwise, ps.Mul)
    if scaled is None or len(scaled.inputs) != 2 or _constant(scaled.inputs[0]) is None:
        return None
    learning_rate = -_constant(scaled.inputs[0])
    div = _op_of(scaled.inputs[1], Elemwise, ps.TrueDiv)
    sqrt = div and _op_of(div.inputs[1], Elemwise, ps.Sqrt)
    shifted = sqrt and _op_of(sqrt.inputs[0], Elemwise, ps.Add)
    if shifted is None or len(shifted.inputs) != 2 or _constant(shifted.inputs[1]) is None:
        return None
    grad, a_new, epsilon = div.inputs[0], shifted.inputs[0], _constant(shifted.inputs[1])
    accumulate = _op_of(a_new, Elemwise, ps.Add)
    square = accumulate and len(accumulate.inputs) == 2 and _op_of(accumulate.inputs[1], Elemwise, ps.Pow)
    if not square or square.inputs[0] is not grad or _constant(square.inputs[1]) != 2:
        return None
    acc, acc_write = read(accumulate.inputs[0]), write(a_new)
    if acc is None or acc_write is None or acc_write[1] is not acc:
        return None
    state, writes = [acc], [acc_write[0]]
    if velocity is not None:
        vel_write = write(delta)
        if vel_write is None or vel_write[1] is not velocity:
            return None
        state.append(velocity)
        writes.append(vel_write[0])
    return RowAdagrad(learning_rate, momentum, epsilon), state, grad, writes


def _match_row_adagrad(fgraph, node):
    """For w[rows] += delta (node), the sparse Adagrad step (_match_adagrad) of the rows: its state read as
    acc[rows] and written as acc[rows] = value. Returns (RowAdagrad op, its inputs, the scatters' outputs it
    replaces), else None."""
    w, delta, rows = node.inputs

    def write(value):
        scatter = _scatter_client(fgraph, value, rows, True)
        return None if scatter is None else (scatter.outputs[0], scatter.inputs[0])
    match = _match_adagrad(delta, lambda v: _gathered(v, rows), write)
    if match is None:
        return None
    op, state, grad, writes = match
    if any(v.dtype != w.dtype or v.ndim != w.ndim for v in state + [grad]):
        return None
    return op, [w, *state, rows, grad], [node.outputs[0], *writes]


def _match_dense_adagrad(updates, w):
    """For the update w + delta of the function's input w (updates: {update: input} of the function), the dense
    Adagrad step (_match_adagrad): its state read whole and written by the function's updates. Returns
    (RowAdagrad op, its inputs with every row of w, the updates it replaces), else None."""
    new = {v: k for k, v in updates.items()}[w]
    add = _op_of(new, Elemwise, ps.Add)
    if add is None or len(add.inputs) != 2 or add.inputs[0] is not w or w.ndim not in (1, 2):
        return None
    inputs = set(updates.values())
    match = _match_adagrad(add.inputs[1], lambda v: v if v in inputs else None,
                           lambda value: (value, updates[value]) if value in updates else None)
    if match is None:
        return None
    op, state, grad, writes = match
    if any(v.type != w.type for v in state) or grad.dtype != w.dtype or grad.ndim != w.ndim:
        return None
    n = w.type.shape[0]
    rows = pt.arange(w.shape[0]) if n is None else pt.constant(np.arange(n, dtype='int64'))
    return op, [w, *state, rows, grad], [new, *writes]


class RowAdagradRewrite(GraphRewriter):
    """Finds the sparse Adagrad step written as a graph (see _match_row_adagrad) and computes it with
    RowAdagrad: the graph stays the definition on every backend, this backend runs it in one pass. The dense
    step of a weight matrix that every step updates whole (_match_dense_adagrad) too, as RowAdagrad of all
    its rows: the fused element-wise loop that ran it used one core, the rows in pieces use every core's
    share of the memory bandwidth. It runs before canonicalisation, on the graph as the optimiser wrote it."""

    def add_requirements(self, fgraph):
        fgraph.attach_feature(ReplaceValidate())

    def apply(self, fgraph):
        for node in list(fgraph.toposort()):
            if node not in fgraph.apply_nodes or not _is_row_scatter(node, False):
                continue
            self.replace(fgraph, _match_row_adagrad(fgraph, node))
        mapping = getattr(fgraph, 'update_mapping', None) or {}
        updates = {fgraph.outputs[o]: fgraph.inputs[i] for o, i in mapping.items()}
        for w in list(updates.values()):
            self.replace(fgraph, _match_dense_adagrad(updates, w))
            updates = {fgraph.outputs[o]: fgraph.inputs[i] for o, i in mapping.items()}

    @staticmethod
    def replace(fgraph, match):
        """The match's variables replaced by the outputs of its RowAdagrad (nothing for None)."""
        if match is not None:
            op, inputs, replaced = match
            fgraph.replace_all_validate(list(zip(replaced, op(*inputs, return_list=True))), reason='row_adagrad')


class MatrixReduce(COp):
    """A sum, max or min of a vector or matrix over its rows, its columns or all of it, in C: vectorised
    when the reduced entries are contiguous, sums accumulated in float64 (as PyTensor's float32 sums),
    NaN propagated by max and min (as numpy's)."""

    __props__ = ('ufunc', 'axis', 'dtype')
    C_UPDATE = {'add': 'a + v', 'maximum': '(v > a ? v : a)', 'minimum': '(v < a ? v : a)'}

    def __init__(self, ufunc, axis, dtype):
        self.ufunc, self.axis, self.dtype = ufunc, tuple(axis), dtype

    def make_node(self, x):
        shape = [n for i, n in enumerate(x.type.shape) if i not in self.axis]
        return Apply(self, [x], [TensorType(self.dtype, shape=shape)()])

    def perform(self, node, inputs, output_storage):
        (x,) = inputs
        acc_dtype = np.float64 if self.ufunc == 'add' else x.dtype
        reduced = getattr(np, self.ufunc).reduce(x, axis=self.axis, dtype=acc_dtype)
        output_storage[0][0] = np.asarray(reduced, dtype=self.dtype)

    def c_code_cache_version(self):
        return (3,)

    def c_code(self, node, name, inputs, outputs, sub):
        (x,) = inputs
        (out,) = outputs
        is_sum = self.ufunc == 'add'
        ndim = node.inputs[0].ndim
        by_row, by_column = ndim == 2 and self.axis == (1,), ndim == 2 and self.axis == (0,)
        out_dims = ['M'] if by_row else ['N'] if by_column else []
        return kernel('matrix_reduce.c', x=x, out=out, ufunc=self.ufunc, fail=sub['fail'],
                      acc='double' if is_sum else f'dtype_{x}', is_vector=ndim == 1, is_sum=is_sum, by_row=by_row,
                      by_column=by_column, n_reduced='N' if by_row else 'M' if by_column else 'M * N',
                      init='0' if is_sum else ('-INFINITY' if self.ufunc == 'maximum' else 'INFINITY'),
                      update=self.C_UPDATE[self.ufunc], out_ndim=len(out_dims),
                      allocate=c_output(out, out_dims, node.outputs[0].type.dtype_specs()[2], sub['fail']))


class RowSoftmax(COp):
    """Softmax over the rows of a matrix, each row computed while it is in cache: the max, exp(x - max),
    their sum (in float64) and the division, as PyTensor's element-wise graph of it does, in one go."""

    __props__ = ()

    def make_node(self, x):
        return Apply(self, [x], [x.type()])

    def perform(self, node, inputs, output_storage):
        (x,) = inputs
        e = np.exp(x - x.max(axis=1, keepdims=True))
        output_storage[0][0] = e / e.sum(axis=1, keepdims=True, dtype=np.float64).astype(x.dtype)

    def c_code_cache_version(self):
        return (7,)

    def c_code(self, node, name, inputs, outputs, sub):
        (x,) = inputs
        (out,) = outputs
        fail = sub['fail']
        return kernel('row_softmax.c', x=x, out=out, fail=fail,
                      allocate=c_output(out, ['M', 'N'], f'PyArray_TYPE({x})', f'Py_DECREF(contiguous); {fail}'))


@node_rewriter([Softmax])
def local_row_softmax(fgraph, node):
    (x,) = node.inputs
    if x.ndim == 2 and tuple(node.op.axis) == (1,) and x.dtype in ('float32', 'float64'):
        return [RowSoftmax()(x)]
    return None


def bpr_max_rows(Y, cols, bpreg):
    """BPR-max (CIKM 2018) of each row of the scores Y (M x N, row i's target in column i, cols marking the
    columns that count) with its parts, in numpy: the reference of RowBPRMax. Returns the loss (M), the
    softmax weights s over each row's negatives, sigma(d - y) and the row sums A = sum s sigma and
    B = sum s y^2."""
    M, N = Y.shape
    negatives = (np.arange(M)[:, None] != np.arange(N)[None, :]) * cols[None, :]
    shift = np.where(negatives != 0, Y, np.finfo(Y.dtype).min).max(axis=1, keepdims=True)
    e = np.exp(np.where(negatives != 0, Y - shift, 0)) * negatives
    s = e / e.sum(axis=1, keepdims=True)
    sigma = 1 / (1 + np.exp(-(np.diagonal(Y)[:, None] - Y)))
    A, B = (s * sigma).sum(axis=1), (s * Y * Y).sum(axis=1)
    return -np.log(A + 1e-24) + bpreg * B, s, sigma, A, B


def elu(X, alpha):
    """ELU of the logits (losses' elu-alpha), and its derivative, in numpy: the reference of RowBPRMax's.
    At 0 the derivative is the mean of the two sides', as autodiff of losses._elu gives."""
    Y = np.where(X > 0, X, alpha * np.expm1(np.minimum(X, 0)))
    return Y, np.where(X > 0, 1, np.where(X < 0, Y + alpha, (1 + alpha) / 2))


def kernel_activation(final_act):
    """(elu, alpha) of a final activation that RowBPRMax computes itself: (False, 0.0) for none ('linear',
    'softmax_logit'), (True, alpha) for 'elu-alpha'; None for any other (its graph stays outside)."""
    if final_act in ('linear', 'softmax_logit'):
        return False, 0.0
    head, _, alpha = final_act.partition('-')
    try:
        return (True, float(alpha)) if head == 'elu' else None
    except ValueError:
        return None


class RowLossKernel(COp):
    """A training loss computed a row of the scores X (its first input) at a time: its output is the loss of
    each row (M), and with grad=True also the gradient w.r.t. X (M x N) of the rows' losses weighted by g (its
    last input). `forward` is the op of the loss alone, on the inputs but g."""

    @property
    def forward(self):
        return type(self)(False, *(getattr(self, prop) for prop in self.__props__[1:]))

    def make_node(self, *inputs):
        X = inputs[0]
        loss = pt.vector(dtype=X.dtype)
        return Apply(self, list(inputs), [loss, X.type()] if self.grad else [loss])

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[0][:1], shapes[0]] if self.grad else [shapes[0][:1]]

    def allocate(self, X, outputs, release):
        """C that makes the outputs: the loss (M) and, with grad, the gradient (M x N), in X's dtype."""
        shapes = [['M'], ['M', 'N']][:len(outputs)]
        return ''.join(c_output(out, shape, f'PyArray_TYPE({X})', release) for out, shape in zip(outputs, shapes))


class RowBPRMax(RowLossKernel):
    """BPR-max of each row of the scores (the op 'row_loss:bpr-max:FINAL_ACT' of training.row_loss_op:
    inputs X, cols, bpreg), a row at a time while it is in cache, instead of the graph's dozen element-wise
    passes and reductions over the whole M x N matrix. The scores are the logits X, or with elu=True their
    ELU of the given alpha (the final activation elu-alpha), computed here too. With grad=True it also
    computes the gradient w.r.t. X of the rows' losses weighted by g (inputs X, cols, bpreg, g; outputs the
    loss, M, and the gradient, M x N), in the same passes: for a negative column j of row i, w.r.t. its score,
      g_i * (-(s_j (sigma_j - A) - s_j sigma_j (1 - sigma_j)) / (A + 1e-24) + bpreg s_j (y_j^2 - B + 2 y_j))
    and for the target column, whose score d enters every sigma_j = sigma(d - y_j),
      g_i * -sum_j s_j sigma_j (1 - sigma_j) / (A + 1e-24)
    (s: the softmax over the negatives, A = sum_j s_j sigma_j, B = sum_j s_j y_j^2; bpr_max_rows), times the
    ELU's derivative (elu) where there is one. Sums in float64, as the graph's."""

    __props__ = ('grad', 'elu', 'alpha')

    def __init__(self, grad=False, elu=False, alpha=0.0):
        self.grad, self.elu, self.alpha = grad, elu, float(alpha)

    def perform(self, node, inputs, output_storage):
        X, cols, bpreg, *g = inputs
        X64 = X.astype(np.float64)
        Y, slope = elu(X64, self.alpha) if self.elu else (X64, 1.0)
        loss, s, sigma, A, B = bpr_max_rows(Y, cols, float(bpreg))
        output_storage[0][0] = loss.astype(X.dtype)
        if not self.grad:
            return
        (g,) = g
        dY = -(s * (sigma - A[:, None]) - s * sigma * (1 - sigma)) / (A[:, None] + 1e-24) \
            + float(bpreg) * s * (Y * Y - B[:, None] + 2 * Y)
        M = len(Y)
        dY[np.arange(M), np.arange(M)] = -(s * sigma * (1 - sigma)).sum(axis=1) / (A + 1e-24)
        output_storage[1][0] = (g[:, None] * dY * slope).astype(X.dtype)

    def c_code_cache_version(self):
        return (5,)

    def c_code(self, node, name, inputs, outputs, sub):
        X, cols, bpreg = inputs[:3]
        fail = sub['fail']
        allocate = self.allocate(X, outputs, f'Py_DECREF(x); Py_DECREF(c); {fail}')
        return kernel('row_bpr_max.c', X=X, cols=cols, bpreg=bpreg, g=inputs[3] if self.grad else '',
                      loss=outputs[0], dX=outputs[1] if self.grad else '', grad=self.grad, elu=self.elu,
                      alpha=repr(self.alpha), fail=fail, allocate=allocate)

    def c_headers(self, **kwargs):
        return ['<algorithm>', '<cmath>', '<limits>', '<vector>']


class RowCrossEntropy(RowLossKernel):
    """The cross-entropy of the softmax of each row of the logits X (the op 'row_loss:cross-entropy:softmax'
    of training.row_loss_op without label smoothing: input X), a row at a time while it is in cache, instead
    of the softmax, a gather of its diagonal and the softmax's gradient as a graph of five passes over the
    M x N matrix. Row i's loss is -log(y_ii + 1e-24), y the softmax of the row. With grad=True it also computes
    the gradient w.r.t. X of the rows' losses weighted by g (inputs X, g; outputs the loss and the gradient,
    M x N) in the same passes: g_i c_i (y_ij - [j == i]), c_i = y_ii / (y_ii + 1e-24)."""

    __props__ = ('grad',)

    def __init__(self, grad=False):
        self.grad = grad

    def perform(self, node, inputs, output_storage):
        X, *g = inputs
        X64 = X.astype(np.float64)
        e = np.exp(X64 - X64.max(axis=1, keepdims=True))
        Y = e / e.sum(axis=1, keepdims=True)
        M = len(Y)
        target = Y[np.arange(M), np.arange(M)]
        output_storage[0][0] = (-np.log(target + 1e-24)).astype(X.dtype)
        if self.grad:
            (g,) = g
            dX = Y.copy()
            dX[np.arange(M), np.arange(M)] -= 1
            output_storage[1][0] = ((g * target / (target + 1e-24))[:, None] * dX).astype(X.dtype)

    def c_code_cache_version(self):
        return (1,)

    def c_code(self, node, name, inputs, outputs, sub):
        X = inputs[0]
        fail = sub['fail']
        allocate = self.allocate(X, outputs, f'Py_DECREF(x); {fail}')
        return kernel('row_cross_entropy.c', X=X, g=inputs[1] if self.grad else '', loss=outputs[0],
                      dX=outputs[1] if self.grad else '', grad=self.grad, fail=fail, allocate=allocate)

    def c_headers(self, **kwargs):
        return ['<cmath>', '<vector>']


@node_rewriter([OpFromGraph])
def local_row_loss(fgraph, node):
    """The training losses of training.row_loss_op: cross-entropy's of a softmax and its gradient by
    RowCrossEntropy, BPR-max's by RowBPRMax (with the final activation inside where it is an ELU or none; any
    other activation's graph, the op's variable named 'row_loss:scores', runs before it), any other loss's
    graph inlined (an OpFromGraph left in the graph would run in Python)."""
    name = node.op.name or ''
    if not name.startswith('row_loss:'):
        return None
    X, gradient = node.inputs[0], name.endswith('_LOp')
    loss_name, _, final_act = name.removeprefix('row_loss:').removesuffix('_LOp').partition(':')
    # The kernels compute in the scores' precision. A graph that computes the loss in another (float32 scores
    # built under floatX=float64 give a float64 loss) is declined here, and inlined as written, rather
    # than replaced by a kernel whose output type the graph cannot take (the rewrite would fail, leaving
    # the op to run in Python). The gradient op's inputs carry the loss (its dtype): both decide alike.
    loss = node.inputs[-2] if gradient else node.outputs[0]
    if X.ndim != 2 or X.dtype not in ('float32', 'float64') or loss.dtype != X.dtype:
        return inline_ofg_node(node)
    # Cross-entropy's op takes the logits alone (and the gradient's the loss and the upstream gradient) when
    # it has no label smoothing, which reads cols.
    if (loss_name, final_act) == ('cross-entropy', 'softmax') and len(node.inputs) == (3 if gradient else 1):
        return [RowCrossEntropy(True)(X, node.inputs[-1])[1]] if gradient else [RowCrossEntropy()(X)]
    if loss_name != 'bpr-max':
        return inline_ofg_node(node)
    activation = kernel_activation(final_act)
    if not gradient:
        if activation is not None:
            return [RowBPRMax(False, *activation)(*node.inputs)]
        inner_scores = [v for v in ancestors(node.op.inner_outputs) if v.name == 'row_loss:scores']
        if len(inner_scores) != 1:
            return inline_ofg_node(node)
        scores = clone_replace(inner_scores[0], replace=dict(zip(node.op.inner_inputs, node.inputs)))
        return [RowBPRMax()(scores, *node.inputs[1:])]
    X, cols, bpreg, loss, g = node.inputs
    if activation is not None:
        return [RowBPRMax(True, *activation)(X, cols, bpreg, g)[1]]
    forward = loss.owner  # the loss's rewrite (above) made it RowBPRMax of the activation's graph
    if not (isinstance(forward.op, RowBPRMax) and not forward.op.elu and forward.inputs[1:] == [cols, bpreg]):
        return inline_ofg_node(node)
    scores = forward.inputs[0]
    return [pytensor.grad(None, X, known_grads={scores: RowBPRMax(True)(scores, cols, bpreg, g)[1]})]


@node_rewriter([RowLossKernel])
def local_row_loss_once(fgraph, node):
    """A loss kernel with grad=True computes the loss in the same passes as its gradient: the kernel of the loss
    alone on the same inputs goes, where the weights g of the rows' losses do not depend on the loss (after
    canonicalisation, when g no longer reads the loss's shape)."""
    if not node.op.grad:
        return None
    *inputs, g = node.inputs
    for client, _ in fgraph.clients[inputs[0]]:
        if client.op == node.op.forward and client.inputs == inputs and client.outputs[0] not in ancestors([g]):
            return {client.outputs[0]: node.outputs[0]}
    return None


class OutputLayer(COp):
    """The output layer of a training step in one op, on every core: for the scored columns' rows
    W = table[rows] (N x K) and the hidden state h (M x K), the scores X = h W^T + offset, the loss of each row
    as RowCrossEntropy (loss 'cross-entropy') or RowBPRMax (loss 'bpr-max', with the ELU of alpha inside where
    elu) computes it, and from its gradient G w.r.t. X, weighted by g: dh = G W, dW = G^T h and db = G's
    column sums. Inputs h, table, rows, offset, g (and cols, bpreg for BPR-max); outputs the loss (M), dh, dW
    and db.

    As ops of a graph these are a gather, three products, a loss kernel and a column sum, each on its own;
    only the products could use a second core (OpenBLAS's threads), one at a time. Here the columns go in
    chunks, which `threads` threads (the caller and the process's workers, worker_pool.c) claim as they come:
    each scores its chunks' columns from the table's rows where they are, a few columns at a time with the
    batch's rows in the vector lanes (BLAS, at these shapes, ran at half the rate, after a gather), and sums
    them, and once all are scored each differentiates its chunks and runs their products (benchmarks/README.md,
    "The output layer on both cores", "The scores from the rows where they are"). The softmax's row sums of the
    chunks are taken each with the chunk's maximum and combined after, in float64 as the loss kernels' sums;
    the chunks' shares of dh are summed in chunk order, so that any number of threads gives the same results
    bit for bit. Without BLAS to link it runs perform (numpy), as PyTensor's own products do."""

    __props__ = ('loss', 'elu', 'alpha', 'threads')

    def __init__(self, loss, elu=False, alpha=0.0, threads=1):
        if loss not in ('cross-entropy', 'bpr-max'):
            raise ValueError(f"OutputLayer: loss must be 'cross-entropy' or 'bpr-max', not {loss!r}")
        self.loss, self.elu, self.alpha, self.threads = loss, bool(elu), float(alpha), int(threads)

    def make_node(self, h, table, rows, offset, g, *bpr_max_inputs):
        inputs = [h, table, rows, offset, g, *bpr_max_inputs]
        N, K = rows.type.shape[0], h.type.shape[1]
        outputs = [pt.vector(dtype=h.dtype, shape=h.type.shape[:1]), h.type(),
                   pt.matrix(dtype=h.dtype, shape=(N, K)), pt.vector(dtype=h.dtype, shape=(N,))]
        return Apply(self, inputs, outputs)

    def infer_shape(self, fgraph, node, shapes):
        h, _, rows = shapes[:3]
        return [h[:1], h, (rows[0], h[1]), rows]

    def loss_op(self):
        """The loss kernel whose loss and gradient this computes."""
        return RowBPRMax(True, self.elu, self.alpha) if self.loss == 'bpr-max' else RowCrossEntropy(True)

    def perform(self, node, inputs, output_storage):
        h, table, rows, offset, g, *bpr_max_inputs = inputs
        W = table[rows]
        X = (h @ W.T + offset).astype(h.dtype)
        loss = [[None], [None]]
        self.loss_op().perform(None, [X, *bpr_max_inputs, g], loss)
        G = loss[1][0]
        for storage, value in zip(output_storage, [loss[0][0], G @ W, G.T @ h, G.sum(axis=0)]):
            storage[0] = np.asarray(value, dtype=h.dtype)

    def c_code_cache_version(self):
        return (135,)

    def c_support_code(self, **kwargs):
        # BLAS's declarations as PyTensor's products have them, and their link flags (below).
        return [GemmRelated.c_support_code(self), kernel('threaded_product_support.c'), kernel('worker_pool.c'),
                kernel('output_layer_support.c')]

    def c_support_code_struct(self, node, name):
        return f'std::vector<char> scratch_{name};'

    def c_code(self, node, name, inputs, outputs, sub):
        if not self.c_libraries():  # no BLAS to link (as PyTensor's own products, it then runs perform)
            raise NotImplementedError('OutputLayer needs BLAS')
        h, table, rows, offset, g, *bpr_max_inputs = inputs
        cols, bpreg = bpr_max_inputs or (g, '')
        fail = sub['fail']
        typenum = f'PyArray_TYPE({h})'
        allocate = ''.join(c_output(out, shape, typenum, fail)
                           for out, shape in zip(outputs, [['M'], ['M', 'K'], ['N', 'K'], ['N']]))
        loss, dh, dW, db = outputs
        return kernel('output_layer.c', h=h, table=table, rows=rows, offset=offset, g=g, cols_or_g=cols, bpreg=bpreg,
                      loss=loss, dh=dh, dW=dW, db=db, bpr_max=self.loss == 'bpr-max', elu=self.elu,
                      alpha=repr(self.alpha), threads=self.threads, scratch=f'scratch_{name}', fail=fail,
                      allocate=allocate)

    def c_headers(self, **kwargs):
        return ['<climits>', '<cmath>', '<cstring>', '<limits>', '<vector>'] + worker_pool_headers()

    c_libraries = GemmRelated.c_libraries
    c_lib_dirs = GemmRelated.c_lib_dirs
    c_header_dirs = GemmRelated.c_header_dirs
    c_compile_args = GemmRelated.c_compile_args


def _transpose_of(v):
    """The matrix whose transpose v is, else None."""
    node = v.owner
    if node and isinstance(node.op, DimShuffle) and tuple(node.op.new_order) == (1, 0):
        return node.inputs[0]
    return None


def _plus(out, x):
    """Whether the scalar graph `out` is x + (terms that do not read x): x reached through additions and the
    left operands of subtractions only."""
    if out is x:
        return True
    node = out.owner
    if node is None:
        return False
    if isinstance(node.op, ps.Add):
        reading = [i for i in node.inputs if x in ancestors([i])]
        return len(reading) == 1 and _plus(reading[0], x)
    if isinstance(node.op, ps.Sub):
        return x not in ancestors([node.inputs[1]]) and _plus(node.inputs[0], x)
    return False


def _offset(X, P, N):
    """The row vector c where X = P + c (N columns), c broadcast over the rows (P's element-wise sum with
    biases, logQ and the columns' masks); None where X is not such a sum, or no row of the sum spans the
    columns."""
    if X is P:
        return pt.zeros((N,), dtype=P.dtype)
    node = X.owner
    if node is None or not isinstance(node.op, Elemwise) or node.inputs.count(P) != 1 or len(node.outputs) != 1:
        return None
    if any(v is not P and v.type.shape[0] != 1 for v in node.inputs) or all(
            v is P or v.type.shape[1] == 1 for v in node.inputs):
        return None
    scalar_op, position = node.op.scalar_op, node.inputs.index(P)
    if isinstance(scalar_op, ps.Composite):
        inner_inputs, (inner_output,) = scalar_op.fgraph.inputs, scalar_op.fgraph.outputs
    else:
        inner_inputs = [ps.get_scalar_type(v.dtype)() for v in node.inputs]
        inner_output = scalar_op(*inner_inputs)
    if not _plus(inner_output, inner_inputs[position]):
        return None
    # P's place taken by a constant 0, broadcast: c costs one pass over the biases' row, no zero row made first.
    zero = pt.constant(np.zeros((1, 1), dtype=P.dtype))
    return Elemwise(scalar_op)(*[zero if v is P else v for v in node.inputs])[0]  # not in place, as node.op may be


@node_rewriter([RowLossKernel])
def local_output_layer(fgraph, node):
    """A loss kernel's gradient G of scores X = h W^T + c (W a gather of a table's rows, c a row of biases) whose
    readers are the products G W and G^T h and G's column sum: all of it as one OutputLayer, where it has more
    than one core (worker_threads()). BPR-max with an
    ELU of alpha <= 0 stays as it is: the layer reads the ELU's derivative off its value, whose sign is the
    logit's only for alpha > 0."""
    threads = worker_threads()
    if threads < 2 or not node.op.grad or isinstance(node.op, RowBPRMax) and node.op.elu and node.op.alpha <= 0:
        return None
    X, G = node.inputs[0], node.outputs[1]
    P = next((v for v in (X.owner.inputs if X.owner else []) if v.owner and isinstance(v.owner.op, Dot22)), X)
    if P.owner is None or type(P.owner.op) is not Dot22:
        return None
    h, WT = P.owner.inputs
    W = _transpose_of(WT)
    if W is None or W.owner is None or not isinstance(W.owner.op, RowGather) or W.ndim != 2:
        return None
    table, rows = W.owner.inputs
    offset = _offset(X, P, rows.type.shape[0] or rows.shape[0])
    if offset is None:
        return None
    readers = {}  # of G: 'dh', 'dW', 'db' -> the variables they are
    for client, i in fgraph.clients[G]:
        if not isinstance(client, Apply) or not client.outputs:  # G an output of the function
            return None
        if type(client.op) is Dot22 and i == 0 and client.inputs[1] is W:
            readers.setdefault('dh', []).append(client.outputs[0])
        elif isinstance(client.op, MatrixReduce) and client.op.ufunc == 'add' and client.op.axis == (0,):
            readers.setdefault('db', []).append(client.outputs[0])
        elif _transpose_of(client.outputs[0]) is G:
            for product, j in fgraph.clients[client.outputs[0]]:
                if not (isinstance(product, Apply) and type(product.op) is Dot22 and j == 0
                        and product.inputs[1] is h):
                    return None
                readers.setdefault('dW', []).append(product.outputs[0])
        else:
            return None
    if isinstance(node.op, RowBPRMax):
        op = OutputLayer('bpr-max', node.op.elu, node.op.alpha, threads=threads)
        *_, g = node.inputs
        extra = node.inputs[1:3]
    else:
        op = OutputLayer('cross-entropy', threads=threads)
        g, extra = node.inputs[1], []
    loss, dh, dW, db = op(h, table, rows, offset, g, *extra)
    made = {'dh': dh, 'dW': dW, 'db': db}
    replacements = {node.outputs[0]: loss}
    for reader, variables in readers.items():
        for v in variables:
            replacements[v] = made[reader] if v.dtype == made[reader].dtype else made[reader].astype(v.dtype)
    return replacements


def worker_threads():
    """The threads of the kernels that split their work (OutputLayer, RowAdagrad, the products in pieces):
    product_threads() on Linux, where worker_pool.c's workers wait on a futex, else one; at most 8, OutputLayer's
    chunks (more threads would find none left to take, and their workers would wait between tasks for nothing)."""
    return min(product_threads(), 8) if sys.platform.startswith('linux') else 1


def worker_pool_headers():
    """The headers of worker_pool.c."""
    linux = ['<pthread.h>', '<sched.h>', '<signal.h>', '<time.h>', '<unistd.h>', '<sys/syscall.h>', '<linux/futex.h>']
    return ['<algorithm>', '<atomic>'] + (linux if sys.platform.startswith('linux') else [])


class RowAdagradThreadsRewrite(GraphRewriter):
    """RowAdagrad of a matrix on worker_threads() threads."""

    def apply(self, fgraph):
        threads = worker_threads()
        if threads < 2:
            return
        for node in fgraph.toposort():
            op = node.op
            if isinstance(op, RowAdagrad) and op.threads != threads and node.inputs[0].ndim == 2:
                new = RowAdagrad(op.learning_rate, op.momentum, op.epsilon, op.inplace, threads, op.sources)(
                    *node.inputs, return_list=True)
                fgraph.replace_all_validate(list(zip(node.outputs, new)), reason='row_adagrad_threads')

    def add_requirements(self, fgraph):
        fgraph.attach_feature(ReplaceValidate())


class RowCount(COp):
    """Per row i of a matrix x, the number of entries greater than (or equal to) t[i]."""

    __props__ = ('relation', 'dtype')
    RELATIONS = {ps.GT: 'greater', ps.EQ: 'equal'}
    RELATIONS_C = {'greater': '>', 'equal': '=='}

    def __init__(self, relation, dtype):
        self.relation, self.dtype = relation, dtype

    def make_node(self, x, t):
        return Apply(self, [x, t], [TensorType(self.dtype, shape=(x.type.shape[0],))()])

    def perform(self, node, inputs, output_storage):
        x, t = inputs
        output_storage[0][0] = getattr(np, self.relation)(x, t[:, None]).sum(axis=1).astype(self.dtype)

    def c_code_cache_version(self):
        return (3,)

    def c_code(self, node, name, inputs, outputs, sub):
        x, t = inputs
        (out,) = outputs
        fail = sub['fail']
        return kernel('row_count.c', x=x, t=t, out=out, op=self.RELATIONS_C[self.relation], fail=fail,
                      allocate=c_output(out, ['M'], node.outputs[0].type.dtype_specs()[2],
                                        f'Py_DECREF(contiguous); {fail}'))


@node_rewriter([CAReduce])
def local_row_count(fgraph, node):
    """sum(x > t[:, None], axis=1) (or ==) -> RowCount."""
    (compared,) = node.inputs
    if (not isinstance(node.op.scalar_op, ps.Add) or tuple(node.op.axis or ()) != (1,) or compared.owner is None
            or not isinstance(compared.owner.op, Elemwise) or len(fgraph.clients[compared]) != 1):
        return None
    relation = RowCount.RELATIONS.get(type(compared.owner.op.scalar_op))
    if relation is None or len(compared.owner.inputs) != 2:
        return None
    x, column = compared.owner.inputs
    if (x.ndim != 2 or x.type.broadcastable != (False, False)
            or column.type.broadcastable != (False, True) or column.owner is None
            or not isinstance(column.owner.op, DimShuffle) or column.owner.op.new_order != (0, 'x')
            or x.dtype not in ('float32', 'float64') or column.dtype != x.dtype):
        return None
    return [RowCount(relation, node.outputs[0].dtype)(x, column.owner.inputs[0])]


def is_strided_view(x):
    """Whether x may not be C-contiguous: a view of part of an array (any Subtensor; a slice of rows
    would be contiguous, but copying it costs little) or a transpose, possibly through ops that write
    into it in place (a Gemm adding into a column slice)."""
    while x.owner is not None:
        op = x.owner.op
        kept = [d for d in op.new_order if d != 'x'] if isinstance(op, DimShuffle) else []
        if isinstance(op, Subtensor) or kept != sorted(kept):
            return True
        aliased = {**op.view_map, **op.destroy_map}.get(x.owner.outputs.index(x))
        if not aliased:
            return False
        x = x.owner.inputs[aliased[0]]
    return False


ARITHMETIC = (ps.Add, ps.Sub, ps.Mul, ps.TrueDiv, ps.Neg, ps.Sqr, ps.Sqrt, ps.Abs, ps.Sign, ps.Maximum, ps.Minimum,
              ps.Cast, ps.Identity, ps.Second, ps.Switch, ps.LT, ps.GT, ps.LE, ps.GE, ps.EQ, ps.NEQ, ps.AND, ps.OR,
              ps.Invert)


def calls_math_functions(scalar_op):
    """Whether an element-wise op calls libm (exp, log, tanh, ...), beyond instructions gcc emits inline."""
    ops = [n.op for n in scalar_op.fgraph.toposort()] if isinstance(scalar_op, ps.Composite) else [scalar_op]
    return not all(isinstance(op, ARITHMETIC) for op in ops)


@node_rewriter([Elemwise])
def local_contiguous_elemwise_inputs(fgraph, node):
    """Gives element-wise loops over matrices the inputs they are fast with. PyTensor's C loop runs
    flat, vectorised, when all its operands are C-contiguous; otherwise it walks rows with strides
    known only at run time, where gcc vectorises arithmetic but calls exp, tanh, ... one value at a
    time, and vectorises nothing when an input steps by zero along the row (a column broadcast, M x 1).
    So column broadcasts are always copied out into a full M x N matrix first, and row broadcasts
    (1 x N) and views of some columns are when the loop calls such functions (the measurements are in
    benchmarks/README.md, "Speed figures moved out of the code")."""
    out = node.outputs[0]
    if out.ndim != 2 or out.type.shape[1] is not None and out.type.shape[1] < 8:
        return None
    shape = [out.type.shape[d] if out.type.shape[d] is not None else
             next((x.shape[d] for x in node.inputs if not x.type.broadcastable[d]), 1) for d in (0, 1)]
    functions = calls_math_functions(node.op.scalar_op)
    column, row = ([x.type.broadcastable[d] and not out.type.broadcastable[d] for x in node.inputs] for d in (1, 0))
    copied = [c or functions and (r or is_strided_view(x)) for x, c, r in zip(node.inputs, column, row)]
    if not any(copied):
        return None
    return node.op(*[pt.alloc(x, *shape) if copy else x for x, copy in zip(node.inputs, copied)], return_list=True)


REDUCE_UFUNCS = {ps.Add: 'add', ps.Maximum: 'maximum', ps.Minimum: 'minimum'}


def _column_piece(node):
    """(start, stop, piece, into) of z[:, start:stop] += piece (or =) with constant bounds, else None.
    (get_idx_list reads the indices after its first input: IncSubtensor's come after z and the piece.)"""
    if not isinstance(node.op, IncSubtensor) or node.inputs[0].ndim != 2:
        return None
    rows, cols = (list(get_idx_list(node.inputs[1:], node.op.idx_list)) + [None, None])[:2]
    if rows != slice(None) or not isinstance(cols, slice) or cols.step is not None:
        return None
    width = node.inputs[0].type.shape[1]
    start = 0 if cols.start is None else _constant(cols.start)
    stop = width if cols.stop is None else _constant(cols.stop)
    if start is None or stop is None or width is None or not 0 <= start < stop <= width:
        return None
    return int(start), int(stop), node.inputs[1], node.inputs[0]


@node_rewriter([IncSubtensor])
def local_column_pieces_as_join(fgraph, node):
    """Pieces written into the column ranges of a zero matrix that together cover it, z[:, :a] += A then
    z[:, a:] += B (the gradient of a product sliced into the GRU's gates), as one Join(1, A, B): one copy,
    where the zero matrix was filled and every piece added into it."""
    pieces = []
    while True:
        piece = _column_piece(node)
        if piece is None:
            return None
        pieces.append(piece[:3])
        into = piece[3]
        if into.owner is not None and _column_piece(into.owner) is not None and len(fgraph.clients[into]) == 1:
            node = into.owner
            continue
        break
    if into.owner is None or not isinstance(into.owner.op, pt.basic.Alloc) or _constant(into.owner.inputs[0]) != 0:
        return None
    rows, width = into.type.shape
    pieces.sort(key=lambda p: p[0])
    ends = [0] + [stop for _, stop, _ in pieces]
    if len(pieces) < 2 or [start for start, _, _ in pieces] != ends[:-1] or ends[-1] != width:
        return None
    values = [value for _, _, value in pieces]
    if any(v.ndim != 2 or v.dtype != into.dtype or v.type.broadcastable[0] != into.type.broadcastable[0]
           or v.type.shape[1] is None for v in values) or rows is None:
        return None
    if any(v.type.shape[0] != rows or v.type.shape[1] != stop - start for (start, stop, _), v in zip(pieces, values)):
        return None
    return [pt.join(1, *values)]


@node_rewriter([CAReduce])
def local_matrix_reduce(fgraph, node):
    (x,) = node.inputs
    ufunc = REDUCE_UFUNCS.get(type(node.op.scalar_op))
    axis = tuple(range(x.ndim)) if node.op.axis is None else tuple(sorted(node.op.axis))
    if (ufunc is None or x.ndim not in (1, 2) or not axis or x.dtype not in ('float32', 'float64')
            or node.outputs[0].dtype not in ('float32', 'float64')):
        return None
    return [MatrixReduce(ufunc, axis, node.outputs[0].dtype)(x)]


@functools.cache
def c_mode(keep_buffers=False):
    """The CVM mode with the row scatter and reduction rewrites, without turning softmax into a Python
    op, nor element-wise work into (slow, scalar) C reductions; keep_buffers: linked by KeptBuffersVMLinker."""
    linker = (KeptBuffersVMLinker if keep_buffers else ParallelBuildVMLinker)(use_cloop=True)
    return (Mode(linker=linker, optimizer='fast_run').excluding(*EXCLUDED_REWRITES)
            .register((in2out(local_row_loss), 0.01),
                      (RowAdagradRewrite(), 0.02),  # before canonicalisation rewrites the graph it recognises
                      (in2out(local_row_count), 48),
                      (in2out(local_row_loss_once), 48),
                      (in2out(local_gather_of_gather), 98), (in2out(local_column_pieces_as_join), 98),
                      (in2out(local_row_scatter), 99), (in2out(local_row_gather), 99),
                      (in2out(local_matrix_reduce), 99),
                      (in2out(local_row_softmax), 99), (in2out(local_row_adagrad_inplace), 99),
                      (in2out(local_row_adagrad_of_scatters), 99.1),
                      (in2out(local_contiguous_elemwise_inputs), 99), (in2out(local_output_layer), 99.2),
                      (RowAdagradThreadsRewrite(), 99.3), (ThreadedProductRewrite(), 99.5)))
