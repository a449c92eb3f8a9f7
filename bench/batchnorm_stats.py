"""Why the validation score swings between epochs: BatchNormalization's moving statistics against statistics
re-estimated on training patches (precise BN), and an average of the weights, epoch by epoch on one training run.

Trains the project's first backbone (`train.archs`, params.yaml's `train` block: patch, steps, learning rate,
batch size) from its crop cache (`data/cache`, from `dvc repro`) for `--epochs` epochs and prints, after each
epoch, the validation weighted accuracy (MONITOR, as the train stage scores it) of:

    moving       the model as trained: the moving statistics Keras keeps (momentum camid.models.smallcnn.BN_MOMENTUM),
                 which is what the train stage scores, keeps and serves;
    precise      the same weights with every BatchNormalization layer's statistics re-estimated as an equal-weight
                 average over `--calibration` batches of training patches (a fixed pool from its own seed, never the
                 validation photos), in training mode;
    ema          an exponential average of the weights (0.99 per step), moving statistics averaged alike;
    ema_precise  that average with precise statistics.

Run it from a project folder after `dvc repro` (the zoo, or a `camid catalog from-folder` project):

    python bench/batchnorm_stats.py [--epochs 10] [--seed 1] [--calibration 60]

A diagnostic of training, not part of it: nothing here changes what the train stage does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("data/cache"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--calibration", type=int, default=60, help="batches of training patches for precise BN")
    args = parser.parse_args(argv)

    import keras

    from camid.config import load_params
    from camid.core.metrics import weighted_accuracy
    from camid.data.dataset import TrainPatches, eval_stream
    from camid.models import compile_model, create_model
    from camid.models.callbacks import predict_cameras, reestimate_batch_norm

    params = load_params()
    t, catalog = params.train, params.catalog
    arch = t.archs[0]
    keras.utils.set_random_seed(args.seed)
    evalset = eval_stream(args.cache, split="val", patch=t.patch, batch_size=t.batch_size)

    def score(model) -> float:
        probs = predict_cameras(model, evalset, evalset.manipulated, t.batch_size)
        return round(float(weighted_accuracy(evalset.labels, probs.argmax(1), evalset.manipulated)), 3)

    # The calibration pool: training patches (manipulated as training manipulates them) from a seed of its own,
    # one patch per decode so that the batches show as many photos as possible (the train stage draws its own with
    # camid.data.dataset.calibration_batches, 4 patches per decode).
    pool = TrainPatches(args.cache, catalog, patch=t.patch, batch_size=t.batch_size,
                        steps_per_epoch=args.calibration, manipulation_prob=t.manipulation_prob,
                        seed=args.seed + 1_000_003, crops_per_decode=1)
    batches = [pool[i][0] for i in range(args.calibration)]

    data = TrainPatches(args.cache, catalog, patch=t.patch, batch_size=t.batch_size,
                        steps_per_epoch=t.steps_per_epoch, manipulation_prob=t.manipulation_prob, seed=args.seed,
                        crops_per_decode=t.crops_per_decode)
    model = create_model(arch, num_classes=len(catalog.labels), patch=t.patch, weights=t.weights,
                         dense=t.dense, dropout=t.dropout)
    compile_model(model, learning_rate=t.learning_rate, aux_weight=t.aux_weight)
    shadow = keras.models.clone_model(model)

    def precise(m) -> None:
        reestimate_batch_norm(m, batches)  # what the train stage runs at every epoch's end (train.precise_bn)

    print(f"{arch}: {len(evalset.labels) // 9} validation photos, {t.steps_per_epoch} steps of {t.batch_size} "
          f"patches of {t.patch} px per epoch, precise BN over {args.calibration} batches", flush=True)

    class Diagnose(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ema = [np.array(w) for w in self.model.get_weights()]

        def on_train_batch_end(self, batch, logs=None):
            for average, weight in zip(self.ema, self.model.get_weights()):
                average *= 0.99
                average += 0.01 * weight

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, "train_accuracy": round(float((logs or {}).get("camera_accuracy", 0)), 3),
                   "moving": score(self.model)}
            shadow.set_weights(self.model.get_weights())
            precise(shadow)
            row["precise"] = score(shadow)
            shadow.set_weights(self.ema)
            row["ema"] = score(shadow)
            precise(shadow)
            row["ema_precise"] = score(shadow)
            rows.append(row)
            print(json.dumps(row), flush=True)

    rows: list[dict] = []
    model.fit(data, epochs=args.epochs, verbose=0, shuffle=False, callbacks=[Diagnose()])
    for column in ("moving", "precise", "ema", "ema_precise"):
        values = np.array([row[column] for row in rows])
        print(f"{column:12s} mean {values.mean():.3f}  min {values.min():.3f}  max {values.max():.3f}  "
              f"largest fall between epochs {max([0.0, *(-np.diff(values))]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
