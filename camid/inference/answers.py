"""The one photo-scoring path: photos in (bytes or paths), the answer table out.

The evaluate stage's whole-photo figures, `camid predict`, the served model and `camid explain` all call this
module, so what evaluation measures is what users are served. It runs in two steps:

`score_photos` streams photos through the network about `batch_patches` patches at a time (decode, the grid of
CFA-aligned patches, `Ensemble.predict_photos`), so memory depends on the batch, never on how many photos there
are. What it keeps per photo is small: the pixels' uncalibrated probabilities, the manipulated flag (the caller's,
or estimated by the auxiliary head, the same way everywhere), the open-set features, the JPEG table signature and
the EXIF Model. A photo that cannot be read, decoded or cut is a row with an `error`, never a failed batch.

`answers` turns those scores into verdicts for a set of options (`camid.inference.options`): the JPEG-table
evidence where the caller did not say the photo is manipulated, the calibration temperature of the row's setting,
balancing (on the calibrated probabilities), the open-set rule and the EXIF check. It is cheap, so one forward
pass answers with and without the tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from camid.core.imageio import DEFAULT_MAX_PIXELS, ImageError, decode_image
from camid.core.patches import grid_crops
from camid.errors import CamidError
from camid.forensics.inspect import header_facts
from camid.inference.balancing import balance_to_quota
from camid.inference.ensemble import PIXEL_GROUNDS, TABLES_GROUND
from camid.inference.jpeg_tables import NONE, entered
from camid.inference.openset import UNKNOWN, confidence
from camid.inference.options import DEFAULTS, blend_for

# The answer columns before one probability column per camera label (the served signature declares the same).
ANSWER_COLUMNS = ["camera", "closest_camera", "camera_group", "confidence", "unknown", "unknown_by", "reference_devices",
                  "size_seen", "manipulated", "manipulated_estimated", "patches", "tables_evidence", "exif_model",
                  "exif_camera", "consistent", "error"]
BATCH_PATCHES = 256  # patches scored per network call (a photo is never split across calls)


def flag_from_name(path) -> bool | None:
    """The `manipulated` flag a file name states, as the Kaggle test set named its files: `_manip` True,
    `_unalt` False, else None (the model estimates it)."""
    stem = Path(str(path)).stem.lower()
    return True if "_manip" in stem else False if "_unalt" in stem else None


def _given(flag) -> bool | None:
    return None if flag is None or (isinstance(flag, float) and np.isnan(flag)) else bool(flag)


@dataclass
class PhotoScores:
    """One forward pass over photos: row i is photo i, scored or not (`errors[i]` says why not, "" if scored)."""
    errors: list[str]
    pixels: np.ndarray              # (N, C) blended camera probabilities from the pixels alone, uncalibrated; NaN rows
    given: list                     # (N,) the caller's manipulated flag: True, False or None (estimated)
    manipulated: np.ndarray         # (N,) bool: the flag used (given, or estimated as the majority of its patches)
    estimated: np.ndarray           # (N,) bool: True where the flag was estimated
    manipulation_probs: np.ndarray  # (N, 9) none + the eight manipulations
    patches: np.ndarray             # (N,) int: patches scored (0 for a failed row)
    signatures: list                # (N,) JPEG table signature (None: no JPEG, or a failed row)
    exif_models: list               # (N,) EXIF Model (None where absent)
    features: np.ndarray | None     # (N, D) unit-length open-set features (NaN rows); None: members without them
    views: tuple[int, ...]          # the D4 views scored
    patch_features: np.ndarray | None = None  # (<= patch_sample, D) a seeded sample of the patches' features
    sizes: list | None = None       # (N,) each photo's decoded (height, width) (None: a failed row, or not known)

    @property
    def ok(self) -> np.ndarray:
        return np.array([not e for e in self.errors], dtype=bool)


def _read(source) -> bytes:
    """A photo's bytes: bytes as given, else the file at the path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = Path(source)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path} not found") from None
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from None


def cut(data: bytes, patch: int, count: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple]:
    """A photo's `count` grid patches (`camid.core.patches.grid_crops`; 0: auto) and its decoded (height, width);
    ImageError when the bytes are no image, or the image is smaller than the patch."""
    pixels = decode_image(data, max_pixels)
    if min(pixels.shape[:2]) < patch:
        raise ImageError(f"image is {pixels.shape[1]}x{pixels.shape[0]}, smaller than the model's {patch}x{patch} patch")
    return grid_crops(pixels, patch, count), (int(pixels.shape[0]), int(pixels.shape[1]))


@dataclass(frozen=True)
class Cut:
    """A photo already decoded and cut into its patches (K, P, P, 3), with what its header said and its decoded
    (height, width): a source `score_photos` takes beside bytes and paths (`camid explain` cuts its own grid)."""
    crops: np.ndarray
    signature: str | None = None
    exif_model: str | None = None
    size: tuple[int, int] | None = None


class _PatchSample:
    """A seeded uniform sample of at most `size` patch feature rows, kept while photos stream by: each patch gets
    a priority drawn from (seed, photo index), and the `size` lowest are kept, so the sample depends on the photos
    and the seed, not on how they were batched."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.priority, self.rows = np.zeros(0), None

    def add(self, photo: int, rows: np.ndarray) -> None:
        if self.size <= 0 or rows is None:
            return
        priority = np.random.default_rng([self.seed, photo]).random(len(rows))
        self.priority = np.concatenate([self.priority, priority])
        self.rows = rows if self.rows is None else np.concatenate([self.rows, rows])
        if len(self.priority) > 2 * self.size:
            self._prune()

    def _prune(self) -> None:
        keep = np.sort(np.argsort(self.priority, kind="stable")[:self.size])
        self.priority, self.rows = self.priority[keep], self.rows[keep]

    def result(self) -> np.ndarray | None:
        if self.rows is None:
            return None
        self._prune()
        return self.rows


def score_photos(ensemble, photos: Iterable, *, flags=None, errors=None, patches: int = 0, tta: bool = True,
                 blend: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, batch_patches: int = BATCH_PATCHES,
                 patch_sample: int = 0, seed: int = 0, progress: Callable | None = None) -> PhotoScores:
    """Score photos (each bytes, a path, or a `Cut`) on `patches` grid patches each (0: auto), `batch_patches` at a time.

    `flags[i]`: photo i's manipulated flag (True/False; None or missing: estimated). `errors[i]`: a reason the
    caller already has for not scoring row i ("" or None: score it). `patch_sample`: also keep a seeded sample
    of that many patch feature rows (the open-set bank). `progress`: wraps the photo iterable (e.g. tqdm)."""
    photos = list(photos)
    n = len(photos)
    flags = [None] * n if flags is None else [_given(f) for f in flags]
    errors = [e or "" for e in (errors or [""] * n)]
    if len(flags) != n or len(errors) != n:
        raise CamidError(f"{n} photos but {len(flags)} flags and {len(errors)} errors")
    n_classes = len(ensemble.labels)
    pixels, manip_probs = np.full((n, n_classes), np.nan), np.full((n, 9), np.nan)
    used, estimated = np.zeros(n, bool), np.zeros(n, bool)
    counts = np.zeros(n, dtype=np.int64)
    signatures, models, sizes = [None] * n, [None] * n, [None] * n
    features: list = [None] * n
    sample = _PatchSample(patch_sample, seed)
    views: tuple[int, ...] = ensemble.resolve_views(tta)
    has_features = True
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        nonlocal views, has_features
        rows = [r for r, _ in pending]
        pred = ensemble.predict_photos([c for _, c in pending], [flags[r] for r in rows], tta=tta, blend=blend,
                                       jpeg_tables=False, calibrated=False)
        views = pred.views
        pixels[rows], manip_probs[rows] = pred.probs, pred.manipulation_probs
        used[rows], estimated[rows] = pred.manipulated, pred.manipulated_estimated
        if pred.features is None:
            has_features = False
        else:
            bounds = np.cumsum([0] + [len(c) for _, c in pending])
            for i, r in enumerate(rows):
                features[r] = pred.features[i]
                if pred.patch_features is not None:
                    sample.add(r, pred.patch_features[bounds[i]:bounds[i + 1]])
        pending.clear()

    queued = 0
    for row, source in enumerate(progress(photos) if progress else photos):
        if errors[row]:
            continue
        if isinstance(source, Cut):
            crops, signatures[row], models[row], sizes[row] = source.crops, source.signature, source.exif_model, \
                source.size
        else:
            try:
                data = _read(source)
                crops, sizes[row] = cut(data, ensemble.patch, patches, max_pixels)
            except ImageError as exc:
                errors[row] = str(exc)
                continue
            facts = header_facts(data)
            signatures[row], models[row] = facts["jpeg_tables"], facts["model"]
        counts[row] = len(crops)
        pending.append((row, crops))
        queued += len(crops)
        if queued >= batch_patches:
            flush()
            queued = 0
    if pending:
        flush()
    feats = None
    if has_features and any(f is not None for f in features):
        dim = next(len(f) for f in features if f is not None)
        feats = np.stack([np.full(dim, np.nan, np.float32) if f is None else f for f in features])
    return PhotoScores(errors, pixels, flags, used, estimated, manip_probs, counts, signatures, models, feats, views,
                       sample.result(), sizes)


def evidence_and_probs(ensemble, scores: PhotoScores, jpeg_tables: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(N,) what the JPEG tables say of each row (`jpeg_tables.USED` / FAMILY / UNSEEN / NONE) and the (N, C)
    probabilities with that evidence multiplied in, before calibration. Only a caller's "manipulated" rules the
    evidence out: a JPEG whose tables a camera's firmware wrote is that camera's own file, whatever the auxiliary
    head guesses (a re-saved file carries its editor's tables, which training photos do not have)."""
    n = len(scores.errors)
    if not jpeg_tables:
        return np.full(n, NONE, dtype=object), scores.pixels
    usable = scores.ok & ~np.array([g is True for g in scores.given], dtype=bool)
    return ensemble.tables_evidence(scores.signatures, usable), ensemble.apply_tables(scores.pixels, scores.signatures,
                                                                                      usable)


def kinds(counts) -> list[str]:
    """Each row's calibration setting: a photo of one patch is answered as a patch, of many as a photo."""
    return ["patch" if k == 1 else "photo" for k in counts]


def answers(ensemble, scores: PhotoScores, options: dict | None = None) -> pd.DataFrame:
    """The answer table (ANSWER_COLUMNS, then one probability column per camera label) for `scores` under the
    resolved `options` (`camid.inference.options.resolve`; missing: defaults). Failed rows keep their error,
    camera "" and NaN probabilities."""
    settings = {**DEFAULTS, **(options or {})}
    labels = list(ensemble.labels)
    n, ok = len(scores.errors), scores.ok
    evidence, probs = evidence_and_probs(ensemble, scores, settings["jpeg_tables"])
    good = np.flatnonzero(ok)
    out = pd.DataFrame({"camera": [""] * n, "closest_camera": [""] * n, "camera_group": [""] * n,
                        "confidence": np.full(n, np.nan),
                        "unknown": pd.array([None] * n, dtype="boolean"), "unknown_by": [""] * n,
                        "reference_devices": pd.array([None] * n, dtype="Int64"),
                        "size_seen": pd.array([None] * n, dtype="boolean"),
                        "manipulated": pd.array([None] * n, dtype="boolean"),
                        "manipulated_estimated": pd.array([None] * n, dtype="boolean"),
                        "patches": scores.patches.astype(np.int64), "tables_evidence": [""] * n,
                        "exif_model": [m or "" for m in scores.exif_models], "exif_camera": [""] * n,
                        "consistent": pd.array([None] * n, dtype="boolean"), "error": list(scores.errors),
                        **{label: np.full(n, np.nan) for label in labels}}, columns=ANSWER_COLUMNS + labels)
    if not len(good):
        return out
    counts = scores.patches[good]
    calibrated = ensemble.calibrate(probs[good], kinds(counts), entered(evidence[good]))
    # The answer names catalog cameras only: background cameras' columns stay in the probabilities, but the
    # closest camera, its group and the EXIF check read them renormalised over the catalog (Ensemble.catalog_probs);
    # a photo whose pixels find it more like the background cameras than like its closest camera is unknown on
    # the pixel ground.
    answerable = ensemble.catalog_probs(calibrated)
    flags = scores.manipulated[good]
    columns = np.flatnonzero(~ensemble.background)  # balancing deals the photos among the catalog cameras
    picked = answerable.argmax(1) if settings["balance"] == "none" else \
        columns[balance_to_quota(answerable[:, columns], groups=flags, method=settings["balance"])]
    closest = np.asarray(labels)[picked]
    elsewhere = ensemble.in_background(scores.pixels[good], picked)
    with_tables = ensemble.in_background(calibrated, picked) & entered(evidence[good])  # the tables' evidence too
    grounds = ensemble.unknown_grounds(answerable, counts, evidence[good],
                                       None if scores.features is None else scores.features[good], elsewhere,
                                       with_tables) \
        if settings["open_set"] else np.full(len(good), "", dtype=object)
    unknown = grounds != ""
    groups = ensemble.camera_groups(answerable, picked)
    sizes = [(scores.sizes or [None] * n)[r] for r in good]
    # The pixels point to no catalog camera where they put the photo with the background cameras, or where the
    # open-set rule's pixel ground rejects it, and where, with the JPEG tables' evidence, the background cameras
    # lead (tables some other model's firmware wrote): EXIF naming no catalog camera agrees with them there. Where
    # the tables alone made the photo unknown otherwise (no catalog firmware's family wrote them, while the pixels
    # accept a catalog camera), the grounds disagree and EXIF naming no catalog camera is undecided
    # (camid.inference.metadata.metadata_check), not a contradiction.
    outside = elsewhere | np.isin(grounds, PIXEL_GROUNDS) | (with_tables & (grounds != ""))
    named, consistent = ensemble.metadata_check([scores.exif_models[r] for r in good], answerable, groups, outside,
                                                sizes, (grounds == TABLES_GROUND) & ~outside)
    out.loc[good, "camera"] = np.where(unknown, UNKNOWN, closest)
    out.loc[good, "closest_camera"] = closest
    out.loc[good, "camera_group"] = [ensemble.group_name(g) for g in groups]
    out.loc[good, "confidence"] = calibrated[np.arange(len(good)), picked] if ensemble.background.any() \
        else confidence(calibrated)
    out.loc[good, "unknown"] = pd.array(unknown, dtype="boolean")
    out.loc[good, "unknown_by"] = list(grounds)
    reference = ensemble.open_set.get("reference_devices") or {}  # the closest camera's training devices (0: unknown)
    out.loc[good, "reference_devices"] = pd.array([reference.get(c) for c in closest], dtype="Int64")
    # Is the photo's size one of the closest camera's reference sizes?
    out.loc[good, "size_seen"] = pd.array(ensemble.size_seen(closest, sizes), dtype="boolean")
    out.loc[good, "manipulated"] = pd.array(flags, dtype="boolean")
    out.loc[good, "manipulated_estimated"] = pd.array(scores.estimated[good], dtype="boolean")
    out.loc[good, "tables_evidence"] = list(evidence[good])
    out.loc[good, "exif_camera"] = named
    out.loc[good, "consistent"] = pd.array(consistent, dtype="boolean")
    out.loc[good, labels] = calibrated
    if len(good) == n:  # all good: the plain types an all-good answer always had
        out = out.astype({"manipulated": bool, "manipulated_estimated": bool, "unknown": bool})
    return out


def answer_photos(ensemble, photos: Iterable, options: dict | None = None, *, flags=None, errors=None,
                  max_pixels: int = DEFAULT_MAX_PIXELS, batch_patches: int = BATCH_PATCHES,
                  progress: Callable | None = None) -> pd.DataFrame:
    """Photos (bytes or paths) in, the answer table out: `score_photos`, then `answers`, under the resolved
    `options` (patches, tta, blend, jpeg_tables, balance, open_set)."""
    settings = {**DEFAULTS, **(options or {})}
    scores = score_photos(ensemble, photos, flags=flags, errors=errors, patches=settings["patches"],
                          tta=settings["tta"], blend=blend_for(settings["blend"]), max_pixels=max_pixels,
                          batch_patches=batch_patches, progress=progress)
    return answers(ensemble, scores, settings)
