"""MLflow glue: stage runs under `mlflow run` (joined, or children of `-e main`), and the data version."""
from __future__ import annotations

import mlflow
import pytest

from camid import tracking


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


def test_data_version_is_the_dvc_hash_or_a_hash_of_the_index_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "data" / "cache"
    cache.mkdir(parents=True)
    (cache / "meta.json").write_text("{}")
    local = tracking.data_version("data/cache")
    assert local.startswith("local-")
    (cache / "meta.json").write_text('{"patch": 64}')
    assert tracking.data_version("data/cache") != local
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: data/cache\n"
                                       "      md5: 0123456789abcdef.dir\n")
    assert tracking.data_version("data/cache") == "0123456789abcdef.dir"
