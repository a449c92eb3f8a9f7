"""Batch prediction: files or folders in, a Kaggle submission (`fname,camera`) and a probabilities table out.

The `manipulated` flag comes from `_manip` / `_unalt` in file names when present (the Kaggle test set's
convention) and is estimated by the model otherwise. `--balance` balances the predictions of a closed set
known to hold equally many photos per camera (in each of the unaltered/manipulated groups). Without
`--full-image` a photo is scored on its centre patch, as the Kaggle test crops were cut; with it, on CFA-aligned
patches on a grid over the whole photo (`--patches`, auto by default), blended into one answer per photo.
A photo unlike every catalog camera is `unknown` in the probabilities table (`--closed-set`: never); the
submission, a closed set, always names the closest catalog camera.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from camid.core.fileio import atomic_path
from camid.core.imageio import list_images
from camid.core.patches import AUTO_MAX_PATCHES
from camid.errors import CamidError
from camid.inference.answers import BATCH_PATCHES, answer_photos, flag_from_name
from camid.inference.ensemble import Ensemble, load_ensemble
from camid.inference.options import (BALANCE_CHOICES, BLEND_CHOICES, MODEL_BLEND, OPTIONS,
                                     batch_options, blend_for)

log = logging.getLogger(__name__)


def predict_files(ensemble: Ensemble, files: list[Path], *, patches_per_image: int = 1,
                  tta: bool = OPTIONS["tta"].default, blend_method: str | None = None,
                  jpeg_tables: bool = OPTIONS["jpeg_tables"].default, balance: str = OPTIONS["balance"].default,
                  open_set: bool = OPTIONS["open_set"].default, batch_patches: int = BATCH_PATCHES) -> pd.DataFrame:
    """Score files through the one photo-scoring path (`camid.inference.answers`, as the served model and the
    evaluate stage do), about `batch_patches` patches at a time; each photo on `patches_per_image` grid patches
    (0: auto, `camid.core.patches.auto_patch_count`), with the bundle's TTA views, blend and JPEG-table evidence
    unless told otherwise, its manipulated flag from its name (`flag_from_name`) or estimated. A photo unlike
    every catalog camera (`camid.inference.openset`) is answered `unknown`, its `closest_camera` beside it, unless
    `open_set` is off. A file that cannot be read or decoded is a row of its own: camera "", NaN probabilities and
    an `error` that says why (good rows have error "")."""
    if patches_per_image < 0:
        raise CamidError(f"--patches must be 0 (auto) or more, got {patches_per_image}")
    options = batch_options(patches_per_image, tta=tta, blend=blend_method or MODEL_BLEND, jpeg_tables=jpeg_tables,
                            balance=balance, open_set=open_set)
    files = list(files)
    table = answer_photos(ensemble, files, options, flags=[flag_from_name(p) for p in files],
                          batch_patches=batch_patches,
                          progress=lambda photos: tqdm(photos, desc="predict", unit="photo"))
    table.insert(0, "fname", [p.name for p in files])
    table.insert(1, "path", [str(p) for p in files])
    for path, reason in zip(files, table.error):
        if reason:
            log.warning("cannot score %s: %s", path, reason)
    if (table.error != "").all():
        raise CamidError("none of the images could be scored; see the warnings above")
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--model", default="models:/camid@champion",
                        help="MLflow model URI or ensemble bundle folder (default models:/camid@champion)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="Kaggle submission CSV (fname,camera)")
    parser.add_argument("--probs", type=Path, help="probabilities CSV (default: <out>.probs.csv)")
    parser.add_argument("--balance", nargs="?", const="optimal", default=OPTIONS["balance"].default,
                        choices=BALANCE_CHOICES, help=OPTIONS["balance"].help + "; bare --balance means optimal")
    parser.add_argument("--full-image", action="store_true",
                        help="score patches on a grid over each whole photo (default: the centre patch only)")
    parser.add_argument("--patches", type=int, default=OPTIONS["patches"].default,
                        help=f"with --full-image: {OPTIONS['patches'].help} (auto: at most {AUTO_MAX_PATCHES})")
    parser.add_argument("--no-tta", dest="tta", action="store_false", default=OPTIONS["tta"].default,
                        help="score the identity view only (default: the views the model's evaluation chose)")
    parser.add_argument("--blend", choices=BLEND_CHOICES, default=OPTIONS["blend"].default, help=OPTIONS["blend"].help)
    parser.add_argument("--closed-set", dest="open_set", action="store_false", default=OPTIONS["open_set"].default,
                        help="always name a catalog camera (default: `unknown` below the model's open-set threshold)")
    parser.add_argument("--pixels-only", dest="jpeg_tables", action="store_false",
                        default=OPTIONS["jpeg_tables"].default,
                        help="ignore the JPEG quantization tables even where the model's evaluation kept them")


def run(args: argparse.Namespace) -> int:
    ensemble = load_ensemble(args.model)
    files = list_images(args.paths)
    table = predict_files(ensemble, files, patches_per_image=args.patches if args.full_image else 1, tta=args.tta,
                          blend_method=blend_for(args.blend), jpeg_tables=args.jpeg_tables, balance=args.balance,
                          open_set=args.open_set)
    scored = table[table.error == ""]
    with atomic_path(args.out) as tmp:  # the submission lists the scored photos; the probabilities table all.
        # A Kaggle-style submission is a closed set: it names the closest catalog camera, unknown or not.
        scored[["fname", "closest_camera"]].rename(columns={"closest_camera": "camera"}).to_csv(tmp, index=False)
    probs_file = args.probs or args.out.with_suffix(".probs.csv")
    with atomic_path(probs_file) as tmp:
        table.to_csv(tmp, index=False)
    unknown = scored.unknown.astype(bool).to_numpy()
    print(f"{len(scored)} of {len(files)} images scored ({int(unknown.sum())} unlike every catalog camera: camera "
          f"`unknown` in the probabilities table): {args.out} (submission), {probs_file} (probabilities)")
    unseen = int((unknown & (scored.size_seen.astype(str) == "False").to_numpy()).sum())
    if unseen:  # the reference's coverage, not necessarily another camera (`size_seen`)
        print(f"note: {unseen} of the unknown photos have a pixel size none of their closest camera's reference "
              "photos have (`size_seen` false): a size mode the reference never shot, or a crop or resize; add "
              "reference photos of that size to tell which")
    return 0
