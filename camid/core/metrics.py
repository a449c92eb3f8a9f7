"""The competition's metric and the per-camera views of it.

`y_pred` may be class indices (N,) or scores (N, n_classes), which are reduced by argmax.
"""
from __future__ import annotations

import numpy as np

UNALTERED_WEIGHT = 0.7
MANIPULATED_WEIGHT = 0.3


def _labels(y) -> np.ndarray:
    y = np.asarray(y)
    return y.argmax(axis=-1) if y.ndim == 2 else y.reshape(-1)


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def weighted_accuracy(y_true, y_pred, manipulated) -> float:
    """0.7 * accuracy on unaltered images + 0.3 * accuracy on manipulated ones: group-weighted.

    The leaderboard weighed rows (0.7 per unaltered row, 0.3 per manipulated row, then the weighted mean);
    on its test set, with as many unaltered as manipulated images, that is this same number. camid weighs the
    groups instead, so the figure does not depend on how many manipulated copies an evaluation makes (it
    scores every photo under each of the 8 manipulations: 8 times as many manipulated rows). If one group is
    empty the other's accuracy is returned (the weights renormalise); NaN if both are.
    """
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    manipulated = np.asarray(manipulated, dtype=bool).reshape(-1)
    if not (len(y_true) == len(y_pred) == len(manipulated)):
        raise ValueError(f"length mismatch: {len(y_true)} labels, {len(y_pred)} predictions, {len(manipulated)} flags")
    parts = [(w, accuracy(y_true[m], y_pred[m])) for w, m in
             ((UNALTERED_WEIGHT, ~manipulated), (MANIPULATED_WEIGHT, manipulated)) if m.any()]
    if not parts:
        return float("nan")
    return sum(w * a for w, a in parts) / sum(w for w, _ in parts)


def confusion_matrix(y_true, y_pred, n: int) -> np.ndarray:
    """(n, n) int64 counts; rows are the true class, columns the predicted one."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def per_camera_accuracy(y_true, y_pred, n: int) -> np.ndarray:
    """(n,) float accuracy per true class (recall); NaN for a class with no samples."""
    matrix = confusion_matrix(y_true, y_pred, n)
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)
