"""Does the served model install? Build a fresh virtualenv from nothing but the model's own requirements.txt,
then in it load the pyfunc with `mlflow.pyfunc.load_model` and answer a real JPEG (made with Pillow there).

This is what `mlflow models serve --env-manager virtualenv` and `spark_udf(..., env_manager="virtualenv")` do:
the venv sees neither this checkout nor its .venv, so a module the serving path imports but requirements.txt
leaves out fails here (as `No module named 'ruamel'` once did). The model is the registered tiny model this
script builds in a temporary folder (`camid.tiny`), or the one given by --model (a downloaded pyfunc folder) or
--model-uri (e.g. models:/camid@champion, read from MLFLOW_TRACKING_URI). Prints the time of each step and the
answer; with --json, writes them there too. Exit status 0 only if the model loaded and answered.

    python bench/serving_env.py [--model DIR | --model-uri URI] [--venv DIR] [--json OUT] [--requirements FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Runs inside the fresh venv, from an empty folder (so nothing of this checkout is importable but what the
# model ships in its own code/ folder).
CHILD = r'''
import base64, io, json, sys, time
t0 = time.perf_counter()
import numpy as np
import pandas as pd
from PIL import Image
import mlflow.pyfunc
t1 = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
t2 = time.perf_counter()
rng = np.random.default_rng(0)
pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
buf = io.BytesIO()
Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
frame = pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})
answer = model.predict(frame)
t3 = time.perf_counter()
import camid
row = answer.iloc[0]
print("CAMID_RESULT " + json.dumps({
    "import_s": t1 - t0, "load_s": t2 - t1, "predict_s": t3 - t2, "camid_from": camid.__file__,
    "python": sys.version.split()[0], "camera": str(row["camera"]), "closest_camera": str(row["closest_camera"]),
    "confidence": float(row["confidence"]), "error": str(row["error"]), "columns": list(answer.columns)}))
'''


def clean_env() -> dict:
    """This process's environment without what would let the venv see this checkout or its .venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "CAMID_PARAMS")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(ROOT / ".venv")))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def step(name: str, command: list[str], timings: dict, **kw) -> subprocess.CompletedProcess:
    print(f"-- {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=clean_env(), **kw)
    timings[f"{name}_s"] = round(time.perf_counter() - start, 1)
    print(f"   {timings[f'{name}_s']} s, exit {done.returncode}", flush=True)
    return done


def check(model_dir: Path, venv: Path, requirements: Path | None = None) -> dict:
    """Build `venv` from the model's requirements.txt (or `requirements`), load the model there and predict."""
    requirements = requirements or model_dir / "requirements.txt"
    if not requirements.is_file():
        raise SystemExit(f"{requirements} not found: --model must be an MLflow pyfunc folder (MLmodel, requirements.txt)")
    result = {"model": str(model_dir), "requirements": requirements.read_text().split(), "ok": False}
    timings = result.setdefault("timings", {})
    python = venv / "bin" / "python"
    done = step("venv", [sys.executable, "-m", "venv", "--clear", str(venv)], timings)
    if done.returncode:
        result["failure"] = f"python -m venv failed: {done.stderr[-2000:]}"
        return result
    done = step("pip_install", [str(python), "-m", "pip", "install", "--quiet", "-r", str(requirements)], timings)
    if done.returncode:
        result["failure"] = f"pip install -r {requirements} failed: {done.stderr[-4000:]}"
        return result
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, env=clean_env())
    result["installed_distributions"] = len(freeze.stdout.split())
    with tempfile.TemporaryDirectory() as empty:
        script = Path(empty) / "load_and_predict.py"
        script.write_text(CHILD)
        done = step("load_and_predict", [str(python), "-I", str(script), str(model_dir)], timings, cwd=empty)
    answer = next((line for line in done.stdout.splitlines() if line.startswith("CAMID_RESULT ")), None)
    if done.returncode or answer is None:
        result["failure"] = f"load_model/predict failed in the fresh venv: {done.stderr[-4000:]}"
        return result
    result.update(json.loads(answer.removeprefix("CAMID_RESULT ")), ok=True)
    result["camid_shipped_with_the_model"] = Path(result["camid_from"]).resolve().is_relative_to(model_dir.resolve())
    return result


def tiny_pyfunc(root: Path) -> Path:
    from camid.tiny import build_tiny_model

    model = build_tiny_model(root, register=True)
    return Path(model.local_uri)


def download(uri: str, out: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(out)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a downloaded MLflow pyfunc folder (default: build the tiny model)")
    parser.add_argument("--model-uri", help="a model URI to download first (models:/camid@champion, runs:/...)")
    parser.add_argument("--venv", type=Path, help="where to build the venv (default: a temporary folder)")
    parser.add_argument("--requirements", type=Path, help="install this file instead of the model's requirements.txt")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="camid-serving-env-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        if args.model:
            model_dir = args.model
        elif args.model_uri:
            model_dir = download(args.model_uri, tmp / "model")
        else:
            print("-- building and registering the tiny model", flush=True)
            model_dir = tiny_pyfunc(tmp / "tiny")
        prepared = time.perf_counter() - start
        result = check(model_dir, args.venv or tmp / "venv", args.requirements)
        result["timings"]["model_s"] = round(prepared, 1)
    print("requirements.txt:", " ".join(result["requirements"]))
    if result["ok"]:
        print(f"OK: loaded and answered in a venv built only from requirements.txt "
              f"({result['installed_distributions']} distributions installed): camera {result['camera']!r}, "
              f"confidence {result['confidence']:.3f}, error {result['error']!r}; camid from the model's own code: "
              f"{result['camid_shipped_with_the_model']}")
        t = result["timings"]
        print(f"   venv {t['venv_s']} s, pip install {t['pip_install_s']} s, imports {result['import_s']:.1f} s, "
              f"load_model {result['load_s']:.1f} s, predict {result['predict_s']:.2f} s "
              f"(load_and_predict process {t['load_and_predict_s']} s)")
    else:
        print("FAILED:", result["failure"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
