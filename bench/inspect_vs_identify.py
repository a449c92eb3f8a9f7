"""camid inspect against ImageMagick's `identify`, one process per file, as the seed's bash loop ran it.

    python bench/inspect_vs_identify.py [--count 500] [--cache /tmp/camid-bench] [--workers N]

Makes (once, in parallel, cached between runs) `count` full-size JPEGs of 12 to 24 megapixels with phone-like
EXIF and file sizes, then times on the same files:
  identify   `identify -format '%Q %w %h %[EXIF:Model]' FILE`, one process per file, sequentially (the seed);
  header     camid's inspection without hashes: the fields identify reports, header work only;
  full       full `camid inspect`: header fields + sha256 + perceptual hash from the 1/8 draft image, made by
             camid.forensics._dcscan (DC coefficients only);
  full/Pillow the same with Pillow (libjpeg) making every draft image, as camid did before _dcscan;
and prints files per second of each and the ratios (targets: header >= 50x, full >= 10x identify). It also
checks that camid's quality, size and model agree with identify's on every file, and that both full runs
produce identical records.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops

from camid.core.fileio import write_bytes
from camid.forensics.inspect import DC_SCAN, inspect_paths

# (height, width) of 12 to 24 MP phone and camera sensors
SIZES = ((3000, 4000), (3024, 4032), (3120, 4160), (2322, 4128), (3456, 4608), (3888, 5184), (4000, 6000))
QUALITIES = (90, 92, 94, 95, 96, 97, 98)
SUBSAMPLING = (2, 2, 1, 0)


def _spec(index: int) -> tuple[Path, dict]:
    rng = np.random.default_rng(index)
    height, width = SIZES[rng.integers(len(SIZES))]
    if rng.random() < 0.3:
        height, width = width, height
    quality, subsampling = int(rng.choice(QUALITIES)), int(rng.choice(SUBSAMPLING))
    name = f"bench_{index:04d}_{width}x{height}_q{quality}_s{subsampling}.jpg"
    return Path(name), dict(index=index, height=int(height), width=int(width), quality=quality,
                            subsampling=subsampling)


def _make(args: tuple[Path, dict]) -> str:
    """One synthetic photo: smooth colour field + mid-frequency texture + fine grain, like a phone's file size."""
    path, spec = args
    if path.exists():
        return path.name
    rng = np.random.default_rng(spec["index"])
    height, width = spec["height"], spec["width"]
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    texture = Image.effect_noise((width // 6, height // 6), 40).resize((width, height), Image.BICUBIC)
    grain = Image.fromarray(rng.integers(0, 3, (height, width), dtype=np.uint8))
    detail = ImageChops.add(texture, grain, offset=-1)
    image = ImageChops.add(base, Image.merge("RGB", [detail] * 3), offset=-128)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0131] = "Bench", f"BenchCam {spec['index'] % 7}", "Ver.1.00"
    exif.get_ifd(0x8769).update({0xA002: width, 0xA003: height})
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=spec["quality"], subsampling=spec["subsampling"], exif=exif)
    write_bytes(path, buffer.getvalue())
    return path.name


def make_corpus(cache: Path, count: int, workers: int) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    jobs = [(cache / name, spec) for name, spec in map(_spec, range(count))]
    missing = [job for job in jobs if not job[0].exists()]
    if missing:
        print(f"making {len(missing)} JPEGs in {cache} ({workers} processes; cached for later runs)", flush=True)
        started = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for done, _ in enumerate(pool.imap_unordered(_make, missing), 1):
                if done % 50 == 0:
                    print(f"  {done}/{len(missing)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return [path for path, _ in jobs]


def time_identify(files: list[Path], identify: str) -> tuple[float, dict]:
    results = {}
    started = time.perf_counter()
    for path in files:
        out = subprocess.run([identify, "-format", "%Q %w %h %[EXIF:Model]", str(path)],
                             capture_output=True, text=True, check=True).stdout
        quality, width, height, model = out.split(" ", 3)
        results[path.name] = (int(quality), int(width), int(height), model.strip())
    return time.perf_counter() - started, results


def time_camid(files: list[Path], workers: int, hashes: bool, dc_scan: bool = True,
               records: list | None = None) -> tuple[float, dict]:
    started = time.perf_counter()
    found = list(inspect_paths(files, workers=workers, hashes=hashes, dc_scan=dc_scan, chunksize=8))
    elapsed = time.perf_counter() - started
    if records is not None:
        records.append(found)
    return elapsed, {Path(r["path"]).name: (r["quality"], r["width"], r["height"], r["model"]) for r in found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="JPEGs in the corpus (default 500)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/camid-bench"), help="corpus folder, kept")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for camid and generation")
    parser.add_argument("--make-only", action="store_true", help="make the corpus and stop")
    args = parser.parse_args(argv)

    files = make_corpus(args.cache, args.count, args.workers)
    if args.make_only:
        return 0
    identify = shutil.which("identify")
    if not identify:
        print("ImageMagick's identify is not installed (apt-get install imagemagick)", file=sys.stderr)
        return 1
    megapixels = np.mean([int(np.prod(Image.open(f).size)) for f in files]) / 1e6
    size_mb = np.mean([f.stat().st_size for f in files]) / 1e6
    print(f"corpus: {len(files)} JPEGs, mean {megapixels:.1f} MP, {size_mb:.1f} MB; camid workers: {args.workers}")
    if not DC_SCAN:
        print("camid.forensics._dcscan is not built (no C compiler at install?): 'camid full' decodes with Pillow")

    time_camid(files[:4], 1, True)  # warm imports and the page cache
    records: list = []
    runs = {"identify": time_identify(files, identify), "camid header": time_camid(files, args.workers, False),
            "camid full": time_camid(files, args.workers, True, records=records),
            "camid full/Pillow": time_camid(files, args.workers, True, dc_scan=False, records=records)}
    reference = runs["identify"][1]
    for name, (elapsed, results) in runs.items():
        disagree = sum(results[k] != reference[k] for k in reference)
        print(f"{name:17s} {len(files) / elapsed:9.1f} files/s  ({elapsed:7.2f} s; {disagree} disagree with identify)")
    base = len(files) / runs["identify"][0]
    for name in ("camid header", "camid full", "camid full/Pillow"):
        print(f"{name} / identify: {len(files) / runs[name][0] / base:6.1f}x")
    print(f"camid full / camid full/Pillow: {runs['camid full/Pillow'][0] / runs['camid full'][0]:6.2f}x; "
          f"records identical: {records[0] == records[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
