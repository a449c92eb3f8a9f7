"""The train stage for real on a tiny virtual zoo: MLflow tracking, resume after a SIGKILL, the `train:` overrides
and their errors, and every registry backbone (in process, one step; mobilenet also through `mlflow run`)."""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from camid.cli import build_parser
from camid.cli import main as camid_main
from camid.config import Catalog, TrainParams
from camid.errors import CamidError
from camid.models import get_backbone, list_backbones
from camid.stages.train import resolve_train_params, train
from tests.conftest import ROOT
from tests.helpers_data import (CACHE_PATCH, PATCH, subprocess_env, tiny_train, tracking_env, use_tracking,
                                write_params)

EPOCH_METRICS = ("loss", "camera_accuracy", "val_weighted_accuracy", "learning_rate")
# The backbones whose one-step run stays near 10 s on 2 CPU cores; the others take 25 s (mobilenet) to over 3 min
# (densenet201), mostly tracing their graphs, and run with `pytest -m slow`.
FAST_BACKBONES = {"smallcnn", "vgg16"}


def only_run(experiment: str = "camid") -> mlflow.entities.Run:
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def artifact_paths(client, run_id: str, folder: str | None = None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, folder):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def test_training_run_is_tracked_in_mlflow(zoo, params, tmp_path, monkeypatch):
    use_tracking(monkeypatch, tmp_path)
    settings = tiny_train(params.train, epochs=2)
    out = tmp_path / "models" / "smallcnn"
    summary = train("smallcnn", zoo.cache, out, settings, params.catalog.labels, params.catalog)

    client = mlflow.MlflowClient()
    run = only_run()
    assert run.info.status == "FINISHED" and run.info.run_id == summary["run_id"]
    assert run.info.artifact_uri.startswith(tmp_path.as_uri())
    logged = run.data.params
    # every train setting by its params.yaml key (bare names are `mlflow run`'s, see test_mlflow_run_trains_mobilenet)
    assert {f"train.{f.name}" for f in dataclasses.fields(TrainParams) if f.name != "archs"} <= set(logged)
    assert {"arch", "cache_patch", "num_classes", "train_crops", "val_images"} <= set(logged)
    assert logged["arch"] == "smallcnn" and logged["cache_patch"] == str(CACHE_PATCH)
    assert logged["train.patch"] == str(PATCH) and float(logged["train.learning_rate"]) == settings.learning_rate
    assert logged["train.dense"] == "(16,)" and logged["train.epochs"] == "2"
    for metric in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert steps == [0, 1], (metric, steps)
    assert run.data.metrics["best_weighted_accuracy"] == pytest.approx(summary["weighted_accuracy"])
    assert summary["weighted_accuracy"] == pytest.approx(0.7 * summary["accuracy_unaltered"]
                                                         + 0.3 * summary["accuracy_manipulated"])
    assert run.data.tags["git_commit"] not in ("", "unknown")
    assert run.data.tags["data_version"]
    assert {"confusion_matrix.png", "training_curves.png", "model/model.keras", "summary.json"} <= \
        artifact_paths(client, run.info.run_id)

    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.png", "history.csv", "model.keras", "run.json",
                                                     "training_curves.png"]
    assert json.loads((out / "run.json").read_text())["run_id"] == summary["run_id"]
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [0, 1]
    assert [p.name for p in out.parent.iterdir()] == ["smallcnn"], "temporary folders left beside the output"
    assert list((tmp_path / "ckpt").iterdir()) == [], "the work folder outlived a finished run"


def backup_epochs(checkpoints: Path) -> int:
    """Epochs BackupAndRestore has backed up under any work folder (0 while none)."""
    for meta in checkpoints.glob("*/backup/training_metadata.json"):
        try:
            return json.loads(meta.read_text())["epoch"]
        except (OSError, ValueError, KeyError):
            return 0  # being written
    return 0


def test_training_resumes_after_sigkill(zoo, tmp_path):
    epochs = 3
    env = subprocess_env({"CAMID_PARAMS": str(write_params(tmp_path / "params.yaml", epochs=epochs)),
                          **tracking_env(tmp_path)})
    out = tmp_path / "models" / "smallcnn"
    command = [sys.executable, "-m", "camid", "train", "--arch", "smallcnn", "--cache", str(zoo.cache), "--out", str(out)]
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        # However fast or slow the machine: wait (no deadline; training ends by itself) for the first backup,
        # freeze the process at once, then kill it. Epochs after the first can land before the freeze; `done`
        # is read afterwards, so the test holds whichever epoch it was stopped in.
        while backup_epochs(tmp_path / "ckpt") < 1:
            assert first.poll() is None, f"training ended before it was interrupted:\n{log.read_text()[-3000:]}"
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = backup_epochs(tmp_path / "ckpt")
    assert 1 <= done < epochs
    # A kill between CSVLogger's row and the backup of the same epoch leaves a row for an epoch that runs again.
    (history_file,) = (tmp_path / "ckpt").glob("*/history.csv")
    rows = pd.read_csv(history_file)
    if len(rows) == done:
        pd.concat([rows, rows.tail(1).assign(epoch=done)]).to_csv(history_file, index=False)
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])

    second = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stdout[-5000:]
    assert "resuming" in second.stdout
    trained = [line for line in second.stdout.splitlines() if line.startswith("Epoch ")]
    assert trained[0] == f"Epoch {done + 1}/{epochs}" and len(trained) == epochs - done, trained

    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == list(range(epochs))
    assert json.loads((out / "run.json").read_text())["patch"] == PATCH
    assert [p.name for p in out.parent.iterdir()] == ["smallcnn"]
    assert list((tmp_path / "ckpt").iterdir()) == []

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("camid").experiment_id
    finished = client.search_runs([experiment], "attributes.status = 'FINISHED'")
    assert len(finished) == 1
    for metric in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(finished[0].info.run_id, metric)]
        assert sorted(steps) == list(range(epochs)), (metric, steps)
    interrupted = [r for r in client.search_runs([experiment]) if r.info.run_id != finished[0].info.run_id]
    assert [r.info.status for r in interrupted] == ["KILLED"]


def parse(*argv: str):
    return build_parser("train").parse_args(["train", "--arch", "smallcnn", *argv])


def test_params_file_then_flags_override_the_train_block(params, tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text("# best of 2 random trials for smallcnn: val_weighted_accuracy 0.5000\n"
                    "train:\n  dense: [64]\n  dropout: [0.2]\n  learning_rate: 0.0003\n"
                    "  manipulation_prob: 0.4\n  patch: 48\n")
    settings = resolve_train_params(parse("--params-file", str(best)), params.train)
    assert (settings.dense, settings.dropout, settings.learning_rate, settings.manipulation_prob, settings.patch) == \
        ((64,), (0.2,), 0.0003, 0.4, 48)
    assert settings.epochs == params.train.epochs

    # MLproject passes every parameter, '' when unset: '' keeps the value below it.
    unset = ("--out", "", "--weights", "", "--epochs", "", "--steps-per-epoch", "", "--batch-size", "",
             "--learning-rate", "", "--dropout", "", "--dense", "", "--manipulation-prob", "")
    assert resolve_train_params(parse(*unset, "--params-file", ""), params.train) == params.train
    assert resolve_train_params(parse(*unset, "--params-file", str(best)), params.train) == settings

    flags = resolve_train_params(parse("--params-file", str(best), "--learning-rate", "0.01", "--dense", "32,16",
                                       "--dropout", "0.1 0.05", "--epochs", "3"), params.train)
    assert (flags.learning_rate, flags.dense, flags.dropout, flags.epochs, flags.patch) == \
        (0.01, (32, 16), (0.1, 0.05), 3, 48)

    with pytest.raises(CamidError, match="not found"):
        resolve_train_params(parse("--params-file", str(tmp_path / "missing.yaml")), params.train)
    best.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(CamidError, match="learning_rat"):
        resolve_train_params(parse("--params-file", str(best)), params.train)


def test_cache_for_another_patch_or_other_cameras_is_refused(zoo, params, tmp_path, monkeypatch, capsys):
    use_tracking(monkeypatch, tmp_path)
    monkeypatch.setenv("CAMID_PARAMS", str(write_params(tmp_path / "params.yaml")))
    code = camid_main(["train", "--arch", "smallcnn", "--cache", str(zoo.cache), "--out", str(tmp_path / "out"),
                       "--patch", str(CACHE_PATCH + 4)])
    assert code == 2
    error = capsys.readouterr().err
    assert f"patch {CACHE_PATCH}" in error and "re-run the prepare stage" in error

    other = Catalog("other", params.catalog.cameras[::-1])
    with pytest.raises(CamidError, match="was made for cameras"):
        train("smallcnn", zoo.cache, tmp_path / "out", tiny_train(params.train), other.labels, other)
    assert not (tmp_path / "out").exists()


def test_mlflow_run_trains_mobilenet(zoo, tmp_path):
    env = subprocess_env({"CAMID_PARAMS": str(write_params(tmp_path / "params.yaml")),
                          **tracking_env(tmp_path, "camid-mobilenet")})
    out = tmp_path / "mobilenet"
    command = ["mlflow", "run", str(ROOT), "-e", "train", "-P", "arch=mobilenet", "-P", f"cache={zoo.cache}",
               "-P", f"out={out}", "-P", "epochs=1", "-P", "steps_per_epoch=1", "-P", "batch_size=2",
               "--env-manager", "local", "--experiment-name", "camid-mobilenet"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    run = only_run("camid-mobilenet")
    assert run.info.status == "FINISHED" and run.data.params["arch"] == "mobilenet"
    # `mlflow run` logs what it was given ('' when unset); train logs what it used.
    assert run.data.params["epochs"] == "1" and run.data.params["learning_rate"] == "''"
    assert run.data.params["train.epochs"] == "1" and float(run.data.params["train.learning_rate"]) == 0.001
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert "val_weighted_accuracy" in run.data.metrics and run.data.tags["git_commit"]
    assert (out / "model.keras").is_file()


def backbone_patch(arch: str) -> int:
    return max(-(-get_backbone(arch).min_size // 2) * 2, PATCH)


@pytest.mark.parametrize("arch", [a if a in FAST_BACKBONES else pytest.param(a, marks=pytest.mark.slow)
                                  for a in list_backbones()])
def test_every_backbone_trains_one_step(arch, zoo, params, tmp_path, monkeypatch):
    use_tracking(monkeypatch, tmp_path)
    patch = backbone_patch(arch)
    assert patch <= CACHE_PATCH, "the shared cache is too small for this backbone: raise CACHE_PATCH"
    settings = tiny_train(params.train, patch=patch, epochs=1, steps_per_epoch=1, batch_size=2)
    summary = train(arch, zoo.cache, tmp_path / arch, settings, params.catalog.labels, params.catalog)
    assert summary["arch"] == arch and summary["patch"] == patch
    assert summary["weighted_accuracy"] == pytest.approx(0.7 * summary["accuracy_unaltered"]
                                                         + 0.3 * summary["accuracy_manipulated"])
    assert (tmp_path / arch / "model.keras").is_file()
    run = only_run()
    assert run.data.params["arch"] == arch and "val_weighted_accuracy" in run.data.metrics
