"""The champion installs: a fresh virtualenv built from nothing but the registered model's own requirements.txt
loads it and answers a real JPEG (bench/serving_env.py does the work and prints the timings).

Slow (a few minutes: pip installs TensorFlow and MLflow into the venv), so excluded from `make test`; run with
`pytest -m slow tests/test_serving_env.py`. Needs the package index pip is configured with (or its cache)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_registered_model_loads_and_answers_in_a_venv_built_only_from_its_requirements(registered_model,
                                                                                          tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "serving_env.py"), "--model", registered_model.local_uri,
                           "--venv", str(tmp_path / "venv"), "--json", str(out)],
                          capture_output=True, text=True, timeout=1800)
    print(done.stdout)
    result = json.loads(out.read_text())
    assert done.returncode == 0 and result["ok"], result.get("failure", done.stderr[-3000:])
    assert result["error"] == "" and result["camera"] in registered_model.labels + ["unknown"]
    assert result["camid_shipped_with_the_model"]  # the venv has no camid but the model's own code/
    assert 0.0 <= result["confidence"] <= 1.0
