"""Input-pipeline throughput: 512-px manipulated training patches per second per core, from the crop cache
(camid.dataset.TrainPatches) against the naive way (decode the full JPEG for every patch, then crop and
manipulate). Target: at least 10x.

    python bench/input_pipeline.py [--photos 20] [--batches 6] [--naive 8]

The bench makes its own photos: synthetic 12-megapixel JPEGs (smooth content plus sensor-like noise, quality
95, about the size of a phone's original), and caches them and the crop cache under --workdir, so later runs
skip that set-up. Rates are per core: patches divided by this process's CPU seconds (one process, one thread),
so other load on the machine does not count against them; wall-clock rates are printed too.
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
from camid.core.manipulations import MANIPULATIONS, apply, source_size
from camid.core.patches import random_aligned_crop
from camid.data.cache import prepare

PATCH = 512
HEIGHT, WIDTH = 3000, 4000
CATALOG = Catalog("bench", (
    Camera("Bench-Turns", "Bench", ("T",), ((HEIGHT, WIDTH),), rot90=True),
    Camera("Bench-Fixed", "Bench", ("F",), ((HEIGHT, WIDTH),), rot90=False),
))


def make_photos(folder: Path, count: int) -> pd.DataFrame:
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


def build_cache(workdir: Path, photos: int) -> Path:
    cache = workdir / f"cache-{photos}"
    if (cache / "meta.json").is_file():
        return cache
    table = make_photos(workdir / "photos", photos)
    split = workdir / f"split-{photos}"
    split.mkdir(parents=True, exist_ok=True)
    table.to_csv(split / "train.csv", index=False)
    for empty in ("val", "test"):
        table.iloc[:0].to_csv(split / f"{empty}.csv", index=False)
    prepare(split, cache, CATALOG, patch=PATCH, crops_per_image=2, shard_size=16, seed=0,
            workers=min(2, os.cpu_count() or 1))
    return cache


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_cache(cache: Path, batches: int) -> tuple[int, float, float]:
    from camid.data.dataset import TrainPatches  # imports Keras

    dataset = TrainPatches(cache, CATALOG, patch=PATCH, batch_size=8, steps_per_epoch=batches + 1,
                           manipulation_prob=1.0, seed=0)
    dataset[batches]  # warm-up: opens the memory maps, pulls first pages in
    wall, cpu = timed(lambda: [dataset[i] for i in range(batches)])
    return batches * dataset.batch_size, wall, cpu


def bench_naive(paths: list[str], count: int) -> tuple[int, float, float]:
    rng = np.random.default_rng(0)

    def one() -> np.ndarray:
        name = MANIPULATIONS[rng.integers(len(MANIPULATIONS))]
        with Image.open(paths[rng.integers(len(paths))]) as image:
            pixels = np.asarray(image)
        source = np.rot90(random_aligned_crop(pixels, source_size(PATCH, name), rng), k=int(rng.integers(4)))
        return apply(source, name, PATCH).astype(np.float32)

    one()  # warm-up
    wall, cpu = timed(lambda: [one() for _ in range(count)])
    return count, wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=20, help="synthetic 12-MP JPEGs to cache (default 20)")
    parser.add_argument("--batches", type=int, default=6, help="batches of 8 patches timed from the cache")
    parser.add_argument("--naive", type=int, default=8, help="patches timed the naive way")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/camid-bench-input"))
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    cache = build_cache(args.workdir, args.photos)
    paths = sorted(str(p) for p in (args.workdir / "photos").glob("photo-*.jpg"))[:args.photos]
    results = {"cache": bench_cache(cache, args.batches), "naive": bench_naive(paths, args.naive)}
    figures = {}
    for name, (count, wall, cpu) in results.items():
        figures[name] = {"patches": count, "per_core_per_s": count / cpu, "wall_per_s": count / wall}
        print(f"{name:>5}: {count:4d} patches of {PATCH}px, all manipulated: "
              f"{count / cpu:7.1f} /s per core ({count / wall:7.1f} /s wall)")
    figures["ratio"] = figures["cache"]["per_core_per_s"] / figures["naive"]["per_core_per_s"]
    print(f"ratio: {figures['ratio']:.1f}x the naive rate per core (target >= 10x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
