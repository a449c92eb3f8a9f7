"""What the split stage costs where it must read capture times: cameras of one reference device each, whose held-out
photos are runs of consecutive shots (camid.data.splitting, EXIF DateTimeOriginal from each photo's header), at two
sizes side by side.

A folder `<label>/<device>/<photo>` of links to the real photos of `../shared/samples` (each linked under many
names, so the headers read are real camera headers), `--cameras` cameras of one device each, `--photos` and then
`--factor` times as many photos per camera; `camid.stages.split.split` runs on each in a fresh process, which
prints its wall time and peak RSS. The same folders with the capture times switched off (every photo's time
unknown, the file-name order) are the baseline run beside them.

    python bench/split_cost.py                        # 4 cameras x 250 and x 1,000 photos
    python bench/split_cost.py --photos 1000 --factor 4
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

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import camid.stages.split as stage
if sys.argv[3] == "off":
    stage.capture_times = lambda files, read=None: files["path"].map(lambda _: "")
start = time.perf_counter()
summary = stage.split(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[4]), val_fraction=0.25,
                      test_fraction=0.25, seed=7)
print(json.dumps({"seconds": time.perf_counter() - start, "photos": sum(summary["photos"].values()),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build(folder: Path, sources: list[Path], cameras: int, photos: int) -> list[str]:
    labels = [f"Cam-{k}" for k in range(cameras)]
    for k, label in enumerate(labels):
        device = folder / label / "dev0"
        device.mkdir(parents=True)
        for i in range(photos):
            os.symlink(sources[(k * photos + i) % len(sources)], device / f"{i:06d}.jpg")
    return labels


def run(folder: Path, out: Path, labels: list[str], times: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out), times, json.dumps(labels)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=SAMPLES, help="real JPEGs to link (searched recursively)")
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--photos", type=int, default=250, help="photos per camera at the small size")
    parser.add_argument("--factor", type=int, default=4, help="the large size is this many times the small")
    args = parser.parse_args()
    sources = sorted(p.resolve() for p in args.samples.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not sources:
        raise SystemExit(f"no JPEGs under {args.samples}")
    print(f"{len(sources)} real JPEGs linked; {args.cameras} cameras of one device each")
    print(f"{'photos':>8} {'times':>5} {'seconds':>8} {'ms/photo':>9} {'peak RSS MB':>12}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="camid-split-cost-") as tmp:
        for n in (args.photos, args.photos * args.factor):
            folder = Path(tmp) / f"n{n}"
            labels = build(folder, sources, args.cameras, n)
            for times in ("off", "on"):
                row = run(folder, Path(tmp) / f"out-{n}-{times}", labels, times)
                rows[n, times] = row
                print(f"{row['photos']:>8} {times:>5} {row['seconds']:>8.2f} "
                      f"{1000 * row['seconds'] / row['photos']:>9.2f} {row['peak_rss_mb']:>12.0f}")
    small, large = args.photos, args.photos * args.factor
    for times in ("off", "on"):
        print(f"times {times}: {large * args.cameras} photos against {small * args.cameras}: "
              f"time x{rows[large, times]['seconds'] / rows[small, times]['seconds']:.2f}, "
              f"peak RSS x{rows[large, times]['peak_rss_mb'] / rows[small, times]['peak_rss_mb']:.2f}")
    for n in (small, large):
        print(f"{n * args.cameras} photos: reading the capture times costs "
              f"x{rows[n, 'on']['seconds'] / rows[n, 'off']['seconds']:.2f} the split without them")


if __name__ == "__main__":
    main()
