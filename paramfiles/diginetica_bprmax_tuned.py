# Found by paropt.py, study diginetica_bprmax.
# Trials: 7 complete, 11 pruned, 4 failed; 90 epochs trained; 5.02 h from the first start to the last end
# Best trial #4: mrr@20 = 0.181448 on /work/search/data/diginetica_train_valid.tsv.gz
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
