# Found by paropt.py, study yoochoose1_64_xe (issue 17): the cross-entropy space of paramspaces/, the fixed
# parameters of paramfiles/yoochoose_xe_shared_best.py, Hyperband pruning, two workers with one BLAS thread
# each on a 2-core machine. Trained on yoochoose1_64_train_full without its last 15,233 sessions, scored on
# those (examples/rsc15/split_valid.py --sessions 15233); the test set was not used. Every trial:
# benchmarks/results/search_yoochoose1_64_xe.csv. 3 of the 4 failed trials failed at start-up while the code
# under the search was being edited, and ran again with the same parameters; the 4th was a worker killed
# (and its trial ran again). 2 trials were still running when the search was stopped, after 1.95 h.
# On the same split, the original's rsc15_xe_shared_100_best reaches mrr@20 = 0.298101.
# Trials: 12 complete, 26 pruned, 4 failed; 214 epochs trained; 1.95 h from the first start to the last end
# Best trial #37: mrr@20 = 0.310116 on yoochoose1_64_train_valid
from collections import OrderedDict

gru4rec_params = OrderedDict([
    ('loss', 'cross-entropy'),
    ('final_act', 'softmax'),
    ('constrained_embedding', True),
    ('embedding', 0),
    ('layers', 224),
    ('batch_size', 240),
    ('dropout_p_embed', 0.05),
    ('dropout_p_hidden', 0.3),
    ('learning_rate', 0.03),
    ('momentum', 0.5),
    ('sample_alpha', 0.5),
    ('bpreg', 0.0),
    ('logq', 1.0),
    ('n_epochs', 10),
    ('n_sample', 2048),
    ('adapt', 'adagrad'),
    ('reset_after', True),
])
