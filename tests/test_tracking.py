"""MLflow glue: stage runs under `mlflow run` (joined, or children of `-e main`), and the data version."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from camid import tracking
from camid.errors import CamidError


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment("camid-tracking-test").experiment_id
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    monkeypatch.setattr(tracking, "_CHOSEN_EXPERIMENT_ID", experiment)
    parent = mlflow.MlflowClient().create_run(experiment, run_name="main").info.run_id  # what `mlflow run` makes
    monkeypatch.setenv("MLFLOW_RUN_ID", parent)
    return mlflow.MlflowClient(), parent


def test_a_stage_under_mlflow_run_joins_its_run(store, monkeypatch):
    client, parent = store
    monkeypatch.delenv(tracking.STAGE_RUNS, raising=False)
    with tracking.run("train-smallcnn", tags={"stage": "train"}) as active:
        assert active.info.run_id == parent
    assert client.get_run(parent).data.tags["stage"] == "train"


def test_stages_under_mlflow_run_main_get_child_runs_of_their_own(store, monkeypatch):
    client, parent = store
    monkeypatch.setenv(tracking.STAGE_RUNS, "nested")
    children = []
    for stage in ("train", "evaluate"):
        with tracking.run(stage, tags={"stage": stage}) as active:
            mlflow.log_metric("score", 1.0)
            children.append(active.info.run_id)
        assert tracking.os.environ["MLFLOW_RUN_ID"] == parent  # restored for the next stage
    assert parent not in children and len(set(children)) == 2
    for child, stage in zip(children, ("train", "evaluate")):
        run = client.get_run(child)
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["stage"] == stage
        assert run.info.status == "FINISHED"
    assert client.get_run(parent).info.status == "RUNNING"  # the main run is left to `mlflow run` to end
    assert "score" not in client.get_run(parent).data.metrics


def test_data_version_is_the_hash_dvc_gives_the_data_on_disk_and_changes_with_it(tmp_path, monkeypatch):
    """The real `dvc add` hashes the folder; data_version must give the same hash, and a different one as soon
    as a file is changed behind DVC's back (a stale dvc.lock is not the data that was read)."""
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "data" / "cache"
    (cache / "train").mkdir(parents=True)
    (cache / "meta.json").write_text('{"patch": 64}\n')
    (cache / "train" / "shard-000.npy").write_bytes(bytes(range(256)) * 40)
    (cache / "index.csv").write_text("a,b\r\n1,2\r\n")  # CRLF: DVC 3 hashes bytes as they are
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    for cmd in ([dvc, "init", "--no-scm", "-q"], [dvc, "add", "-q", "data/cache"]):
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    locked = yaml.safe_load((tmp_path / "data" / "cache.dvc").read_text())["outs"][0]["md5"]
    assert tracking.data_version("data/cache") == locked
    (cache / "meta.json").write_text('{"patch": 32}\n')
    assert tracking.data_version("data/cache") != locked
    assert tracking.data_version("data/cache/index.csv") == hashlib.md5(b"a,b\r\n1,2\r\n").hexdigest()
    with pytest.raises(CamidError, match="no data at"):
        tracking.data_version("data/missing")


