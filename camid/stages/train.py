"""The train stage: one backbone, trained on patches cut from the crop cache, tracked in MLflow.

The model sees a patch and the `manipulated` flag and predicts the camera, plus (auxiliary head) which of the
eight test-set manipulations was applied. Validation scores every held-out photo unaltered and under each
manipulation, and the competition's weighted accuracy (0.7 unaltered + 0.3 manipulated) drives the
checkpoint kept (the latest epoch within the validation's noise of the best, camid.models.callbacks.kept_epoch),
the learning-rate schedule and early stopping.

A run killed at any point (an epoch boundary or mid-epoch) and run again with the same settings resumes from the
last finished epoch and ends exactly as an uninterrupted run: the same weights, metrics and files (the backup
holds the model, the optimizer and the callbacks' state; the batches and the layers' random draws are functions
of (seed, epoch); see camid.models.callbacks). Identical runs write identical bytes, model.keras included; the
MLflow run id goes to tracking.json beside them, which .dvcignore keeps out of the output's hash.

On several machines (TF_CONFIG names a cluster, see camid.models.devices) every machine runs the same command. The
chief writes everything: the checkpoints and backups, `out`, the metrics and plots, the MLflow run. Every worker
resumes from the chief's backup, so CAMID_CHECKPOINTS must be one folder all machines share (the default,
.camid/checkpoints, is when the project folder is on a shared file system); the other workers write into a
scratch folder of their own, with a throwaway MLflow store, and return once training is done.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from camid.config import TrainParams, load_params, optional
from camid.errors import CamidError
from camid.core.fileio import TRACKING_FILE, atomic_dir, atomic_path, write_json, write_text
from camid.models.callbacks import (MONITOR, check_checkpoint_rule, exact_resume, keep_checkpoint, kept_epoch,
                                    latest_backup, malloc_callback, precise_batch_norm, predict_cameras,
                                    read_backup_state,
                                    restore_backup_files, save_reproducible_keras, scoring_callbacks,
                                    validation_noise)

log = logging.getLogger(__name__)


def make_callbacks(evalset, train: TrainParams, work: Path, data, resume_from: Path | None = None,
                   calibration: list | None = None) -> list:
    """The training callbacks, `exact_resume` last: it backs up, and on a resume restores, the state of the others
    (camid.models.callbacks), so a run killed anywhere and run again ends as an uninterrupted one. `calibration`:
    the batches BatchNormalization's statistics are re-estimated on at every epoch's end, before the model is scored
    (train.precise_bn; None or empty: Keras' moving statistics)."""
    import keras

    stateful = [
        keras.callbacks.ReduceLROnPlateau(monitor=MONITOR, mode="max", factor=train.lr_factor,
                                          patience=train.lr_patience, min_lr=1e-7, verbose=0),
        keep_checkpoint(work / "best.keras", photos=evalset.photos, rule=train.checkpoint,
                        patience=train.early_stopping_patience),
    ]
    precise = [precise_batch_norm(calibration)] if calibration else []
    return [malloc_callback()] + precise + scoring_callbacks(evalset, train.batch_size) + stateful + [
        keras.callbacks.CSVLogger(str(work / "history.csv"), append=True),
        exact_resume(work / "backup", seed=train.seed, dataset=data, callbacks=stateful, best_file=work / "best.keras",
                     history_file=work / "history.csv", resume_from=resume_from),
    ]


def backed_up_epochs(work: Path) -> int:
    """Epochs finished and backed up in `work` (0: nothing to resume from)."""
    backup = latest_backup(work / "backup")
    return read_backup_state(backup)["epoch"] if backup else 0


def continue_run(run_id_file: Path, done: pd.DataFrame) -> None:
    """Make the active MLflow run whole after a resume: the epochs trained before the interruption are logged
    again from history.csv, and the interrupted run (left RUNNING by a kill) is marked KILLED."""
    import mlflow

    for row in done.to_dict("records"):
        epoch = int(row.pop("epoch"))
        mlflow.log_metrics({k: float(v) for k, v in row.items()}, step=epoch)
    interrupted = run_id_file.read_text().strip() if run_id_file.is_file() else ""
    if interrupted and interrupted != mlflow.active_run().info.run_id:
        mlflow.set_tag("resumed_from", interrupted)
        client = mlflow.MlflowClient()
        if client.get_run(interrupted).info.status == "RUNNING":
            client.set_terminated(interrupted, "KILLED")


@contextlib.contextmanager
def worker_scratch(scratch: Path | None):
    """For a worker that is not the chief (`scratch` set): MLflow writes into a throwaway store in `scratch`, which
    is deleted afterwards with everything the worker wrote. Nothing changes for the chief (`scratch` None)."""
    if scratch is None:
        yield
        return
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.pop("MLFLOW_RUN_ID", None)  # the chief's run (`mlflow run`) is not in the throwaway store
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(scratch, ignore_errors=True)


def run_key(arch: str, train: TrainParams, meta: dict) -> str:
    blob = json.dumps({"arch": arch, "train": dataclasses.asdict(train), "cache": meta}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def train(arch: str, cache: Path, out: Path, train: TrainParams, labels: list[str], catalog, *,
          metrics_file: Path | None = None, plots_file: Path | None = None, extra_tags: dict | None = None) -> dict:
    """Train `arch` on `cache`, write `out/model.keras` (the checkpoint train.checkpoint keeps) and `out/run.json`;
    return the summary."""
    import keras
    import mlflow

    from camid import tracking
    from camid.data.dataset import TrainPatches, calibration_batches, eval_stream
    from camid.core.metrics import confusion_matrix, per_camera_accuracy, weighted_accuracy
    from camid.models import compile_model, configure_devices, create_model
    from camid.models.devices import cluster_from_env, same_on_all_workers
    from camid.core.plots import confusion_figure, history_figure
    from camid.data.cache import check_labels, read_meta, split_fingerprint

    check_checkpoint_rule(train.checkpoint, "params.yaml's train block or --checkpoint")
    if train.precise_bn < 0:
        raise CamidError(f"train.precise_bn is {train.precise_bn}: the number of batches BatchNormalization's "
                         "statistics are re-estimated on at every epoch's end, 0 to keep Keras' moving statistics "
                         "(params.yaml's train block)")
    meta = read_meta(cache)
    check_labels(meta, catalog, cache)
    if train.patch > meta["patch"]:
        raise CamidError(f"train.patch={train.patch} but the cache {cache} holds crops for patch {meta['patch']}: "
                         "re-run the prepare stage with this patch size")
    # A fresh Keras session: the layer and optimizer names saved in model.keras do not depend on what this process
    # built before (they are numbered per session), so identical runs write identical files.
    keras.backend.clear_session()
    keras.utils.set_random_seed(train.seed)
    # Before anything runs a TensorFlow op: on several machines (TF_CONFIG) the strategy sets up TensorFlow's
    # collective ops, which TensorFlow allows only at program start.
    strategy = configure_devices()
    if train.batch_size < strategy.num_replicas_in_sync:
        raise CamidError(f"train.batch_size={train.batch_size} is the global batch, split across "
                         f"{strategy.num_replicas_in_sync} replicas: raise it to at least that (a multiple of it)")
    cluster = cluster_from_env()
    chief = cluster is None or cluster.workers < 2 or cluster.is_chief
    # Work in progress lives under .camid/checkpoints, keyed by every setting, so an interrupted run resumes
    # only with the same settings; `out` appears whole, and only once training has finished.
    work = Path(os.environ.get("CAMID_CHECKPOINTS", ".camid/checkpoints")) / f"{arch}-{run_key(arch, train, meta)}"
    backup = latest_backup(work / "backup")
    scratch = None
    if not chief:
        # Read the chief's backup (above) to resume where it does; write into a scratch folder of this worker's own.
        scratch = Path(tempfile.mkdtemp(prefix=f"camid-train-{arch}-worker{cluster.rank}-"))
        work = scratch / "work"
    elif backup is None:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    state = read_backup_state(backup) if backup else {"epoch": 0, "stopped": False}
    finished, done = state["epoch"], None
    if not same_on_all_workers(strategy, finished):  # a collective: every worker asks, at this same point
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise CamidError(f"the workers of the TF_CONFIG cluster found different backups to resume from (this one: "
                         f"{finished} epochs in {work if chief else backup or 'none'}): every worker resumes from "
                         "the chief's, so set CAMID_CHECKPOINTS to the same folder on a file system all machines "
                         "share (or delete the checkpoints folder on every machine to start afresh)")
    if finished:
        # The history and the kept checkpoint as they were at the backup: rows CSVLogger wrote after it are epochs
        # that run again, and the checkpoint callback may have been killed half-way through a save.
        restore_backup_files(backup, work / "best.keras", work / "history.csv")
        done = pd.read_csv(work / "history.csv", float_precision="round_trip")
        log.info("resuming %s after epoch %d from %s (best %s so far %.4f)", arch, finished, backup, MONITOR,
                 float(done[MONITOR].max()))

    data = TrainPatches(cache, catalog, patch=train.patch, batch_size=train.batch_size,
                        steps_per_epoch=train.steps_per_epoch, manipulation_prob=train.manipulation_prob,
                        seed=train.seed, crops_per_decode=train.crops_per_decode,
                        cfa_flips=train.cfa_flips)
    if train.cfa_flips:
        log.info("CFA layout kept by a diagonal flip (the photos as most are stored): %s", ", ".join(
            f"{label} {view}" for label, view in data.flip_views.items()) or "no camera's photos show which")
    data.epoch = finished  # the stream an uninterrupted run would draw from here on (also set at each epoch begin)
    # The validation rows, their pixels built chunk by chunk at each scoring: memory for one chunk, not the split.
    evalset = eval_stream(cache, split="val", patch=train.patch, batch_size=train.batch_size)

    tags = {"arch": arch, "stage": "train", "data_version": tracking.data_version(cache),
            "train_data": split_fingerprint(cache, "train", labels), **(extra_tags or {})}
    with worker_scratch(scratch), tracking.run(run_name=f"train-{arch}", tags=tags) as active:
        # The settings in use under their params.yaml keys (as `dvc params diff` names them), apart from the
        # bare names `mlflow run` logs for its entry point's parameters ('' when unset).
        settings = {f"train.{k}": v for k, v in dataclasses.asdict(train).items() if k != "archs"}
        flips = ",".join(f"{label}:{view}" for label, view in data.flip_views.items()) or "none"
        tracking.log_params({"arch": arch, **settings, "cache_patch": meta["patch"], "num_classes": len(labels),
                           "train_photos": meta["splits"]["train"]["photos"], "val_images": evalset.photos,
                           "cfa_flip_views": flips})
        if finished:
            continue_run(work / "mlflow_run_id", done)
        write_text(work / "mlflow_run_id", active.info.run_id)
        with strategy.scope():
            model = create_model(arch, num_classes=len(labels), patch=train.patch, weights=train.weights,
                                 dense=train.dense, dropout=train.dropout)
            compile_model(model, learning_rate=train.learning_rate, aux_weight=train.aux_weight)
        log.info("training %s (%s parameters) for up to %d epochs of %d steps", arch,
                 f"{model.count_params():,}", train.epochs, train.steps_per_epoch)
        if finished < train.epochs and not state["stopped"]:
            # In order (shuffle=False): every batch already holds random photos, and the batches of a group share
            # one decode per photo (camid.data.dataset), which Keras' shuffled order would repeat for nearly
            # every batch (3x slower on 2-MP photos).
            # Drawn only when epochs are left to train: a rerun that only scores the kept checkpoint decodes none.
            calibration = calibration_batches(cache, catalog, patch=train.patch, batch_size=train.batch_size,
                                              batches=train.precise_bn, manipulation_prob=train.manipulation_prob,
                                              seed=train.seed, cfa_flips=train.cfa_flips)
            if calibration:
                log.info("BatchNormalization's statistics re-estimated at every epoch's end on %d batches of "
                         "training patches (train.precise_bn)", len(calibration))
            model.fit(data, epochs=train.epochs, initial_epoch=finished, verbose=2, shuffle=False,
                      callbacks=make_callbacks(evalset, train, work, data, backup, calibration))
        if not chief:  # the chief scores the kept checkpoint and writes the outputs
            log.info("%s: worker %d of %d done; the chief writes the model", arch, cluster.rank, cluster.workers)
            return {"arch": arch, "worker": cluster.rank, "workers": cluster.workers}

        # Score the kept checkpoint (train.checkpoint's rule), not the last epoch.
        history = pd.read_csv(work / "history.csv")
        photos = evalset.photos
        kept = history.iloc[kept_epoch(history[MONITOR], photos, train.checkpoint)]
        top = history.iloc[kept_epoch(history[MONITOR], photos, "best")]
        best = keras.models.load_model(work / "best.keras")
        manipulated = evalset.manipulation > 0
        pred = predict_cameras(best, evalset, manipulated, train.batch_size).argmax(1)
        matrix = confusion_matrix(evalset.labels, pred, len(labels))
        summary = {
            "arch": arch,
            "patch": train.patch,
            "labels": labels,
            # Which epoch's weights these are, and why: the rule, the epoch it kept and the best-scoring one, and the
            # validation's noise (one standard error on its photos) that decided between them.
            "checkpoint": {"rule": train.checkpoint, "kept_epoch": int(kept["epoch"]), "kept_score": float(kept[MONITOR]),
                           "best_epoch": int(top["epoch"]), "best_score": float(top[MONITOR]), "val_photos": photos,
                           "noise": validation_noise(float(top[MONITOR]), photos), "epochs_trained": len(history)},
            "weighted_accuracy": weighted_accuracy(evalset.labels, pred, manipulated),
            "accuracy_unaltered": float(np.mean(pred[~manipulated] == evalset.labels[~manipulated])),
            "accuracy_manipulated": float(np.mean(pred[manipulated] == evalset.labels[manipulated])),
            "per_camera": dict(zip(labels, per_camera_accuracy(evalset.labels, pred, len(labels)))),
            "chance": 1 / len(labels),
        }
        mlflow.log_metrics({f"best_{k}": v for k, v in summary.items()
                            if k in ("weighted_accuracy", "accuracy_unaltered", "accuracy_manipulated")})
        mlflow.log_metrics({f"checkpoint_{k}": v for k, v in summary["checkpoint"].items() if k != "rule"})
        if summary["checkpoint"]["kept_epoch"] != summary["checkpoint"]["best_epoch"]:
            log.info("%s: kept epoch %d (%s %.4f), the latest within the validation's noise (%.3f on %d photos) of "
                     "the best, epoch %d (%.4f)", arch, kept["epoch"], MONITOR, kept[MONITOR],
                     summary["checkpoint"]["noise"], photos, top["epoch"], top[MONITOR])
        with atomic_dir(out) as tmp:
            save_reproducible_keras(work / "best.keras", tmp / "model.keras")  # same model, same bytes
            shutil.copy2(work / "history.csv", tmp / "history.csv")
            write_json(tmp / "run.json", summary)
            # The MLflow run id differs on every fresh run with the same result: it goes beside run.json, in a
            # file DVC ignores (.dvcignore), so identical runs leave identical outputs and dvc.lock.
            write_json(tmp / TRACKING_FILE, {"run_id": active.info.run_id})
            tracking.log_figure(confusion_figure(matrix, labels, f"{arch}: validation (unaltered + manipulated)"),
                                "confusion_matrix.png", tmp / "confusion_matrix.png")
            tracking.log_figure(history_figure(history, f"{arch} training", kept=summary["checkpoint"]),
                                "training_curves.png",
                                tmp / "training_curves.png")
            mlflow.log_artifact(str(tmp / "model.keras"), artifact_path="model")
            mlflow.log_dict(summary, "summary.json")
    shutil.rmtree(work, ignore_errors=True)
    if metrics_file:
        write_json(metrics_file, {k: summary[k] for k in ("weighted_accuracy", "accuracy_unaltered", "accuracy_manipulated")})
    if plots_file:
        with atomic_path(plots_file) as tmp:
            history.to_csv(tmp, index=False)
    summary["run_id"] = active.info.run_id
    log.info("%s: validation weighted accuracy %.4f (chance %.3f); MLflow run %s", arch,
             summary["weighted_accuracy"], summary["chance"], summary["run_id"])
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, help="backbone name from the registry (camid.models.list_backbones())")
    parser.add_argument("--cache", type=Path, default=Path("data/cache"), help="the prepare stage's crop cache")
    parser.add_argument("--out", type=optional(Path),
                        help="output folder (default models/runs/<arch>; the DVC stage passes models/train/<arch>, "
                             "its own output, so an ad-hoc run never overwrites what DVC tracks)")
    parser.add_argument("--metrics", type=optional(Path), help="write the final validation metrics here (JSON)")
    parser.add_argument("--plots", type=optional(Path), help="write the per-epoch history here (CSV)")
    parser.add_argument("--params-file", type=optional(Path), help="a YAML file of train-key overrides (e.g. tune's best)")
    for field in dataclasses.fields(TrainParams):
        if field.name in ("archs",):
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(field.type), str)
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=None,
                            type=optional(kind), help=f"override train.{field.name}")


def resolve_train_params(args: argparse.Namespace, base: TrainParams) -> TrainParams:
    """params.yaml's train block, then a params file (tune's best), then command-line flags."""
    from camid.config import read_yaml

    overrides = {}
    if getattr(args, "params_file", None):
        if not args.params_file.is_file():
            raise CamidError(f"--params-file {args.params_file} not found")
        overrides.update((read_yaml(args.params_file.read_text()) or {}).get("train", {}))
    for field in dataclasses.fields(TrainParams):
        value = getattr(args, field.name, None)
        if value is None or field.name == "archs":
            continue
        if field.name in ("dense", "dropout"):
            value = tuple((float if field.name == "dropout" else int)(v) for v in str(value).replace(",", " ").split())
        overrides[field.name] = value
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainParams)}
    if unknown:
        raise CamidError(f"unknown train setting(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(base, **overrides)


def run(args: argparse.Namespace) -> int:
    params = load_params()
    settings = resolve_train_params(args, params.train)
    out = args.out or Path("models/runs") / args.arch
    train(args.arch, args.cache, out, settings, params.catalog.labels, params.catalog,
          metrics_file=args.metrics, plots_file=args.plots)
    return 0
