"""One or more BLAS threads per product size: the evidence for cbackend.THREADED_PRODUCT_MACS.

    python benchmarks/blas_threads.py
    python benchmarks/blas_threads.py --shapes 32x100x2080 128x512x2176 --repeat 400

For each shape (batch x layer x scored items, the output layer of a training step) the three products
of a step (scores H . W^T, the gradients dS . W and dS^T . H) are compiled on the C backend twice: with
every product on one thread, and with every product on all the cores (cbackend.product_threads()).
Both run in turn, call after call, so that a busy machine slows both alike; the table gives the median
microseconds of the three products together and the ratio.
"""
import argparse
import time

import numpy as np
import pytensor.tensor as pt

import common  # noqa: F401 (puts the repository on sys.path)
import backends
import cbackend

SHAPES = ['32x100x2080', '80x224x2128', '128x512x1536', '128x512x2176', '256x512x2304']


def step_products(threshold):
    """The three output-layer products of a training step, compiled with products from `threshold`
    multiply-adds threaded."""
    cbackend.THREADED_PRODUCT_MACS = threshold
    H, W, dS = (pt.matrix(n, dtype='float32') for n in ('H', 'W', 'dS'))
    return backends.compile_function([H, W, dS], [pt.dot(H, W.T), pt.dot(dS, W), pt.dot(dS.T, H)], backend='c')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shapes', nargs='+', default=SHAPES, help='BATCHxLAYERxCOLUMNS (default: %(default)s)')
    parser.add_argument('--repeat', type=int, default=200)
    args = parser.parse_args()
    threads = cbackend.product_threads()
    if threads == 1:
        raise SystemExit('one core (or OPENBLAS_NUM_THREADS set): nothing to compare')
    one, many = step_products(10 ** 18), step_products(0)
    rng = np.random.default_rng(0)
    print(f'| batch x layer x columns | multiply-adds | 1 thread (us) | {threads} threads (us) | speed-up |')
    print('|---|---|---|---|---|')
    for shape in args.shapes:
        m, k, n = (int(v) for v in shape.split('x'))
        inputs = [rng.random(s, dtype=np.float32) for s in ((m, k), (n, k), (m, n))]
        seconds = {one: [], many: []}
        for _ in range(args.repeat):
            for f in (one, many):
                start = time.perf_counter()
                f(*inputs)
                seconds[f].append(time.perf_counter() - start)
        t1, tn = (np.median(seconds[f]) * 1e6 for f in (one, many))
        print(f'| {shape} | {m * k * n:,} | {t1:.0f} | {tn:.0f} | {t1 / tn:.2f}x |')


if __name__ == '__main__':
    main()
