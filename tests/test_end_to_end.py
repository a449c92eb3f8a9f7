"""The whole pipeline for real: `dvc repro` on a tiny virtual zoo, the registered model loaded and served by the
real `mlflow models serve` process, and real HTTP requests to it, good and bad."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from tests.conftest import ROOT
from tests.helpers_data import RUN_VARIABLES

BIN = Path(sys.executable).parent
TINY = {
    ("synth", "images_per_device"): 4,
    ("train", "epochs"): 2,
    ("train", "steps_per_epoch"): 4,
    ("train", "batch_size"): 8,
    ("train", "crops_per_decode"): 2,
}


def run(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project (code linked, params shrunk) after a real `dvc repro`."""
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "MLproject", "conda.yaml", "pyproject.toml"):
        shutil.copy2(ROOT / name, root / name)
    shutil.copytree(ROOT / "camid", root / "camid", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for (section, key), value in TINY.items():
        params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    inherited = {k: v for k, v in os.environ.items() if k not in RUN_VARIABLES}  # no other store's run or experiment
    env = {**inherited, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
           "PYTHONPATH": str(root), "CAMID_PARAMS": str(root / "params.yaml")}
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run(["dvc", "config", "core.analytics", "false"], root, env)
    run(["dvc", "repro"], root, env, timeout=900)
    return root, env


def test_repro_builds_everything_and_is_then_up_to_date(project):
    root, env = project
    assert (root / "dvc.lock").is_file()
    status = run(["dvc", "status"], root, env).stdout
    assert "up to date" in status.lower(), status
    again = run(["dvc", "repro"], root, env).stdout
    assert "didn't change" in again or "up to date" in again.lower(), again
    assert "Running stage" not in again
    record = json.loads((root / "registry/registered.json").read_text())
    assert record["model_name"] == "camid" and record["champion_moved"]
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert metrics["patches"] == 9 * metrics["images"] and metrics["split"] == "test"
    assert metrics["weighted_accuracy"] == pytest.approx(0.7 * metrics["accuracy_unaltered"]
                                                         + 0.3 * metrics["accuracy_manipulated"])
    split = json.loads((root / "metrics/split.json").read_text())
    assert split["device_disjoint"] and metrics["device_disjoint"]
    assert metrics["images"] == split["photos"]["test"] and metrics["full_image"]["photos"] == split["photos"]["test"]
    filtered = json.loads((root / "metrics/filter.json").read_text())
    assert filtered, "the filter stage wrote no summary"
    assert (root / "plots/confusion.png").stat().st_size > 0


def test_champion_loads_and_predicts(project):
    root, env = project
    code = (
        "import mlflow, pandas as pd, json, sys\n"
        "m = mlflow.pyfunc.load_model('models:/camid@champion')\n"
        "img = open(sys.argv[1], 'rb').read()\n"
        "out = m.predict(pd.DataFrame({'image': [img]}))\n"
        "print(json.dumps(out.to_dict(orient='records')))\n"
    )
    sample = next((root / "data/filtered").rglob("*.jpg"))
    out = json.loads(run([sys.executable, "-c", code, str(sample)], root, env).stdout.strip().splitlines()[-1])
    labels = yaml.safe_load((root / "params.yaml").read_text())["catalog"]["virtual"]
    names = [c["label"] for c in labels]
    # a catalog camera, or `unknown` (open set: about 5% of catalog photos by design) with the closest beside it
    assert out[0]["closest_camera"] in names
    assert out[0]["camera"] == ("unknown" if out[0]["unknown"] else out[0]["closest_camera"])
    assert abs(sum(out[0][n] for n in names) - 1) < 1e-6


def jpeg_b64(size=(128, 128), seed=0) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return base64.b64encode(buf.getvalue()).decode()


def png_b64(size) -> str:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(project):
    from camid.serving.server import LocalServer

    root, env = project
    with LocalServer("models:/camid@champion", root / "serve.log", env=env, cwd=root) as url:
        yield url


def invoke(url, payload):
    return requests.post(f"{url}/invocations", json=payload, timeout=120)


def test_serve_answers_split_and_records(server, project):
    root, _ = project
    real_file = next((root / "data/filtered").rglob("*.jpg"))
    real = base64.b64encode(real_file.read_bytes()).decode()
    r = invoke(server, {"dataframe_split": {"columns": ["image", "manipulated"],
                                            "data": [[real, False], [jpeg_b64(), True]]}})
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    assert len(rows) == 2 and rows[0]["manipulated"] is False and rows[1]["manipulated"] is True
    assert not rows[0]["manipulated_estimated"]
    r = invoke(server, {"dataframe_records": [{"image": real}], "params": {"tta": False, "blend": "geometric"}})
    assert r.status_code == 200, r.text
    row = r.json()["predictions"][0]
    assert row["manipulated_estimated"] is True
    from camid.serving.model import STATUS_COLUMNS

    probs = {k: v for k, v in row.items() if k not in STATUS_COLUMNS}
    assert len(probs) == 10 and abs(sum(probs.values()) - 1) < 1e-6 and row["closest_camera"] in probs
    assert row["camera"] == ("unknown" if row["unknown"] else row["closest_camera"])
    assert row["patches"] > 1  # the whole photo, tiled (the default `patches`: auto)
    assert row["exif_camera"] == real_file.parent.name and row["exif_model"]  # the zoo writes EXIF Models
    # the pixels against the EXIF: contradicted only where they give its camera under 5%, outside the group
    exif = real_file.parent.name
    assert row["consistent"] == (exif in row["camera_group"].split(" or ") or probs[exif] >= 0.05)
    assert row["camera_group"].split(" or ")[0] == row["closest_camera"]


@pytest.mark.parametrize("bad, reason", [
    (base64.b64encode(b"definitely not an image").decode(), "not a decodable image"),
    (png_b64((1, 1)), "smaller than the model"),
    (png_b64((20000, 20000)), "over the limit"),
    (base64.b64encode(base64.b64decode(jpeg_b64())[:300]).decode(), "truncated"),
])
def test_serve_rejects_bad_rows_with_400_and_keeps_serving(server, bad, reason):
    r = invoke(server, {"dataframe_records": [{"image": jpeg_b64()}, {"image": bad}]})
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert "row 1" in message and reason in message and "row 0" not in message.split("Error:")[-1]
    assert invoke(server, {"dataframe_records": [{"image": jpeg_b64()}]}).status_code == 200


def test_serve_rejects_missing_column_and_bad_params(server):
    r = invoke(server, {"dataframe_records": [{"picture": jpeg_b64()}]})
    assert r.status_code == 400 and "image" in r.json()["message"]
    r = invoke(server, {"dataframe_records": [{"image": jpeg_b64()}], "params": {"blend": "median"}})
    assert r.status_code == 400 and "blend" in r.json()["message"]


def test_mlflow_run_train_entry_point_makes_one_tracked_run(project):
    """`mlflow run . -e train -P arch=mobilenet`: one finished run of the backbone, tracked with what `mlflow run`
    was given ('' where unset) and what train used, into models/runs (not into DVC's outputs)."""
    root, env = project
    before = set((root / "models/train").iterdir())
    run(["mlflow", "run", ".", "-e", "train", "-P", "arch=mobilenet", "-P", "epochs=1", "-P", "steps_per_epoch=1",
         "-P", "batch_size=2", "--env-manager", "local", "--experiment-name", "camid-mlproject"], root, env)
    code = ("import json, mlflow\n"
            "(run,) = mlflow.search_runs(experiment_names=['camid-mlproject'], output_format='list')\n"
            "print(json.dumps({'status': run.info.status, 'params': run.data.params, 'tags': run.data.tags,\n"
            "                  'metrics': sorted(run.data.metrics)}))\n")
    logged = json.loads(run([sys.executable, "-c", code], root, env).stdout)
    params, tags = logged["params"], logged["tags"]
    assert logged["status"] == "FINISHED" and params["arch"] == "mobilenet"
    assert params["epochs"] == "1" and params["learning_rate"] == "''"
    assert params["train.epochs"] == "1" and float(params["train.learning_rate"]) == 0.001
    assert tags["mlflow.project.entryPoint"] == "train" and tags["git_commit"]
    assert "val_weighted_accuracy" in logged["metrics"]
    assert (root / "models/runs/mobilenet/model.keras").is_file()  # not into DVC's output
    assert set((root / "models/train").iterdir()) == before
    assert "up to date" in run(["dvc", "status"], root, env).stdout.lower()


def test_dvc_reruns_exactly_the_stages_that_read_an_edited_key(project):
    """A key of the inactive catalog re-runs nothing; evaluate.blend only evaluate; a new backbone in
    train.archs adds its own train stage and re-runs evaluate, without retraining the others."""
    root, env = project
    path = root / "params.yaml"
    original = path.read_text()

    def changed_after(edit) -> set[str]:
        params = yaml.safe_load(original)
        edit(params)
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        try:
            status = json.loads(run(["dvc", "status", "--json"], root, env).stdout or "{}")
        finally:
            path.write_text(original)
        return set(status)

    assert changed_after(lambda p: p["catalog"]["kaggle"][0].update(rot90=False)) == set()
    assert changed_after(lambda p: p["evaluate"].update(blend="geometric")) == {"evaluate"}
    assert changed_after(lambda p: p["train"]["archs"].append("mobilenet")) == {"train@mobilenet", "evaluate"}
    assert "up to date" in run(["dvc", "status"], root, env).stdout.lower()


def test_evaluate_predict_and_serving_give_every_test_photo_one_answer(project, server):
    """What is measured is what is served: the evaluate stage's whole-photo answers (plots/test_photos.csv),
    `camid predict --full-image` and /invocations agree on every test photo, verdict and probabilities."""
    import pandas as pd

    root, env = project
    evaluated = pd.read_csv(root / "plots/test_photos.csv", keep_default_na=False)
    labels = [c["label"] for c in yaml.safe_load((root / "params.yaml").read_text())["catalog"]["virtual"]]
    paths = [str(root / p) if not Path(p).is_absolute() else p for p in evaluated.path]
    run([str(BIN / "camid"), "predict", *paths, "--model", "models:/camid@champion", "--full-image",
         "--out", str(root / "answers.csv")], root, env)
    predicted = pd.read_csv(root / "answers.probs.csv", keep_default_na=False)
    r = invoke(server, {"dataframe_split": {"columns": ["image"],
                                            "data": [[base64.b64encode(Path(p).read_bytes()).decode()] for p in paths]}})
    assert r.status_code == 200, r.text
    served = pd.DataFrame(r.json()["predictions"])
    assert len(evaluated) == len(predicted) == len(served) > 0
    for column in ("camera", "closest_camera", "camera_group", "tables_evidence", "patches"):
        assert list(evaluated[column].astype(str)) == list(predicted[column].astype(str)) \
            == list(served[column].astype(str)), column
    for column in ("unknown", "manipulated", "manipulated_estimated", "consistent"):
        as_bool = [list(t[column].astype(str).str.lower() == "true") for t in (evaluated, predicted, served)]
        assert as_bool[0] == as_bool[1] == as_bool[2], column
    for table in (predicted, served):
        np.testing.assert_allclose(table[labels].to_numpy(float), evaluated[labels].to_numpy(float), atol=1e-6)
        np.testing.assert_allclose(table["confidence"].to_numpy(float), evaluated["confidence"].to_numpy(float),
                                   atol=1e-6)
