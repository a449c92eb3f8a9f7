"""How accuracy on held-out full photos grows with the number of patches scored per photo (`--full-image`).

Each photo is scored the way `camid predict --full-image --patches K` scores it: K CFA-aligned patches on a
grid over the photo (`camid.core.patches.grid_offsets`; 0 is auto), blended into one distribution, with the
bundle's own TTA views; pixels only and with the JPEG-table evidence. By default a smallcnn is trained
briefly on a small virtual zoo built in a temporary folder and scored on its test photos (devices it never
saw); `--bundle` scores a given ensemble instead, e.g. the one `dvc repro` leaves (read-only):

    python bench/full_image.py [--patches 1 4 9 16 0] [--no-tta]
    python bench/full_image.py --bundle models/ensemble --photos data/split/test.csv
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

from camid.tiny import build_tiny_model

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def held_out(photos: Path) -> pd.DataFrame:
    """path,label rows from a split CSV (paths relative to the working directory) or a <label>/<files> folder."""
    from camid.core.imageio import list_images

    if photos.suffix == ".csv":
        table = pd.read_csv(photos)
        if not {"path", "label"} <= set(table.columns):
            raise SystemExit(f"{photos} needs columns path,label (a split stage CSV)")
        return table[["path", "label"]]
    files = list_images([photos])
    return pd.DataFrame({"path": [str(f) for f in files], "label": [f.parent.name for f in files]})


def accuracy_by_patches(ensemble, photos: pd.DataFrame, counts: list[int], tta: bool) -> list[dict]:
    from camid.stages.predict import predict_files

    files = [Path(p) for p in photos.path]
    truth = dict(zip(map(str, files), photos.label))
    rows = []
    for count in counts:
        row = {"patches": "auto" if count == 0 else count}
        for key, tables in (("pixels", False), ("tables", True)):
            start = time.perf_counter()
            table = predict_files(ensemble, files, patches_per_image=count, tta=tta, jpeg_tables=tables)
            # closed-set accuracy: the catalog camera the answer points to, `unknown` or not (bench/open_set.py
            # measures the open-set rule)
            correct = table.closest_camera.to_numpy() == table.path.map(truth).to_numpy()
            row.update({key: float(np.mean(correct)), f"{key}_seconds": time.perf_counter() - start,
                        "photos": len(table), "mean_patches": float(table.patches.mean())})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="an ensemble bundle to score (default: train one briefly)")
    parser.add_argument("--photos", type=Path, help="held-out photos: a split CSV (path,label) or <label>/<files>; "
                                                    "default with --bundle: data/split/test.csv")
    parser.add_argument("--patches", type=int, nargs="+", default=[1, 4, 9, 16, 0], help="0: auto")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="identity view only")
    parser.add_argument("--images-per-device", type=int, default=4, help="zoo size when training (4 devices/camera)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs when training")
    parser.add_argument("--steps-per-epoch", type=int, default=20, help="steps per epoch when training")
    args = parser.parse_args(argv)

    from camid.inference.ensemble import Ensemble

    with tempfile.TemporaryDirectory(prefix="camid-bench-full-") as tmp:
        if args.bundle:
            ensemble = Ensemble.load(args.bundle)
            photos = held_out(args.photos or Path("data/split/test.csv"))
            source = f"bundle {args.bundle}"
        else:
            model = build_tiny_model(Path(tmp), images_per_device=args.images_per_device,
                                     epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=16,
                                     register=False)
            ensemble = Ensemble.load(model.bundle)
            photos = held_out(args.photos) if args.photos else model.test
            source = (f"smallcnn trained {args.epochs}x{args.steps_per_epoch} steps on "
                      f"{4 * args.images_per_device} photos/camera (unevaluated: identity view, no JPEG tables)")
        rows = accuracy_by_patches(ensemble, photos, args.patches, args.tta)

    print(f"\nfull-photo accuracy vs patches per photo: {source}; {len(photos)} held-out photos, "
          f"{photos.label.nunique()} cameras, patch {ensemble.patch} px, "
          f"tta {'+'.join(map(str, ensemble.views)) if args.tta else 'off'}")
    print(f"{'patches':>8}{'mean':>6}{'pixels only':>13}{'+ JPEG tables':>15}{'seconds':>9}")
    for row in rows:
        print(f"{row['patches']:>8}{row['mean_patches']:>6.1f}{row['pixels']:>13.3f}{row['tables']:>15.3f}"
              f"{row['pixels_seconds']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
