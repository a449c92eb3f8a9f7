"""Open-set rejection: answer `unknown` when a photo is unlike every catalog camera.

The competition was a closed set; an analyst's photo may come from a camera the catalog does not hold, and a
closed-set model still names one of its cameras for it. The score here is the calibrated maximum probability
(Hendrycks & Gimpel, 2017: the maximum softmax probability is a strong baseline for out-of-distribution
detection; after temperature scaling it is also a probability that means what it says). A photo whose score is
below a threshold is answered `unknown`, with the closest catalog camera still given beside it.

The threshold is chosen on the validation split, which holds devices of its own but only catalog cameras: it is
the score that accepts `accept` (e.g. 0.95) of the validation photos, so about 1 - accept of the photos of known
cameras are rejected by design, and what that buys on unknown cameras is measured by `bench/open_set.py`
(two virtual camera models held out of training: AUROC and the accuracy/rejection trade-off). Single patches
and whole photos are scored on different scales (a photo blends many patches), and so are answers with and
without the JPEG-table evidence (the tables make a camera original's answer far surer), so each setting has its
threshold, as it has its temperature (`camid.inference.ensemble.KINDS`, `PIXELS_ONLY`; `Ensemble.is_unknown`).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

SCORE = "max_prob"  # the calibrated maximum camera probability
UNKNOWN = "unknown"  # the answer for a rejected photo


def confidence(probs: np.ndarray) -> np.ndarray:
    """(N,) the open-set score of (N, C) calibrated probabilities: the top probability."""
    return np.asarray(probs, dtype=np.float64).max(axis=1)


def fit_threshold(scores: np.ndarray, accept: float) -> float:
    """The threshold that accepts (score >= threshold) the fraction `accept` of `scores` (known photos)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    if not 0 < accept <= 1:
        raise ValueError(f"accept must be in (0, 1], got {accept}")
    if not len(scores):
        return 0.0
    rejected = int(np.floor((1 - accept) * len(scores) + 1e-9))  # at most this many known photos fall below
    return float(scores[rejected]) if rejected < len(scores) else float(scores[-1])


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling known photos (higher score) from unknown ones: the probability that a
    random known photo scores above a random unknown one (ties count half; Mann-Whitney U)."""
    known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    if not len(known) or not len(unknown):
        return float("nan")
    ranks = rankdata(np.concatenate([known, unknown]))
    u = ranks[:len(known)].sum() - len(known) * (len(known) + 1) / 2
    return float(u / (len(known) * len(unknown)))


def tradeoff(known: np.ndarray, known_correct: np.ndarray, unknown: np.ndarray, thresholds) -> list[dict]:
    """At each threshold: the share of known photos accepted, the accuracy on those accepted, the share of
    unknown photos rejected, and the accuracy of the open-set answer over all photos (a known photo is right
    when accepted and named correctly, an unknown one when rejected)."""
    known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    known_correct = np.asarray(known_correct, dtype=bool)
    rows = []
    for t in thresholds:
        accepted = known >= t
        right = int((accepted & known_correct).sum()) + int((unknown < t).sum())
        rows.append({"threshold": float(t), "known_accepted": float(accepted.mean()) if len(known) else float("nan"),
                     "accuracy_accepted": float(known_correct[accepted].mean()) if accepted.any() else float("nan"),
                     "unknown_rejected": float((unknown < t).mean()) if len(unknown) else float("nan"),
                     "open_set_accuracy": right / max(len(known) + len(unknown), 1)})
    return rows
