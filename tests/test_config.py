"""params.yaml's typed loader: values are what their keys say, and a wrong one is a clear error."""
from __future__ import annotations

import pytest
import yaml

from camid.config import ConfigError, load_params
from tests.conftest import ROOT


def write(tmp_path, edit) -> str:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_the_project_params_load_with_their_types():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params.train.learning_rate, float) and isinstance(params.train.epochs, int)
    assert params.train.dense == (128,) and params.filter.editors and params.catalog.name == "virtual"
    assert isinstance(params.acquire.flickr.timeout_s, float)


def test_a_float_written_1e_4_by_hand_is_a_float(tmp_path):
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text().replace("  learning_rate: 0.001\n", "  learning_rate: 1e-4\n", 1)
    assert "learning_rate: 1e-4" in text
    path.write_text(text)
    assert yaml.safe_load(text)["train"]["learning_rate"] == "1e-4"  # YAML 1.1 reads it as a string ...
    assert load_params(path).train.learning_rate == pytest.approx(1e-4)  # ... camid as the float it means


@pytest.mark.parametrize("section, key, value, words", [
    ("train", "epochs", "ten", "train.epochs is 'ten'"),
    ("train", "epochs", 2.5, "must be int"),
    ("train", "epochs", True, "must be int"),
    ("train", "dense", [128, "wide"], "train.dense[1]"),
    ("evaluate", "tta", "yes", "evaluate.tta"),
    ("filter", "min_quality", "high", "filter.min_quality"),
    ("split", "test_fraction", "a quarter", "split.test_fraction"),
])
def test_a_value_of_the_wrong_type_names_its_key(tmp_path, section, key, value, words):
    path = write(tmp_path, lambda p: p[section].__setitem__(key, value))
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_params(path)


def test_unknown_keys_and_catalogs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*learnin_rate"):
        load_params(write(tmp_path, lambda p: p["train"].__setitem__("learnin_rate", 0.1)))
    with pytest.raises(ConfigError, match="no such catalog"):
        load_params(write(tmp_path, lambda p: p["catalog"].__setitem__("active", "nikon")))
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_every_default_in_config_is_the_value_in_params_yaml():
    """A default is defined once: config.py's dataclass defaults (used when a params file leaves a key out) are
    exactly the values of the project's params.yaml, so the two can never tell different stories."""
    import dataclasses

    from camid import config

    params = config.load_params(ROOT / "params.yaml")
    differ = []
    for section in dataclasses.fields(config.Params):
        cls = section.type if isinstance(section.type, type) else getattr(config, str(section.type), None)
        if not dataclasses.is_dataclass(cls) or section.name == "catalog":
            continue
        default = cls()
        for f in dataclasses.fields(cls):
            if f.name in ("pipelines", "editors"):  # tables (zoo pipelines, editor names): params.yaml only
                continue
            want, have = getattr(params, section.name), default
            if dataclasses.is_dataclass(getattr(want, f.name)):  # acquire.flickr
                for g in dataclasses.fields(getattr(want, f.name)):
                    if getattr(getattr(want, f.name), g.name) != getattr(getattr(have, f.name), g.name):
                        differ.append(f"{section.name}.{f.name}.{g.name}")
            elif getattr(want, f.name) != getattr(have, f.name):
                differ.append(f"{section.name}.{f.name}: params.yaml {getattr(want, f.name)!r}, "
                              f"config.py {getattr(have, f.name)!r}")
    assert not differ, differ
