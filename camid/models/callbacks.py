"""The per-epoch validation score training and tuning both monitor: the competition's weighted accuracy over
the validation patches (unaltered and manipulated), written into the Keras epoch logs and logged to MLflow."""
from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np

from camid.core.fileio import atomic_dir, atomic_path, write_reproducible_zip

MONITOR = "val_weighted_accuracy"


def predict_cameras(model, images, manipulated: np.ndarray, batch_size: int) -> np.ndarray:
    """Camera probabilities for uint8 patches (no TTA: the per-epoch check must be cheap): an array, or an
    EvalSet / EvalStream (camid.data.dataset), scored chunk by chunk so only one chunk's pixels are in memory; an
    EvalStream's chunks are whole batches, so the answers are those of the whole array."""
    def score(pixels: np.ndarray, flags: np.ndarray) -> np.ndarray:
        out = model.predict({"image": pixels.astype("float32"), "manipulated": flags.reshape(-1, 1).astype("float32")},
                            batch_size=batch_size, verbose=0)
        return np.asarray(out["camera"])

    if isinstance(images, np.ndarray):
        return score(images, manipulated)
    parts = [score(pixels, manipulated[start:start + len(pixels)]) for start, pixels in images.chunks()]
    return np.concatenate(parts) if parts else np.zeros((0, len(images.camera_labels)), np.float32)


# glibc's mallopt parameters (malloc.h) and the values camid puts back.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2 ** 20   # glibc's own ceiling for its dynamic threshold: the network's tensors reuse heap memory
TRIM_THRESHOLD = 64 * 2 ** 20   # free memory at the heap's top that glibc keeps rather than hands back
MALLOC_SWITCH = "CAMID_MALLOC_THRESHOLDS"  # "0": leave TensorFlow's setting (bench/malloc_thresholds.py's baseline)


def restore_malloc_thresholds() -> bool:
    """Undo what TensorFlow's generator dataset does to glibc's malloc; True where it was undone.

    When a `tf.data` generator starts (every Keras PyDataset on the TensorFlow backend: the training patches),
    TensorFlow calls `mallopt(M_TRIM_THRESHOLD, 128 KiB)` ("Memory patch applied" in its log), a
    guard against memory growth with Python generators. Setting any threshold also ends glibc's dynamic mmap
    threshold, which then stays at its starting 128 KiB: every tensor larger than that (a 64-px batch's activations
    are 2 to 8 MiB) becomes a fresh mmap, each of its pages a page fault, and a munmap when freed. On a 2-core
    virtual machine that cost a training step 1.5 to 2 times its time (smallcnn, 32 patches of 64 px: 345 to 512
    ms against 189 to 257; about 108,000 page faults a step, the kernel 38% of the CPU time; `python
    bench/malloc_thresholds.py`). Putting the mmap threshold where
    glibc's dynamic one ends (32 MiB) lets those tensors reuse heap memory again. Only on the TensorFlow backend
    with glibc; `CAMID_MALLOC_THRESHOLDS=0` leaves TensorFlow's setting."""
    import keras

    mallopt = _glibc_mallopt()
    if os.environ.get(MALLOC_SWITCH) == "0" or keras.backend.backend() != "tensorflow" or mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@functools.lru_cache(maxsize=None)
def _glibc_mallopt():
    """glibc's mallopt, or None (another C library: musl, macOS, Windows)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    return getattr(ctypes.CDLL(None), "mallopt", None)


def malloc_callback():
    """A callback that undoes TensorFlow's malloc setting (restore_malloc_thresholds) before every training batch:
    TensorFlow makes it when a generator's iterator starts, which can fall inside a `fit` (two `mallopt` calls, a few
    microseconds, against a step of 0.1 s or more).

    A callback, not a call in TrainPatches.__getitem__: with `use_multiprocessing` the batches are cut in worker
    processes, while the tensors that suffer are allocated in the process that trains, where callbacks run."""
    import keras

    class MallocThresholds(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            restore_malloc_thresholds()

    return MallocThresholds()


def scoring_callbacks(evalset, batch_size: int) -> list:
    """Per-epoch validation score (weighted accuracy over unaltered + manipulated patches) and MLflow logging.

    Listed before anything that monitors MONITOR: they read the value these write into the epoch logs.
    """
    import keras
    import mlflow

    from camid.core.metrics import weighted_accuracy

    class ValidationScore(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            probs = predict_cameras(self.model, evalset, evalset.manipulation > 0, batch_size)
            logs[MONITOR] = weighted_accuracy(evalset.labels, probs.argmax(1), evalset.manipulation > 0)
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    class MlflowEpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mlflow.log_metrics({k: float(v) for k, v in (logs or {}).items()}, step=epoch)

    return [ValidationScore(), MlflowEpochLogger()]


def reestimate_batch_norm(model, batches, statistics=None) -> int:
    """Set every BatchNormalization layer's moving mean and variance of `model` to the equal-weight average of its
    batch statistics over `batches` (dicts of model inputs, uint8 images allowed), the model run in training mode
    ("precise BN", Wu & Johnson, Rethinking "Batch" in BatchNorm, 2021). Each layer's batch statistics are of its
    inputs as the layers before it normalise them in training. Trainable weights are untouched, and so is every
    other variable (the dropout layers' seed states: training draws the same masks with or without this).
    `statistics`: a `batch_statistics(model)` function to reuse (compiled once; the callback keeps one for the whole
    run); None: one is made. Returns the number of layers re-estimated (0: none, nothing run)."""
    layers = _batch_norms(model)
    if not layers or not batches:
        return 0
    statistics = statistics or batch_statistics(model)
    totals = None
    for batch in batches:
        values = [np.asarray(v, dtype=np.float64) for v in statistics(batch)]
        totals = values if totals is None else [t + v for t, v in zip(totals, values)]
    for k, layer in enumerate(layers):
        layer.moving_mean.assign(np.asarray(totals[2 * k] / len(batches), dtype=layer.moving_mean.dtype))
        layer.moving_variance.assign(np.asarray(totals[2 * k + 1] / len(batches), dtype=layer.moving_variance.dtype))
    return len(layers)


def _batch_norms(model) -> list:
    """The BatchNormalization layers of `model` that re-estimation sets. A frozen layer (trainable False, as a
    fine-tuned backbone's may be) runs in inference mode even in training and keeps its statistics."""
    import keras

    return [layer for layer in _all_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def batch_statistics(model):
    """A function batch -> [mean, variance of layer 1, mean, variance of layer 2, ...]: the batch statistics of
    each of `_batch_norms(model)`, the model run once in training mode on the batch (a dict of model inputs, uint8
    images allowed), compiled (tf.function, jax.jit; PyTorch without autograd) and stateless: nothing of the model
    changes. Each layer's momentum is 0 while it is traced, so its updated moving statistics are the batch's own.

    Why compiled: an eager training-mode pass at 512 px held about 1 GB more than the compiled training step (a
    smallcnn at batch 16: peak RSS 3.2 GB training, 4.3 GB after an eager re-estimation, 3.2 GB after a compiled
    one) and took 1.8 times as long."""
    import keras

    layers = _batch_norms(model)
    variables = model.non_trainable_variables
    position = {id(v): k for k, v in enumerate(variables)}
    wanted = [position[id(v)] for layer in layers for v in (layer.moving_mean, layer.moving_variance)]

    def run(trainable, non_trainable, image, manipulated):
        saved = [layer.momentum for layer in layers]
        for layer in layers:  # read when traced: moving = 0 * moving + batch statistic
            layer.momentum = 0.0
        try:
            _, updated = model.stateless_call(
                trainable, non_trainable,
                {"image": keras.ops.cast(image, "float32"), "manipulated": keras.ops.cast(manipulated, "float32")},
                training=True)
        finally:
            for layer, momentum in zip(layers, saved):
                layer.momentum = momentum
        return [updated[k] for k in wanted]

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(run)
    elif backend == "jax":
        import jax

        compiled = jax.jit(run)
    elif backend == "torch":
        import torch

        compiled = torch.no_grad()(run)
    else:
        compiled = run

    def statistics(batch) -> list:
        return compiled([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                        np.asarray(batch["image"]), np.asarray(batch["manipulated"], dtype="float32"))

    return statistics


def _all_layers(model) -> list:
    """Every layer of `model`, nested models' layers included (a backbone is a model inside the model)."""
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        out.extend(_all_layers(layer))
    return out


def precise_batch_norm(batches):
    """The callback that re-estimates BatchNormalization's statistics on `batches` (reestimate_batch_norm) at the
    end of every epoch, before anything scores or saves the model: listed first.

    Why. Keras keeps moving statistics with a momentum (0.9 for smallcnn: about the last 10 batches). The last
    batches of an epoch share their photos (a group of crops_per_decode batches cuts every patch from the same
    decoded photos) and one draw of the classes, so the statistics that validation, the checkpoint and serving
    use describe those few photos. `bench/batchnorm_stats.py` measured it on 10 validation photos of two real
    cameras: 0.585 and 0.507 after the first two epochs with the moving statistics, 0.681 and 0.863 with
    statistics re-estimated on training patches; over 10 epochs 0.828 against 0.886, and on the zoo 0.400 against
    0.467 (README, "Why the validation swings"). The batches are training patches from a
    stream of their own (camid.data.dataset.calibration_batches), fixed for the run, so an epoch's statistics are
    a pure function of its weights (exact resume holds: they are saved with the weights)."""
    import keras

    class PreciseBatchNorm(keras.callbacks.Callback):
        statistics = None  # the compiled pass, made at the first epoch's end and kept for the run

        def on_epoch_end(self, epoch, logs=None):
            if self.statistics is None and _batch_norms(self.model):
                self.statistics = batch_statistics(self.model)
            reestimate_batch_norm(self.model, batches, self.statistics)

    return PreciseBatchNorm()


# Which epoch's weights training keeps (train.checkpoint).
CHECKPOINT_CHOICES = ("within_noise", "best")


def check_checkpoint_rule(rule: str, where: str = "params.yaml's train block") -> None:
    """A CamidError naming the choices unless `rule` is one of CHECKPOINT_CHOICES (train.checkpoint, set in `where`):
    the train and tune stages call it before they read any data."""
    from camid.errors import CamidError

    if rule not in CHECKPOINT_CHOICES:
        raise CamidError(f"train.checkpoint is {rule!r}: choose one of {', '.join(CHECKPOINT_CHOICES)} ({where})")


def validation_noise(score: float, photos: int) -> float:
    """The standard error of a validation score `score` measured on `photos` photos: sqrt(p (1 - p) / n), the
    binomial error with the photo as the unit (a photo's patches share its scene and device, so they are not
    independent draws; counting photos errs towards a wider band)."""
    p = min(max(float(score), 0.0), 1.0)
    return float(np.sqrt(p * (1 - p) / max(int(photos), 1)))


def kept_epoch(scores, photos: int, rule: str = "within_noise") -> int | None:
    """Which of the epochs scored `scores` (validation scores, MONITOR, in training order) training keeps: its
    position in `scores` (None: no scores).

    rule "best": the highest score, the earliest of a tie (as Keras' ModelCheckpoint with save_best_only).
    rule "within_noise" (the one-standard-error rule): the *latest* epoch whose score is within one standard error
    of the best (validation_noise of the best score on `photos` validation photos). With a large validation the band
    is narrow and this is nearly the best epoch. With one reference device per model the validation is a handful of
    photos whose score wanders by more than the epochs differ: a real-device run of 10 validation photos peaked at
    0.948 after its second epoch of 18 (the band there is 0.07), kept it, and its pixels rejected 0.395 of the
    photos of other camera models where runs that kept a late epoch rejected 0.85. The rule keeps the latest epoch
    the validation cannot tell from the best rather than the one the noise favoured."""
    if rule not in CHECKPOINT_CHOICES:
        raise ValueError(f"train.checkpoint is {rule!r}: choose one of {', '.join(CHECKPOINT_CHOICES)}")
    scores = np.asarray(scores, dtype=float)
    if not len(scores):
        return None
    best = int(np.argmax(scores))
    if rule == "best":
        return best
    within = np.flatnonzero(scores >= scores[best] - validation_noise(scores[best], photos))
    return int(within[-1])


def keep_checkpoint(filepath: Path, *, photos: int, rule: str = "within_noise", patience: int | None = None):
    """The callback that writes the weights training keeps (kept_epoch's choice) to `filepath` and, with `patience`,
    ends training once that many epochs have passed since the epoch it last kept (early stopping by the same rule:
    under "best", Keras' EarlyStopping; under "within_noise", an epoch the validation cannot tell from the best
    counts as progress, so a score the noise lifted once does not end the run `patience` epochs later).

    Chosen as training goes, at the end of each epoch: an epoch the rule keeps among the epochs so far stays within
    the band of the best at the end too, unless a later epoch is kept instead (the best only moves up with an epoch
    that is itself kept), so the file holds the rule's answer over all the epochs trained. The scores it carries
    between epochs are what exact_resume backs up (RESUMABLE)."""
    import keras

    kept_epoch([], photos, rule)  # a bad rule fails before training starts

    class KeepCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.scores, self.kept = [], None

        def on_epoch_end(self, epoch, logs=None):
            current = (logs or {}).get(MONITOR)
            if current is None:
                return
            self.scores = self.scores + [float(current)]
            if kept_epoch(self.scores, photos, rule) == len(self.scores) - 1:
                self.model.save(Path(filepath), overwrite=True)
                self.kept = int(epoch)
            if patience is not None and self.kept is not None and epoch - self.kept >= max(int(patience), 1):
                self.model.stop_training = True

    return KeepCheckpoint()


# ---------------------------------------------------------------------------------------------------------------
# Exact resume. A run killed at any point and run again must end with the same weights and metrics as one that was
# never interrupted, so everything an epoch depends on is either a pure function of (seed, epoch) or in the backup:
# - the training batches: TrainPatches draws stream (seed, epoch + 1) in Keras epoch `epoch` (set at epoch begin);
# - the layers' random state (dropout masks): every SeedGenerator of the model is re-seeded from (seed, epoch, its
#   index) at epoch begin, as are Python's, NumPy's and TensorFlow's global generators (keras.utils.set_random_seed);
# - the weights and the optimizer (its step count and learning rate): model.save_weights;
# - ReduceLROnPlateau and the checkpoint with its early stopping (keep_checkpoint's; Keras' EarlyStopping and
#   ModelCheckpoint too): their counters and scores (RESUMABLE), EarlyStopping's best weights when it restores them,
#   the kept checkpoint file itself and the CSV history up to that epoch.
# A backup is one folder `<backup>/epoch-<n>` (n epochs finished), written under a temporary name and renamed whole
# (camid.core.fileio.atomic_dir), so a kill leaves either the previous backup or the new one, never half of one.
BACKUP_PREFIX = "epoch-"
STATE_FILE, WEIGHTS_FILE, BEST_FILE, HISTORY_FILE = "state.json", "model.weights.h5", "best.keras", "history.csv"
EARLY_STOPPING_WEIGHTS = "early_stopping_best.npz"
# The attributes each callback carries from epoch to epoch (Keras resets them in on_train_begin).
RESUMABLE = {
    "ReduceLROnPlateau": ("best", "wait", "cooldown_counter"),
    "EarlyStopping": ("best", "wait", "best_epoch", "stopped_epoch"),
    "ModelCheckpoint": ("best",),
    "KeepCheckpoint": ("scores", "kept"),
}
# The checkpoint callbacks and the attribute that changes exactly when they rewrite the file (a backup links the
# previous backup's copy while it stays the same).
CHECKPOINTS = {"ModelCheckpoint": "best", "KeepCheckpoint": "kept"}
# What a reproducible .keras file says for its save date (Keras writes the wall-clock time of the save).
FIXED_DATE_SAVED = "1980-01-01@00:00:00"


def epoch_seed(seed: int, epoch: int, index: int = 0) -> int:
    """A 31-bit seed that depends only on (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint32)[0] >> 1)


def reseed(model, seed: int, epoch: int) -> None:
    """Make the random draws of epoch `epoch` a function of (seed, epoch) alone, however the process got there.

    keras.utils.set_random_seed only reaches generators made afterwards; a layer's SeedGenerator (Dropout's) keeps
    its own state variable, which the weights file does not hold. Both are set here.
    """
    import keras

    keras.utils.set_random_seed(epoch_seed(seed, epoch))
    states = [v for v in model.variables if v.path.rsplit("/", 1)[-1] == "seed_generator_state"]
    for index, state in enumerate(states):
        state.assign(np.array([epoch_seed(seed, epoch, index + 1), 0], dtype=state.dtype))


def latest_backup(folder: Path) -> Path | None:
    """The backup of the most epochs in `folder` (None: nothing to resume from)."""
    backups = sorted((p for p in Path(folder).glob(f"{BACKUP_PREFIX}*") if (p / STATE_FILE).is_file()),
                     key=lambda p: int(p.name[len(BACKUP_PREFIX):]))
    return backups[-1] if backups else None


def read_backup_state(backup: Path) -> dict:
    return json.loads((backup / STATE_FILE).read_text())


def restore_backup_files(backup: Path, best_file: Path, history_file: Path) -> None:
    """Put the kept checkpoint and the CSV history back as they were when `backup` was taken.

    Call before `fit`: CSVLogger opens the history when training begins.
    """
    for name, target in ((BEST_FILE, best_file), (HISTORY_FILE, history_file)):
        if (backup / name).is_file():
            with atomic_path(target) as tmp:
                shutil.copyfile(backup / name, tmp)
        else:
            Path(target).unlink(missing_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows one (a backup's files are never rewritten), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _plain(value):
    """A JSON value for a callback attribute (numpy scalars become Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value


def exact_resume(folder: Path, *, seed: int, dataset, callbacks: list, best_file: Path, history_file: Path,
                 resume_from: Path | None = None):
    """The Keras callback that takes the backups and restores one (see the comment above RESUMABLE).

    List it last, after the callbacks whose state it saves and after CSVLogger: it backs up what they have written
    for the epoch, and restores their state after their own on_train_begin has reset it. `dataset` is the
    TrainPatches being fitted. Before `fit`, call restore_backup_files and pass `initial_epoch` = the backup's
    epoch; `resume_from` is that backup.
    """
    import keras

    folder, best_file, history_file = Path(folder), Path(best_file), Path(history_file)
    tracked = {f"{i}-{type(c).__name__}": c for i, c in enumerate(callbacks) if type(c).__name__ in RESUMABLE}

    class ExactResume(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._best_saved: Path | None = None  # the kept checkpoint file already in a backup, and its state
            self._best_value = None

        def on_train_begin(self, logs=None):
            if resume_from is None:
                return
            state = read_backup_state(resume_from)
            if self.model.optimizer is not None and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            self.model.load_weights(resume_from / WEIGHTS_FILE)
            for key, callback in tracked.items():
                for name, value in state["callbacks"].get(key, {}).items():
                    setattr(callback, name, value)
                if getattr(callback, "restore_best_weights", False) and (resume_from / EARLY_STOPPING_WEIGHTS).is_file():
                    with np.load(resume_from / EARLY_STOPPING_WEIGHTS) as saved:
                        callback.best_weights = [saved[f"w{i}"] for i in range(len(saved.files))]
            if (resume_from / BEST_FILE).is_file():
                self._best_saved, self._best_value = resume_from / BEST_FILE, self._checkpoint_best()

        def on_epoch_begin(self, epoch, logs=None):
            # Stream e + 1 in Keras epoch e, as TrainPatches counts (its docstring); set, not counted, so that the
            # stream cannot drift from the epoch.
            dataset.epoch = epoch + 1
            reseed(self.model, seed, epoch)

        def _checkpoint_best(self):
            return [_plain(getattr(c, CHECKPOINTS[type(c).__name__], None))
                    for c in tracked.values() if type(c).__name__ in CHECKPOINTS]

        def on_epoch_end(self, epoch, logs=None):
            done = epoch + 1
            state = {"epoch": done, "stopped": bool(self.model.stop_training),
                     "callbacks": {key: {name: _plain(getattr(c, name, None)) for name in RESUMABLE[type(c).__name__]}
                                   for key, c in tracked.items()}}
            with atomic_dir(folder / f"{BACKUP_PREFIX}{done:05d}") as tmp:
                self.model.save_weights(tmp / WEIGHTS_FILE)
                if history_file.is_file():
                    shutil.copyfile(history_file, tmp / HISTORY_FILE)  # CSVLogger flushes every row
                if best_file.is_file():
                    best_value = self._checkpoint_best()
                    if self._best_saved is not None and best_value == self._best_value:
                        _link_or_copy(self._best_saved, tmp / BEST_FILE)  # unchanged since the last backup
                    else:
                        shutil.copyfile(best_file, tmp / BEST_FILE)
                for key, c in tracked.items():
                    if getattr(c, "restore_best_weights", False) and getattr(c, "best_weights", None) is not None:
                        np.savez(tmp / EARLY_STOPPING_WEIGHTS, **{f"w{i}": w for i, w in enumerate(c.best_weights)})
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
            latest = folder / f"{BACKUP_PREFIX}{done:05d}"
            if best_file.is_file():
                self._best_saved, self._best_value = latest / BEST_FILE, self._checkpoint_best()
            for old in folder.glob(f"{BACKUP_PREFIX}*"):
                if old != latest:
                    shutil.rmtree(old, ignore_errors=True)

    return ExactResume()


def _canonical_shared_ids(node, ids: dict) -> None:
    """Renumber the `shared_object_id`s of a Keras config 1, 2, ... in order of appearance (in place): Keras writes
    the objects' memory addresses, which change from process to process; loading only matches them up."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "shared_object_id" and isinstance(value, int):
                node[key] = ids.setdefault(value, len(ids) + 1)
            else:
                _canonical_shared_ids(value, ids)
    elif isinstance(node, list):
        for value in node:
            _canonical_shared_ids(value, ids)


def save_reproducible_keras(src: Path, dst: Path) -> None:
    """Copy the .keras file `src` to `dst` (atomically) so that the same model always gives the same bytes: fixed
    zip dates, a fixed `date_saved` in metadata.json (Keras stamps the wall-clock time on both) and the shared
    objects of config.json numbered in order, not by memory address.

    The layer and optimizer names are in the file too: build the model in a fresh Keras session
    (keras.backend.clear_session) so that they do not depend on what the process built before."""
    def fixed_date(data: bytes) -> bytes:
        metadata = json.loads(data)
        if "date_saved" in metadata:
            metadata["date_saved"] = FIXED_DATE_SAVED
        return json.dumps(metadata).encode()

    def fixed_ids(data: bytes) -> bytes:
        config = json.loads(data)
        _canonical_shared_ids(config, {})
        return json.dumps(config).encode()

    write_reproducible_zip(src, dst, rewrite={"metadata.json": fixed_date, "config.json": fixed_ids})
