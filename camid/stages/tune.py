"""keras-tuner search over a backbone's hyperparameters, every trial a nested MLflow run under one parent.

Searched: learning rate, dropout, head width, patch size and manipulation probability; the objective is
the competition's weighted accuracy on the held-out split, at the epoch train.checkpoint keeps (by default the latest
epoch within the validation's noise of the best, camid.models.callbacks.kept_epoch): a trial is scored as the train
stage would keep it, not by the one epoch a validation of a few photos happened to favour. Hyperband continues a
trial from keras-tuner's own checkpoint of its best-scoring epoch. The best values are logged to the parent run
and written as a params file (`train:` block) that `camid train --params-file` reads, or, with `--apply`,
written into params.yaml so `dvc repro` retrains with them.

Distributed search: keras-tuner runs one chief (the oracle) and many workers from the same command, told
apart by environment variables (KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT); see
the README.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np

from camid.config import TrainParams, TuneParams, load_params, optional
from camid.errors import CamidError
from camid.core.fileio import write_text
from camid.models.callbacks import MONITOR, kept_epoch, malloc_callback, precise_batch_norm, scoring_callbacks

log = logging.getLogger(__name__)
ALGORITHMS = ("hyperband", "bayesian", "random")


def patch_choices(cache_patch: int, min_size: int) -> list[int]:
    """Even patch sizes from 3/4 of the cached patch up to it, as far as the backbone accepts them."""
    sizes = sorted({cache_patch, (cache_patch * 3 // 4) // 2 * 2})
    return [s for s in sizes if s >= min_size] or [cache_patch]


def make_hypermodel(arch: str, cache: Path, base: TrainParams, catalog, labels: list[str]):
    import keras_tuner as kt

    from camid.data.dataset import TrainPatches, calibration_batches, eval_stream
    from camid.models import compile_model, create_model, get_backbone
    from camid.data.cache import read_meta

    meta = read_meta(cache)
    sizes = patch_choices(min(meta["patch"], base.patch), get_backbone(arch).min_size)

    class CamidHyperModel(kt.HyperModel):
        def build(self, hp):
            patch = hp.Choice("patch", sizes)
            # Used by fit, declared here: the oracle learns the search space from build, so a value declared only
            # in fit would be missing from the first trial's values and fixed at its default in that trial.
            hp.Float("manipulation_prob", 0.2, 0.8, step=0.1)
            model = create_model(arch, num_classes=len(labels), patch=patch, weights=base.weights,
                                 dense=(hp.Choice("dense", [64, 128, 256, 512]),),
                                 dropout=(hp.Float("dropout", 0.0, 0.5, step=0.1),))
            compile_model(model, learning_rate=hp.Float("learning_rate", 1e-5, 1e-2, sampling="log"),
                          aux_weight=base.aux_weight)
            return model

        def fit(self, hp, model, *args, **kwargs):
            patch = hp.get("patch")
            data = TrainPatches(cache, catalog, patch=patch, batch_size=base.batch_size,
                                steps_per_epoch=base.steps_per_epoch,
                                manipulation_prob=hp.get("manipulation_prob"), seed=base.seed,
                                crops_per_decode=base.crops_per_decode,
                                cfa_flips=base.cfa_flips)
            evalset = eval_stream(cache, split="val", patch=patch, batch_size=base.batch_size)
            # As the train stage scores an epoch: BatchNormalization's statistics re-estimated first (train.precise_bn).
            calibration = calibration_batches(cache, catalog, patch=patch, batch_size=base.batch_size,
                                              batches=base.precise_bn,
                                              manipulation_prob=hp.get("manipulation_prob"), seed=base.seed,
                                              cfa_flips=base.cfa_flips)
            precise = [precise_batch_norm(calibration)] if calibration else []
            callbacks = ([malloc_callback()] + precise + scoring_callbacks(evalset, base.batch_size)
                         + list(kwargs.pop("callbacks", [])))
            kwargs["shuffle"] = False  # in order: a group of batches shares its decodes (as in the train stage)
            return model.fit(data, *args, callbacks=callbacks, verbose=0, **kwargs)

    return CamidHyperModel()


def trial_score(history, photos: int, rule: str) -> tuple[float, int] | None:
    """(score, epoch) of the epoch `rule` keeps (camid.models.callbacks.kept_epoch) among one execution's epochs, the
    epoch counted as Keras counts it (`initial_epoch` onwards); None when no epoch was scored."""
    scores = getattr(history, "history", {}).get(MONITOR, [])
    kept = kept_epoch(scores, photos, rule)
    if kept is None:
        return None
    first = (getattr(history, "epoch", None) or [0])[0]
    return float(scores[kept]), int(first + kept)


def make_tuner(algorithm: str, hypermodel, directory: Path, project: str, max_trials: int, epochs: int, seed: int,
               photos: int = 0, rule: str = "best"):
    import keras_tuner as kt
    import mlflow

    classes = {"hyperband": kt.Hyperband, "bayesian": kt.BayesianOptimization, "random": kt.RandomSearch}
    if algorithm not in classes:
        raise CamidError(f"unknown tune.algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")

    class TrackedTuner(classes[algorithm]):
        """Each trial is a nested MLflow run holding its hyperparameters, per-epoch metrics and score; the score the
        oracle gets is the kept epoch's (`rule` on `photos` validation photos, trial_score), averaged over
        executions, where keras-tuner would take each execution's best epoch."""

        def run_trial(self, trial, *args, **kwargs):
            with mlflow.start_run(run_name=f"trial-{trial.trial_id}", nested=True):
                mlflow.set_tags({"stage": "tune-trial", "trial_id": trial.trial_id, "checkpoint": rule})
                mlflow.log_params(trial.hyperparameters.values)
                histories = super().run_trial(trial, *args, **kwargs)
                histories = histories if isinstance(histories, list) else [histories]
                kept = [trial_score(history, photos, rule) for history in histories]
                if any(k is None for k in kept):
                    return histories  # an execution without a score: keras-tuner's own message follows
                best = [max(history.history[MONITOR]) for history in histories]
                mlflow.log_metrics({f"best_{MONITOR}": float(np.mean(best)),
                                    f"kept_{MONITOR}": float(np.mean([score for score, _ in kept])),
                                    "kept_epoch": kept[-1][1]})
                return [{MONITOR: score} for score, _ in kept]

        def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
            # keras-tuner imports tensorboard for every trial on TensorFlow, TensorBoard callback or not, and
            # TensorFlow no longer installs it; camid's trials log to MLflow.
            if any(type(callback).__name__ == "TensorBoard" for callback in callbacks):
                super()._configure_tensorboard_dir(callbacks, trial, execution)

    objective = kt.Objective(MONITOR, direction="max")
    common = dict(objective=objective, directory=str(directory), project_name=project, overwrite=True, seed=seed)
    if algorithm == "hyperband":
        tuner = TrackedTuner(hypermodel, max_epochs=epochs, factor=3, **common)
        tuner.oracle.max_trials = max_trials  # Hyperband has no max_trials of its own: cap it through the oracle
    else:
        tuner = TrackedTuner(hypermodel, max_trials=max_trials, **common)
    return tuner


def tune(arch: str, cache: Path, settings: TuneParams, base: TrainParams, catalog, out: Path,
         directory: Path = Path("tuning")) -> dict:
    import mlflow

    from camid import tracking

    from camid.data.dataset import eval_stream
    from camid.models.callbacks import check_checkpoint_rule

    check_checkpoint_rule(base.checkpoint)
    hypermodel = make_hypermodel(arch, cache, base, catalog, catalog.labels)
    photos = eval_stream(cache, split="val", batch_size=base.batch_size).photos  # rows only: no pixels are read
    tuner = make_tuner(settings.algorithm, hypermodel, directory, f"{arch}-{settings.algorithm}",
                       settings.max_trials, settings.epochs, base.seed, photos=photos, rule=base.checkpoint)
    # tuner_id tells the processes of a distributed search apart: "chief" (the oracle), or a worker's id.
    tags = {"stage": "tune", "arch": arch, "data_version": tracking.data_version(cache), "tuner_id": tuner.tuner_id}
    with tracking.run(f"tune-{arch}", tags=tags):
        # params.yaml keys, as train logs them, apart from the bare names `mlflow run` logs ('' when unset).
        tracking.log_params({"arch": arch, **{f"tune.{k}": v for k, v in dataclasses.asdict(settings).items()},
                           "train.steps_per_epoch": base.steps_per_epoch, "train.batch_size": base.batch_size,
                           "train.checkpoint": base.checkpoint})
        tuner.search(epochs=settings.epochs)
        scored = [t for t in tuner.oracle.get_best_trials(1) if t.score is not None]
        if not scored:
            raise CamidError(f"none of the {len(tuner.oracle.trials)} trials finished: see the errors above")
        best_trial = scored[0]
        best = best_trial.hyperparameters.values
        mlflow.log_params({f"best_{k}": v for k, v in best.items()})
        mlflow.log_metric(f"best_{MONITOR}", float(best_trial.score))  # the kept epoch's score (trial_score)
        train_block = {"learning_rate": float(best["learning_rate"]), "dropout": [float(best["dropout"])],
                       "dense": [int(best["dense"])], "patch": int(best["patch"]),
                       "manipulation_prob": float(best["manipulation_prob"])}
        from camid.config import dump_yaml

        text = (f"# best of {len(tuner.oracle.trials)} {settings.algorithm} trials for {arch}: "
                f"{MONITOR} {best_trial.score:.4f} (at the epoch train.checkpoint {base.checkpoint} keeps)\n"
                + dump_yaml({"train": dict(sorted(train_block.items()))}))
        write_text(out, text)
        mlflow.log_artifact(str(out))
    log.info("best %s %.4f with %s; written to %s", MONITOR, best_trial.score, train_block, out)
    return {"score": float(best_trial.score), "train": train_block, "trials": len(tuner.oracle.trials)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, help="backbone name from the registry")
    parser.add_argument("--cache", type=Path, default=Path("data/cache"), help="the prepare stage's crop cache")
    parser.add_argument("--max-trials", type=optional(int), default=None, help="override tune.max_trials")
    parser.add_argument("--algorithm", type=optional(str), default=None, help="hyperband | bayesian | random")
    parser.add_argument("--epochs", type=optional(int), default=None, help="override tune.epochs (per trial)")
    parser.add_argument("--steps-per-epoch", type=optional(int), default=None, help="override train.steps_per_epoch")
    parser.add_argument("--out", type=optional(Path), default=Path("tuning/best_params.yaml"),
                        help="where to write the best values (a `train:` params block)")
    parser.add_argument("--apply", action="store_true", help="also write the best values into params.yaml")


def run(args: argparse.Namespace) -> int:
    params = load_params()
    settings = dataclasses.replace(params.tune, **{k: v for k, v in
                                                  (("max_trials", args.max_trials), ("algorithm", args.algorithm),
                                                   ("epochs", args.epochs)) if v is not None})
    base = params.train if args.steps_per_epoch is None else dataclasses.replace(params.train,
                                                                                 steps_per_epoch=args.steps_per_epoch)
    out = args.out or Path("tuning/best_params.yaml")
    # keras-tuner's trials go beside the best values, under <arch>-<algorithm>.
    result = tune(args.arch, args.cache, settings, base, params.catalog, out, directory=out.parent)
    if args.apply:
        from camid.tools.profile import set_params

        set_params({f"train.{k}": v for k, v in result["train"].items()}, params.path)  # $CAMID_PARAMS if set
        print(f"{params.path} train block updated; `dvc repro` retrains with the tuned values")
    return 0
