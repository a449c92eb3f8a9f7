"""Batch prediction: files or folders in, a Kaggle submission (`fname,camera`) and a probabilities table out.

The `manipulated` flag comes from `_manip` / `_unalt` in file names when present (the Kaggle test set's
convention) and is estimated by the model otherwise. `--balance` balances the predictions of a closed set
known to hold equally many photos per camera (in each of the unaltered/manipulated groups). With
`--full-image`, several CFA-aligned patches spread over each photo are scored and blended.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from camid.errors import CamidError
from camid.fileio import atomic_path
from camid.imageio import ImageError, decode_image
from camid.inference.blending import BLENDS, blend
from camid.inference.ensemble import BALANCE_CHOICES, Ensemble
from camid.inference.balancing import balance_to_quota
from camid.patches import centre_crop
from camid.split import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


def load_ensemble(model: str) -> Ensemble:
    """An ensemble from a bundle folder or from an MLflow model URI (models:/camid@champion, runs:/..., a path)."""
    if (Path(model) / "ensemble.json").is_file():
        return Ensemble.load(Path(model))
    import mlflow
    from mlflow.exceptions import MlflowException

    from camid.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        loaded = mlflow.pyfunc.load_model(model)
    except (MlflowException, OSError) as exc:
        raise CamidError(f"cannot load model {model!r} from tracking store {tracking_uri()}: {exc}. Check the URI "
                         "(e.g. models:/camid@champion), and MLFLOW_TRACKING_URI, or pass an ensemble bundle folder") from None
    return loaded.unwrap_python_model().ensemble


def list_images(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise CamidError(f"{path} not found: give image files or folders of them")
    if not files:
        raise CamidError(f"no images (jpg, png, tif) under {', '.join(map(str, paths))}")
    return files


def flag_from_name(path: Path) -> bool | None:
    stem = path.stem.lower()
    return True if "_manip" in stem else False if "_unalt" in stem else None


def grid_patches(pixels: np.ndarray, patch: int, count: int) -> np.ndarray:
    """`count` patches on a regular grid over the photo, at even (CFA-aligned) offsets; the centre one first."""
    height, width = pixels.shape[:2]
    patches = [centre_crop(pixels, patch)]
    side = math.ceil(math.sqrt(max(count - 1, 1)))
    tops = np.linspace(0, height - patch, side).astype(int) // 2 * 2
    lefts = np.linspace(0, width - patch, side).astype(int) // 2 * 2
    for top in tops:
        for left in lefts:
            if len(patches) < count:
                patches.append(pixels[top:top + patch, left:left + patch])
    return np.stack(patches)


def predict_files(ensemble: Ensemble, files: list[Path], *, patches_per_image: int = 1, tta: bool = True,
                  blend_method: str = "mean_square", balance: str = "none", batch_patches: int = 64) -> pd.DataFrame:
    """Score files in chunks of about `batch_patches` patches (x 8 views: memory grows with patch size squared)."""
    if patches_per_image < 1:
        raise CamidError(f"--patches must be at least 1, got {patches_per_image}")
    rows, failures = [], []
    batch_files = max(1, batch_patches // patches_per_image)
    for start in tqdm(range(0, len(files), batch_files), desc="predict", unit="batch"):
        chunk = files[start:start + batch_files]
        stacks, flags, names = [], [], []
        for path in chunk:
            try:
                pixels = decode_image(path.read_bytes())
                if min(pixels.shape[:2]) < ensemble.patch:
                    raise ImageError(f"{pixels.shape[1]}x{pixels.shape[0]} is smaller than the model's patch {ensemble.patch}")
            except (ImageError, OSError) as exc:
                failures.append((path, str(exc)))
                continue
            stacks.append(grid_patches(pixels, ensemble.patch, patches_per_image))
            flags.append(flag_from_name(path))
            names.append(path)
        if not stacks:
            continue
        counts = [len(s) for s in stacks]
        patch_flags = np.array([f for f, c in zip(flags, counts) for _ in range(c)], dtype=object)
        pred = ensemble.predict(np.concatenate(stacks), patch_flags, tta=tta, blend=blend_method)
        bounds = np.cumsum([0] + counts)
        for i, path in enumerate(names):
            part = slice(bounds[i], bounds[i + 1])
            probs = blend(pred.probs[part][:, None, :], blend_method)[0] if counts[i] > 1 else pred.probs[part][0]
            rows.append({"fname": path.name, "path": str(path), "manipulated": bool(pred.manipulated[part].mean() >= 0.5),
                         "manipulated_estimated": flags[i] is None, **dict(zip(ensemble.labels, probs))})
    for path, reason in failures:
        log.warning("skipped %s: %s", path, reason)
    if not rows:
        raise CamidError("none of the images could be scored; see the warnings above")
    table = pd.DataFrame(rows)
    probs = table[ensemble.labels].to_numpy()
    labels = probs.argmax(1) if balance == "none" else balance_to_quota(probs, groups=table.manipulated.to_numpy(),
                                                                         method=balance)
    table.insert(1, "camera", np.asarray(ensemble.labels)[labels])
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--model", default="models:/camid@champion",
                        help="MLflow model URI or ensemble bundle folder (default models:/camid@champion)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="Kaggle submission CSV (fname,camera)")
    parser.add_argument("--probs", type=Path, help="probabilities CSV (default: <out>.probs.csv)")
    parser.add_argument("--balance", nargs="?", const="optimal", default="none", choices=BALANCE_CHOICES,
                        help="balance to equal counts per camera in each unaltered/manipulated group "
                             "(closed sets only; bare --balance means optimal)")
    parser.add_argument("--full-image", action="store_true", help="score several patches across each photo")
    parser.add_argument("--patches", type=int, default=9, help="patches per photo with --full-image")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="score the identity view only")
    parser.add_argument("--blend", choices=BLENDS, default="mean_square")


def run(args: argparse.Namespace) -> int:
    ensemble = load_ensemble(args.model)
    files = list_images(args.paths)
    table = predict_files(ensemble, files, patches_per_image=args.patches if args.full_image else 1, tta=args.tta,
                          blend_method=args.blend, balance=args.balance)
    with atomic_path(args.out) as tmp:
        table[["fname", "camera"]].to_csv(tmp, index=False)
    probs_file = args.probs or args.out.with_suffix(".probs.csv")
    with atomic_path(probs_file) as tmp:
        table.to_csv(tmp, index=False)
    print(f"{len(table)} of {len(files)} images scored: {args.out} (submission), {probs_file} (probabilities)")
    return 0
