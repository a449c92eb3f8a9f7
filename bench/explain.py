"""What `camid explain` costs and what its map says, on the default virtual zoo.

Builds a tiny trained model (`camid.tiny.build_tiny_model`, as bench/serve.py does) in a temporary folder,
then for each held-out photo (devices training never saw): seconds for the per-patch map
(`camid.inference.explain.patch_map`, auto grid, the bundle's TTA views) and for Grad-CAM on the most
confident patch, and the fraction of patches whose own argmax agrees with the photo answer, split by
photos the model got right and wrong. One run, printed as a table.

    python bench/explain.py [--stride N] [--images-per-device 2] [--epochs 1] [--steps 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from camid.core.imageio import decode_image  # noqa: E402
from camid.inference.explain import grad_cam, patch_map  # noqa: E402
from camid.tiny import build_tiny_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stride", type=int, default=None, help="grid stride (default: tiled without overlap)")
    parser.add_argument("--images-per-device", type=int, default=2, help="virtual-zoo photos per device")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of the tiny model")
    parser.add_argument("--steps", type=int, default=3, help="steps per epoch of the tiny model")
    args = parser.parse_args()

    from camid.inference.ensemble import Ensemble

    with tempfile.TemporaryDirectory(prefix="camid-bench-explain-") as tmp:
        start = time.perf_counter()
        tiny = build_tiny_model(Path(tmp), images_per_device=args.images_per_device, epochs=args.epochs,
                                steps_per_epoch=args.steps, register=False)
        print(f"tiny model: {tiny.weighted_accuracy:.3f} weighted accuracy on val, built in "
              f"{time.perf_counter() - start:.0f} s; {len(tiny.test)} held-out photos, patch {tiny.patch}")
        ensemble = Ensemble.load(tiny.bundle)
        rows = []
        for path, label in zip(tiny.test.path, tiny.test.label):
            pixels = decode_image(Path(path).read_bytes())
            t0 = time.perf_counter()
            pm = patch_map(ensemble, pixels, stride=args.stride)
            t1 = time.perf_counter()
            top, left = pm.offsets[pm.most_confident]
            cam = grad_cam(ensemble, pixels[top:top + pm.patch, left:left + pm.patch], pm.photo_index,
                           manipulated=pm.manipulated)
            t2 = time.perf_counter()
            rows.append((pm.camera == label, pm.agreement, len(pm.offsets), t1 - t0, t2 - t1, float(cam.std())))
        # The first photo pays for tracing/warm-up; report it apart.
        first, rest = rows[0], rows[1:] or rows
        correct = np.array([r[0] for r in rows])
        agreement = np.array([r[1] for r in rows])
        print(f"views (TTA): {len(ensemble.views)}; patches per photo: "
              f"{min(r[2] for r in rows)}..{max(r[2] for r in rows)} (stride {args.stride or 'tiled'})")
        print(f"map:      {np.mean([r[3] for r in rest]):.3f} s/photo (first photo {first[3]:.2f} s)")
        print(f"Grad-CAM: {np.mean([r[4] for r in rest]):.3f} s/patch (first {first[4]:.2f} s, building the split)")
        print(f"photo accuracy: {correct.mean():.3f} ({correct.sum()}/{len(rows)})")
        for name, mask in (("correct", correct), ("incorrect", ~correct)):
            if mask.any():
                print(f"patches agreeing with the photo answer, {name} photos: {agreement[mask].mean():.3f} "
                      f"(n={mask.sum()})")
        print(f"Grad-CAM maps non-constant: {sum(r[5] > 1e-3 for r in rows)}/{len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
