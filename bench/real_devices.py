"""One reference device per camera model, on real photos: what camid answers for the models' *other* devices and
for other camera models, as a user would run it.

The usual analyst has one reference camera per model. This bench does what such a user does, in a private copy
of this checkout (bench/scale.py's copy: the code as it is now, its own MLflow store):

1. a folder of the reference photos, `<label>/<device>/<photos>` (links), one device per model;
2. `camid catalog from-folder` on it, then `dvc repro` with the defaults (or `--set KEY=VALUE` overrides);
3. `camid predict --full-image` (with the JPEG tables, and `--pixels-only`) on the photos of every *other* device
   of those models and on the photos of other camera models (`--unknown`, one folder of JPEGs).

It prints, per run: the closest camera right on the other devices, the share accepted (not `unknown`), how the
JPEG tables read (used / family / unseen) and which ground made answers `unknown` (`unknown_by`), `consistent: false` on those genuine photos, the share of the other
models answered `unknown` and the share the pixels alone reject, how the other models' EXIF reads
(`unknown_consistent`: `consistent` true, false or empty), and how long `dvc repro` took. Split: train and
validation are photos of the reference devices; every figure is on devices or models training never saw.

It also prints, per catalog camera, how well the features keep the camera's other devices nearer than other models,
whatever the threshold: `nearest_right`, the share of the other devices' photos whose nearest training photo
(features, not the network's probabilities) is of the right camera; `sep_<label>`, the probability that a photo of another device of that model lies nearer
that camera's training photos (the kNN score of camid.inference.openset.camera_knn_score) than a photo of another
model does (an AUROC: 1 every other device nearer, 0.5 no better than chance), and `far_<label>`, how many times
as far as the reference device's own held-out photos the other devices lie (median cosine distances); and, from
the pixels alone, the share of the other devices' photos the single-device rule would accept and the share of other
models' photos it would reject at other settings of evaluate.single_device_reach (`accept_<reach>`,
`reject_<reach>`).

    python bench/real_devices.py                                  # ../shared/samples: each choice of references
    python bench/real_devices.py --refs largest                    # one run: the device with the most photos
    python bench/real_devices.py --set train.patch=128 --set train.archs=[smallcnn_learned]  # another configuration
    python bench/real_devices.py --refs largest --background-half A   # background cameras (below)
    python bench/real_devices.py --refs largest --reference-photos DJI-FC6360=10   # a smaller reference (below)

`--twins LABEL` deals LABEL's reference photos, alternately in the order they were taken, into two catalog cameras
`LABEL-a` and `LABEL-b`: firmware twins as the pixels see them (one sensor, one firmware, the same sessions), as
the Nikon D70 and D70s are. The model's other devices are then right where the closest camera is either twin, and
the open-set rule must not read the twins as each other's "other model" (camid.inference.openset.camera_thresholds
leaves a camera's twins out of its far end; Ensemble.twin_group_margins judges a photo against the twin group).

    python bench/real_devices.py --refs largest --twins DJI-FC6360   # two twins of one model (above)

`--reference-photos LABEL=N` keeps only the first N photos of that model's reference device, in the order they were
taken (EXIF DateTimeOriginal, else the file name: camid.data.splitting.in_capture_order), as an analyst who shot N
reference photos in one session would have; the device's other photos are not questioned (same device).

Background cameras (`camid catalog from-folder --background`): `--background DIR` adds a folder of other models'
photos to the reference folder as one more class that is never an answer; `--background-half A` (or B) takes
half of the `--unknown` photos for it, dealt by a hash of the file name, and questions the other half, so that the
models questioned as unknown are never the background's; `--background-count N` trains on only N of them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from camid.core.imageio import list_images
from camid.tools.profile import set_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import make_copy, stage_env  # noqa: E402  (bench/scale.py: the private copy and its environment)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples"


def devices_of(folder: Path) -> dict[str, dict[str, list[Path]]]:
    """{label: {device: [photos]}} of a `<label>/<device>/<photos>` folder."""
    out = {}
    for label in sorted(p for p in folder.iterdir() if p.is_dir()):
        out[label.name] = {d.name: list_images([d]) for d in sorted(p for p in label.iterdir() if p.is_dir())}
    return out


def reference_choices(devices: dict, refs: str) -> list[dict[str, str]]:
    """Which device is each model's reference, per run: every combination, or the device with most photos."""
    if refs == "largest":
        return [{label: max(devs, key=lambda d: len(devs[d])) for label, devs in devices.items()}]
    if refs == "all":
        labels = list(devices)
        return [dict(zip(labels, combo)) for combo in itertools.product(*(sorted(devices[l]) for l in labels))]
    chosen = dict(item.split("=", 1) for item in refs.split(","))
    return [chosen]


def first_shots(photos: list[Path], count: int | None = None) -> list[Path]:
    """The first `count` photos (all: None) in the order they were taken (camid.data.splitting.in_capture_order)."""
    from camid.data.splitting import in_capture_order
    from camid.forensics.inspect import inspect_file

    table = pd.DataFrame({"path": [str(p) for p in photos],
                          "taken": [inspect_file(str(p), hashes=False)["datetime"] or "" for p in photos]})
    return [Path(p) for p in in_capture_order(table)["path"].iloc[:count]]


def twin_model(path: Path, dest: Path) -> Path:
    """A copy of the JPEG `path` at `dest` whose EXIF Model names a twin, its last letter made "S" (or "T"), in the
    header bytes only (bench/real_twins.py's `renamed_copy`), as the D70s's EXIF differs from the D70's:
    `camid catalog from-folder` keeps two models apart by their EXIF Model."""
    from PIL import Image

    from real_twins import renamed_copy

    with Image.open(path) as image:
        model = str(image.getexif().get(0x0110, "")).strip("\x00 ")
    if not model:
        raise SystemExit(f"--twins: {path} has no EXIF Model to make a twin's of")
    return renamed_copy(path, dest, model, model[:-1] + ("S" if model[-1] != "S" else "T"))


def twin_split(chosen: dict[str, list[Path]], twins: list[str],
               work: Path) -> tuple[dict[str, list[Path]], dict[str, list[str]]]:
    """The reference photos with each of `twins`' dealt alternately, in the order taken, into two catalog cameras
    LABEL-a and LABEL-b, the second's photos copied under `work` with a twin's EXIF Model (`twin_model`); and each
    model's catalog cameras ({label: [label]}, {twin: [twin-a, twin-b]})."""
    out, groups = {}, {}
    for label, photos in chosen.items():
        if label not in twins:
            out[label], groups[label] = photos, [label]
            continue
        ordered = first_shots(photos)
        groups[label] = [f"{label}-a", f"{label}-b"]
        out[groups[label][0]] = ordered[0::2]
        out[groups[label][1]] = [twin_model(p, work / "twin-photos" / p.parent.name / p.name) for p in ordered[1::2]]
    return out, groups


def link_tree(dest: Path, photos: dict[str, list[Path]]) -> Path:
    for label, paths in photos.items():
        for path in paths:
            target = dest / label / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    return dest


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def predict(copy: Path, env: dict, paths: list[Path], out: Path, pixels_only: bool) -> pd.DataFrame:
    cmd = ["camid", "predict", *map(str, paths), "--model", "models/ensemble", "--full-image", "--out", str(out)]
    run(cmd + (["--pixels-only"] if pixels_only else []), copy, env)
    return pd.read_csv(out.with_suffix(".probs.csv"))


def unknown_by(answers: pd.DataFrame) -> dict:
    """How many answers each ground made `unknown` (the answer's `unknown_by`: pixels, tables, or both)."""
    grounds = answers["unknown_by"].fillna("") if "unknown_by" in answers else pd.Series([], dtype=str)
    return grounds[grounds != ""].value_counts().to_dict()


def by_size(answers: pd.DataFrame) -> dict:
    """The other devices' photos whose size is one of the closest camera's reference sizes (the answer's
    `size_seen`), and the share accepted among them and among the rest: a size mode the reference never shot."""
    if "size_seen" not in answers:
        return {}
    seen = answers["size_seen"].astype(str) == "True"
    accepted = answers["camera"] != "unknown"
    return {"other_size_seen": int(seen.sum()),
            "other_accepted_size_seen": float(accepted[seen].mean()) if seen.any() else None,
            "other_accepted_size_unseen": float(accepted[~seen].mean()) if (~seen).any() else None}


BACKGROUND = "other-cameras"  # the background folder's label in the reference folder


def halves(photos: list[Path]) -> dict[str, list[Path]]:
    """Photos dealt into halves "A" and "B" by a hash of the file name (the same deal on every machine)."""
    out = {"A": [], "B": []}
    for path in photos:
        out["A" if zlib.crc32(path.name.encode()) % 2 == 0 else "B"].append(path)
    return out


def one_run(base: Path, devices: dict, refs: dict[str, str], unknown: Path | None, overrides: dict,
            catalog_args: list[str], background: list[Path] = (), limits: dict[str, int] | None = None,
            twins: list[str] = ()) -> dict:
    limits = limits or {}
    work = base / "_".join(f"{label}-{device[:8]}" + (f"-{limits[label]}" if label in limits else "")
                           + ("-twins" if label in twins else "") for label, device in refs.items())
    work.mkdir(parents=True)
    chosen = {label: devices[label][device] for label, device in refs.items()}
    chosen = {label: first_shots(photos, limits[label]) if label in limits else photos
              for label, photos in chosen.items()}
    chosen, groups = twin_split(chosen, list(twins), work)
    reference = link_tree(work / "reference", chosen)
    for path in background:  # one folder per photo: each is its own device (of another model)
        target = reference / BACKGROUND / re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem) / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path.resolve())
    if background:
        catalog_args = [*catalog_args, "--background", BACKGROUND]
    others = {label: [p for device, photos in devs.items() if device != refs[label] for p in photos]
              for label, devs in devices.items()}
    other_dir = link_tree(work / "others", others)
    copy = make_copy(work / "project")
    env = stage_env(copy)
    if overrides:  # before the catalog too, so that its training plan is made for the arch and patch overridden
        set_params(overrides, str(copy / "params.yaml"))
    catalog = run(["camid", "catalog", "from-folder", str(reference), "--name", "bench_devices", "--params",
                   "params.yaml", "--workers", str(os.cpu_count() or 1), *catalog_args], copy, env)
    print(catalog.stdout, flush=True)
    expected = re.search(r"total ([0-9.]+) min", catalog.stdout)
    if overrides:
        set_params(overrides, str(copy / "params.yaml"))
    start = time.monotonic()
    run(["dvc", "repro"], copy, env)
    repro_s = time.monotonic() - start
    row = {"references": ", ".join(f"{label} {device[:8]}" + (f" (first {limits[label]})" if label in limits else "")
                                   for label, device in refs.items()), "dvc_repro_s": repro_s,
           "planned_s": float(expected.group(1)) * 60 if expected else None}
    answers = predict(copy, env, [other_dir], work / "others.csv", pixels_only=False)

    def right(table: pd.DataFrame) -> float:  # the closest camera is one of the photo's model's catalog cameras
        return float(np.mean([closest in groups.get(Path(path).parent.parent.name, ())
                              for path, closest in zip(table["path"], table["closest_camera"])]))

    row.update(other_n=len(answers), other_closest_right=right(answers),
               other_accepted=float((answers["camera"] != "unknown").mean()),
               other_consistent_false=int((answers["consistent"].astype(str) == "False").sum()),
               other_tables=answers["tables_evidence"].value_counts().to_dict(),
               other_unknown_by=unknown_by(answers), **by_size(answers))
    pixels = predict(copy, env, [other_dir], work / "others_pixels.csv", pixels_only=True)
    row.update(other_closest_right_pixels=right(pixels),
               other_accepted_pixels=float((pixels["camera"] != "unknown").mean()))
    if unknown is not None:
        served = predict(copy, env, [unknown], work / "unknown.csv", pixels_only=False)
        served = served[served["error"].fillna("") == ""] if "error" in served else served
        pixels = predict(copy, env, [unknown], work / "unknown_pixels.csv", pixels_only=True)
        pixels = pixels[pixels["error"].fillna("") == ""] if "error" in pixels else pixels
        row.update(unknown_n=len(served), unknown_rejected=float((served["camera"] == "unknown").mean()),
                   unknown_rejected_pixels=float((pixels["camera"] == "unknown").mean()),
                   unknown_tables=served["tables_evidence"].value_counts().to_dict(), unknown_by=unknown_by(served),
                   unknown_consistent=served["consistent"].astype(str).value_counts().to_dict())
    row.update(separation(copy / "models" / "ensemble", other_dir, unknown, groups))
    row["twins"] = json.loads((copy / "models" / "ensemble" / "ensemble.json").read_text()).get(
        "metadata", {}).get("twins", [])
    evaluate = json.loads((copy / "metrics" / "evaluate.json").read_text())
    row["open_set_reference"] = (evaluate.get("open_set_rule") or {}).get("reference")
    # Which epoch's weights each backbone kept, of how many trained, and the best-scoring one (train.checkpoint).
    for run_file in sorted((copy / "models" / "train").glob("*/run.json")):
        kept = json.loads(run_file.read_text()).get("checkpoint") or {}
        row[f"kept_{run_file.parent.name}"] = (f"epoch {kept.get('kept_epoch')} of {kept.get('epochs_trained')} "
                                               f"({kept.get('rule')}; best {kept.get('best_epoch')}, noise "
                                               f"{kept.get('noise', 0):.3f} on {kept.get('val_photos')} photos)")
    return row


REACHES = (0.5, 0.6, 0.7, 0.8)  # single-device rule positions to report besides the bundle's own


def separation(bundle: Path, others: Path, unknown: Path | None, groups: dict[str, list[str]] | None = None) -> dict:
    """Per catalog camera with photos of other devices: `sep_<label>`, the AUROC of those photos' kNN score against
    that camera's training photos over the other models' photos' score against the same photos, and `far_<label>`,
    the other devices' median cosine distance over the reference device's validation photos' (module docstring).
    Then, for the single-device rule at each of REACHES (evaluate.single_device_reach): the share of the other
    devices' photos it would accept against their closest camera and its twins (`accept_<reach>`,
    Ensemble.twin_group_margins) and the share of other models' photos it would reject (`reject_<reach>`), from
    the pixels alone. `groups`: each model folder's catalog cameras (`twin_split`; by default the folder's own)."""
    from camid.inference.answers import score_photos
    from camid.inference.ensemble import Ensemble
    from camid.inference.openset import auroc, camera_knn_score, nearest_camera, reach_threshold

    ensemble = Ensemble.load(bundle)
    if ensemble.bank is None or "photo_labels" not in ensemble.bank:
        return {}
    bank, bank_labels = ensemble.bank["photo"], ensemble.bank["photo_labels"]

    def scores(paths: list[Path]):
        scored = score_photos(ensemble, [str(p) for p in paths])
        return ([Path(p) for p, ok in zip(paths, scored.ok) if ok], scored.features[scored.ok],
                scored.pixels[scored.ok].argmax(axis=1))

    other_paths, other_features, other_closest = scores(list_images([others]))
    unknown_features, unknown_closest = (scores(list_images([unknown]))[1:] if unknown is not None
                                         else (np.zeros((0, bank.shape[1])), np.zeros(0, dtype=int)))
    single = ensemble.open_set.get("single_device") or {}
    models = [p.parent.parent.name for p in other_paths]
    catalog_of = {model: (groups or {}).get(model, [model]) for model in set(models)}
    # The closest camera by the features instead of the network's probabilities: the camera whose nearest training
    # photo is nearest (bench/device_gap.py prints the same on the zoo).
    nearest = nearest_camera(other_features, bank, bank_labels, len(ensemble.labels))
    out = {"nearest_right": round(float(np.mean([ensemble.labels[n] in catalog_of[m]
                                                 for n, m in zip(nearest, models)])), 3)}
    for camera, label in enumerate(ensemble.labels):
        rows = np.array([label in catalog_of[m] for m in models], dtype=bool)
        if not rows.any():
            continue
        near = lambda features: camera_knn_score(features, np.full(len(features), camera), bank, bank_labels)  # noqa: E731
        own = near(other_features[rows])
        if len(unknown_features):
            out[f"sep_{label}"] = round(auroc(own, near(unknown_features)), 3)
        if label in single:
            out[f"far_{label}"] = round(float(np.median(1 - own)) / max(1 - single[label]["own_median"], 1e-6), 1)
    fits = [single.get(label) for label in ensemble.labels]
    if not all(fits) or any(fit["other_cameras_median"] is None for fit in fits):
        return out
    for reach in REACHES:
        cut = {label: reach_threshold(fit, reach) for label, fit in zip(ensemble.labels, fits)}
        margin = ensemble.twin_group_margins(other_features, other_closest, cut, {})[0]
        out[f"accept_{reach}"] = round(float(np.mean(margin >= 0)), 3)
        if len(unknown_features):
            theirs = ensemble.twin_group_margins(unknown_features, unknown_closest, cut, {})[0]
            out[f"reject_{reach}"] = round(float(np.mean(theirs < 0)), 3)
    return out


def parse_overrides(items: list[str]) -> dict:
    from ruamel.yaml import YAML

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = YAML(typ="safe").load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=Path, default=SAMPLES / "real-devices",
                        help="a <label>/<device>/<photos> folder of real photos, two devices or more per model")
    parser.add_argument("--unknown", type=Path, default=SAMPLES / "real-jpeg",
                        help="a folder of photos of other camera models ('' to skip)")
    parser.add_argument("--refs", default="all", help="all | largest | LABEL=DEVICE,...: the reference devices")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override after the catalog is written (repeatable)")
    parser.add_argument("--catalog-args", default="", help="more arguments for `camid catalog from-folder`, e.g. "
                        "'--minutes 8' or '--keep-train' (the train block as params.yaml has it)")
    parser.add_argument("--background", type=Path,
                        help="a folder of photos of other camera models, trained as background cameras "
                             "(`camid catalog from-folder --background`)")
    parser.add_argument("--background-half", choices=("A", "B"),
                        help="train on this half of the --unknown photos (dealt by a hash of the file name) as "
                             "background cameras and question the other half as unknown models")
    parser.add_argument("--background-count", type=int, default=0, metavar="N",
                        help="train on only N of the background photos (the first N by a hash of the file name): "
                             "how many other models the background needs")
    parser.add_argument("--reference-photos", default="", metavar="LABEL=N,...",
                        help="keep only the first N photos (in capture order) of LABEL's reference device")
    parser.add_argument("--twins", action="append", default=[], metavar="LABEL",
                        help="deal LABEL's reference photos into two catalog cameras LABEL-a and LABEL-b: firmware "
                             "twins (repeatable)")
    parser.add_argument("--keep", type=Path, help="keep the runs' folders here")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON lines")
    args = parser.parse_args(argv)
    if not args.devices.is_dir():
        raise SystemExit(f"{args.devices} is not a folder: give --devices a <label>/<device>/<photos> folder")
    devices = devices_of(args.devices)
    unknown = args.unknown if str(args.unknown) and args.unknown.is_dir() else None
    overrides = parse_overrides(args.set)
    try:
        pairs = (item.split("=", 1) for item in args.reference_photos.split(",") if item)
        limits = {label: int(count) for label, count in pairs}
    except ValueError:
        raise SystemExit(f"--reference-photos takes LABEL=N,...: got {args.reference_photos!r}") from None
    strangers = sorted((set(limits) | set(args.twins)) - set(devices))
    if strangers:
        raise SystemExit(f"--reference-photos or --twins names no model of {args.devices}: {', '.join(strangers)}")
    base = args.keep or Path(tempfile.mkdtemp(prefix="camid-real-devices-"))
    base.mkdir(parents=True, exist_ok=True)
    background = list_images([args.background]) if args.background else []
    if args.background_half:
        if unknown is None:
            raise SystemExit("--background-half deals the --unknown photos: give --unknown a folder")
        dealt = halves(list_images([unknown]))
        background = dealt[args.background_half]
        unknown = link_tree(base / "unknown-half", {"": dealt["B" if args.background_half == "A" else "A"]})
        print(f"background: {len(background)} photos of half {args.background_half}; questioned as unknown "
              f"models: the other half, {len(list_images([unknown]))} photos", flush=True)
    if args.background_count:
        background = sorted(background, key=lambda p: zlib.crc32(p.name.encode()))[:args.background_count]
        print(f"background: the first {len(background)} photos by the hash of the file name", flush=True)
    rows = []
    for refs in reference_choices(devices, args.refs):
        print(f"references: {refs}", flush=True)
        row = one_run(base, devices, refs, unknown, overrides, args.catalog_args.split(), background, limits,
                      args.twins)
        row["background"] = f"{len(background)} photos" + (f" (half {args.background_half})"
                                                            if args.background_half else "") if background else "none"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**row, "overrides": overrides}) + "\n")
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.drop(columns=[c for c in table if c.endswith("_tables")]).to_string(index=False))
    print(f"overrides: {overrides or 'none (defaults)'}; folders in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
