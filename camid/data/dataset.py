"""Training batches and the validation set, cut from the prepare stage's crop cache (camid.stages.prepare).

Training patch recipe, per sample (`TrainPatches`):
1. class balance: a camera uniformly among those with cached crops, then one of its crops uniformly;
2. a manipulation with probability `manipulation_prob` (uniform over the eight), else none;
3. a random crop of `source_size(patch, manipulation)` at even offsets (CFA-aligned, camid.core.patches);
4. rot90 by a random k in 0..3, only for cameras whose catalog entry has rot90: true;
5. `camid.core.manipulations.apply`, exactly as the test set was made.

Why rot90 is restricted and flips are never used: no rotation preserves the 2x2 CFA phase (an RGGB layout
reads GBRG/BGGR/GRBG after a quarter/half/three-quarter turn), so a rotated patch shows the camera a layout it
never produces unless its photos really are stored in both orientations. For those cameras the rotation is
exact: native sizes are even, so rot90 of an even-offset crop is an even-offset crop of the rotated photo.
A flip mirrors the layout (and the lens and demosaicing asymmetries) into something no camera produces.
Rotation comes before the manipulation, as the photo's orientation came before the test set's processing.

Batches are a pure function of (seed, epoch, batch index): every batch draws from its own generator seeded with
the three, never from a running one, so they do not depend on Keras' worker count, threads or processes, on the
order batches are requested in, nor on whether the run was interrupted. `epoch` counts Keras' `on_epoch_end`
calls; `fit` makes one when it starts, so Keras epoch e draws stream e + 1. To resume at `initial_epoch=E` with
the stream an uninterrupted run would have drawn, set `dataset.epoch = E` before calling `fit`. The train stage
also sets `epoch = e + 1` at the beginning of Keras epoch e (camid.models.callbacks.exact_resume), so the stream
cannot drift from the epoch whatever Keras does between epochs.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import keras
import numpy as np

from camid.config import Catalog
from camid.errors import CamidError
from camid.core.manipulations import MANIPULATIONS, apply, manipulation_index, max_source_size, source_size
from camid.core.patches import random_aligned_crop
from camid.data.cache import check_labels, read_index, read_meta, shard_path

log = logging.getLogger(__name__)


def _check_crop(meta: dict, patch: int, cache_dir) -> None:
    if meta["crop"] < max_source_size(patch):
        raise CamidError(f"the cache at {cache_dir} holds {meta['crop']}px crops, too small for {patch}px patches "
                         f"(resize0.5 needs {max_source_size(patch)}): re-run camid prepare with train.patch={patch}")


def _open_shards(cache_dir, split: str, count: int) -> list[np.ndarray]:
    return [np.load(shard_path(cache_dir, split, k), mmap_mode="r") for k in range(count)]


class TrainPatches(keras.utils.PyDataset):
    """Class-balanced, manipulated, CFA-aligned training patches; `steps_per_epoch` batches per epoch.

    Each batch is `({"image": float32 (B, P, P, 3) in 0..255, "manipulated": float32 (B, 1)},
    {"camera": int32 (B,), "manipulation": int32 (B,)})`; "manipulation" is the auxiliary head's class
    (0 none, 1..8, see camid.core.manipulations.manipulation_index) and "manipulated" is that class > 0.
    """

    def __init__(self, cache_dir, catalog: Catalog, patch: int, batch_size: int, steps_per_epoch: int,
                 manipulation_prob: float, seed: int, workers: int = 1, use_multiprocessing: bool = False,
                 **kwargs):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, **kwargs)
        meta = read_meta(cache_dir)
        check_labels(meta, catalog, cache_dir)
        _check_crop(meta, patch, cache_dir)
        index = read_index(cache_dir, "train")
        if index.empty:
            raise CamidError(f"the cache at {cache_dir} has no training crops")
        if not 0.0 <= manipulation_prob <= 1.0:
            raise CamidError(f"manipulation_prob must lie in 0..1, got {manipulation_prob}")
        self.cache_dir, self.patch, self.batch_size = cache_dir, patch, batch_size
        self.steps_per_epoch, self.manipulation_prob, self.seed = steps_per_epoch, manipulation_prob, seed
        self.epoch = 0
        label_index = index["label_index"].to_numpy()
        self._crops_of = [np.flatnonzero(label_index == c) for c in range(len(catalog))]
        self._cameras = np.array([c for c, rows in enumerate(self._crops_of) if len(rows)])
        absent = [catalog.labels[c] for c, rows in enumerate(self._crops_of) if not len(rows)]
        if absent:
            log.warning("no training crops for %s: sampling only the other %d cameras", ", ".join(absent),
                        len(self._cameras))
        self._rot90 = np.array([camera.rot90 for camera in catalog.cameras])
        self._location = index[["shard", "row"]].to_numpy()
        self._shard_count = int(index["shard"].max()) + 1
        self._shards = None  # memory maps, opened lazily in each worker process

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_shards"] = None  # pickling a memmap would copy the whole shard
        return state

    def __len__(self) -> int:
        return self.steps_per_epoch

    def on_epoch_end(self) -> None:
        # Keras stops its enqueuer before this call and sends the dataset to its workers again after it, so
        # every worker sees the new epoch. (on_epoch_begin would race: the enqueuer starts before it runs.)
        self.epoch += 1

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
        """One (patch uint8 (P, P, 3), camera index, manipulation index) drawn with `rng`."""
        if self._shards is None:
            self._shards = _open_shards(self.cache_dir, "train", self._shard_count)
        camera = int(self._cameras[rng.integers(len(self._cameras))])
        rows = self._crops_of[camera]
        shard, row = self._location[rows[rng.integers(len(rows))]]
        name = MANIPULATIONS[rng.integers(len(MANIPULATIONS))] if rng.random() < self.manipulation_prob else None
        source = random_aligned_crop(self._shards[shard][row], source_size(self.patch, name), rng)
        if self._rot90[camera]:
            source = np.rot90(source, k=int(rng.integers(4)))
        return apply(source, name, self.patch), camera, manipulation_index(name)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range 0..{len(self) - 1}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        images = np.empty((self.batch_size, self.patch, self.patch, 3), dtype=np.float32)
        camera = np.empty(self.batch_size, dtype=np.int32)
        manipulation = np.empty(self.batch_size, dtype=np.int32)
        for i in range(self.batch_size):
            images[i], camera[i], manipulation[i] = self.sample(rng)
        manipulated = (manipulation > 0).astype(np.float32)[:, None]
        return {"image": images, "manipulated": manipulated}, {"camera": camera, "manipulation": manipulation}


@dataclass(frozen=True)
class EvalSet:
    """Every cached crop of a split, unaltered and under each manipulation: 9 rows per photo, photo-major
    (row 9*i + m is photo i under manipulation index m, 0 = unaltered)."""
    images: np.ndarray        # uint8 (N*9, P, P, 3)
    labels: np.ndarray        # int32 (N*9,) camera index in catalog order
    manipulation: np.ndarray  # int32 (N*9,) 0 none, else 1 + MANIPULATIONS.index(name)
    image_id: np.ndarray      # int32 (N*9,) the photo's id within the split
    path: np.ndarray          # object (N*9,) the photo's path
    camera_labels: tuple[str, ...]

    @property
    def manipulated(self) -> np.ndarray:
        return self.manipulation > 0

    def __len__(self) -> int:
        return len(self.labels)

    def chunks(self):
        """(0, every row's pixels): the one chunk of a set already in memory (as EvalStream.chunks)."""
        yield 0, self.images


def eval_patches(cache_dir, split: str = "val", patch: int | None = None, catalog: Catalog | None = None,
                 workers: int | None = None, start: int = 0, stop: int | None = None) -> EvalSet:
    """The split's crops as the test set would show them (see EvalSet). `patch` defaults to the cache's.
    `start`, `stop`: only the index rows in that range (a chunk of the split's photos, one crop each in val and
    test), for scoring a split chunk by chunk (`camid.inference.scoring.scored_split`).

    Memory: N * 9 * P * P * 3 bytes for the N crops read (about 7 MB per photo at P=512).
    """
    meta = read_meta(cache_dir)
    if catalog is not None:
        check_labels(meta, catalog, cache_dir)
    patch = patch or meta["patch"]
    _check_crop(meta, patch, cache_dir)
    full = read_index(cache_dir, split)
    shards = _open_shards(cache_dir, split, int(full["shard"].max()) + 1 if len(full) else 0)
    index = full.iloc[start:stop]
    names = (None, *MANIPULATIONS)
    views = len(names)
    images = np.empty((len(index) * views, patch, patch, 3), dtype=np.uint8)

    location = index[["shard", "row"]].to_numpy()

    def fill(i: int) -> None:
        shard, row = location[i]
        crop = shards[shard][row]
        for m, name in enumerate(names):
            images[i * views + m] = apply(crop, name, patch)

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as executor:  # Pillow releases the GIL
        list(executor.map(fill, range(len(index))))
    def repeat(column: str, dtype) -> np.ndarray:
        return np.repeat(index[column].to_numpy(dtype), views)

    return EvalSet(images=images, labels=repeat("label_index", np.int32),
                   manipulation=np.tile(np.arange(views, dtype=np.int32), len(index)),
                   image_id=repeat("image", np.int32), path=repeat("path", object),
                   camera_labels=tuple(meta["labels"]))


CHUNK_BYTES = 2**24  # uint8 pixels of one chunk of an EvalStream (16 MB; its float32 copy is 64 MB)


@dataclass
class EvalStream:
    """A split's EvalSet rows (photo-major, 9 per photo: unaltered, then each manipulation), with the labels,
    manipulations, ids and paths of every row in memory but the pixels built `rows_per_chunk` rows at a time
    (`chunks`), so scoring a split needs memory for one chunk, not for the split. `rows_per_chunk` is a multiple
    of the batch size it was made for, so a model sees exactly the batches it would see on the whole array."""
    cache_dir: object
    split: str
    patch: int
    rows_per_chunk: int
    labels: np.ndarray
    manipulation: np.ndarray
    image_id: np.ndarray
    path: np.ndarray
    camera_labels: tuple[str, ...]

    @property
    def manipulated(self) -> np.ndarray:
        return self.manipulation > 0

    def __len__(self) -> int:
        return len(self.labels)

    def chunks(self):
        """(start row, uint8 (rows, P, P, 3)) for consecutive chunks of rows."""
        views = 1 + len(MANIPULATIONS)
        for start in range(0, len(self), self.rows_per_chunk):
            stop = min(start + self.rows_per_chunk, len(self))
            first, last = start // views, -(-stop // views)
            chunk = eval_patches(self.cache_dir, self.split, self.patch, start=first, stop=last)
            offset = start - first * views
            yield start, chunk.images[offset:offset + stop - start]


def eval_stream(cache_dir, split: str = "val", patch: int | None = None, batch_size: int = 64,
                catalog: Catalog | None = None, chunk_bytes: int = CHUNK_BYTES) -> EvalStream:
    """The rows `eval_patches` would build, as an EvalStream: chunks of about `chunk_bytes` of pixels, a whole
    number of `batch_size` batches each."""
    meta = read_meta(cache_dir)
    if catalog is not None:
        check_labels(meta, catalog, cache_dir)
    patch = patch or meta["patch"]
    _check_crop(meta, patch, cache_dir)
    index = read_index(cache_dir, split)
    views = 1 + len(MANIPULATIONS)
    batches = max(1, chunk_bytes // (batch_size * patch * patch * 3))

    def repeat(column: str, dtype) -> np.ndarray:
        return np.repeat(index[column].to_numpy(dtype), views)

    return EvalStream(cache_dir, split, patch, batches * batch_size, labels=repeat("label_index", np.int32),
                      manipulation=np.tile(np.arange(views, dtype=np.int32), len(index)),
                      image_id=repeat("image", np.int32), path=repeat("path", object),
                      camera_labels=tuple(meta["labels"]))

