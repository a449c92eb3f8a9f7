"""The firmware ground by table family on real photos: what the JPEG tables say of a model's *other* device, and
of other real models, when the catalog has one reference device per model.

    python bench/table_families.py [--devices ../shared/samples/real-devices] [--others ../shared/samples/real-jpeg]

`--devices` is a `<label>/<device>/<photos>` folder of real originals (two or more devices per model). For every
choice of one reference device per model (each device in turn), the reference devices' table signatures are
what `TablePrior.fit` would count; every photo of the models' other devices and every photo under `--others`
(other real models) is then classed as `TablePrior.evidence` classes it: `used` (exact tables seen), `family`
(no exact match, but tables of a reference's family: the same base table at another quality,
`camid.forensics.jpeg_quality.same_family`), or `unseen`. Without families (before this ground) `family` was
`unseen`. Printed per reference choice; then, over the `--others` photos among themselves, how many other models
share each one's family (how broad families are among real firmware). Headers only: no pixels are decoded.

`--twins`: the `--others` photos taken as one-device references of one catalog (a camera per EXIF make and model),
which pairs `camid.inference.metadata.firmware_twins` makes twins: by exact tables, by table family within a maker
(as the evaluate stage and `camid catalog from-folder` do), and by family whatever the maker (what the maker rule
leaves out). Pairs must share a native size.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

from camid.forensics.inspect import inspect_file
from camid.inference.jpeg_tables import FAMILY, UNSEEN, USED, TablePrior, signature_of_file
from camid.inference.metadata import firmware_twins, native_sizes, same_maker

ROOT = Path(__file__).resolve().parents[1]
JPEG = (".jpg", ".jpeg")


def photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in JPEG)


def classes(prior: TablePrior, signatures) -> dict[str, int]:
    evidence = list(prior.evidence(signatures, [True] * len(signatures)))
    return {kind: evidence.count(kind) for kind in (USED, FAMILY, UNSEEN)}


def twins(folder: Path) -> None:
    labels, makes, cameras, signatures, heights, widths = [], {}, [], [], [], []
    for path in photos(folder):
        record = inspect_file(path, hashes=False)
        if record["error"] or not record["jpeg_tables"]:
            continue
        label = f"{record['make'] or '?'} / {record['model'] or '?'}"
        if label not in labels:
            labels.append(label)
            makes[labels.index(label)] = record["make"] or ""
        cameras.append(labels.index(label))
        signatures.append(record["jpeg_tables"])
        heights.append(record["height"])
        widths.append(record["width"])
    prior = TablePrior.fit(signatures, cameras, labels)
    sizes = native_sizes(cameras, heights, widths)
    single = set(range(len(labels)))
    sized = sum(bool(sizes[a] & sizes[b]) for a, b in itertools.combinations(range(len(labels)), 2))
    anyone = {c: "one maker" for c in single}  # every camera "of one maker": the family whatever the maker
    found = {"exact tables": firmware_twins(prior.counts, sizes, single),
             "table family, within a maker (the rule)": firmware_twins(prior.counts, sizes, single,
                                                                        prior.seen_family, makes),
             "table family, any maker": firmware_twins(prior.counts, sizes, single, prior.seen_family, anyone)}
    print(f"{len(signatures)} photos of {len(labels)} models as one-device references; {sized} pairs share a size")
    for name, pairs in found.items():
        across = sum(not same_maker(makes[a], makes[b]) for a, b in pairs)
        print(f"{name}: {len(pairs)} pairs ({across} of two makers)")
        for a, b in pairs:
            print(f"    {labels[a]}  |  {labels[b]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=Path, default=ROOT.parent / "shared" / "samples" / "real-devices")
    parser.add_argument("--others", type=Path, default=ROOT.parent / "shared" / "samples" / "real-jpeg")
    parser.add_argument("--twins", action="store_true", help="the firmware twins among the --others models, as "
                        "one-device references of one catalog")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.twins:
        twins(args.others)
        print(f"{time.perf_counter() - start:.1f} s")
        return
    models = {m.name: {d.name: [signature_of_file(p) for p in photos(d)] for d in sorted(m.iterdir()) if d.is_dir()}
              for m in sorted(args.devices.iterdir()) if m.is_dir()}
    others = [signature_of_file(p) for p in photos(args.others)]
    labels = list(models)
    print(f"{sum(len(s) for m in models.values() for s in m.values())} photos of {len(labels)} models "
          f"({', '.join(f'{m}: {len(d)} devices' for m, d in models.items())}); {len(others)} photos of other models")
    print(f"{'reference devices':<44} {'other devices: used/family/unseen':<36} {'other models: used/family/unseen'}")
    totals = {"known": [0, 0], "others": [0, 0]}  # [accepted by tables, all], before and after families
    before = {"known": 0, "others": 0}
    for choice in itertools.product(*(list(devices) for devices in models.values())):
        signatures, cameras, queries = [], [], []
        for k, (label, device) in enumerate(zip(labels, choice)):
            signatures += models[label][device]
            cameras += [k] * len(models[label][device])
            queries += [s for d, sigs in models[label].items() if d != device for s in sigs]
        prior = TablePrior.fit(signatures, cameras, labels)
        known, other = classes(prior, queries), classes(prior, others)
        name = ", ".join(f"{label}/{device[:8]}" for label, device in zip(labels, choice))
        print(f"{name:<44} {known[USED]:>4} / {known[FAMILY]:>4} / {known[UNSEEN]:>4} of {len(queries):<14} "
              f"{other[USED]:>3} / {other[FAMILY]:>3} / {other[UNSEEN]:>3} of {len(others)}")
        totals["known"][0] += known[USED] + known[FAMILY]
        totals["known"][1] += len(queries)
        before["known"] += known[USED]
        totals["others"][0] += other[UNSEEN]
        totals["others"][1] += len(others)
        before["others"] += other[UNSEEN] + other[FAMILY]
    k, o = totals["known"], totals["others"]
    print(f"over every choice: other devices' tables that enter the answer {k[0]}/{k[1]} ({k[0] / k[1]:.3f}; "
          f"exact only {before['known']}/{k[1]}, {before['known'] / k[1]:.3f}); other models' tables unseen "
          f"{o[0]}/{o[1]} ({o[0] / o[1]:.3f}; exact only {before['others']}/{o[1]}, {before['others'] / o[1]:.3f})")
    prior = TablePrior.fit(others, range(len(others)), [f"m{i}" for i in range(len(others))])
    partners = [len(prior.family(s)) for s in others]
    print(f"families among the {len(others)} other models: mean {statistics.mean(partners):.1f} family partners "
          f"(median {statistics.median(partners):g}, max {max(partners)}), {partners.count(0)} in no one's family")
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
