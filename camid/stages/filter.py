"""The filter stage: keep only untouched originals of the catalog's cameras.

`camid filter RAW_DIR --out OUT_DIR [--metrics metrics/filter.json]`

RAW_DIR is the Kaggle layout, RAW_DIR/train/<label>/<files>: the folder names the camera a photo claims to come
from, and every file is checked against that camera's catalog entry (params.yaml). A photo is kept only if
  it decodes completely (truncated files are rejected), is a JPEG, its EXIF Model matches the camera's patterns,
  its EXIF PixelX/YDimension (where present) agree with the pixel size (a resized photo keeps stale ones), its
  size is a native size of the camera in either orientation, its ImageMagick quality is >= filter.min_quality,
  no editing software is named in its metadata, and it is neither a byte-exact copy (sha256) nor a
  near-duplicate (phash Hamming distance < filter.phash_max_distance) of a photo kept before it.
Files are judged in sorted order (labels, then paths), so the result is deterministic.

Output, built in a temporary directory and renamed into place: OUT_DIR/<label>/<file> hard links to the kept
originals (copies across filesystems) and OUT_DIR/manifest.parquet with every input file, kept or not, its
reason code (REASONS) and its inspection record; per camera and per reason counts go to the metrics JSON.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from camid.config import Camera, Catalog, FilterParams, load_params
from camid.errors import CamidError
from camid.core.fileio import atomic_dir, iter_files, write_json
from camid.forensics.inspect import ERROR_KINDS, FIELDS, error_kind, inspect_paths

REASONS = {
    "kept": "kept",
    **{kind: f"unreadable: {meaning}" for kind, meaning in ERROR_KINDS.items()},
    "not_jpeg": "not a JPEG (camera originals are JPEGs)",
    "no_exif_model": "no EXIF Model",
    "wrong_model": "EXIF Model does not match the camera's patterns",
    "exif_size_mismatch": "EXIF PixelX/YDimension disagree with the pixel size (resized)",
    "not_native_size": "pixel size is not a native size of the camera",
    "low_quality": "ImageMagick quality below filter.min_quality (recompressed)",
    "edited": "editing software named in EXIF / XMP / Photoshop resources",
    "duplicate": "byte-identical to a photo already kept",
    "near_duplicate": "perceptual hash within filter.phash_max_distance of a photo already kept",
}
MANIFEST = "manifest.parquet"
_INT_FIELDS = ("width", "height", "exif_width", "exif_height", "orientation", "quality")


def judge(record: dict, camera: Camera, params: FilterParams) -> tuple[str, str]:
    """(reason, detail) from the rules that look at one file alone; reason "kept" if it passes them all."""
    if record["error"]:
        return error_kind(record["error"]), record["error"]
    if record["format"] != "JPEG":
        return "not_jpeg", f"format {record['format']}"
    if not record["model"]:
        return "no_exif_model", "no EXIF Model"
    if not camera.matches_model(record["model"]):
        return "wrong_model", f"Model {record['model']!r} is not one of {list(camera.models)}"
    height, width = record["height"], record["width"]
    exif_size = (record["exif_height"], record["exif_width"])
    if any(exif_size) and not any(all(e is None or e == p for e, p in zip(exif_size, pixels))
                                  for pixels in ((height, width), (width, height))):
        return "exif_size_mismatch", f"EXIF says {exif_size[0]}x{exif_size[1]}, pixels are {height}x{width}"
    if not camera.is_native_size(height, width):
        return "not_native_size", f"{height}x{width} (h x w) is not one of {[list(s) for s in camera.sizes]}"
    if record["quality"] < params.min_quality:
        return "low_quality", f"quality {record['quality']} < {params.min_quality}"
    if record["edited"]:
        return "edited", record["edit_reason"]
    return "kept", ""


class _Kept:
    """What has been kept so far, for the duplicate rules."""

    def __init__(self, capacity: int):
        self.by_sha256: dict[str, str] = {}
        self.paths: list[str] = []
        self.phashes = np.zeros(capacity, dtype=np.uint64)

    def match(self, record: dict, max_distance: int) -> tuple[str, str, str | None]:
        if record["sha256"] in self.by_sha256:
            original = self.by_sha256[record["sha256"]]
            return "duplicate", f"same sha256 as {original}", original
        if self.paths:
            distances = np.bitwise_count(self.phashes[:len(self.paths)] ^ np.uint64(int(record["phash"], 16)))
            nearest = int(np.argmin(distances))
            if distances[nearest] < max_distance:
                original = self.paths[nearest]
                return "near_duplicate", f"phash distance {distances[nearest]} to {original}", original
        return "kept", "", None

    def add(self, record: dict, kept_path: str) -> None:
        self.by_sha256[record["sha256"]] = kept_path
        self.phashes[len(self.paths)] = np.uint64(int(record["phash"], 16))
        self.paths.append(kept_path)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed: copy instead
        shutil.copy2(source, target)


def _inputs(raw_dir: Path, catalog: Catalog) -> dict[str, list[Path]]:
    train = raw_dir / "train"
    if not train.is_dir():
        raise CamidError(f"{train} is not a directory: RAW_DIR must hold train/<label>/<files> (the Kaggle layout)")
    labels = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [label for label in labels if label not in catalog.labels]
    if unknown:
        raise CamidError(f"{train} has folder(s) {unknown} that are not cameras of the {catalog.name!r} catalog "
                         f"({', '.join(catalog.labels)}); switch catalog.active in params.yaml or remove them")
    return {label: iter_files([train / label]) for label in labels}


def filter_raw(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, catalog: Catalog, params: FilterParams, *,
               metrics_path: str | os.PathLike | None = None, workers: int = 1, progress: bool = True) -> pd.DataFrame:
    """Run the filter stage; returns the manifest (also written to OUT_DIR/manifest.parquet)."""
    raw_dir = Path(raw_dir)
    inputs = _inputs(raw_dir, catalog)
    kept = _Kept(sum(map(len, inputs.values())))
    rows = []
    with atomic_dir(out_dir) as tmp:
        for label, files in inputs.items():
            camera = catalog.get(label)
            records = inspect_paths(files, params.editors, params.max_pixels, workers=workers)
            for source, record in zip(files, tqdm(records, total=len(files), desc=label, unit="file",
                                                  disable=not progress)):
                reason, detail = judge(record, camera, params)
                duplicate_of = kept_path = None
                if reason == "kept":
                    reason, detail, duplicate_of = kept.match(record, params.phash_max_distance)
                if reason == "kept":
                    kept_path = (Path(label) / source.relative_to(raw_dir / "train" / label)).as_posix()
                    _link(source, tmp / kept_path)
                    kept.add(record, kept_path)
                rows.append({**record, "path": source.relative_to(raw_dir).as_posix(), "label": label,
                             "kept": reason == "kept", "reason": reason, "detail": detail,
                             "kept_path": kept_path, "duplicate_of": duplicate_of})
        manifest = _manifest(rows)
        manifest.to_parquet(tmp / MANIFEST, index=False)
    if metrics_path:
        write_json(metrics_path, summarize(manifest, catalog))
    return manifest


def _manifest(rows: list[dict]) -> pd.DataFrame:
    columns = ["path", "label", "kept", "reason", "detail", "kept_path", "duplicate_of"] + \
              [f for f in FIELDS if f != "path"]
    frame = pd.DataFrame(rows, columns=columns)
    dtypes = {c: "Int64" for c in _INT_FIELDS} | {"kept": "boolean", "edited": "boolean"}
    return frame.astype({c: dtypes.get(c, "string") for c in columns})


def summarize(manifest: pd.DataFrame, catalog: Catalog) -> dict:
    """Counts per camera and per reason (every reason code present, zeros included, for stable DVC metrics)."""
    def counts(frame: pd.DataFrame) -> dict:
        by_reason = frame["reason"].value_counts()
        return {"files": len(frame), "kept": int(frame["kept"].sum()),
                "reasons": {reason: int(by_reason.get(reason, 0)) for reason in REASONS}}

    return {**counts(manifest),
            "cameras": {label: counts(manifest[manifest["label"] == label]) for label in catalog.labels}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("raw_dir", metavar="RAW_DIR", help="Kaggle-layout input: RAW_DIR/train/<label>/<files>")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="kept photos (linked) and manifest.parquet")
    parser.add_argument("--metrics", default="metrics/filter.json", help="per camera and reason counts (JSON)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all CPUs)")


def run(args: argparse.Namespace) -> int:
    params = load_params()
    manifest = filter_raw(args.raw_dir, args.out, params.catalog, params.filter, metrics_path=args.metrics,
                          workers=args.workers)
    print(f"kept {int(manifest['kept'].sum())} of {len(manifest)} files in {args.out}")
    for reason, count in manifest.loc[~manifest["kept"], "reason"].value_counts().sort_index().items():
        print(f"  {reason}: {count}")
    return 0
