# Found by paropt.py, study diginetica_bprmax (issue 17): the BPR-max space of paramspaces/, the fixed
# parameters of paramfiles/diginetica_bprmax_shared_best.py, Hyperband pruning with --prune-below 0.5, one or
# two workers with one BLAS thread each on a 2-core machine. The study was seeded (--enqueue) with the
# original's diginetica_bprmax_shared_best, and after 22 trials nothing had passed it: this is that setting.
# Trained on diginetica_train_full without its last 15,963 sessions, scored on those (examples/rsc15/
# split_valid.py --sessions 15963); the test set was not used. Every trial:
# benchmarks/results/search_diginetica_bprmax.csv. The 4 failed trials are trials whose worker was stopped
# (at the end of a session, or to free a core); each ran again. The 5.02 h below include the time between
# two sessions; the workers ran for about 2.6 h.
# Trials: 7 complete, 11 pruned, 4 failed; 90 epochs trained; 5.02 h from the first start to the last end
# Best trial #4: mrr@20 = 0.181448 on diginetica_train_valid
from collections import OrderedDict

gru4rec_params = OrderedDict([
    ('loss', 'bpr-max'),
    ('final_act', 'elu-1'),
    ('constrained_embedding', True),
    ('embedding', 0),
    ('layers', 512),
    ('batch_size', 128),
    ('dropout_p_embed', 0.5),
    ('dropout_p_hidden', 0.3),
    ('learning_rate', 0.05),
    ('momentum', 0.15),
    ('sample_alpha', 0.3),
    ('bpreg', 0.9),
    ('logq', 0.0),
    ('n_epochs', 10),
    ('n_sample', 2048),
    ('adapt', 'adagrad'),
    ('reset_after', False),
])
