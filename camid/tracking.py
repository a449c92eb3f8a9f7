"""MLflow glue shared by the stages: where runs go, what every run is tagged with, and plots as images."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = "camid"
STAGE_RUNS = "CAMID_STAGE_RUNS"  # "nested": each stage its own child run of MLFLOW_RUN_ID (mlflow run -e main)
# What the user (or `mlflow run`) chose, read before MLflow's own set_experiment writes these variables.
_CHOSEN_EXPERIMENT_ID = os.environ.get("MLFLOW_EXPERIMENT_ID")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _file_md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def data_version(path: str | os.PathLike) -> str:
    """The hash of the data at `path` as it is on disk now, computed the way DVC 3 hashes an output: a file's md5,
    or for a folder the md5 of the sorted JSON list of its files' {md5, relpath}, plus ".dir". So it equals the
    hash in dvc.lock when the folder is what DVC locked, and differs when the files were changed since; a run
    tagged with it names the data it actually read, not what a lock file says should be there."""
    path = Path(path)
    if path.is_file():
        return _file_md5(path)
    if not path.is_dir():
        from camid.errors import CamidError

        raise CamidError(f"no data at {path}: nothing to hash; run the stage that makes it (dvc repro)")
    entries = sorted(({"md5": _file_md5(f), "relpath": f.relative_to(path).as_posix()}
                      for f in path.rglob("*") if f.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


@contextlib.contextmanager
def run(run_name: str, tags: dict | None = None, nested: bool = False) -> Iterator["mlflow.ActiveRun"]:
    """Start a tracked run in the camid experiment, tagged with the git commit.

    Under `mlflow run . -e <stage>` the stage joins the run MLflow made for it (MLFLOW_RUN_ID). Under
    `mlflow run . -e main`, which runs `dvc repro` with CAMID_STAGE_RUNS=nested, every stage gets a run of its
    own, a child of the main one, instead of all of them writing into one run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    parent = os.environ.get("MLFLOW_RUN_ID") if os.environ.get(STAGE_RUNS) == "nested" else None
    if parent:
        tags = {**(tags or {}), "mlflow.parentRunId": parent}
        os.environ.pop("MLFLOW_RUN_ID")  # otherwise start_run would resume the parent
    elif not os.environ.get("MLFLOW_RUN_ID") and not _CHOSEN_EXPERIMENT_ID and not nested:
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
    try:
        with mlflow.start_run(run_name=run_name, nested=nested) as active:
            mlflow.set_tags({"git_commit": git_commit(), **(tags or {})})
            yield active
    finally:
        if parent:
            os.environ["MLFLOW_RUN_ID"] = parent


def log_figure(fig, artifact_file: str, local_path: str | os.PathLike | None = None) -> None:
    """Log a matplotlib figure to the active MLflow run and, optionally, save it for DVC too."""
    import matplotlib.pyplot as plt
    import mlflow

    if local_path is not None:
        from camid.core.fileio import atomic_path

        with atomic_path(local_path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    if mlflow.active_run() is not None:
        mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_params(params: dict) -> None:
    """Log params to the active run. Under `mlflow run`, the entry point's own parameters are already logged
    (an unset one as ''); MLflow forbids changing a logged value, so a resolved value that differs is logged
    beside it as `<key>_resolved`."""
    import mlflow

    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.params if run else {}
    fresh = {}
    for key, value in params.items():
        if key not in logged:
            fresh[key] = value
        elif logged[key] != str(value):
            fresh[f"{key}_resolved"] = value
    if fresh:
        mlflow.log_params(fresh)
