"""The crop cache: decode each photo of a split once into CFA-aligned uint8 crops (written by the prepare stage,
read by training, tuning and evaluation).

Full photos are 8 to 24 megapixels; decoding one per training patch would starve the trainer. This stage
decodes every photo of the split once and keeps square crops of side C = 2 * train.patch, the largest source
any manipulation needs (resize0.5 cuts 2P pixels), so training can cut and manipulate patches from them:

    OUT/meta.json                  patch, crop, labels (catalog order), seed, counts, skipped photos
    OUT/train/crops-00000.npy      uint8 (n, C, C, 3), at most prepare.shard_size crops; np.load(mmap_mode="r")
    OUT/train/index.parquet        one row per crop: shard, row, image, label, label_index, path, top, left
    OUT/val/..., OUT/test/...      the same; one centre crop per photo, as the Kaggle test set was made

Training crops sit at random even offsets (`prepare.crops_per_image` per photo, positions seeded by
`prepare.seed` and the photo's path, so the cache is the same whatever the worker count). Pixels are cached as
stored: EXIF orientation is not applied, since rotating would change the CFA phase.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from camid.config import Catalog
from camid.errors import CamidError
from camid.core.fileio import atomic_dir, write_json
from camid.core.imageio import ImageError, decode_image
from camid.core.manipulations import max_source_size
from camid.core.patches import aligned_offsets, centre_offsets

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
META = "meta.json"
INDEX = "index.parquet"


def shard_path(cache_dir: str | os.PathLike, split: str, shard: int) -> Path:
    return Path(cache_dir) / split / f"crops-{shard:05d}.npy"


def read_meta(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / META
    if not path.is_file():
        raise CamidError(f"{path} not found: run `camid prepare SPLIT_DIR --out {cache_dir}` first")
    return json.loads(path.read_text())


def read_index(cache_dir: str | os.PathLike, split: str) -> pd.DataFrame:
    path = Path(cache_dir) / split / INDEX
    if not path.is_file():
        raise CamidError(f"{path} not found: the cache at {cache_dir} has no {split!r} split; re-run camid prepare")
    return pd.read_parquet(path)


def split_photos(cache_dir: str | os.PathLike, split: str) -> pd.DataFrame:
    """One row per photo of a cached split (the index's first crop of each): image, path, label, label_index."""
    return read_index(cache_dir, split).drop_duplicates("image").reset_index(drop=True)


def split_fingerprint(cache_dir: str | os.PathLike, split: str, labels: list[str]) -> str:
    """What a score was measured on, for comparing scores (the champion alias): the photos of the split (path,
    size, label) and the catalog's labels, hashed."""
    import hashlib

    photos = split_photos(cache_dir, split)
    digest = hashlib.sha256(json.dumps(labels).encode())
    for path, label in sorted(zip(photos["path"], photos["label"])):
        size = Path(path).stat().st_size if Path(path).exists() else -1
        digest.update(f"{path}\0{size}\0{label}\n".encode())
    return digest.hexdigest()[:16]


def check_labels(meta: dict, catalog: Catalog, cache_dir) -> None:
    if list(meta["labels"]) != catalog.labels:
        raise CamidError(f"the cache at {cache_dir} was made for cameras {meta['labels']}, but the active catalog "
                         f"{catalog.name!r} has {catalog.labels}: re-run the prepare stage (dvc repro prepare)")


@dataclass(frozen=True)
class _Job:
    path: str
    crop: int
    count: int          # random crops to cut; 0 means one centre crop
    seed: int


def _cut(job: _Job) -> tuple[np.ndarray | None, list[tuple[int, int]], str | None]:
    """Decode one photo and cut its crops: (crops, offsets, None), or (None, [], why it was skipped)."""
    try:
        pixels = decode_image(Path(job.path).read_bytes())  # the decoder serving uses: any mode becomes RGB
    except FileNotFoundError:
        return None, [], "file not found"
    except (OSError, ImageError) as exc:
        return None, [], f"cannot decode: {exc}"
    height, width = pixels.shape[:2]
    if height < job.crop or width < job.crop:
        return None, [], f"{height}x{width} is smaller than the {job.crop}x{job.crop} crop"
    if job.count == 0:
        offsets = [centre_offsets(pixels.shape, job.crop)]
    else:
        rng = np.random.default_rng([job.seed, zlib.crc32(job.path.encode())])
        offsets = [aligned_offsets(pixels.shape, job.crop, rng) for _ in range(job.count)]
    crops = np.stack([pixels[top:top + job.crop, left:left + job.crop] for top, left in offsets])
    return crops, offsets, None


class _ShardWriter:
    """Streams crops into .npy shards of at most `shard_size` rows, without holding a shard in memory.

    Each shard's header is written for a full shard, then rewritten with the real row count on close; numpy
    pads .npy headers so that the first dimension can grow, so the header length does not change.
    """

    def __init__(self, folder: Path, crop: int, shard_size: int):
        self.folder, self.crop, self.shard_size = folder, crop, shard_size
        self.shard, self.rows, self.file = -1, 0, None
        folder.mkdir(parents=True, exist_ok=True)

    def _header(self, rows: int) -> None:
        self.file.seek(0)
        np.lib.format.write_array_header_1_0(
            self.file, {"descr": "|u1", "fortran_order": False, "shape": (rows, self.crop, self.crop, 3)})

    def _close_shard(self) -> None:
        if self.file is not None:
            end = self.file.tell()
            self._header(self.rows)
            if self.file.tell() != self.data_start:
                raise RuntimeError("npy header changed length")  # cannot happen with numpy's growth padding
            self.file.seek(end)
            self.file.close()
            self.file = None

    def add(self, crop: np.ndarray) -> tuple[int, int]:
        """Append one (C, C, 3) crop; returns its (shard, row)."""
        if self.file is None or self.rows == self.shard_size:
            self._close_shard()
            self.shard, self.rows = self.shard + 1, 0
            self.file = open(shard_path(self.folder.parent, self.folder.name, self.shard), "wb")
            self._header(self.shard_size)
            self.data_start = self.file.tell()
        self.file.write(np.ascontiguousarray(crop, dtype=np.uint8).tobytes())
        self.rows += 1
        return self.shard, self.rows - 1

    def close(self) -> None:
        self._close_shard()


def _read_split_csv(split_dir: Path, split: str, catalog: Catalog) -> pd.DataFrame:
    path = split_dir / f"{split}.csv"
    if not path.is_file():
        raise CamidError(f"{path} not found: SPLIT_DIR must hold train.csv, val.csv and test.csv (columns path,label; "
                         "the split stage writes them)")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise CamidError(f"{path} lacks column(s) {', '.join(sorted(missing))}; expected path,label")
    unknown = sorted(set(table["label"]) - set(catalog.labels))
    if unknown:
        raise CamidError(f"{path} has label(s) not in the {catalog.name!r} catalog: {', '.join(unknown)}")
    return table


def prepare(split_dir: str | os.PathLike, out: str | os.PathLike, catalog: Catalog, *, patch: int,
            crops_per_image: int, shard_size: int, seed: int, workers: int | None = None) -> dict:
    """Build the crop cache at `out` (replaced whole, atomically) and return its meta."""
    split_dir, out = Path(split_dir), Path(out)
    if crops_per_image < 1 or shard_size < 1:
        raise CamidError("prepare.crops_per_image and prepare.shard_size must be at least 1")
    crop = max_source_size(patch)
    tables = {split: _read_split_csv(split_dir, split, catalog) for split in SPLITS}
    workers = max(1, workers or os.cpu_count() or 1)
    meta = {"patch": patch, "crop": crop, "labels": catalog.labels, "catalog": catalog.name, "seed": seed,
            "crops_per_image": crops_per_image, "shard_size": shard_size, "splits": {}, "skipped": []}
    if (split_dir / "summary.json").is_file():  # how the split was made travels with the data it made
        summary = json.loads((split_dir / "summary.json").read_text())
        meta["split"] = {"device_disjoint": summary.get("device_disjoint", False),
                         "fallback_cameras": summary.get("fallback_cameras", []),
                         "modes": {label: c.get("mode") for label, c in summary.get("cameras", {}).items()}}
    # spawn, not fork: forking a process that has started TensorFlow's threads (a notebook, a test run) can hang
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        with atomic_dir(out) as tmp:
            for split, table in tables.items():
                count = crops_per_image if split == "train" else 0
                jobs = [_Job(path, crop, count, seed) for path in table["path"]]
                results = pool.imap(_cut, jobs) if pool else map(_cut, jobs)
                writer, rows, kept, skipped = _ShardWriter(tmp / split, crop, shard_size), [], 0, 0
                for (path, label), (crops, offsets, reason) in tqdm(
                        zip(zip(table["path"], table["label"]), results), total=len(jobs),
                        desc=f"prepare {split}", unit="photo", leave=False):
                    if reason:
                        log.warning("skipping %s (%s): %s", path, split, reason)
                        meta["skipped"].append({"split": split, "path": path, "label": label, "reason": reason})
                        skipped += 1
                        continue
                    image = kept
                    kept += 1
                    for crop_pixels, (top, left) in zip(crops, offsets):
                        shard, row = writer.add(crop_pixels)
                        rows.append({"shard": shard, "row": row, "image": image, "label": label,
                                     "label_index": catalog.index(label), "path": path, "top": top, "left": left})
                writer.close()
                _index_frame(rows).to_parquet(tmp / split / INDEX, index=False)
                meta["splits"][split] = {"photos": kept, "crops": len(rows), "skipped": skipped,
                                         "shards": writer.shard + 1}
                log.info("%s: %d crops of %dx%d from %d photos (%d skipped)", split, len(rows), crop, crop,
                         kept, skipped)
            write_json(tmp / META, meta)
    finally:
        if pool:
            pool.terminate()
            pool.join()
    return meta


def _index_frame(rows: list[dict]) -> pd.DataFrame:
    columns = {"shard": "int32", "row": "int32", "image": "int32", "label": "str", "label_index": "int32",
               "path": "str", "top": "int32", "left": "int32"}
    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.astype(columns)
