"""The register stage: the champion alias moves only for a better (or equal) score on the same test data and
labels; the served model's requirements come from what its code imports; `--runs` scores only runs that never
trained on the test photos."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

from camid.errors import CamidError
from camid.stages.register import alias_decision, champion

SAME = {"test_data": "abc123", "labels": "A,B"}


def candidate(score, **kw):
    return {"score": score, **SAME, **kw}


def holder(score, **kw):
    return {"version": "3", "score": score, **SAME, **kw}


@pytest.mark.parametrize("new, old, moves", [
    (0.80, 0.70, True),      # better
    (0.60, 0.70, False),     # worse
    (0.70, 0.70, True),      # tied: the newer model scored as well on the same photos
])
def test_scores_on_the_same_test_data_are_compared(new, old, moves):
    moved, why = alias_decision(candidate(new), holder(old))
    assert moved is moves and "same test data" in why


def test_a_first_model_becomes_champion():
    assert alias_decision(candidate(0.1), None) == (True, "no champion yet")


def test_a_nan_or_missing_score_never_wins():
    for bad in (math.nan, None):
        moved, why = alias_decision(candidate(bad), holder(0.1))
        assert not moved and "no valid test score" in why
        assert not alias_decision(candidate(bad), None)[0]


def test_a_champion_without_a_valid_score_is_replaced():
    assert alias_decision(candidate(0.5), holder(None))[0]
    assert alias_decision(candidate(0.5), holder(math.nan))[0]


def test_scores_on_other_test_data_or_labels_are_not_compared():
    moved, why = alias_decision(candidate(0.99), holder(0.1, test_data="other"))
    assert not moved and "other test data" in why and "--promote" in why
    moved, why = alias_decision(candidate(0.99), holder(0.1, test_data=None))  # an old version without the tag
    assert not moved and "other test data" in why
    moved, why = alias_decision(candidate(0.99), holder(0.1, labels="A,B,C"))
    assert not moved and "other cameras" in why


class _Client:
    """A stand-in tracking client that fails the way a real store does."""

    def __init__(self, error_code):
        self.error_code = error_code

    def get_registered_model(self, name):
        raise MlflowException("the store says no", error_code=self.error_code)


def test_no_registered_model_means_no_champion_but_a_store_error_is_an_error():
    assert champion(_Client(RESOURCE_DOES_NOT_EXIST), "camid", "champion") is None
    with pytest.raises(CamidError, match="cannot read the 'champion' alias"):
        champion(_Client(INTERNAL_ERROR), "camid", "champion")


def test_champion_reads_the_alias_holder_from_a_real_store(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("camid")
    assert champion(client, "camid", "champion") is None  # a model, but no alias yet
    version = client.create_model_version("camid", source=str(tmp_path))
    for key, value in {"weighted_accuracy": "0.75", "test_data": "abc123", "labels": "A,B"}.items():
        client.set_model_version_tag("camid", version.version, key, value)
    client.set_registered_model_alias("camid", "champion", version.version)
    assert champion(client, "camid", "champion") == {"version": str(version.version), "score": 0.75, **SAME}


# -- the served model's requirements -----------------------------------------------------------------------------

def _dist_name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def requirement_closure(requirements: list[str]) -> set[str]:
    """The distributions pip installs for `requirements`: them and, transitively, what they require (markers
    evaluated here, extras followed), by canonical name; plus what a fresh venv starts with."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    found, todo = {"pip", "setuptools", "wheel"}, [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        extras = set(req.extras)
        key = (name, frozenset(extras))
        if key in found:
            continue
        found |= {name, key}
        try:
            deps = requires(req.name) or []
        except PackageNotFoundError:
            continue
        for text in deps:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append(dep)
    return {n for n in found if isinstance(n, str)}


def unrequired(modules, requirements: list[str]) -> dict[str, list[str]]:
    """The distributions of `modules` (top-level names, third-party) that `requirements` would not install."""
    import sys

    from camid.core.imports import distributions_of

    have = requirement_closure(requirements)
    missing = {}
    for module in sorted(modules):
        if module.split(".")[0] in sys.stdlib_module_names or module.startswith(("camid", "__editable__")):
            continue
        for dist in distributions_of(module):
            if _canonical(dist) not in have and _canonical(dist) != "camid":
                missing.setdefault(dist, []).append(module)
    return missing


def test_serving_requirements_name_what_the_serving_code_imports_pinned_to_the_installed_versions():
    from importlib.metadata import version

    from camid.stages.register import serving_requirements

    reqs = serving_requirements()
    names = {_canonical(_dist_name(r)) for r in reqs}
    # ruamel.yaml: camid.config, which the ensemble imports lazily for the EXIF check (the fresh-venv failure)
    assert {"ruamel-yaml", "mlflow", "uvicorn", "keras", "tensorflow", "numpy", "pandas", "pillow", "scipy"} <= names
    assert not names & {"camid", "jax", "torch", "dvc", "pytest", "keras-tuner"}  # shipped as code, other backends, not served
    for req in reqs:
        name, _, pin = req.partition("==")
        assert pin == version(name), req


def test_a_third_party_import_on_the_serving_path_is_in_the_requirements(monkeypatch):
    """A new import anywhere in the closure, even inside a function, is derived into the requirements."""
    from camid.core import imports
    from camid.stages import register

    real = imports.third_party_imports

    def plus_one(file, *args, **kw):  # as if camid/inference/ensemble.py imported yaml in some function
        found = real(file, *args, **kw)
        return found | {"yaml"} if file.name == "ensemble.py" else found

    monkeypatch.setattr(imports, "third_party_imports", plus_one)
    assert "PyYAML" in {_dist_name(r) for r in register.serving_requirements()}


def test_an_import_nothing_installed_provides_is_an_error_naming_the_module_and_file(monkeypatch):
    from camid.core import imports
    from camid.stages import register

    real = imports.third_party_imports
    monkeypatch.setattr(imports, "third_party_imports", lambda file, *a, **kw: real(file, *a, **kw)
                        | ({"no_such_dist_xyz.sub"} if file.name == "model.py" else set()))
    with pytest.raises(CamidError, match=r"no_such_dist_xyz.sub \(in camid/serving/model.py\).*Install"):
        register.serving_distributions()


def test_the_import_closure_follows_function_level_and_relative_imports(tmp_path):
    from camid.core.imports import closure, closure_imports

    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "top.py").write_text("import numpy\n\ndef later():\n    from .sub import lazy\n")
    (pkg / "sub" / "lazy.py").write_text("import json\n\ndef f():\n    import ruamel.yaml\n    from PIL import Image\n")
    files = closure("pkg.top", root=tmp_path, package="pkg")
    assert {f.relative_to(tmp_path).as_posix() for f in files} == {
        "pkg/__init__.py", "pkg/top.py", "pkg/sub/__init__.py", "pkg/sub/lazy.py"}
    assert set(closure_imports("pkg.top", root=tmp_path, package="pkg")) == {"numpy", "ruamel.yaml", "PIL"}


def test_the_hand_written_list_would_have_been_caught():
    """What the old SERVING_REQUIREMENTS missed, the check below finds: ruamel.yaml (camid.config)."""
    from camid.core.imports import closure_imports
    from camid.stages.register import SERVING_MODULES

    old = ["tensorflow", "keras", "mlflow", "pillow", "numpy", "pandas", "scipy", "uvicorn"]
    assert "ruamel.yaml" in unrequired(closure_imports(*SERVING_MODULES), old)


# Runs in a fresh interpreter: records every module camid's own code imports (import statements, importlib), then
# loads the logged pyfunc and answers a photo with it.
_RECORD_IMPORTS = """
import builtins, importlib, json, sys
seen = {}
real_import, real_import_module = builtins.__import__, importlib.import_module

def from_camid(module_globals):
    return str((module_globals or {}).get("__name__", "")).split(".")[0] == "camid"

def hook(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and from_camid(globals):
        seen.setdefault(name, globals["__name__"])
    return real_import(name, globals, locals, fromlist, level)

def import_module(name, package=None):
    caller = sys._getframe(1).f_globals
    if not name.startswith(".") and from_camid(caller):
        seen.setdefault(name, caller["__name__"])
    return real_import_module(name, package)

builtins.__import__, importlib.import_module = hook, import_module
import pandas as pd
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"image": [open(sys.argv[2], "rb").read()]}))
assert out["error"].iloc[0] == "", out["error"].iloc[0]
print("IMPORTS " + json.dumps(seen))
"""


def test_everything_the_served_models_code_imports_when_it_answers_is_in_its_requirements(registered_model):
    """Load the logged pyfunc in a fresh interpreter and answer a photo; every third-party module camid's code
    imported on the way (import statements and importlib alike) must come from a distribution its
    requirements.txt installs, directly or as a dependency. This catches what reading the source cannot."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    requirements = (Path(registered_model.local_uri) / "requirements.txt").read_text().split()
    assert any(r.startswith("ruamel.yaml==") for r in requirements)
    done = subprocess.run([sys.executable, "-c", _RECORD_IMPORTS, registered_model.local_uri,
                           str(registered_model.test.path.iloc[0])], capture_output=True, text=True, timeout=300,
                          cwd=registered_model.root, env=registered_model.env())
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("IMPORTS "))[len("IMPORTS "):])
    assert "ruamel.yaml" in imported and "keras" in imported  # the EXIF check's camid.config; the members
    missing = unrequired(imported, requirements)
    assert not missing, (f"the served model's code imports {missing} (from {[imported[m] for ms in missing.values() for m in ms]})"
                         " but its requirements.txt does not install them")


# -- register() and `register --runs` ----------------------------------------------------------------------------

def _fake_bundle(root, labels=("A", "B")):
    from camid.core.fileio import write_json

    bundle = root / "bundle"
    (bundle / "members").mkdir(parents=True)
    write_json(bundle / "ensemble.json", {"labels": list(labels), "patch": 64, "views": [0], "blend": "mean_square",
                                          "members": [{"arch": "smallcnn", "file": "members/smallcnn.keras"}]})
    return bundle


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "camid-tests")
    return uri


def test_a_first_model_without_a_valid_score_is_registered_but_holds_no_alias(tmp_path, store):
    import mlflow
    from mlflow import MlflowClient

    from camid.stages.register import register, summary_text
    from camid.core.fileio import write_json

    bundle = _fake_bundle(tmp_path)
    for evaluation in ({"weighted_accuracy": math.nan}, {}):
        record = register(bundle, evaluation, "camid", "champion")
        assert record["champion_moved"] is False and record["champion_version"] is None
        assert record["previous_champion"] is None and "no valid test score" in record["alias_reason"]
        write_json(tmp_path / "registered.json", record)
        text = summary_text(tmp_path / "registered.json", tmp_path / "no-metrics.json")
        assert "-> no version" in text and f"serve:   mlflow models serve -m {record['model_uri']}" in text
    assert "champion" not in MlflowClient(tracking_uri=store).get_registered_model("camid").aliases
    mlflow.set_tracking_uri(store)
    logged = mlflow.artifacts.download_artifacts(artifact_uri=record["model_uri"], dst_path=str(tmp_path / "dl"))
    requirements = (Path(logged) / "requirements.txt").read_text().split()  # what register logged: the derived list
    assert any(r.startswith("ruamel.yaml==") for r in requirements) and any(r.startswith("uvicorn==") for r in requirements)


def _cache(root, train_photos, test_photos, labels=("A", "B")):
    """A crop cache's metadata and indexes (no crops: the checks read only these)."""
    import pandas as pd

    from camid.core.fileio import write_json

    cache = root / "cache"
    for split, photos in (("train", train_photos), ("test", test_photos)):
        (cache / split).mkdir(parents=True)
        rows = []
        for i, (name, label) in enumerate(photos):
            path = root / "photos" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.write_bytes(name.encode() * 10)
            rows.append({"image": i, "path": str(path), "label": label})
        pd.DataFrame(rows).to_parquet(cache / split / "index.parquet")
    write_json(cache / "meta.json", {"labels": list(labels), "patch": 64})
    return cache


def _run(store, **tags):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("camid-tests") or client.get_experiment(
        client.create_experiment("camid-tests"))
    run = client.create_run(experiment.experiment_id, tags=tags)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_runs_are_scored_only_if_they_trained_on_this_caches_train_split(tmp_path, store):
    from camid import tracking
    from camid.data.cache import split_fingerprint
    from camid.stages.register import check_runs_unseen

    cache = _cache(tmp_path, [("a1.jpg", "A"), ("b1.jpg", "B")], [("a9.jpg", "A"), ("b9.jpg", "B")])
    ours = split_fingerprint(cache, "train", ["A", "B"])
    check_runs_unseen([_run(store, train_data=ours)], cache)                            # this very train split
    check_runs_unseen([_run(store, data_version=tracking.data_version(cache))], cache)  # this very cache
    with pytest.raises(CamidError, match="trained on other photos than the train split.*--cache.*camid train"):
        check_runs_unseen([_run(store, train_data=ours), _run(store, train_data="0123456789abcdef")], cache)
    with pytest.raises(CamidError, match="another crop cache.*--cache.*camid train"):
        check_runs_unseen([_run(store, data_version="feedface.dir")], cache)
    with pytest.raises(CamidError, match="records neither.*camid train"):
        check_runs_unseen([_run(store)], cache)
    with pytest.raises(CamidError, match="cannot read MLflow run nope"):
        check_runs_unseen(["nope"], cache)


def test_a_cache_whose_train_and_test_splits_share_photos_is_refused(tmp_path, store):
    from camid.stages.register import check_runs_unseen

    cache = _cache(tmp_path, [("a1.jpg", "A"), ("b1.jpg", "B")], [("a1.jpg", "A")])
    with pytest.raises(CamidError, match="both its train and test splits.*Re-run the split and prepare"):
        check_runs_unseen([_run(store, train_data="x")], cache)


def test_register_runs_refuses_before_fetching_or_scoring(tmp_path, store, monkeypatch):
    import argparse

    from camid.stages import register
    from tests.conftest import ROOT

    monkeypatch.setenv("CAMID_PARAMS", str(ROOT / "params.yaml"))
    monkeypatch.setattr(register, "bundle_from_runs", lambda *a: pytest.fail("fetched a run that was refused"))
    cache = _cache(tmp_path, [("a1.jpg", "A")], [("a9.jpg", "A")])
    args = argparse.Namespace(summary=False, bundle=tmp_path / "bundle", runs=[_run(store)], evaluation=None,
                              cache=cache, out=tmp_path / "registered.json", promote=False)
    with pytest.raises(CamidError, match="records neither"):
        register.run(args)
