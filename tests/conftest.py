"""Shared fixtures: every test runs against real files it makes itself."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@pytest.fixture(scope="session")
def params():
    from camid.config import load_params

    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def catalog(params):
    return params.catalog
