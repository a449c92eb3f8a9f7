"""The split stage: a stratified, seeded train/validation split of the filtered photos.

Input is the filter stage's output (`<filtered>/<label>/<files>`); output is `train.csv` and `val.csv`
(columns `path,label`) plus a per-camera count summary. Every camera keeps at least one photo on each side.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from camid.config import load_params
from camid.errors import CamidError
from camid.fileio import atomic_dir, write_json

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}


def list_labelled(root: Path, labels: list[str]) -> pd.DataFrame:
    """Every image file under `root/<label>/`, in sorted order, for the catalog's labels."""
    rows = []
    for label in labels:
        folder = root / label
        if not folder.is_dir():
            continue
        rows += [(str(p), label) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return pd.DataFrame(rows, columns=["path", "label"])


def stratified_split(files: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not 0 < val_fraction < 1:
        raise CamidError(f"split.val_fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label, group in files.groupby("label", sort=True):
        if len(group) < 2:
            raise CamidError(f"camera {label!r} has {len(group)} photo(s) after filtering; the split needs at least 2")
        order = rng.permutation(len(group))
        n_val = min(len(group) - 1, max(1, round(len(group) * val_fraction)))
        val.append(group.iloc[order[:n_val]])
        train.append(group.iloc[order[n_val:]])
    return (pd.concat(train).sort_values("path").reset_index(drop=True),
            pd.concat(val).sort_values("path").reset_index(drop=True))


def split(filtered: Path, out: Path, labels: list[str], val_fraction: float, seed: int) -> dict:
    files = list_labelled(filtered, labels)
    if files.empty:
        raise CamidError(f"no images under {filtered}/<label>/ for the catalog's cameras; run the filter stage first")
    train, val = stratified_split(files, val_fraction, seed)
    summary = {
        "train": {k: int(v) for k, v in train.label.value_counts().sort_index().items()},
        "val": {k: int(v) for k, v in val.label.value_counts().sort_index().items()},
    }
    with atomic_dir(out) as tmp:
        train.to_csv(tmp / "train.csv", index=False)
        val.to_csv(tmp / "val.csv", index=False)
        write_json(tmp / "summary.json", summary)
    log.info("split %d photos: %d train, %d validation", len(files), len(train), len(val))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("filtered", type=Path, help="the filter stage's output folder (<label>/<files>)")
    parser.add_argument("--out", type=Path, default=Path("data/split"), help="output folder (train.csv, val.csv)")


def run(args: argparse.Namespace) -> int:
    params = load_params()
    split(args.filtered, args.out, params.catalog.labels, params.split.val_fraction, params.split.seed)
    return 0
