"""Training batches and the validation set, cut from the split's photos as they are decoded (the prepare stage's
photo index, camid.data.cache, says which photos and where their centre crops lie).

Training patch recipe (`TrainPatches`). Batches come in groups of `crops_per_decode` consecutive batches; a group
draws `batch_size` photos, decodes each once and cuts `crops_per_decode` patches from it, and batch b of the
group takes patch b of every photo, so each batch still holds `batch_size` photos while a decode feeds
`crops_per_decode` patches. Per photo slot and per patch:
1. class balance: a camera uniformly among those with training photos, then one of its photos uniformly;
2. a manipulation with probability `manipulation_prob` (uniform over the eight), else none;
3. a random crop of `source_size(patch, manipulation)` at even offsets (CFA-aligned, camid.core.patches) from
   anywhere in the photo: every patch has its own position, so training sees all of every photo over time;
4. with probability 1/2, the diagonal flip that keeps the camera's CFA layout (the transpose for RGGB and BGGR,
   the anti-transpose for GRBG and GBRG, camid.core.patches), where its training photos show which one it is
   (`cfa_flips`; read off each photo by the prepare stage and averaged over the camera's photos in landscape
   orientation, a portrait photo's layout being turned a quarter: cameras without a readable trace get none);
5. rot90 by a random k in 0..3, only for cameras whose catalog entry has rot90: true;
6. `camid.core.manipulations.apply`, exactly as the test set was made.

Why rot90 is restricted and only one diagonal flip is used: no rotation preserves the 2x2 CFA phase (an RGGB
layout reads GBRG/BGGR/GRBG after a quarter/half/three-quarter turn), so a rotated patch shows the camera a layout
it never produces unless its photos really are stored in both orientations. For those cameras the rotation is
exact: native sizes are even, so rot90 of an even-offset crop is an even-offset crop of the rotated photo. A
left-right or up-down mirror swaps the layout's columns or rows; of the diagonal mirrors one keeps the layout and
doubles what a photo shows the network, the other swaps red and blue sites. The flip and the rotation come before
the manipulation, as the photo's orientation came before the test set's processing.

Decoding runs in a pool of `threads` (Pillow and numpy release the GIL), and the next group is decoded while the
current one trains, so the network does not wait on the decoder when the pool keeps up (bench/input_pipeline.py
measures patches per second per core). Memory: about three groups of `batch_size * crops_per_decode` uint8
patches plus one decoded photo per thread, whatever the number of photos.

Batches are a pure function of (seed, epoch, batch index): a group's photos come from a generator seeded with
(seed, epoch, group) and each photo slot's patches from one seeded with (seed, epoch, group, slot), never from a
running one, so they do not depend on the thread count, on Keras' workers or processes, on the order batches are
requested in, nor on whether the run was interrupted. `epoch` counts Keras' `on_epoch_end` calls; `fit` makes
one when it starts, so Keras epoch e draws stream e + 1. To resume at `initial_epoch=E` with the stream an
uninterrupted run would have drawn, set `dataset.epoch = E` before calling `fit`. The train stage also sets
`epoch = e + 1` at the beginning of Keras epoch e (camid.models.callbacks.exact_resume), so the stream cannot
drift from the epoch whatever Keras does between epochs.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import keras
import numpy as np

from camid.config import Catalog
from camid.errors import CamidError
from camid.core.manipulations import MANIPULATIONS, apply, manipulation_index, max_source_size, source_size
from camid.core.patches import (ANTI_TRANSPOSE, D4, TRANSPOSE, centre_offsets, d4_view, phase_keeping_view,
                                random_aligned_crop)
from camid.data.cache import check_labels, decode_photo, read_index, read_meta

log = logging.getLogger(__name__)


def _check_crop(meta: dict, patch: int, cache_dir) -> None:
    if meta["crop"] < max_source_size(patch):
        raise CamidError(f"the cache at {cache_dir} holds {meta['crop']}px crops, too small for {patch}px patches "
                         f"(resize0.5 needs {max_source_size(patch)}): re-run camid prepare with train.patch={patch}")


def _check_index(index, cache_dir, split: str) -> None:
    if "sha256" not in index.columns:
        raise CamidError(f"the cache at {cache_dir} was made by an older camid (crop shards, no photo index): "
                         "re-run the prepare stage (dvc repro prepare)")


class _Group:
    """One group's decoding: a future per distinct photo, each giving (patches uint8 (slots, n, P, P, 3),
    manipulation (slots, n)) for the photo's slots, and where each slot's patches sit."""

    def __init__(self, cameras: np.ndarray, futures: list, where: list[tuple[int, int]]):
        self.cameras, self.futures, self.where = cameras, futures, where

    def batch(self, b: int, patch: int):
        images = np.empty((len(self.where), patch, patch, 3), dtype=np.float32)
        manipulation = np.empty(len(self.where), dtype=np.int32)
        results = [future.result() for future in self.futures]
        for j, (photo, slot) in enumerate(self.where):
            patches, manipulations = results[photo]
            images[j] = patches[slot, b]
            manipulation[j] = manipulations[slot, b]
        return images, self.cameras.copy(), manipulation


def _portrait(index) -> np.ndarray:
    """Which photos are stored portrait: their layout is the landscape one turned a quarter, which swaps the
    diagonal flip that keeps it."""
    return (index["height"] > index["width"]).to_numpy(bool)


def camera_flips(index, cameras: int) -> dict[int, int]:
    """{camera index: the D4 view that keeps its CFA layout in landscape photos} for the cameras whose training
    photos tell (camid.core.patches.phase_keeping_view on the mean of their measures); an index without the
    measures (made before them) tells nothing."""
    if "phase_transpose" not in index.columns or index.empty:
        return {}
    portrait = _portrait(index)
    measured = index["phase_transpose"].to_numpy(float), index["phase_anti"].to_numpy(float)
    t, a = np.where(portrait, measured[1], measured[0]), np.where(portrait, measured[0], measured[1])
    labels = index["label_index"].to_numpy()
    found = {}
    for camera in range(cameras):
        rows = labels == camera
        view = phase_keeping_view(float(t[rows].mean()), float(a[rows].mean())) if rows.any() else None
        if view is not None:
            found[camera] = view
    return found


def phase_flips(index, cameras: int) -> np.ndarray:
    """(photos,) the D4 view that keeps each training photo's CFA layout as stored (its camera's, turned for a
    portrait photo), -1 where its camera's photos do not tell."""
    views = camera_flips(index, cameras)
    swap = {TRANSPOSE: ANTI_TRANSPOSE, ANTI_TRANSPOSE: TRANSPOSE}
    return np.array([-1 if camera not in views else swap[views[camera]] if turned else views[camera]
                     for camera, turned in zip(index["label_index"].to_numpy(), _portrait(index))], dtype=int)


class TrainPatches(keras.utils.PyDataset):
    """Class-balanced, manipulated, CFA-aligned training patches decoded from the training photos;
    `steps_per_epoch` batches per epoch (the recipe and the grouping are in the module's docstring).

    Each batch is `({"image": float32 (B, P, P, 3) in 0..255, "manipulated": float32 (B, 1)},
    {"camera": int32 (B,), "manipulation": int32 (B,)})`; "manipulation" is the auxiliary head's class
    (0 none, 1..8, see camid.core.manipulations.manipulation_index) and "manipulated" is that class > 0.
    """

    def __init__(self, cache_dir, catalog: Catalog, patch: int, batch_size: int, steps_per_epoch: int,
                 manipulation_prob: float, seed: int, crops_per_decode: int = 8, threads: int | None = None,
                 cfa_flips: bool = False, workers: int = 1, use_multiprocessing: bool = False, **kwargs):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, **kwargs)
        meta = read_meta(cache_dir)
        check_labels(meta, catalog, cache_dir)
        _check_crop(meta, patch, cache_dir)
        index = read_index(cache_dir, "train")
        _check_index(index, cache_dir, "train")
        if index.empty:
            raise CamidError(f"the cache at {cache_dir} has no training photos")
        if not 0.0 <= manipulation_prob <= 1.0:
            raise CamidError(f"manipulation_prob must lie in 0..1, got {manipulation_prob}")
        if crops_per_decode < 1:
            raise CamidError(f"train.crops_per_decode must be at least 1, got {crops_per_decode}")
        self.cache_dir, self.patch, self.batch_size = cache_dir, patch, batch_size
        self.steps_per_epoch, self.manipulation_prob, self.seed = steps_per_epoch, manipulation_prob, seed
        self.crops_per_decode = crops_per_decode
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.epoch = 0
        label_index = index["label_index"].to_numpy()
        self._photos_of = [np.flatnonzero(label_index == c) for c in range(len(catalog))]
        self._cameras = np.array([c for c, rows in enumerate(self._photos_of) if len(rows)])
        absent = [catalog.labels[c] for c, rows in enumerate(self._photos_of) if not len(rows)]
        if absent:
            log.warning("no training photos for %s: sampling only the other %d cameras", ", ".join(absent),
                        len(self._cameras))
        self._rot90 = np.array([camera.rot90 for camera in catalog.cameras])
        self._paths = index["path"].to_numpy(object)
        self._bytes = index["bytes"].to_numpy(np.int64)
        self._flip = phase_flips(index, len(catalog)) if cfa_flips else np.full(len(index), -1)
        # {camera: the flip its photos get, in the orientation most of them are stored in} (for the log)
        self.flip_views = {}
        for c, rows in enumerate(self._photos_of):
            views = self._flip[rows][self._flip[rows] >= 0]
            if len(views):
                self.flip_views[catalog.labels[c]] = D4[int(np.bincount(views).argmax())]
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._pool = None      # the decoding threads, started on first use in each process
        self._groups = {}      # (epoch, group) -> _Group
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in ("_pool", "_groups", "_lock"):  # a thread pool, futures and a lock do not travel
            state.pop(name)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    def close(self) -> None:
        """Stop the decoding threads (started again if more batches are asked for)."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        self.close()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def on_epoch_end(self) -> None:
        # Keras stops its enqueuer before this call and sends the dataset to its workers again after it, so
        # every worker sees the new epoch. (on_epoch_begin would race: the enqueuer starts before it runs.)
        self.epoch += 1

    def _group_batches(self, group: int) -> int:
        return min(self.crops_per_decode, self.steps_per_epoch - group * self.crops_per_decode)

    def _cut(self, photo: int, camera: int, slots: list[int], epoch: int, group: int, count: int):
        """Decode one photo (of `camera`) and cut `count` patches for each of its slots in the group."""
        pixels = decode_photo(self._paths[photo], int(self._bytes[photo]))
        patches = np.empty((len(slots), count, self.patch, self.patch, 3), dtype=np.uint8)
        manipulations = np.empty((len(slots), count), dtype=np.int32)
        for s, slot in enumerate(slots):
            rng = np.random.default_rng([self.seed, epoch, group, slot])
            for b in range(count):
                name = (MANIPULATIONS[rng.integers(len(MANIPULATIONS))]
                        if rng.random() < self.manipulation_prob else None)
                source = random_aligned_crop(pixels, source_size(self.patch, name), rng)
                if self._flip[photo] >= 0 and rng.random() < 0.5:
                    source = d4_view(source[None], int(self._flip[photo]))[0]
                if self._rot90[camera]:
                    source = np.rot90(source, k=int(rng.integers(4)))
                patches[s, b] = apply(source, name, self.patch)
                manipulations[s, b] = manipulation_index(name)
        return patches, manipulations

    def _submit(self, epoch: int, group: int) -> _Group:
        rng = np.random.default_rng([self.seed, epoch, group])
        cameras = self._cameras[rng.integers(len(self._cameras), size=self.batch_size)].astype(np.int32)
        photos = [int(self._photos_of[c][rng.integers(len(self._photos_of[c]))]) for c in cameras]
        slots_of: dict[int, list[int]] = {}
        for slot, photo in enumerate(photos):
            slots_of.setdefault(photo, []).append(slot)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="camid-decode")
        count = self._group_batches(group)
        futures, where = [], [None] * len(photos)
        for k, (photo, slots) in enumerate(slots_of.items()):
            futures.append(self._pool.submit(self._cut, photo, int(cameras[slots[0]]), slots, epoch, group, count))
            for s, slot in enumerate(slots):
                where[slot] = (k, s)
        return _Group(cameras, futures, where)

    def _group(self, epoch: int, group: int) -> _Group:
        """The group's decoding, started if it was not, and the next group's started ahead."""
        groups = -(-self.steps_per_epoch // self.crops_per_decode)
        with self._lock:
            for key in [key for key in self._groups if key[0] != epoch or key[1] < group - 1]:
                del self._groups[key]  # groups behind the one asked for are done with
            for g in (group, group + 1):
                if g < groups and (epoch, g) not in self._groups:
                    self._groups[(epoch, g)] = self._submit(epoch, g)
            return self._groups[(epoch, group)]

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range 0..{len(self) - 1}")
        group, b = divmod(index, self.crops_per_decode)
        images, camera, manipulation = self._group(self.epoch, group).batch(b, self.patch)
        manipulated = (manipulation > 0).astype(np.float32)[:, None]
        return {"image": images, "manipulated": manipulated}, {"camera": camera, "manipulation": manipulation}


# The stream `calibration_batches` draws from: an epoch number no training run reaches, so its batches are drawn as
# training batches are (the same recipe and seed) and are never batches training itself sees.
CALIBRATION_EPOCH = 2**31 - 1
CALIBRATION_BYTES = 2**27  # the most uint8 pixels calibration_batches holds (128 MB: 5 batches of 32 at 512 px)
CALIBRATION_CROPS = 4      # patches cut per decoded photo for the calibration batches


def calibration_batches(cache_dir, catalog: Catalog, patch: int, batch_size: int, batches: int,
                        manipulation_prob: float, seed: int, cfa_flips: bool = False,
                        max_bytes: int = CALIBRATION_BYTES) -> list[dict]:
    """Training batches, drawn once, to re-estimate BatchNormalization's statistics on
    (camid.models.callbacks.precise_batch_norm): `batches` batches of TrainPatches' recipe (class balance,
    manipulations at `manipulation_prob`, CFA flips) from their own stream (CALIBRATION_EPOCH), never the
    validation photos. Each is {"image": uint8 (B, P, P, 3), "manipulated": float32 (B, 1)}.

    Memory: at most `max_bytes` of pixels, whatever the number of photos (fewer batches where `batches` of `patch`
    would hold more; at least one); the photos are decoded once, CALIBRATION_CROPS patches per decode. `batches` 0:
    none (train.precise_bn 0, Keras' moving statistics), nothing decoded."""
    if batches <= 0:
        return []
    count = max(1, min(int(batches), max_bytes // max(1, batch_size * patch * patch * 3)))
    stream = TrainPatches(cache_dir, catalog, patch=patch, batch_size=batch_size, steps_per_epoch=count,
                          manipulation_prob=manipulation_prob, seed=seed, crops_per_decode=CALIBRATION_CROPS,
                          cfa_flips=cfa_flips)
    stream.epoch = CALIBRATION_EPOCH
    out = []
    for index in range(count):
        inputs, _ = stream[index]
        out.append({"image": inputs["image"].astype(np.uint8), "manipulated": inputs["manipulated"]})
    stream.close()
    return out


VIEWS = (None, *MANIPULATIONS)  # an evaluation photo's rows: unaltered, then each manipulation


@dataclass(frozen=True)
class EvalRows:
    """What every row of a split's evaluation set is, without its pixels: 9 rows per photo, photo-major (row
    9*i + m is photo i under manipulation index m, 0 = unaltered)."""
    labels: np.ndarray        # int32 (N*9,) camera index in catalog order
    manipulation: np.ndarray  # int32 (N*9,) 0 none, else 1 + MANIPULATIONS.index(name)
    image_id: np.ndarray      # int32 (N*9,) the photo's id within the split
    path: np.ndarray          # object (N*9,) the photo's path
    camera_labels: tuple[str, ...]

    @property
    def manipulated(self) -> np.ndarray:
        return self.manipulation > 0

    @property
    def photos(self) -> int:
        """How many photos the rows show."""
        return int(len(np.unique(self.image_id)))

    def __len__(self) -> int:
        return len(self.labels)


def _rows(index, camera_labels) -> dict:
    def repeat(column: str, dtype) -> np.ndarray:
        return np.repeat(index[column].to_numpy(dtype), len(VIEWS))

    return dict(labels=repeat("label_index", np.int32),
                manipulation=np.tile(np.arange(len(VIEWS), dtype=np.int32), len(index)),
                image_id=repeat("image", np.int32), path=repeat("path", object), camera_labels=tuple(camera_labels))


def _pixels(index, crop: int, patch: int, workers: int | None = None) -> np.ndarray:
    """uint8 (len(index) * 9, P, P, 3): each indexed photo decoded, its centre crop cut and shown unaltered and
    under each manipulation. Photos decode in threads (Pillow releases the GIL); one photo per thread at a time."""
    images = np.empty((len(index) * len(VIEWS), patch, patch, 3), dtype=np.uint8)
    paths, sizes = index["path"].to_numpy(object), index["bytes"].to_numpy(np.int64)
    tops, lefts = index["top"].to_numpy(), index["left"].to_numpy()

    def fill(i: int) -> None:
        pixels = decode_photo(paths[i], int(sizes[i]))
        source = pixels[tops[i]:tops[i] + crop, lefts[i]:lefts[i] + crop]
        for m, name in enumerate(VIEWS):
            images[i * len(VIEWS) + m] = apply(source, name, patch)

    with ThreadPoolExecutor(max(1, min(workers or os.cpu_count() or 1, len(index) or 1))) as executor:
        list(executor.map(fill, range(len(index))))
    return images


def _eval_index(cache_dir, split: str, patch: int | None, catalog: Catalog | None):
    meta = read_meta(cache_dir)
    if catalog is not None:
        check_labels(meta, catalog, cache_dir)
    patch = patch or meta["patch"]
    _check_crop(meta, patch, cache_dir)
    index = read_index(cache_dir, split)
    _check_index(index, cache_dir, split)
    if "top" not in index.columns:  # the training split records no crop: its photos' centre crops
        offsets = [centre_offsets((h, w), meta["crop"]) for h, w in zip(index["height"], index["width"])]
        index = index.assign(top=[t for t, _ in offsets], left=[l for _, l in offsets])
    return meta, patch, index


@dataclass(frozen=True)
class EvalSet(EvalRows):
    """Every photo of a split, its centre crop unaltered and under each manipulation (see EvalRows), with the
    pixels in memory."""
    images: np.ndarray = None  # uint8 (N*9, P, P, 3)

    def chunks(self):
        """(0, every row's pixels): the one chunk of a set already in memory (as EvalStream.chunks)."""
        yield 0, self.images


def eval_patches(cache_dir, split: str = "val", patch: int | None = None, catalog: Catalog | None = None,
                 workers: int | None = None, start: int = 0, stop: int | None = None) -> EvalSet:
    """The split's crops as the test set would show them (see EvalSet). `patch` defaults to the cache's.
    `start`, `stop`: only the index rows in that range (photos `start` to `stop`).

    Memory: N * 9 * P * P * 3 bytes for the N photos read (about 7 MB per photo at P=512); a whole split is
    better read as an EvalStream.
    """
    meta, patch, index = _eval_index(cache_dir, split, patch, catalog)
    index = index.iloc[start:stop]
    return EvalSet(**_rows(index, meta["labels"]), images=_pixels(index, meta["crop"], patch, workers))


CHUNK_BYTES = 2**24  # uint8 pixels of one chunk of an EvalStream (16 MB; its float32 copy is 64 MB)


@dataclass(frozen=True)
class EvalStream(EvalRows):
    """A split's evaluation rows (see EvalRows) with the pixels built `rows_per_chunk` rows at a time (`chunks`),
    so scoring a split needs memory for one chunk, not for the split. `rows_per_chunk` is a multiple of the batch
    size it was made for, so a model sees exactly the batches it would see on the whole array."""
    index: object = None          # the split's photo index (pandas), read once
    crop: int = 0
    patch: int = 0
    rows_per_chunk: int = 0

    def chunks(self):
        """(start row, uint8 (rows, P, P, 3)) for consecutive chunks of rows."""
        views = len(VIEWS)
        for start in range(0, len(self), self.rows_per_chunk):
            stop = min(start + self.rows_per_chunk, len(self))
            first, last = start // views, -(-stop // views)
            images = _pixels(self.index.iloc[first:last], self.crop, self.patch)
            offset = start - first * views
            yield start, images[offset:offset + stop - start]


def eval_stream(cache_dir, split: str = "val", patch: int | None = None, batch_size: int = 64,
                catalog: Catalog | None = None, chunk_bytes: int = CHUNK_BYTES) -> EvalStream:
    """The rows `eval_patches` would build, as an EvalStream: chunks of about `chunk_bytes` of pixels, a whole
    number of `batch_size` batches each."""
    meta, patch, index = _eval_index(cache_dir, split, patch, catalog)
    batches = max(1, chunk_bytes // (batch_size * patch * patch * 3))
    return EvalStream(**_rows(index, meta["labels"]), index=index, crop=meta["crop"], patch=patch,
                      rows_per_chunk=batches * batch_size)
