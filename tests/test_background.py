"""Background cameras: photos of other camera models, trained as a class of their own and never an answer
(issue 20's pixel ground with one reference device per model). Real JPEGs for the catalog, the tiny trained zoo
model for the answers and the evaluate stage's fit."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from camid.config import ConfigError, load_params
from camid.errors import CamidError
from camid.inference.answers import answers, score_photos
from camid.inference.ensemble import Ensemble
from camid.inference.metadata import metadata_check
from camid.inference.openset import UNKNOWN
from tests.test_catalog import jpeg, params_file, run_catalog  # noqa: F401  (params_file: a fixture)
from tests.test_openset import one_device_cache


def test_catalog_from_folder_marks_background_folders_and_the_params_load(tmp_path, params_file, capsys):  # noqa: F811
    for serial in ("S1", "S2", "S3"):
        jpeg(tmp_path / "photos" / "Cam-A" / serial / "a.jpg", "A1", serial=serial)
    for model in ("X1", "Y2", "Z3"):
        jpeg(tmp_path / "photos" / "Others" / model / "o.jpg", model, make="Other Co")
    entries = run_catalog(tmp_path / "photos", params_file, background=("Others",), minutes=None)
    assert [e.get("background", False) for e in entries] == [False, True]
    out = capsys.readouterr().out
    assert "Others (background)" in out and "photos of 3 other camera model(s)" in out
    assert "Others's reference is one device" not in out  # device notes are for catalog cameras
    assert "warning: Others holds 3 other camera model(s), fewer than 20" in out  # too few: said, not refused
    catalog = load_params(params_file).catalog
    assert [(c.label, c.background) for c in catalog.cameras] == [("Cam-A", False), ("Others", True)]
    assert "background: true" in params_file.read_text()
    with pytest.raises(CamidError, match="no such camera folder"):
        run_catalog(tmp_path / "photos", params_file, name="two", background=("Nobody",), minutes=None)
    with pytest.raises(CamidError, match="at least one folder must be a camera"):
        run_catalog(tmp_path / "photos", params_file, name="three", background=("Cam-A", "Others"), minutes=None)
    text = params_file.read_text().replace('{label: "Cam-A"', '{background: true, label: "Cam-A"') \
        .replace("{label: Cam-A", "{background: true, label: Cam-A")
    assert "background: true, label: Cam-A" in text
    params_file.write_text(text)
    with pytest.raises(ConfigError, match="only background cameras"):
        load_params(params_file)


def test_a_background_of_enough_models_gets_no_warning(tmp_path, params_file, capsys):  # noqa: F811
    from camid.tools.catalog import MIN_BACKGROUND_MODELS

    for serial in ("S1", "S2", "S3"):
        jpeg(tmp_path / "photos" / "Cam-A" / serial / "a.jpg", "A1", serial=serial)
    for k in range(MIN_BACKGROUND_MODELS):
        jpeg(tmp_path / "photos" / "Others" / f"m{k}" / "o.jpg", f"M{k}", make="Other Co")
    run_catalog(tmp_path / "photos", params_file, background=("Others",), minutes=None)
    out = capsys.readouterr().out
    assert f"photos of {MIN_BACKGROUND_MODELS} other camera model(s)" in out and "fewer than" not in out


def test_the_cli_takes_background_folders_and_refuses_an_unknown_one(tmp_path, params_file):  # noqa: F811
    import subprocess
    import sys

    from tests.helpers_data import subprocess_env

    for serial in ("S1", "S2", "S3"):
        jpeg(tmp_path / "photos" / "Cam-A" / serial / "a.jpg", "A1", serial=serial)
    jpeg(tmp_path / "photos" / "others" / "x1" / "o.jpg", "X1", make="Other Co")

    def catalog(*extra):
        return subprocess.run([sys.executable, "-m", "camid", "catalog", "from-folder", "photos", "--name", "mine",
                               "--workers", "1", "--keep-train", *extra], cwd=tmp_path, capture_output=True, text=True,
                              env=subprocess_env({"CAMID_PARAMS": str(params_file)}), timeout=120)

    refused = catalog("--background", "nobody")
    assert refused.returncode == 2 and "--background nobody: no such camera folder" in refused.stderr
    done = catalog("--background", "others")
    assert done.returncode == 0, done.stderr
    assert "others (background)" in done.stdout
    assert [c.background for c in load_params(params_file).catalog.cameras] == [False, True]


def test_the_exif_check_never_names_a_background_camera():
    """EXIF naming a background camera's model names no catalog camera; where the pixels also put the photo with
    the background cameras, the two agree (consistent), and where they point to a catalog camera, they do not."""
    cameras = [{"label": "Cam-A", "models": ["A1"]}, {"label": "Others", "models": ["X1", "Y2"], "background": True}]
    labels = ["Cam-A", "Others"]
    probs = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    groups = [["Cam-A"]] * 3
    named, consistent = metadata_check(cameras, ["X1", "X1", "A1"], probs, groups, labels, None,
                                       background=[True, False, False])
    assert named == ["", "", "Cam-A"] and consistent == [True, False, True]


def test_a_photo_is_the_backgrounds_where_its_pixels_prefer_it_to_the_camera_it_would_be_named():
    """Ensemble.in_background: by the pixels' own closest camera, their top class; by a camera the JPEG tables
    named, whether the pixels find the photo more like the other models than like that camera."""
    cameras = [{"label": "A", "models": []}, {"label": "B", "models": []}, {"label": "other", "models": [],
                                                                          "background": True}]
    ensemble = Ensemble(models=[], names=[], labels=["A", "B", "other"], patch=64, cameras=cameras)
    pixels = np.array([[0.2, 0.1, 0.7], [0.9, 0.04, 0.06], [0.005, 0.99, 0.005], [np.nan] * 3])
    assert list(ensemble.in_background(pixels)) == [True, False, False, False]
    assert list(ensemble.in_background(pixels, [0, 0, 0, 0])) == [True, False, False, False]  # A 0.005 = other
    assert list(ensemble.in_background(pixels, [1, 1, 0, 0])) == [True, True, False, False]
    np.testing.assert_allclose(ensemble.catalog_probs(pixels[:3]), [[2 / 3, 1 / 3, 0], [0.9 / 0.94, 0.04 / 0.94, 0],
                                                                    [0.005 / 0.995, 0.99 / 0.995, 0]])
    plain = dataclasses.replace(ensemble, cameras=[{**c, "background": False} for c in cameras])
    assert not plain.in_background(pixels).any() and plain.catalog_probs(pixels) is pixels


@pytest.fixture(scope="module")
def scored(tiny_model):
    """The tiny bundle's test photos scored once, every other photo's pixels then pushed towards one camera (made
    background in the tests), so that some photos are like it and some are not, whatever the tiny network learnt."""
    ensemble = Ensemble.load(tiny_model.bundle)
    scores = score_photos(ensemble, list(tiny_model.test.path))
    label = ensemble.labels[0]
    pixels = scores.pixels.copy()
    pixels[::2, 0] += 2 * pixels[::2].max(axis=1)
    pixels /= pixels.sum(axis=1, keepdims=True)
    pixels[1::2, 0] = 0.5 * pixels[1::2].min(axis=1)  # the others: never camera 0
    pixels /= pixels.sum(axis=1, keepdims=True)
    return ensemble, dataclasses.replace(scores, pixels=pixels), label


def with_background(ensemble: Ensemble, *labels: str) -> Ensemble:
    cameras = ensemble.cameras or [{"label": x, "make": "", "models": []} for x in ensemble.labels]
    cameras = [{**c, "background": True} if c["label"] in labels else c for c in cameras]
    assert sum(c.get("background", False) for c in cameras) == len(labels)
    return dataclasses.replace(ensemble, cameras=cameras)


def test_answers_never_name_a_background_camera_and_photos_like_them_are_unknown(scored):
    ensemble, scores, label = scored
    plain = answers(ensemble, scores)
    marked = with_background(ensemble, label)
    assert list(marked.background) == [x == label for x in ensemble.labels]
    out = answers(marked, scores)
    elsewhere = scores.pixels.argmax(axis=1) == ensemble.labels.index(label)
    assert elsewhere.any() and not elsewhere.all()
    assert label not in set(out.closest_camera) and all(label not in g.split(" or ") for g in out.camera_group)
    assert (out.camera[elsewhere] == UNKNOWN).all()
    assert out.unknown_by[elsewhere].str.contains("pixels").all()
    # The others keep their closest camera and their verdict; the probabilities keep every column.
    assert (out.closest_camera[~elsewhere] == plain.closest_camera[~elsewhere]).all()
    assert (out.unknown[~elsewhere] == plain.unknown[~elsewhere]).all()
    assert label in out.columns and np.allclose(out[ensemble.labels].sum(axis=1), 1.0)
    # The closest camera among the catalog's: the top of the catalog cameras' probabilities.
    catalog = [x for x in ensemble.labels if x != label]
    rows = np.flatnonzero(elsewhere)
    assert list(out.closest_camera[rows]) == list(out.loc[rows, catalog].idxmax(axis=1))
    assert np.allclose(out.confidence[rows], [out.loc[r, out.closest_camera[r]] for r in rows])
    # Balancing deals the photos among the catalog cameras only.
    balanced = answers(marked, scores, {"balance": "optimal"})
    assert label not in set(balanced.closest_camera)
    # Without the open-set rule the background class still decides `unknown`: it is an answer, not a threshold.
    bare = answers(dataclasses.replace(marked, open_set={}), scores)
    assert list(bare.unknown) == list(elsewhere) and set(bare.unknown_by[elsewhere]) == {"pixels"}


def test_the_evaluate_fit_leaves_background_cameras_out_of_the_rule(tiny_model, tmp_path, scored):
    """fit_confidence with a background camera, on a catalog of one reference device per camera: no distance
    threshold per camera (the background class is their pixel ground, recorded in `open_set.background`), the
    background camera in no twin pair, and the test photos' figures on the catalog cameras with the background
    photos' own."""
    from camid.inference.openset import SINGLE_DEVICE
    from camid.stages.evaluate import fit_confidence, full_image_report
    from camid.tiny import ROOT

    ensemble, _, label = scored
    cache = one_device_cache(tiny_model, tmp_path / "cache")
    settings = load_params(ROOT / "params.yaml").evaluate
    marked = with_background(dataclasses.replace(ensemble, use_tables=True), label)
    _, rule, bank, metadata = fit_confidence(marked, cache, settings)
    assert rule["reference"] == SINGLE_DEVICE and rule["knn_threshold"]
    assert rule["background"] == {"cameras": [label], "single_device": [x for x in ensemble.labels if x != label]}
    assert not rule["knn_threshold_camera"] and not rule.get("knn_threshold_camera_unseen_tables")
    assert label not in {c for pair in metadata["twins"] for c in pair["cameras"]}
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_model.bundle, bundle)
    spec = json.loads((bundle / "ensemble.json").read_text())
    spec["cameras"] = marked.cameras
    (bundle / "ensemble.json").write_text(json.dumps(spec))
    Ensemble.set_confidence(bundle, {}, rule, bank, metadata)
    judged = Ensemble.load(bundle)
    assert list(judged.background) == list(marked.background)
    # Its single-device cameras are judged by the background class alone: no distance rejects their photos.
    scores = score_photos(judged, list(tiny_model.test.path))
    catalog = judged.catalog_probs(scores.pixels)
    margin = judged.open_set_margin(catalog, scores.patches, None, scores.features)
    assert np.isinf(margin).all()
    result, table = full_image_report(judged, cache)
    photos = int((tiny_model.test.label == label).sum())
    assert result["background"]["photos"] == photos
    assert result["photos"] == len(tiny_model.test) - photos
    assert 0 <= result["background"]["answered_unknown_pixels_only"] <= 1
    assert label not in set(table.closest_camera)
