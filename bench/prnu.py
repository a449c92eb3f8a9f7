"""PRNU device identification over the virtual zoo: how far apart same-device and other-device PCEs are.

    python bench/prnu.py [--zoo DIR] [--cache /tmp/camid-prnu-bench] [--images-per-device 24] [--enrol 16]
                         [--crop 240] [--threshold 60] [--labels Aster-A1,Boreal-B7]

Makes (once, cached) a zoo of every catalog camera in params.yaml, or reads a zoo given with --zoo (the
layout and synth_manifest.csv of `camid synth`; bad files are left out). For each device, enrols a fingerprint
on its first `--enrol` photos of its most common size (a fingerprint is one sensor size; at most three quarters
of them) and scores the other photos of that size against: its own fingerprint, the other devices of its model
(same CFA, demosaicing and JPEG tables: only the sensor differs) and the first device of every other model.
Every test compares the same central crop x crop pixels (default: the largest even size inside every sensor),
so that all models can be compared with each other. Prints the PCE distribution of each kind of pair, the share above --threshold (true matches
for the own device, false matches otherwise) and the same per model.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from camid.data import synth
from camid.config import SynthParams, load_params
from camid.forensics import prnu

KINDS = ("same device", "same model", "other model")


def _zoo(args, catalog) -> tuple[Path, pd.DataFrame]:
    if args.zoo:
        root = Path(args.zoo)
    else:
        which = args.labels.replace(",", "-") if args.labels else catalog.name
        root = Path(args.cache) / f"zoo-{which}-{args.images_per_device}"
        if not (root / synth.MANIFEST).exists():
            params = SynthParams(devices_per_model=4, images_per_device=args.images_per_device, bad_fraction=0)
            print(f"making the zoo in {root} (once) ...")
            synth.synthesize(root, catalog, params)
    manifest = pd.read_csv(root / synth.MANIFEST, keep_default_na=False)
    manifest = manifest[(manifest["bad"] == "") & manifest["label"].isin(catalog.labels)]
    return root, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", help="an existing `camid synth` folder (default: make one in --cache)")
    parser.add_argument("--cache", default="/tmp/camid-prnu-bench")
    parser.add_argument("--images-per-device", type=int, default=24)
    parser.add_argument("--enrol", type=int, default=16, help="reference photos per device")
    parser.add_argument("--crop", type=int, help="compared central crop (default: the largest that fits all)")
    parser.add_argument("--threshold", type=float, default=prnu.DEFAULT_THRESHOLD)
    parser.add_argument("--labels", help="comma-separated catalog labels (default: all)")
    args = parser.parse_args()

    catalog = load_params().catalog
    if args.labels:
        catalog = dataclasses.replace(catalog, cameras=tuple(map(catalog.get, args.labels.split(","))))
    root, manifest = _zoo(args, catalog)
    crop = args.crop or (min(min(size) for camera in catalog.cameras for size in camera.sizes) & ~1)
    start = time.perf_counter()
    fingerprints, queries = {}, {}
    for (label, device), group in manifest.groupby(["label", "device"], sort=False):
        files = [root / f for f in group["file"]]
        shapes = [tuple(sorted(Image.open(f).size)) for f in files]  # either way up
        common = max(set(shapes), key=shapes.count)
        files = [f for f, shape in zip(files, shapes) if shape == common]
        enrol = min(args.enrol, len(files) - len(files) // 4)
        fingerprints[label, device] = prnu.Matcher(prnu.enroll(files[:enrol]), crop=crop)
        queries[label, device] = files[enrol:]
    enrolled = time.perf_counter()
    first_device = {}
    for label, device in fingerprints:
        first_device.setdefault(label, device)
    rows = []
    for (label, device), files in queries.items():
        targets = [(key, "same device" if key[1] == device else "same model")
                   for key in fingerprints if key[0] == label]
        targets += [((other, d), "other model") for other, d in first_device.items() if other != label]
        for path in files:
            pixels = prnu.read_photo(path)
            for key, kind in targets:
                rows.append({"label": label, "kind": kind, "pce": fingerprints[key].score(pixels).pce})
    scores = pd.DataFrame(rows)
    n_photos = len(manifest)
    print(f"{len(fingerprints)} devices of {manifest['label'].nunique()} models, up to {args.enrol} reference photos "
          f"each, central {crop}x{crop} crop; enrolment {enrolled - start:.1f} s, {len(scores)} tests "
          f"{time.perf_counter() - enrolled:.1f} s ({n_photos} photos)\n")
    print(f"{'pairs':<12} {'n':>5} {'min':>8} {'5%':>8} {'median':>8} {'95%':>8} {'max':>9}  > {args.threshold:g}")
    for kind in KINDS:
        pce = scores.loc[scores["kind"] == kind, "pce"].to_numpy()
        if len(pce):
            q = np.percentile(pce, [0, 5, 50, 95, 100])
            print(f"{kind:<12} {len(pce):5d} " + " ".join(f"{v:8.1f}" for v in q[:4]) + f" {q[4]:9.1f}"
                  f"  {np.mean(pce > args.threshold):6.1%}")
    rates = scores.assign(hit=scores["pce"] > args.threshold).pivot_table("hit", "label", "kind", aggfunc="mean")
    print(f"\nshare above {args.threshold:g} per model (same device: true matches; others: false matches)")
    print(rates.reindex(columns=[k for k in KINDS if k in rates]).map("{:.1%}".format).to_string())


if __name__ == "__main__":
    main()
