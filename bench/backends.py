"""camid's model code on the other Keras 3 backends (PyTorch, JAX), with no TensorFlow installed.

A GPU machine may have JAX or PyTorch but not TensorFlow. This builds every backbone (weights none), runs a
forward pass, a training step and a .keras save/load round trip on the active backend, and prints the time
of each. With --bundle it loads a trained ensemble (trained under TensorFlow by `dvc repro`) and scores fixed
random patches with TTA; with --reference it compares those probabilities with a file saved under another
backend (--save-reference).

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

from camid.models.registry import BACKBONES, compile_model, create_model


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
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        again = keras.saving.load_model(path)
        difference = np.abs(again.predict(inputs, verbose=0)["camera"] - model.predict(inputs, verbose=0)["camera"])
    assert difference.max() < 1e-5, difference.max()
    return (f"patch {patch:3d}  build {built - started:5.1f} s  predict {predicted - built:5.1f} s  "
            f"train step {trained - predicted:5.1f} s  save/load ok")


def score_bundle(bundle: Path) -> np.ndarray:
    from camid.inference.ensemble import Ensemble

    ensemble = Ensemble.load(bundle)
    patches = np.random.default_rng(0).integers(0, 256, (24, ensemble.patch, ensemble.patch, 3), dtype=np.uint8)
    return ensemble.predict(patches, np.array([False, True] * 12), tta=True).probs


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
        probs = score_bundle(args.bundle)
        print(f"bundle {args.bundle}: {len(probs)} patches x 8 views scored")
        if args.save_reference:
            np.savez(args.save_reference, probs=probs, backend=keras.backend.backend())
        if args.reference:
            reference = np.load(args.reference)
            difference = np.abs(probs - reference["probs"]).max()
            same = (probs.argmax(1) == reference["probs"].argmax(1)).mean()
            print(f"vs {reference['backend']} reference: max probability difference {difference:.1e}, "
                  f"same prediction for {same:.0%}")
            failures += difference > 1e-4
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
