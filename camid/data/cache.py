"""The photo index of each split (written by the prepare stage, read by training, tuning and evaluation).

The cache holds no pixels. Training and scoring decode the split's photos as they go (camid.data.dataset), and
cut CFA-aligned crops from the decoded pixels; what the prepare stage does once is check every photo and write
down where its crops lie:

    OUT/meta.json           patch, crop, labels (catalog order), counts, skipped photos
    OUT/train/index.parquet one row per photo: image, label, label_index, path, height, width, bytes, sha256,
                            phase_transpose, phase_anti (camid.core.patches.phase_symmetry)
    OUT/val/index.parquet   the same, plus top, left: the photo's centre crop, as the Kaggle test set was made
    OUT/test/index.parquet  (the same)

Why no crops on disk: at the seed's size (25,000 photos of 8 to 24 megapixels, patch 512) uncompressed crops of
side 2 x 512 cost 3 MB each, so 16 per photo make a store 10 to 20 times the photos' own bytes (1 to 2 TB), and
lossless compression of sensor noise saves less than half. Decoding is cheap by comparison (about 0.09 s per
10-megapixel JPEG on one core) when one decode yields many crops (`train.crops_per_decode`): bench/input_pipeline.py
measures the rate. The index is a few hundred bytes per photo.

Each row records the photo's byte count and sha256, so reading a photo that changed since the prepare stage is an
error (`check_photo`), never a silent change of the data. Pixels are decoded as stored: EXIF orientation is not
applied, since rotating would change the CFA phase. The crop side C = 2 * train.patch is the largest source any
manipulation needs (resize0.5 cuts 2P pixels); a photo smaller than C x C is skipped with its reason.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
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
from camid.core.patches import centre_offsets, phase_symmetry

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
META = "meta.json"
INDEX = "index.parquet"


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


class PhotoChanged(CamidError):
    """A cached photo's bytes are not those the prepare stage indexed."""


def photo_bytes(path: str, size: int | None = None, sha256: str | None = None) -> bytes:
    """The bytes of an indexed photo, checked against the index's `size` and `sha256` where given."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise PhotoChanged(f"{path} is gone since the prepare stage indexed it: restore it, or re-run the prepare "
                           "stage (dvc repro prepare)") from None
    if (size is not None and len(data) != size) or (sha256 and hashlib.sha256(data).hexdigest() != sha256):
        raise PhotoChanged(f"{path} changed since the prepare stage indexed it: re-run the prepare stage "
                           "(dvc repro prepare)")
    return data


def decode_photo(path: str, size: int | None = None, sha256: str | None = None) -> np.ndarray:
    """An indexed photo's pixels, uint8 (H, W, 3), with the decoder serving uses (any mode becomes RGB)."""
    return decode_image(photo_bytes(path, size, sha256))


@dataclass(frozen=True)
class _Job:
    path: str
    crop: int
    centre: bool        # record the centre crop's offsets (val, test)


def _check(job: _Job) -> tuple[dict | None, str | None]:
    """Decode one photo as training will: (its index facts, None), or (None, why it was skipped)."""
    try:
        data = Path(job.path).read_bytes()
        pixels = decode_image(data)
    except FileNotFoundError:
        return None, "file not found"
    except (OSError, ImageError) as exc:
        return None, f"cannot decode: {exc}"
    height, width = pixels.shape[:2]
    if height < job.crop or width < job.crop:
        return None, f"{height}x{width} is smaller than the {job.crop}x{job.crop} crop"
    facts = {"height": height, "width": width, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # How each diagonal flip changes the photo's CFA phase structure (camid.core.patches.phase_symmetry): training
    # reads off it the flip that keeps its camera's layout.
    facts["phase_transpose"], facts["phase_anti"] = phase_symmetry(pixels)
    if job.centre:
        facts["top"], facts["left"] = centre_offsets(pixels.shape, job.crop)
    return facts, None


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
            workers: int | None = None) -> dict:
    """Check every photo of the split and write the photo index at `out` (replaced whole, atomically); return
    its meta. Each photo is decoded once, in `workers` processes, so a photo training cannot use is skipped
    here with its reason rather than failing a training run."""
    split_dir, out = Path(split_dir), Path(out)
    crop = max_source_size(patch)
    tables = {split: _read_split_csv(split_dir, split, catalog) for split in SPLITS}
    workers = max(1, workers or os.cpu_count() or 1)
    meta = {"patch": patch, "crop": crop, "labels": catalog.labels, "catalog": catalog.name, "splits": {},
            "skipped": []}
    if (split_dir / "summary.json").is_file():  # how the split was made travels with the data it made
        summary = json.loads((split_dir / "summary.json").read_text())
        meta["split"] = {"device_disjoint": summary.get("device_disjoint", False),
                         "fallback_cameras": summary.get("fallback_cameras", []),
                         "modes": {label: c.get("mode") for label, c in summary.get("cameras", {}).items()},
                         "train_devices": {label: int(c.get("devices", {}).get("train", 0))
                                           for label, c in summary.get("cameras", {}).items()}}
    # spawn, not fork: forking a process that has started TensorFlow's threads (a notebook, a test run) can hang
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        with atomic_dir(out) as tmp:
            for split, table in tables.items():
                jobs = [_Job(path, crop, centre=split != "train") for path in table["path"]]
                results = pool.imap(_check, jobs) if pool else map(_check, jobs)
                rows, skipped = [], 0
                for (path, label), (facts, reason) in tqdm(
                        zip(zip(table["path"], table["label"]), results), total=len(jobs),
                        desc=f"prepare {split}", unit="photo", leave=False):
                    if reason:
                        log.warning("skipping %s (%s): %s", path, split, reason)
                        meta["skipped"].append({"split": split, "path": path, "label": label, "reason": reason})
                        skipped += 1
                        continue
                    rows.append({"image": len(rows), "label": label, "label_index": catalog.index(label),
                                 "path": path, **facts})
                (tmp / split).mkdir(parents=True, exist_ok=True)
                frame = _index_frame(rows, centre=split != "train")
                frame.to_parquet(tmp / split / INDEX, index=False)
                meta["splits"][split] = {"photos": len(rows), "skipped": skipped,
                                         "pixels": int((frame["height"] * frame["width"]).sum()),
                                         "bytes": int(frame["bytes"].sum())}
                log.info("%s: %d photos (%d skipped)", split, len(rows), skipped)
            write_json(tmp / META, meta)
    finally:
        if pool:
            pool.terminate()
            pool.join()
    return meta


def _index_frame(rows: list[dict], centre: bool) -> pd.DataFrame:
    columns = {"image": "int32", "label": "str", "label_index": "int32", "path": "str", "height": "int32",
               "width": "int32", "bytes": "int64", "sha256": "str", "phase_transpose": "float64",
               "phase_anti": "float64"}
    if centre:
        columns.update({"top": "int32", "left": "int32"})
    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.astype(columns)
