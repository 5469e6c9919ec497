"""Training speed of GRU4Rec: mini-batches/s, events/s, seconds per epoch, peak memory, compile time.

    python benchmarks/train_speed.py --data yoochoose1_64_train_full -ps rsc15_xe_shared_100_best
    python benchmarks/train_speed.py --data synthetic:10000000:300000 -ps rsc15_xe_shared_100_best --steps 20000
    python benchmarks/train_speed.py -ps rsc15_xe_shared_100_best --steps 2000 --profile
    python benchmarks/train_speed.py -pf paramfiles/rsc15_xe_shared_100_best.py --backend jax --steps 500 --no-donate
    python benchmarks/train_speed.py -ps rsc15_xe_shared_100_best --kernels both

Trains one epoch, or the first --steps mini-batches of it (on the whole data set and item set; the
seconds per epoch are then extrapolated and labelled so). The speed excludes the first step, which on
the JAX backend also compiles the graph; that step is reported on its own. On the C backend (without
--profile) it also prints the host's time per mini-batch: the loop's, outside the step's calls. --profile prints
the per-op profile of the training step: PyTensor's own for the C backend (in thread CPU time unless
--wall-clock), node_profile.py's for JAX, which compiles the whole graph into one function. On JAX it
also prints XLA's memory plan of the step (the device memory it needs); --no-donate compiles the step
without buffer donation, to compare.
--kernels off trains on the C backend without GRU4Rec's C kernels (GRU4REC_C_KERNELS=0: PyTensor's own
C mode on the plain graphs); --kernels both runs the benchmark twice in one go, with the kernels and
without, each in a fresh process, and prints their seconds per epoch side by side.
"""
import argparse
import os
import re
import subprocess
import sys
import time

from common import add_common_arguments, describe_blas, load_log, peak_rss_mb, read_params, threads

import gru4rec
from gru4rec import GRU4Rec
from sessions import first_steps


class FirstCallTimer:
    """Stands in for the model's compiled training step. Its first call is timed on its own (on JAX that
    call compiles the graph) and its inputs are kept for the per-node profile; the later calls' time is
    summed (timings['calls']), so that the host's time between the calls can be told apart."""

    def __init__(self, model, fn, timings):
        self.__dict__.update(model=model, fn=fn, timings=timings)

    def __call__(self, *inputs):
        start = time.perf_counter()
        cost = self.fn(*inputs)
        seconds = time.perf_counter() - start
        if self.timings['first_step'] is None:
            self.timings['first_step'] = seconds
            self.timings['inputs'] = [i.copy() if hasattr(i, 'copy') else i for i in inputs]
        else:
            self.timings['calls'] += seconds
        return cost

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __setattr__(self, name, value):
        setattr(self.fn, name, value)


def xla_memory(fn, inputs):
    """XLA's memory plan of a JAX-compiled PyTensor function's program (compiled again for the inputs
    `inputs` and the shared variables' current values): its peak is arguments + outputs - the outputs
    written into donated arguments + temporaries."""
    args = list(inputs) + [c.storage[0] for c in fn.input_storage[len(inputs):]]
    m = fn.vm.jit_fn.lower(*args).compile().memory_analysis()
    mib = lambda n: f'{n / 2 ** 20:,.1f} MiB'
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return (f'XLA step memory: peak {mib(peak)} (arguments {mib(m.argument_size_in_bytes)}, outputs '
            f'{mib(m.output_size_in_bytes)}, donated and reused {mib(m.alias_size_in_bytes)}, '
            f'temporaries {mib(m.temp_size_in_bytes)})')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument('--steps', type=int, help='train only this many mini-batches (default: one epoch)')
    parser.add_argument('--sample-store', type=int, default=10000000)
    parser.add_argument('--profile', action='store_true', help='print a per-op profile of the training step')
    parser.add_argument('--wall-clock', action='store_true',
                        help='profile in wall-clock time (default: thread CPU time)')
    parser.add_argument('--no-donate', action='store_true',
                        help="JAX: compile with PyTensor's own JAX linker, which donates no buffer "
                             '(to measure donation)')
    parser.add_argument('--kernels', choices=['on', 'off', 'both'],
                        help="the C backend's kernels (GRU4REC_C_KERNELS); both: one run each, side by side")
    args = parser.parse_args()
    if args.kernels == 'both':
        compare_kernels()
        return
    if args.kernels:
        os.environ['GRU4REC_C_KERNELS'] = '1' if args.kernels == 'on' else '0'
    if args.no_donate:
        from pytensor.compile.mode import get_mode

        import backends
        backends.JAX_MODE = get_mode('JAX')

    t0 = time.perf_counter()
    data = load_log(args.data)
    load_seconds = time.perf_counter() - t0
    rss_data = peak_rss_mb()
    params = read_params(args)
    params.update(n_epochs=1, verbose=False)
    model = GRU4Rec()
    model.set_params(**params)
    c_profile = args.profile and model.backend == 'c'

    # fit() compiles through the model's compile_function, and only the training step.
    timings = {'compile': 0.0, 'first_step': None, 'calls': 0.0}
    compile_function = model.compile_function

    def timed_compile(*a, **kw):
        start = time.perf_counter()
        fn = compile_function(*a, **kw)
        timings['compile'] += time.perf_counter() - start
        return FirstCallTimer(model, fn, timings)
    model.compile_function = timed_compile

    counts = {'steps': 0, 'events': 0, 'epoch': None}
    blocks = gru4rec.session_parallel_blocks

    def counted_blocks(*a, **kw):
        counts['epoch'] = a, kw
        for block in first_steps(blocks(*a, **kw), args.steps):
            counts['steps'] += len(block[0])
            counts['events'] += len(block[1])
            yield block
    gru4rec.session_parallel_blocks = counted_blocks

    import pytensor
    if c_profile and not args.wall_clock:
        # CPU time of the calling thread: on a busy machine wall-clock times charge whatever op was
        # running when the scheduler switched away. (Threads that BLAS starts are then not counted.)
        import types
        import pytensor.link.vm as vm
        vm.time = types.SimpleNamespace(perf_counter=time.thread_time)
    t0 = time.perf_counter()
    with pytensor.config.change_flags(profile=c_profile):
        model.fit(data, sample_store=args.sample_store)
    fit_seconds = time.perf_counter() - t0
    seconds = model.history_[-1]['seconds'] - timings['first_step']
    steps, events = counts['steps'] - 1, counts['events']
    # The length of a whole epoch, for the extrapolation: counted after the training, outside its clock
    # (on a 20M-event log, walking an epoch's mini-batches takes seconds).
    a, kw = counts['epoch']
    epoch_steps = sum(len(block[0]) for block in blocks(*a, **kw)) if args.steps else counts['steps']

    print(f'data: {args.data} ({len(data):,} events, {model.n_items:,} items, loaded in {load_seconds:.1f}s)')
    print(f'params: {",".join(f"{k}={v}" for k, v in params.items())}')
    print(f"backend: {model.backend} (mode {gru4rec.BACKENDS[model.backend]}); BLAS: {describe_blas(model.backend)}; "
          f"threads: {threads()}")
    print(f"graph compile: {timings['compile']:.2f}s; first step: {timings['first_step']:.2f}s")
    print(f'trained: {counts["steps"]:,} mini-batches, {events:,} events (fit() total {fit_seconds:.2f}s)')
    print(f'speed: {steps / seconds:.1f} mini-batches/s, {events * steps / counts["steps"] / seconds:,.0f} events/s')
    # On JAX a call returns before the device finishes, and the profile's bookkeeping after each call would
    # count as the host's: the C backend's plain run only.
    if model.backend == 'c' and not args.profile:
        print(f"host: {1e3 * (seconds - timings['calls']) / steps:.3f} ms per mini-batch outside the step's calls")
    label = ('seconds per epoch' if epoch_steps == counts['steps'] else
             f'seconds per epoch (extrapolated from {counts["steps"]:,} of {epoch_steps:,} mini-batches)')
    print(f'{label}: {epoch_steps / (steps / seconds):.1f}')
    print(f'peak RSS: {peak_rss_mb():,.0f} MiB (after loading the data: {rss_data:,.0f} MiB)')
    print(f"loss: {model.history_[-1]['loss']:.6f}")
    if model.backend == 'jax':
        print(xla_memory(model.training_step_.function, timings['inputs']))
    if c_profile:
        model.training_step_.function.profile.summary()
    elif args.profile:
        from node_profile import print_node_profile
        print_node_profile(model.training_step_.function, timings['inputs'])


def compare_kernels():
    """This benchmark with the kernels on, then off, each in its own process (nothing compiled or cached
    in memory carries over), and the two seconds per epoch."""
    argv = [a for a in sys.argv[1:] if a not in ('--kernels', 'both') and not a.startswith('--kernels=')]
    epochs = {}
    for kernels in ('on', 'off'):
        print(f'== kernels {kernels}', flush=True)
        done = subprocess.run([sys.executable, __file__, *argv, '--kernels', kernels], capture_output=True, text=True)
        print(done.stdout + done.stderr[-2000:] * (done.returncode != 0), flush=True)
        found = re.search(r'^seconds per epoch[^:]*: ([0-9.]+)', done.stdout, re.M)
        epochs[kernels] = float(found.group(1)) if found else float('nan')
    print(f"seconds per epoch: kernels on {epochs['on']:.1f}, off {epochs['off']:.1f} "
          f"({epochs['off'] / epochs['on']:.2f}x the time without them)")


if __name__ == '__main__':
    main()
