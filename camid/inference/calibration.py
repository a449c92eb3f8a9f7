"""Probabilities that mean what they say: temperature scaling (Guo et al., 2017) and the calibration error.

A network's top probability is usually not the frequency with which it is right. One temperature T, fitted on
the validation set by minimising the negative log-likelihood, rescales every distribution p to p^(1/T),
renormalised (the softmax of log p / T): confident answers soften when T > 1, and the ranking of the cameras,
hence every accuracy figure, is unchanged. A photo blended from many patches is far more confident than one
patch, so the evaluate stage fits one temperature for single patches and one for whole photos, and where the
bundle uses the JPEG-table evidence, one of each for answers the tables entered and for answers from the pixels
alone (`camid.inference.ensemble.KINDS`); all are stored in the bundle, and the expected calibration error
(ECE, 15 equal-width confidence bins) is reported on the test set before and after.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

_FLOOR = 1e-12
BINS = 15


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """(N, C) probabilities rescaled to p^(1/T), rows summing to 1."""
    logits = np.log(np.maximum(np.asarray(probs, dtype=np.float64), _FLOOR)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


# A validation set the model gets entirely right is best fitted by T -> 0 (certainty), which no unseen photo
# justifies: sharpening is capped at 4x.
T_RANGE = (0.25, 20.0)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in T_RANGE that minimises the mean negative log-likelihood of `labels` (N,) under (N, C)."""
    labels = np.asarray(labels)
    if not len(labels):
        return 1.0

    def nll(log_t: float) -> float:
        scaled = apply_temperature(probs, float(np.exp(log_t)))
        return float(-np.mean(np.log(np.maximum(scaled[np.arange(len(labels)), labels], _FLOOR))))

    found = minimize_scalar(nll, bounds=tuple(np.log(T_RANGE)), method="bounded",
                            options={"xatol": 1e-4})
    return float(np.exp(found.x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Σ over confidence bins of (share of images in the bin) × |accuracy − mean confidence| there."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if not len(labels):
        return float("nan")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)
