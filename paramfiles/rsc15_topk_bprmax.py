# RSC15 setting of the Top-k gains paper (CIKM 2018): BPR-max, no embedding.
# Reported on the full RSC15 data: Recall@20 0.7197, MRR@20 0.3157.
# Read by run.py -pf without being executed: keep it a literal OrderedDict.
from collections import OrderedDict

gru4rec_params = OrderedDict([
    ('loss', 'bpr-max'),
    ('final_act', 'elu-0.5'),
    ('constrained_embedding', False),
    ('embedding', 0),
    ('layers', [100]),
    ('batch_size', 32),
    ('n_sample', 2048),
    ('sample_alpha', 0.0),
    ('dropout_p_embed', 0.0),
    ('dropout_p_hidden', 0.0),
    ('learning_rate', 0.2),
    ('momentum', 0.3),
    ('bpreg', 1.0),
    ('n_epochs', 10),
    ('adapt', 'adagrad'),
])
