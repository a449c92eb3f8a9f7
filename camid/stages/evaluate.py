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
import logging
from pathlib import Path

from camid.config import EvaluateParams, load_params, optional
from camid.core.fileio import atomic_path, write_json
from camid.errors import CamidError
from camid.inference.ensemble import Ensemble, load_ensemble
from camid.inference.blending import BLENDS
from camid.inference.options import BALANCE_CHOICES, check_stage_choices
from camid.inference.scoring import (choose_settings, fit_confidence, fit_tables, full_image_accuracy, score,
                                     validation_scores)

log = logging.getLogger(__name__)


def evaluate(model_dirs: list[Path], cache: Path, bundle: Path, settings: EvaluateParams, *,
             metrics_file: Path, plots_file: Path, figure_file: Path | None = None, catalog=None) -> dict:
    import mlflow

    from camid import tracking
    from camid.core.metrics import confusion_matrix
    from camid.core.plots import confusion_figure
    from camid.data.cache import read_meta

    if not 0 < settings.open_set_accept <= 1:
        raise CamidError(f"evaluate.open_set_accept is {settings.open_set_accept}; it is the share of validation "
                         "photos to accept, in (0, 1] (1: never answer unknown)")
    Ensemble.write_bundle(model_dirs, bundle)
    with tracking.run("evaluate", tags={"stage": "evaluate", "data_version": tracking.data_version(cache)}):
        first = Ensemble.load(bundle)
        tables = fit_tables(cache, first.labels)
        val = validation_scores(first, cache, settings)  # one pass over val for the views, tables and temperatures
        views, use_tables, selection = choose_settings(first, val, settings, tables)
        Ensemble.set_settings(bundle, views, settings.blend, selection, tables=tables, use_tables=use_tables,
                              catalog=catalog)
        Ensemble.set_confidence(bundle, *fit_confidence(Ensemble.load(bundle), cache, settings, val))
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
             figure_file=args.figure, catalog=params.catalog)
    return 0
