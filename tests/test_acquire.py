"""`camid acquire`: the DVC stage builds the raw folder from whichever source params.yaml names."""
from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from camid.stages.acquire import acquire
from camid.stages.acquire.flickr import MANIFEST
from camid.cli import main
from camid.config import ConfigError, load_params
from tests.fake_flickr import FakeFlickr, camera_photos, make_jpeg, write_params

KEY = "acquire-test-key"


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_synthetic_calls_the_synthesizer(tmp_path, monkeypatch):
    params = load_params(write_params(tmp_path / "params.yaml"))
    calls = []
    fake_synth = types.ModuleType("camid.data.synth")
    fake_synth.synthesize = lambda out, catalog, synth, progress: calls.append((out, catalog, synth, progress))
    monkeypatch.setitem(sys.modules, "camid.data.synth", fake_synth)
    acquire(tmp_path / "raw", params, progress=False)
    assert calls == [(tmp_path / "raw", params.catalog, params.synth, False)]


def test_folder_source_ingests_acquire_folder(tmp_path, monkeypatch):
    src = tmp_path / "kaggle"
    (src / "train" / "Boreal-B7").mkdir(parents=True)
    (src / "train" / "Boreal-B7" / "a.jpg").write_bytes(make_jpeg(24, 32))
    monkeypatch.setenv("CAMID_PARAMS", str(write_params(tmp_path / "params.yaml", source="folder", folder=str(src))))
    assert main(["acquire", "--out", str(tmp_path / "raw")]) == 0
    assert files(tmp_path / "raw") == {"train/Boreal-B7/a.jpg"}


@pytest.mark.parametrize("folder, says", [("", "acquire.folder '' is empty"),
                                          ("missing", "acquire.folder 'missing' is not a folder"),
                                          ("empty", "holds no photos")])
def test_folder_source_without_photos_says_to_set_acquire_folder(tmp_path, monkeypatch, capsys, folder, says):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAMID_PARAMS", str(write_params(tmp_path / "params.yaml", source="folder", folder=folder)))
    assert main(["acquire", "--out", "raw"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("camid acquire: error: ") and "acquire.folder" in err and says in err


def test_flickr_source_crawls_into_out_and_replaces_another_sources_output(tmp_path, monkeypatch):
    params = load_params(write_params(tmp_path / "params.yaml", source="flickr", flickr={"max_per_camera": 2}))
    cam = params.catalog.cameras[0]
    out = tmp_path / "raw"
    (out / "train" / "Gale-G4").mkdir(parents=True)
    (out / "train" / "Gale-G4" / "synthetic.jpg").write_bytes(b"left by the synthetic source")
    monkeypatch.setenv("FLICKR_API_KEY", KEY)
    with FakeFlickr(camera_photos(cam, 3), api_key=KEY) as fake:
        flickr = replace(params.acquire.flickr, api_url=fake.api_url, image_host=fake.image_host)
        acquire(out, replace(params, acquire=replace(params.acquire, flickr=flickr)), progress=False)
    assert files(out) == {MANIFEST, f"train/{cam.label}/1000.jpg", f"train/{cam.label}/1001.jpg"}


def test_unknown_source(tmp_path):
    params = load_params(write_params(tmp_path / "params.yaml", source="instagram"))
    with pytest.raises(ConfigError, match="choose one of synthetic, folder, flickr"):
        acquire(tmp_path / "raw", params)
