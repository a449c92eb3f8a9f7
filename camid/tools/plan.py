"""The training budget that fits what the user gives: patches, steps and epochs from the photos and a time budget.

A fixed budget (14 epochs of 60 steps, 8 patches per decode) suits the zoo's 0.1-megapixel photos and wastes real
ones: on 150 photos of 14 MP it reads about 5% of their pixels once, and spends most of its time decoding. The plan
here takes what `camid catalog from-folder` read off the photos (how many, their sizes, which will train) and a
time budget for the whole `dvc repro`, and chooses:

- `train.crops_per_decode`: enough patches per decoded photo that decoding costs at most a quarter of what
  training on its patches costs (a 14-MP photo takes about 0.6 s to decode; a 64-px patch 4 ms to train on);
- `train.steps_per_epoch` x `train.epochs`: the training time the budget leaves after the other stages (their
  cost from the photos' count and size), spent on steps, but never more than `MAX_COVERAGE` passes over the
  training photos' pixels (small sets stop there, well inside the budget);
- `train.epochs`: as many validation passes as cost at most a tenth of the training time, between `MIN_EPOCHS`
  and `MAX_EPOCHS` (each pass decodes every validation photo).

The cost figures are wall seconds measured on a 2-core x86 machine (the project's CI machine) with the default
backbone, `smallcnn` (its other front ends scaled by their networks' measured cost), and scaled by the number of
cores; other backbones are given no time estimate. Machines of the same core count differ several-fold in what
the network costs: on a 2-core AMD EPYC with AVX2 and no AVX-512, which decoded JPEGs as fast as the reference
machine, a `dvc repro` planned on the reference's figures for 15 minutes took 33.7, its training steps costing 3 to
4 times the reference's (about half of the network's measured cost there was TensorFlow's malloc setting, which
training now undoes: camid.models.callbacks.malloc_callback; the measurement below undoes it too). So `camid
catalog from-folder` measures the network's training cost on the machine at hand (`measure_network`: the median of
three timings of a few steps of the real model fed through a Keras PyDataset, as training feeds it, on random
patches) and the plan takes it in place of the reference's; the other costs (decoding, cutting patches, inference,
which that machine did not slow as much) stay as measured on the reference. The plan is written into params.yaml
as plain numbers, so a run is a function of params.yaml alone and `dvc repro` on another machine trains exactly
the same; every value stays editable there. `bench/real_devices.py` prints the expected and the measured time of
`dvc repro` side by side.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass

# Wall seconds on the 2-core reference machine (bench/real_devices.py, bench/input_pipeline.py).
TRAIN_S_PER_MEGAPIXEL = 0.8       # smallcnn training with its input pipeline, per megapixel of patches (64 px:
                                  # 3.3 ms a patch; the network alone 0.62 s per megapixel, the input the rest)
EPOCH_S = 4.0                     # an epoch's own cost: scoring validation's model, backups, checkpoint
INFER_S_PER_MEGAPIXEL = 0.3       # smallcnn inference, per megapixel of patches
DECODE_S_PER_MEGAPIXEL = 0.012    # decoding a JPEG (libjpeg-turbo through Pillow), per megapixel, one core
FILTER_S_PER_PHOTO = 0.02         # the filter stage's header inspection and perceptual hash, per photo
STAGE_S = 12.0                    # start-up of one stage (Python, TensorFlow, DVC's bookkeeping)
REFERENCE_CORES = 2
# Evaluation's work per photo, in patch rows: a validation or test photo's centre crop under the 9 test-set views
# (unaltered + 8 manipulations) x the 8 D4 views tried, and its whole photo on up to 64 patches x the views kept
# (about 4 of 8); a training photo's 64 patches for the open-set bank.
EVAL_ROWS_HELD_OUT = 9 * 8 + 64 * 4
EVAL_ROWS_TRAIN = 64
DECODE_SHARE = 0.25               # decoding may cost at most this share of training on the patches it feeds
MAX_COVERAGE = 12                 # passes over the training photos' pixels beyond which more steps buy little
MIN_EPOCHS, MAX_EPOCHS = 6, 30
VAL_SHARE = 0.1                   # validation passes may cost at most this share of the training time
MIN_TRAIN_S = 120.0
# The network alone, training, per megapixel of 64-px patches (one core pair, batch 32; the smallcnn front ends, see
# camid/models/smallcnn.py): the other costs of an arch scale from smallcnn's by these.
NETWORK_S_PER_MEGAPIXEL = {"smallcnn": 0.60, "smallcnn_learned": 0.76, "smallcnn_rgb": 0.56}
PLANNED_ARCHS = tuple(NETWORK_S_PER_MEGAPIXEL)


# Re-estimating BatchNormalization's statistics at an epoch's end (train.precise_bn batches, a compiled training-mode
# pass, camid.models.callbacks.batch_statistics): its cost per patch against a training step's network cost.
PRECISE_BN_SHARE = 0.33          # measured at 64 px (0.32 at 128 px; the eager pass it replaced: 0.65 and 0.39)

# The measurement: after a warm-up fit, one fit of MEASURE_REPEATS + 1 windows of MEASURE_STEPS steps, timed window by
# window from a callback; the first window (the fit's start: its tf.data iterator) is not counted, and the median of
# the others is the figure. Short whole fits were timed before: on the 2-core cloud machines they ran on one core in
# up to 9 of 12 timings (CPU/wall about 1, twice the wall time; presumably the sandbox's guest kernel, which packs
# threads onto fewer virtual CPUs: `sched_vcpu_pack`), while windows inside a long fit, as a training epoch runs, ran
# on both cores in all 78 timed (bench/fit_modes.py). The whole-fit median then measured twice the training cost.
MEASURE_STEPS, MEASURE_WARMUP, MEASURE_REPEATS = 10, 3, 3


def infer_s_per_megapixel(arch: str) -> float:
    return INFER_S_PER_MEGAPIXEL * NETWORK_S_PER_MEGAPIXEL[arch] / NETWORK_S_PER_MEGAPIXEL["smallcnn"]


@functools.lru_cache(maxsize=None)
def measure_network(arch: str = "smallcnn", patch: int = 64, batch_size: int = 32,
                    steps: int = MEASURE_STEPS, repeats: int = MEASURE_REPEATS) -> float:
    """This machine's wall seconds per megapixel of patches for training `arch` alone (the figure
    NETWORK_S_PER_MEGAPIXEL holds for the reference machine): the median of `time_network_fit`'s `repeats` timed
    windows of `steps` steps inside one `fit`. 11 to 13 s on the 2-core AVX-512 machine, up to about 80 s on a 2-core
    machine 3 to 4 times slower; measured once per process."""
    cost = time_network_fit(arch, patch, batch_size, steps, repeats=repeats)
    return cost["wall_s"] / steps / (batch_size * patch * patch / 1e6)


def measurement_setup(arch: str = "smallcnn", patch: int = 64, batch_size: int = 32):
    """What the measurement trains: `arch` compiled (2 classes, no pretrained weights; its loss and optimizer), a Keras
    PyDataset class that serves a list of batches `count` times over (Batches(batches, count)), and four batches of
    random patches. time_network_fit and bench/fit_modes.py."""
    import keras
    import numpy as np

    from camid.models import compile_model, create_model

    class Batches(keras.utils.PyDataset):
        def __init__(self, batches, count):
            super().__init__()
            self.batches, self.count = batches, count

        def __len__(self):
            return self.count

        def __getitem__(self, index):
            return self.batches[index % len(self.batches)]

    model = create_model(arch, num_classes=2, patch=patch, weights="none")
    compile_model(model, learning_rate=1e-3, aux_weight=0.1)
    rng = np.random.default_rng(0)
    batches = [({"image": rng.uniform(0, 255, (batch_size, patch, patch, 3)).astype(np.float32),
                 "manipulated": np.zeros((batch_size, 1), np.float32)},
                {"camera": rng.integers(2, size=batch_size).astype(np.int32),
                 "manipulation": rng.integers(9, size=batch_size).astype(np.int32)}) for _ in range(4)]
    return model, Batches, batches


def time_network_fit(arch: str = "smallcnn", patch: int = 64, batch_size: int = 32, steps: int = MEASURE_STEPS,
                     warmup: int = MEASURE_WARMUP, repeats: int = 1) -> dict:
    """Train `arch` (2 classes, no pretrained weights; its loss and optimizer) on random patches fed through a
    Keras PyDataset with the train stage's malloc callback, as training feeds it: a first `fit` of `warmup` steps
    that builds and traces it, then one `fit` of `repeats` + 1 windows of `steps` steps, each window timed from a
    callback (the first, which holds the fit's start, is not counted: module comment above). What a window of `steps`
    steps cost this process: {"wall_s", "cpu_s"} of the one of median wall time, "wall_s_each" and "cpu_s_each"
    (every counted window's, in order; CPU seconds over wall seconds near 1 on a 2-core machine: it ran on one core),
    "minor_faults" (over all of them) and "peak_rss_mb", the process's peak after them (the last two None where the
    platform has no `resource` module). measure_network and bench/malloc_thresholds.py."""
    import keras

    from camid.models.callbacks import malloc_callback

    try:
        import resource
    except ImportError:  # not a Unix
        resource = None

    class Windows(keras.callbacks.Callback):
        """(wall, CPU) clock readings after every `steps` batches, and page faults at the first."""

        def __init__(self):
            super().__init__()
            self.marks, self.faults = [], None

        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % steps == 0:
                self.marks.append((time.perf_counter(), time.process_time()))
                if self.faults is None and resource:
                    self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    model, Batches, batches = measurement_setup(arch, patch, batch_size)
    model.fit(Batches(batches, warmup), epochs=1, verbose=0, shuffle=False, callbacks=[malloc_callback()])
    windows = Windows()
    model.fit(Batches(batches, steps * (max(1, repeats) + 1)), epochs=1, verbose=0, shuffle=False,  # as training
              callbacks=[malloc_callback(), windows])
    timings = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(windows.marks, windows.marks[1:])]
    wall, cpu = sorted(timings)[len(timings) // 2]
    cost = {"wall_s": wall, "cpu_s": cpu, "wall_s_each": [w for w, _ in timings],
            "cpu_s_each": [c for _, c in timings], "minor_faults": None, "peak_rss_mb": None}
    if resource:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cost.update(minor_faults=usage.ru_minflt - windows.faults, peak_rss_mb=usage.ru_maxrss / 1024)
    return cost


@dataclass(frozen=True)
class Photos:
    """What the plan needs to know of the photos: per split, how many and their mean size in megapixels."""
    train: int
    held_out: int                 # validation + test
    val: int
    megapixels: float             # mean over all photos
    sampled_megapixels: float | None = None  # the mean size of a photo training decodes: a camera uniformly (class
                                             # balance), then one of its photos; None: `megapixels`

    @property
    def decoded_megapixels(self) -> float:
        return self.megapixels if self.sampled_megapixels is None else self.sampled_megapixels

    @property
    def total(self) -> int:
        return self.train + self.held_out


@dataclass(frozen=True)
class Plan:
    patch: int
    batch_size: int
    crops_per_decode: int
    steps_per_epoch: int
    epochs: int
    coverage: float               # passes over the training photos' pixels
    seconds: dict                 # stage -> expected wall seconds
    budget_s: float
    cores: int
    limited_by: str               # "time" or "coverage"
    arch: str = "smallcnn"
    network_s_per_mp: float | None = None  # this machine's measured training cost of the network (None: the
                                            # reference machine's, scaled by cores)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    def params(self) -> dict:
        """The params.yaml keys this plan sets."""
        return {"train.crops_per_decode": self.crops_per_decode, "train.steps_per_epoch": self.steps_per_epoch,
                "train.epochs": self.epochs}

    def lines(self, photos: Photos) -> list[str]:
        minutes = lambda s: f"{s / 60:.1f} min"  # noqa: E731
        limit = "the time budget" if self.limited_by == "time" else "coverage: more passes buy little"
        speed = ([] if self.network_s_per_mp is None else [
            f"  this machine trains {self.arch} at {self.network_s_per_mp:.2f} s per megapixel of patches (the "
            f"reference machine's {REFERENCE_CORES} cores: {NETWORK_S_PER_MEGAPIXEL[self.arch]:.2f})"])
        return [
            f"training plan for {photos.total} photos ({photos.train} train, {photos.held_out} validation and test; "
            f"{photos.megapixels:.1f} MP on average), a {minutes(self.budget_s)} budget on {self.cores} core(s):",
            *speed,
            f"  {self.epochs} epochs x {self.steps_per_epoch} steps of {self.batch_size} patches of {self.patch} px, "
            f"{self.crops_per_decode} patches per decoded photo: {self.coverage:.1f} passes over the training "
            f"photos' pixels (limited by {limit})",
            "  expected dvc repro: " + ", ".join(f"{stage} {minutes(s)}" for stage, s in self.seconds.items())
            + f"; total {minutes(self.total_s)}",
        ]


def _scale(cores: int) -> float:
    """How much faster than the reference machine `cores` cores are (linear in cores: an estimate)."""
    return REFERENCE_CORES / max(1, cores)


def photo_decode_s(megapixels: float) -> float:
    """Reference-machine seconds to decode one photo of `megapixels`, all its cores decoding."""
    return DECODE_S_PER_MEGAPIXEL * megapixels / REFERENCE_CORES


def stage_seconds(photos: Photos, patch: int, cores: int, arch: str = "smallcnn") -> dict:
    """Expected wall seconds of every stage but training (their work from the photos' count and size)."""
    k = _scale(cores)
    patch_mp = patch * patch / 1e6
    decode = photo_decode_s(photos.megapixels)
    evaluate = (decode * (2 * photos.held_out + photos.train)
                + infer_s_per_megapixel(arch) * patch_mp * (EVAL_ROWS_HELD_OUT * photos.held_out
                                                      + EVAL_ROWS_TRAIN * photos.train))
    return {"acquire, filter, split": 3 * STAGE_S + FILTER_S_PER_PHOTO * photos.total * k,
            "prepare": STAGE_S + decode * photos.total * k,
            "evaluate": STAGE_S + evaluate * k,
            "register": STAGE_S}


def plan_training(photos: Photos, *, patch: int = 64, batch_size: int = 32, budget_s: float = 15 * 60,
                  cores: int | None = None, arch: str = "smallcnn", network_s_per_mp: float | None = None,
                  precise_bn: int | None = None) -> Plan:
    """The plan for `photos` in `budget_s` seconds of `dvc repro` on `cores` cores (default: this machine's), training
    `arch` (one of PLANNED_ARCHS). `network_s_per_mp`: this machine's cost of training the network (`measure_network`);
    None: the reference machine's, scaled by the cores. `precise_bn`: train.precise_bn (None: its default)."""
    from camid.config import TrainParams
    from camid.data.dataset import CALIBRATION_CROPS

    precise_bn = TrainParams.precise_bn if precise_bn is None else max(0, int(precise_bn))
    cores = cores or os.cpu_count() or 1
    k = _scale(cores)
    patch_mp = patch * patch / 1e6
    others = stage_seconds(photos, patch, cores, arch)
    network = NETWORK_S_PER_MEGAPIXEL[arch] * k if network_s_per_mp is None else network_s_per_mp
    train_patch_s = ((TRAIN_S_PER_MEGAPIXEL - NETWORK_S_PER_MEGAPIXEL["smallcnn"]) * k + network) * patch_mp
    decode_s = photo_decode_s(photos.decoded_megapixels) * k  # a training decode: the class-balanced size
    crops = int(min(128, max(8, 2 ** math.ceil(math.log2(max(1.0, decode_s / (DECODE_SHARE * train_patch_s)))))))
    step_s = batch_size * (train_patch_s + decode_s / crops)
    val_decode_s = photo_decode_s(photos.megapixels) * k
    # An epoch's fixed cost: scoring validation, and re-estimating BatchNormalization's statistics first; training
    # also decodes the photos of those batches once (CALIBRATION_CROPS patches per decode).
    val_pass_s = (EPOCH_S * k + photos.val * (val_decode_s + 9 * infer_s_per_megapixel(arch) * patch_mp * k)
                  + precise_bn * batch_size * PRECISE_BN_SHARE * network * patch_mp)
    calibration_s = precise_bn * batch_size / CALIBRATION_CROPS * decode_s
    train_s = max(MIN_TRAIN_S, budget_s - sum(others.values()) - STAGE_S - calibration_s)
    pixels = photos.train * photos.megapixels * 1e6
    max_steps = MAX_COVERAGE * pixels / (batch_size * patch * patch)
    epochs = int(min(MAX_EPOCHS, max(MIN_EPOCHS, VAL_SHARE * train_s / max(val_pass_s, 1e-9))))
    steps = (train_s - epochs * val_pass_s) / step_s
    limited_by = "time"
    if steps > max_steps:
        steps, limited_by = max_steps, "coverage"
    steps_per_epoch = max(1, int(steps / epochs))
    total_steps = steps_per_epoch * epochs
    seconds = {**others, "train": STAGE_S + calibration_s + total_steps * step_s + epochs * val_pass_s}
    seconds = {stage: seconds[stage] for stage in ("acquire, filter, split", "prepare", "train", "evaluate",
                                                     "register")}
    return Plan(patch=patch, batch_size=batch_size, crops_per_decode=crops, steps_per_epoch=steps_per_epoch,
                epochs=epochs, coverage=total_steps * batch_size * patch * patch / max(pixels, 1.0), seconds=seconds,
                budget_s=budget_s, cores=cores, limited_by=limited_by, arch=arch, network_s_per_mp=network_s_per_mp)
