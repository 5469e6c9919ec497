"""What a graph node costs per call when its op runs as C code and when it runs in Python.

    python benchmarks/thunk_cost.py

Compiles a graph of small shape ops (slices, transposes, reshapes of a 32 x 100 matrix) twice with
PyTensor's C virtual machine: once with C thunks, once with every op's Python implementation, and times
calls of each in turn. Running an op in Python saves compiling its C module on a cold start (about 0.2 to
0.5 s of gcc per module); this is what it costs on every call.
"""
import argparse
import time

import numpy as np
import pytensor
import pytensor.tensor as pt
from pytensor.compile.mode import Mode
from pytensor.link.vm import VMLinker


def shape_graph(n):
    x = pt.matrix('x', dtype='float32')
    i = pt.iscalar('i')
    return [x, i], [x[:, k:k + i].T.dimshuffle(1, 0, 'x').reshape((x.shape[0], -1)) for k in range(n)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--calls', type=int, default=5000)
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()
    inputs, outputs = shape_graph(20)
    modes = {impl: Mode(linker=VMLinker(use_cloop=True, c_thunks=impl == 'C'), optimizer='fast_run')
             for impl in ('C', 'Python')}
    functions = {impl: pytensor.function(inputs, outputs, mode=mode) for impl, mode in modes.items()}
    x = np.ones((32, 100), dtype='float32')
    print('| round | thunks | nodes | us per call | us per node |')
    print('|---|---|---|---|---|')
    for round_ in range(1, args.rounds + 1):
        for impl, f in functions.items():
            for _ in range(100):
                f(x, 3)
            start = time.perf_counter()
            for _ in range(args.calls):
                f(x, 3)
            per_call = (time.perf_counter() - start) / args.calls * 1e6
            nodes = len(f.maker.fgraph.apply_nodes)
            print(f'| {round_} | {impl} | {nodes} | {per_call:.1f} | {per_call / nodes:.2f} |', flush=True)


if __name__ == '__main__':
    main()
