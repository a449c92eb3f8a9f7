"""Does the training plan keep `dvc repro` inside its budget on large photos? Planned against measured time.

`camid catalog from-folder` plans the training from the photos and a time budget (camid/tools/plan.py) and prints
the expected time of every stage. This bench checks that estimate on photos of the size issue 22 names (about 150
reference photos of 14 MP): it builds a `<label>/<photos>` folder from real camera photos (default
`../shared/samples/real-devices`, one device per model), each source photo giving `--per-photo` distinct crops
(left, right, ...) resized up to `--megapixels` and saved as camera-quality JPEGs with the source's EXIF (so the
catalog, the filter and the split take them as originals; resizing erases camera traces, so this measures cost,
not accuracy), then runs `camid catalog from-folder` and `dvc repro` in a private copy of this checkout (bench/
scale.py's) and prints, per stage, the plan's expected minutes and the measured ones (from `dvc repro`'s own
outputs' times).

    python bench/plan_time.py                          # 14 MP, 2 crops per photo of one device per model (~132)
    python bench/plan_time.py --megapixels 6 --minutes 8
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_devices import SAMPLES, devices_of  # noqa: E402
from scale import make_copy, stage_env  # noqa: E402


def build_folder(devices: dict, dest: Path, megapixels: float, per_photo: int) -> int:
    """One device per model (the one with most photos), each photo cut into `per_photo` side-by-side windows
    resized to `megapixels`; returns the number of photos written."""
    count = 0
    for label, devs in devices.items():
        device = max(devs, key=lambda d: len(devs[d]))
        for path in devs[device]:
            with Image.open(path) as image:
                exif = image.getexif()
                rgb = image.convert("RGB")
            w, h = rgb.size
            window = int(w * 0.75)
            for k in range(per_photo):
                left = (w - window) * k // max(1, per_photo - 1) if per_photo > 1 else (w - window) // 2
                part = rgb.crop((left, 0, left + window, h))
                scale = (megapixels * 1e6 / (part.width * part.height)) ** 0.5
                size = (2 * round(part.width * scale / 2), 2 * round(part.height * scale / 2))
                out = dest / label / f"{path.stem}_{k}.jpg"
                out.parent.mkdir(parents=True, exist_ok=True)
                details = exif.get_ifd(0x8769)  # the EXIF pixel size must agree with the pixels (the filter checks)
                details[0xA002], details[0xA003] = size
                part.resize(size, Image.Resampling.BICUBIC).save(out, quality=95, exif=exif)
                count += 1
    return count


def stage_times(copy: Path, started: float) -> dict[str, float]:
    """Minutes each stage took, from the modification times of what it wrote last (dvc repro runs them in order)."""
    marks = {"acquire, filter, split": copy / "data" / "split", "prepare": copy / "data" / "cache",
             "train": copy / "metrics" / "train" / "smallcnn.json", "evaluate": copy / "metrics" / "evaluate.json",
             "register": copy / "registry" / "registered.json"}
    out, previous = {}, started
    for stage, path in marks.items():
        end = path.stat().st_mtime
        out[stage] = (end - previous) / 60
        previous = end
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=Path, default=SAMPLES / "real-devices")
    parser.add_argument("--megapixels", type=float, default=14.0)
    parser.add_argument("--per-photo", type=int, default=2, help="distinct crops per source photo")
    parser.add_argument("--minutes", type=float, default=15.0, help="the plan's budget (catalog from-folder)")
    parser.add_argument("--keep", type=Path, help="keep the folders here")
    args = parser.parse_args(argv)
    base = args.keep or Path(tempfile.mkdtemp(prefix="camid-plan-time-"))
    base.mkdir(parents=True, exist_ok=True)
    photos = build_folder(devices_of(args.devices), base / "photos", args.megapixels, args.per_photo)
    print(f"{photos} photos of {args.megapixels:g} MP in {base / 'photos'}", flush=True)
    copy = make_copy(base / "project")
    env = stage_env(copy)
    catalog = subprocess.run(["camid", "catalog", "from-folder", str(base / "photos"), "--name", "bench_plan",
                              "--params", "params.yaml", "--minutes", str(args.minutes),
                              "--workers", str(os.cpu_count() or 1)], cwd=copy, env=env, capture_output=True,
                             text=True)
    print(catalog.stdout, catalog.stderr[-2000:], flush=True)
    if catalog.returncode:
        return 1
    planned = {stage: float(m) for stage, m in re.findall(r"(acquire, filter, split|prepare|train|evaluate|register) "
                                                          r"([0-9.]+) min", catalog.stdout)}
    started = time.time()
    done = subprocess.run(["dvc", "repro"], cwd=copy, env=env, capture_output=True, text=True)
    total = (time.time() - started) / 60
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-3000:])
        return 1
    measured = stage_times(copy, started)
    print(f"\n{'stage':<24}{'planned min':>12}{'measured min':>14}")
    for stage, minutes in measured.items():
        print(f"{stage:<24}{planned.get(stage, float('nan')):>12.1f}{minutes:>14.1f}")
    print(f"{'dvc repro':<24}{sum(planned.values()):>12.1f}{total:>14.1f}")
    history = copy / "models" / "train" / "smallcnn" / "history.csv"
    epochs = len(history.read_text().splitlines()) - 1 if history.is_file() else 0
    split = json.loads((copy / "metrics" / "split.json").read_text())
    print(f"epochs run: {epochs} (early stopping may end training before the plan's last epoch); photos after the "
          f"filter and split: {split['photos']}; folders in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
