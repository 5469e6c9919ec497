# Found by paropt.py, study diginetica_xe.
# Trials: 5 complete, 11 pruned, 0 failed; 73 epochs trained; 1.14 h from the first start to the last end
# Best trial #14: mrr@20 = 0.179638 on /work/search/data/diginetica_train_valid.tsv.gz
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
