"""Temperature scaling: it finds the temperature that makes probabilities honest, and never moves an answer."""
from __future__ import annotations

import numpy as np
import pytest

from camid.inference.calibration import apply_temperature, expected_calibration_error, fit_temperature


def overconfident(n=4000, classes=10, true_t=2.5, seed=0):
    """Probabilities softmax(z) of a model whose answers are really distributed as softmax(z / true_t)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, classes))
    real = np.exp(z / true_t)
    real /= real.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(classes, p=p) for p in real])
    shown = np.exp(z - z.max(axis=1, keepdims=True))
    return shown / shown.sum(axis=1, keepdims=True), labels


def test_fit_recovers_the_temperature_and_lowers_the_calibration_error():
    probs, labels = overconfident()
    t = fit_temperature(probs, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    before = expected_calibration_error(probs, labels)
    after = expected_calibration_error(apply_temperature(probs, t), labels)
    assert before > 0.1 and after < before / 3


def test_temperature_keeps_every_answer_and_rows_summing_to_one():
    probs, _ = overconfident(n=200)
    for t in (0.3, 1.0, 4.0):
        scaled = apply_temperature(probs, t)
        assert np.array_equal(scaled.argmax(1), probs.argmax(1))
        np.testing.assert_allclose(scaled.sum(axis=1), 1)
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-12)


def test_ece_of_a_perfectly_calibrated_toy_and_of_a_sure_wrong_one():
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(1.0)


def test_a_validation_set_without_errors_does_not_make_answers_certain():
    from camid.inference.calibration import T_RANGE

    probs = np.array([[0.6, 0.4], [0.3, 0.7]] * 50)
    assert fit_temperature(probs, np.array([0, 1] * 50)) == pytest.approx(T_RANGE[0], rel=1e-3)
