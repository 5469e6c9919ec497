"""Runs the official PyTorch port's run.py with each epoch cut after its first STEPS mini-batches.

    <port venv>/bin/python benchmarks/port_steps.py STEPS PORT/run.py TRAIN.tsv -ps ... -d cpu

Used by compare_port.py for --steps: the port has no such option, and its code is not to be edited.
Its epoch loop reads the mini-batches from SessionDataIterator.__call__, so only that generator is
cut; the port then prints its usual epoch line, with mb/s over the mini-batches it trained. Runs in
the port's virtual environment: standard library only.
"""
import itertools
import runpy
import sys
from pathlib import Path


def main():
    if len(sys.argv) < 3 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        sys.exit('usage: port_steps.py STEPS PORT/run.py [run.py arguments...] (STEPS a positive integer)')
    steps, run_py = int(sys.argv[1]), Path(sys.argv[2]).resolve()
    sys.path.insert(0, str(run_py.parent))
    import gru4rec_pytorch  # run.py imports it by name later and gets this module, with the cut
    iterate = gru4rec_pytorch.SessionDataIterator.__call__

    def first_steps(self, *args, **kwargs):
        return itertools.islice(iterate(self, *args, **kwargs), steps)
    gru4rec_pytorch.SessionDataIterator.__call__ = first_steps
    sys.argv = [str(run_py)] + sys.argv[3:]
    runpy.run_path(str(run_py), run_name='__main__')


if __name__ == '__main__':
    main()
