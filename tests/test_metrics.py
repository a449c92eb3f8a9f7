"""The competition's weighted accuracy and the per-camera views."""
from __future__ import annotations

import math

import numpy as np
import pytest

from camid.core.metrics import confusion_matrix, per_camera_accuracy, weighted_accuracy


def test_weighted_accuracy_weighs_unaltered_07_and_manipulated_03():
    y_true = [0, 1, 2, 0, 1, 2, 0, 1]
    y_pred = [0, 1, 2, 1, 0, 0, 0, 1]
    manipulated = [False, False, True, False, True, True, True, False]
    # unaltered rows 0, 1, 3, 7: right, right, wrong, right -> 0.75; manipulated rows 2, 4, 5, 6 -> 0.5
    assert weighted_accuracy(y_true, y_pred, manipulated) == pytest.approx(0.7 * 0.75 + 0.3 * 0.5)


def test_weighted_accuracy_takes_scores_and_handles_one_sided_sets():
    scores = np.eye(3)[[0, 2, 2]]
    assert weighted_accuracy([0, 1, 2], scores, [True, True, True]) == pytest.approx(2 / 3)
    assert weighted_accuracy([0, 1, 2], scores, [False] * 3) == pytest.approx(2 / 3)
    assert math.isnan(weighted_accuracy([], [], []))
    with pytest.raises(ValueError, match="length mismatch"):
        weighted_accuracy([0, 1], [0], [True, False])


def test_confusion_matrix_and_per_camera_accuracy():
    matrix = confusion_matrix([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 3)
    assert matrix.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    accuracy = per_camera_accuracy([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 3)
    assert accuracy[:2].tolist() == [0.5, pytest.approx(2 / 3)] and math.isnan(accuracy[2])


def _kaggle_per_row(y_true, y_pred, manipulated) -> float:
    """The leaderboard's definition: every row weighs 0.7 (unaltered) or 0.3 (manipulated), then the weighted
    mean of right answers over rows."""
    weights = np.where(np.asarray(manipulated), 0.3, 0.7)
    return float(np.sum(weights * (np.asarray(y_true) == np.asarray(y_pred))) / weights.sum())


def test_group_weighting_equals_the_per_row_kaggle_metric_only_for_equal_group_sizes():
    rng = np.random.default_rng(3)
    # Equal groups, as on the Kaggle test set (1,320 + 1,320): both definitions agree.
    y, p = rng.integers(0, 10, 2640), rng.integers(0, 10, 2640)
    p[:1500] = y[:1500]
    manipulated = np.arange(2640) % 2 == 1
    assert weighted_accuracy(y, p, manipulated) == pytest.approx(_kaggle_per_row(y, p, manipulated), abs=1e-12)
    # Unequal groups: camid weighs the two group accuracies 0.7 / 0.3, whatever the group sizes.
    y_true = [0] * 10 + [1] * 2
    y_pred = [0] * 5 + [9] * 5 + [1] * 2          # unaltered 5 of 10 right, manipulated 2 of 2
    manipulated = [False] * 10 + [True] * 2
    assert weighted_accuracy(y_true, y_pred, manipulated) == pytest.approx(0.7 * 0.5 + 0.3 * 1.0)  # 0.65
    per_row = (0.7 * 5 + 0.3 * 2) / (0.7 * 10 + 0.3 * 2)                                           # 0.539...
    assert _kaggle_per_row(y_true, y_pred, manipulated) == pytest.approx(per_row)
    assert abs(weighted_accuracy(y_true, y_pred, manipulated) - per_row) > 0.1
