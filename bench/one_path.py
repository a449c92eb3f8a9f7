"""What is measured is what is served: the evaluate stage's answers against `camid predict` and the served model.

Reads the answers the evaluate stage wrote for every test photo (`plots/test_photos.csv`, from `dvc repro`),
answers the same files with `camid predict --full-image` (in process) and with the registered champion behind
a real `mlflow models serve` on 127.0.0.1 (one /invocations request per `--batch` photos), and prints how many
photos agree on the camera, the verdict (`unknown`, `unknown_by`), the JPEG-table evidence and the manipulated flag, and the
largest difference in any probability. Run it from the project folder after `make run`:

    python bench/one_path.py [--answers plots/test_photos.csv] [--model models:/camid/3] [--batch 32]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")

COLUMNS = ("camera", "closest_camera", "camera_group", "unknown", "unknown_by", "reference_devices", "size_seen",
           "tables_evidence", "consistent", "manipulated", "patches")


def _as_text(values) -> list[str]:
    return [str(v).lower() for v in values]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=Path, default=Path("plots/test_photos.csv"))
    parser.add_argument("--model", default=None,
                        help="the registered model to serve (default: the version the register stage made from these "
                             "answers' bundle, registry/registered.json's model_uri; the champion may be an older one)")
    parser.add_argument("--batch", type=int, default=32, help="photos per /invocations request")
    args = parser.parse_args(argv)

    import requests

    from camid.inference.ensemble import load_ensemble
    from camid.serving.server import LocalServer
    from camid.stages.predict import predict_files

    if not args.answers.is_file():
        raise SystemExit(f"{args.answers} not found: run `make run` (dvc repro) first")
    if args.model is None:
        registered = Path("registry/registered.json")
        args.model = json.loads(registered.read_text())["model_uri"] if registered.is_file() else \
            "models:/camid@champion"
    evaluated = pd.read_csv(args.answers, keep_default_na=False)
    paths = [Path(p) for p in evaluated.path]
    ensemble = load_ensemble(args.model)
    labels = list(ensemble.labels)
    started = time.perf_counter()
    predicted = predict_files(ensemble, paths, patches_per_image=0)
    predict_s = time.perf_counter() - started
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalServer(args.model, Path(tmp) / "serve.log") as url:
        started = time.perf_counter()
        for i in range(0, len(paths), args.batch):
            data = [[base64.b64encode(p.read_bytes()).decode()] for p in paths[i:i + args.batch]]
            r = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["image"], "data": data}},
                              timeout=600)
            r.raise_for_status()
            rows.extend(r.json()["predictions"])
        serve_s = time.perf_counter() - started
    served = pd.DataFrame(rows)
    print(f"{len(paths)} test photos of {args.model}: evaluate stage vs `camid predict --full-image` "
          f"({predict_s:.1f} s) vs /invocations ({serve_s:.1f} s, {args.batch} photos a request)")
    for name, other in (("camid predict", predicted), ("/invocations", served)):
        same = {c: int(np.sum(np.array(_as_text(evaluated[c])) == np.array(_as_text(other[c])))) for c in COLUMNS}
        diff = float(np.max(np.abs(other[labels].to_numpy(float) - evaluated[labels].to_numpy(float))))
        print(f"  {name:14s} " + ", ".join(f"{c} {n}/{len(paths)}" for c, n in same.items())
              + f"; largest probability difference {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
