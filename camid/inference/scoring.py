"""Scoring an ensemble on a cached split, and the validation-set choices the evaluate stage makes with it.

`score` runs every D4 view of every patch once, so the figures with the chosen views, without TTA, with all
eight views and per view, each with and without the JPEG-table evidence, come out of one forward pass.
`validation_scores` does the same on the validation split; `choose_settings` (TTA views, JPEG tables) and
`fit_confidence` (calibration, open-set thresholds) both read that one pass. `full_image_accuracy` scores whole photos as
`camid predict --full-image` does. Used by the evaluate and register stages and by `bench/tta.py`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from camid.config import EvaluateParams
from camid.errors import CamidError
from camid.inference.blending import blend
from camid.inference.ensemble import Ensemble
from camid.inference.jpeg_tables import NONE, USED
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
    from camid.data.dataset import eval_patches

    evalset = eval_patches(cache, split=split, patch=ensemble.patch)
    if not len(evalset):
        raise CamidError(f"the cache at {cache} has no {split!r} photos to score: re-run the split and prepare stages")
    pred = ensemble.predict(evalset.images, evalset.manipulation > 0, views=ALL_VIEWS, blend=settings.blend,
                            batch_size=batch_size)
    labels = ensemble.labels
    views = ensemble.resolve_views(settings.tta, views)
    signatures = row_signatures(evalset)

    def probs(chosen, tables: bool) -> np.ndarray:
        return final_probs(ensemble, evalset, pred.member_views, signatures, chosen, tables, settings.blend)

    def weighted(chosen, tables: bool) -> float:
        return report(evalset, probs(chosen, tables), labels, settings.balance)[0]["weighted_accuracy"]

    tables = ensemble.use_tables
    metrics, p = report(evalset, probs(views, tables), labels, settings.balance)
    metrics.update(
        split=split, test_data=test_fingerprint(cache, split, labels), images=int(len(np.unique(evalset.image_id))),
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
        calibration=calibration_report(ensemble, probs(views, tables), evalset.labels, "patch",
                                       ensemble.tables_evidence(signatures, evalset.manipulation == 0) == USED),
    )
    if tables:  # the answers the tables do not enter (manipulated, `jpeg_tables: false`) have their own
        metrics["calibration_pixels_only"] = calibration_report(ensemble, probs(views, False), evalset.labels, "patch")
    table = pd.DataFrame({"actual": np.asarray(labels)[evalset.labels], "predicted": np.asarray(labels)[p],
                          "manipulation": evalset.manipulation, "image_id": evalset.image_id})
    return metrics, table, pred.member_views


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
    from camid.data.dataset import eval_patches

    evalset = eval_patches(cache, split="val", patch=ensemble.patch)
    if not len(evalset):
        raise CamidError(f"the cache at {cache} has no validation photos to choose test-time views on")
    pred = ensemble.predict(evalset.images, evalset.manipulation > 0, views=ALL_VIEWS, blend=settings.blend)
    return ValidationScores(evalset, pred.member_views, row_signatures(evalset), pred.features)


def open_set_report(ensemble: Ensemble, probs: np.ndarray, labels: np.ndarray, crops, tables_evidence=None,
                    features=None) -> dict:
    """On photos of catalog cameras (calibrated `probs`; `tables_evidence`, `features` as in
    `Ensemble.is_unknown`): the share the open-set rule accepts and the accuracy on those; without unknown
    cameras here, its power to reject them is bench/open_set.py's to measure."""
    if not ensemble.open_set.get("threshold"):
        return {}
    accepted = ~ensemble.is_unknown(probs, [len(c) for c in crops], tables_evidence, features)
    correct = probs.argmax(1) == np.asarray(labels)
    used = np.asarray(tables_evidence if tables_evidence is not None else [], dtype=object) == USED
    knn = ensemble.open_set.get("knn_threshold") if ensemble.bank is not None and features is not None else None
    return {"score": ensemble.open_set["score"] if knn else "max_prob",
            "threshold": knn["photo"] if knn else _setting_value(ensemble, ensemble.open_set["threshold"], "photo", used),
            "known_accepted": float(accepted.mean()),
            "accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else float("nan"),
            "accuracy_all": float(correct.mean())}


def fit_confidence(ensemble: Ensemble, cache: Path, settings: EvaluateParams,
                   val: ValidationScores | None = None) -> tuple[dict, dict, dict | None]:
    """What the probabilities need from the validation split, with the bundle's views: calibration
    temperatures and the open-set thresholds on the calibrated probabilities that accept
    `settings.open_set_accept` of the validation answers (`camid.inference.openset`), each fitted per setting
    (`camid.inference.ensemble.KINDS`): single patches (the cached centre crops, unaltered and manipulated) and
    whole photos (auto patches); where the bundle uses the JPEG tables, "patch" and "photo" are fitted on the
    answers the tables entered and "patch_pixels_only", "photo_pixels_only" on every answer from the pixels
    alone; whether JPEG tables no training photo had count as "unknown" (`unseen_tables`, with the share of
    validation originals whose tables training saw, `val_tables_seen`); and the open-set feature bank of the
    training photos with the kNN thresholds (`knn_threshold`, per kind) that accept the same share of the
    validation answers (`camid.inference.openset`; no bank for members without a camera layer). Returns
    (temperatures, open-set rule, bank). `val`: the validation pass `choose_settings` already made (computed here
    when not given)."""
    from camid.inference.calibration import apply_temperature, fit_temperature
    from camid.inference.ensemble import PIXELS_ONLY
    from camid.inference.openset import K_NEIGHBOURS, KNN_SCORE, SCORE, confidence, fit_threshold, knn_score

    val = val or validation_scores(ensemble, cache, settings)
    evalset, labels = val.evalset, np.asarray(val.evalset.labels)
    photos = load_photos(cache, "val", ensemble.patch)
    val_photos = photo_answers(ensemble, photos, jpeg_tables=False)
    pixels = {"patch": (final_probs(ensemble, evalset, val.member_views, val.signatures, ensemble.views, False,
                                    settings.blend), labels),
              "photo": (val_photos.probs, photos[2])}
    if ensemble.use_tables:
        originals, every = evalset.manipulation == 0, np.ones(len(photos[2]), bool)
        photo_evidence = ensemble.tables_evidence(photos[1], every)
        used = {"patch": ensemble.tables_evidence(val.signatures, originals) == USED, "photo": photo_evidence == USED}
        with_tables = {"patch": final_probs(ensemble, evalset, val.member_views, val.signatures, ensemble.views,
                                            True, settings.blend),
                       "photo": ensemble.apply_tables(pixels["photo"][0], photos[1], every)}
        fits = {kind: (with_tables[kind][used[kind]], pixels[kind][1][used[kind]]) for kind in pixels}
        fits.update({kind + PIXELS_ONLY: pair for kind, pair in pixels.items()})
    else:
        fits = pixels
    temperature = {key: fit_temperature(probs, y) for key, (probs, y) in fits.items()}
    threshold = {key: fit_threshold(confidence(apply_temperature(probs, temperature[key])), settings.open_set_accept)
                 for key, (probs, _) in fits.items()}
    rule = {"score": SCORE, "accept": settings.open_set_accept, "threshold": threshold, "unseen_tables": False}
    if ensemble.use_tables:
        # Tables no training photo had are another camera's firmware, or a re-save; they count as "unknown" only
        # if the validation devices' originals (catalog cameras, unseen devices) almost never show any, i.e. the
        # rule costs known cameras no more than the threshold does. Phones that pick tables per scene fail this.
        jpegs = photo_evidence != NONE
        seen = float(np.mean(photo_evidence[jpegs] == USED)) if jpegs.any() else float("nan")
        rule.update(unseen_tables=bool(jpegs.any() and seen >= settings.open_set_accept), val_tables_seen=seen)
    bank = training_bank(ensemble, cache)
    if bank is not None and val.features is not None and val_photos.features is not None:
        rule.update(score=KNN_SCORE, k=K_NEIGHBOURS, knn_threshold={
            "patch": fit_threshold(knn_score(val.features, bank["patch"]), settings.open_set_accept),
            "photo": fit_threshold(knn_score(val_photos.features, bank["photo"]), settings.open_set_accept)})
    return temperature, rule, bank


def training_bank(ensemble: Ensemble, cache: Path) -> dict | None:
    """The open-set feature bank of the training photos (`openset.fit_bank`): their grid patches (auto, as
    `--full-image` cuts them) scored once, identity view, as camera originals; None without features."""
    from camid.inference.openset import fit_bank

    crops, _, _ = load_photos(cache, "train", ensemble.patch)
    pred = ensemble.predict(np.concatenate(crops), np.zeros(sum(len(c) for c in crops), bool), views=(0,))
    return None if pred.features is None else fit_bank(pred.features, [len(c) for c in crops])


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


def test_fingerprint(cache: Path, split: str, labels: list[str]) -> str:
    """What a score was measured on, for comparing scores (the champion alias): the photos of the split (path,
    size, label) and the catalog's labels, hashed."""
    import hashlib

    from camid.data.cache import read_index

    photos = read_index(cache, split).drop_duplicates("image")
    digest = hashlib.sha256(json.dumps(labels).encode())
    for path, label in sorted(zip(photos["path"], photos["label"])):
        size = Path(path).stat().st_size if Path(path).exists() else -1
        digest.update(f"{path}\0{size}\0{label}\n".encode())
    return digest.hexdigest()[:16]


def fit_tables(cache: Path, labels: list[str]):
    """The JPEG-table evidence of the training photos (camid.inference.jpeg_tables)."""
    from camid.inference.jpeg_tables import TablePrior, signature_of_file
    from camid.data.cache import read_index

    photos = read_index(cache, "train").drop_duplicates("image")
    return TablePrior.fit([signature_of_file(p) for p in photos["path"]], photos["label_index"], labels)


def choose_settings(ensemble: Ensemble, val: ValidationScores, settings: EvaluateParams,
                    tables) -> tuple[tuple[int, ...], bool, dict]:
    """On the validation pass: the TTA views (the identity alone when `settings.tta` is off), then whether
    the JPEG-table evidence is kept (`settings.jpeg_tables`, and it does not lower the validation score)."""
    from camid.core.metrics import weighted_accuracy
    from camid.inference.tta import select_views

    evalset, member_views = val.evalset, val.member_views
    manipulated = evalset.manipulation > 0

    def rate(probs):
        return weighted_accuracy(evalset.labels, probs.argmax(1), manipulated)

    identity = rate(_blended(member_views, (0,), settings.blend))
    views, best = select_views(member_views, rate, lambda p: blend(p, settings.blend)) if settings.tta else ((0,), identity)
    with_tables = rate(tables.apply(_blended(member_views, views, settings.blend), val.signatures,
                                    evalset.manipulation == 0))
    use_tables = bool(settings.jpeg_tables and tables.counts and with_tables >= best)
    return views, use_tables, {
        "val_weighted_accuracy": with_tables if use_tables else best,
        "val_weighted_accuracy_pixels_only": best, "val_weighted_accuracy_pixels_only_no_tta": identity,
        "val_weighted_accuracy_with_jpeg_tables": with_tables,
        "val_weighted_accuracy_per_view": {D4[v]: rate(_blended(member_views, (v,), settings.blend))
                                           for v in ALL_VIEWS}}


def load_photos(cache: Path, split: str, patch: int, patches: int = 0):
    """Each whole photo of the split cut as `camid predict --full-image` cuts it (`patches` grid patches, 0:
    auto): the crops, the JPEG table signatures and the true labels."""
    from tqdm import tqdm

    from camid.forensics.inspect import header_facts
    from camid.core.imageio import decode_image
    from camid.core.patches import grid_crops
    from camid.data.cache import read_index

    photos = read_index(cache, split).drop_duplicates("image")
    crops, signatures = [], []
    for path in tqdm(photos["path"], desc=f"full photos ({split})", unit="photo", leave=False):
        data = Path(path).read_bytes()
        crops.append(grid_crops(decode_image(data), patch, patches))
        signatures.append(header_facts(data)["jpeg_tables"])
    return crops, signatures, photos["label_index"].to_numpy()


def photo_answers(ensemble: Ensemble, photos, *, tta: bool = True, jpeg_tables: bool = True,
                  calibrated: bool = False):
    """The Prediction for `load_photos` output, unaltered: (photos, C) probabilities, each photo's patches
    blended into one, and its features."""
    crops, signatures, _ = photos
    return ensemble.predict_photos(crops, [False] * len(crops), signatures=signatures, tta=tta,
                                   jpeg_tables=jpeg_tables, calibrated=calibrated)


def full_image_accuracy(ensemble: Ensemble, cache: Path, split: str = "test", patches: int = 0) -> dict:
    """Accuracy on the split's whole photos, unaltered, as `camid predict --full-image` scores them, with the
    bundle's settings; also without TTA and from the pixels alone (without the JPEG-table evidence); the
    photo-level calibration error before and after the photo temperature, and the share of these known-camera
    photos the open-set rule accepts, for the bundle's setting and, where it uses the tables, pixels only."""
    from camid.core.metrics import accuracy, per_camera_accuracy

    photos = load_photos(cache, split, ensemble.patch, patches)
    y = photos[2]
    result = {"patches": "auto" if patches == 0 else patches, "photos": len(y),
              "patches_per_photo_mean": float(np.mean([len(c) for c in photos[0]]))}
    signatures = photos[1]
    for tta in (True, False):
        if not tta and ensemble.views == (0,):  # no TTA is the same as the bundle's views
            result.update(accuracy_no_tta=result["accuracy"],
                          accuracy_no_tta_pixels_only=result["accuracy_pixels_only"])
            break
        suffix = "" if tta else "_no_tta"
        answers = photo_answers(ensemble, photos, tta=tta, jpeg_tables=False)  # one forward pass per TTA setting;
        pixels = answers.probs
        every = np.ones(len(y), bool)
        probs = ensemble.apply_tables(pixels, signatures, every)  # the tables come after it
        result[f"accuracy{suffix}_pixels_only"] = accuracy(y, pixels.argmax(1))
        result[f"accuracy{suffix}"] = accuracy(y, probs.argmax(1))
        if tta:
            result["per_camera"] = dict(zip(ensemble.labels, per_camera_accuracy(y, probs.argmax(1),
                                                                                 len(ensemble.labels))))
            evidence = ensemble.tables_evidence(signatures, every)
            result["calibration"] = calibration_report(ensemble, probs, y, "photo", evidence == USED)
            result["open_set"] = open_set_report(ensemble, ensemble.calibrate(probs, "photo", evidence == USED), y,
                                                 photos[0], evidence, answers.features)
            if ensemble.use_tables:  # the same photos answered from the pixels alone (`jpeg_tables: false`)
                result["calibration_pixels_only"] = calibration_report(ensemble, pixels, y, "photo")
                result["open_set_pixels_only"] = open_set_report(ensemble, ensemble.calibrate(pixels, "photo"), y,
                                                                 photos[0], None, answers.features)
    return result
