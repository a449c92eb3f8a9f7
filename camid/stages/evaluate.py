"""The evaluate stage: bundle the trained backbones into an ensemble, choose its test-time settings on the
validation set, and score it once on the test set.

Validation and test hold devices of their own (the split stage), so the test figure is camera *model* accuracy on
devices the network never saw. Validation makes every choice: here, which D4 views test-time augmentation
averages (`camid.inference.tta.select_views`: only views that raise the validation score). The chosen views
and the blend are written into the bundle, so the served model uses exactly what was scored. Test is only
reported: with the chosen views, with the identity view alone (no TTA) and with all eight D4 views, plus
every view on its own, side by side.

Every held-out photo is scored unaltered and under each of the eight test-set manipulations, through the same
`Ensemble.predict` the served model uses. The headline figure is the competition's weighted accuracy,
0.7 x accuracy on unaltered images + 0.3 x accuracy on manipulated ones (camid.core.metrics).
Outputs: the bundle (for the register stage), the metrics (DVC metrics, MLflow), the test confusion matrix as a
DVC plot (CSV of actual/predicted pairs) and as an image logged to MLflow.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from camid.config import EvaluateParams, load_params, optional
from camid.core.fileio import atomic_path, write_json
from camid.data.cache import split_photos
from camid.errors import CamidError
from camid.inference.answers import PhotoScores, answers, evidence_and_probs, flag_from_name, score_photos
from camid.inference.blending import BLENDS, blend
from camid.inference.ensemble import PIXELS_ONLY, Ensemble, load_ensemble
from camid.inference.jpeg_tables import NONE, entered
from camid.inference.options import BALANCE_CHOICES, check_stage_choices
from camid.inference.scoring import (ALL_VIEWS, ValidationScores, _blended, _setting_value, calibration_report,
                                     final_probs, score, validation_scores)
from camid.inference.tta import D4

log = logging.getLogger(__name__)


def _bar(desc: str):
    return lambda photos: tqdm(photos, desc=desc, unit="photo", leave=False)


def twin_groups(cameras: int, pairs) -> np.ndarray:
    """(cameras,) each camera's group: the connected component of the graph whose edges are `pairs` (twins)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = (np.asarray([pair[i] for pair in pairs], dtype=int) for i in (0, 1))
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(cameras, cameras))
    return connected_components(graph, directed=False)[1]


def fit_tables(cache: Path, labels: list[str]):
    """The JPEG-table evidence of the training photos (camid.inference.jpeg_tables)."""
    from camid.inference.jpeg_tables import TablePrior, signature_of_file

    photos = split_photos(cache, "train")
    return TablePrior.fit([signature_of_file(p) for p in photos["path"]], photos["label_index"], labels)


# The twins choose_settings counts as one camera: pairs whose validation centre crops (one crop a photo) were named
# the other of the pair at least this often, or firmware twins. One crop confuses more than a whole photo (the
# metadata rule's TWIN_CONFUSION, 0.1, is on whole photos): on the zoo, 0.1 on crops paired 4, 0.25 the 2 pairs the
# whole photos pair (crops 0.41 and 0.39; the next, 0.16 and 0.11, are no pair on whole photos).
CROP_TWIN_CONFUSION = 0.25


def choose_settings(ensemble: Ensemble, val: ValidationScores, settings: EvaluateParams, tables,
                    firmware: list[tuple[int, int]] = ()) -> tuple[tuple[int, ...], bool, dict]:
    """On the validation pass: the TTA views (the identity alone when `settings.tta` is off), then whether
    the JPEG-table evidence is kept (`settings.jpeg_tables`, and it does not lower the validation score with each
    pair of twins counted as one camera). Twins (the `firmware` pairs of camera indices, `training_firmware_twins`,
    and the pairs validation's pixels confuse, `camid.inference.metadata.fit_twins`) share one firmware, or look
    it: which of the two a photo's tables favour is which twin's reference happened to carry them (a per-scene
    table, a quality mode), not evidence, and scored per camera that chance can outweigh everything the tables
    tell of the catalog's other cameras and drop them, and with them the firmware ground of `unknown`."""
    from camid.core.metrics import weighted_accuracy
    from camid.inference.metadata import fit_twins
    from camid.inference.tta import select_views

    evalset, member_views = val.evalset, val.member_views
    manipulated = evalset.manipulation > 0

    def rate(probs, group=None):
        group = np.arange(probs.shape[1]) if group is None else group
        return weighted_accuracy(group[np.asarray(evalset.labels)], group[probs.argmax(1)], manipulated)

    identity = rate(_blended(member_views, (0,), settings.blend))
    views, best = select_views(member_views, rate, lambda p: blend(p, settings.blend)) if settings.tta else ((0,), identity)
    pixels = _blended(member_views, views, settings.blend)
    tabled = tables.apply(pixels, val.signatures, ~manipulated)
    with_tables = rate(tabled)
    labels, background = list(ensemble.labels), set(np.flatnonzero(ensemble.background).tolist())
    twins = [pair for pair in (tuple(labels.index(c) for c in twin["cameras"]) for twin in fit_twins(
        pixels[~manipulated], np.asarray(evalset.labels)[~manipulated], labels, CROP_TWIN_CONFUSION,
        firmware=list(firmware))) if not background & set(pair)]  # background cameras: nobody's twin (never an answer)
    group = twin_groups(len(labels), twins)
    merged = {"pixels": rate(pixels, group), "tables": rate(tabled, group)}
    use_tables = bool(settings.jpeg_tables and tables.counts and merged["tables"] >= merged["pixels"])
    return views, use_tables, {
        "val_weighted_accuracy": with_tables if use_tables else best,
        "val_weighted_accuracy_pixels_only": best, "val_weighted_accuracy_pixels_only_no_tta": identity,
        "val_weighted_accuracy_with_jpeg_tables": with_tables,
        "val_twins_for_jpeg_tables": [[labels[a], labels[b]] for a, b in twins],
        "val_weighted_accuracy_twins_merged": merged["pixels"],
        "val_weighted_accuracy_with_jpeg_tables_twins_merged": merged["tables"],
        "val_weighted_accuracy_per_view": {D4[v]: rate(_blended(member_views, (v,), settings.blend))
                                           if settings.tta or v == 0 else float("nan") for v in ALL_VIEWS}}


def score_split_photos(ensemble: Ensemble, cache: Path, split: str, *, tta: bool = True, patches: int = 0,
                       **kwargs) -> tuple[pd.DataFrame, PhotoScores]:
    """The split's whole photos through the one photo-scoring path, as `camid predict --full-image` scores the
    same files (flag from the name, else estimated): (the photos, their scores)."""
    photos = split_photos(cache, split)
    scores = score_photos(ensemble, list(photos["path"]), flags=[flag_from_name(p) for p in photos["path"]],
                          tta=tta, patches=patches, progress=_bar(f"{split} photos"), **kwargs)
    return photos, scores


def fit_confidence(ensemble: Ensemble, cache: Path, settings: EvaluateParams, val: ValidationScores | None = None,
                   val_photos: tuple[pd.DataFrame, PhotoScores] | None = None) -> tuple[dict, dict, dict | None, dict]:
    """What the probabilities need from the validation split, with the bundle's views, each fitted on the
    population its setting serves (`camid.inference.ensemble.KINDS`): single patches on the validation camera
    originals' cached centre crops (a served `patches: 1` request is a photo, not one of the test set's
    manipulated copies), whole photos on the validation photos scored exactly as they are served
    (`camid.inference.answers`: auto patches, flag estimated). Where the bundle uses the JPEG tables, "patch" and
    "photo" are fitted on the answers the tables entered and "patch_pixels_only", "photo_pixels_only" on every
    answer from the pixels alone. Fitted: the calibration temperatures; the open-set thresholds on the calibrated
    probabilities that accept `settings.open_set_accept` of the validation answers (`camid.inference.openset`);
    whether JPEG tables no training photo had count as "unknown" (`unseen_tables`, with the share of validation
    originals whose tables training saw, `val_tables_seen`); the open-set feature bank of the training photos and
    the kNN thresholds (`knn_threshold`, per kind) that accept the same share, and for each camera with one
    reference device a whole-photo threshold of its own (`knn_threshold_camera`, `single_device`); the metadata rule
    (`camid.inference.metadata.fit_metadata`: the twins validation's whole photos cannot tell apart by their pixels,
    and, for cameras of one reference device, those that share JPEG tables (exactly, or one maker's table family)
    and a native size; how often genuine photos would read inconsistent). Returns (temperatures, open-set rule,
    bank, metadata rule). `val`: the validation pass `choose_settings` already made; `val_photos`: the validation
    photos scored with the bundle's members and views (`score_split_photos`; the pixels alone, so one pass serves
    any JPEG-table setting); each computed here when not given."""
    from camid.inference.calibration import apply_temperature, fit_temperature
    from camid.data.cache import read_meta
    from camid.inference.metadata import twin_map
    from camid.inference.openset import (K_NEIGHBOURS, KNN_SCORE, MIN_UNSEEN_DEVICE_PHOTOS, SCORE, SINGLE_DEVICE,
                                         UNSEEN_DEVICES, camera_thresholds, confidence, fit_threshold, knn_score,
                                         reach_threshold)

    val = val or validation_scores(ensemble, cache, settings)
    evalset, labels = val.evalset, np.asarray(val.evalset.labels)
    originals = evalset.manipulation == 0
    photos, scores = val_photos or score_split_photos(ensemble, cache, "val")
    ok = scores.ok
    y = photos["label_index"].to_numpy()[ok]
    pixels = {"patch": (final_probs(ensemble, evalset, val.member_views, val.signatures, ensemble.views, False,
                                    settings.blend)[originals], labels[originals]),
              "photo": (scores.pixels[ok], y)}
    # Which validation rows come from devices training never saw (cameras the split dealt by device): the rule and
    # the temperatures are fitted on those where there are enough, else on the reference devices' held-out photos
    # with the single-device margin (camid.inference.openset).
    split_info = read_meta(cache).get("split", {})
    by_device = np.append(devices_split(ensemble, cache), False)
    # Background cameras (other cameras' photos, never an answer) take no part in the rule: their validation
    # devices are other models, not unseen devices of a catalog camera (Ensemble.background).
    background = np.append(ensemble.background, False)
    catalog_rows = {"patch": ~background[labels[originals]], "photo": ~background[y]}
    unseen = {"patch": by_device[labels[originals]] & catalog_rows["patch"], "photo": by_device[y] & catalog_rows["photo"]}
    basis = UNSEEN_DEVICES if unseen["photo"].sum() >= MIN_UNSEEN_DEVICE_PHOTOS else SINGLE_DEVICE
    photo_evidence = np.full(int(ok.sum()), NONE, dtype=object)
    fits = {kind: (probs[catalog_rows[kind]], y_[catalog_rows[kind]], unseen[kind][catalog_rows[kind]])
            for kind, (probs, y_) in pixels.items()}  # every catalog row, from the pixels alone
    if ensemble.use_tables:
        evidence, with_tables = evidence_and_probs(ensemble, scores)
        photo_evidence = evidence[ok]
        used = {"patch": entered(ensemble.tables_evidence(val.signatures, originals)[originals]),
                "photo": entered(photo_evidence)}
        tabled = {"patch": final_probs(ensemble, evalset, val.member_views, val.signatures, ensemble.views, True,
                                       settings.blend)[originals],
                  "photo": with_tables[ok]}
        rows = {kind: used[kind] & catalog_rows[kind] for kind in pixels}
        fits = {**{kind: (tabled[kind][rows[kind]], pixels[kind][1][rows[kind]], unseen[kind][rows[kind]])
                   for kind in pixels},
                **{kind + PIXELS_ONLY: fit for kind, fit in fits.items()}}

    def device_out(probs, y_, rows):
        """The rows of unseen devices where the rule rests on them and this setting has enough, else all."""
        return (probs[rows], y_[rows]) if basis == UNSEEN_DEVICES and rows.sum() >= MIN_UNSEEN_DEVICE_PHOTOS \
            else (probs, y_)

    fits = {key: device_out(*fit) for key, fit in fits.items()}
    temperature = {key: fit_temperature(probs, y_) for key, (probs, y_) in fits.items()}
    threshold = {key: fit_threshold(confidence(apply_temperature(probs, temperature[key])), settings.open_set_accept)
                 for key, (probs, _) in fits.items()}
    rule = {"score": SCORE, "accept": settings.open_set_accept, "threshold": threshold, "unseen_tables": False,
            "fitted_on": {key: int(len(y_)) for key, (_, y_) in fits.items()}, "reference": basis,
            "reference_devices": {label: int(split_info.get("train_devices", {}).get(label, 0))
                                  for label in ensemble.labels}}
    if ensemble.use_tables:
        # Tables no training photo had are another camera's firmware, or a re-save; they count as "unknown" only
        # if the validation devices' originals (catalog cameras, unseen devices) almost never show any, i.e. the
        # rule costs known cameras no more than the threshold does. Phones that pick tables per scene fail this.
        # Measured device-out where the rule rests on unseen devices: another device of a model may shoot in a
        # quality mode the training devices never used, which the reference device's own held-out photos cannot show.
        jpegs = (photo_evidence != NONE) & (unseen["photo"] if basis == UNSEEN_DEVICES else catalog_rows["photo"])
        seen = float(np.mean(entered(photo_evidence[jpegs]))) if jpegs.any() else float("nan")
        rule.update(unseen_tables=bool(jpegs.any() and seen >= settings.open_set_accept), val_tables_seen=seen)
    pixel_key = "photo" + PIXELS_ONLY if ensemble.use_tables else "photo"
    pixel_probs = apply_temperature(pixels["photo"][0], temperature[pixel_key])  # every val photo: twins, alarms
    served = pixel_probs.copy()
    if ensemble.use_tables and photo_evidence.size:
        tabled_rows = entered(photo_evidence)
        served[tabled_rows] = apply_temperature(tabled["photo"][tabled_rows], temperature["photo"])
    metadata = _catalog_metadata(ensemble, pixel_probs, served, y, training_firmware_twins(ensemble, cache, by_device))
    bank = training_bank(ensemble, cache)
    if bank is not None and val.features is not None and scores.features is not None:
        patch_scores = knn_score(val.features[originals], bank["patch"])
        photo_scores = knn_score(scores.features[ok], bank["photo"])
        rows = unseen if basis == UNSEEN_DEVICES else catalog_rows
        knn = {"patch": fit_threshold(patch_scores[rows["patch"]], settings.open_set_accept),
               "photo": fit_threshold(photo_scores[rows["photo"]], settings.open_set_accept)}
        # Cameras with one reference device: whole photos against that camera's own training photos, each with a
        # threshold `single_device_reach` of the way (log scale) to the other cameras (openset.camera_thresholds).
        single = [c for c in range(len(ensemble.labels)) if not by_device[c] and not background[c]]
        # With background cameras, a one-reference-device camera's pixel ground is the background class instead:
        # the photos the pixels put with the other cameras are unknown (Ensemble.unknown_grounds), and no distance
        # from one device's photos is asked of its model's other devices.
        # A camera's twins (pairs the pixels cannot separate: metadata.twins) are not its far end (camera_thresholds).
        index = {label: c for c, label in enumerate(ensemble.labels)}
        twins = {index[a]: {index[b] for b in others} for a, others in twin_map(metadata).items()}
        per_camera = {} if background.any() else camera_thresholds(
            scores.features[ok], y, bank["photo"], bank["photo_labels"], single, settings.open_set_accept,
            reach=settings.single_device_reach, twins=twins)
        for fit in per_camera.values():
            fit["twins_left_out"] = [ensemble.labels[c] for c in fit["twins_left_out"]]
        if background.any():
            rule["background"] = {"cameras": [ensemble.labels[c] for c in np.flatnonzero(background[:-1])],
                                  "single_device": [ensemble.labels[c] for c in single]}
        rule.update(score=KNN_SCORE, k=K_NEIGHBOURS,
                    bank_size={k: int(len(v)) for k, v in bank.items() if k != "photo_labels"}, knn_threshold=knn,
                    knn_threshold_camera={ensemble.labels[c]: fit["threshold"] for c, fit in per_camera.items()},
                    single_device={ensemble.labels[c]: fit for c, fit in per_camera.items()},
                    single_device_reach=settings.single_device_reach)
        if ensemble.use_tables:  # unseen tables raise a one-reference-device camera's bar (Ensemble.unknown_grounds)
            rule.update(knn_threshold_camera_unseen_tables={
                ensemble.labels[c]: reach_threshold(fit, settings.unseen_tables_reach) for c, fit in per_camera.items()},
                unseen_tables_reach=settings.unseen_tables_reach)
    return temperature, rule, bank, metadata


def _catalog_metadata(ensemble: Ensemble, pixel_probs: np.ndarray, served: np.ndarray, y: np.ndarray,
                      firmware: list[tuple[int, int]]) -> dict:
    """`fit_metadata` on the catalog cameras' validation photos, their probabilities read as the answers read them
    (`Ensemble.catalog_probs`): background cameras are never named, so they are nobody's twin."""
    from camid.inference.metadata import fit_metadata

    keep = np.flatnonzero(~ensemble.background)
    new = {int(old): index for index, old in enumerate(keep)}
    rows = np.isin(y, keep)
    return fit_metadata(ensemble.catalog_probs(pixel_probs)[rows][:, keep], ensemble.catalog_probs(served)[rows][:, keep],
                        np.array([new[int(c)] for c in y[rows]], dtype=int), [ensemble.labels[c] for c in keep],
                        firmware=[(new[a], new[b]) for a, b in firmware if a in new and b in new])


def devices_split(ensemble: Ensemble, cache: Path) -> np.ndarray:
    """(cameras,) True for each catalog camera the split dealt by device (validation holds devices training never
    saw), False for one split by photo (one reference device)."""
    from camid.data.cache import read_meta

    modes = read_meta(cache).get("split", {}).get("modes", {})
    return np.array([modes.get(label) == "devices" for label in ensemble.labels], dtype=bool)


def training_firmware_twins(ensemble: Ensemble, cache: Path, by_device: np.ndarray) -> list[tuple[int, int]]:
    """`camid.inference.metadata.firmware_twins` of the bundle's catalog: the training photos' JPEG tables (the
    bundle's table counts) and native sizes (the cache's index), for the cameras that validation does not hold
    unseen devices of (`by_device[c]` False)."""
    from camid.data.cache import split_photos
    from camid.inference.metadata import firmware_twins, native_sizes

    if ensemble.tables is None:
        return []
    photos = split_photos(cache, "train")
    single = {c for c in range(len(ensemble.labels)) if not by_device[c]}
    make_of = {camera.get("label"): camera.get("make", "") for camera in ensemble.cameras}
    makes = {c: make_of.get(label, "") for c, label in enumerate(ensemble.labels)}
    return firmware_twins(ensemble.tables.counts, native_sizes(photos["label_index"], photos["height"],
                                                               photos["width"]), single, ensemble.tables.seen_family,
                          makes)


def training_bank(ensemble: Ensemble, cache: Path) -> dict | None:
    """The open-set feature bank of the training photos, streamed through the one photo-scoring path (auto
    patches, as `--full-image` cuts them, identity view): every photo's feature and a seeded sample of their
    patches' (`openset.patch_bank_rows`, bounded whatever the number of photos); None without features."""
    from camid.inference.openset import patch_bank_rows

    photos = split_photos(cache, "train")
    probe = ensemble.predict(np.zeros((1, ensemble.patch, ensemble.patch, 3), np.uint8), [False], views=(0,))
    if probe.features is None:
        return None
    scores = score_photos(ensemble, list(photos["path"]), flags=[False] * len(photos), tta=False,
                          patch_sample=patch_bank_rows(probe.features.shape[1]), seed=0,
                          progress=_bar("open-set bank (train photos)"))
    return {"patch": scores.patch_features, "photo": scores.features[scores.ok],
            "photo_labels": photos["label_index"].to_numpy()[scores.ok]}


def _open_set_figures(ensemble: Ensemble, table: pd.DataFrame, actual: np.ndarray, kind: str = "photo",
                      tables_used=False) -> dict:
    """On photos of catalog cameras (an answer table): the share the open-set rule accepts and the accuracy on
    those; its power to reject unknown cameras is bench/open_set.py's to measure."""
    if not (ensemble.open_set.get("threshold") or ensemble.open_set.get("knn_threshold")):
        return {}
    accepted = ~table["unknown"].to_numpy(bool)
    correct = table["closest_camera"].to_numpy(object) == actual
    knn = ensemble.open_set.get("knn_threshold") if ensemble.bank is not None else None
    return {"score": ensemble.open_set["score"] if knn else "max_prob",
            "threshold": knn[kind] if knn else _setting_value(ensemble, ensemble.open_set["threshold"], kind,
                                                              tables_used),
            "known_accepted": float(accepted.mean()),
            "accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else float("nan"),
            "accuracy_all": float(correct.mean())}


def full_image_report(ensemble: Ensemble, cache: Path, split: str = "test",
                      patches: int = 0) -> tuple[dict, pd.DataFrame]:
    """The split's whole photos answered exactly as `camid predict --full-image` and the served model answer
    them (`camid.inference.answers`; flag from the name, else estimated): accuracy of the closest camera with the
    bundle's settings, without TTA and from the pixels alone; the photo-level calibration error before and after
    the temperature; the share of these known-camera photos the open-set rule accepts. Also the served answers,
    one row per photo (path, actual, and the answer table's columns)."""
    from camid.core.metrics import accuracy, per_camera_accuracy

    labels = np.asarray(ensemble.labels)
    photos, scores = score_split_photos(ensemble, cache, split, patches=patches)
    # The figures are on the catalog cameras' photos; background cameras' photos (never an answer) have their own.
    elsewhere = ensemble.background[photos["label_index"].to_numpy()]
    ok = scores.ok & ~elsewhere
    actual = labels[photos["label_index"].to_numpy()]
    options = {"patches": patches}
    served = answers(ensemble, scores, options)
    pixels = answers(ensemble, scores, {**options, "jpeg_tables": False})
    y = photos["label_index"].to_numpy()[ok]

    def acc(table) -> float:
        return accuracy(y, table["closest_camera"].map(list(labels).index).to_numpy()[ok])

    result = {"patches": "auto" if patches == 0 else patches, "photos": int(ok.sum()), "errors": int((~ok).sum()),
              "patches_per_photo_mean": float(scores.patches[ok].mean()) if ok.any() else 0.0,
              "accuracy": acc(served), "accuracy_pixels_only": acc(pixels)}
    if ensemble.views == (0,):  # no TTA is the same as the bundle's views
        result.update(accuracy_no_tta=result["accuracy"], accuracy_no_tta_pixels_only=result["accuracy_pixels_only"])
    else:  # one forward pass per TTA setting; the tables come after it
        _, plain = score_split_photos(ensemble, cache, split, tta=False, patches=patches)
        result.update(accuracy_no_tta=acc(answers(ensemble, plain, {**options, "tta": False})),
                      accuracy_no_tta_pixels_only=acc(answers(ensemble, plain, {**options, "tta": False,
                                                                                 "jpeg_tables": False})))
    result["per_camera"] = dict(zip(ensemble.labels, per_camera_accuracy(
        y, served["closest_camera"].map(list(labels).index).to_numpy()[ok], len(labels))))
    evidence, tabled = evidence_and_probs(ensemble, scores)
    result["calibration"] = calibration_report(ensemble, tabled[ok], y, "photo", entered(evidence[ok]))
    result["open_set"] = _open_set_figures(ensemble, served[ok], actual[ok], "photo", entered(evidence[ok]))
    if ensemble.use_tables:  # the same photos answered from the pixels alone (`jpeg_tables: false`)
        result["calibration_pixels_only"] = calibration_report(ensemble, scores.pixels[ok], y, "photo")
        result["open_set_pixels_only"] = _open_set_figures(ensemble, pixels[ok], actual[ok])
    result["metadata"] = {"served": _metadata_figures(served[ok]), "pixels_only": _metadata_figures(pixels[ok])}
    if elsewhere.any():  # background cameras' photos: cameras the answers must not name
        rows = scores.ok & elsewhere
        result["background"] = {"photos": int(rows.sum()),
                                "answered_unknown": float(served["unknown"].fillna(False).to_numpy(bool)[rows].mean()),
                                "answered_unknown_pixels_only": float(
                                    pixels["unknown"].fillna(False).to_numpy(bool)[rows].mean())}
    table = served.copy()
    table.insert(0, "fname", [Path(p).name for p in photos["path"]])
    table.insert(1, "path", list(photos["path"]))
    table.insert(2, "actual", actual)
    return result, table


def _metadata_figures(table: pd.DataFrame) -> dict:
    """On genuine photos (an answer table): how the EXIF check and the camera groups read. `inconsistent` is a
    false alarm on every one of them."""
    judged = table["consistent"].notna().to_numpy()
    groups = table["camera_group"].str.count(" or ").to_numpy() + 1
    return {"photos_with_exif": int(judged.sum()),
            "inconsistent": float((table["consistent"][judged] == False).mean()) if judged.any() else float("nan"),  # noqa: E712
            "grouped": float(np.mean(groups > 1)) if len(groups) else float("nan")}


def full_image_accuracy(ensemble: Ensemble, cache: Path, split: str = "test", patches: int = 0) -> dict:
    """The figures of `full_image_report` alone."""
    return full_image_report(ensemble, cache, split, patches)[0]


def evaluate(model_dirs: list[Path], cache: Path, bundle: Path, settings: EvaluateParams, *,
             metrics_file: Path, plots_file: Path, figure_file: Path | None = None, catalog=None,
             answers_file: Path | None = None) -> dict:
    import mlflow

    from camid import tracking
    from camid.core.metrics import confusion_matrix
    from camid.core.plots import confusion_figure
    from camid.data.cache import read_meta

    if not 0 < settings.open_set_accept <= 1:
        raise CamidError(f"evaluate.open_set_accept is {settings.open_set_accept}; it is the share of validation "
                         "photos to accept, in (0, 1] (1: never answer unknown)")
    for key in ("single_device_reach", "unseen_tables_reach"):
        if not 0 <= getattr(settings, key) <= 1:
            raise CamidError(f"evaluate.{key} is {getattr(settings, key)}; it places a one-reference-device camera's "
                             "threshold between its own held-out photos (0) and the other cameras' (1): give a "
                             "number in [0, 1]")
    if settings.unseen_tables_reach > settings.single_device_reach:
        raise CamidError(f"evaluate.unseen_tables_reach ({settings.unseen_tables_reach}) is above single_device_reach "
                         f"({settings.single_device_reach}): unseen JPEG tables may only raise a one-reference-device "
                         "camera's bar; set them equal to let the pixels alone decide for such cameras")
    Ensemble.write_bundle(model_dirs, bundle)
    with tracking.run("evaluate", tags={"stage": "evaluate", "data_version": tracking.data_version(cache)}):
        first = Ensemble.load(bundle)
        tables = fit_tables(cache, first.labels)
        val = validation_scores(first, cache, settings)  # one pass over val for the views, tables and temperatures
        # The twins the tables' choice counts as one: the bundle has no catalog entries yet (set_settings writes
        # them), so the firmware test and the background cameras take them from the catalog here.
        from camid.inference.bundle import catalog_entries

        first = dataclasses.replace(first, cameras=catalog_entries(catalog)) if catalog is not None else first
        firmware = training_firmware_twins(dataclasses.replace(first, tables=tables), cache,
                                           devices_split(first, cache))
        views, use_tables, selection = choose_settings(first, val, settings, tables, firmware)
        Ensemble.set_settings(bundle, views, settings.blend, selection, tables=tables, use_tables=use_tables,
                              catalog=catalog)
        Ensemble.set_confidence(bundle, *fit_confidence(Ensemble.load(bundle), cache, settings, val))
        ensemble = Ensemble.load(bundle)
        metrics, table, _ = score(ensemble, cache, settings)
        metrics.update(selection)
        metrics["full_image"], photo_answers = full_image_report(ensemble, cache)
        metrics["metadata"] = ensemble.metadata
        # Which open-set rule the answers rest on: validation photos of unseen devices, or (cameras with one
        # reference device) each camera's own threshold, and whether unseen JPEG tables count as unknown.
        rule = ensemble.open_set
        metrics["open_set_rule"] = {key: rule[key] for key in ("reference", "reference_devices", "single_device",
                                                               "single_device_reach", "unseen_tables_reach",
                                                               "knn_threshold_camera_unseen_tables", "unseen_tables",
                                                               "val_tables_seen", "background")
                                    if key in rule and rule[key] == rule[key]}  # NaN (no JPEG in val): left out
        metrics["split_summary"] = read_meta(cache).get("split", {})
        metrics["device_disjoint"] = bool(metrics["split_summary"].get("device_disjoint", False))
        tracking.log_params({"members": ",".join(ensemble.names), "tta": settings.tta, "blend": settings.blend,
                             "balance": settings.balance, "views": ",".join(metrics["views"]),
                             "jpeg_tables": use_tables})
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float) and v == v})
        mlflow.log_metrics({f"camera_{k}": v for k, v in metrics["per_camera"].items()})
        mlflow.log_metrics({f"view_{k}": v for k, v in metrics["weighted_accuracy_per_view"].items() if v == v})
        mlflow.log_metrics({f"full_image_{k}": v for k, v in metrics["full_image"].items() if isinstance(v, float)})
        mlflow.log_metrics({f"open_set_{k}": v for k, v in metrics["full_image"].get("open_set", {}).items()
                            if isinstance(v, float) and v == v})
        labels = ensemble.labels
        matrix = confusion_matrix(table.actual.map(labels.index).to_numpy(), table.predicted.map(labels.index).to_numpy(),
                                  len(labels))
        tracking.log_figure(confusion_figure(matrix, labels, f"ensemble ({'+'.join(ensemble.names)}): test devices"),
                            "confusion_matrix.png", figure_file)
        mlflow.log_dict(metrics, "evaluation.json")
    write_json(metrics_file, metrics)
    with atomic_path(plots_file) as tmp:
        table[["actual", "predicted"]].to_csv(tmp, index=False)
    if answers_file is not None:  # every test photo's served answer, for comparing with predict and serving
        with atomic_path(answers_file) as tmp:
            photo_answers.to_csv(tmp, index=False)
    log.info("ensemble %s on the test devices: weighted accuracy %.4f with TTA views %s, %.4f without, %.4f with all "
             "8 D4 views (unaltered %.4f, manipulated %.4f; chance %.3f)", "+".join(ensemble.names),
             metrics["weighted_accuracy"], "+".join(metrics["views"]), metrics["weighted_accuracy_no_tta"],
             metrics["weighted_accuracy_all_d4"], metrics["accuracy_unaltered"], metrics["accuracy_manipulated"],
             metrics["chance"])
    log.info("whole test photos (unaltered, %s patches each): accuracy %.4f", metrics["full_image"]["patches"],
             metrics["full_image"]["accuracy"])
    return metrics


def evaluate_folder(folder: Path, model: str, settings: EvaluateParams, catalog, *, metrics_file: Path,
                    plots_file: Path, figure_file: Path | None = None, workers: int | None = None) -> dict:
    """Score a trained model (bundle folder or MLflow URI) on a labelled `<label>/<files>` folder.

    Each photo's centre crop goes through the same crop cache code and manipulations as the split's
    test photos, so the figures mean the same thing; the model's own TTA views are used (--no-tta: none).
    Whether these photos' devices were seen in training is for the caller to know: name the folder's
    relation to the training data when reporting the figure.
    """
    import tempfile

    import mlflow

    from camid import tracking
    from camid.core.metrics import confusion_matrix
    from camid.core.plots import confusion_figure
    from camid.core.imageio import list_labelled
    from camid.data.cache import prepare

    ensemble = load_ensemble(model)
    if ensemble.labels != catalog.labels:
        raise CamidError(f"model {model} knows cameras {ensemble.labels}, the catalog lists {catalog.labels}")
    files = list_labelled(folder, catalog.labels)
    if files.empty:
        raise CamidError(f"no images under {folder}/<label>/ for the {catalog.name!r} catalog's cameras "
                         f"({', '.join(catalog.labels)})")
    with tempfile.TemporaryDirectory(prefix="camid-evaluate-") as tmp:
        split_dir = Path(tmp) / "split"
        split_dir.mkdir()
        for name in ("train", "val"):
            files.iloc[:0].to_csv(split_dir / f"{name}.csv", index=False)
        files.to_csv(split_dir / "test.csv", index=False)
        prepare(split_dir, Path(tmp) / "cache", catalog, patch=ensemble.patch, workers=workers)
        with tracking.run("evaluate-folder", tags={"stage": "evaluate", "folder": str(folder), "model": model}):
            settings = EvaluateParams(**{**settings.__dict__, "blend": ensemble.blend})
            metrics, table, _ = score(ensemble, Path(tmp) / "cache", settings)
            metrics["split"] = f"folder {folder}"
            mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
            labels = ensemble.labels
            matrix = confusion_matrix(table.actual.map(labels.index).to_numpy(),
                                      table.predicted.map(labels.index).to_numpy(), len(labels))
            tracking.log_figure(confusion_figure(matrix, labels, f"{model} on {folder}"), "confusion_matrix.png",
                                figure_file)
    write_json(metrics_file, metrics)
    with atomic_path(plots_file) as tmp_csv:
        table[["actual", "predicted"]].to_csv(tmp_csv, index=False)
    print(f"{folder}: weighted accuracy {metrics['weighted_accuracy']:.4f} on {metrics['images']} photos "
          f"(unaltered {metrics['accuracy_unaltered']:.4f}, manipulated {metrics['accuracy_manipulated']:.4f})")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", type=Path,
                        help="trained model folders (default: models/train/<arch> for every arch in params)")
    parser.add_argument("--cache", type=Path, default=Path("data/cache"), help="the prepare stage's crop cache")
    parser.add_argument("--folder", type=optional(Path), default=None,
                        help="score --model on this labelled <label>/<files> folder instead of the split")
    parser.add_argument("--model", default="models:/camid@champion",
                        help="with --folder: MLflow model URI or ensemble bundle folder")
    parser.add_argument("--bundle", type=optional(Path), default=Path("models/ensemble"), help="where to write the ensemble")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/evaluate.json"))
    parser.add_argument("--plots", type=Path, default=Path("plots/confusion.csv"))
    parser.add_argument("--figure", type=Path, default=Path("plots/confusion.png"))
    parser.add_argument("--answers", type=optional(Path), default=Path("plots/test_photos.csv"),
                        help="every test photo's whole-photo answer, as predict and serving give it (CSV)")
    parser.add_argument("--no-tta", dest="tta", action="store_false", default=None, help="score the identity view only")
    parser.add_argument("--blend", type=optional(str), default=None, help=f"{' | '.join(BLENDS)} (default: evaluate.blend)")
    parser.add_argument("--balance", type=optional(str), default=None,
                        help=f"{' | '.join(BALANCE_CHOICES)}: balance predictions to equal class counts per "
                             "unaltered/manipulated group (closed sets only)")


def run(args: argparse.Namespace) -> int:
    params = load_params()
    settings = params.evaluate
    overrides = {k: getattr(args, k) for k in ("tta", "blend", "balance") if getattr(args, k) is not None}
    settings = EvaluateParams(**{**settings.__dict__, **overrides})
    check_stage_choices(settings.blend, settings.balance)
    if args.folder:
        evaluate_folder(args.folder, args.model, settings, params.catalog, metrics_file=args.metrics,
                        plots_file=args.plots, figure_file=args.figure)
        return 0
    models = args.models or [Path("models/train") / arch for arch in params.train.archs]
    missing = [str(m) for m in models if not (Path(m) / "model.keras").is_file()]
    if missing:
        raise CamidError(f"no trained model in {', '.join(missing)}: train first (dvc repro, or camid train --arch NAME)")
    evaluate(models, args.cache, args.bundle, settings, metrics_file=args.metrics, plots_file=args.plots,
             figure_file=args.figure, catalog=params.catalog, answers_file=args.answers)
    return 0
