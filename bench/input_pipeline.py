"""Input-pipeline throughput: 512-px manipulated training patches per second per core, decoded from full-size
JPEGs as training does (camid.data.dataset.TrainPatches), for several `crops_per_decode`; 1 is the baseline (one
decode per patch), so each figure is also a ratio against it. Also: whether a 16-core machine feeds ResNet50 at
512 px on one A100 with mixed precision.

    python bench/input_pipeline.py [--photos 12] [--batches 8] [--decodes 1,4,8,16] [--real DIR]

The bench makes its own photos (synthetic 12-megapixel JPEGs: smooth content plus sensor-like noise, quality 95,
about the size of a phone's original) under --workdir, so later runs skip that set-up, or takes real JPEGs from
--real DIR. Rates are per core: patches divided by this process's CPU seconds (all its threads), so other load on
the machine does not count against them; wall-clock rates with --threads decoding threads are printed too.

The GPU's side is a published figure: NVIDIA's DeepLearningExamples ResNet-50 v1.5 (TensorFlow, 20.06 container)
trains 1,770 images/s of 224 px on one A100 40GB with mixed precision and XLA. Work grows with the pixels, so at
512 px that is 1,770 x (224/512)^2 = 339 patches/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from camid.config import Camera, Catalog
from camid.data.cache import prepare

PATCH = 512
GPU_RATE_224 = 1770  # ResNet-50 v1.5 training images/s at 224 px, 1x A100 40GB, AMP + XLA (NVIDIA DeepLearningExamples)
GPU_RATE = GPU_RATE_224 * (224 / PATCH) ** 2
FEEDER_CORES = 16
HEIGHT, WIDTH = 3000, 4000
CATALOG = Catalog("bench", (
    Camera("Bench-Turns", "Bench", ("T",), ((HEIGHT, WIDTH),), rot90=True),
    Camera("Bench-Fixed", "Bench", ("F",), ((HEIGHT, WIDTH),), rot90=False),
))


def make_photos(folder: Path, count: int) -> pd.DataFrame:
    """`count` synthetic 12-MP JPEGs in `folder` (made once), labelled alternately."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        path = folder / f"photo-{i:03d}.jpg"
        if not path.is_file():
            rng = np.random.default_rng(i)
            coarse = Image.fromarray(rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8))
            smooth = np.asarray(coarse.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC), dtype=np.int16)
            noisy = np.clip(smooth + rng.integers(-6, 7, smooth.shape, dtype=np.int16), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(path, quality=95)
        rows.append({"path": str(path), "label": CATALOG.labels[i % len(CATALOG)]})
    return pd.DataFrame(rows)


def build_cache(workdir: Path, table: pd.DataFrame, name: str) -> Path:
    cache = workdir / f"cache-{name}"
    if (cache / "meta.json").is_file():
        return cache
    split = workdir / f"split-{name}"
    split.mkdir(parents=True, exist_ok=True)
    table.to_csv(split / "train.csv", index=False)
    for empty in ("val", "test"):
        table.iloc[:0].to_csv(split / f"{empty}.csv", index=False)
    prepare(split, cache, CATALOG, patch=PATCH, workers=min(2, os.cpu_count() or 1))
    return cache


def real_photos(folder: Path, count: int) -> pd.DataFrame:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    files = sorted(files, key=lambda p: -p.stat().st_size)[:count]
    if not files:
        raise SystemExit(f"no JPEGs under {folder}")
    return pd.DataFrame({"path": [str(p) for p in files],
                         "label": [CATALOG.labels[i % len(CATALOG)] for i in range(len(files))]})


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_decodes(cache: Path, per_decode: int, batches: int, threads: int) -> tuple[int, float, float]:
    from camid.data.dataset import TrainPatches  # imports Keras

    batches = -(-batches // per_decode) * per_decode  # whole groups: no patch is cut and left unused
    options = dict(patch=PATCH, batch_size=8, manipulation_prob=0.5, crops_per_decode=per_decode, threads=threads)
    TrainPatches(cache, CATALOG, steps_per_epoch=1, seed=1, **options)[0]  # warm-up (imports, first reads)
    dataset = TrainPatches(cache, CATALOG, steps_per_epoch=batches, seed=0, **options)
    wall, cpu = timed(lambda: [dataset[i] for i in range(batches)])
    return batches * dataset.batch_size, wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=12, help="synthetic 12-MP JPEGs to make (default 12)")
    parser.add_argument("--real", type=Path, help="time real JPEGs from this folder instead (its largest --photos)")
    parser.add_argument("--batches", type=int, default=16, help="batches of 8 patches timed per setting "
                        "(rounded up to whole groups of crops_per_decode)")
    parser.add_argument("--decodes", default="1,4,8,16", help="crops_per_decode values to time (1: the baseline)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="decoding threads (wall rates)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/camid-bench-input"))
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    if args.real:
        table, name = real_photos(args.real, args.photos), f"real-{args.photos}"
    else:
        table, name = make_photos(args.workdir / "photos", args.photos), f"synthetic-{args.photos}"
    cache = build_cache(args.workdir, table, name)
    megapixels = sum(np.prod(Image.open(p).size) for p in table["path"]) / len(table) / 1e6
    print(f"{len(table)} photos of {megapixels:.1f} MP on average ({name}), {PATCH}-px patches, half of them "
          f"manipulated, batches of 8, {args.threads} decoding threads")
    figures = {"photos": len(table), "megapixels": megapixels, "gpu_rate": GPU_RATE, "settings": {}}
    for per_decode in [int(k) for k in args.decodes.split(",")]:
        count, wall, cpu = bench_decodes(cache, per_decode, args.batches, args.threads)
        figures["settings"][per_decode] = {"patches": count, "per_core_per_s": count / cpu, "wall_per_s": count / wall}
    base = figures["settings"].get(1, next(iter(figures["settings"].values())))["per_core_per_s"]
    for per_decode, f in figures["settings"].items():
        cores = GPU_RATE / f["per_core_per_s"]
        print(f"crops_per_decode {per_decode:3d}: {f['per_core_per_s']:6.1f} patches/s per core "
              f"({f['per_core_per_s'] / base:4.1f}x one decode per patch; {f['wall_per_s']:6.1f}/s wall); "
              f"{FEEDER_CORES} cores make {FEEDER_CORES * f['per_core_per_s']:6.0f}/s, "
              f"{cores:4.1f} cores feed one A100 ({GPU_RATE:.0f}/s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
