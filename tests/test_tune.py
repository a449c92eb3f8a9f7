"""The tune stage for real on a tiny virtual zoo: one parent MLflow run with a nested run per keras-tuner trial,
the best values as a `train:` params file that `camid train --params-file` accepts, `--apply` on the params file
named by CAMID_PARAMS, and every search algorithm."""
from __future__ import annotations

import hashlib
import json
import subprocess

import mlflow
import pytest
import yaml

from camid.cli import main as camid_main
from camid.config import TuneParams, load_params
from camid.stages.tune import ALGORITHMS, trial_score, tune
from tests.conftest import ROOT
from tests.helpers_data import subprocess_env, tiny_train, tracking_env, use_tracking, write_params

HYPERPARAMETERS = {"patch", "dense", "dropout", "learning_rate", "manipulation_prob"}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_trials_are_nested_runs_and_the_best_values_train(zoo, tmp_path, monkeypatch, capsys):
    use_tracking(monkeypatch, tmp_path)
    params_file = write_params(tmp_path / "params.yaml")
    monkeypatch.setenv("CAMID_PARAMS", str(params_file))
    project_params = digest(ROOT / "params.yaml")
    best_file = tmp_path / "tuning" / "best.yaml"

    code = camid_main(["tune", "--arch", "smallcnn", "--cache", str(zoo.cache), "--max-trials", "2",
                       "--algorithm", "random", "--epochs", "1", "--steps-per-epoch", "2", "--out", str(best_file),
                       "--apply"])
    assert code == 0, capsys.readouterr().err[-3000:]

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("camid").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 3, [r.info.run_name for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["stage"] == "tune-trial"
        assert HYPERPARAMETERS <= set(child.data.params)
        history = client.get_metric_history(child.info.run_id, "val_weighted_accuracy")
        assert [m.step for m in history] == [0]
        assert {"best_val_weighted_accuracy", "kept_val_weighted_accuracy", "kept_epoch"} <= set(child.data.metrics)
        assert child.data.tags["checkpoint"] == "within_noise"
    assert parent.info.status == "FINISHED" and parent.data.tags["stage"] == "tune"
    assert {f"best_{name}" for name in HYPERPARAMETERS} <= set(parent.data.params)
    assert parent.data.params["tune.algorithm"] == "random" and parent.data.params["tune.max_trials"] == "2"
    best_score = parent.data.metrics["best_val_weighted_accuracy"]
    assert best_score == max(c.data.metrics["kept_val_weighted_accuracy"] for c in children)
    assert "best.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    text = best_file.read_text()
    assert text.startswith("# best of 2 random trials for smallcnn")
    best = yaml.safe_load(text)["train"]
    assert set(best) == HYPERPARAMETERS
    assert str(best["patch"]) == parent.data.params["best_patch"]
    assert (tmp_path / "tuning" / "smallcnn-random").is_dir(), "keras-tuner's trials belong beside the best values"

    # --apply rewrote the params file CAMID_PARAMS names, and only that one.
    applied = load_params(params_file).train
    assert (applied.patch, applied.dense, applied.dropout, applied.learning_rate, applied.manipulation_prob) == \
        (best["patch"], tuple(best["dense"]), tuple(best["dropout"]), best["learning_rate"], best["manipulation_prob"])
    assert digest(ROOT / "params.yaml") == project_params

    # The best values are a params file `camid train` takes (on the original settings, so the file is what counts).
    write_params(params_file)
    out = tmp_path / "trained"
    code = camid_main(["train", "--arch", "smallcnn", "--cache", str(zoo.cache), "--out", str(out),
                       "--params-file", str(best_file), "--steps-per-epoch", "1"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert json.loads((out / "run.json").read_text())["patch"] == best["patch"]
    trained = client.get_run(json.loads((out / "tracking.json").read_text())["run_id"]).data.params
    assert trained["train.dense"] == str(tuple(best["dense"])) and float(trained["train.learning_rate"]) == \
        best["learning_rate"]


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "random"])
def test_every_algorithm_runs_a_trial(algorithm, zoo, params, tmp_path, monkeypatch):
    use_tracking(monkeypatch, tmp_path)
    base = tiny_train(params.train, steps_per_epoch=1)
    result = tune("smallcnn", zoo.cache, TuneParams(algorithm=algorithm, max_trials=1, epochs=1), base,
                  params.catalog, tmp_path / "best.yaml", directory=tmp_path)
    assert result["trials"] == 1
    trials = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'tune-trial'")
    assert len(trials) == 1  # the score is the one trial's own val score, as its nested run logged it
    assert result["score"] == pytest.approx(trials["metrics.kept_val_weighted_accuracy"].iloc[0])
    assert set(yaml.safe_load((tmp_path / "best.yaml").read_text())["train"]) == HYPERPARAMETERS


def test_a_trial_scores_the_epoch_the_train_stage_would_keep():
    """keras-tuner scores a History by its best epoch; camid's trials by the epoch train.checkpoint keeps."""
    import keras

    history = keras.callbacks.History()
    history.epoch, history.history = [3, 4, 5], {"val_weighted_accuracy": [0.9, 0.5, 0.88]}
    # 10 photos: the band below 0.9 is sqrt(0.9 * 0.1 / 10) = 0.095, and 0.88 is in it; Hyperband's epochs count on.
    assert trial_score(history, 10, "within_noise") == (0.88, 5)
    assert trial_score(history, 10, "best") == (0.9, 3)
    assert trial_score(history, 1000, "within_noise") == (0.9, 3)  # 1,000 photos: a band of 0.009
    history.history = {}
    assert trial_score(history, 10, "within_noise") is None


def test_unknown_algorithm_is_refused(zoo, params, tmp_path, monkeypatch, capsys):
    use_tracking(monkeypatch, tmp_path)
    monkeypatch.setenv("CAMID_PARAMS", str(write_params(tmp_path / "params.yaml")))
    assert camid_main(["tune", "--arch", "smallcnn", "--cache", str(zoo.cache), "--algorithm", "grid",
                       "--out", str(tmp_path / "best.yaml")]) == 2
    assert "hyperband, bayesian, random" in capsys.readouterr().err


@pytest.mark.slow
def test_mlflow_run_tune_entry_point(zoo, tmp_path):
    env = subprocess_env({"CAMID_PARAMS": str(write_params(tmp_path / "params.yaml")),
                          **tracking_env(tmp_path, "camid-tune")})
    best_file = tmp_path / "tuning" / "best.yaml"
    command = ["mlflow", "run", str(ROOT), "-e", "tune", "-P", "arch=smallcnn", "-P", "max_trials=2",
               "-P", "algorithm=random", "-P", "epochs=1", "-P", f"cache={zoo.cache}", "-P", f"out={best_file}",
               "--env-manager", "local", "--experiment-name", "camid-tune"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("camid-tune").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["mlflow.project.entryPoint"] == "tune" and parent.info.status == "FINISHED"
    assert sorted(r.data.tags.get("mlflow.parentRunId") for r in runs if r is not parent) == [parent.info.run_id] * 2
    assert "best_patch" in parent.data.params and best_file.is_file()
