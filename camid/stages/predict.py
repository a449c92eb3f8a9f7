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

import numpy as np
import pandas as pd
from tqdm import tqdm

from camid.errors import CamidError
from camid.core.fileio import atomic_path
from camid.core.imageio import ImageError, decode_image, list_images
from camid.inference.ensemble import Ensemble, load_ensemble
from camid.inference.options import BALANCE_CHOICES, BLEND_CHOICES, OPTIONS, blend_for
from camid.forensics.inspect import header_facts
from camid.inference.balancing import balance_to_quota
from camid.inference.openset import UNKNOWN, confidence
from camid.core.patches import AUTO_MAX_PATCHES, grid_crops

log = logging.getLogger(__name__)


def flag_from_name(path: Path) -> bool | None:
    stem = path.stem.lower()
    return True if "_manip" in stem else False if "_unalt" in stem else None


def predict_files(ensemble: Ensemble, files: list[Path], *, patches_per_image: int = 1,
                  tta: bool = OPTIONS["tta"].default, blend_method: str | None = None,
                  jpeg_tables: bool = OPTIONS["jpeg_tables"].default, balance: str = OPTIONS["balance"].default,
                  open_set: bool = OPTIONS["open_set"].default, batch_patches: int = 256) -> pd.DataFrame:
    """Score files, about `batch_patches` patches at a time; each photo on `patches_per_image` grid patches
    (0: auto, `camid.core.patches.auto_patch_count`), with the bundle's TTA views, blend and JPEG-table evidence
    unless told otherwise. A photo unlike every catalog camera (`camid.inference.openset`) is answered
    `unknown`, its `closest_camera` beside it, unless `open_set` is off. A file that cannot be read or decoded is a row of its own: camera "", NaN
    probabilities and an `error` that says why (good rows have error "")."""
    if patches_per_image < 0:
        raise CamidError(f"--patches must be 0 (auto) or more, got {patches_per_image}")
    rows, failures, features = [], [], []
    pending: list[tuple[Path, np.ndarray, dict]] = []

    def flush() -> None:
        pred = ensemble.predict_photos([c for _, c, _ in pending], [flag_from_name(p) for p, _, _ in pending],
                                       signatures=[f["jpeg_tables"] for _, _, f in pending], tta=tta,
                                       blend=blend_method, jpeg_tables=jpeg_tables)
        features.extend([None] * len(pending) if pred.features is None else list(pred.features))
        for i, (path, crops, facts) in enumerate(pending):
            rows.append({"fname": path.name, "path": str(path), "patches": len(crops),
                         "tables_evidence": pred.tables_evidence[i],
                         "manipulated": bool(pred.manipulated[i]),
                         "manipulated_estimated": bool(pred.manipulated_estimated[i]),
                         "exif_model": facts["model"] or "", "error": "",
                         **dict(zip(ensemble.labels, pred.probs[i]))})
        pending.clear()

    for path in tqdm(files, desc="predict", unit="photo"):
        try:
            data = path.read_bytes()
            pixels = decode_image(data)
            if min(pixels.shape[:2]) < ensemble.patch:
                raise ImageError(f"{pixels.shape[1]}x{pixels.shape[0]} is smaller than the model's patch {ensemble.patch}")
        except (ImageError, OSError) as exc:
            failures.append((path, str(exc)))
            continue
        pending.append((path, grid_crops(pixels, ensemble.patch, patches_per_image), header_facts(data)))
        if sum(len(c) for _, c, _ in pending) >= batch_patches:
            flush()
    if pending:
        flush()
    for path, reason in failures:
        log.warning("cannot score %s: %s", path, reason)
    if not rows:
        raise CamidError("none of the images could be scored; see the warnings above")
    table = pd.DataFrame(rows)
    probs = table[ensemble.labels].to_numpy()
    labels = probs.argmax(1) if balance == "none" else balance_to_quota(probs, groups=table.manipulated.to_numpy(),
                                                                         method=balance)
    closest = np.asarray(ensemble.labels)[labels]
    unknown = ensemble.is_unknown(probs, table.patches, table.tables_evidence.to_numpy(object),
                                  None if any(f is None for f in features) else np.stack(features)) if open_set \
        else np.zeros(len(table), dtype=bool)
    table.insert(1, "camera", np.where(unknown, UNKNOWN, closest))
    table.insert(2, "closest_camera", closest)
    table.insert(3, "confidence", confidence(probs))
    table.insert(4, "unknown", unknown)
    named, consistent = ensemble.metadata_check([m or None for m in table.exif_model], closest)
    at = table.columns.get_loc("exif_model") + 1
    table.insert(at, "exif_camera", named)
    table.insert(at + 1, "consistent", pd.array(consistent, dtype="boolean"))
    if failures:
        bad = pd.DataFrame({"fname": [p.name for p, _ in failures], "path": [str(p) for p, _ in failures],
                            "camera": "", "closest_camera": "", "error": [reason for _, reason in failures]})
        table = pd.concat([table, bad], ignore_index=True)
        order = {str(f): i for i, f in enumerate(files)}
        table = table.iloc[table.path.map(order).argsort(kind="stable")].reset_index(drop=True)
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
    unknown = int(scored.unknown.astype(bool).sum())
    print(f"{len(scored)} of {len(files)} images scored ({unknown} unlike every catalog camera: camera `unknown` in "
          f"the probabilities table): {args.out} (submission), {probs_file} (probabilities)")
    return 0
