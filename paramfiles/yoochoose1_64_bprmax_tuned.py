# Found by paropt.py, study yoochoose1_64_bprmax (issue 17): the BPR-max space of paramspaces/, the fixed
# parameters of paramfiles/diginetica_bprmax_shared_best.py, Hyperband pruning with --prune-below 0.5, one
# worker with one BLAS thread on a 2-core machine, seeded (--enqueue) with the Top-k paper's rsc15 setting at
# 96 units (mrr@20 = 0.2773). Trained on yoochoose1_64_train_full without its last 15,233 sessions, scored
# on those (examples/rsc15/split_valid.py --sessions 15233); the test set was not used. Every trial:
# benchmarks/results/search_yoochoose1_64_bprmax.csv. Below the cross-entropy search's best (0.310116,
# paramfiles/yoochoose1_64_xe_tuned.py).
# Trials: 8 complete, 11 pruned, 0 failed; 109 epochs trained; 1.70 h from the first start to the last end
# Best trial #18: mrr@20 = 0.302084 on yoochoose1_64_train_valid
from collections import OrderedDict

gru4rec_params = OrderedDict([
    ('loss', 'bpr-max'),
    ('final_act', 'linear'),
    ('constrained_embedding', True),
    ('embedding', 0),
    ('layers', 416),
    ('batch_size', 240),
    ('dropout_p_embed', 0.05),
    ('dropout_p_hidden', 0.55),
    ('learning_rate', 0.08),
    ('momentum', 0.05),
    ('sample_alpha', 0.0),
    ('bpreg', 0.95),
    ('logq', 0.0),
    ('n_epochs', 10),
    ('n_sample', 2048),
    ('adapt', 'adagrad'),
    ('reset_after', False),
])
