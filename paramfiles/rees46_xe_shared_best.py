# rees46_xe_shared_best: tuned hyper-parameters of the original GRU4Rec (its paramfiles/).
# Read by run.py -pf without being executed: keep it a literal OrderedDict.
from collections import OrderedDict

gru4rec_params = OrderedDict([
    ('loss', 'cross-entropy'),
    ('final_act', 'softmax'),
    ('constrained_embedding', True),
    ('embedding', 0),
    ('layers', [512]),
    ('batch_size', 240),
    ('dropout_p_embed', 0.45),
    ('dropout_p_hidden', 0.0),
    ('learning_rate', 0.065),
    ('momentum', 0.0),
    ('sample_alpha', 0.5),
    ('bpreg', 0.0),
    ('logq', 1.0),
    ('n_epochs', 10),
    ('n_sample', 2048),
    ('adapt', 'adagrad'),
])
