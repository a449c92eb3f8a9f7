"""One reference device per camera model: how far the photos of a model's other devices fall below the reference
device's own held-out photos on the open-set score, on the virtual zoo.

The usual analyst has one camera per model. Validation is then a photo split of that one device, and a threshold
that accepts 95% of its held-out photos rejects many photos of the same model's other devices. This bench builds
that situation from the zoo: per camera model, `--train` photos of the first device train the model and its other
photos are the validation (same device, held out); the photos of every other device are the questioned ones.
The real stage functions run (prepare -> train smallcnn -> evaluate, which fits the kNN threshold on validation:
with no unseen devices in validation, camid's single-device rule, camid.inference.openset.camera_thresholds: each
camera's own threshold); then both groups of photos are answered as served (`camid predict --full-image`, with the
JPEG tables and from the pixels alone), and the bench prints the other devices' closest-camera accuracy, the
share the bundle's rule accepts and how many of these genuine photos read `consistent: false` (by EXIF camera and
the pixels' closest camera, twins marked); then, on the bank-wide kNN score, the share of the other devices' photos that
other thresholds would accept: the plain quantile (95% of the same device's held-out photos) and, for scale, the
median minus 2 to 8 robust standard deviations of the same-device scores (1.4826 x their median absolute
deviation).

    python bench/device_gap.py                                   # 16 photos per device, 10 train, make-run budget
    python bench/device_gap.py --images-per-device 12 --train 8 --epochs 6 --steps 40       # quicker
    python bench/device_gap.py --cameras Aster-A1,Aster-A1s,Dune-D5 --background Boreal-B7,Corvid-C3,Ember-E2,Fjord-F9

`--background` trains the named models' reference devices as one background camera (`background: true`, never an
answer); the models in neither list are the unknown models, and the bench prints, per model, the share answered
`unknown` and the share the pixels put with the background.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from camid.config import Camera  # noqa: E402
from camid.tiny import inside  # noqa: E402

BACKGROUND = "other-cameras"  # --background's camera label


def robust_sigma(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of normal scores, robust to outliers."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def log_weights(ensemble, questioned, questioned_labels, held_out, held_out_labels):
    """Where photos lie between the two medians of the single-device rule (openset.camera_thresholds), on its log
    scale of cosine distance to a camera's training photos: (the other devices' photos, to their own camera; the
    held-out photos of every other camera, to each camera), from their PhotoScores (`questioned`, `held_out`) and
    true labels. None without the rule's figures."""
    from camid.inference.openset import MIN_DISTANCE, camera_knn_score

    single = ensemble.open_set.get("single_device") or {}
    if ensemble.bank is None or "photo_labels" not in ensemble.bank or not single:
        return None
    bank, bank_labels = ensemble.bank["photo"], ensemble.bank["photo_labels"]

    def position(features, camera: int) -> np.ndarray:
        fit = single[ensemble.labels[camera]]
        low, high = (np.log(max(1 - fit[key], MIN_DISTANCE)) for key in ("own_median", "other_cameras_median"))
        distance = 1 - camera_knn_score(features, np.full(len(features), camera), bank, bank_labels)
        return (np.log(np.maximum(distance, MIN_DISTANCE)) - low) / (high - low)

    def features(scored, labels):
        return scored.features[scored.ok], np.asarray(labels)[scored.ok]

    devices, device_labels = features(questioned, questioned_labels)
    held, held_labels = features(held_out, held_out_labels)
    on_devices, on_cameras = [], []
    for camera, label in enumerate(ensemble.labels):
        if label not in single:
            continue
        on_devices.append(position(devices[device_labels == label], camera))
        on_cameras.append(position(held[held_labels != label], camera))
    return np.concatenate(on_devices), np.concatenate(on_cameras)


ANCHORS = ("pooled", "per-camera median", "without twins", "without the nearest", "farthest")


def anchor_thresholds(ensemble, reference_scores, reference_labels, reach: float) -> dict[str, dict[str, float]]:
    """For each way of placing the single-device rule's far end (ANCHORS), each one-reference camera's threshold at
    `reach` (openset.log_midpoint, capped by its quantile as openset.reach_threshold caps it): "pooled", the
    median over every other camera's held-out photos (the rule as built); "per-camera median", the median of
    each other camera's own median; "without twins", pooled without the twins validation found
    (`metadata.twins`); "without the nearest", pooled without the other camera whose photos lie nearest;
    "farthest", the farthest other camera's median."""
    from camid.inference.metadata import twin_map
    from camid.inference.openset import camera_knn_score, log_midpoint

    single = ensemble.open_set.get("single_device") or {}
    bank, bank_labels = ensemble.bank["photo"], ensemble.bank["photo_labels"]
    ok = reference_scores.ok
    features, labels = reference_scores.features[ok], np.asarray(reference_labels)[ok]
    twins = twin_map(ensemble.metadata)
    out = {name: {} for name in ANCHORS}
    for camera, label in enumerate(ensemble.labels):
        if label not in single:
            continue
        fit = single[label]
        others = [other for other in ensemble.labels if other != label and (labels == other).any()]
        scores = {other: camera_knn_score(features[labels == other], np.full(int((labels == other).sum()), camera),
                                          bank, bank_labels) for other in others}
        medians = {other: float(np.median(values)) for other, values in scores.items()}
        nearest = max(medians, key=medians.get)

        def pooled(chosen):
            chosen = chosen or others
            return float(np.median(np.concatenate([scores[o] for o in chosen])))

        far = {"pooled": pooled(others), "per-camera median": float(np.median(list(medians.values()))),
               "without twins": pooled([o for o in others if o not in twins.get(label, ())]),
               "without the nearest": pooled([o for o in others if o != nearest] if len(others) > 1 else others),
               "farthest": min(medians.values())}
        for name, value in far.items():
            out[name][label] = min(fit["quantile"], log_midpoint([fit["own_median"]], [value], reach))
    return out


def anchors(ensemble, scored, questioned_labels, reference_labels) -> None:
    """Print, for each ANCHORS choice and reach, the share of the other devices accepted and of the unknown
    models' photos answered `unknown`, as served (with the tables) and from the pixels alone."""
    from camid.inference.answers import answers
    from camid.inference.options import DEFAULTS

    rule = dict(ensemble.open_set)
    print("\nwhere the single-device rule's far end sits (other devices accepted / unknown models answered unknown; "
          "served with the tables | pixels only):")
    try:
        for reach in (0.5, 0.7):
            strict = min(reach, ensemble.open_set.get("unseen_tables_reach", reach))
            loose, tight = (anchor_thresholds(ensemble, scored["reference"], reference_labels, r)
                            for r in (reach, strict))
            for name in ANCHORS:
                ensemble.open_set = {**rule, "knn_threshold_camera": loose[name],
                                     **({"knn_threshold_camera_unseen_tables": tight[name]}
                                        if "knn_threshold_camera_unseen_tables" in rule else {})}
                figures = []
                for tables in (True, False):
                    options = {**DEFAULTS, "jpeg_tables": tables}
                    mine = answers(ensemble, scored["questioned"], options)
                    theirs = answers(ensemble, scored["unknown models"], options)
                    figures.append(f"{np.mean(~mine.unknown.to_numpy(bool)):.3f} / "
                                   f"{np.mean(theirs.unknown.to_numpy(bool)):.3f}")
                print(f"  reach {reach}, {name:22s}: {' | '.join(figures)}   thresholds "
                      f"{ {k: round(v, 4) for k, v in loose[name].items()} }")
    finally:
        ensemble.open_set = rule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-device", type=int, default=16)
    parser.add_argument("--train", type=int, default=10, help="photos of the reference device that train")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--arch", default="smallcnn", help="the backbone (a smallcnn front end: smallcnn, "
                        "smallcnn_learned, smallcnn_rgb; any registry arch runs)")
    parser.add_argument("--patch", type=int, help="patch side (default: params.yaml's train.patch)")
    parser.add_argument("--batch-size", type=int, help="default: params.yaml's train.batch_size")
    parser.add_argument("--cameras", help="comma-separated zoo labels: the catalog is these cameras alone, and every "
                        "photo of the other zoo cameras is questioned as an unknown model (e.g. a catalog of firmware "
                        "twins and one other camera: Aster-A1,Aster-A1s,Dune-D5)")
    parser.add_argument("--background", help="comma-separated zoo labels whose photos train one background camera "
                        f"({BACKGROUND!r}, never an answer: camid.config.Camera): the reference device's photos of each, "
                        "as the catalog's; the models neither in --cameras nor here are the unknown models")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (photos, split, bundle)")
    parser.add_argument("--save", type=Path, help="write the photos' pixel features, labels and closest cameras "
                        "(and the bank) to this .npz, for measuring other open-set scores on the same bundle")
    args = parser.parse_args(argv)
    if not 0 < args.train < args.images_per_device:
        parser.error("--train must leave held-out photos of the reference device")

    from camid.config import load_params
    from camid.data.cache import prepare
    from camid.data.synth import synthesize
    from camid.inference.answers import answers, score_photos
    from camid.inference.options import DEFAULTS, blend_for
    from camid.inference.ensemble import Ensemble
    from camid.inference.openset import fit_threshold, knn_score, nearest_camera
    from camid.stages.evaluate import evaluate
    from camid.stages.train import train

    params = load_params(ROOT / "params.yaml")
    zoo = catalog = params.catalog
    background = [label.strip() for label in (args.background or "").split(",") if label.strip()]
    if args.cameras:
        chosen = [label.strip() for label in args.cameras.split(",") if label.strip()]
        for label in chosen + background:
            zoo.index(label)  # a clear message for a label the zoo lacks
        if set(chosen) & set(background):
            parser.error("a camera cannot be both in --cameras and in --background")
        catalog = dataclasses.replace(zoo, cameras=tuple(c for c in zoo.cameras if c.label in chosen))
    elif background:
        parser.error("--background needs --cameras: the catalog without the background's models")
    if background:  # one background camera made of the named models' photos
        others = [zoo.get(label) for label in background]
        catalog = dataclasses.replace(catalog, cameras=catalog.cameras + (Camera(
            BACKGROUND, "", tuple(m for c in others for m in c.models), tuple(s for c in others for s in c.sizes),
            any(c.rot90 for c in others), background=True),))
    started = time.perf_counter()
    if args.keep:
        if args.keep.exists() and any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep} is not empty: name a new folder")
        args.keep.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(args.keep)) if args.keep else
          tempfile.TemporaryDirectory(prefix="camid-device-gap-")) as tmp:
        root = Path(tmp)
        with inside(root, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", MLFLOW_EXPERIMENT_NAME="camid-bench",
                    CAMID_CHECKPOINTS=str(root / "checkpoints")):
            synth = dataclasses.replace(params.synth, images_per_device=args.images_per_device, bad_fraction=0.0)
            manifest = synthesize(root / "raw", zoo, synth, progress=False)
            manifest["path"] = [str(root / "raw" / f) for f in manifest.file]
            manifest["model"] = manifest.label
            manifest.loc[manifest.label.isin(background), "label"] = BACKGROUND
            unknown_models = manifest[~manifest.label.isin(catalog.labels)]
            manifest = manifest[manifest.label.isin(catalog.labels)]
            parts = {"train": [], "val": [], "test": []}
            for label, photos in manifest.groupby("label", sort=True):
                if label == BACKGROUND:  # each background model's first device, as a catalog camera's reference
                    for _, mine in photos.groupby("model", sort=True):
                        reference = mine[mine.device == sorted(mine.device.unique())[0]].sort_values("file")
                        parts["train"].append(reference.iloc[:args.train])
                        parts["val"].append(reference.iloc[args.train:])
                    continue
                devices = sorted(photos.device.unique())
                reference = photos[photos.device == devices[0]].sort_values("file")
                parts["train"].append(reference.iloc[:args.train])
                parts["val"].append(reference.iloc[args.train:])
                parts["test"].append(photos[photos.device != devices[0]])
            (root / "split").mkdir()
            for name, frames in parts.items():
                pd.concat(frames)[["path", "label", "device"]].to_csv(root / "split" / f"{name}.csv", index=False)
            patch = args.patch or params.train.patch
            prepare(root / "split", root / "cache", catalog, patch=patch)
            settings = dataclasses.replace(params.train, archs=(args.arch,), epochs=args.epochs,
                                           steps_per_epoch=args.steps, patch=patch,
                                           batch_size=args.batch_size or params.train.batch_size)
            train(args.arch, root / "cache", root / "model", settings, catalog.labels, catalog)
            evaluate([root / "model"], root / "cache", root / "bundle", params.evaluate,
                     metrics_file=root / "evaluate.json", plots_file=root / "confusion.csv", catalog=catalog)
            ensemble = Ensemble.load(root / "bundle")
            if ensemble.bank is None:
                raise SystemExit("the bundle has no feature bank: nothing to measure")

            def knn(paths) -> np.ndarray:
                scores = score_photos(ensemble, [str(p) for p in paths], tta=False)
                return knn_score(scores.features[scores.ok], ensemble.bank["photo"])

            same = knn(pd.concat(parts["val"]).path)
            other = knn(pd.concat(parts["test"]).path)
            # The answers as served (camid predict --full-image): the bundle's own rule (one reference device per
            # model: each camera's threshold, openset.camera_thresholds), with the tables and from the pixels alone.
            # Each set of photos is scored once, as answer_photos scores it under the served defaults; both answers
            # and the log-scale positions come from those scores.
            questioned, reference = pd.concat(parts["test"]), pd.concat(parts["val"])
            scored = {name: score_photos(ensemble, [str(p) for p in frame.path], patches=DEFAULTS["patches"],
                                         tta=DEFAULTS["tta"], blend=blend_for(DEFAULTS["blend"]))
                      for name, frame in (("questioned", questioned), ("reference", reference),
                                          ("unknown models", unknown_models)) if len(frame)}
            served = {name: answers(ensemble, scored["questioned"], {**DEFAULTS, "jpeg_tables": tables})
                      for name, tables in (("served", True), ("pixels only", False))}
            held_out = answers(ensemble, scored["reference"], {**DEFAULTS, "jpeg_tables": False})
            held_out = held_out[(reference.label != BACKGROUND).to_numpy()]  # the catalog cameras' own
            weights = log_weights(ensemble, scored["questioned"], questioned.label, scored["reference"],
                                  reference.label)
            found = scored["questioned"]
            nearest_right = {k: float(np.mean(np.asarray(ensemble.labels)[nearest_camera(
                found.features[found.ok], ensemble.bank["photo"], ensemble.bank["photo_labels"], len(ensemble.labels),
                k)] == questioned.label.to_numpy()[found.ok])) for k in (1, 5)}

    if args.save:
        pixels_only = {"questioned": served["pixels only"]}
        if "unknown models" in scored:
            pixels_only["unknown models"] = answers(ensemble, scored["unknown models"], {**DEFAULTS, "jpeg_tables": False})
        frames = {"questioned": questioned, "reference": reference, "unknown models": unknown_models}
        arrays = {"bank": ensemble.bank["photo"], "bank_labels": ensemble.bank["photo_labels"],
                  "labels": np.asarray(ensemble.labels)}
        for name, found in scored.items():
            key = name.replace(" ", "_")
            arrays[key + "_features"] = found.features[found.ok]
            arrays[key + "_labels"] = frames[name].label.to_numpy().astype(str)[found.ok]
            if name in pixels_only:
                arrays[key + "_closest"] = pixels_only[name].closest_camera.to_numpy().astype(str)[found.ok]
        np.savez_compressed(args.save, **arrays)
    if "unknown models" in scored and not background:
        anchors(ensemble, scored, questioned.label.to_numpy(), reference.label.to_numpy())
    threshold = fit_threshold(same, 0.95)
    served_cut = ensemble.open_set["knn_threshold"]["photo"]
    sigma = robust_sigma(same)
    z = (np.median(same) - np.quantile(other, 0.05)) / sigma
    print(f"\ncamid device-gap bench: {len(catalog.labels)} camera models, one reference device each "
          f"({args.train} training photos, {len(same)} held-out photos of the same devices), {len(other)} photos of "
          f"{synth.devices_per_model - 1} other devices per model; {args.arch} {args.epochs}x{args.steps} steps of "
          f"{settings.batch_size} patches of {patch} px; "
          f"{time.perf_counter() - started:.0f} s")
    print(f"kNN score (cosine to the 5th nearest training photo): same device median {np.median(same):.4f}, "
          f"robust sigma {sigma:.4f}; other devices median {np.median(other):.4f}, 5th percentile "
          f"{np.quantile(other, 0.05):.4f}; the bundle's rule: {ensemble.open_set.get('reference')} "
          f"{ {k: round(v['threshold'], 4) for k, v in ensemble.open_set.get('single_device', {}).items()} }")
    truth = questioned["label"].to_numpy()
    for name, table in served.items():
        print(f"answers as served, {name}: other devices' closest camera right "
              f"{np.mean(table.closest_camera.to_numpy() == truth):.3f}, accepted (the bundle's rule, "
              f"{ensemble.open_set.get('reference')}) {np.mean(~table.unknown.to_numpy(bool)):.3f}")
    twins = {frozenset(t["cameras"]) for t in ensemble.metadata.get("twins", [])}
    for name, table in served.items():
        alarms = table[table.consistent.astype(str) == "False"]
        pairs = alarms.groupby(["exif_camera", "closest_camera"]).size().sort_values(ascending=False)
        print(f"genuine photos of the other devices that read consistent: false (EXIF against the pixels), {name}: "
              f"{len(alarms)} of {int(table.consistent.notna().sum())}; EXIF camera -> pixels' closest: "
              + ", ".join(f"{a} -> {b} {n}{' (twins)' if frozenset((a, b)) in twins else ''}"
                          for (a, b), n in pairs.items()))
    if "unknown models" in scored:
        found = scored["unknown models"]
        for name, tables in (("served", True), ("pixels only", False)):
            theirs = answers(ensemble, found, {**DEFAULTS, "jpeg_tables": tables})
            print(f"unknown models ({', '.join(sorted(unknown_models.label.unique()))}; {int(found.ok.sum())} photos) "
                  f"answered unknown, {name}: {np.mean(theirs.unknown.to_numpy(bool)[found.ok]):.3f}"
                  + (f"; the pixels put them with the background cameras: "
                     f"{np.mean(ensemble.in_background(found.pixels)[found.ok]):.3f}" if background else "")
                  + "; by model: " + ", ".join(
                      f"{model} {np.mean(theirs.unknown.to_numpy(bool)[found.ok & (unknown_models.label == model).to_numpy()]):.2f}"
                      for model in sorted(unknown_models.label.unique())))
    print(f"the twins validation found: {[(t['cameras'], round(t['confused'], 2)) for t in ensemble.metadata.get('twins', [])]}")
    for k, right in nearest_right.items():
        print(f"the closest camera by the features instead (openset.nearest_camera: the camera whose {k}-th nearest "
              f"training photo is nearest), pixels only: other devices right {right:.3f}")
    print(f"the reference devices' own held-out photos accepted (pixels only): "
          f"{np.mean(~held_out.unknown.to_numpy(bool)):.3f}")
    print(f"plain threshold (accepts 95% of the same device's held-out photos) {threshold:.4f}: other devices "
          f"accepted {np.mean(other >= threshold):.3f}")
    print(f"the bank-wide quantile {served_cut:.4f}: other devices accepted {np.mean(other >= served_cut):.3f}, same "
          f"device {np.mean(same >= served_cut):.3f}")
    print(f"(the other devices' 5th percentile lies {z:.2f} robust sigmas below the same-device median)")
    for candidate in (2.0, 4.0, 8.0):
        cut = min(threshold, np.median(same) - candidate * sigma)
        print(f"  median - {candidate:4.1f} sigma = {cut:.4f}: other devices accepted {np.mean(other >= cut):.3f}")
    if weights is not None:
        devices, cameras = weights
        print("where the other devices lie on the single-device rule's log scale of distance to their camera's training "
              "photos (0: the reference device's held-out median, 1: the other catalog cameras' median): "
              f"median {np.median(devices):.2f}, quartiles {np.quantile(devices, 0.25):.2f}-"
              f"{np.quantile(devices, 0.75):.2f}; the other cameras' own photos: 5th percentile "
              f"{np.quantile(cameras, 0.05):.2f}")
        for w in (0.5, 0.6, 0.7, 0.8):
            print(f"  a cut at {w:.1f} of the way: other devices accepted {np.mean(devices <= w):.3f}, other catalog "
                  f"cameras' photos accepted {np.mean(cameras <= w):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
