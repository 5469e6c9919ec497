"""GRU4Rec keeps scikit-learn's estimator contract: the constructor and set_params store the
hyper-parameters as given and nothing else, get_params(deep=True) returns them, fit's learned state ends
in '_' (the original's names stay as aliases), and sklearn.base.clone copies a fitted or an unfitted
model into an unfitted one that trains to the same weights."""
import numpy as np
import pytest

from conftest import SMALL, SMALL_STORE, make_train_log
from gru4rec import GRU4Rec
from hyperparams import HYPERPARAMETERS

base = pytest.importorskip('sklearn.base', reason='scikit-learn is a test extra: pip install gru4rec[test]')

# Values as a program and as a command line give them.
GIVEN = [dict(layers=[8, 6], loss='cross-entropy', final_act='softmax', adapt=None, momentum=0.1),
         dict(layers='8/6', constrained_embedding='True', learning_rate='0.05', embedding='layersize', adapt='none')]


def test_get_params_takes_scikit_learns_deep_and_lists_every_hyper_parameter():
    model = GRU4Rec(**SMALL)
    assert model.get_params(deep=True) == model.get_params(deep=False) == model.get_params()
    assert list(model.get_params()) == list(HYPERPARAMETERS)


@pytest.mark.parametrize('given', GIVEN)
def test_set_params_stores_what_the_constructor_stores(given):
    constructed, set_ = GRU4Rec(**given), GRU4Rec().set_params(**given)
    assert constructed.get_params() == set_.get_params()
    for name, value in given.items():
        assert constructed.get_params()[name] is value and set_.get_params()[name] is value, name


def test_set_params_checks_before_storing_anything():
    model = GRU4Rec(layers=[8])
    with pytest.raises(ValueError, match="final_act='linear': loss 'cross-entropy' needs final_act='softmax'"):
        model.set_params(loss='cross-entropy', layers=[16])
    assert model.get_params() == GRU4Rec(layers=[8]).get_params()


def test_learned_state_ends_in_an_underscore_and_the_originals_names_are_aliases():
    model = GRU4Rec(**SMALL).fit(make_train_log(), sample_store=SMALL_STORE)
    public = [name for name in vars(model) if not name.startswith('_')]
    assert sorted(set(public) - set(HYPERPARAMETERS)) == sorted(n for n in public if n.endswith('_'))
    assert {'itemidmap_', 'weights_', 'opt_values_', 'support_', 'history_', 'params_', 'H_'} <= set(public)
    assert model.itemidmap is model.itemidmap_ and model.weights is model.weights_ and model.H is model.H_
    assert model.params is model.params_ and model.support is model.support_ and model.opt_values is model.opt_values_


def test_set_params_refuses_to_change_the_architecture_of_a_trained_model():
    model = GRU4Rec(**SMALL).fit(make_train_log(), sample_store=SMALL_STORE)
    with pytest.raises(ValueError, match=r"\['layers'\] change the shape of a trained model"):
        model.set_params(layers='16')
    assert model.set_params(layers='8', learning_rate='0.2').get_params()['layers'] == '8'  # the same shape


def test_clone_of_an_unfitted_model():
    model = GRU4Rec(**GIVEN[1])
    copy = base.clone(model)
    assert copy is not model and copy.get_params() == model.get_params() and copy.itemidmap is None


def test_clone_of_a_fitted_model_is_unfitted_and_trains_to_the_same_weights():
    log = make_train_log()
    model = GRU4Rec(**dict(SMALL, n_epochs=1)).fit(log, sample_store=SMALL_STORE)
    copy = base.clone(model)
    assert copy.get_params() == model.get_params() and copy.itemidmap is None
    with pytest.raises(ValueError, match='not trained yet'):
        copy.predict_next_batch([1], [model.itemidmap[0]], batch=1)
    copy.fit(log, sample_store=SMALL_STORE)
    for name, w in model.weights.items():
        np.testing.assert_array_equal(copy.weights[name], w, err_msg=name)
