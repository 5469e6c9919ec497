"""savemodel -> loadmodel keeps everything that predictions depend on; training is reproducible."""
import numpy as np
import pytest

from conftest import MODELS, fit_small, make_train_log
from evaluation import evaluate_gpu
from gru4rec import GRU4Rec


def predictions(model, prefix):
    """Scores of three steps over two slots, with a session change in slot 0 at the last step."""
    ids = model.itemidmap.to_numpy()
    calls = [([f'{prefix}1', f'{prefix}2'], [0, 4]), ([f'{prefix}1', f'{prefix}2'], [9, 4]),
             ([f'{prefix}3', f'{prefix}2'], [2, 11])]
    return [model.predict_next_batch(np.array(s, dtype=object), ids[i], batch=2).to_numpy() for s, i in calls]


@pytest.mark.parametrize('name', sorted(MODELS))
def test_loaded_model_predicts_identically(models, name, tmp_path, test_log):
    model = models(name)
    path = tmp_path / 'model.gru4rec'
    model.savemodel(path)
    loaded = GRU4Rec.loadmodel(path)
    assert loaded.get_params() == model.get_params()
    assert list(loaded.itemidmap) == list(model.itemidmap)
    np.testing.assert_array_equal(loaded.support, model.support)
    assert loaded.params_.keys() == model.params_.keys()
    for n in model.params_:
        np.testing.assert_array_equal(loaded.params_[n].get_value(), model.params_[n].get_value())
    assert loaded.opt_values.keys() == model.opt_values.keys()
    for n in model.opt_values:
        np.testing.assert_array_equal(loaded.opt_values[n], model.opt_values[n])
    for got, expected in zip(predictions(loaded, 'saved'), predictions(model, 'saved')):
        np.testing.assert_array_equal(got, expected)
    evaluate = dict(test_data=test_log, cut_off=[1, 5, 10], batch_size=3)
    assert evaluate_gpu(loaded, **evaluate) == evaluate_gpu(model, **evaluate)


def test_a_model_loaded_to_predict_compiles_its_training_step_only_when_it_trains(tmp_path, test_log):
    model = fit_small()
    model.savemodel(tmp_path / 'model.gru4rec')
    loaded = GRU4Rec.loadmodel(tmp_path / 'model.gru4rec')
    loaded.recommend({'s': list(model.itemidmap[:3])}, k=5)
    evaluate_gpu(loaded, test_log, cut_off=[5])
    assert loaded.training_step_.function is None
    loaded.retrain(make_train_log(), n_epochs=1)
    assert loaded.training_step_.function is not None and len(loaded.history_) == len(model.history_) + 1


def test_same_seed_and_data_give_the_same_model():
    """Every source of randomness at once: initialisation, sampling, both dropouts, session order."""
    params = dict(embedding=5, dropout_p_hidden=0.3, dropout_p_embed=0.2, train_random_order=True)
    first, second = fit_small(**params), fit_small(**params)
    other_seed = fit_small(seed=8, **params)
    assert first.params_.keys() == second.params_.keys()
    for n in first.params_:
        np.testing.assert_array_equal(first.params_[n].get_value(), second.params_[n].get_value())
        assert not np.array_equal(first.params_[n].get_value(), other_seed.params_[n].get_value()) or n.startswith('B')
    assert [h['loss'] for h in first.history_] == [h['loss'] for h in second.history_]


def test_learned_state_ends_in_underscore_and_keeps_the_original_names():
    untrained = GRU4Rec(layers=[4], n_sample=0, batch_size=4, n_epochs=1)
    assert untrained.itemidmap is None and untrained.itemidmap_ is None
    model = fit_small(layers=[4])
    assert model.itemidmap is model.itemidmap_ and len(model.itemidmap_) == model.n_items
    assert model.weights is model.weights_ and model.support is model.support_
    assert model.opt_values is model.opt_values_
    assert model.weights_['Wy'].shape == (model.n_items, 4)
