# RSC15 setting of the Top-k gains paper (CIKM 2018): BPR-max, constrained embedding.
# Reported on the full RSC15 data: Recall@20 0.7261, MRR@20 0.3124.
# Read by run.py -pf without being executed: keep it a literal OrderedDict.
from collections import OrderedDict

gru4rec_params = OrderedDict([
    ('loss', 'bpr-max'),
    ('final_act', 'elu-0.5'),
    ('constrained_embedding', True),
    ('embedding', 0),
    ('layers', [100]),
    ('batch_size', 32),
    ('n_sample', 2048),
    ('sample_alpha', 0.0),
    ('dropout_p_embed', 0.0),
    ('dropout_p_hidden', 0.0),
    ('learning_rate', 0.2),
    ('momentum', 0.1),
    ('bpreg', 0.5),
    ('n_epochs', 10),
    ('adapt', 'adagrad'),
])
