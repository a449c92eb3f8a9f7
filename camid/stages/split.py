"""The split stage: train / validation / test sets that share no device.

A camera model is identified on devices the network never saw, as on the Kaggle test set. Every device
leaves its own sensor pattern (PRNU) in its photos, so a split that puts photos of one device on both sides
measures device identification, not model identification. Here each camera's devices are dealt to the three
sets, so no device appears in two of them:

- validation drives every training decision (checkpoint, learning rate, early stopping, tuning, the choice of
  test-time views and blend); test is scored once, by the evaluate stage, for the reported figures and the
  champion alias;
- a photo's device is, first found: the `<label>/<device>/<file>` folder it sits in (`folder:`); else the
  `device` column of the raw folder's manifest (`manifest:`); else the Flickr `owner` in that manifest
  (`owner:`; one owner's photos of one camera are taken as one device, a conservative grouping: an owner with
  two bodies of a model only makes the split stricter); else its EXIF serial number (BodySerialNumber, or DNG's
  CameraSerialNumber; `serial:`); photos of no known device go to training only, where they cannot leak into a
  score. How many photos each source covered is `device_sources` in the summary;
- the manifest is `manifest.jsonl` (one JSON object a line, as the Flickr crawler writes and `camid ingest`
  links beside train/) or else `manifest.csv`, in the raw folder (`--raw`, default `data/raw`, the folder the
  filter stage read). A row is keyed by its `file` (or else `path`) column: the photo's path relative to the
  raw folder's train/ (`<label>/<file>`, which is also its path in the filtered folder); a leading `train/`,
  as the crawler writes it, is dropped. A row counts only where `<raw>/train/<key>` is a file of the same size
  as the filtered photo, so a manifest of another data set cannot group these photos. No manifest (the zoo,
  a Kaggle folder) is normal: folders and serials alone, as before;
- a camera with three devices or more gets at least one in each set (`test_fraction` and `val_fraction` of
  them, rounded, at least one each); with two, one device is the test set and validation is a photo split of
  the other; with one (or none known), all three are photo splits. Those fallbacks are named per camera in
  the summary and in `metrics/split.json`, since their test figure then measures device identification. A photo
  split holds out `photo_fraction` of the camera's photos for validation and as much for test (at least one
  each), less than a device split's shares: with one reference device per model, a test figure on its own
  photos measures device identification whatever its size, and every photo held out is one training cannot use.
  Each held-out set is one run of consecutive shots (by EXIF DateTimeOriginal, else file name) at a seeded
  place, not photos drawn one by one, so that validation's photos are not burst neighbours of training photos
  (camid.data.splitting._photo_split says why). With `split.session_validation` (off by default: measured, see
  the README), where the photos are several sessions (shots more than `camid.data.splitting.SESSION_GAP`, an
  hour, apart), validation is its share in whole sessions of them instead (from a session drawn among those of at
  most twice its share, the sessions after it in time), so that it is as new to training as another device's photos.

Input is the filter stage's output (`<filtered>/<label>/...`, read recursively) and the raw folder's manifest
where there is one; output is `train.csv`,
`val.csv`, `test.csv` (columns `path,label,device`) and `summary.json` (per camera: devices and photos per
set, the mode used, and for a photo split how many of its photos had a capture time to order the runs by).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from camid.config import load_params
from camid.errors import CamidError
from camid.core.fileio import atomic_dir, write_json
from camid.core.imageio import list_labelled
from camid.data.splitting import MIN_DEVICES, MODES, PHOTO_FRACTION, SETS, device_split, split_camera  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# Sources of device identity, in the order they are tried; a device id is "<source>:<id>" ("" is unknown).
DEVICE_SOURCES = ("folder", "manifest", "owner", "serial")
MANIFESTS = ("manifest.jsonl", "manifest.csv")  # in the raw folder, the first found is read


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def read_manifest(raw: Path | None) -> dict[str, dict[str, str]]:
    """{key: {"device": ..., "owner": ...}} from the raw folder's manifest, keyed by the path relative to train/
    (`<label>/<file>`); {} where there is none."""
    if raw is None:
        return {}
    path = next((Path(raw) / name for name in MANIFESTS if (Path(raw) / name).is_file()), None)
    if path is None:
        return {}
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            rows = pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
    except (OSError, ValueError) as exc:
        raise CamidError(f"{path}: cannot read the manifest ({exc})") from exc
    found = {}
    for row in rows:
        if not isinstance(row, dict):
            continue
        key = (_text(row.get("file")) or _text(row.get("path"))).removeprefix("train/")
        if key:
            found[key] = {"device": _text(row.get("device")), "owner": _text(row.get("owner"))}
    log.info("%s: %d rows", path, len(found))
    return found


def _manifest_row(path: str, filtered: Path | None, raw: Path | None, manifest: dict) -> dict[str, str]:
    """The manifest row of a filtered photo, where its key names a raw photo of the same size."""
    if not manifest or filtered is None:
        return {}
    key = Path(os.path.relpath(path, filtered)).as_posix()
    row = manifest.get(key)
    if not row:
        return {}
    source = Path(raw) / "train" / key
    try:
        return row if source.is_file() and source.stat().st_size == Path(path).stat().st_size else {}
    except OSError:
        return {}


def devices(files: pd.DataFrame, filtered: Path | None = None, raw: Path | None = None,
            times: dict[str, str] | None = None) -> pd.Series:
    """Each photo's device (see DEVICE_SOURCES): its device folder, else the manifest's device, else its owner,
    else its EXIF serial number, else "" (unknown). `filtered` is the folder `files` were listed from. Where
    `times` is given, the capture time of every header read for a serial goes into it (path -> time, "" where
    none), so that `capture_times` need not read that header again."""
    from camid.forensics.inspect import inspect_file

    manifest = read_manifest(raw)

    def device(path: str, folder: str) -> str:
        if folder:
            return f"folder:{folder}"
        row = _manifest_row(path, filtered, raw, manifest)
        if row.get("device"):
            return f"manifest:{row['device']}"
        if row.get("owner"):
            return f"owner:{row['owner']}"
        header = inspect_file(path, hashes=False)
        if times is not None:
            times[path] = header["datetime"] or ""
        return f"serial:{header['serial']}" if header["serial"] else ""

    return pd.Series([device(p, f) for p, f in zip(files["path"], files["folder"])], index=files.index, dtype=str)


def capture_times(files: pd.DataFrame, read: dict[str, str] | None = None) -> pd.Series:
    """Each photo's EXIF capture time ("" where unknown), only for the cameras that get photo splits (fewer than
    MIN_DEVICES known devices), whose held-out sets are runs of consecutive shots: from `read` (what `devices`
    kept of the headers it read) where there, else from the photo's header."""
    from camid.forensics.inspect import inspect_file

    read = read or {}
    known = files[files["device"] != ""].groupby("label")["device"].nunique()
    few = files["label"].map(known).fillna(0) < MIN_DEVICES

    def taken(path: str) -> str:
        return read[path] if path in read else inspect_file(path, hashes=False)["datetime"] or ""

    return pd.Series([taken(path) if photo_split else "" for path, photo_split in zip(files["path"], few)],
                     index=files.index, dtype=str)


def device_sources(tables: dict[str, pd.DataFrame]) -> dict[str, int]:
    """Photos per source of device identity, over all sets ("unknown": none found)."""
    ids = pd.concat([table["device"] for table in tables.values()])
    source = ids.str.split(":", n=1).str[0].where(ids != "", "unknown")
    return {name: int((source == name).sum()) for name in (*DEVICE_SOURCES, "unknown")}


def summarize(tables: dict[str, pd.DataFrame], modes: dict[str, str]) -> dict:
    cameras = {}
    for label, mode in modes.items():
        rows = {name: table[table["label"] == label] for name, table in tables.items()}
        cameras[label] = {"mode": mode,
                          "photos": {name: len(rows[name]) for name in SETS},
                          "devices": {name: int(rows[name].loc[rows[name]["device"] != "", "device"].nunique())
                                      for name in SETS}}
    fallback = sorted(label for label, mode in modes.items() if mode != "devices")
    return {"device_disjoint": not fallback, "fallback_cameras": fallback,
            "photos": {name: len(table) for name, table in tables.items()},
            "device_sources": device_sources(tables), "cameras": cameras}


def split(filtered: Path, out: Path, labels: list[str], *, val_fraction: float, test_fraction: float, seed: int,
          photo_fraction: float = PHOTO_FRACTION, metrics_file: Path | None = None, raw: Path | None = None,
          by_session: bool = False) -> dict:
    """Split the photos under `filtered`; `raw` is the raw folder whose manifest (if any) names devices;
    `by_session`: split.session_validation."""
    files = list_labelled(Path(filtered), labels)
    if files.empty:
        raise CamidError(f"no images under {filtered}/<label>/ for the catalog's cameras; run the filter stage first")
    times: dict[str, str] = {}
    files["device"] = devices(files, Path(filtered), raw, times)
    files["taken"] = capture_times(files, times)
    tables, modes = device_split(files, val_fraction, test_fraction, seed, photo_fraction, by_session)
    summary = summarize(tables, modes)
    for label, mode in modes.items():  # what ordered a photo split's runs of shots: capture times, else file names
        if mode != "devices":
            summary["cameras"][label]["photos_with_capture_time"] = int((files.loc[files["label"] == label, "taken"]
                                                                          != "").sum())
    with atomic_dir(out) as tmp:
        for name, table in tables.items():
            table.to_csv(tmp / f"{name}.csv", index=False)
        write_json(tmp / "summary.json", summary)
    if metrics_file:
        write_json(metrics_file, summary)
    for label in summary["fallback_cameras"]:
        log.warning("%s: %s, so its test figure measures device identification, not model identification; add "
                    "photos of more devices (a <label>/<device>/ folder each) for an honest figure",
                    label, MODES[modes[label]])
    log.info("split %d photos: %s; devices from %s", len(files),
             ", ".join(f"{n} {name}" for name, n in summary["photos"].items()),
             ", ".join(f"{source} {n}" for source, n in summary["device_sources"].items() if n))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("filtered", type=Path, help="the filter stage's output folder (<label>/<files>)")
    parser.add_argument("--out", type=Path, default=Path("data/split"), help="output folder (train/val/test.csv)")
    parser.add_argument("--metrics", type=Path, help="also write the summary here (DVC metrics)")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"),
                        help="the raw folder the filter stage read: its manifest.jsonl / manifest.csv, where there "
                             "is one, gives devices (`device` column) or Flickr owners (default: data/raw)")


def run(args: argparse.Namespace) -> int:
    params = load_params()
    summary = split(args.filtered, args.out, params.catalog.labels, val_fraction=params.split.val_fraction,
                    test_fraction=params.split.test_fraction, seed=params.split.seed,
                    photo_fraction=params.split.photo_fraction, metrics_file=args.metrics,
                    raw=args.raw, by_session=params.split.session_validation)
    print(f"split: {', '.join(f'{n} {name}' for name, n in summary['photos'].items())} photos; "
          + ("no device in two sets" if summary["device_disjoint"] else
             f"photo-split fallback for {', '.join(summary['fallback_cameras'])} (too few devices)"))
    return 0
