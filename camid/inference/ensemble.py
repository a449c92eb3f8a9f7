"""An ensemble of trained backbones with its post-processing: the one inference path.

Evaluation, batch prediction and the served MLflow model all call `Ensemble.predict`, so test-time
augmentation, blending and balancing exist once. A bundle on disk is a folder:

    ensemble.json            labels, patch, members (arch, file, run_id, weighted_accuracy), and the settings
                             evaluation chose and scored: views (D4 indices for TTA) and blend; the
                             calibration temperatures and open-set thresholds fitted on validation
    jpeg_tables.json         the training photos' JPEG-table counts per camera (firmware evidence)
    members/<arch>.keras     self-contained Keras models (preprocessing inside)

`tta=True` means the bundle's views, so the served model averages exactly the views that were evaluated.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from camid.errors import CamidError
from camid.core.fileio import atomic_dir, write_json
from camid.inference.balancing import balance_to_quota
from camid.inference.blending import BLENDS, UnknownMethodError
from camid.inference.blending import blend as blend_probs
from camid.inference.jpeg_tables import NONE, UNSEEN, USED, TablePrior
from camid.inference.openset import photo_features, read_bank
from camid.inference.options import BALANCE_CHOICES
from camid.inference.tta import D4, d4_views, fold_views



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
    tables_evidence: np.ndarray | None = None  # (N,) USED / UNSEEN / NONE (jpeg_tables); None: all NONE
    features: np.ndarray | None = None  # (N, D) unit-length penultimate features, first view (openset.features_of)


# Validation fits a temperature and an open-set threshold per kind of answer: a single patch or a whole photo
# ("patch", "photo"), each with the bundle's own evidence; where the bundle uses the JPEG tables, also for answers
# the tables did not enter (`jpeg_tables: false`, a caller's manipulated flag, a signature no training photo had,
# no JPEG at all), under "<kind>" + PIXELS_ONLY. The two are on different scales: the tables make the answers of
# camera originals far more confident, so one threshold for both rejects almost every pixels-only answer.
KINDS = ("patch", "photo")
PIXELS_ONLY = "_pixels_only"


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
    _heads: dict = field(default_factory=dict, repr=False, compare=False)  # model -> model with a features output

    # -- bundles -------------------------------------------------------------------------------------------
    @staticmethod
    def write_bundle(model_dirs: list[Path], out: Path) -> Path:
        """Gather trained models (each a train-stage folder with model.keras and run.json) into a bundle."""
        if not model_dirs:
            raise CamidError("no trained models given for the ensemble")
        members, labels, patch = [], None, None
        with atomic_dir(out) as tmp:
            (tmp / "members").mkdir()
            for model_dir in model_dirs:
                model_dir = Path(model_dir)
                run_file, model_file = model_dir / "run.json", model_dir / "model.keras"
                if not (run_file.is_file() and model_file.is_file()):
                    raise CamidError(f"{model_dir} is not a trained model folder (needs model.keras and run.json); "
                                     "train it first: camid train --arch NAME")
                run = json.loads(run_file.read_text())
                if labels is not None and (run["labels"] != labels or run["patch"] != patch):
                    raise CamidError(f"{model_dir} was trained on other cameras or patch size than the other members")
                labels, patch = run["labels"], run["patch"]
                name = run["arch"] if run["arch"] not in {m["arch"] for m in members} else f"{run['arch']}-{len(members)}"
                shutil.copy2(model_file, tmp / "members" / f"{name}.keras")
                members.append({"arch": name, "file": f"members/{name}.keras", "run_id": run.get("run_id"),
                                "weighted_accuracy": run.get("weighted_accuracy")})
            write_json(tmp / "ensemble.json", {"labels": labels, "patch": patch, "members": members, "views": [0],
                                               "blend": "mean_square"})
        return out

    @staticmethod
    def set_settings(bundle: Path, views: tuple[int, ...], blend: str, scores: dict | None = None, *,
                     tables: TablePrior | None = None, use_tables: bool = False, catalog=None) -> None:
        """Record in a bundle the TTA views, blend and JPEG-table evidence that were chosen and scored (and,
        optionally, the scores)."""
        if blend not in BLENDS:
            raise UnknownMethodError(f"unknown blend {blend!r}; valid blends: {', '.join(BLENDS)}")
        if not views or views[0] != 0 or any(not 0 <= v < len(D4) for v in views):
            raise CamidError(f"TTA views must start with the identity and index D4 (0..{len(D4) - 1}), got {views}")
        spec_file = Path(bundle) / "ensemble.json"
        spec = json.loads(spec_file.read_text())
        spec.update(views=[int(v) for v in views], blend=blend, view_names=[D4[v] for v in views],
                    jpeg_tables=bool(use_tables and tables is not None))
        if scores is not None:
            spec["selection"] = scores
        if tables is not None:
            tables.write(bundle)
        if catalog is not None:
            spec["cameras"] = [{"label": c.label, "make": c.make, "models": list(c.models)} for c in catalog.cameras]
        write_json(spec_file, spec)

    @classmethod
    def load(cls, bundle: Path) -> "Ensemble":
        import keras

        import camid.models  # noqa: F401  (registers camid's custom layers for deserialisation)

        bundle = Path(bundle)
        spec_file = bundle / "ensemble.json"
        if not spec_file.is_file():
            raise CamidError(f"{spec_file} not found: {bundle} is not an ensemble bundle (make one with camid evaluate)")
        spec = json.loads(spec_file.read_text())
        models = [keras.models.load_model(bundle / m["file"]) for m in spec["members"]]
        return cls(models, [m["arch"] for m in spec["members"]], spec["labels"], spec["patch"], spec["members"],
                   views=tuple(spec.get("views", (0,))), blend=spec.get("blend", "mean_square"),
                   tables=TablePrior.read(bundle), use_tables=bool(spec.get("jpeg_tables", False)),
                   cameras=spec.get("cameras", []), temperature=spec.get("temperature", {}),
                   open_set=spec.get("open_set", {}), bank=read_bank(bundle))

    @staticmethod
    def set_confidence(bundle: Path, temperature: dict, open_set: dict | None = None, bank: dict | None = None) -> None:
        """Record what validation fitted for the probabilities: the calibration temperatures ({"patch": T,
        "photo": T}, plus "patch_pixels_only" and "photo_pixels_only" where the bundle uses the JPEG tables) and
        the open-set rule ({"score", "accept", "threshold": {the same keys}})."""
        spec_file = Path(bundle) / "ensemble.json"
        spec = json.loads(spec_file.read_text())
        spec["temperature"] = {k: float(v) for k, v in temperature.items()}
        if open_set is not None:
            spec["open_set"] = open_set
        if bank is not None:
            from camid.inference.openset import write_bank

            write_bank(Path(bundle), bank)
        write_json(spec_file, spec)

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
        knn_score`) where the bundle holds a feature bank and `features` are given, else the calibrated top
        probability of `probs` (N, C) against the threshold of its setting (as in `calibrate`: one patch or
        many, with or without the JPEG tables, `tables_evidence` per row). NaN for a bundle without a rule."""
        from camid.inference.openset import confidence, knn_score

        kinds = ["patch" if k == 1 else "photo" for k in patch_counts]
        knn = self.open_set.get("knn_threshold")
        if knn and self.bank is not None and features is not None:
            margin = np.empty(len(kinds))
            for kind in set(kinds):
                rows = np.array([k == kind for k in kinds])
                margin[rows] = knn_score(features[rows], self.bank[kind]) - knn[kind]
            return margin
        thresholds = self.open_set.get("threshold", {})
        if not thresholds:
            return np.full(len(kinds), np.nan)
        evidence = self._evidence_rows(tables_evidence, len(kinds))
        cut = np.array(self.fitted(thresholds, self.setting_keys(kinds, evidence == USED)), dtype=np.float64)
        return confidence(probs) - cut

    def is_unknown(self, probs: np.ndarray, patch_counts, tables_evidence=None, features=None) -> np.ndarray:
        """(N,) True where a photo is unlike every catalog camera: by its pixels (`open_set_margin` below 0), or,
        where validation found every catalog camera's originals carry tables training saw (the bundle's
        `open_set.unseen_tables`), by its JPEG tables being UNSEEN. All False for a bundle without a rule."""
        if not len(probs) or not (self.open_set.get("threshold") or self.open_set.get("knn_threshold")):
            return np.zeros(len(probs), dtype=bool)
        evidence = self._evidence_rows(tables_evidence, len(probs))
        return (self.open_set_margin(probs, patch_counts, evidence, features) < 0) | \
            (bool(self.open_set.get("unseen_tables")) & (evidence == UNSEEN))

    def metadata_check(self, models, predicted) -> tuple[list[str], list[bool | None]]:
        """EXIF says one camera, the pixels another? For each photo's EXIF Model (None: none) and predicted
        label: the catalog camera whose model patterns the EXIF Model matches ("" if none), and whether that is
        the predicted camera (None when the photo has no EXIF Model, or the bundle no catalog to match with)."""
        from camid.config import Camera

        cameras = [Camera(c["label"], c.get("make", ""), tuple(c["models"]), (), False) for c in self.cameras]
        named, consistent = [], []
        for model, label in zip(models, predicted):
            match = next((c.label for c in cameras if model and c.matches_model(model)), "")
            named.append(match)
            consistent.append(None if not model or not cameras else match == label)
        return named, consistent

    def apply_tables(self, probs: np.ndarray, signatures, usable, force: bool = False) -> np.ndarray:
        """The JPEG-table evidence multiplied into (N, C) probabilities where `usable` (see jpeg_tables), if the
        bundle uses it (or `force`); unchanged otherwise."""
        if self.tables is None or not (self.use_tables or force):
            return probs
        return self.tables.apply(probs, signatures, usable)

    def tables_evidence(self, signatures, usable) -> np.ndarray:
        """(N,) what the JPEG tables say of each row (`jpeg_tables.USED`: `apply_tables` changes it; `UNSEEN`:
        a usable JPEG whose signature no training photo had; `NONE`); all NONE where the bundle does not use them."""
        if self.tables is None or not self.use_tables:
            return np.full(len(signatures), NONE, dtype=object)
        return self.tables.evidence(signatures, usable)

    def resolve_views(self, tta: bool | None = True, views=None) -> tuple[int, ...]:
        """Explicit `views` win; else the bundle's chosen views with tta, the identity alone without."""
        if views is not None:
            return tuple(int(v) for v in views)
        return self.views if tta else (0,)

    # -- inference -----------------------------------------------------------------------------------------
    def _with_features(self, model):
        """`model` with a third output, `features`: the input of its camera layer (the penultimate features the
        open-set kNN score compares; the same layers, so no extra pass). The model itself where it has no layer
        named "camera"."""
        if id(model) not in self._heads:
            import keras

            try:
                head = model.get_layer("camera")
                outputs = {"camera": head.output, "manipulation": model.get_layer("manipulation").output,
                           "features": head.input}
                self._heads[id(model)] = keras.Model(model.input, outputs, name=f"{model.name}_with_features")
            except ValueError:
                self._heads[id(model)] = model
        return self._heads[id(model)]

    def _forward(self, model, views: np.ndarray, flags: np.ndarray, batch_size: int):
        """Both heads' outputs and the penultimate features (None without) for uint8 views, `batch_size` at a
        time (converted to float32 per batch only)."""
        camera, manipulation, features = [], [], []
        model = self._with_features(model)
        for start in range(0, len(views), batch_size):
            out = model.predict_on_batch({"image": views[start:start + batch_size].astype("float32"),
                                          "manipulated": flags[start:start + batch_size].reshape(-1, 1).astype("float32")})
            camera.append(np.asarray(out["camera"], dtype=np.float64))
            manipulation.append(np.asarray(out["manipulation"], dtype=np.float64))
            if "features" in out:
                features.append(np.asarray(out["features"], dtype=np.float32))
        return (np.concatenate(camera), np.concatenate(manipulation),
                np.concatenate(features) if features else None)

    def _score(self, patches: np.ndarray, flags: np.ndarray, unknown: np.ndarray, views: tuple[int, ...],
               batch_size: int):
        """(models, views, N, C) camera probabilities, (N, 9) manipulation probabilities, the estimated flags and
        (N, D) features of the first view with the flags as given (`openset.features_of`; None without)."""
        from camid.inference.openset import features_of

        n_views = len(views)
        stacked = d4_views(patches, views)
        camera, manip, feats = [], [], []
        for model in self.models:
            cam, aux, feat = self._forward(model, stacked, np.tile(flags, n_views), batch_size)
            camera.append(fold_views(cam, n_views))
            manip.append(fold_views(aux, n_views))
            feats.append(None if feat is None else fold_views(feat, n_views)[0])
        features = None if any(f is None for f in feats) else features_of(feats)
        manipulation_probs = np.concatenate(manip).mean(axis=0)
        # The auxiliary head does not see the flag, so one pass is enough to estimate it; only the rows it
        # calls manipulated are scored again, with the flag set.
        estimated = unknown & (manipulation_probs[:, 0] < 0.5)
        if estimated.any():
            rows = np.flatnonzero(estimated)
            sub_views = d4_views(patches[rows], views)
            for m, model in enumerate(self.models):
                cam, _, _ = self._forward(model, sub_views, np.ones(len(sub_views), bool), batch_size)
                camera[m][:, rows] = fold_views(cam, n_views)
        return np.stack(camera), manipulation_probs, flags | estimated, features

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
        parts = [self._score(patches[i:i + chunk], flags[i:i + chunk], unknown[i:i + chunk], views, batch_size)
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
            probs = self.calibrate(probs, ["patch" if k == 1 else "photo" for k in counts], evidence == USED)
        labels = probs.argmax(axis=1) if balance == "none" else balance_to_quota(probs, groups=flags, method=balance)
        return Prediction(probs, labels, flags, np.array([_missing(g) for g in given], dtype=bool),
                          np.stack([pred.manipulation_probs[part].mean(axis=0) for part in parts]), None, pred.views,
                          evidence, None if pred.features is None else photo_features(pred.features, counts))


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
