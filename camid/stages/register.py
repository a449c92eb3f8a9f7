"""The register stage: log the ensemble as an MLflow pyfunc model, register it, and move the champion alias.

The model is logged from code (`camid/serving/model_code.py`) with the camid package shipped in `code_paths`, the
ensemble bundle as its artifact, and the evaluation on the held-out split as its metrics. Its requirements.txt
names the distributions the serving code imports (`serving_requirements`), so an environment built from it alone
loads the model. The alias (`champion` by default) moves to the new version only if it scores at least as well
as the current one. `--runs` scores `camid train` runs on the local test split, and only runs that provably
never trained on it (`check_runs_unseen`).
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
from camid.core.fileio import TRACKING_FILE, write_json

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the camid package, shipped whole in code_paths
SCORE_TAG = "weighted_accuracy"
TEST_DATA_TAG = "test_data"   # fingerprint of the test photos and labels the score was measured on
LABELS_TAG = "labels"
# The fingerprint of the train split a `camid train` run learnt from (the test_data hash, on split "train"), and
# the hash of the whole crop cache it read (tracking.data_version): what `--runs` checks before scoring a run.
TRAIN_DATA_TAG = "train_data"
DATA_VERSION_TAG = "data_version"

# What the served model runs: the pyfunc file MLflow executes, the model class, camid's custom Keras layers (the
# members deserialise them) and the ensemble with whatever its loading imports. Its requirements.txt is derived
# from the imports of these modules' closure (camid.core.imports), not written by hand.
SERVING_MODULES = ("camid.serving.model_code", "camid.serving.model", "camid.models", "camid.inference.ensemble")
ALWAYS_SERVED = ("mlflow", "uvicorn")  # the scoring server (`mlflow models serve` runs uvicorn), imported by nobody
KERAS_BACKENDS = ("tensorflow", "jax", "torch", "openvino")  # camid imports each only under its own backend
LOCK_FILE = PACKAGE_DIR.parent / "requirements.lock"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock_file: Path = LOCK_FILE) -> dict[str, str]:
    """requirements.lock's `name==version` pins by canonical name (empty where there is no lock file: an install
    from a wheel)."""
    if not lock_file.is_file():
        return {}
    pins = {}
    for line in lock_file.read_text().splitlines():
        name, sep, version = line.split("#")[0].split(";")[0].strip().partition("==")
        if sep:
            pins[_canonical(name.strip())] = version.strip()
    return pins


def keras_backend() -> str:
    """The Keras backend in use, without importing Keras when it has not been imported: KERAS_BACKEND, else
    keras.json, else Keras's default."""
    import os
    import sys

    if "keras" in sys.modules:
        return sys.modules["keras"].config.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    try:
        return json.loads((home / "keras.json").read_text()).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def serving_distributions(modules: tuple[str, ...] = SERVING_MODULES) -> set[str]:
    """The distributions the serving path imports (the closure of `modules`, imports inside functions included,
    mapped to distributions with importlib.metadata), the Keras backend in use, and the scoring server."""
    from camid.core.imports import closure_imports, distributions_of

    backend = keras_backend()
    dists, unprovided = set(ALWAYS_SERVED), {}
    for module, files in sorted(closure_imports(*modules).items()):
        top = module.split(".")[0]
        if top in KERAS_BACKENDS and top != backend:
            continue  # imported only under another Keras backend (camid.models.devices)
        found = distributions_of(module)
        if found:
            dists |= set(found)
        else:
            unprovided[module] = sorted(str(f.relative_to(PACKAGE_DIR.parent)) for f in files)
    if unprovided:
        raise CamidError("the serving code imports modules that no installed distribution provides, so the served "
                         "model's requirements cannot name them: "
                         + "; ".join(f"{m} (in {', '.join(f)})" for m, f in unprovided.items())
                         + ". Install them (pip install ...) and register again, or remove the imports")
    if "keras" in dists:
        dists |= set(distributions_of(backend))  # Keras imports its backend by name at run time
    return dists


def serving_requirements(modules: tuple[str, ...] = SERVING_MODULES, lock_file: Path = LOCK_FILE) -> list[str]:
    """The served model's requirements.txt: each distribution of `serving_distributions` pinned to the version
    installed here (the one the model was built and tested with; `make install` installs requirements.lock's),
    else to requirements.lock's."""
    from importlib.metadata import PackageNotFoundError, version

    locked = locked_versions(lock_file)
    reqs = []
    for name in sorted(serving_distributions(modules), key=_canonical):
        try:
            pin = version(name)
        except PackageNotFoundError:
            pin = locked.get(_canonical(name))
        if pin and locked.get(_canonical(name), pin) != pin:
            log.warning("%s %s is installed but %s pins %s: the served model pins the installed one", name, pin,
                        lock_file.name, locked[_canonical(name)])
        reqs.append(f"{name}=={pin}" if pin else name)
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
            write_json(target / TRACKING_FILE, {"run_id": run_id})
            dirs.append(target)
        return Ensemble.write_bundle(dirs, out)


def check_runs_unseen(run_ids: list[str], cache: Path, client=None) -> None:
    """Refuse to score a `camid train` run on the test split of `cache` unless it provably never learnt from
    those photos: its training data must be the train split of this very cache (which `camid split` keeps
    device-disjoint from its test split). The proof is the run's `train_data` tag (the fingerprint of the train
    split it read) equal to this cache's, or, for a run without it, its `data_version` tag equal to the hash of
    this cache as it is on disk. A run with neither, or trained on other data, is refused: its score on these
    photos could be inflated by photos it was trained on."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from camid import tracking
    from camid.data.cache import read_index, read_meta, split_fingerprint

    labels = read_meta(cache)["labels"]
    train, test = (set(read_index(cache, split)["path"]) for split in ("train", "test"))
    shared = sorted(train & test)
    if shared:
        raise CamidError(f"the crop cache {cache} has {len(shared)} photo(s) in both its train and test splits "
                         f"(e.g. {shared[0]}): its test figures would be inflated. Re-run the split and prepare "
                         "stages (dvc repro prepare)")
    ours = split_fingerprint(cache, "train", labels)
    client = client or MlflowClient(tracking_uri=tracking.tracking_uri())
    whole_cache = None  # hashed only if a run needs it (it reads every shard)
    retrain = f"retrain it on this cache (`camid train --arch ARCH --cache {cache}`) and pass the new run id"
    for run_id in run_ids:
        try:
            tags = client.get_run(run_id).data.tags
        except MlflowException as exc:
            raise CamidError(f"cannot read MLflow run {run_id} from the tracking store {_store_uri()}: {exc}. Pass the "
                             "run id of a `camid train` run from this store (or set MLFLOW_TRACKING_URI)") from None
        recorded = tags.get(TRAIN_DATA_TAG)
        if recorded is not None:
            if recorded != ours:
                raise CamidError(
                    f"MLflow run {run_id} was trained on other photos than the train split of {cache} (training "
                    f"data fingerprint {recorded}, this cache's {ours}): they may include the test photos it would "
                    f"be scored on, and its score would be inflated. Pass --cache with the crop cache it was "
                    f"trained on, or {retrain}")
            continue
        if tags.get(DATA_VERSION_TAG) is not None:
            whole_cache = whole_cache or tracking.data_version(cache)
            if tags[DATA_VERSION_TAG] == whole_cache:
                continue  # trained on this very cache, so on its train split only
            raise CamidError(
                f"MLflow run {run_id} was trained on another crop cache than {cache} (data version "
                f"{tags[DATA_VERSION_TAG]}, this cache's {whole_cache}) and records no fingerprint of its training "
                f"photos (tag {TRAIN_DATA_TAG!r}), so it may have learnt from the test photos it would be scored on. "
                f"Pass --cache with the crop cache it was trained on, or {retrain}")
        raise CamidError(
            f"MLflow run {run_id} records neither the fingerprint of its training photos (tag {TRAIN_DATA_TAG!r}) "
            f"nor the crop cache it read (tag {DATA_VERSION_TAG!r}); it was not made by `camid train`, so register "
            f"cannot tell whether it learnt from the test photos of {cache}. Pass the run id of a `camid train` "
            f"run, or {retrain}")


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
            pip_requirements=serving_requirements(),
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
    previous = holder["version"] if holder else None
    # No champion yet and a candidate without a valid score: the alias stays unset (None), it is not an error.
    champion_version = version if moved else previous
    result = {
        "model_name": model_name, "version": version, "run_id": run_id, "model_uri": f"models:/{model_name}/{version}",
        "alias": alias, "alias_uri": f"models:/{model_name}@{alias}", "weighted_accuracy": score,
        "test_data": candidate["test_data"], "champion_version": champion_version,
        "champion_moved": moved, "alias_reason": why,
        "previous_champion": previous, "previous_champion_score": holder["score"] if holder else None,
        "tracking_uri": tracking.tracking_uri(),
    }
    log.info("registered %s version %s (test weighted accuracy %s); %s %s: %s", model_name, version, score, alias,
             f"-> version {version}" if moved else
             f"stays on version {previous}" if previous else "is held by no version", why)
    return result


def summary_text(record_file: Path = Path("registry/registered.json"),
                 metrics_file: Path = Path("metrics/evaluate.json")) -> str:
    if not record_file.is_file():
        raise CamidError(f"{record_file} not found: nothing has been registered yet (run `make run` or `dvc repro`)")
    record = json.loads(record_file.read_text())
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    score, held = record["weighted_accuracy"], record["champion_version"]
    lines = [
        "",
        f"camid: model {record['model_name']} version {record['version']} registered in {record['tracking_uri']}",
        "  weighted accuracy on the test devices (never seen in training): "
        + (f"{score:.4f}" if isinstance(score, (int, float)) else "none (no valid test score)")
        + (f" (unaltered {metrics['accuracy_unaltered']:.4f}, manipulated {metrics['accuracy_manipulated']:.4f}, "
           f"chance {metrics['chance']:.3f})" if metrics else ""),
        f"  {record['alias_uri']} -> " + (f"version {held}" if held else "no version")
        + f" ({record.get('alias_reason', '')})",
        f"  metrics: {metrics_file}, plots/confusion.png, models/train/*/training_curves.png; `dvc metrics show`",
        f"  serve:   mlflow models serve -m {record['alias_uri'] if held else record['model_uri']} --env-manager local "
        "-p 5001",
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
        check_runs_unseen(args.runs, args.cache)  # before anything is fetched or scored
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
    # The MLflow run id differs on every run with the same result: it goes beside the record, which stays a DVC
    # output (a fresh clone's first `dvc repro` must run this stage) that identical runs write identically.
    write_json(args.out.with_name(TRACKING_FILE), {"run_id": record["run_id"]})
    write_json(args.out, {k: v for k, v in record.items() if k != "run_id"})
    print(summary_text(args.out))
    return 0
