"""Open-set rejection on the virtual zoo: two camera models held out of training, as a real analyst's unknown.

The zoo's cameras are split in two: `--hold-out` models (default: Corvid-C3 and Gale-G4) are never seen; the rest go
through the real stage functions (split -> prepare -> train smallcnn -> evaluate, which fits the calibration
temperatures and the open-set threshold on validation). Then the whole photos of the known models' test devices
(never seen either, but of catalog cameras) and every photo of the held-out models are scored as the served
model scores them (auto patches, calibrated), twice: from the pixels alone, and with the model's own setting (the
JPEG-table evidence where some training photo had the file's signature). For each the bench prints the AUROC of
the pixel ground's open-set score (the kNN typicality of the features minus its threshold; beside it, the
calibrated top probability's) for known vs unknown, and the accuracy/rejection trade-off at the bundle's
thresholds and around them. The zoo's held-out models have
tables no training photo had: where validation found that catalog originals always carry tables training saw,
that alone answers `unknown` (the served default), which real cameras sharing a maker's tables would not
trigger; the pixels-only figure is the one that says what the pixels can tell.

    python bench/open_set.py                       # default: 8 photos per device, 6 epochs of 40 steps
    python bench/open_set.py --images-per-device 16 --epochs 14 --steps 60    # the make-run training budget
"""
from __future__ import annotations

import argparse
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

from camid.tiny import inside  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold-out", nargs="+", default=["Corvid-C3", "Gale-G4"], metavar="LABEL")
    parser.add_argument("--images-per-device", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)

    from camid.config import Catalog, load_params
    from camid.data.cache import prepare
    from camid.data.synth import synthesize
    from camid.inference.answers import answers, evidence_and_probs, kinds, score_photos
    from camid.inference.ensemble import Ensemble
    from camid.inference.jpeg_tables import UNSEEN, USED
    from camid.inference.openset import auroc, tradeoff
    from camid.stages.evaluate import evaluate
    from camid.stages.split import split
    from camid.stages.train import train

    params = load_params(ROOT / "params.yaml")
    unknown_labels = set(args.hold_out)
    if not unknown_labels <= set(params.catalog.labels):
        raise SystemExit(f"--hold-out must name catalog cameras: {', '.join(params.catalog.labels)}")
    known = Catalog(params.catalog.name, tuple(c for c in params.catalog.cameras if c.label not in unknown_labels))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="camid-openset-") as tmp:
        root = Path(tmp)
        with inside(root, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", MLFLOW_EXPERIMENT_NAME="camid-bench",
                    CAMID_CHECKPOINTS=str(root / "checkpoints")):
            synth = dataclasses.replace(params.synth, images_per_device=args.images_per_device, bad_fraction=0.0)
            manifest = synthesize(root / "raw", params.catalog, synth, progress=False)
            split(root / "raw" / "train", root / "split", known.labels, val_fraction=params.split.val_fraction,
                  test_fraction=params.split.test_fraction, seed=params.split.seed)
            prepare(root / "split", root / "cache", known, patch=params.train.patch)
            settings = dataclasses.replace(params.train, archs=("smallcnn",), epochs=args.epochs,
                                           steps_per_epoch=args.steps)
            train("smallcnn", root / "cache", root / "model", settings, known.labels, known)
            metrics = evaluate([root / "model"], root / "cache", root / "bundle", params.evaluate,
                               metrics_file=root / "evaluate.json", plots_file=root / "confusion.csv", catalog=known)
            ensemble = Ensemble.load(root / "bundle")
            test = pd.read_csv(root / "split" / "test.csv", keep_default_na=False)
            held = manifest[manifest.label.isin(unknown_labels)]
            held_paths = [root / "raw" / f for f in held.file]

            def scores(paths, tables: bool):
                """Scored as served (the one photo-scoring path): the calibrated probabilities, the pixel ground's
                score minus its threshold (kNN on the features where the bundle has a bank), the tables' evidence,
                the served `unknown`, and the calibrated top probability's margin."""
                photos = score_photos(ensemble, [str(p) for p in paths])
                served = answers(ensemble, photos, {"jpeg_tables": tables})
                evidence, probs = evidence_and_probs(ensemble, photos, tables)
                probs = ensemble.calibrate(probs, kinds(photos.patches), evidence == USED)
                margin = ensemble.open_set_margin(probs, photos.patches, evidence, photos.features)
                top = ensemble.open_set_margin(probs, photos.patches, evidence)
                return probs, margin, evidence, served["unknown"].to_numpy(bool), top

            truth = np.array([known.labels.index(label) for label in test.label])
            results = {tables: (scores(test.path, tables), scores(held_paths, tables)) for tables in (False, True)}

    rule = ensemble.open_set
    print(f"\ncamid open-set bench: {len(known.labels)} known camera models, held out {', '.join(sorted(unknown_labels))}; "
          f"{args.images_per_device} photos per device, smallcnn {args.epochs}x{args.steps} steps; "
          f"{time.perf_counter() - started:.0f} s")
    print(f"known: {len(truth)} whole photos of the known models' test devices (never seen in training); "
          f"unknown: {len(held_paths)} photos of the held-out models")
    print(f"fitted on validation: thresholds accepting {rule['accept']:.0%} "
          + ", ".join(f"{k} {v:.4f}" for k, v in rule["threshold"].items())
          + "".join(f", kNN {k} {v:.4f}" for k, v in rule.get("knn_threshold", {}).items())
          + f"; unseen JPEG tables count as unknown: {rule.get('unseen_tables', False)} "
            f"(validation originals whose tables training saw: {rule.get('val_tables_seen', float('nan')):.3f})")
    score = rule.get("score", "max_prob")
    for tables, ((known_probs, k, k_evidence, k_unknown, k_top), (_, u, u_evidence, u_unknown, u_top)) in results.items():
        correct = known_probs.argmax(1) == truth
        right = (~k_unknown & correct).sum() + u_unknown.sum()
        title = ("the model's setting (served default): JPEG-table evidence where a training photo had the "
                 f"signature (known photos: {np.mean(k_evidence == USED):.0%} used, {np.mean(k_evidence == UNSEEN):.0%} "
                 f"unseen; unknown: {np.mean(u_evidence == USED):.0%} used, {np.mean(u_evidence == UNSEEN):.0%} unseen)"
                 if tables else "pixels only (jpeg_tables: false)")
        print(f"\n{title}\n  closed-set accuracy {correct.mean():.3f}; at the bundle's rule: known accepted "
              f"{1 - k_unknown.mean():.3f} (accuracy on those {correct[~k_unknown].mean():.3f}), unknown rejected "
              f"{u_unknown.mean():.3f}, open-set accuracy {right / (len(k) + len(u)):.3f}")
        if not tables or not rule.get("unseen_tables"):
            print(f"  AUROC known vs unknown of the pixel ground ({score}): {auroc(k, u):.3f}; of the calibrated top "
                  f"probability: {auroc(k_top, u_top):.3f}; other thresholds of the pixel ground (offset from the bundle's):")
            print(f"  {'offset':>8}{'known acc.':>12}{'acc. on acc.':>14}{'unk. rej.':>11}{'open-set acc.':>15}")
            grid = sorted({0.0, *np.quantile(k, [0.05, 0.2, 0.5]).tolist()})
            for row in tradeoff(k, correct, u, grid):
                mark = "  <- bundle threshold" if row["threshold"] == 0.0 else ""
                print(f"  {row['threshold']:>8.3f}{row['known_accepted']:>12.3f}{row['accuracy_accepted']:>14.3f}"
                      f"{row['unknown_rejected']:>11.3f}{row['open_set_accuracy']:>15.3f}{mark}")
    print(f"(test weighted accuracy of the {len(known.labels)}-camera model, patches: {metrics['weighted_accuracy']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
