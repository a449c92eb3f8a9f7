"""A tiny trained camid model, built in minutes on a CPU from camid's own stage functions (no CLI, no DVC):
what the tests (conftest.py's session fixtures), the benches and a quick demo run against.

`tiny_model` is a trained smallcnn (one short epoch on a few virtual-zoo photos) gathered into an ensemble
bundle, with its held-out photos; `registered_model` adds the registered MLflow pyfunc (model `camid`,
alias `champion`) in a tracking store of its own. The benches build theirs with `build_tiny_model` too.
Everything lives in one temporary folder; the process's working directory and environment are restored.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME, ALIAS = "camid", "champion"


@dataclass
class TinyModel:
    root: Path
    bundle: Path                 # ensemble bundle (ensemble.json + members/)
    labels: list[str]
    patch: int
    test: pd.DataFrame           # held-out full photos of devices training never saw: path, label, device
    tracking_uri: str            # sqlite store under root
    members: list[Path] = field(default_factory=list)  # train-stage folders (model.keras, run.json)
    weighted_accuracy: float = 0.0
    model_uri: str | None = None  # models:/camid/<version> once registered
    local_uri: str | None = None  # the same pyfunc copied to a folder (loads without a tracking store)

    def env(self) -> dict:
        """Environment for subprocesses (camid predict, mlflow models serve) that use this model's store."""
        return {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri, "CAMID_PARAMS": str(ROOT / "params.yaml")}


# What MLflow itself exports while runs are made (set_experiment exports the experiment's id): restored on leaving
# `inside` too, so that a later run in the same process, or a child process given os.environ, is not steered
# into an experiment of a store it does not use.
_MLFLOW_EXPORTS = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@contextlib.contextmanager
def inside(root: Path, **env: str):
    """Run with `root` as working directory (MLflow's ./mlruns, .camid/checkpoints land there) and `env` set; on
    leaving, the working directory, `env`'s variables and MLflow's run and experiment variables are as before."""
    old_cwd, old_env = Path.cwd(), {k: os.environ.get(k) for k in (*env, *_MLFLOW_EXPORTS)}
    os.chdir(root)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build_tiny_model(root: Path, *, seeds: tuple[int, ...] = (1,), archs: tuple[str, ...] = ("smallcnn",),
                     images_per_device: int = 2, epochs: int = 1, steps_per_epoch: int = 3,
                     batch_size: int = 8, precise_bn: int = 0, register: bool = True) -> TinyModel:
    """Synthesise, split, prepare, train one member per (arch, seed), bundle, and optionally register.

    `precise_bn` (train.precise_bn) is 0 by default: after a few steps Keras' moving statistics are still near
    their initial values and the tiny model answers close to uniform, which the tests and benches built on it rely
    on (JPEG tables or a threshold can still move an answer); statistics re-estimated on training patches make the
    same barely trained network confidently wrong."""
    from camid.config import load_params
    from camid.inference.ensemble import Ensemble
    from camid.data.cache import prepare
    from camid.stages.split import split
    from camid.data.synth import synthesize
    from camid.stages.train import train

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    params = load_params(ROOT / "params.yaml")
    catalog, labels = params.catalog, params.catalog.labels
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    with inside(root, MLFLOW_TRACKING_URI=tracking_uri, CAMID_CHECKPOINTS=str(root / "checkpoints"),
                MLFLOW_EXPERIMENT_NAME="camid-tests"):
        synth = dataclasses.replace(params.synth, images_per_device=images_per_device, bad_fraction=0.0)
        synthesize(root / "raw", catalog, synth, progress=False)
        photos = root / "raw" / "train"
        split(photos, root / "split", labels, val_fraction=params.split.val_fraction,
              test_fraction=params.split.test_fraction, seed=params.split.seed)
        prepare(root / "split", root / "cache", catalog, patch=params.train.patch, workers=1)
        members, scores = [], []
        for arch in archs:
            for seed in seeds:
                settings = dataclasses.replace(params.train, archs=(arch,), epochs=epochs, seed=seed,
                                               steps_per_epoch=steps_per_epoch, batch_size=batch_size,
                                               precise_bn=precise_bn)
                out = root / "models" / f"{arch}-{seed}"
                scores.append(train(arch, root / "cache", out, settings, labels, catalog)["weighted_accuracy"])
                members.append(out)
        bundle = Ensemble.write_bundle(members, root / "bundle")
        test = pd.read_csv(root / "split" / "test.csv", keep_default_na=False)
        model = TinyModel(root=root, bundle=bundle, labels=labels, patch=params.train.patch, test=test,
                          tracking_uri=tracking_uri, members=members,
                          weighted_accuracy=float(sum(scores) / len(scores)))
        if register:
            register_tiny_model(model)
    return model


def register_tiny_model(model: TinyModel) -> TinyModel:
    """Log + register the bundle as the camid pyfunc (the register stage's own function) and copy it locally."""
    import mlflow

    from camid.stages.register import register

    with inside(model.root, MLFLOW_TRACKING_URI=model.tracking_uri, MLFLOW_EXPERIMENT_NAME="camid-tests"):
        record = register(model.bundle, {"weighted_accuracy": model.weighted_accuracy}, MODEL_NAME, ALIAS)
        model.model_uri = record["model_uri"]
        mlflow.set_tracking_uri(model.tracking_uri)
        model.local_uri = mlflow.artifacts.download_artifacts(artifact_uri=model.model_uri,
                                                             dst_path=str(model.root / "pyfunc"))
    return model
