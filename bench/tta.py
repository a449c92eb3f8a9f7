"""Test-time augmentation, side by side in one run: test-set weighted accuracy without TTA, with the views the
evaluation chose on validation, with all eight D4 views, and per view; pixels only and with the JPEG-table
evidence. The test set holds devices training never saw (camid.stages.split).

    python bench/tta.py                                   # the `make run` model: models/ensemble, data/cache
    python bench/tta.py --bundle models/ensemble --cache data/cache --split val
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/ensemble"))
    parser.add_argument("--cache", type=Path, default=Path("data/cache"))
    parser.add_argument("--split", default="test", choices=("val", "test"))
    args = parser.parse_args()

    from camid.config import load_params
    from camid.inference.scoring import score
    from camid.inference.ensemble import Ensemble

    ensemble = Ensemble.load(args.bundle)
    settings = dataclasses.replace(load_params().evaluate, blend=ensemble.blend)
    metrics, _, _ = score(ensemble, args.cache, settings, split=args.split)
    chosen = "+".join(metrics["views"])
    print(f"{args.split} set: {metrics['images']} photos x 9 (unaltered + 8 manipulations), {args.bundle}, "
          f"blend {settings.blend}, device-disjoint split")
    print(f"{'setting':<46} {'pixels only':>12} {'+ JPEG tables':>14}")
    names = {"no_tta": "no TTA (identity view)", "chosen_views": f"TTA, views chosen on val ({chosen})",
             "all_d4": "all 8 D4 views"}
    for key, name in names.items():
        row = metrics["comparison"][key]
        print(f"{name:<46} {row['pixels_only']:>12.4f} {row['with_jpeg_tables']:>14.4f}")
    print(f"the model's setting: {chosen}, {'with' if metrics['jpeg_tables'] else 'without'} JPEG tables -> "
          f"{metrics['weighted_accuracy']:.4f}")
    print("each view alone (pixels only):")
    for view, value in metrics["weighted_accuracy_per_view"].items():
        print(f"  {view:<42} {value:>12.4f}")


if __name__ == "__main__":
    main()
