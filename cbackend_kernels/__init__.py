"""The C source of cbackend.py's kernels, one file per kernel: C with ${name} placeholders that
cbackend.kernel fills in (PyTensor's names of a node's variables, dtypes, constants). A data package,
so that an installed gru4rec finds the files beside cbackend.py."""
