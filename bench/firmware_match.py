"""How far `camid inspect --model` firmware_match goes on the virtual zoo: photos of devices training never saw.

    python bench/firmware_match.py [--images-per-device 16] [--train-devices 2] [--out /tmp/camid-firmware-bench]

Synthesises the default (virtual) catalog with params.yaml's synth settings (camid.data.synth.synthesize, bad
files included), fits `TablePrior` on the first `train-devices` devices of each camera (good files only, as the
prepare stage keeps them) and asks `TablePrior.matches` about every photo of the other devices. Prints, for the
good photos of unseen devices: the share whose first named camera is the true one, the share that name it at
all, the share answered "none seen", and how many cameras a match names; per camera where it is ambiguous; and
for the spoiled files (edited, recompressed, ...) the share the tables still attribute to their camera, and
the share a re-save attributes to another camera (standard IJG tables that some camera's firmware also uses).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter
from pathlib import Path

from camid.config import load_params
from camid.data.synth import synthesize
from camid.inference.jpeg_tables import TablePrior, signature_of_file

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-device", type=int, default=None, help="default: params.yaml synth")
    parser.add_argument("--train-devices", type=int, default=2, help="devices per camera the counts are fitted on")
    parser.add_argument("--out", type=Path, default=Path("/tmp/camid-firmware-bench"))
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml")
    synth = params.synth
    if args.images_per_device:
        synth = dataclasses.replace(synth, images_per_device=args.images_per_device)
    start = time.perf_counter()
    manifest = synthesize(args.out, params.catalog, synth, progress=False)
    made = time.perf_counter() - start
    labels = params.catalog.labels
    manifest["signature"] = [signature_of_file(args.out / f) for f in manifest["file"]]
    order = {label: sorted(group["device"].unique()) for label, group in manifest.groupby("label")}
    manifest["seen"] = [device in order[label][:args.train_devices] for label, device in
                        zip(manifest["label"], manifest["device"])]
    good = manifest["bad"] == ""
    train = manifest[manifest["seen"] & good]
    tables = TablePrior.fit(train["signature"], train["label"].map(labels.index), labels)

    def outcome(rows):
        first = named = none = 0
        sizes = Counter()
        for label, sig in zip(rows["label"], rows["signature"]):
            names = [m["camera"] for m in tables.matches(sig) or []]
            first += bool(names) and names[0] == label
            named += label in names
            none += not names
            sizes[len(names)] += 1
        return len(rows), first, named, none, sizes

    unseen = manifest[~manifest["seen"] & good]
    n, first, named, none, sizes = outcome(unseen)
    print(f"virtual zoo: {len(labels)} cameras, {synth.devices_per_model} devices each, {synth.images_per_device} "
          f"photos per device ({len(manifest)} files, synthesised in {made:.1f} s); counts fitted on "
          f"{args.train_devices} devices per camera ({len(train)} good photos, {len(tables.counts)} signatures)")
    print(f"good photos of unseen devices: {n}")
    print(f"  true camera named first:  {first / n:.3f}")
    print(f"  true camera named at all: {named / n:.3f}")
    print(f"  'none seen':              {none / n:.3f}")
    print(f"  cameras named per photo:  mean {sum(k * c for k, c in sizes.items()) / n:.2f}; "
          + ", ".join(f"{k}: {c / n:.3f}" for k, c in sorted(sizes.items())))
    for sig, row in tables.counts.items():
        if sum(1 for c in row if c) > 1:
            shared = " | ".join(f"{m['camera']} ({m['photos']})" for m in tables.matches(sig))
            print(f"  shared firmware tables {sig}: {shared}")
    spoiled = manifest[manifest["bad"] != ""].copy()
    spoiled["kind"] = spoiled["bad"].str.partition(":")[0]
    print("spoiled files (all devices): share whose tables still name their camera first, name another camera "
          "first (a re-save whose tables equal some camera's), 'none seen'; files without JPEG tables")
    for kind, rows in spoiled.groupby("kind"):
        jpeg = rows[rows["signature"].notna()]
        k, first, _, none, _ = outcome(jpeg) if len(jpeg) else (0, 0, 0, 0, None)
        other = k - first - none
        print(f"  {kind:<13} {len(rows):4d} files: own camera first {first / max(k, 1):.3f}, another camera first "
              f"{other / max(k, 1):.3f}, none seen {none / max(k, 1):.3f}, no tables {len(rows) - len(jpeg)}")


if __name__ == "__main__":
    main()
