# Found by paropt.py, study diginetica_xe (issue 17): the cross-entropy space of paramspaces/, the fixed
# parameters of paramfiles/yoochoose_xe_shared_best.py, Hyperband pruning with --prune-below 0.5, two workers
# with one BLAS thread each on a 2-core machine, seeded (--enqueue) with paramfiles/yoochoose1_64_xe_tuned.py
# (mrr@20 = 0.177371). Trained on diginetica_train_full without its last 15,963 sessions, scored on those
# (examples/rsc15/split_valid.py --sessions 15963); the test set was not used. Every trial:
# benchmarks/results/search_diginetica_xe.csv. Below the BPR-max search's best (0.181448,
# paramfiles/diginetica_bprmax_tuned.py).
# Trials: 5 complete, 11 pruned, 0 failed; 73 epochs trained; 1.14 h from the first start to the last end
# Best trial #14: mrr@20 = 0.179638 on diginetica_train_valid
from collections import OrderedDict

gru4rec_params = OrderedDict([
    ('loss', 'cross-entropy'),
    ('final_act', 'softmax'),
    ('constrained_embedding', True),
    ('embedding', 0),
    ('layers', 160),
    ('batch_size', 176),
    ('dropout_p_embed', 0.05),
    ('dropout_p_hidden', 0.4),
    ('learning_rate', 0.045),
    ('momentum', 0.0),
    ('sample_alpha', 0.3),
    ('bpreg', 0.0),
    ('logq', 0.75),
    ('n_epochs', 10),
    ('n_sample', 2048),
    ('adapt', 'adagrad'),
    ('reset_after', True),
])
