# rsc15_xe_shared_100_best: tuned hyper-parameters of the original GRU4Rec (its paramfiles/).
# Read by run.py -pf without being executed: keep it a literal OrderedDict.
from collections import OrderedDict

gru4rec_params = OrderedDict([
    ('loss', 'cross-entropy'),
    ('final_act', 'softmax'),
    ('constrained_embedding', True),
    ('embedding', 0),
    ('layers', [100]),
    ('batch_size', 32),
    ('dropout_p_embed', 0.0),
    ('dropout_p_hidden', 0.4),
    ('learning_rate', 0.2),
    ('momentum', 0.2),
    ('sample_alpha', 0.5),
    ('bpreg', 0.0),
    ('logq', 1.0),
    ('n_epochs', 10),
    ('n_sample', 2048),
    ('adapt', 'adagrad'),
])
