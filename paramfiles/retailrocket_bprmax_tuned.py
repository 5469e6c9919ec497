# Found by paropt.py, study retailrocket_bprmax (issue 17): the BPR-max space of paramspaces/, the fixed
# parameters of paramfiles/retailrocket_bprmax_shared_best.py, Hyperband pruning with --prune-below 0.5, two
# workers with one BLAS thread each on a 2-core machine. The study was seeded (--enqueue) with the original's
# retailrocket_bprmax_shared_best, and after 22 trials nothing had passed it: this is that setting.
# Trained on retailrocket_train_full without its last 4,775 sessions, scored on those (examples/rsc15/
# split_valid.py --sessions 4775); the test set was not used. Every trial:
# benchmarks/results/search_retailrocket_bprmax.csv.
# Trials: 6 complete, 16 pruned, 0 failed; 104 epochs trained; 1.37 h from the first start to the last end
# Best trial #0: mrr@20 = 0.307223 on retailrocket_train_valid
from collections import OrderedDict

gru4rec_params = OrderedDict([
    ('loss', 'bpr-max'),
    ('final_act', 'elu-0.5'),
    ('constrained_embedding', True),
    ('embedding', 0),
    ('layers', 224),
    ('batch_size', 80),
    ('dropout_p_embed', 0.5),
    ('dropout_p_hidden', 0.05),
    ('learning_rate', 0.05),
    ('momentum', 0.4),
    ('sample_alpha', 0.4),
    ('bpreg', 1.95),
    ('logq', 0.0),
    ('n_epochs', 10),
    ('n_sample', 2048),
    ('adapt', 'adagrad'),
    ('reset_after', False),
])
