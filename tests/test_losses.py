"""Losses and final activations (SPEC section 5) against the float64 numpy references of conftest.
Gradients of the compiled graph are compared with central differences of the reference.
"""
import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

from conftest import ACTIVATIONS, loss_reference
from losses import LOSSES, parse_activation

RANKING_ACTS = ['linear', 'relu', 'tanh', 'leaky-0.1', 'elu-0.5', 'selu-1.05-1.67']
BPREG = 0.7
CASES = ([('cross-entropy', 'softmax', s) for s in (0.0, 0.2)]
         + [('xe_logit', 'softmax_logit', s) for s in (0.0, 0.2)]
         + [(loss, act, 0.0) for loss in ('bpr', 'top1', 'bpr-max', 'top1-max') for act in RANKING_ACTS])


def _numeric_gradient(f, Z, h=1e-5):
    grad = np.zeros_like(Z)
    for idx in np.ndindex(*Z.shape):
        step = np.zeros_like(Z)
        step[idx] = h
        grad[idx] = (f(Z + step) - f(Z - step)) / (2 * h)
    return grad


@pytest.mark.parametrize('loss,final_act,smoothing', CASES)
def test_loss_and_gradient_match_numpy(loss, final_act, smoothing):
    logits = pt.dmatrix('logits')
    weights = pt.dvector('weights')  # random row weights, so that a mix-up between rows shows
    with pytensor.config.change_flags(floatX='float64'):
        per_row = LOSSES[loss](parse_activation(final_act, final=True)(logits), smoothing=smoothing, bpreg=BPREG)
        f = pytensor.function([logits, weights], [per_row, pytensor.grad((per_row * weights).sum(), logits)])
    rng = np.random.default_rng(CASES.index((loss, final_act, smoothing)))
    for M, N in ((4, 9), (5, 5)):  # with samples (N > M) and in-batch negatives only
        Z = rng.normal(0, 1.5, size=(M, N))
        w = rng.uniform(0.5, 1.5, size=M)

        def reference(Z):
            return loss_reference(loss, ACTIVATIONS[final_act](Z), smoothing, BPREG)
        got_loss, got_grad = f(Z, w)
        assert got_loss.dtype == np.float64
        np.testing.assert_allclose(got_loss, reference(Z), rtol=1e-5, atol=0)
        np.testing.assert_allclose(got_grad, _numeric_gradient(lambda Z: reference(Z) @ w, Z), rtol=1e-5, atol=1e-8)


def test_cross_entropy_losses_agree():
    """cross-entropy on softmax and xe_logit on logits are the same loss, the latter computed stably."""
    logits = pt.dmatrix('logits')
    with pytensor.config.change_flags(floatX='float64'):
        f = pytensor.function([logits], [LOSSES['cross-entropy'](parse_activation('softmax', final=True)(logits),
                                                                  smoothing=0.1),
                                         LOSSES['xe_logit'](logits, smoothing=0.1)])
    via_softmax, via_logits = f(np.random.default_rng(3).normal(0, 2, size=(6, 11)))
    np.testing.assert_allclose(via_softmax, via_logits, rtol=1e-10)
