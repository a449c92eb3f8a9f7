"""The zoo's `dvc repro` (what `make run` runs) under params.yaml overrides, side by side with the defaults: the
test devices' figures of each configuration and the wall time of each run.

Each configuration runs in a private copy of this checkout (bench/scale.py's copy: the code as it is now, its own
MLflow store and DVC cache), so the checkout's own outputs are never touched. Split: the zoo's device-disjoint
test split (devices training and validation never saw); the figures are metrics/evaluate.json's: the weighted
accuracy of the test photos' centre patches as Kaggle scored them, with the JPEG tables and from the pixels alone,
and whole photos from the pixels alone.

    python bench/zoo_configs.py --config 'smallcnn_learned:train.archs=[smallcnn_learned]' \\
                                --config 'p128:train.patch=128,train.batch_size=16,train.steps_per_epoch=30'
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_devices import parse_overrides  # noqa: E402  (bench/real_devices.py: KEY=VALUE parsing)
from scale import make_copy, stage_env  # noqa: E402  (bench/scale.py: the private copy and its environment)

from camid.tools.profile import set_params  # noqa: E402


def parse_config(text: str) -> tuple[str, dict]:
    """'NAME:KEY=VALUE,KEY=VALUE' (values in YAML; a list's commas inside [...] stay with it)."""
    name, _, rest = text.partition(":")
    items, depth, current = [], 0, ""
    for char in rest:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if current:
        items.append(current)
    return name, parse_overrides(items)


def run_config(base: Path, name: str, overrides: dict) -> dict:
    copy = make_copy(base / name)
    env = stage_env(copy)
    if overrides:
        set_params(overrides, str(copy / "params.yaml"))
    start = time.monotonic()
    done = subprocess.run(["dvc", "repro"], cwd=copy, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if done.returncode:
        raise SystemExit(f"{name}: dvc repro failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    metrics = json.loads((copy / "metrics" / "evaluate.json").read_text())
    full = metrics.get("full_image", {})
    return {"config": name, "weighted_accuracy": metrics.get("weighted_accuracy"),
            "weighted_accuracy_pixels_only": metrics.get("weighted_accuracy_pixels_only"),
            "whole_photos_pixels_only": full.get("accuracy_pixels_only"),
            "val_weighted_accuracy": metrics.get("val_weighted_accuracy"),
            "dvc_repro_min": round(seconds / 60, 1), "overrides": overrides}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="a configuration: params.yaml overrides (repeatable); the defaults always run first")
    parser.add_argument("--no-defaults", action="store_true", help="skip the defaults' run")
    parser.add_argument("--keep", type=Path, help="keep the copies here")
    parser.add_argument("--json", type=Path, help="also append the rows here as JSON lines")
    args = parser.parse_args(argv)
    configs = ([] if args.no_defaults else [("defaults", {})]) + [parse_config(c) for c in args.config]
    base = args.keep or Path(tempfile.mkdtemp(prefix="camid-zoo-configs-"))
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in configs:
        print(f"{name}: {overrides or 'defaults'}", flush=True)
        row = run_config(base, name, overrides)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(rows).drop(columns=["overrides"]).to_string(index=False))
    print(f"split: the zoo's device-disjoint test split; copies in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
