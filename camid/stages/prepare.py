"""The prepare stage: `camid prepare SPLIT_DIR --out data/cache`, the photo index of `camid.data.cache`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from camid.config import load_params
from camid.data.cache import prepare

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("split_dir", type=Path, help="folder holding train.csv, val.csv and test.csv (columns path,label)")
    parser.add_argument("--out", type=Path, default=Path("data/cache"), help="photo index folder (default: data/cache)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (default: all cores)")


def run(args: argparse.Namespace) -> int:
    params = load_params()
    meta = prepare(args.split_dir, args.out, params.catalog, patch=params.train.patch, workers=args.workers)
    for split, counts in meta["splits"].items():
        print(f"{split}: {counts['photos']} photos ({counts['pixels'] / 1e6:.1f} megapixels, "
              f"{counts['bytes'] / 1e6:.1f} MB), {counts['skipped']} skipped")
    return 0
