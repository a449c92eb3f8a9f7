"""Scoring an ensemble on a cached split: the Kaggle-style figures on single patches, unaltered and under the
eight test-set manipulations.

`score` runs every D4 view of every patch once, so the figures with the chosen views, without TTA, with all
eight views and per view, each with and without the JPEG-table evidence, come out of one forward pass;
`validation_scores` makes the same pass on the validation split for the evaluate stage's choices. Whole photos
are scored elsewhere, through the one photo-scoring path every consumer shares (`camid.inference.answers`).
Used by the evaluate and register stages and by `bench/tta.py`; the stages read the cache, fit and report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from camid.config import EvaluateParams
from camid.errors import CamidError
from camid.inference.blending import blend
from camid.inference.ensemble import Ensemble
from camid.data.cache import split_fingerprint
from camid.inference.jpeg_tables import entered
from camid.inference.tta import D4

log = logging.getLogger(__name__)
ALL_VIEWS = tuple(range(len(D4)))


def _blended(member_views: np.ndarray, views, method: str) -> np.ndarray:
    """Blend the (models, views, N, C) probabilities of `views` (indices into the views axis) into (N, C)."""
    chosen = member_views[:, list(views)]
    return blend(chosen.reshape(-1, *chosen.shape[2:]), method)


def report(evalset, probs: np.ndarray, labels: list[str], balance: str = "none") -> tuple[dict, np.ndarray]:
    """Weighted accuracy and its parts for (N, C) probabilities on an EvalSet; also the predicted labels."""
    from camid.inference.balancing import balance_to_quota
    from camid.core.manipulations import MANIPULATIONS
    from camid.core.metrics import accuracy, per_camera_accuracy, weighted_accuracy

    manipulated = evalset.manipulation > 0
    y = evalset.labels
    p = probs.argmax(1) if balance == "none" else balance_to_quota(probs, groups=manipulated, method=balance)
    metrics = {
        "weighted_accuracy": weighted_accuracy(y, p, manipulated),
        "accuracy_unaltered": accuracy(y[~manipulated], p[~manipulated]),
        "accuracy_manipulated": accuracy(y[manipulated], p[manipulated]),
        "per_camera": dict(zip(labels, per_camera_accuracy(y, p, len(labels)))),
        "per_manipulation": {name: accuracy(y[evalset.manipulation == i], p[evalset.manipulation == i])
                             for i, name in enumerate(("none",) + tuple(MANIPULATIONS))},
    }
    return metrics, p


def score(ensemble: Ensemble, cache: Path, settings: EvaluateParams, *, split: str = "test", batch_size: int = 64,
          views=None) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Score `ensemble` on a cached split with its own settings (or `views`); every D4 view is scored once, so
    the figures without TTA, with all eight views and per view come out of the same pass.
    Returns the metrics, the per-patch table (actual, predicted, manipulation, image_id) and the
    (models, 8, N, C) probabilities."""
    views = ensemble.resolve_views(settings.tta, views)
    scored = ALL_VIEWS if settings.tta or views != (0,) else (0,)  # no TTA: the identity alone is scored
    evalset, member_views, _ = scored_split(ensemble, cache, split, settings.blend, batch_size, views=scored)
    if not len(evalset):
        raise CamidError(f"the cache at {cache} has no {split!r} photos to score: re-run the split and prepare stages")
    labels = ensemble.labels
    signatures = row_signatures(evalset)

    originals = evalset.manipulation == 0

    def probs(chosen, tables: bool, calibrated: bool = True) -> np.ndarray:
        """The answers as served: blended, the tables where they apply, then the temperature of each row's
        setting (balancing, where asked, sees calibrated probabilities, as in `camid.inference.answers`)."""
        raw = final_probs(ensemble, evalset, member_views, signatures, chosen, tables, settings.blend)
        used = entered(ensemble.tables_evidence(signatures, originals)) if tables else False
        return ensemble.calibrate(raw, "patch", used) if calibrated else raw

    def weighted(chosen, tables: bool) -> float:
        if not set(chosen) <= set(scored):
            return float("nan")  # a view this pass did not score (evaluate.tta off)
        return report(evalset, probs(chosen, tables), labels, settings.balance)[0]["weighted_accuracy"]

    tables = ensemble.use_tables
    metrics, p = report(evalset, probs(views, tables), labels, settings.balance)
    metrics.update(
        split=split, test_data=split_fingerprint(cache, split, labels), images=evalset.photos,
        patches=int(len(evalset)), chance=1 / len(labels), tta=bool(len(views) > 1), views=[D4[v] for v in views],
        blend=settings.blend, balance=settings.balance, members=ensemble.names, jpeg_tables=tables,
        # the same model and settings, one thing changed at a time
        weighted_accuracy_no_tta=weighted((0,), tables),
        weighted_accuracy_all_d4=weighted(ALL_VIEWS, tables),
        weighted_accuracy_pixels_only=weighted(views, False),
        weighted_accuracy_pixels_only_no_tta=weighted((0,), False),
        weighted_accuracy_with_jpeg_tables=weighted(views, True),
        accuracy_unaltered_pixels_only=report(evalset, probs(views, False), labels,
                                              settings.balance)[0]["accuracy_unaltered"],
        weighted_accuracy_per_view={D4[v]: weighted((v,), False) for v in ALL_VIEWS},  # pixels only
        comparison={name: {"pixels_only": weighted(chosen, False), "with_jpeg_tables": weighted(chosen, True)}
                    for name, chosen in (("no_tta", (0,)), ("chosen_views", views), ("all_d4", ALL_VIEWS))},
        # on the camera originals, the population a served single-patch answer is fitted for (and usually is)
        calibration=calibration_report(ensemble, probs(views, tables, False)[originals], evalset.labels[originals],
                                       "patch", entered(ensemble.tables_evidence(signatures, originals)[originals])),
    )
    if tables:  # the answers the tables do not enter (`jpeg_tables: false`, a flagged file) have their own
        metrics["calibration_pixels_only"] = calibration_report(ensemble, probs(views, False, False)[originals],
                                                                evalset.labels[originals], "patch")
    table = pd.DataFrame({"actual": np.asarray(labels)[evalset.labels], "predicted": np.asarray(labels)[p],
                          "manipulation": evalset.manipulation, "image_id": evalset.image_id})
    return metrics, table, member_views


def final_probs(ensemble: Ensemble, evalset, member_views, signatures, views, tables: bool, method: str) -> np.ndarray:
    """(N, C) answers for an EvalSet before calibration: `views` blended, then the JPEG-table evidence on the
    unaltered rows if `tables`."""
    blended = _blended(member_views, views, method)
    return ensemble.apply_tables(blended, signatures, evalset.manipulation == 0, force=True) if tables else blended


def _setting_value(ensemble: Ensemble, table: dict, kind: str, tables_used) -> float | None:
    """The fitted value a report names: the bundle's own setting's if the tables entered any row, else the
    pixels-only one (`Ensemble.setting_keys`)."""
    return ensemble.fitted(table, ensemble.setting_keys([kind], bool(np.any(tables_used))))[0]


def calibration_report(ensemble: Ensemble, probs: np.ndarray, labels: np.ndarray, kind: str,
                       tables_used=False) -> dict:
    """ECE of uncalibrated `probs` and of the same under the temperatures of their setting (`kind`, and
    `tables_used` per row or for all: `Ensemble.calibrate`)."""
    from camid.inference.calibration import expected_calibration_error

    return {"temperature": _setting_value(ensemble, ensemble.temperature, kind, tables_used),
            "ece_before": expected_calibration_error(probs, labels),
            "ece_after": expected_calibration_error(ensemble.calibrate(probs, kind, tables_used), labels)}


@dataclass(frozen=True)
class ValidationScores:
    """The validation patches, every D4 view's (models, 8, N, C) probabilities for them and their (N, D)
    features (None for members without a camera layer), computed once."""
    evalset: object
    member_views: np.ndarray
    signatures: list
    features: np.ndarray | None = None


def validation_scores(ensemble: Ensemble, cache: Path, settings: EvaluateParams) -> ValidationScores:
    """The validation split scored once under every D4 view (the identity alone with `evaluate.tta` off)."""
    views = ALL_VIEWS if settings.tta else (0,)
    evalset, member_views, features = scored_split(ensemble, cache, "val", settings.blend, views=views)
    if not len(evalset):
        raise CamidError(f"the cache at {cache} has no validation photos to choose test-time views on")
    return ValidationScores(evalset, member_views, row_signatures(evalset), features)


def scored_split(ensemble: Ensemble, cache: Path, split: str, blend_method: str, batch_size: int = 64,
                 views=ALL_VIEWS):
    """Every photo of the split, its centre crop unaltered and under each manipulation
    (`camid.data.dataset.eval_stream`), through the D4 `views` (default: all eight), one chunk of about 16 MB of
    pixels at a time: (the split's rows without pixels, an EvalStream; the (models, 8, N, C) probabilities, NaN
    under the views not scored; the (N, D) features or None). What is kept per row is a few numbers, never the
    patch."""
    from tqdm import tqdm

    from camid.data.dataset import eval_stream

    stream = eval_stream(cache, split=split, patch=ensemble.patch, batch_size=batch_size)
    views = tuple(views)
    parts, feats = [], []
    with tqdm(total=len(stream), desc=f"{split} patches ({len(views)} view{'s' if len(views) > 1 else ''})",
              unit="patch", leave=False) as bar:
        for start, pixels in stream.chunks():
            pred = ensemble.predict(pixels, stream.manipulated[start:start + len(pixels)], views=views,
                                    blend=blend_method, batch_size=batch_size)
            part = np.full((len(ensemble.models), len(ALL_VIEWS), len(pixels), len(ensemble.labels)), np.nan)
            part[:, list(views)] = pred.member_views
            parts.append(part)
            feats.append(pred.features)
            bar.update(len(pixels))
    member_views = np.concatenate(parts, axis=2) if parts else np.zeros((len(ensemble.models), len(ALL_VIEWS), 0,
                                                                          len(ensemble.labels)))
    features = None if not feats or any(f is None for f in feats) else np.concatenate(feats)
    return stream, member_views, features


def row_signatures(evalset) -> list[str | None]:
    """Each EvalSet row's JPEG table signature: its photo's for unaltered rows, None for manipulated ones
    (a manipulated copy is re-encoded, or is no JPEG at all, as on the Kaggle test set)."""
    from camid.inference.jpeg_tables import signature_of_file

    known: dict[str, str | None] = {}
    signatures = []
    for path, manipulation in zip(evalset.path, evalset.manipulation):
        if not manipulation and path not in known:
            known[path] = signature_of_file(path)
        signatures.append(None if manipulation else known[path])
    return signatures
