"""`camid catalog from-folder DIR --name NAME`: a camera catalog read off the user's own photos.

Training on one's own cameras needs a catalog entry per camera in params.yaml, and every field of an entry
decides what the filter stage keeps: `models` must match each photo's EXIF Model, `sizes` its pixel size,
`rot90` says whether quarter turns are a valid augmentation, and `filter.min_quality` drops photos saved below
it as likely recompressed copies. Written by hand these go wrong in ways that only show later, as an empty
filter output. So this command inspects every photo (headers only, no pixel decoding), derives one entry per
<label> folder, reports what it skipped and why, and writes the entries into params.yaml as the active
catalog (comments kept, atomically), with `acquire.source: folder`, so that `dvc repro` takes the folder to
a trained model.

DIR is `DIR/<label>/<files>`, `DIR/<label>/<device>/<files>` (a subfolder per physical camera of that model)
or the Kaggle layout `DIR/train/<label>/...`. Devices matter because the split stage keeps train, validation
and test device-disjoint: on photos of one device, accuracy measures how well the model knows that device, not
the camera model. A photo's device is its <device> folder, else its EXIF BodySerialNumber, else unknown.
"""
from __future__ import annotations

import argparse
import os
import re
from collections import Counter
from pathlib import Path

import pandas as pd
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import DoubleQuotedScalarString
from tqdm import tqdm

from camid.core.arguments import positive
from camid.config import PARAMS_FILE, FilterParams, SplitParams, load_params, load_raw
from camid.data.splitting import MIN_DEVICES, MIN_PHOTOS, device_split
from camid.errors import CamidError
from camid.forensics.inspect import error_kind, inspect_paths
from camid.tools.plan import NETWORK_S_PER_MEGAPIXEL, PLANNED_ARCHS, Photos, measure_network, plan_training
from camid.tools.profile import set_params

DEFAULT_MINUTES = 15.0  # the training plan's budget for the whole `dvc repro` (camid.tools.plan)
# Backgrounds of 7, 10, 13 and 16 real models rejected fewer real unknown models from the pixels than no background
# did (0.69-0.795 against 0.85-0.90); 19, 22, 34 and 38 models as many or more (0.85-0.98): python
# bench/real_devices.py --refs largest --background-half A|B --background-count N, one run each; see the README.
MIN_BACKGROUND_MODELS = 20
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def scan_folder(folder: str | os.PathLike) -> dict[str, list[tuple[str | None, Path]]]:
    """{label: [(device folder or None, photo path)]} for DIR in any of the three layouts (hidden names skipped)."""
    root = Path(folder)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise CamidError(f"{root} {problem}: give a folder holding one <label> folder of photos per camera")
    if (root / "train").is_dir():  # the Kaggle layout
        root = root / "train"
    labels = {}
    for label_dir in (p for p in _visible(root) if p.is_dir()):
        # only the files that ingest links: <label>/<file> and <label>/<device>/<file>
        labels[label_dir.name] = [(None, p) for p in _visible(label_dir) if p.is_file()] + \
            [(d.name, p) for d in _visible(label_dir) if d.is_dir() for p in _visible(d) if p.is_file()]
    if not labels:
        raise CamidError(f"{root} holds no <label> folders: put each camera's photos in a folder named after it "
                         f"({root}/<label>/<photos>, or {root}/<label>/<device>/<photos>)")
    return labels


def inspect_folder(labels: dict[str, list[tuple[str | None, Path]]], params: FilterParams, *, workers: int = 1,
                   progress: bool = True) -> dict[str, list[dict]]:
    """Inspection records per label (headers only), each with a `device` key: the device folder, else the serial."""
    records = {}
    for label, items in labels.items():
        found = inspect_paths([path for _, path in items], params.editors, params.max_pixels, workers=workers,
                              hashes=False)
        found = tqdm(found, total=len(items), desc=label, unit="photo", disable=not progress)
        records[label] = [{**record, "device": device or record["serial"]}
                          for (device, _), record in zip(items, found)]
    return records


def skip_reason(record: dict) -> str | None:
    """Why a photo can tell nothing about its camera's catalog entry (the filter drops it too); None if usable."""
    if record["error"]:
        return error_kind(record["error"])
    if record["format"] != "JPEG":
        return "not_jpeg"
    if record["edited"]:
        return "edited"
    if not record["model"]:
        return "no_exif_model"
    return None


def usable(records: list[dict]) -> tuple[list[dict], Counter]:
    """The records a catalog entry is built from, and the skip reasons of the others."""
    reasons = [skip_reason(r) for r in records]
    return [r for r, why in zip(records, reasons) if why is None], Counter(filter(None, reasons))


def fnmatch_escape(text: str) -> str:
    """A Camera.models pattern that matches exactly `text`."""
    return re.sub(r"([*?[])", r"[\1]", text)


def build_entry(label: str, records: list[dict]) -> dict:
    """The catalog entry for one camera from all its inspection records; CamidError if none is usable."""
    kept, skipped = usable(records)
    if not kept:
        if skipped["no_exif_model"]:
            raise CamidError(
                f"camera {label!r}: none of its JPEGs has an EXIF Model, and the filter stage keeps only photos "
                "whose EXIF Model matches the catalog: use the files as the camera wrote them, not exports, "
                "screenshots or messenger copies (they strip EXIF)")
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "the folder is empty"
        raise CamidError(f"camera {label!r} has no usable JPEG ({why}): add the camera's original JPEGs to its folder")
    stored = Counter((r["height"], r["width"]) for r in kept)
    by_size: dict[tuple[int, int], Counter] = {}  # orientation-free size -> stored (h, w) counts
    for (h, w), n in stored.most_common():
        by_size.setdefault((max(h, w), min(h, w)), Counter())[(h, w)] = n
    makes = Counter(r["make"] for r in kept if r["make"])
    return {
        "label": label,
        "make": makes.most_common(1)[0][0] if makes else "",
        "models": [fnmatch_escape(m) for m in sorted({r["model"] for r in kept})],
        "sizes": [list(orientations.most_common(1)[0][0]) for orientations in by_size.values()],
        "rot90": any(len(orientations) == 2 for orientations in by_size.values()),
        "search": re.sub(r"[-_]+", " ", label).strip() or label,
    }


def build_entries(records_by_label: dict[str, list[dict]]) -> list[dict]:
    """Catalog entries in label order; CamidError if two cameras share an EXIF Model (the filter could not
    tell their photos apart)."""
    owners: dict[str, str] = {}
    for label, records in records_by_label.items():
        for model in sorted({r["model"] for r in usable(records)[0]}):
            if model in owners:
                raise CamidError(f"cameras {owners[model]!r} and {label!r} both have photos with EXIF Model "
                                 f"{model!r}, so the filter could not tell them apart: if they are one camera "
                                 "model, merge the two folders; otherwise move the misplaced photos")
            owners[model] = label
    return [build_entry(label, records) for label, records in records_by_label.items()]


def mark_background(entries: list[dict], background) -> list[dict]:
    """`entries` with `background: true` on the labels named in `background`; CamidError for a label that is no
    folder of DIR, or where nothing would be left to answer."""
    background = set(background or ())
    labels = [e["label"] for e in entries]
    missing = sorted(background - set(labels))
    if missing:
        raise CamidError(f"--background {', '.join(missing)}: no such camera folder; the folders are "
                         f"{', '.join(labels)}")
    if background and background >= set(labels):
        raise CamidError("every folder is --background: background cameras are never an answer, so at least one "
                         "folder must be a camera of the catalog")
    return [{**e, "background": True} if e["label"] in background else e for e in entries]


def _flow(entry: dict) -> CommentedMap:
    """An entry as params.yaml writes them: one flow mapping per line, patterns and search text quoted."""
    node = CommentedMap({**entry, "models": [DoubleQuotedScalarString(m) for m in entry["models"]],
                         "search": DoubleQuotedScalarString(entry["search"])})
    node.fa.set_flow_style()
    return node


def _report(records_by_label: dict[str, list[dict]], entries: list[dict]) -> list[str]:
    """The per-camera table, then what was skipped and the device warnings."""
    rows = [("camera", "photos", "devices", "quality", "sizes (h x w)", "EXIF models")]
    notes, kept_by_label, single = [], {}, set()
    for entry in entries:
        label = entry["label"]
        kept, skipped = usable(records_by_label[label])
        devices = {r["device"] for r in kept if r["device"]}
        low, high = min(r["quality"] for r in kept), max(r["quality"] for r in kept)
        rows.append((label + (" (background)" if entry.get("background") else ""), str(len(kept)),
                     str(len(devices)) if devices else "unknown", str(low) if low == high else f"{low}-{high}",
                     ", ".join(f"{h}x{w}" for h, w in entry["sizes"]), ", ".join(sorted({r["model"] for r in kept}))))
        if skipped:
            notes.append(f"{label}: skipped {sum(skipped.values())} file(s): "
                         + ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
        if entry.get("background"):
            models = len({r["model"] for r in kept})
            notes.append(
                f"note: {label} is background: photos of {models} other camera model(s), trained as a class of their "
                "own so that the network learns what sets your cameras apart from cameras in general, never an "
                "answer. A questioned photo whose pixels are most like them is answered unknown, and for a camera of "
                "one reference device that replaces the distance rule. Use originals of models not in the catalog, "
                "as many models as you have (one folder per model or device). The background may also take photos "
                "of your cameras' other devices (on real photos, 4 of a device's 5 in three of twelve runs): check "
                "it on photos of a second device where you have one.")
            if models < MIN_BACKGROUND_MODELS:
                notes.append(
                    f"warning: {label} holds {models} other camera model(s), fewer than {MIN_BACKGROUND_MODELS}. On real "
                    "photos, backgrounds of 7 to 16 models let more unknown models through the pixel ground than no "
                    "background (0.69-0.80 of them rejected, against 0.85-0.90 by the distance rule a background "
                    "replaces); 19 to 38 models rejected as many or more (0.85-0.98). Add photos of more models, "
                    f"at least {MIN_BACKGROUND_MODELS}, or leave the background out.")
            continue
        kept_by_label[label] = kept
        if len(devices) < MIN_DEVICES:
            unknown = sum(not r["device"] for r in kept)
            notes.append(
                f"warning: {label} has {len(devices)} known device(s)"
                + (f" and {unknown} photo(s) of unknown device" if unknown else "")
                + f"; the split keeps train, validation and test device-disjoint and needs {MIN_DEVICES}. With fewer "
                "it falls back to a photo split for this camera, whose accuracy then measures device identification, "
                f"not model identification: add photos of more devices, one folder each ({label}/<device>/<photos>).")
        if len(devices) <= 1:
            single.add(label)
            notes.append(
                f"note: {label}'s reference is one device, and what it covers is what camid can recognise: sizes "
                + ", ".join(f"{h}x{w}" for h, w in entry["sizes"])
                + f", JPEG quality {low if low == high else f'{low}-{high}'}. A questioned photo of another size (a "
                "camera's smaller sizes are resampled in the camera, which erases most demosaicing traces) or "
                "another quality mode (other JPEG tables) lies outside it and may be answered unknown: add photos "
                "of every size and quality mode you will be asked about.")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [" ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows] + notes \
        + _twin_notes(kept_by_label, single, {entry["label"]: entry["make"] for entry in entries})


def _twin_notes(kept_by_label: dict[str, list[dict]], single: set[str], make_of: dict[str, str]) -> list[str]:
    """A note for each pair of cameras that the evaluate stage will treat as firmware twins
    (`camid.inference.metadata.firmware_twins`), from each camera's usable records, the cameras of one device
    (`single`) and the catalog entries' makes (`make_of`): one of the two is one device, and their photos share
    JPEG tables (exactly, or, of one maker, one family at two qualities) and a size, so nothing but the pixels
    separates them."""
    from camid.inference.jpeg_tables import TablePrior
    from camid.inference.metadata import firmware_twins, native_sizes

    labels = list(kept_by_label)
    records = [(index, r) for index, label in enumerate(labels) for r in kept_by_label[label]]
    cameras = [index for index, _ in records]
    prior = TablePrior.fit([r["jpeg_tables"] or None for _, r in records], cameras, labels)
    sizes = native_sizes(cameras, [r["height"] for _, r in records], [r["width"] for _, r in records])
    ones = {labels.index(label) for label in single}
    makes = {index: make_of.get(label, "") for index, label in enumerate(labels)}
    exact = set(firmware_twins(prior.counts, sizes, ones))
    notes = []
    for a, b in firmware_twins(prior.counts, sizes, ones, prior.seen_family, makes):
        shared = sorted(sizes[a] & sizes[b], reverse=True)
        tables = ("the same JPEG tables" if (a, b) in exact else
                  "JPEG tables of one family (one firmware's tables at two qualities: their photos were taken in "
                  "different quality modes of one maker's cameras)")
        notes.append(
            f"note: {labels[a]} and {labels[b]} write {tables} at the same size "
            f"({', '.join(f'{long}x{short}' for long, short in shared)}), so only the pixels can tell them apart, and "
            "with one reference device validation cannot show whether they do (it tells two devices apart). camid "
            "treats them as twins: an answer between them names both, and EXIF naming one is never read as a forgery "
            "because the pixels point to the other. Photos of a second device of each would show whether the pixels "
            "separate the two models.")
    return notes


def _quality_update(records_by_label: dict[str, list[dict]], min_quality: int, keep: bool) -> tuple[dict, str | None]:
    """({"filter.min_quality": lowest} or {}, message) for photos saved below filter.min_quality."""
    qualities = {label: [r["quality"] for r in usable(records)[0]] for label, records in records_by_label.items()}
    low = {label: sum(q < min_quality for q in found) for label, found in qualities.items()}
    if not sum(low.values()):
        return {}, None
    lowest = min(min(found) for found in qualities.values())
    cameras = ", ".join(f"{n} of {label}" for label, n in sorted(low.items()) if n)
    if keep:
        return {}, (f"warning: filter.min_quality stays {min_quality}: the filter stage will drop "
                    f"{sum(low.values())} photo(s) saved below it ({cameras})")
    return {"filter.min_quality": lowest}, (
        f"filter.min_quality: {min_quality} -> {lowest}, the lowest quality among your photos ({cameras} were below "
        f"{min_quality}), so that the filter keeps them. The threshold guards photo-site crawls against recompressed "
        "copies, and camera JPEG modes such as Normal or Basic save below 94. Pass --keep-min-quality to leave it.")


def _folder_setting(folder: str, params_path: str) -> str:
    """DIR as acquire.folder should name it: absolute as given, relative to params.yaml's folder (where dvc
    repro runs) otherwise, which is DIR as given when the command runs there."""
    if os.path.isabs(folder):
        return folder
    return os.path.relpath(os.path.abspath(folder), os.path.dirname(os.path.abspath(params_path)))


def expected_photos(records_by_label: dict[str, list[dict]], split: SplitParams) -> Photos:
    """How the split stage will deal the usable photos, as counts for the training plan: its own rules
    (camid.data.splitting.device_split) on the catalog's devices (folders, else serials). A camera of fewer than
    MIN_PHOTOS usable photos, which the split stage refuses, counts as training photos here. Training draws a
    camera uniformly, then one of its photos, so the photo it decodes is on average the mean of the cameras' mean
    sizes (`sampled_megapixels`), not the mean photo's: a camera of few large photos is decoded as often as one of
    many small ones."""
    rows, pixels, camera_means, few = [], [], [], 0
    for label, records in records_by_label.items():
        kept = usable(records)[0]
        sizes = [r["height"] * r["width"] / 1e6 for r in kept]
        pixels += sizes
        if sizes:
            camera_means.append(sum(sizes) / len(sizes))
        if len(kept) < MIN_PHOTOS:
            few += len(kept)
            continue
        rows += [{"path": f"{label}/{i:08d}", "label": label, "device": r["device"] or "",
                  "taken": r.get("datetime") or ""} for i, r in enumerate(kept)]
    if rows:
        sets = device_split(pd.DataFrame(rows), split.val_fraction, split.test_fraction, split.seed,
                            split.photo_fraction, split.session_validation)[0]
        counts = {name: len(table) for name, table in sets.items()}
    else:
        counts = {"train": 0, "val": 0, "test": 0}
    return Photos(train=counts["train"] + few, held_out=counts["val"] + counts["test"], val=counts["val"],
                  megapixels=sum(pixels) / max(1, len(pixels)),
                  sampled_megapixels=sum(camera_means) / len(camera_means) if camera_means else None)


def _plan_update(records_by_label: dict[str, list[dict]], params, minutes: float,
                 network_s_per_mp: float | None = None) -> tuple[dict, list[str]]:
    """The training plan's params.yaml keys and its lines (camid.tools.plan), or none where the active backbones
    are not the one the plan's costs were measured with. `network_s_per_mp`: this machine's cost of training the
    backbone (None: measured now, `measure_network`)."""
    if network_s_per_mp is not None and not network_s_per_mp > 0:
        raise CamidError(f"--train-cost must be a positive number of seconds per megapixel, got {network_s_per_mp}")
    photos = expected_photos(records_by_label, params.split)
    archs = tuple(params.train.archs)
    if len(archs) != 1 or archs[0] not in PLANNED_ARCHS:
        return {}, [f"no training plan: train.archs is {list(archs)}, and the plan's costs are measured for one of "
                    f"{', '.join(PLANNED_ARCHS)} alone; set train.steps_per_epoch, train.epochs and "
                    "train.crops_per_decode by hand"]
    if network_s_per_mp is None:
        print(f"measuring how fast this machine trains {archs[0]} (three timings of a few steps on random patches) ...",
              flush=True)
        network_s_per_mp = measure_network(archs[0], params.train.patch, params.train.batch_size)
    plan = plan_training(photos, patch=params.train.patch, batch_size=params.train.batch_size,
                         budget_s=minutes * 60, arch=archs[0], network_s_per_mp=network_s_per_mp,
                         precise_bn=params.train.precise_bn)
    return plan.params(), plan.lines(photos)


def from_folder(folder: str, name: str, params_path: str = PARAMS_FILE, *, workers: int = 1,
                keep_min_quality: bool = False, force: bool = False, progress: bool = True,
                minutes: float | None = DEFAULT_MINUTES, background: tuple[str, ...] = (),
                network_s_per_mp: float | None = None) -> list[dict]:
    """Inspect DIR, print the report and the training plan for a `dvc repro` of `minutes` (None: no plan, the
    train block stays as it is), write catalog NAME into params.yaml as the active one; returns the entries.
    `network_s_per_mp`: this machine's cost of training the backbone, for the plan (None: measured now).
    `background`: the labels whose folders hold other cameras' photos (`background: true`, camid.config.Camera)."""
    if name == "active" or not _NAME.fullmatch(name):
        raise CamidError(f"catalog name {name!r} is not allowed: use letters, digits, '-' and '_' (and not 'active')")
    params = load_params(params_path)
    if name in (load_raw(params_path).get("catalog") or {}) and not force:
        raise CamidError(f"{params_path} already has a catalog {name!r}: choose another --name, or pass --force "
                         "to replace it")
    records = inspect_folder(scan_folder(folder), params.filter, workers=workers, progress=progress)
    entries = mark_background(build_entries(records), background)
    quality, quality_message = _quality_update(records, params.filter.min_quality, keep_min_quality)
    print("\n".join(_report(records, entries)))
    if quality_message:
        print(quality_message)
    plan, plan_lines = _plan_update(records, params, minutes, network_s_per_mp) if minutes else ({}, [])
    print("\n".join(plan_lines))
    changed = set_params({f"catalog.{name}": [_flow(e) for e in entries], "catalog.active": name,
                          "acquire.source": "folder", "acquire.folder": _folder_setting(folder, params_path),
                          **quality, **plan}, params_path)
    print(f"\nwrote catalog {name!r} ({len(entries)} cameras) into {params_path}:")
    for key, (old, new) in changed.items():
        if key != f"catalog.{name}":
            print(f"  {key}: {old!r} -> {new!r}")
    print("next: dvc repro   (ingests the folder, filters, splits, trains, evaluates and registers the model)")
    return entries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("from-folder", help="inspect a folder of labelled photos and write a catalog from them",
                       description="Inspect DIR/<label>/[<device>/]<photos> (or DIR/train/<label>/...) and write "
                                   "a camera catalog, made active, into params.yaml.")
    p.add_argument("folder", metavar="DIR", help="one folder of photos per camera, named by its label")
    p.add_argument("--name", required=True, help="the catalog's name under `catalog:` in params.yaml")
    p.add_argument("--params", default=None, help="params file to rewrite (default $CAMID_PARAMS or params.yaml)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all CPUs)")
    p.add_argument("--keep-min-quality", action="store_true",
                   help="leave filter.min_quality as it is even if some photos are saved below it")
    p.add_argument("--force", action="store_true", help="replace an existing catalog of the same name")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                   help=f"time budget of the `dvc repro` that follows, on this machine's cores: the training plan "
                        f"(train.steps_per_epoch, train.epochs, train.crops_per_decode) is chosen to fit it "
                        f"(default {DEFAULT_MINUTES:g})")
    p.add_argument("--keep-train", action="store_true", help="no training plan: leave the train block as it is")
    p.add_argument("--train-cost", type=positive(float), default=None, metavar="S",
                   help="seconds per megapixel of patches this machine takes to train the backbone, for the plan "
                        "(default: measured now, 10 to 40 s; the reference machine's smallcnn: "
                        f"{NETWORK_S_PER_MEGAPIXEL['smallcnn']:g})")
    p.add_argument("--background", action="append", default=[], metavar="LABEL",
                   help="a folder of DIR that holds photos of *other* camera models (one subfolder per model or "
                        "device): trained as a class, never an answer; a photo the pixels put with it is unknown "
                        "(repeatable)")


def run(args: argparse.Namespace) -> int:
    from_folder(args.folder, args.name, args.params or os.environ.get("CAMID_PARAMS", PARAMS_FILE),
                workers=args.workers, keep_min_quality=args.keep_min_quality, force=args.force,
                minutes=None if args.keep_train else args.minutes, background=tuple(args.background),
                network_s_per_mp=args.train_cost)
    return 0
