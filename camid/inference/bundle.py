"""An ensemble bundle on disk, a folder written by the evaluate stage and read by every consumer:

    ensemble.json            labels, patch, members (arch, file, weighted_accuracy), and the settings
                             evaluation chose and scored: views (D4 indices for TTA) and blend; the
                             calibration temperatures and open-set thresholds fitted on validation
    jpeg_tables.json         the training photos' JPEG-table counts per camera (firmware evidence)
    open_set_bank.npz        the training features the open-set kNN score compares with
    members/<arch>.keras     self-contained Keras models (preprocessing inside)
    tracking.json            the members' MLflow run ids (outside DVC's hash: .dvcignore)

`write_bundle` gathers trained models, `set_settings` and `set_confidence` record what evaluation chose and
fitted, `read` loads it all (`camid.inference.ensemble.Ensemble.load`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from camid.core.fileio import TRACKING_FILE, atomic_dir, write_json
from camid.errors import CamidError
from camid.inference.blending import BLENDS, UnknownMethodError
from camid.inference.jpeg_tables import TablePrior
from camid.inference.openset import read_bank
from camid.inference.tta import D4


def read_run_id(model_dir: Path) -> str | None:
    """The MLflow run that trained a train-stage folder (its TRACKING_FILE; None where it has none, e.g. restored
    from DVC's cache, which does not keep it)."""
    try:
        return json.loads((Path(model_dir) / TRACKING_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def member_run_ids(bundle: Path) -> dict:
    """{member name: MLflow run id or None} of a bundle (its TRACKING_FILE; {} where it has none)."""
    try:
        return json.loads((Path(bundle) / TRACKING_FILE).read_text()).get("members", {})
    except (OSError, ValueError):
        return {}


def write_bundle(model_dirs: list[Path], out: Path) -> Path:
    """Gather trained models (each a train-stage folder with model.keras and run.json) into a bundle."""
    if not model_dirs:
        raise CamidError("no trained models given for the ensemble")
    members, labels, patch, run_ids = [], None, None, {}
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
            members.append({"arch": name, "file": f"members/{name}.keras",
                            "weighted_accuracy": run.get("weighted_accuracy")})
            run_ids[name] = read_run_id(model_dir)
        write_json(tmp / "ensemble.json", {"labels": labels, "patch": patch, "members": members, "views": [0],
                                           "blend": "mean_square"})
        write_json(tmp / TRACKING_FILE, {"members": run_ids})  # MLflow run ids: outside the bundle's hash
    return out

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
        spec["cameras"] = catalog_entries(catalog)
    write_json(spec_file, spec)


def catalog_entries(catalog) -> list[dict]:
    """The bundle's record of a catalog's cameras (`Ensemble.cameras`): label, EXIF make and models, sizes, and
    whether it is a background camera."""
    return [{"label": c.label, "make": c.make, "models": list(c.models), "sizes": [list(hw) for hw in c.sizes],
             **({"background": True} if c.background else {})} for c in catalog.cameras]


def set_confidence(bundle: Path, temperature: dict, open_set: dict | None = None, bank: dict | None = None,
                   metadata: dict | None = None) -> None:
    """Record what validation fitted for the probabilities: the calibration temperatures ({"patch": T,
    "photo": T}, plus "patch_pixels_only" and "photo_pixels_only" where the bundle uses the JPEG tables), the
    open-set rule ({"score", "accept", "threshold": {the same keys}}) and the metadata rule (the twins and the
    level under which EXIF contradicts the pixels, camid.inference.metadata)."""
    spec_file = Path(bundle) / "ensemble.json"
    spec = json.loads(spec_file.read_text())
    spec["temperature"] = {k: float(v) for k, v in temperature.items()}
    if open_set is not None:
        spec["open_set"] = open_set
    if metadata is not None:
        spec["metadata"] = metadata
    if bank is not None:
        from camid.inference.openset import write_bank

        write_bank(Path(bundle), bank)
    write_json(spec_file, spec)


def read(bundle: Path) -> dict:
    """The keyword arguments of `Ensemble` for the bundle folder: its Keras members loaded, its settings read."""
    import keras

    import camid.models  # noqa: F401  (registers camid's custom layers for deserialisation)

    bundle = Path(bundle)
    spec_file = bundle / "ensemble.json"
    if not spec_file.is_file():
        raise CamidError(f"{spec_file} not found: {bundle} is not an ensemble bundle (make one with camid evaluate)")
    spec = json.loads(spec_file.read_text())
    return dict(models=[keras.models.load_model(bundle / m["file"]) for m in spec["members"]],
                names=[m["arch"] for m in spec["members"]], labels=spec["labels"], patch=spec["patch"],
                members=spec["members"], views=tuple(spec.get("views", (0,))), blend=spec.get("blend", "mean_square"),
                tables=TablePrior.read(bundle), use_tables=bool(spec.get("jpeg_tables", False)),
                cameras=spec.get("cameras", []), temperature=spec.get("temperature", {}),
                open_set=spec.get("open_set", {}), bank=read_bank(bundle), metadata=spec.get("metadata", {}))
