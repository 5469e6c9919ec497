# Found by paropt.py, study yoochoose1_64_bprmax.
# Trials: 8 complete, 11 pruned, 0 failed; 109 epochs trained; 1.70 h from the first start to the last end
# Best trial #18: mrr@20 = 0.302084 on /work/search/data/yoochoose1_64_train_valid.tsv.gz
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
