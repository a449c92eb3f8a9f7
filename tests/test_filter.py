"""The filter stage: each rule rejects the file it should, good photos are kept and linked, runs are deterministic."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from camid.config import Camera, Catalog
from camid.errors import CamidError
from camid.stages.filter import MANIFEST, REASONS, filter_raw

CATALOG = Catalog("test", (
    Camera("Boreal-B7", "Boreal", ("B7", "B7 Pro"), ((320, 240),), rot90=False),
    Camera("Corvid-C3", "Corvid", ("C3-*",), ((256, 352),), rot90=True),
))


def photo(seed: int, width: int, height: int) -> Image.Image:
    """Distinct content per seed (so perceptual hashes differ), smooth plus grain like a photo."""
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    grain = rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(smooth) + grain, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, model: str | None = "B7", quality: int = 95, software: str = "B7 fw 1.2",
         exif_size: tuple[int, int] | None = None, make: str = "Boreal") -> bytes:
    options = {"quality": quality}
    if model is not None:
        exif = Image.Exif()
        exif[0x010F], exif[0x0110], exif[0x0131] = make, model, software
        width, height = exif_size or image.size
        exif.get_ifd(0x8769).update({0xA002: width, 0xA003: height})
        options["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


# file name -> expected reason; every rule has one file that breaks it and only it
EXPECTED = {
    "Boreal-B7/a_good.jpg": "kept",
    "Boreal-B7/b_good_landscape.jpg": "kept",
    "Boreal-B7/c_good_pro.jpg": "kept",
    "Boreal-B7/d_exact_copy.jpg": "duplicate",
    "Boreal-B7/e_resaved.jpg": "near_duplicate",
    "Boreal-B7/f_truncated.jpg": "truncated",
    "Boreal-B7/g_wrong_model.jpg": "wrong_model",
    "Boreal-B7/h_stripped.jpg": "no_exif_model",
    "Boreal-B7/i_cropped.jpg": "not_native_size",
    "Boreal-B7/j_resized.jpg": "exif_size_mismatch",
    "Boreal-B7/k_recompressed.jpg": "low_quality",
    "Boreal-B7/l_photoshopped.jpg": "edited",
    "Boreal-B7/m_png.jpg": "not_jpeg",
    "Boreal-B7/n_empty.jpg": "empty",
    "Boreal-B7/o_text.jpg": "not_image",
    "Corvid-C3/a_good.jpg": "kept",
    "Corvid-C3/sub/b_good_rotated.jpg": "kept",
    "Corvid-C3/c_copy_of_boreal.jpg": "wrong_model",  # the rules on the file itself come first
    "Corvid-C3/d_exact_copy.jpg": "duplicate",
}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    portrait = photo(1, 240, 320)
    good = jpeg(portrait)
    png = io.BytesIO()
    photo(9, 240, 320).save(png, "PNG")
    data = {
        "Boreal-B7/a_good.jpg": good,
        "Boreal-B7/b_good_landscape.jpg": jpeg(photo(2, 320, 240)),
        "Boreal-B7/c_good_pro.jpg": jpeg(photo(3, 240, 320), model="B7 Pro"),
        "Boreal-B7/d_exact_copy.jpg": good,
        "Boreal-B7/e_resaved.jpg": jpeg(portrait, make="BOREAL"),  # same pixels, other metadata
        "Boreal-B7/f_truncated.jpg": jpeg(photo(4, 240, 320))[:6000],
        "Boreal-B7/g_wrong_model.jpg": jpeg(photo(5, 240, 320), model="C3-1"),
        "Boreal-B7/h_stripped.jpg": jpeg(photo(6, 240, 320), model=None),
        "Boreal-B7/i_cropped.jpg": jpeg(photo(7, 232, 320)),
        "Boreal-B7/j_resized.jpg": jpeg(photo(8, 240, 320), exif_size=(480, 640)),
        "Boreal-B7/k_recompressed.jpg": jpeg(photo(10, 240, 320), quality=80),
        "Boreal-B7/l_photoshopped.jpg": jpeg(photo(11, 240, 320), software="Adobe Photoshop CC 2017 (Windows)"),
        "Boreal-B7/m_png.jpg": png.getvalue(),
        "Boreal-B7/n_empty.jpg": b"",
        "Boreal-B7/o_text.jpg": b"not an image\n",
        "Corvid-C3/a_good.jpg": jpeg(photo(12, 352, 256), model="C3-2"),
        "Corvid-C3/sub/b_good_rotated.jpg": jpeg(photo(13, 256, 352), model="C3-2"),
        "Corvid-C3/c_copy_of_boreal.jpg": good,
        "Corvid-C3/d_exact_copy.jpg": jpeg(photo(12, 352, 256), model="C3-2"),
    }
    for name, content in data.items():
        path = root / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


@pytest.fixture(scope="module")
def filter_params(params):
    return params.filter  # the editors list and thresholds from params.yaml


@pytest.fixture(scope="module")
def result(raw, filter_params, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "filtered"
    metrics = out.parent / "metrics" / "filter.json"
    manifest = filter_raw(raw, out, CATALOG, filter_params, metrics_path=metrics, progress=False)
    return out, manifest, json.loads(metrics.read_text())


def test_each_rule_rejects_its_file_and_good_photos_are_kept(result):
    _, manifest, _ = result
    got = dict(zip(manifest["path"].str.removeprefix("train/"), manifest["reason"]))
    assert got == EXPECTED
    assert set(manifest["reason"]) <= set(REASONS)
    copy = manifest.set_index("path").loc["train/Boreal-B7/d_exact_copy.jpg"]
    assert copy["duplicate_of"] == "Boreal-B7/a_good.jpg"


def test_kept_files_are_hard_links_and_manifest_is_complete(result, raw):
    out, manifest, _ = result
    kept = manifest[manifest["kept"]]
    assert sorted(kept["kept_path"]) == sorted(p for p, r in EXPECTED.items() if r == "kept")
    for row in kept.itertuples():
        assert (out / row.kept_path).stat().st_ino == (raw / row.path).stat().st_ino
    assert manifest[~manifest["kept"]]["kept_path"].isna().all()
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([*kept["kept_path"], MANIFEST])
    on_disk = pd.read_parquet(out / MANIFEST)
    assert on_disk.columns[:7].tolist() == ["path", "label", "kept", "reason", "detail", "kept_path", "duplicate_of"]
    assert {"quality", "model", "sha256", "phash", "error", "edit_reason"} <= set(on_disk.columns)
    assert len(on_disk) == len(EXPECTED) and not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def test_metrics_count_cameras_and_reasons(result):
    _, _, metrics = result
    assert (metrics["files"], metrics["kept"]) == (19, 5)
    assert metrics["cameras"]["Boreal-B7"]["kept"] == 3 and metrics["cameras"]["Corvid-C3"]["files"] == 4
    assert metrics["reasons"]["duplicate"] == 2 and set(metrics["reasons"]) == set(REASONS)


def test_deterministic_and_replaces_output(result, raw, filter_params):
    out, manifest, _ = result
    again = filter_raw(raw, out, CATALOG, filter_params, progress=False, workers=2)
    pd.testing.assert_frame_equal(again, manifest)


def test_copies_when_links_are_impossible(raw, filter_params, tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    manifest = filter_raw(raw, tmp_path / "out", CATALOG, filter_params, progress=False)
    kept = manifest[manifest["kept"]].iloc[0]
    assert (tmp_path / "out" / kept["kept_path"]).read_bytes() == (raw / kept["path"]).read_bytes()


def test_layout_errors_are_clear(raw, filter_params, tmp_path):
    with pytest.raises(CamidError, match="train/<label>"):
        filter_raw(tmp_path, tmp_path / "out", CATALOG, filter_params, progress=False)
    strange = tmp_path / "raw"
    shutil.copytree(raw, strange)
    (strange / "train" / "Nokia-3310").mkdir()
    with pytest.raises(CamidError, match="Nokia-3310"):
        filter_raw(strange, tmp_path / "out", CATALOG, filter_params, progress=False)


def test_near_duplicate_threshold_is_the_param(raw, filter_params, tmp_path):
    strict = dataclasses.replace(filter_params, phash_max_distance=0)
    manifest = filter_raw(raw, tmp_path / "out", CATALOG, strict, progress=False)
    assert manifest.set_index("path").loc["train/Boreal-B7/e_resaved.jpg", "reason"] == "kept"


def test_rejects_exactly_the_synthetic_zoos_bad_files(params, tmp_path):
    synth = pytest.importorskip("camid.data.synth")
    zoo = tmp_path / "zoo"
    synth_params = dataclasses.replace(params.synth, images_per_device=2, bad_fraction=0.3)
    catalog = Catalog(params.catalog.name, params.catalog.cameras[:5])
    truth = synth.synthesize(zoo, catalog, synth_params, progress=False)
    manifest = filter_raw(zoo, tmp_path / "out", catalog, params.filter, progress=False)
    joined = truth.merge(manifest, left_on="file", right_on="path", validate="one_to_one")
    assert len(joined) == len(truth) and (joined["bad"] != "").any()
    bad_kind = joined["bad"].fillna("").str.partition(":")[0]
    expected = {"": "kept", "edited": "edited", "recompressed": "low_quality", "resized": "exif_size_mismatch",
                "stripped": "no_exif_model", "truncated": "truncated", "duplicate": "duplicate"}
    assert (bad_kind.map(expected) == joined["reason"]).all(), joined[["file", "bad", "reason", "detail"]]
