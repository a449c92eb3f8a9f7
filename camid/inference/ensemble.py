"""An ensemble of trained backbones with its post-processing: the one inference path.

Evaluation, batch prediction and the served MLflow model all call `Ensemble.predict`, so test-time
augmentation, blending and balancing exist once. A bundle on disk is a folder:

    ensemble.json            labels, patch, members (arch, file, run_id, weighted_accuracy)
    members/<arch>.keras     self-contained Keras models (preprocessing inside)
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from camid.errors import CamidError
from camid.fileio import atomic_dir, write_json
from camid.inference.balancing import BALANCERS, balance_to_quota
from camid.inference.blending import blend as blend_probs
from camid.inference.tta import d4_views, fold_views

BALANCE_CHOICES = ("none",) + BALANCERS


@dataclass
class Prediction:
    probs: np.ndarray                # (N, C) blended camera probabilities, rows sum to 1
    labels: np.ndarray               # (N,) predicted class index (after balancing, if asked)
    manipulated: np.ndarray          # (N,) bool: given by the caller, or estimated
    manipulated_estimated: np.ndarray  # (N,) bool: True where the flag came from the auxiliary head
    manipulation_probs: np.ndarray   # (N, 9) none + the eight manipulations, averaged over members and views


@dataclass
class Ensemble:
    models: list
    names: list[str]
    labels: list[str]
    patch: int
    members: list[dict] = field(default_factory=list)

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
            write_json(tmp / "ensemble.json", {"labels": labels, "patch": patch, "members": members})
        return out

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
        return cls(models, [m["arch"] for m in spec["members"]], spec["labels"], spec["patch"], spec["members"])

    # -- inference -----------------------------------------------------------------------------------------
    def _forward(self, model, views: np.ndarray, flags: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Both heads' outputs for uint8 views, `batch_size` at a time (converted to float32 per batch only)."""
        camera, manipulation = [], []
        for start in range(0, len(views), batch_size):
            out = model.predict_on_batch({"image": views[start:start + batch_size].astype("float32"),
                                          "manipulated": flags[start:start + batch_size].reshape(-1, 1).astype("float32")})
            camera.append(np.asarray(out["camera"], dtype=np.float64))
            manipulation.append(np.asarray(out["manipulation"], dtype=np.float64))
        return np.concatenate(camera), np.concatenate(manipulation)

    def _score(self, patches: np.ndarray, flags: np.ndarray, unknown: np.ndarray, tta: bool, batch_size: int):
        """(models x views, N, C) camera probabilities, (N, 9) manipulation probabilities and the estimated flags."""
        views = d4_views(patches, tta)
        n_views = len(views) // len(patches)
        camera, manip = [], []
        for model in self.models:
            cam, aux = self._forward(model, views, np.tile(flags, n_views), batch_size)
            camera.append(fold_views(cam, n_views))
            manip.append(fold_views(aux, n_views))
        manipulation_probs = np.concatenate(manip).mean(axis=0)
        # The auxiliary head does not see the flag, so one pass is enough to estimate it; only the rows it
        # calls manipulated are scored again, with the flag set.
        estimated = unknown & (manipulation_probs[:, 0] < 0.5)
        if estimated.any():
            rows = np.flatnonzero(estimated)
            sub_views = d4_views(patches[rows], tta)
            for m, model in enumerate(self.models):
                cam, _ = self._forward(model, sub_views, np.ones(len(sub_views), bool), batch_size)
                camera[m][:, rows] = fold_views(cam, n_views)
        return np.concatenate(camera), manipulation_probs, flags | estimated

    def predict(self, patches: np.ndarray, manipulated: np.ndarray | None = None, *, tta: bool = True,
                blend: str = "mean_square", balance: str = "none", batch_size: int = 64,
                chunk: int = 256) -> Prediction:
        """Score uint8 patches (N, P, P, 3).

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
        unknown = np.array([g is None or (isinstance(g, float) and np.isnan(g)) for g in given], dtype=bool)
        flags = np.where(unknown, False, given).astype(bool)
        parts = [self._score(patches[i:i + chunk], flags[i:i + chunk], unknown[i:i + chunk], tta, batch_size)
                 for i in range(0, n, chunk)]
        camera = np.concatenate([p[0] for p in parts], axis=1)
        manipulation_probs = np.concatenate([p[1] for p in parts])
        flags = np.concatenate([p[2] for p in parts])
        probs = blend_probs(camera, blend)
        labels = probs.argmax(axis=1) if balance == "none" else balance_to_quota(probs, groups=flags, method=balance)
        return Prediction(probs, labels, flags, unknown, manipulation_probs)
