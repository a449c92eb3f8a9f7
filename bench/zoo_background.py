"""Background cameras on a catalog of several devices per model: the zoo's `dvc repro` with and without them.

`bench/device_gap.py --background` measures background cameras where every catalog camera has one reference
device; this bench measures them where each has the zoo's four (two train, one validation, one test: the split
is device-disjoint, so the open-set rule is fitted on devices training never saw). Two private copies of this
checkout (bench/scale.py's copy: the code as it is now, its own MLflow store and DVC cache) run the whole
`dvc repro` (the `make run` training budget) on a catalog of the zoo without the `--unknown` models:

- `without`: the catalog cameras alone (the `--background` models left out);
- `with`: the `--background` models added as background cameras (`background: true`, never an answer).

Then both bundles answer with `camid predict --full-image`, as served (with the JPEG tables) and from the pixels alone:
the catalog cameras' test-device photos (the evaluate stage's, devices training never saw: the closest camera
and the share accepted) and every good photo of the `--unknown` models, synthesised from the same zoo (the share
answered `unknown`, per model). Split: devices and models no training saw.

    python bench/zoo_background.py
    python bench/zoo_background.py --unknown Gale-G4,Halo-H8,Iris-I6 --background Boreal-B7,Corvid-C3,Ember-E2,Fjord-F9
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from real_devices import predict  # noqa: E402  (bench/real_devices.py: `camid predict --full-image` in a copy)
from scale import ROOT, make_copy, stage_env  # noqa: E402  (bench/scale.py: the private copy and its environment)


def set_catalog(params_file: Path, drop: list[str], background: list[str]) -> list[str]:
    """The active catalog of params.yaml without the `drop` models and with the `background` ones marked
    `background: true`, comments kept; returns the catalog cameras' labels (not the background's)."""
    from camid.config import load_params
    from camid.core.fileio import atomic_path
    from camid.tools.profile import _load

    yaml, doc = _load(params_file)
    name = doc["catalog"]["active"]
    entries = doc["catalog"][name]
    labels = [e["label"] for e in entries]
    missing = sorted((set(drop) | set(background)) - set(labels))
    if missing:
        raise SystemExit(f"not in catalog {name!r}: {', '.join(missing)}; its cameras: {', '.join(labels)}")
    for entry in list(entries):
        if entry["label"] in drop:
            entries.remove(entry)
        elif entry["label"] in background:
            entry["background"] = True
    with atomic_path(params_file) as tmp:
        with open(tmp, "w") as f:
            yaml.dump(doc, f)
        load_params(tmp)
    return [e["label"] for e in entries if not e.get("background")]


def unknown_photos(unknown: list[str], out: Path) -> pd.DataFrame:
    """Every good photo (no deliberately bad file) of the `unknown` models, synthesised as the zoo makes them:
    path, label."""
    from camid.config import load_params
    from camid.data.synth import synthesize

    params = load_params(ROOT / "params.yaml")
    catalog = dataclasses.replace(params.catalog, cameras=tuple(c for c in params.catalog.cameras if c.label in unknown))
    manifest = synthesize(out, catalog, params.synth, progress=False)
    good = manifest[manifest["bad"].fillna("") == ""]
    return pd.DataFrame({"path": [str(out / f) for f in good["file"]], "label": list(good["label"])})


def score(copy: Path, env: dict, catalog: list[str], unknown: pd.DataFrame) -> dict:
    """The copy's bundle answering its test photos of catalog cameras and the unknown models' photos with
    `camid predict --full-image` in the copy (bench/real_devices.py's `predict`), as served and from the pixels
    alone."""
    test = pd.read_csv(copy / "plots" / "test_photos.csv", keep_default_na=False)
    test = test[test.actual.isin(catalog)]
    out = {"test_n": int(len(test)), "unknown_n": int(len(unknown))}
    for setting, pixels_only in (("served", False), ("pixels", True)):
        answers = predict(copy, env, list(test.path), copy / f"test_{setting}.csv", pixels_only)
        out[f"test_closest_right_{setting}"] = float((answers.closest_camera.to_numpy() == test.actual.to_numpy()).mean())
        out[f"test_accepted_{setting}"] = float((answers.camera != "unknown").mean())
        answers = predict(copy, env, list(unknown.path), copy / f"unknown_{setting}.csv", pixels_only)
        rejected = (answers.camera == "unknown").to_numpy()
        out[f"unknown_rejected_{setting}"] = float(rejected.mean())
        out[f"unknown_rejected_{setting}_per_model"] = {
            m: round(float(rejected[(unknown.label == m).to_numpy()].mean()), 3) for m in sorted(set(unknown.label))}
    return out


def run_one(base: Path, name: str, drop: list[str], background: list[str], photos: pd.DataFrame) -> dict:
    copy = make_copy(base / name)
    env = stage_env(copy)
    catalog = set_catalog(copy / "params.yaml", drop, background)
    print(f"{name}: catalog {', '.join(catalog)}" + (f"; background {', '.join(background)}" if background else ""),
          flush=True)
    start = time.monotonic()
    done = subprocess.run(["dvc", "repro"], cwd=copy, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if done.returncode:
        raise SystemExit(f"{name}: dvc repro failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    row = {"config": name, "dvc_repro_min": round(seconds / 60, 1), **score(copy, env, catalog, photos)}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unknown", default="Gale-G4,Halo-H8,Iris-I6", help="models left out of training, questioned")
    parser.add_argument("--background", default="Boreal-B7,Corvid-C3,Ember-E2,Fjord-F9",
                        help="models trained as background cameras in the `with` run (left out of `without`)")
    parser.add_argument("--keep", type=Path, help="keep the copies here")
    parser.add_argument("--json", type=Path, help="also append the rows here as JSON lines")
    args = parser.parse_args(argv)
    unknown, background = args.unknown.split(","), args.background.split(",")
    if set(unknown) & set(background):
        raise SystemExit("a model cannot be both --unknown and --background")
    base = args.keep or Path(tempfile.mkdtemp(prefix="camid-zoo-background-"))
    base.mkdir(parents=True, exist_ok=True)
    photos = unknown_photos(unknown, base / "unknown")
    print(f"unknown models: {len(photos)} good photos of {', '.join(unknown)}", flush=True)
    rows = [run_one(base, "without", unknown + background, [], photos),  # the background models left out
            run_one(base, "with", unknown, background, photos)]
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    table = pd.DataFrame([{k: v for k, v in r.items() if not k.endswith("per_model")} for r in rows])
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False))
    for r in rows:
        print(f"{r['config']}: unknown models rejected per model, served {r['unknown_rejected_served_per_model']}, "
              f"pixels {r['unknown_rejected_pixels_per_model']}")
    print(f"folders in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
