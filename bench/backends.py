"""camid's model code on the other Keras 3 backends (PyTorch, JAX), with no TensorFlow installed.

A GPU machine may have JAX or PyTorch but not TensorFlow. This builds every backbone (weights none), runs a
forward pass, a training step, BatchNormalization's re-estimated statistics (train.precise_bn: checked against
each batch's own statistics, read with momentum 0) and a .keras save/load round trip on the active backend, and
prints the time of each. With --bundle it loads a trained ensemble (trained under TensorFlow by `dvc repro`) and scores fixed
random patches with TTA and re-estimates its models' BatchNormalization statistics on fixed random batches; with
--reference it compares those probabilities and statistics with a file saved under another backend
(--save-reference).

    # the reference, in the project's environment (TensorFlow)
    python bench/backends.py --arch smallcnn --bundle models/ensemble --save-reference /tmp/camid-ref.npz
    # another backend: a venv with keras==3.15.1, torch==2.13.0 (or jax) and camid's pure-Python dependencies
    KERAS_BACKEND=torch PYTHONPATH=. python bench/backends.py --bundle models/ensemble --reference /tmp/camid-ref.npz
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from camid.models.callbacks import _all_layers, _batch_norms as _norms, reestimate_batch_norm
from camid.models.registry import BACKBONES, compile_model, create_model


def _statistics(model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every re-estimated layer's moving means, variances and epsilons, each concatenated over the layers."""
    norms = _norms(model)
    if not norms:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    means = [keras.ops.convert_to_numpy(layer.moving_mean).astype(np.float64) for layer in norms]
    variances = [keras.ops.convert_to_numpy(layer.moving_variance).astype(np.float64) for layer in norms]
    epsilons = [np.full(m.shape, layer.epsilon) for m, layer in zip(means, norms)]
    return np.concatenate(means), np.concatenate(variances), np.concatenate(epsilons)


def statistics_difference(got, want) -> float:
    """How far two sets of statistics are apart in what they do: the largest difference of a mean in units of the
    standard deviation it normalises by, and of a variance relative to itself (plus the layer's epsilon). Deep
    layers of a randomly initialised network carry values near float32's rounding, which a compiled and an eager
    pass round differently; this measures the difference in the normalised output, not in those digits."""
    (m1, v1, _), (m0, v0, eps) = got, want
    if not len(m0):
        return 0.0
    return float(max(np.max(np.abs(m1 - m0) / np.sqrt(v0 + eps)), np.max(np.abs(v1 - v0) / (v0 + eps))))


def _random_batches(patch: int, n: int = 3, size: int = 4) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"image": rng.integers(0, 256, (size, patch, patch, 3), dtype=np.uint8),
             "manipulated": rng.integers(0, 2, (size, 1)).astype("float32")} for _ in range(n)]


def check_precise_bn(model, patch: int) -> str:
    """reestimate_batch_norm on this backend against what it must equal: the mean over the batches of each
    batch's own statistics, read one batch at a time with momentum 0 (a layer then holds its batch's mean and
    variance). Backbones with dropout inside draw other masks on every pass: run, not compared."""
    norms = _norms(model)
    if not norms:
        return "precise BN: no BatchNormalization"
    batches = _random_batches(patch)
    saved = model.get_weights()
    # The head's dropout (top-level layers) follows every BatchNormalization; a backbone's (nested) may not.
    stochastic = any(isinstance(layer, keras.layers.Dropout) and layer.rate > 0
                     for top in model.layers for layer in _all_layers(top))
    each = []
    momentum = [layer.momentum for layer in norms]
    for batch in batches:  # eager, one batch at a time, momentum 0: each layer holds its batch's statistics
        for layer in norms:
            layer.momentum = 0.0
        model({"image": batch["image"].astype("float32"), "manipulated": batch["manipulated"]}, training=True)
        each.append(_statistics(model))
        model.set_weights(saved)
    for layer, m in zip(norms, momentum):
        layer.momentum = m
    started = time.perf_counter()
    assert reestimate_batch_norm(model, batches) == len(norms)
    took = time.perf_counter() - started
    if stochastic:
        return f"precise BN ran ({len(norms)} layers, {took:.1f} s; dropout inside: not compared)"
    expected = (np.mean([e[0] for e in each], axis=0), np.mean([e[1] for e in each], axis=0), each[0][2])
    error = statistics_difference(_statistics(model), expected)
    assert error < 0.02, f"re-estimated statistics differ from the eager batches' by {error:.1e}"
    return f"precise BN ok ({len(norms)} layers, {took:.1f} s, largest difference {error:.0e} of a std)"


def check_backbone(name: str) -> str:
    patch = max(BACKBONES[name].min_size, 32)
    rng = np.random.default_rng(0)
    inputs = {"image": rng.uniform(0, 255, (2, patch, patch, 3)).astype("float32"),
              "manipulated": np.array([[0.0], [1.0]], dtype="float32")}
    started = time.perf_counter()
    model = create_model(name, num_classes=3, patch=patch, weights="none")
    built = time.perf_counter()
    out = model.predict(inputs, verbose=0)
    assert out["camera"].shape == (2, 3) and out["manipulation"].shape == (2, 9)
    predicted = time.perf_counter()
    compile_model(model, learning_rate=1e-3, aux_weight=0.2)  # what camid train does
    model.fit(inputs, {"camera": np.array([0, 1]), "manipulation": np.array([0, 3])}, epochs=1, verbose=0)
    trained = time.perf_counter()
    precise = check_precise_bn(model, patch)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        again = keras.saving.load_model(path)
        difference = np.abs(again.predict(inputs, verbose=0)["camera"] - model.predict(inputs, verbose=0)["camera"])
    assert difference.max() < 1e-5, difference.max()
    return (f"patch {patch:3d}  build {built - started:5.1f} s  predict {predicted - built:5.1f} s  "
            f"train step {trained - predicted:5.1f} s  save/load ok  {precise}")


def score_bundle(bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's probabilities for fixed random patches (TTA on), and its models' BatchNormalization
    statistics re-estimated on fixed random batches: (3, n) means, variances and epsilons of all layers."""
    from camid.inference.ensemble import Ensemble

    ensemble = Ensemble.load(bundle)
    patches = np.random.default_rng(0).integers(0, 256, (24, ensemble.patch, ensemble.patch, 3), dtype=np.uint8)
    probs = ensemble.predict(patches, np.array([False, True] * 12), tta=True).probs
    parts = []
    for model in ensemble.models:
        reestimate_batch_norm(model, _random_batches(ensemble.patch, n=4, size=16))
        parts.append(_statistics(model))
    return probs, np.stack([np.concatenate([p[k] for p in parts]) for k in range(3)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="*", default=list(BACKBONES), help="backbones to check (default: all)")
    parser.add_argument("--bundle", type=Path, help="an ensemble bundle to score (models/ensemble after make run)")
    parser.add_argument("--save-reference", type=Path, help="save the bundle's probabilities here (.npz)")
    parser.add_argument("--reference", type=Path, help="compare the bundle's probabilities with this file")
    args = parser.parse_args(argv)

    tensorflow = importlib.util.find_spec("tensorflow") is not None
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, "
          f"TensorFlow {'installed' if tensorflow else 'not installed'}")
    failures = 0
    for name in args.arch:
        try:
            print(f"ok   {name:18s} {check_backbone(name)}", flush=True)
        except Exception as exc:  # report every backbone, then fail
            failures += 1
            print(f"FAIL {name:18s} {type(exc).__name__}: {exc}", flush=True)
    if args.bundle:
        probs, statistics = score_bundle(args.bundle)
        print(f"bundle {args.bundle}: {len(probs)} patches x 8 views scored, {statistics.shape[1]} BatchNormalization "
              "channels re-estimated")
        if args.save_reference:
            np.savez(args.save_reference, probs=probs, statistics=statistics, backend=keras.backend.backend())
        if args.reference:
            reference = np.load(args.reference)
            difference = np.abs(probs - reference["probs"]).max()
            same = (probs.argmax(1) == reference["probs"].argmax(1)).mean()
            print(f"vs {reference['backend']} reference: max probability difference {difference:.1e}, "
                  f"same prediction for {same:.0%}")
            failures += difference > 1e-4
            if "statistics" in reference:
                error = statistics_difference(statistics, reference["statistics"])
                print(f"re-estimated BatchNormalization statistics: largest difference {error:.1e} of a std")
                failures += error > 0.02
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
