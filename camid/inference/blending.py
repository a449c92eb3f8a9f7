"""Blend class probabilities across models and test-time views into one distribution per image."""
from __future__ import annotations

import numpy as np

from camid.errors import CamidError

BLENDS = ("mean_square", "arithmetic", "geometric")
_LOG_FLOOR = 1e-12  # keeps one model's hard zero from vetoing a class in the geometric mean


class UnknownMethodError(CamidError, ValueError):
    """A post-processing method name (blend or balancing) that is not one of the valid ones."""


def blend(probs: np.ndarray, method: str = "mean_square") -> np.ndarray:
    """Blend (M, N, C) probabilities from M models x views into (N, C) rows that sum to 1.

    mean_square: sqrt(sum_m p^2), the seed author's choice (it favours the views that are confident);
    arithmetic: mean_m p; geometric: exp(mean_m log p), with p floored so log stays finite.
    """
    if method not in BLENDS:
        raise UnknownMethodError(f"unknown blend {method!r}; valid blends: {', '.join(BLENDS)}")
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError(f"blend expects (models x views, images, classes) probabilities, got shape {probs.shape}")
    if method == "mean_square":
        blended = np.sqrt(np.square(probs).sum(axis=0))
    elif method == "arithmetic":
        blended = probs.mean(axis=0)
    else:
        blended = np.exp(np.log(np.maximum(probs, _LOG_FLOOR)).mean(axis=0))
    return blended / blended.sum(axis=1, keepdims=True)
