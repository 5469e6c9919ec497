# RSC15 setting of the Top-k gains paper (CIKM 2018): cross-entropy, no embedding.
# Reported on the full RSC15 data: Recall@20 0.7180, MRR@20 0.3087.
# Read by run.py -pf without being executed: keep it a literal OrderedDict.
from collections import OrderedDict

gru4rec_params = OrderedDict([
    ('loss', 'cross-entropy'),
    ('final_act', 'softmax'),
    ('constrained_embedding', False),
    ('embedding', 0),
    ('layers', [100]),
    ('batch_size', 32),
    ('n_sample', 2048),
    ('sample_alpha', 0.0),
    ('dropout_p_embed', 0.0),
    ('dropout_p_hidden', 0.3),
    ('learning_rate', 0.1),
    ('momentum', 0.7),
    ('n_epochs', 10),
    ('adapt', 'adagrad'),
])
