"""An ensemble of trained backbones and the rules on its probabilities, in pieces a newcomer finds by name:

    camid.inference.bundle     the bundle folder on disk: written, settings recorded, read (`Ensemble.load`)
    camid.inference.network    the members' forward pass: both heads and the open-set features, in batches
    camid.inference.metadata   the EXIF camera against the pixels' camera
    camid.inference.ensemble   this: `Ensemble.predict` (patches) and `predict_photos` (photos as their patches):
                               TTA views, blending, the estimated flag, the JPEG tables, calibration and the
                               open-set rule of the bundle's settings
    camid.inference.answers    the one photo-scoring path every consumer calls, built on `predict_photos`

`tta=True` means the bundle's views, so the served model averages exactly the views that were evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from camid.errors import CamidError
from camid.inference import bundle as bundle_io
from camid.inference.balancing import balance_to_quota
from camid.inference.blending import blend as blend_probs
from camid.inference.jpeg_tables import NONE, UNSEEN, TablePrior, entered
from camid.inference.metadata import SEPARATOR, camera_groups, entry_camera, metadata_check
from camid.inference.network import score_members
from camid.inference.openset import photo_features
from camid.inference.options import BALANCE_CHOICES



def _missing(flag) -> bool:
    """A `manipulated` flag left for the model to estimate: None or NaN."""
    return flag is None or (isinstance(flag, float) and np.isnan(flag))


@dataclass
class Prediction:
    probs: np.ndarray                # (N, C) blended camera probabilities, rows sum to 1
    labels: np.ndarray               # (N,) predicted class index (after balancing, if asked)
    manipulated: np.ndarray          # (N,) bool: given by the caller, or estimated
    manipulated_estimated: np.ndarray  # (N,) bool: True where the flag came from the auxiliary head
    manipulation_probs: np.ndarray   # (N, 9) none + the eight manipulations, averaged over members and views
    member_views: np.ndarray | None  # (models, views, N, C) camera probabilities before blending
    views: tuple[int, ...]           # the D4 views scored (indices into D4)
    tables_evidence: np.ndarray | None = None  # (N,) USED / FAMILY / UNSEEN / NONE (jpeg_tables); None: all NONE
    features: np.ndarray | None = None  # (N, D) unit-length pooled backbone features, first view (openset.features_of)
    patch_features: np.ndarray | None = None  # predict_photos: (patches, D) the patches' own features


# Validation fits a temperature and an open-set threshold per kind of answer: a single patch or a whole photo
# ("patch", "photo"), each with the bundle's own evidence; where the bundle uses the JPEG tables, also for answers
# the tables did not enter (`jpeg_tables: false`, a caller's manipulated flag, a signature no training photo had,
# no JPEG at all), under "<kind>" + PIXELS_ONLY. The two are on different scales: the tables make the answers of
# camera originals far more confident, so one threshold for both rejects almost every pixels-only answer.
KINDS = ("patch", "photo")
PIXELS_ONLY = "_pixels_only"
# Why an answer is `unknown` (the answer's `unknown_by`, `Ensemble.unknown_grounds`): the pixel ground, the JPEG
# tables' (no catalog firmware's family writes them), or both.
UNKNOWN_GROUNDS = ("pixels", "tables", "pixels and tables")
PIXEL_GROUNDS = (UNKNOWN_GROUNDS[0], UNKNOWN_GROUNDS[2])  # the grounds where the pixels reject the photo
TABLES_GROUND = UNKNOWN_GROUNDS[1]  # the JPEG tables alone reject it (the pixels accept a catalog camera)


@dataclass
class Ensemble:
    models: list
    names: list[str]
    labels: list[str]
    patch: int
    members: list[dict] = field(default_factory=list)
    views: tuple[int, ...] = (0,)    # the D4 views `tta=True` averages (chosen on validation by evaluate)
    blend: str = "mean_square"       # how models, views and patches are combined
    tables: TablePrior | None = None  # JPEG-table evidence (camid.inference.jpeg_tables), used if use_tables
    use_tables: bool = False
    cameras: list[dict] = field(default_factory=list)  # catalog entries (label, make, models) for the EXIF check
    temperature: dict = field(default_factory=dict)  # {"patch": T, "photo": T, ...} fitted on val (KINDS, PIXELS_ONLY)
    open_set: dict = field(default_factory=dict)  # {"score", "accept", "threshold": {"patch": t, ...}} (openset.py)
    bank: dict | None = None  # {"patch": (n, D), "photo": (m, D)} training features for the kNN open-set score
    metadata: dict = field(default_factory=dict)  # {"inconsistent_below", "twins", ...} (camid.inference.metadata)
    _heads: dict = field(default_factory=dict, repr=False, compare=False)  # model -> model with a features output

    # -- the bundle on disk (camid.inference.bundle) -------------------------------------------------------
    write_bundle = staticmethod(bundle_io.write_bundle)
    set_settings = staticmethod(bundle_io.set_settings)
    set_confidence = staticmethod(bundle_io.set_confidence)

    @classmethod
    def load(cls, bundle: Path) -> "Ensemble":
        return cls(**bundle_io.read(bundle))

    @property
    def background(self) -> np.ndarray:
        """(C,) True for the background cameras (a catalog entry's `background: true`, camid.config.Camera):
        photos of other cameras, trained as a class but never an answer."""
        marked = {c["label"] for c in self.cameras if c.get("background")}
        return np.array([label in marked for label in self.labels], dtype=bool)

    def catalog_probs(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) `probs` as the answers read them: the background cameras' columns zeroed and each row
        renormalised over the catalog cameras, so that the closest camera, the camera group and the EXIF check
        name catalog cameras only; `probs` itself for a catalog without background cameras."""
        background = self.background
        if not background.any():
            return probs
        out = np.where(background, 0.0, np.asarray(probs, dtype=np.float64))
        total = out.sum(axis=1, keepdims=True)
        uniform = np.where(background, 0.0, 1.0 / int((~background).sum()))  # a row without catalog mass
        return np.where(total > 0, out / np.where(total > 0, total, 1.0), uniform)

    def in_background(self, pixels: np.ndarray, named=None) -> np.ndarray:
        """(N,) True where the pixels (N, C) put a photo with the background cameras rather than with the catalog
        camera it would be named (`named` (N,) camera indices; None: the pixels' own closest): a background camera
        is more likely than that camera. Named by the pixels, that is their top class being a background camera;
        named with the JPEG tables' evidence, a photo whose tables point to one catalog camera while its pixels
        find it more like the other models than like that camera is theirs too. Calibration keeps each row's order,
        so the probabilities may be calibrated or not; NaN rows (failed photos) are False."""
        background = self.background
        pixels = np.asarray(pixels, dtype=np.float64)
        out = np.zeros(len(pixels), dtype=bool)
        if background.any() and len(pixels):
            scored = np.isfinite(pixels).all(axis=1)
            rows = pixels[scored]
            named = self.catalog_probs(rows).argmax(axis=1) if named is None else np.asarray(named)[scored]
            out[scored] = rows[:, background].max(axis=1) > rows[np.arange(len(rows)), named]
        return out

    def _sized_cameras(self) -> dict:
        """The catalog cameras whose sizes the bundle recorded, as camid.config.Camera (label -> camera)."""
        return {c["label"]: entry_camera(c) for c in self.cameras if c.get("sizes")}

    def size_seen(self, cameras, sizes) -> list[bool | None]:
        """For each (camera label, photo (height, width)): is that pixel size one of the camera's native sizes in
        the catalog, in either orientation (`Camera.is_native_size`, the filter stage's own check: the only sizes its
        training kept)? None where the size or the catalog's sizes are not known (a bundle written before they were
        recorded). A camera scales and compresses each size mode its own way, so a photo of a size the reference
        lacks may be a mode the model never saw; a cropped or resized photo has lost its native size."""
        known = self._sized_cameras()
        return [None if size is None or camera not in known else known[camera].is_native_size(*size)
                for camera, size in zip(cameras, sizes)]

    def camera_sizes(self, camera: str) -> list[tuple[int, int]]:
        """The camera's catalog sizes (height, width) as the bundle recorded them ([] where it did not)."""
        found = self._sized_cameras().get(camera)
        return list(found.sizes) if found else []

    def camera_groups(self, probs: np.ndarray, picked: np.ndarray) -> list[list[str]]:
        """`camid.inference.metadata.camera_groups` with the bundle's twins."""
        return camera_groups(probs, picked, list(self.labels), self.metadata)

    @staticmethod
    def group_name(group: list[str]) -> str:
        return SEPARATOR.join(group)

    def metadata_check(self, models, probs: np.ndarray, groups: list[list[str]], background=None,
                       sizes=None, split=None) -> tuple[list[str], list[bool | None]]:
        """`camid.inference.metadata.metadata_check` against the bundle's catalog (with its recorded sizes) and
        metadata rule (`background`: the rows whose pixels point to no catalog camera; `sizes`: each photo's
        (height, width) or None; `split`: the rows the JPEG tables alone made `unknown`)."""
        return metadata_check(self.cameras, models, probs, groups, list(self.labels), self.metadata, background,
                              sizes, split)

    # -- calibration and the open-set rule -----------------------------------------------------------------

    def setting_keys(self, kinds: list[str], tables_used=False) -> list[str]:
        """For each row, the key its temperature and threshold were fitted under: its kind ("patch" or "photo")
        and, where the bundle uses the JPEG tables but they did not enter the row (`tables_used` False, per row
        or for all), that kind + PIXELS_ONLY."""
        used = np.broadcast_to(np.asarray(tables_used, dtype=bool), (len(kinds),))
        return [kind if u or not self.use_tables else kind + PIXELS_ONLY for kind, u in zip(kinds, used)]

    @staticmethod
    def fitted(table: dict, keys: list[str]) -> list:
        """Each key's value in `table`; a pixels-only key missing (bundles made before there were any) falls
        back to its kind's value, a kind missing to None."""
        return [table.get(key, table.get(key.removesuffix(PIXELS_ONLY))) for key in keys]

    def calibrate(self, probs: np.ndarray, kind, tables_used=False) -> np.ndarray:
        """(N, C) `probs` under the temperatures validation fitted for their setting (`kind`: "patch" or
        "photo", for all rows or a list per row; `tables_used`: whether the JPEG-table evidence entered each row,
        see `setting_keys`); rows without a fitted temperature unchanged."""
        from camid.inference.calibration import apply_temperature

        probs = np.asarray(probs, dtype=np.float64)
        kinds = [kind] * len(probs) if isinstance(kind, str) else list(kind)
        temperatures = self.fitted(self.temperature, self.setting_keys(kinds, tables_used))
        out = probs.copy()
        for t in set(temperatures) - {None}:
            rows = np.array([u == t for u in temperatures])
            out[rows] = apply_temperature(probs[rows], t)
        return out

    @staticmethod
    def _evidence_rows(tables_evidence, n: int) -> np.ndarray:
        """(n,) object array of `tables_evidence` (Prediction.tables_evidence); None: NONE for every row."""
        return np.full(n, NONE, dtype=object) if tables_evidence is None else np.asarray(tables_evidence, dtype=object)

    def open_set_margin(self, probs: np.ndarray, patch_counts, tables_evidence=None, features=None) -> np.ndarray:
        """(N,) the pixel ground's open-set score minus its threshold (below 0: unlike every catalog camera).
        The score is the kNN typicality of the photo's features against the training photos' (`openset.
        knn_score`) where the bundle holds a feature bank and `features` are given (for a whole photo whose closest
        camera had one reference device, against that camera's training photos, `openset.camera_knn_score`, and
        the camera's own threshold, `open_set.knn_threshold_camera`, or a twin's against its own: the highest,
        `twin_group_margins`), else the calibrated top probability of `probs` (N, C) against the threshold of its
        setting (as in `calibrate`: one patch or many, with or without the JPEG tables, `tables_evidence` per row).
        NaN for a bundle without a rule."""
        return self._margins(probs, patch_counts, tables_evidence, features)[0]

    def _margins(self, probs: np.ndarray, patch_counts, tables_evidence, features):
        """(margin, raised): `open_set_margin`, and (N,) for a whole photo judged by its closest camera's own
        threshold where that camera has a stricter one for unseen JPEG tables (`open_set.
        knn_threshold_camera_unseen_tables`), the same score minus that one (NaN for every other row)."""
        from camid.inference.openset import confidence, knn_score

        kinds = ["patch" if k == 1 else "photo" for k in patch_counts]
        raised = np.full(len(kinds), np.nan)
        knn = self.open_set.get("knn_threshold")
        if knn and self.bank is not None and features is not None:
            margin = np.empty(len(kinds))
            # A whole photo whose closest camera had one reference device is scored against that camera's training
            # photos and its own threshold (openset.camera_thresholds); every other row against the whole bank.
            per_camera = self.open_set.get("knn_threshold_camera") or {}
            stricter = self.open_set.get("knn_threshold_camera_unseen_tables") or {}
            own = np.zeros(len(kinds), dtype=bool)
            if per_camera and "photo_labels" in self.bank:
                closest = np.asarray(probs).argmax(axis=1)
                cut = np.array([per_camera.get(self.labels[c], np.nan) for c in closest], dtype=np.float64)
                own = np.array([k == "photo" for k in kinds]) & np.isfinite(cut)
                if own.any():
                    margin[own], raised[own] = self.twin_group_margins(features[own], closest[own], per_camera,
                                                                        stricter)
            for kind in set(kinds):
                rows = np.array([k == kind for k in kinds]) & ~own
                if rows.any():
                    margin[rows] = knn_score(features[rows], self.bank[kind]) - knn[kind]
            # Cameras of one reference device in a catalog with background cameras: their pixel ground is the
            # background class (`unknown_grounds`), not a distance (evaluate's `open_set.background`).
            by_background = set((self.open_set.get("background") or {}).get("single_device", []))
            if by_background:
                closest = np.asarray(probs).argmax(axis=1)
                margin[np.array([self.labels[c] in by_background for c in closest], dtype=bool)] = np.inf
            return margin, raised
        thresholds = self.open_set.get("threshold", {})
        if not thresholds:
            return np.full(len(kinds), np.nan), raised
        evidence = self._evidence_rows(tables_evidence, len(kinds))
        cut = np.array(self.fitted(thresholds, self.setting_keys(kinds, entered(evidence))), dtype=np.float64)
        return confidence(probs) - cut, raised

    def twin_group_margins(self, features: np.ndarray, closest: np.ndarray, per_camera: dict,
                            stricter: dict) -> tuple[np.ndarray, np.ndarray]:
        """For whole photos whose closest camera (`closest`, indices) has a threshold of its own (`per_camera`,
        label -> threshold; `stricter`, the same for unseen tables): each photo's kNN score against a camera's
        training photos minus that camera's threshold, the highest over the closest camera and its twins that have
        one (`metadata.twins`: the pixels cannot say which of them took a photo, so which one the network happened
        to name must not decide whether the photo is like the catalog). (margin, raised)."""
        from camid.inference.metadata import twin_map
        from camid.inference.openset import camera_knn_score

        twins = twin_map(self.metadata)
        index = {label: c for c, label in enumerate(self.labels)}
        margin, raised = np.full(len(closest), -np.inf), np.full(len(closest), -np.inf)
        candidates = [{int(c), *(index[t] for t in twins.get(self.labels[c], ()) if t in per_camera and t in index)}
                      for c in closest]
        for camera in sorted(set().union(*candidates)):
            rows = np.array([camera in group for group in candidates], dtype=bool)
            score = camera_knn_score(features[rows], np.full(int(rows.sum()), camera), self.bank["photo"],
                                     self.bank["photo_labels"])
            label = self.labels[camera]
            margin[rows] = np.fmax(margin[rows], score - per_camera[label])
            raised[rows] = np.fmax(raised[rows], score - stricter.get(label, np.nan))
        margin[np.isneginf(margin)], raised[np.isneginf(raised)] = np.nan, np.nan  # no score: as before twins
        return margin, raised

    def unknown_grounds(self, probs: np.ndarray, patch_counts, tables_evidence=None, features=None,
                        background=None, background_tables=None) -> np.ndarray:
        """(N,) why each photo is unlike every catalog camera (UNKNOWN_GROUNDS): "" where it is not; "pixels"
        where the pixel ground says so (`open_set_margin` below 0, or `background` (N,) True: the pixels put the
        photo with the background cameras, `in_background`); "tables" where the JPEG tables put it there
        (`background_tables` (N,) True: with the tables' evidence the background cameras lead), or where they are
        UNSEEN (no catalog firmware's family writes them) and that decides: on a catalog where validation found the devices'
        originals almost always carry seen tables (the bundle's `open_set.unseen_tables`), or, for a whole photo
        whose closest camera had one reference device, where the pixels are not near enough that camera's
        reference to outweigh them (its stricter threshold, `evaluate.unseen_tables_reach`: one reference device
        cannot show which quality modes the model's other devices use, so unseen tables there raise the pixels'
        bar rather than decide alone); "pixels and tables" where both do. All "" for a bundle without a rule."""
        n = len(probs)
        pixels = np.zeros(n, dtype=bool) if background is None else np.asarray(background, dtype=bool).copy()
        tables = np.zeros(n, dtype=bool) if background_tables is None \
            else np.asarray(background_tables, dtype=bool).copy()
        if n and (self.open_set.get("threshold") or self.open_set.get("knn_threshold")):
            evidence = self._evidence_rows(tables_evidence, n)
            margin, raised = self._margins(probs, patch_counts, evidence, features)
            unseen = evidence == UNSEEN
            weighed = unseen & np.isfinite(raised)  # one reference device: the tables raise the pixels' bar
            pixels |= margin < 0
            tables |= (unseen & ~weighed & bool(self.open_set.get("unseen_tables"))) | (weighed & (raised < 0))
        out = np.full(n, "", dtype=object)
        out[pixels & ~tables] = UNKNOWN_GROUNDS[0]
        out[tables & ~pixels] = UNKNOWN_GROUNDS[1]
        out[pixels & tables] = UNKNOWN_GROUNDS[2]
        return out

    def is_unknown(self, probs: np.ndarray, patch_counts, tables_evidence=None, features=None,
                   background=None, background_tables=None) -> np.ndarray:
        """(N,) True where a photo is unlike every catalog camera, by its pixels, its JPEG tables or both
        (`unknown_grounds`). All False for a bundle without a rule or background cameras."""
        return self.unknown_grounds(probs, patch_counts, tables_evidence, features, background,
                                    background_tables) != ""

    def apply_tables(self, probs: np.ndarray, signatures, usable, force: bool = False) -> np.ndarray:
        """The JPEG-table evidence multiplied into (N, C) probabilities where `usable` (see jpeg_tables), if the
        bundle uses it (or `force`); unchanged otherwise."""
        if self.tables is None or not (self.use_tables or force):
            return probs
        return self.tables.apply(probs, signatures, usable)

    def tables_evidence(self, signatures, usable) -> np.ndarray:
        """(N,) what the JPEG tables say of each row (`jpeg_tables.USED` or `FAMILY`, a training photo had the
        tables or tables of their family at another quality: `apply_tables` changes it; `UNSEEN`: a usable JPEG
        whose tables no training photo's family has; `NONE`); all NONE where the bundle does not use them."""
        if self.tables is None or not self.use_tables:
            return np.full(len(signatures), NONE, dtype=object)
        return self.tables.evidence(signatures, usable)

    def resolve_views(self, tta: bool | None = True, views=None) -> tuple[int, ...]:
        """Explicit `views` win; else the bundle's chosen views with tta, the identity alone without."""
        if views is not None:
            return tuple(int(v) for v in views)
        return self.views if tta else (0,)

    # -- inference -----------------------------------------------------------------------------------------
    def predict(self, patches: np.ndarray, manipulated: np.ndarray | None = None, *, tta: bool = True,
                views=None, blend: str | None = None, balance: str = "none", batch_size: int = 64,
                chunk: int = 256) -> Prediction:
        """Score uint8 patches (N, P, P, 3).

        TTA views and blend default to the bundle's (`resolve_views`; `blend=None`).

        `manipulated` (N,) may hold True/False or None per row; missing flags are estimated from the auxiliary
        head (P(no manipulation) < 0.5) and those rows are scored again with the estimated flag. Patches are
        scored `chunk` at a time (all views of a chunk through each model in one pass), so memory stays bounded
        however large the set; blending and balancing then see the whole set.
        """
        patches = np.asarray(patches)
        if patches.ndim != 4 or patches.shape[1:] != (self.patch, self.patch, 3):
            raise CamidError(f"expected patches of shape (N, {self.patch}, {self.patch}, 3), got {patches.shape}")
        if balance not in BALANCE_CHOICES:
            raise CamidError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCE_CHOICES)}")
        n = len(patches)
        given = np.full(n, None, dtype=object) if manipulated is None else np.asarray(manipulated, dtype=object)
        unknown = np.array([_missing(g) for g in given], dtype=bool)
        flags = np.where(unknown, False, given).astype(bool)
        views = self.resolve_views(tta, views)
        blend = blend or self.blend
        parts = [score_members(self.models, patches[i:i + chunk], flags[i:i + chunk], unknown[i:i + chunk], views,
                               batch_size, self._heads)
                 for i in range(0, n, chunk)]
        member_views = np.concatenate([p[0] for p in parts], axis=2)
        manipulation_probs = np.concatenate([p[1] for p in parts])
        flags = np.concatenate([p[2] for p in parts])
        features = None if any(p[3] is None for p in parts) else np.concatenate([p[3] for p in parts])
        probs = self.calibrate(blend_probs(member_views.reshape(-1, n, member_views.shape[-1]), blend), "patch")
        labels = probs.argmax(axis=1) if balance == "none" else balance_to_quota(probs, groups=flags, method=balance)
        return Prediction(probs, labels, flags, unknown, manipulation_probs, member_views, views, None, features)

    def predict_photos(self, crops: list[np.ndarray], manipulated=None, *, signatures=None, tta: bool = True,
                       views=None, blend: str | None = None, jpeg_tables: bool = True, balance: str = "none",
                       calibrated: bool = True, batch_size: int = 64) -> Prediction:
        """Score photos given as their patches: `crops[i]` is (K_i, P, P, 3), e.g. `camid.core.patches.grid_crops`.

        Every (model, view, patch) of a photo is blended into that photo's one distribution, its manipulated
        flag is the majority of its patches' (given or estimated), and balancing, if asked, sees photos, not
        patches. `signatures[i]` is photo i's JPEG table signature (`jpeg_tables.signature_of`; None: none):
        where the bundle's evaluation kept the JPEG-table evidence (and `jpeg_tables`), it multiplies in for
        photos the caller did not say are manipulated. `member_views` of the result is None (the patches' own are not kept).
        """
        if not crops:
            raise CamidError("no photos to score")
        counts = [len(c) for c in crops]
        given = [None] * len(crops) if manipulated is None else list(manipulated)
        patch_flags = np.array([g for g, k in zip(given, counts) for _ in range(k)], dtype=object)
        pred = self.predict(np.concatenate(crops), patch_flags, tta=tta, views=views, blend=blend,
                            batch_size=batch_size)
        blend = blend or self.blend
        bounds = np.cumsum([0] + counts)
        parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        n_classes = pred.probs.shape[1]
        probs = np.stack([blend_probs(pred.member_views[:, :, part].reshape(-1, 1, n_classes), blend)[0]
                          for part in parts])
        flags = np.array([pred.manipulated[part].mean() >= 0.5 for part in parts])
        evidence = np.full(len(crops), NONE, dtype=object)
        if jpeg_tables and signatures is not None:
            # Only a caller's "manipulated" rules the evidence out: a JPEG whose tables some camera's firmware
            # wrote is that camera's own file, whatever the auxiliary head guesses (re-saved files carry their
            # editor's tables, which training photos do not have, and which therefore say nothing).
            said_manipulated = np.array([not _missing(g) and bool(g) for g in given])
            evidence = self.tables_evidence(signatures, ~said_manipulated)
            probs = self.apply_tables(probs, signatures, ~said_manipulated)
        if calibrated:  # a photo of one patch is calibrated as a patch, of many as a photo
            probs = self.calibrate(probs, ["patch" if k == 1 else "photo" for k in counts], entered(evidence))
        labels = probs.argmax(axis=1) if balance == "none" else balance_to_quota(probs, groups=flags, method=balance)
        return Prediction(probs, labels, flags, np.array([_missing(g) for g in given], dtype=bool),
                          np.stack([pred.manipulation_probs[part].mean(axis=0) for part in parts]), None, pred.views,
                          evidence, None if pred.features is None else photo_features(pred.features, counts),
                          pred.features)


def load_ensemble(model: str) -> Ensemble:
    """An ensemble from a bundle folder or from an MLflow model URI (models:/camid@champion, runs:/..., a path)."""
    if (Path(model) / "ensemble.json").is_file():
        return Ensemble.load(Path(model))
    import mlflow
    from mlflow.exceptions import MlflowException

    from camid.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        loaded = mlflow.pyfunc.load_model(model)
    except (MlflowException, OSError) as exc:
        raise CamidError(f"cannot load model {model!r} from tracking store {tracking_uri()}: {exc}. Check the URI "
                         "(e.g. models:/camid@champion), and MLFLOW_TRACKING_URI, or pass an ensemble bundle folder") from None
    return loaded.unwrap_python_model().ensemble
