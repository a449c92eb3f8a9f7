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


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, catalog):
    """A tiny virtual-zoo crop cache (tests/helpers_data.py), built once per session."""
    from tests.helpers_data import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"), catalog)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A trained smallcnn gathered into an ensemble bundle, with its test photos (tests/helpers_model.py)."""
    from camid.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), register=False)


@pytest.fixture(scope="session")
def registered_model(tiny_model):
    """The tiny model registered as the camid pyfunc in its own tracking store."""
    from camid.tiny import register_tiny_model

    return tiny_model if tiny_model.model_uri else register_tiny_model(tiny_model)
