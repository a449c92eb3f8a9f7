"""Firmware twins on real photos: two devices of one real model filed as two catalog models, one device each.

A catalog of one reference device per model cannot show whether the pixels separate two models that share a
firmware (same JPEG tables, same size): validation is a photo split of each reference device and measures how the
network tells the two *devices* apart. Real twins (a Nikon D70 and D70s) are not on this machine, so this bench
makes the closest real stand-in: the two devices of one model in `../shared/samples/real-devices` become two
models, the second device's photos copied with their EXIF Model renamed (`--rename`, same length, header bytes
only: the pixels and the JPEG tables stay as the camera wrote them), beside the other models' devices as they are.
Then `bench/real_devices.py` runs on that folder as a user would (`camid catalog from-folder`, `dvc repro`,
`camid predict`), and this bench prints what the catalog and the evaluate stage said of the pair: the catalog's
note, and `metrics/evaluate.json` `metadata.twins` (the pair, `by` validation or firmware, and validation's
confusion of the two).

    python bench/real_twins.py                                  # DJI-FC6360's two devices as FC6360 / FC636S
    python bench/real_twins.py --catalog-args '--minutes 7'     # a shorter training plan
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples"


def twin_folder(devices: Path, label: str, rename: str, dest: Path) -> str:
    """`dest`: `devices` linked as it is, except `label`'s second device (by name), whose photos are copied with
    every `old` in their header (before the first SOS marker) replaced by `new` (`rename` = "old:new", same length)
    and filed under a label made from `label` and `new`. Returns that label."""
    old, new = rename.split(":", 1)
    if len(old) != len(new):
        raise SystemExit(f"--rename {rename}: the two models must be as long, so the header keeps its offsets")
    kept, moved = sorted(p for p in (devices / label).iterdir() if p.is_dir())[:2]
    twin = label.replace(old, new) if old in label else f"{label}-{new}"
    for folder in sorted(p for p in devices.iterdir() if p.is_dir()):
        for device in sorted(p for p in folder.iterdir() if p.is_dir()):
            if device == moved:
                continue
            (dest / folder.name / device.name).mkdir(parents=True)
            for photo in device.iterdir():
                (dest / folder.name / device.name / photo.name).symlink_to(photo.resolve())
    for photo in moved.iterdir():
        renamed_copy(photo, dest / twin / moved.name / photo.name, old, new)
    return twin


def renamed_copy(photo: Path, dest: Path, old: str, new: str) -> Path:
    """A copy of the JPEG `photo` at `dest` with every `old` in its header (before the first SOS marker) replaced
    by `new` (as long: no offset moves), so its EXIF Model names a twin; the pixels and JPEG tables as they were."""
    data = photo.read_bytes()
    sos = data.find(b"\xff\xda")
    if len(old) != len(new) or sos < 0 or old.encode() not in data[:sos]:
        raise SystemExit(f"{photo}: no {old!r} in its header to rename to {new!r} (as long)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data[:sos].replace(old.encode(), new.encode()) + data[sos:])
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=Path, default=SAMPLES / "real-devices")
    parser.add_argument("--label", default="DJI-FC6360", help="the model whose two devices become twins")
    parser.add_argument("--rename", default="FC6360:FC636S", help="OLD:NEW EXIF Model of the second device")
    parser.add_argument("--catalog-args", default="", help="passed on to bench/real_devices.py")
    parser.add_argument("--keep", type=Path, help="keep the folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not (args.devices / args.label).is_dir():
        parser.error(f"{args.devices / args.label} is not a folder of device folders")
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep} is not empty: name a new folder")
    with tempfile.TemporaryDirectory(prefix="camid-twins-") as tmp:
        base = args.keep or Path(tmp)
        twin = twin_folder(args.devices, args.label, args.rename, base / "devices")
        runs = base / "runs"
        cmd = [sys.executable, str(ROOT / "bench" / "real_devices.py"), "--devices", str(base / "devices"),
               "--refs", "largest", "--keep", str(runs)]
        if args.catalog_args:
            cmd.append(f"--catalog-args={args.catalog_args}")
        done = subprocess.run(cmd, env=os.environ, capture_output=True, text=True)
        print(done.stdout)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        metrics = json.loads(next(runs.glob("*/project/metrics/evaluate.json")).read_text())
        pair = {args.label, twin}
        found = [t for t in metrics["metadata"]["twins"] if set(t["cameras"]) == pair]
        print(f"the evaluate stage's twins for {args.label} / {twin}: "
              + (", ".join(f"by {t['by']}, validation confused {t['confused']:.2f} of {t['photos']} photos"
                           for t in found) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
