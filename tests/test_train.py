"""The train stage for real on a tiny virtual zoo: MLflow tracking, an exact resume after a SIGKILL (to the bytes of
an uninterrupted run), the `train:` overrides and their errors, and every registry backbone (in process, one step;
mobilenet through `mlflow run` in test_end_to_end)."""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from camid.cli import build_parser
from camid.cli import main as camid_main
from camid.config import Catalog, TrainParams
from camid.core.fileio import TRACKING_FILE, ZIP_EPOCH
from camid.errors import CamidError
from camid.models import get_backbone, list_backbones
from camid.models.callbacks import (FIXED_DATE_SAVED, MONITOR, keep_checkpoint, kept_epoch, latest_backup,
                                    read_backup_state, validation_noise)
from camid.stages.train import resolve_train_params, train
from tests.conftest import ROOT
from tests.helpers_data import (CACHE_PATCH, PATCH, PRECISE_BN, subprocess_env, tiny_train, use_tracking,
                                write_params)

EPOCH_METRICS = ("loss", "camera_accuracy", "val_weighted_accuracy", "learning_rate")


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
    import camid.data.dataset as dataset_module

    decodes = []  # training photos decoded: the batches come in order, so a group decodes each photo once
    real = dataset_module.decode_photo
    monkeypatch.setattr(dataset_module, "decode_photo", lambda *a, **k: decodes.append(a[0]) or real(*a, **k))
    settings = tiny_train(params.train, epochs=2, steps_per_epoch=16, crops_per_decode=2, precise_bn=PRECISE_BN)
    out = tmp_path / "models" / "smallcnn"
    summary = train("smallcnn", zoo.cache, out, settings, params.catalog.labels, params.catalog)
    train_photos = set(pd.read_parquet(zoo.cache / "train" / "index.parquet").path)
    # 2 epochs x 8 groups of at most 4 distinct photos each, and Keras' look at the first batches before it starts
    # (epoch 0's group 0, and group 1 decoded ahead); batches asked for out of order would decode groups again
    assert len([p for p in decodes if p in train_photos]) <= (2 * 8 + 2) * settings.batch_size

    client = mlflow.MlflowClient()
    run = only_run()
    assert run.info.status == "FINISHED" and run.info.run_id == summary["run_id"]
    assert run.info.artifact_uri.startswith(tmp_path.as_uri())
    logged = run.data.params
    # every train setting by its params.yaml key (bare names are `mlflow run`'s, see test_end_to_end's `mlflow run` test)
    assert {f"train.{f.name}" for f in dataclasses.fields(TrainParams) if f.name != "archs"} <= set(logged)
    assert {"arch", "cache_patch", "num_classes", "train_photos", "val_images"} <= set(logged)
    assert logged["arch"] == "smallcnn" and logged["cache_patch"] == str(CACHE_PATCH)
    assert logged["train.patch"] == str(PATCH) and float(logged["train.learning_rate"]) == settings.learning_rate
    assert logged["train.dense"] == "(16,)" and logged["train.epochs"] == "2" and logged["train.precise_bn"] == "2"
    for metric in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert steps == [0, 1], (metric, steps)
    assert run.data.metrics["best_weighted_accuracy"] == pytest.approx(summary["weighted_accuracy"])
    # The kept checkpoint is the epoch the rule names, and model.keras holds that epoch's weights: scored again,
    # it gives the score the epoch had.
    kept, history = summary["checkpoint"], pd.read_csv(out / "history.csv")
    assert kept["rule"] == settings.checkpoint == "within_noise" and kept["epochs_trained"] == 2
    assert kept["val_photos"] == int(logged["val_images"]) and kept["noise"] == pytest.approx(
        validation_noise(kept["best_score"], kept["val_photos"]))
    assert kept["kept_epoch"] == kept_epoch(history[MONITOR], kept["val_photos"])
    assert summary["weighted_accuracy"] == pytest.approx(kept["kept_score"], abs=1e-9)
    assert run.data.metrics["checkpoint_kept_epoch"] == kept["kept_epoch"]
    assert summary["weighted_accuracy"] == pytest.approx(0.7 * summary["accuracy_unaltered"]
                                                         + 0.3 * summary["accuracy_manipulated"])
    assert run.data.tags["git_commit"] not in ("", "unknown")
    assert run.data.tags["data_version"]
    assert {"confusion_matrix.png", "training_curves.png", "model/model.keras", "summary.json"} <= \
        artifact_paths(client, run.info.run_id)

    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.png", "history.csv", "model.keras", "run.json",
                                                     "tracking.json", "training_curves.png"]
    # the run id sits beside run.json, in the file .dvcignore keeps out of the output's hash
    assert json.loads((out / "tracking.json").read_text())["run_id"] == summary["run_id"]
    assert "run_id" not in json.loads((out / "run.json").read_text())
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [0, 1]
    assert [p.name for p in out.parent.iterdir()] == ["smallcnn"], "temporary folders left beside the output"
    assert list((tmp_path / "ckpt").iterdir()) == [], "the work folder outlived a finished run"


def backup_epochs(checkpoints: Path) -> int:
    """Epochs backed up under any work folder (0 while none): a backup folder appears whole, by a rename."""
    return max((read_backup_state(b)["epoch"] for b in map(latest_backup, checkpoints.glob("*/backup")) if b),
               default=0)


def metric_histories(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow.MlflowClient(tracking_uri)
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
            for name in client.get_run(run_id).data.metrics}


def model_weights(path: Path) -> list:
    import keras

    import camid.models  # noqa: F401  (registers camid's layers)

    return keras.models.load_model(path).get_weights()


def test_killed_training_resumes_exactly(zoo, params, tmp_path, monkeypatch, caplog):
    """SIGKILLed after an epoch's backup (so somewhere in the next epoch), then run again: the same bytes in every
    output DVC hashes (dvc.lock's hashes do not move), the same weights, history and MLflow metrics as a run that
    was never interrupted. The MLflow run id lives in tracking.json, which .dvcignore keeps out of the hash; the
    .keras file carries no save date. lr_patience=1 lets ReduceLROnPlateau act within the run; dropout makes the
    layers' random state matter."""
    epochs, kill_after = 3, 1
    overrides = {"epochs": epochs, "lr_patience": 1, "dropout": [0.3], "precise_bn": PRECISE_BN}
    settings = tiny_train(params.train, **overrides)
    # One tracking store (making one costs seconds), an experiment per run; the checkpoints apart.
    tracking = use_tracking(monkeypatch, tmp_path, "camid", "killed")
    expected_out = tmp_path / "reference" / "smallcnn"
    expected = train("smallcnn", zoo.cache, expected_out, settings, params.catalog.labels, params.catalog)

    folder = tmp_path / "killed"
    env = subprocess_env({"CAMID_PARAMS": str(write_params(tmp_path / "params.yaml", **overrides)),
                          **tracking, "CAMID_CHECKPOINTS": str(folder / "ckpt"), "MLFLOW_EXPERIMENT_NAME": "killed"})
    out = folder / "models" / "smallcnn"
    command = [sys.executable, "-m", "camid", "train", "--arch", "smallcnn", "--cache", str(zoo.cache), "--out", str(out)]
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        # However fast or slow the machine: wait (no deadline; training ends by itself) for the backup, freeze the
        # process at once, then kill it. A later epoch's backup can land before the freeze; `done` is read after.
        while backup_epochs(folder / "ckpt") < kill_after:
            assert first.poll() is None, f"training ended before it was interrupted:\n{log.read_text()[-3000:]}"
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = backup_epochs(folder / "ckpt")
    assert kill_after <= done < epochs
    assert not out.exists()
    # What a kill can leave beyond the backup: CSVLogger's row of the epoch that was running, and a best checkpoint
    # the checkpoint callback was writing. Both go back to what the backup holds.
    (work,) = (folder / "ckpt").iterdir()
    with open(work / "history.csv", "a") as history:
        history.write(f"{done},0.5,1.0,0.001,1.0,0.5,1.0,0.5\r\n")
    (work / "best.keras").write_bytes(b"PK half a zip")

    # The rerun, in this process (the settings are the subprocess's: the same work folder).
    for name in ("CAMID_CHECKPOINTS", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(name, env[name])
    caplog.set_level("INFO", logger="camid.stages.train")
    summary = train("smallcnn", zoo.cache, out, settings, params.catalog.labels, params.catalog)
    assert f"resuming smallcnn after epoch {done}" in caplog.text

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in expected_out.iterdir()) and {"history.csv", "model.keras"} <= set(names)
    for name in names:
        if name == TRACKING_FILE:
            assert (out / name).read_bytes() != (expected_out / name).read_bytes()  # the run ids
        else:
            assert (out / name).read_bytes() == (expected_out / name).read_bytes(), name
    assert TRACKING_FILE in (ROOT / ".dvcignore").read_text().split()
    with zipfile.ZipFile(out / "model.keras") as archive:
        assert {m.date_time for m in archive.infolist()} == {ZIP_EPOCH}
        assert json.loads(archive.read("metadata.json"))["date_saved"] == FIXED_DATE_SAVED
    got, want = model_weights(out / "model.keras"), model_weights(expected_out / "model.keras")
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert {k: v for k, v in summary.items() if k != "run_id"} == {k: v for k, v in expected.items() if k != "run_id"}
    assert json.loads((out / "run.json").read_text()) == {k: v for k, v in summary.items() if k != "run_id"}
    assert json.loads((out / TRACKING_FILE).read_text()) == {"run_id": summary["run_id"]}
    assert [p.name for p in out.parent.iterdir()] == ["smallcnn"]
    assert list((folder / "ckpt").iterdir()) == [], "the work folder outlived a finished run"

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("killed").experiment_id
    finished = client.search_runs([experiment], "attributes.status = 'FINISHED'")
    assert len(finished) == 1 and finished[0].info.run_id == summary["run_id"]
    resumed = metric_histories(env["MLFLOW_TRACKING_URI"], summary["run_id"])
    assert set(EPOCH_METRICS) <= set(resumed)
    assert all([step for step, _ in resumed[name]] == list(range(epochs)) for name in EPOCH_METRICS), resumed
    assert resumed == metric_histories(env["MLFLOW_TRACKING_URI"], expected["run_id"])
    interrupted = [r for r in client.search_runs([experiment]) if r.info.run_id != finished[0].info.run_id]
    assert [r.info.status for r in interrupted] == ["KILLED"]
    assert finished[0].data.tags["resumed_from"] == interrupted[0].info.run_id


# A real-device run's validation (10 photos of the reference devices; run C in the README): the best score came by
# noise after the second epoch; the rule keeps the last, within 0.07 of it.
NOISY_VALIDATION = [0.8175, 0.9475, 0.93625, 0.94375, 0.93625, 0.89625, 0.91125, 0.88875, 0.7, 0.90375, 0.9, 0.855,
                    0.88875, 0.89625]


def test_the_kept_epoch_is_the_latest_within_the_validations_noise_of_the_best():
    assert validation_noise(0.9475, 10) == pytest.approx(0.0705, abs=1e-4)
    assert kept_epoch(NOISY_VALIDATION, photos=10, rule="best") == 1
    assert kept_epoch(NOISY_VALIDATION, photos=10) == 13
    # The same scores on a validation 100 times larger: the band is 0.007; epoch 3, 0.004 below the best, is kept.
    assert kept_epoch(NOISY_VALIDATION, photos=1000) == 3
    # A perfect score has no band: the latest perfect epoch; a tie under "best" keeps the earliest.
    assert kept_epoch([0.5, 1.0, 0.99, 1.0, 0.9], photos=10) == 3
    assert kept_epoch([0.5, 1.0, 0.99, 1.0, 0.9], photos=10, rule="best") == 1
    assert kept_epoch([], photos=10) is None
    with pytest.raises(ValueError, match="choose one of within_noise, best"):
        kept_epoch([0.5], photos=10, rule="last")


class ModelStub:
    """What the checkpoint callback asks of a Keras model: `save` (writes the epoch the stub holds) and
    `stop_training`."""
    epoch, stop_training = None, False

    def save(self, path, overwrite=False):
        assert overwrite
        Path(path).write_text(str(self.epoch))


def score_sequences() -> list[list[float]]:
    rng = np.random.default_rng(3)
    return [NOISY_VALIDATION, list(rng.uniform(0.3, 0.9, 30)), list(np.linspace(0.2, 0.9, 10)),
            list(np.round(rng.uniform(0.6, 0.7, 40), 2))]


@pytest.mark.parametrize("rule", ["within_noise", "best"])
@pytest.mark.parametrize("photos", [10, 1000])
def test_the_checkpoint_written_epoch_by_epoch_is_the_rules_choice_over_all_epochs(rule, photos, tmp_path):
    """The callback decides at each epoch's end, seeing only the epochs so far; the file it leaves is what the rule
    picks over the whole run."""
    for scores in score_sequences():
        target = tmp_path / "best.keras"
        target.unlink(missing_ok=True)
        callback, model = keep_checkpoint(target, photos=photos, rule=rule), ModelStub()
        callback.set_model(model)
        for epoch, score in enumerate(scores):
            model.epoch = epoch
            callback.on_epoch_end(epoch, {MONITOR: score})
        assert not model.stop_training
        assert int(target.read_text()) == callback.kept == kept_epoch(scores, photos, rule)


def stopped_after(callback, scores) -> int:
    """The epoch after which `callback` ends training (len(scores): never)."""
    model = ModelStub()
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, score in enumerate(scores):
        model.epoch = epoch
        callback.on_epoch_end(epoch, {MONITOR: score})
        if model.stop_training:
            return epoch
    return len(scores)


@pytest.mark.parametrize("patience", [0, 1, 3, 12])
def test_early_stopping_counts_from_the_epoch_kept(patience, tmp_path):
    """Under rule "best", training ends where Keras' EarlyStopping ends it; under "within_noise", `patience` epochs
    after the last epoch within the noise of the best (the noisy real-device validation: Keras stops after epoch 13,
    where the best came by noise 12 epochs before; the rule does not stop at all)."""
    import keras

    for scores in score_sequences():
        keras_stop = stopped_after(keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=patience), scores)
        assert stopped_after(keep_checkpoint(tmp_path / "b.keras", photos=10, rule="best", patience=patience),
                             scores) == keras_stop
        stop = stopped_after(keep_checkpoint(tmp_path / "n.keras", photos=10, patience=patience), scores)
        last = min(stop, len(scores) - 1)
        kept = kept_epoch(scores[:last + 1], photos=10)
        assert (stop < len(scores)) == (last - kept >= max(patience, 1))
        assert all(epoch - kept_epoch(scores[:epoch + 1], photos=10) < max(patience, 1) for epoch in range(last))
    assert stopped_after(keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=12), NOISY_VALIDATION) == 13
    assert stopped_after(keep_checkpoint(tmp_path / "n.keras", photos=10, patience=12), NOISY_VALIDATION) == 14


def test_an_unknown_checkpoint_rule_is_refused_before_training(zoo, params, tmp_path, monkeypatch):
    use_tracking(monkeypatch, tmp_path)
    with pytest.raises(CamidError, match="train.checkpoint is 'last': choose one of within_noise, best"):
        train("smallcnn", zoo.cache, tmp_path / "out", tiny_train(params.train, checkpoint="last"),
              params.catalog.labels, params.catalog)
    assert not (tmp_path / "out").exists()


def test_precise_batch_norm_sets_the_average_of_the_training_batches_statistics(zoo, params):
    """Every BatchNormalization layer ends with the equal-weight mean of its batch means and variances over the
    calibration batches, each layer's inputs as the layers before it normalise them in training mode; the
    trainable weights and the other variables (the dropout's seed state) do not move, and the momentum is put
    back."""
    import keras

    from camid.data.dataset import calibration_batches
    from camid.models import create_model
    from camid.models.callbacks import reestimate_batch_norm

    batches = calibration_batches(zoo.cache, params.catalog, patch=PATCH, batch_size=8, batches=3,
                                  manipulation_prob=0.5, seed=1)
    assert len(batches) == 3 and batches[0]["image"].dtype == np.uint8
    assert batches[0]["image"].shape == (8, PATCH, PATCH, 3) and batches[0]["manipulated"].shape == (8, 1)
    again = calibration_batches(zoo.cache, params.catalog, patch=PATCH, batch_size=8, batches=3,
                                manipulation_prob=0.5, seed=1)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(batches, again)), "a pure function of the seed"
    # Memory is bounded whatever is asked: two batches' pixels allowed, two batches drawn.
    assert len(calibration_batches(zoo.cache, params.catalog, patch=PATCH, batch_size=8, batches=50,
                                   manipulation_prob=0.5, seed=1, max_bytes=2 * 8 * PATCH * PATCH * 3)) == 2

    keras.utils.set_random_seed(3)
    model = create_model("smallcnn", num_classes=len(params.catalog), patch=PATCH, dense=(16,), dropout=(0.5,))
    backbone = model.get_layer("smallcnn")  # the backbone is a model inside the model
    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    first = norms[0]
    before = [np.array(w) for w in model.trainable_weights]
    statistics = {id(v) for layer in norms for v in (layer.moving_mean, layer.moving_variance)}
    others = [v for v in model.non_trainable_variables if id(v) not in statistics]  # the dropout's seed state
    others_before = [np.array(v) for v in others]
    # The first layer's inputs: preprocessing, the residuals and the first convolution (nothing normalises before it).
    upstream = keras.Model(backbone.inputs, first.input)
    preprocessing = model.get_layer("preprocessing")
    inputs = [np.asarray(upstream(preprocessing(b["image"].astype("float32")))) for b in batches]
    means = np.mean([x.mean(axis=(0, 1, 2)) for x in inputs], axis=0)
    variances = np.mean([x.var(axis=(0, 1, 2)) for x in inputs], axis=0)

    assert reestimate_batch_norm(model, batches) == len(norms) > 1
    np.testing.assert_allclose(np.array(first.moving_mean), means, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.array(first.moving_variance), variances, rtol=1e-3, atol=1e-6)
    assert all(layer.momentum == norms[0].momentum for layer in norms) and first.momentum < 1.0
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(before, model.trainable_weights))
    assert others and all(np.array_equal(a, np.array(b)) for a, b in zip(others_before, others)), \
        "training draws the same dropout masks with or without the re-estimation"
    # Frozen layers keep their statistics (a frozen BatchNormalization runs in inference mode even in training).
    for layer in norms:
        layer.trainable = False
    assert reestimate_batch_norm(model, batches) == 0


MIRRORED_PRECISE_BN = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from camid.models import compile_model, create_model
from camid.models.callbacks import _all_layers, precise_batch_norm, reestimate_batch_norm

def statistics(model):
    return [np.asarray(v) for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.moving_mean, layer.moving_variance)]

def same(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(statistics(a), statistics(b))) == 0.0

rng = np.random.default_rng(0)
batches = [{"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
            "manipulated": rng.integers(0, 2, (8, 1)).astype("float32")} for _ in range(3)]
keras.utils.set_random_seed(3)
alone = create_model("smallcnn", num_classes=4, patch=32, dense=(16,), dropout=(0.0,))
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored = create_model("smallcnn", num_classes=4, patch=32, dense=(16,), dropout=(0.0,))
    compile_model(mirrored, learning_rate=1e-3, aux_weight=0.2)
mirrored.set_weights(alone.get_weights())
assert reestimate_batch_norm(alone, batches) == reestimate_batch_norm(mirrored, batches) == 7
assert same(alone, mirrored), "re-estimated outside fit"
x = {"image": rng.uniform(0, 255, (32, 32, 32, 3)).astype("float32"), "manipulated": np.zeros((32, 1), "float32")}
y = {"camera": rng.integers(0, 4, 32), "manipulation": rng.integers(0, 9, 32)}
mirrored.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[precise_batch_norm(batches)])
alone.set_weights(mirrored.get_weights())
reestimate_batch_norm(alone, batches)
assert same(alone, mirrored), "re-estimated by the callback at the end of a mirrored epoch"
print("replicas", strategy.num_replicas_in_sync)
"""


def test_precise_batch_norm_under_a_mirrored_strategy():
    """Several GPUs train under tf.distribute.MirroredStrategy (camid.models.devices); two logical CPU devices stand
    in for them. The re-estimation (eager training-mode calls on mirrored variables, in cross-replica context, also
    as the callback at the end of a mirrored fit's epoch) sets the same statistics as on one device."""
    done = subprocess.run([sys.executable, "-c", MIRRORED_PRECISE_BN], capture_output=True, text=True, timeout=300,
                          env=subprocess_env({}))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replicas 2" in done.stdout


def test_a_negative_precise_bn_is_refused_before_training(zoo, params, tmp_path, monkeypatch):
    use_tracking(monkeypatch, tmp_path)
    with pytest.raises(CamidError, match="train.precise_bn is -1"):
        train("smallcnn", zoo.cache, tmp_path / "out", tiny_train(params.train, precise_bn=-1),
              params.catalog.labels, params.catalog)
    assert not (tmp_path / "out").exists()


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
             "--learning-rate", "", "--dropout", "", "--dense", "", "--manipulation-prob", "", "--checkpoint", "")
    assert resolve_train_params(parse(*unset, "--params-file", ""), params.train) == params.train
    assert resolve_train_params(parse(*unset, "--params-file", str(best)), params.train) == settings

    flags = resolve_train_params(parse("--params-file", str(best), "--learning-rate", "0.01", "--dense", "32,16",
                                       "--dropout", "0.1 0.05", "--epochs", "3"), params.train)
    assert (flags.learning_rate, flags.dense, flags.dropout, flags.epochs, flags.patch) == \
        (0.01, (32, 16), (0.1, 0.05), 3, 48)
    assert resolve_train_params(parse("--checkpoint", "best"), params.train).checkpoint == "best"

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


def backbone_patch(arch: str) -> int:
    return max(-(-get_backbone(arch).min_size // 2) * 2, PATCH)


# A backbone's one-step run through the train stage takes 12 s (smallcnn) to over 3 min (densenet201) on 2 CPU
# cores, mostly tracing its graph: `pytest -m slow` runs them. `make test` covers the stage with smallcnn
# (test_training_run_is_tracked_in_mlflow, the resume test) and mobilenet (`mlflow run` in test_end_to_end), and
# every backbone's build and training step in tests/test_models.py.
@pytest.mark.slow
@pytest.mark.parametrize("arch", list_backbones())
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
