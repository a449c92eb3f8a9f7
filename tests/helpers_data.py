"""A tiny virtual-zoo crop cache shared by the training and tuning tests (the `zoo` fixture in conftest.py builds
it once per session), and the settings and environments those tests share.

synth (3 devices per camera, 2 photos each, none spoiled) -> device-disjoint split -> prepare at CACHE_PATCH.
CACHE_PATCH covers the largest minimum input size in the backbone registry (Inception's 75, rounded up to
even), so every backbone can train on it; most tests train at PATCH.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from tests.conftest import ROOT

CACHE_PATCH = 76
PATCH = 64
# Tiny training settings every test starts from (2 CPU cores).
# precise_bn 0, as camid.tiny's model (see build_tiny_model): after 2 steps Keras' moving statistics are nearly their
# initial values and a tiny model answers close to uniform, which tests of what is built on the answers are written
# around; re-estimated statistics make the same barely trained network confidently wrong. The training tests that
# exercise the re-estimation set it themselves (PRECISE_BN).
TINY_TRAIN = {"patch": PATCH, "epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "dense": [16], "dropout": [0.1],
              "early_stopping_patience": 50, "precise_bn": 0}
PRECISE_BN = 2  # calibration batches for the training tests that re-estimate BatchNormalization's statistics


@dataclasses.dataclass(frozen=True)
class Zoo:
    root: Path    # the session folder holding everything below
    split: Path   # train.csv / val.csv / test.csv
    cache: Path   # the crop cache (patch CACHE_PATCH)


# What ties a process to an MLflow run or experiment; a test's runs must not inherit them.
RUN_VARIABLES = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def build_zoo(root: Path, catalog) -> Zoo:
    from camid.config import SynthParams
    from camid.data.cache import prepare
    from camid.stages.split import split
    from camid.data.synth import synthesize

    synthesize(root / "raw", catalog, SynthParams(devices_per_model=3, images_per_device=2, bad_fraction=0.0),
               progress=False)
    split(root / "raw" / "train", root / "split", catalog.labels, val_fraction=0.25, test_fraction=0.25, seed=7)
    prepare(root / "split", root / "cache", catalog, patch=CACHE_PATCH, workers=1)
    return Zoo(root, root / "split", root / "cache")


def tiny_train(base, **overrides):
    """`base` (a TrainParams) with the tiny settings and then `overrides`."""
    values = {**TINY_TRAIN, **overrides}
    return dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def write_params(path: Path, **train_overrides) -> Path:
    """The project's params.yaml with the tiny train block (plus overrides): a file for CAMID_PARAMS."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(TINY_TRAIN, **train_overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def tracking_env(folder: Path, *experiments: str) -> dict[str, str]:
    """MLflow (tracking and artifacts) and the checkpoints under `folder`: the variables to set.

    The experiments (default: camid's own) are made here with their artifacts under `folder`: MLflow would
    otherwise put them in ./mlruns of whatever folder the run happens in.
    """
    import mlflow

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "CAMID_CHECKPOINTS": str(folder / "ckpt")}
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    for name in experiments or ("camid",):
        client.create_experiment(name, artifact_location=(folder / "artifacts" / name).as_uri())
    return env


def use_tracking(monkeypatch, folder: Path, *experiments: str) -> dict[str, str]:
    """tracking_env for an in-process run: sets the variables for this test (and no MLflow run outside it)."""
    env = tracking_env(folder, *experiments)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in RUN_VARIABLES:
        # Set, then deleted, so that monkeypatch also undoes what MLflow sets during the test (set_experiment
        # exports MLFLOW_EXPERIMENT_ID, which would steer every later run in this process, `mlflow run` included).
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return env


def subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    """os.environ plus `extra`, with the venv's bin first on PATH (for `camid` and `mlflow`)."""
    import sys

    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    inherited = {k: v for k, v in os.environ.items() if k not in RUN_VARIABLES}
    return {**inherited, "PATH": path, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
