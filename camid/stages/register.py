"""The register stage: log the ensemble as an MLflow pyfunc model, register it, and move the champion alias.

The model is logged from code (`camid/serving/model_code.py`) with the camid package shipped in `code_paths`, the
ensemble bundle as its artifact, and the evaluation on the held-out split as its metrics. The alias
(`champion` by default) moves to the new version only if it scores at least as well as the current one.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import tempfile
from pathlib import Path

from camid.config import load_params, optional
from camid.errors import CamidError
from camid.core.fileio import write_json

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the camid package, shipped whole in code_paths
SCORE_TAG = "weighted_accuracy"
TEST_DATA_TAG = "test_data"   # fingerprint of the test photos and labels the score was measured on
LABELS_TAG = "labels"
# What the served model needs at run time (the rest of camid's dependencies are for training and data).
SERVING_REQUIREMENTS = ("tensorflow", "keras", "mlflow", "pillow", "numpy", "pandas", "scipy", "uvicorn")


def pinned_requirements() -> list[str]:
    """The serving requirements with the exact versions installed here (the same pins as pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in SERVING_REQUIREMENTS:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def bundle_from_runs(run_ids: list[str], out: Path) -> Path:
    """Fetch trained models from MLflow runs (artifacts model/model.keras and summary.json) into a bundle."""
    import mlflow

    from camid.inference.ensemble import Ensemble

    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for run_id in run_ids:
            target = Path(tmp) / run_id
            target.mkdir()
            try:
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/model.keras", dst_path=str(target))
                summary = mlflow.artifacts.load_dict(f"runs:/{run_id}/summary.json")
            except Exception as exc:  # MLflow raises several types for a missing run or artifact
                raise CamidError(f"cannot fetch the trained model of MLflow run {run_id}: {exc}. Pass the run id of a "
                                 "`camid train` run from this tracking store") from None
            (target / "model" / "model.keras").rename(target / "model.keras")
            write_json(target / "run.json", summary)
            dirs.append(target)
        return Ensemble.write_bundle(dirs, out)


def champion(client, name: str, alias: str) -> dict | None:
    """The version holding `alias`, with its score, test data and labels tags; None if nothing holds it yet.

    Only "no such model" and "no such alias" mean no champion: any other tracking-store failure is an error,
    so a flaky store can never make a worse model champion."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
        version = model.aliases.get(alias)
        if version is None:
            return None
        holder = client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise CamidError(f"cannot read the {alias!r} alias of model {name!r} from the tracking store "
                         f"{_store_uri()}: {exc}. Fix the store (or MLFLOW_TRACKING_URI) and register again") from None
    return {"version": str(holder.version), "score": _float(holder.tags.get(SCORE_TAG)),
            "test_data": holder.tags.get(TEST_DATA_TAG), "labels": holder.tags.get(LABELS_TAG)}


def _store_uri() -> str:
    from camid.tracking import tracking_uri

    return tracking_uri()


def _float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def alias_decision(candidate: dict, holder: dict | None) -> tuple[bool, str]:
    """Whether the alias moves to `candidate` (score, test_data, labels), and why, given its `holder`.

    A score is compared only with one made on the same test data and the same camera labels; a NaN or missing
    score never wins; a tie moves the alias (the newer model was scored as well on the same photos)."""
    score = candidate["score"]
    if score is None or math.isnan(score):
        return False, "the candidate has no valid test score"
    if holder is None:
        return True, "no champion yet"
    if holder["labels"] != candidate["labels"]:
        return False, f"the champion (version {holder['version']}) was trained for other cameras"
    if holder["test_data"] is None or holder["test_data"] != candidate["test_data"]:
        return False, (f"the champion (version {holder['version']}) was scored on other test data, so the scores "
                       "cannot be compared; pass --promote to move the alias anyway")
    if holder["score"] is None or math.isnan(holder["score"]):
        return True, f"the champion (version {holder['version']}) has no valid score"
    if score >= holder["score"]:
        return True, f"{score:.4f} >= {holder['score']:.4f} of version {holder['version']} on the same test data"
    return False, f"{score:.4f} < {holder['score']:.4f} of version {holder['version']} on the same test data"


def register(bundle: Path, evaluation: dict, model_name: str, alias: str, *, promote: bool = False) -> dict:
    """Log + register the pyfunc; move `alias` if it scores at least as well as the current holder on the same
    test data (`alias_decision`), or if `promote`."""
    import mlflow
    from mlflow import MlflowClient

    from camid import tracking
    from camid.serving.model import signature

    spec = json.loads((bundle / "ensemble.json").read_text())
    candidate = {"score": _float(evaluation.get("weighted_accuracy")), "test_data": evaluation.get("test_data"),
                 "labels": ",".join(spec["labels"])}
    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    holder = champion(client, model_name, alias)  # read before anything is written: a store error stops here
    with tracking.run("register", tags={"stage": "register", "members": ",".join(m["arch"] for m in spec["members"])}) as active:
        mlflow.log_metrics({k: v for k, v in evaluation.items() if isinstance(v, float)})
        mlflow.log_dict(evaluation, "evaluation.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PACKAGE_DIR / "serving" / "model_code.py"),
            artifacts={"bundle": str(bundle)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(spec["labels"]),
            pip_requirements=pinned_requirements(),
            registered_model_name=model_name,
        )
        run_id = active.info.run_id
    version = str(info.registered_model_version)
    tags = {SCORE_TAG: str(candidate["score"]), TEST_DATA_TAG: str(candidate["test_data"]),
            LABELS_TAG: candidate["labels"], "members": ",".join(m["arch"] for m in spec["members"])}
    for key, value in tags.items():
        if value != "None":  # no test data fingerprint: nothing to compare with later
            client.set_model_version_tag(model_name, version, key, value)
    moved, why = alias_decision(candidate, holder)
    if promote and not moved:
        moved, why = True, f"--promote ({why})"
    if moved:
        client.set_registered_model_alias(model_name, alias, version)
    score = candidate["score"]
    result = {
        "model_name": model_name, "version": version, "run_id": run_id, "model_uri": f"models:/{model_name}/{version}",
        "alias": alias, "alias_uri": f"models:/{model_name}@{alias}", "weighted_accuracy": score,
        "test_data": candidate["test_data"], "champion_version": version if moved else holder["version"],
        "champion_moved": moved, "alias_reason": why,
        "previous_champion": holder and holder["version"], "previous_champion_score": holder and holder["score"],
        "tracking_uri": tracking.tracking_uri(),
    }
    log.info("registered %s version %s (test weighted accuracy %s); %s %s: %s", model_name, version, score, alias,
             f"-> version {version}" if moved else f"stays on version {holder['version']}", why)
    return result


def summary_text(record_file: Path = Path("registry/registered.json"),
                 metrics_file: Path = Path("metrics/evaluate.json")) -> str:
    if not record_file.is_file():
        raise CamidError(f"{record_file} not found: nothing has been registered yet (run `make run` or `dvc repro`)")
    record = json.loads(record_file.read_text())
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    lines = [
        "",
        f"camid: model {record['model_name']} version {record['version']} registered in {record['tracking_uri']}",
        f"  weighted accuracy on the test devices (never seen in training): {record['weighted_accuracy']:.4f}"
        + (f" (unaltered {metrics['accuracy_unaltered']:.4f}, manipulated {metrics['accuracy_manipulated']:.4f}, "
           f"chance {metrics['chance']:.3f})" if metrics else ""),
        f"  {record['alias_uri']} -> version {record['champion_version']} ({record.get('alias_reason', '')})",
        f"  metrics: {metrics_file}, plots/confusion.png, models/train/*/training_curves.png; `dvc metrics show`",
        f"  serve:   mlflow models serve -m {record['alias_uri']} --env-manager local -p 5001",
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=Path("models/ensemble"),
                        help="an ensemble bundle (the evaluate stage's output)")
    parser.add_argument("--runs", nargs="*", metavar="RUN_ID", type=optional(str),
                        help="build the bundle from these `camid train` MLflow runs instead (any mix of backbones)")
    parser.add_argument("--evaluation", type=Path,
                        help="the evaluate stage's metrics for this bundle (default: score it now on --cache)")
    parser.add_argument("--cache", type=Path, default=Path("data/cache"), help="crop cache to score on")
    parser.add_argument("--out", type=Path, default=Path("registry/registered.json"), help="record of what was registered")
    parser.add_argument("--summary", action="store_true", help="only print what is registered and where the metrics are")
    parser.add_argument("--promote", action="store_true",
                        help="move the alias to this version even if its score cannot be compared with the champion's")


def run(args: argparse.Namespace) -> int:
    if args.summary:
        print(summary_text(args.out))
        return 0
    params = load_params()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", params.register.model_name):
        raise CamidError(f"register.model_name {params.register.model_name!r} must be letters, digits, '.', '_' or '-'")
    bundle = args.bundle
    args.runs = [run_id for r in (args.runs or []) if r for run_id in re.split(r"[,\s]+", r) if run_id]
    if args.runs:
        bundle = bundle_from_runs(args.runs, Path("models/ensemble-runs"))
    if not (bundle / "ensemble.json").is_file():
        raise CamidError(f"{bundle} is not an ensemble bundle: run the evaluate stage first, or pass --runs RUN_ID ...")
    if args.evaluation and not args.runs:
        if not args.evaluation.is_file():
            raise CamidError(f"--evaluation {args.evaluation} not found: run the evaluate stage first")
        evaluation = json.loads(args.evaluation.read_text())
    else:
        from camid.inference.scoring import score
        from camid.inference.ensemble import Ensemble

        evaluation, _, _ = score(Ensemble.load(bundle), args.cache, params.evaluate)
    record = register(bundle, evaluation, params.register.model_name, params.register.alias, promote=args.promote)
    write_json(args.out, record)
    print(summary_text(args.out))
    return 0
