"""The competition's weighted accuracy and the per-camera views."""
from __future__ import annotations

import math

import numpy as np
import pytest

from camid.metrics import confusion_matrix, per_camera_accuracy, weighted_accuracy


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
