"""`camid profile`: a named profile is written into params.yaml's active blocks, comments kept, atomically."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from camid.config import load_params
from camid.errors import CamidError
from camid.tools.profile import apply_profile, set_params
from tests.conftest import ROOT


@pytest.fixture
def params(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def test_the_kaggle_profile_sets_its_keys_and_keeps_the_comments(params):
    before = params.read_text()
    changed = apply_profile("kaggle", params)
    loaded = load_params(params)
    assert changed["train.patch"] == (64, 512) and loaded.train.patch == 512
    assert loaded.catalog.name == "kaggle" and len(loaded.catalog) == 10
    assert loaded.train.learning_rate == 1e-4 and isinstance(loaded.train.learning_rate, float)
    comments = [line for line in before.splitlines() if line.lstrip().startswith("#")]
    assert all(c in params.read_text() for c in comments)
    untouched = load_params(ROOT / "params.yaml")
    assert loaded.filter == untouched.filter and loaded.split == untouched.split  # keys outside the profile kept


def test_a_value_that_does_not_load_leaves_params_yaml_untouched(params):
    before = params.read_text()
    with pytest.raises(CamidError, match="train.patch"):
        set_params({"train.patch": "big"}, params)
    with pytest.raises(CamidError, match="no section"):
        set_params({"nosuch.key": 1}, params)
    with pytest.raises(CamidError, match="no profile 'paper'.*kaggle"):
        apply_profile("paper", params)
    assert params.read_text() == before
    assert sorted(p.name for p in params.parent.iterdir()) == ["params.yaml"]


def test_the_cli_prints_each_change(params):
    out = subprocess.run([sys.executable, "-m", "camid", "profile", "kaggle", "--params", str(params)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train.epochs: 14 -> 100" in out.stdout
