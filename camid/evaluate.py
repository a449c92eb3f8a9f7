"""The evaluate stage: bundle the trained backbones into an ensemble, choose its test-time settings on the
validation set, and score it once on the test set.

Validation and test hold devices of their own (camid.split), so the test figure is camera *model* accuracy on
devices the network never saw. Validation makes every choice: here, which D4 views test-time augmentation
averages (`camid.inference.tta.select_views`: only views that raise the validation score). The chosen views
and the blend are written into the bundle, so the served model uses exactly what was scored. Test is only
reported: with the chosen views, with the identity view alone (no TTA) and with all eight D4 views, plus
every view on its own, side by side.

Every held-out photo is scored unaltered and under each of the eight test-set manipulations, through the same
`Ensemble.predict` the served model uses. The headline figure is the competition's weighted accuracy,
0.7 x accuracy on unaltered images + 0.3 x accuracy on manipulated ones (camid.metrics).
Outputs: the bundle (for the register stage), the metrics (DVC metrics, MLflow), the test confusion matrix as a
DVC plot (CSV of actual/predicted pairs) and as an image logged to MLflow.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from camid.config import EvaluateParams, load_params, optional
from camid.errors import CamidError
from camid.fileio import atomic_path, write_json
from camid.inference.blending import BLENDS, blend
from camid.inference.ensemble import BALANCE_CHOICES, Ensemble
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
    from camid.manipulations import MANIPULATIONS
    from camid.metrics import accuracy, per_camera_accuracy, weighted_accuracy

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
    from camid.dataset import eval_patches

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
        calibration=calibration_report(ensemble, probs(views, tables), evalset.labels, "patch"),
    )
    table = pd.DataFrame({"actual": np.asarray(labels)[evalset.labels], "predicted": np.asarray(labels)[p],
                          "manipulation": evalset.manipulation, "image_id": evalset.image_id})
    return metrics, table, pred.member_views


def final_probs(ensemble: Ensemble, evalset, member_views, signatures, views, tables: bool, method: str) -> np.ndarray:
    """(N, C) answers for an EvalSet before calibration: `views` blended, then the JPEG-table evidence on the
    unaltered rows if `tables`."""
    blended = _blended(member_views, views, method)
    return ensemble.apply_tables(blended, signatures, evalset.manipulation == 0, force=True) if tables else blended


def calibration_report(ensemble: Ensemble, probs: np.ndarray, labels: np.ndarray, kind: str) -> dict:
    """ECE of uncalibrated `probs` and of the same under the bundle's `kind` temperature."""
    from camid.inference.calibration import expected_calibration_error

    return {"temperature": ensemble.temperature.get(kind), "ece_before": expected_calibration_error(probs, labels),
            "ece_after": expected_calibration_error(ensemble.calibrate(probs, kind), labels)}


def fit_temperatures(ensemble: Ensemble, cache: Path, settings: EvaluateParams) -> dict:
    """Calibration temperatures on the validation split, for the bundle's own settings: one for single
    patches (the cached centre crops, unaltered and manipulated) and one for whole photos (auto patches)."""
    from camid.dataset import eval_patches
    from camid.inference.calibration import fit_temperature

    evalset = eval_patches(cache, split="val", patch=ensemble.patch)
    # scored with the bundle's own views only, so every index of the views axis is one of them
    member_views = ensemble.predict(evalset.images, evalset.manipulation > 0, blend=settings.blend).member_views
    patch = final_probs(ensemble, evalset, member_views, row_signatures(evalset), range(len(ensemble.views)),
                        ensemble.use_tables, settings.blend)
    photos = load_photos(cache, "val", ensemble.patch)
    return {"patch": fit_temperature(patch, evalset.labels),
            "photo": fit_temperature(photo_probs(ensemble, photos, jpeg_tables=ensemble.use_tables), photos[2])}


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

    from camid.prepare import read_index

    photos = read_index(cache, split).drop_duplicates("image")
    digest = hashlib.sha256(json.dumps(labels).encode())
    for path, label in sorted(zip(photos["path"], photos["label"])):
        size = Path(path).stat().st_size if Path(path).exists() else -1
        digest.update(f"{path}\0{size}\0{label}\n".encode())
    return digest.hexdigest()[:16]


def fit_tables(cache: Path, labels: list[str]):
    """The JPEG-table evidence of the training photos (camid.inference.jpeg_tables)."""
    from camid.inference.jpeg_tables import TablePrior, signature_of_file
    from camid.prepare import read_index

    photos = read_index(cache, "train").drop_duplicates("image")
    return TablePrior.fit([signature_of_file(p) for p in photos["path"]], photos["label_index"], labels)


def choose_settings(ensemble: Ensemble, cache: Path, settings: EvaluateParams, tables) -> tuple[tuple[int, ...], bool, dict]:
    """On the validation split: the TTA views (the identity alone when `settings.tta` is off), then whether
    the JPEG-table evidence is kept (`settings.jpeg_tables`, and it does not lower the validation score)."""
    from camid.dataset import eval_patches
    from camid.inference.tta import select_views
    from camid.metrics import weighted_accuracy

    evalset = eval_patches(cache, split="val", patch=ensemble.patch)
    if not len(evalset):
        raise CamidError(f"the cache at {cache} has no validation photos to choose test-time views on")
    manipulated = evalset.manipulation > 0
    member_views = ensemble.predict(evalset.images, manipulated, views=ALL_VIEWS, blend=settings.blend).member_views

    def rate(probs):
        return weighted_accuracy(evalset.labels, probs.argmax(1), manipulated)

    identity = rate(_blended(member_views, (0,), settings.blend))
    views, best = select_views(member_views, rate, lambda p: blend(p, settings.blend)) if settings.tta else ((0,), identity)
    with_tables = rate(tables.apply(_blended(member_views, views, settings.blend), row_signatures(evalset),
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
    from camid.imageio import decode_image
    from camid.patches import grid_crops
    from camid.prepare import read_index

    photos = read_index(cache, split).drop_duplicates("image")
    crops, signatures = [], []
    for path in tqdm(photos["path"], desc=f"full photos ({split})", unit="photo", leave=False):
        data = Path(path).read_bytes()
        crops.append(grid_crops(decode_image(data), patch, patches))
        signatures.append(header_facts(data)["jpeg_tables"])
    return crops, signatures, photos["label_index"].to_numpy()


def photo_probs(ensemble: Ensemble, photos, *, tta: bool = True, jpeg_tables: bool = True,
                calibrated: bool = False) -> np.ndarray:
    """(photos, C) answers for `load_photos` output, unaltered, each photo's patches blended into one."""
    crops, signatures, _ = photos
    return ensemble.predict_photos(crops, [False] * len(crops), signatures=signatures, tta=tta,
                                   jpeg_tables=jpeg_tables, calibrated=calibrated).probs


def full_image_accuracy(ensemble: Ensemble, cache: Path, split: str = "test", patches: int = 0) -> dict:
    """Accuracy on the split's whole photos, unaltered, as `camid predict --full-image` scores them, with the
    bundle's settings; also without TTA and from the pixels alone (without the JPEG-table evidence); and the
    photo-level calibration error before and after the bundle's photo temperature."""
    from camid.metrics import accuracy, per_camera_accuracy

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
        pixels = photo_probs(ensemble, photos, tta=tta, jpeg_tables=False)  # one forward pass per TTA setting;
        probs = ensemble.apply_tables(pixels, signatures, np.ones(len(y), bool))  # the tables come after it
        result[f"accuracy{suffix}_pixels_only"] = accuracy(y, pixels.argmax(1))
        result[f"accuracy{suffix}"] = accuracy(y, probs.argmax(1))
        if tta:
            result["per_camera"] = dict(zip(ensemble.labels, per_camera_accuracy(y, probs.argmax(1),
                                                                                 len(ensemble.labels))))
            result["calibration"] = calibration_report(ensemble, probs, y, "photo")
    return result


def evaluate(model_dirs: list[Path], cache: Path, bundle: Path, settings: EvaluateParams, *,
             metrics_file: Path, plots_file: Path, figure_file: Path | None = None, catalog=None) -> dict:
    import mlflow

    from camid import tracking
    from camid.metrics import confusion_matrix
    from camid.plots import confusion_figure
    from camid.prepare import read_meta

    Ensemble.write_bundle(model_dirs, bundle)
    with tracking.run("evaluate", tags={"stage": "evaluate", "data_version": tracking.data_version(cache)}):
        first = Ensemble.load(bundle)
        tables = fit_tables(cache, first.labels)
        views, use_tables, selection = choose_settings(first, cache, settings, tables)
        Ensemble.set_settings(bundle, views, settings.blend, selection, tables=tables, use_tables=use_tables,
                              catalog=catalog)
        Ensemble.set_temperature(bundle, fit_temperatures(Ensemble.load(bundle), cache, settings))
        ensemble = Ensemble.load(bundle)
        metrics, table, _ = score(ensemble, cache, settings)
        metrics.update(selection)
        metrics["full_image"] = full_image_accuracy(ensemble, cache)
        metrics["split_summary"] = read_meta(cache).get("split", {})
        metrics["device_disjoint"] = bool(metrics["split_summary"].get("device_disjoint", False))
        tracking.log_params({"members": ",".join(ensemble.names), "tta": settings.tta, "blend": settings.blend,
                             "balance": settings.balance, "views": ",".join(metrics["views"]),
                             "jpeg_tables": use_tables})
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
        mlflow.log_metrics({f"camera_{k}": v for k, v in metrics["per_camera"].items()})
        mlflow.log_metrics({f"view_{k}": v for k, v in metrics["weighted_accuracy_per_view"].items()})
        mlflow.log_metrics({f"full_image_{k}": v for k, v in metrics["full_image"].items() if isinstance(v, float)})
        labels = ensemble.labels
        matrix = confusion_matrix(table.actual.map(labels.index).to_numpy(), table.predicted.map(labels.index).to_numpy(),
                                  len(labels))
        tracking.log_figure(confusion_figure(matrix, labels, f"ensemble ({'+'.join(ensemble.names)}): test devices"),
                            "confusion_matrix.png", figure_file)
        mlflow.log_dict(metrics, "evaluation.json")
    write_json(metrics_file, metrics)
    with atomic_path(plots_file) as tmp:
        table[["actual", "predicted"]].to_csv(tmp, index=False)
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
    from camid.metrics import confusion_matrix
    from camid.plots import confusion_figure
    from camid.predict import load_ensemble
    from camid.prepare import prepare
    from camid.split import list_labelled

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
        prepare(split_dir, Path(tmp) / "cache", catalog, patch=ensemble.patch, crops_per_image=1, shard_size=256,
                seed=0, workers=workers)
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
    parser.add_argument("--no-tta", dest="tta", action="store_false", default=None, help="score the identity view only")
    parser.add_argument("--blend", type=optional(str), default=None, help="mean_square | arithmetic | geometric")
    parser.add_argument("--balance", type=optional(str), default=None,
                        help=f"{' | '.join(BALANCE_CHOICES)}: balance predictions to equal class counts per "
                             "unaltered/manipulated group (closed sets only)")


def run(args: argparse.Namespace) -> int:
    params = load_params()
    settings = params.evaluate
    overrides = {k: getattr(args, k) for k in ("tta", "blend", "balance") if getattr(args, k) is not None}
    settings = EvaluateParams(**{**settings.__dict__, **overrides})
    if settings.blend not in BLENDS:
        raise CamidError(f"unknown blend {settings.blend!r}; choose one of {', '.join(BLENDS)}")
    if settings.balance not in BALANCE_CHOICES:
        raise CamidError(f"unknown balance {settings.balance!r}; choose one of {', '.join(BALANCE_CHOICES)}")
    if args.folder:
        evaluate_folder(args.folder, args.model, settings, params.catalog, metrics_file=args.metrics,
                        plots_file=args.plots, figure_file=args.figure)
        return 0
    models = args.models or [Path("models/train") / arch for arch in params.train.archs]
    missing = [str(m) for m in models if not (Path(m) / "model.keras").is_file()]
    if missing:
        raise CamidError(f"no trained model in {', '.join(missing)}: train first (dvc repro, or camid train --arch NAME)")
    evaluate(models, args.cache, args.bundle, settings, metrics_file=args.metrics, plots_file=args.plots,
             figure_file=args.figure, catalog=params.catalog)
    return 0
