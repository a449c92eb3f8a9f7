"""The evaluate stage: bundle the trained backbones into an ensemble and score it on the held-out split.

Every held-out photo is scored unaltered and under each of the eight test-set manipulations, through the
same `Ensemble.predict` the served model uses (test-time augmentation, blending, optional balancing).
Outputs: the bundle (for the register stage), the metrics (DVC metrics, MLflow), the confusion matrix as a
DVC plot (CSV of actual/predicted pairs) and as an image logged to MLflow.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from camid.cli import optional
from camid.config import EvaluateParams, load_params
from camid.errors import CamidError
from camid.fileio import atomic_path, write_json
from camid.inference.blending import BLENDS
from camid.inference.ensemble import BALANCE_CHOICES, Ensemble

log = logging.getLogger(__name__)


def score(ensemble: Ensemble, cache: Path, settings: EvaluateParams, batch_size: int = 64) -> tuple[dict, pd.DataFrame]:
    """Weighted accuracy and friends of `ensemble` on the cached validation crops; also the per-patch table."""
    from camid.dataset import eval_patches
    from camid.manipulations import MANIPULATIONS
    from camid.metrics import per_camera_accuracy, weighted_accuracy

    evalset = eval_patches(cache, split="val", patch=ensemble.patch)
    manipulated = evalset.manipulation > 0
    balance = settings.balance
    pred = ensemble.predict(evalset.images, manipulated, tta=settings.tta, blend=settings.blend, balance=balance,
                            batch_size=batch_size)
    y, p = evalset.labels, pred.labels
    labels = ensemble.labels
    metrics = {
        "weighted_accuracy": weighted_accuracy(y, p, manipulated),
        "accuracy_unaltered": float(np.mean(p[~manipulated] == y[~manipulated])),
        "accuracy_manipulated": float(np.mean(p[manipulated] == y[manipulated])),
        "per_camera": dict(zip(labels, per_camera_accuracy(y, p, len(labels)))),
        "per_manipulation": {name: float(np.mean(p[evalset.manipulation == i] == y[evalset.manipulation == i]))
                             for i, name in enumerate(("none",) + tuple(MANIPULATIONS))},
        "images": int(len(np.unique(evalset.image_id))),
        "patches": int(len(y)),
        "chance": 1 / len(labels),
        "tta": bool(settings.tta), "blend": settings.blend, "balance": balance,
        "members": ensemble.names,
    }
    table = pd.DataFrame({"actual": np.asarray(labels)[y], "predicted": np.asarray(labels)[p],
                          "manipulation": evalset.manipulation, "image_id": evalset.image_id})
    return metrics, table


def evaluate(model_dirs: list[Path], cache: Path, bundle: Path, settings: EvaluateParams, *,
             metrics_file: Path, plots_file: Path, figure_file: Path | None = None) -> dict:
    import mlflow

    from camid import tracking
    from camid.metrics import confusion_matrix
    from camid.plots import confusion_figure

    Ensemble.write_bundle(model_dirs, bundle)
    ensemble = Ensemble.load(bundle)
    with tracking.run("evaluate", tags={"stage": "evaluate", "data_version": tracking.data_version(cache)}):
        metrics, table = score(ensemble, cache, settings)
        tracking.log_params({"members": ",".join(ensemble.names), "tta": settings.tta, "blend": settings.blend,
                           "balance": metrics["balance"]})
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
        mlflow.log_metrics({f"camera_{k}": v for k, v in metrics["per_camera"].items()})
        labels = ensemble.labels
        matrix = confusion_matrix(table.actual.map(labels.index).to_numpy(), table.predicted.map(labels.index).to_numpy(),
                                  len(labels))
        tracking.log_figure(confusion_figure(matrix, labels, f"ensemble ({'+'.join(ensemble.names)}): validation"),
                            "confusion_matrix.png", figure_file)
        mlflow.log_dict(metrics, "evaluation.json")
    write_json(metrics_file, metrics)
    with atomic_path(plots_file) as tmp:
        table[["actual", "predicted"]].to_csv(tmp, index=False)
    log.info("ensemble %s: weighted accuracy %.4f (unaltered %.4f, manipulated %.4f; chance %.3f)",
             "+".join(ensemble.names), metrics["weighted_accuracy"], metrics["accuracy_unaltered"],
             metrics["accuracy_manipulated"], metrics["chance"])
    return metrics


def evaluate_folder(folder: Path, model: str, settings: EvaluateParams, catalog, *, metrics_file: Path,
                    plots_file: Path, figure_file: Path | None = None, workers: int | None = None) -> dict:
    """Score a trained model (bundle folder or MLflow URI) on a labelled `<label>/<files>` folder.

    Each photo's centre crop goes through the same crop cache code and manipulations as the split's
    validation photos, so the figures mean the same thing.
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
        files.iloc[:0].to_csv(split_dir / "train.csv", index=False)
        files.to_csv(split_dir / "val.csv", index=False)
        prepare(split_dir, Path(tmp) / "cache", catalog, patch=ensemble.patch, crops_per_image=1, shard_size=256,
                seed=0, workers=workers)
        with tracking.run("evaluate-folder", tags={"stage": "evaluate", "folder": str(folder), "model": model}):
            metrics, table = score(ensemble, Path(tmp) / "cache", settings)
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
             figure_file=args.figure)
    return 0
