"""What compiling the C modules of a first run costs the compiler, module by module and by optimisation level.

    python benchmarks/compile_cost.py
    python benchmarks/compile_cost.py --levels -O3 -O1 "-O2 -ftree-vectorize"

Runs the README's one-epoch rsc15_100k run (as cold_start.py does) with an empty compile directory, then
compiles every C module that run left there again, one after another, with the flags the project compiles
with (precompiled headers included) and each optimisation level in turn. It prints the compiler's CPU
seconds (user + system, all modules) per level, and the cheapest and dearest modules at the first level:
on a machine with C cores, a cold start spends about this total divided by C on compiling.
"""
import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

from cold_start import run_once
from common import ROOT


def compile_args():
    """The compiler arguments of the project's C modules, as the C backend gives them."""
    import pytensor.tensor as pt
    from pytensor.graph.fg import FunctionGraph
    from pytensor.link.c.basic import CLinker
    import pytensor
    import cbackend
    with pytensor.config.change_flags(**cbackend.compile_flags()):
        x = pt.vector('x', dtype='float32')
        return CLinker().accept(FunctionGraph([x], [x + 1])).compile_args()


def compile_seconds(source, args, level):
    """The compiler's CPU seconds for one module's source."""
    import sysconfig
    import numpy as np
    import pytensor
    from pytensor.link.c.cmodule import GCC_compiler
    include_dirs = [sysconfig.get_paths()['include'], np.get_include(),
                    os.path.join(os.path.dirname(pytensor.link.c.__file__), 'c_code')]
    preargs = [a for a in args if not a.startswith('-O')] + level.split()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as location:
        GCC_compiler.compile_str('cost', source, location=location, include_dirs=include_dirs, preargs=preargs,
                                 py_module=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--levels', nargs='+', default=['-O3', '-O2', '-O1'],
                        help='optimisation flags to compare (default: -O3 -O2 -O1; -O3 is what the project uses)')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix='gru4rec_cost_') as compiledir:
        run_once(ROOT, compiledir)
        sources = {p.parent.name: p.read_text() for p in Path(compiledir).glob('*/mod.cpp')}
        # This process compiles with the compile directory's precompiled headers, as the run did.
        os.environ['PYTENSOR_FLAGS'] = f'compiledir={compiledir}'
        flags = compile_args()
        print(f'{len(sources)} modules of the README one-epoch rsc15_100k run')
        print('| flags | compiler CPU s, all modules | per module |')
        print('|---|---|---|')
        first = None
        for level in args.levels:
            seconds = {name: compile_seconds(source, flags, level) for name, source in sources.items()}
            first = first or seconds
            total = sum(seconds.values())
            print(f'| {level} | {total:.1f} | {total / len(seconds):.2f} |', flush=True)
        ranked = sorted(first, key=first.get)
        print(f'At {args.levels[0]}: cheapest module {first[ranked[0]]:.2f} s, '
              f'median {first[ranked[len(ranked) // 2]]:.2f} s, dearest {first[ranked[-1]]:.2f} s')


if __name__ == '__main__':
    sys.exit(main())
