"""How accuracy on held-out full photos grows with the number of patches scored per photo (`--full-image`).

Each photo is scored the way `camid predict --full-image --patches K` scores it: K CFA-aligned patches on a
grid over the photo (the centre one first), each through `Ensemble.predict`, blended into one distribution.
By default a smallcnn is trained briefly on a small virtual zoo built in a temporary folder and scored on its
held-out photos; `--bundle` scores a given ensemble instead, e.g. the one `dvc repro` leaves (read-only):

    python bench/full_image.py [--patches 1 4 9 16 25] [--tta]
    python bench/full_image.py --bundle models/ensemble --photos data/split/val.csv
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny-model builder is shared with the tests

from tests.helpers_model import build_tiny_model  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def held_out(photos: Path) -> pd.DataFrame:
    """path,label rows from a split CSV (paths relative to the working directory) or a <label>/<files> folder."""
    from camid.predict import list_images

    if photos.suffix == ".csv":
        table = pd.read_csv(photos)
        if not {"path", "label"} <= set(table.columns):
            raise SystemExit(f"{photos} needs columns path,label (a split stage CSV)")
        return table[["path", "label"]]
    files = list_images([photos])
    return pd.DataFrame({"path": [str(f) for f in files], "label": [f.parent.name for f in files]})


def accuracy_by_patches(ensemble, photos: pd.DataFrame, counts: list[int], tta: bool) -> list[dict]:
    from camid.predict import predict_files

    files = [Path(p) for p in photos.path]
    truth = dict(zip(map(str, files), photos.label))
    rows = []
    for count in counts:
        start = time.perf_counter()
        table = predict_files(ensemble, files, patches_per_image=count, tta=tta)
        correct = table.camera.to_numpy() == table.path.map(truth).to_numpy()
        rows.append({"patches": count, "photos": len(table), "accuracy": float(np.mean(correct)),
                     "seconds": time.perf_counter() - start})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="an ensemble bundle to score (default: train one briefly)")
    parser.add_argument("--photos", type=Path, help="held-out photos: a split CSV (path,label) or <label>/<files>; "
                                                    "default with --bundle: data/split/val.csv")
    parser.add_argument("--patches", type=int, nargs="+", default=[1, 4, 9, 16, 25])
    parser.add_argument("--tta", action="store_true", help="8 D4 views per patch (8x the time)")
    parser.add_argument("--images-per-device", type=int, default=8, help="zoo size when training (2 devices/camera)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs when training")
    parser.add_argument("--steps-per-epoch", type=int, default=20, help="steps per epoch when training")
    args = parser.parse_args(argv)

    from camid.inference.ensemble import Ensemble

    with tempfile.TemporaryDirectory(prefix="camid-bench-full-") as tmp:
        if args.bundle:
            ensemble = Ensemble.load(args.bundle)
            photos = held_out(args.photos or Path("data/split/val.csv"))
            source = f"bundle {args.bundle}"
        else:
            model = build_tiny_model(Path(tmp), images_per_device=args.images_per_device, crops_per_image=4,
                                     epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=16,
                                     register=False)
            ensemble = Ensemble.load(model.bundle)
            photos = held_out(args.photos) if args.photos else model.val
            source = (f"smallcnn trained {args.epochs}x{args.steps_per_epoch} steps on "
                      f"{2 * args.images_per_device} photos/camera")
        rows = accuracy_by_patches(ensemble, photos, args.patches, args.tta)

    print(f"\nfull-photo accuracy vs patches per photo: {source}; {len(photos)} held-out photos, "
          f"{photos.label.nunique()} cameras, patch {ensemble.patch} px, tta {'on' if args.tta else 'off'}")
    print(f"{'patches':>8}{'accuracy':>10}{'seconds':>9}")
    for row in rows:
        print(f"{row['patches']:>8}{row['accuracy']:>10.3f}{row['seconds']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
