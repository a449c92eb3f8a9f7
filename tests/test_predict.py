"""`camid predict`: real image files in folders -> a Kaggle submission and a probabilities table."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from camid.cli import main
from camid.core.manipulations import apply
from camid.core.patches import auto_patch_count, centre_crop

CROP = 128  # the Kaggle test set's 512 crops, scaled to the tiny model's 64 px patch


@pytest.fixture(scope="module")
def test_set(tiny_model, tmp_path_factory):
    """A Kaggle-style closed set: per camera one unaltered and one manipulated centre crop (TIFF), names hiding
    the camera; returns the folder and the truth (file name -> camera)."""
    folder = tmp_path_factory.mktemp("kaggle-test")
    truth, seen = {}, set()
    for i, (path, label) in enumerate(zip(tiny_model.test.path, tiny_model.test.label)):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        crop = centre_crop(pixels, CROP)
        if label in seen:
            name = f"img_{i:03d}_manip.tif"
            crop = apply(crop, "gamma0.8", CROP)
        else:
            name = f"img_{i:03d}_unalt.tif"
        seen.add(label)
        Image.fromarray(crop).save(folder / name)
        truth[name] = label
    return folder, truth


def predict(*args: str) -> int:
    return main(["predict", *map(str, args)])


def test_submission_and_probabilities(tiny_model, test_set, tmp_path):
    folder, truth = test_set
    out = tmp_path / "submission.csv"
    assert predict(folder, "--model", tiny_model.bundle, "--out", out) == 0
    submission = pd.read_csv(out)
    assert list(submission.columns) == ["fname", "camera"]
    assert sorted(submission.fname) == sorted(truth) and set(submission.camera) <= set(tiny_model.labels)
    probs = pd.read_csv(tmp_path / "submission.probs.csv")
    assert list(probs.fname) == list(submission.fname) and list(probs.camera) == list(submission.camera)
    assert np.allclose(probs[tiny_model.labels].sum(axis=1), 1)
    assert list(probs.manipulated) == [name.endswith("_manip.tif") for name in probs.fname]
    assert not probs.manipulated_estimated.any()


def test_balance_gives_equal_counts_per_camera_in_each_group(tiny_model, test_set, tmp_path):
    folder, _ = test_set
    out = tmp_path / "balanced.csv"
    assert predict(folder, "--model", tiny_model.bundle, "--balance", "--out", out) == 0
    table = pd.read_csv(tmp_path / "balanced.probs.csv")
    for group in (False, True):
        counts = table.camera[table.manipulated == group].value_counts()
        assert len(counts) == len(tiny_model.labels) and set(counts) == {1}, counts


def test_full_image_scores_many_patches_per_photo(tiny_model, tmp_path):
    photos = list(tiny_model.test.path[:3])
    out = tmp_path / "full.csv"
    assert predict(*photos, "--model", tiny_model.bundle, "--full-image", "--patches", "9", "--no-tta",
                   "--out", out) == 0
    table = pd.read_csv(tmp_path / "full.probs.csv")
    assert list(table.path) == photos and table.manipulated_estimated.all() and list(table.patches) == [9] * 3
    assert np.allclose(table[tiny_model.labels].sum(axis=1), 1)
    auto = tmp_path / "auto.csv"
    assert predict(*photos, "--model", tiny_model.bundle, "--full-image", "--out", auto) == 0
    expected = [auto_patch_count(Image.open(p).size[::-1], tiny_model.patch) for p in photos]
    assert list(pd.read_csv(tmp_path / "auto.probs.csv").patches) == expected and min(expected) > 9
    one = tmp_path / "one.csv"
    assert predict(*photos, "--model", tiny_model.bundle, "--no-tta", "--out", one) == 0
    assert not np.allclose(pd.read_csv(tmp_path / "one.probs.csv")[tiny_model.labels], table[tiny_model.labels])


def test_a_bad_file_is_a_row_with_its_error_not_a_failed_batch(tiny_model, test_set, tmp_path, caplog):
    folder, truth = test_set
    good = sorted(folder.iterdir())[:3]
    broken, tiny = tmp_path / "broken.jpg", tmp_path / "tiny.png"
    broken.write_bytes(b"this is not a JPEG")
    Image.new("RGB", (1, 1)).save(tiny)
    out = tmp_path / "partial.csv"
    with caplog.at_level(logging.WARNING):
        assert predict(*good, broken, tiny, "--model", tiny_model.bundle, "--out", out) == 0
    assert list(pd.read_csv(out).fname) == [p.name for p in good]  # the submission: scored photos only
    probs = pd.read_csv(tmp_path / "partial.probs.csv", keep_default_na=False, na_values={l: ["", "NaN"] for l in tiny_model.labels})
    assert list(probs.fname) == [p.name for p in good] + ["broken.jpg", "tiny.png"]  # the input order
    errors = dict(zip(probs.fname, probs.error))
    assert "not a decodable image" in errors["broken.jpg"] and "smaller than the model's" in errors["tiny.png"]
    assert all(errors[p.name] == "" for p in good)
    bad = probs.fname.isin(["broken.jpg", "tiny.png"])
    assert (probs.camera[bad] == "").all() and probs.loc[bad, tiny_model.labels].isna().all().all()
    assert np.allclose(probs.loc[~bad, tiny_model.labels].sum(axis=1), 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("broken.jpg" in w and "not a decodable image" in w for w in warnings), warnings
    assert any("tiny.png" in w and "smaller than the model's" in w for w in warnings), warnings


def test_registered_model_uri_gives_the_same_predictions(registered_model, test_set, tmp_path,
                                                         monkeypatch):
    folder, _ = test_set
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered_model.tracking_uri)
    assert predict(folder, "--model", "models:/camid@champion", "--out", tmp_path / "a.csv") == 0
    assert predict(folder, "--model", registered_model.bundle, "--out", tmp_path / "b.csv") == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"))


def test_unknown_model_uri_is_a_clear_error(registered_model, test_set, tmp_path, monkeypatch, capsys):
    folder, _ = test_set
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered_model.tracking_uri)
    assert predict(folder, "--model", "models:/no-such-model@champion", "--out", tmp_path / "x.csv") == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "MLFLOW_TRACKING_URI" in err and "Traceback" not in err
    assert not (tmp_path / "x.csv").exists()


def test_no_images_is_a_clear_error(tiny_model, tmp_path, capsys):
    assert predict(tmp_path, "--model", tiny_model.bundle, "--out", tmp_path / "x.csv") == 2
    assert "no images" in capsys.readouterr().err


def test_evaluate_scores_a_model_on_a_labelled_folder(tiny_model, tmp_path, monkeypatch):
    """`camid evaluate --folder`: a `<label>/<files>` tree scored unaltered and under every manipulation."""
    folder = tmp_path / "labelled"
    for path, label in zip(tiny_model.test.path, tiny_model.test.label):
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / f"{label}-{len(list((folder / label).iterdir()))}.jpg").write_bytes(open(path, "rb").read())
    for key, value in tiny_model.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tiny_model.root)
    metrics_file, plots_file = tmp_path / "m.json", tmp_path / "p.csv"
    code = main(["evaluate", "--folder", str(folder), "--model", str(tiny_model.bundle), "--no-tta",
                 "--metrics", str(metrics_file), "--plots", str(plots_file), "--figure", str(tmp_path / "c.png")])
    assert code == 0
    import json

    metrics = json.loads(metrics_file.read_text())
    assert metrics["images"] == len(tiny_model.test) and metrics["patches"] == 9 * len(tiny_model.test)
    assert metrics["weighted_accuracy"] == pytest.approx(0.7 * metrics["accuracy_unaltered"]
                                                         + 0.3 * metrics["accuracy_manipulated"])
    assert set(metrics["per_camera"]) == set(tiny_model.labels) and metrics["split"] == f"folder {folder}"
    table = pd.read_csv(plots_file)
    assert list(table.columns) == ["actual", "predicted"] and len(table) == metrics["patches"]
    assert (tmp_path / "c.png").stat().st_size > 0


def sized_bundle(tiny_model, tmp_path):
    """(a test photo, its decoded image, a copy of the tiny bundle whose every catalog camera has that photo's
    size): size verdicts then do not hang on which camera the tiny network finds closest."""
    import dataclasses
    import shutil

    from camid.config import load_params
    from camid.inference.ensemble import Ensemble
    from tests.conftest import ROOT

    source = tiny_model.test.path[0]
    native = Image.open(source)
    catalog = load_params(ROOT / "params.yaml").catalog
    catalog = dataclasses.replace(catalog, cameras=tuple(dataclasses.replace(c, sizes=((native.height, native.width),))
                                                         for c in catalog.cameras))
    bundle = shutil.copytree(tiny_model.bundle, tmp_path / "bundle")
    Ensemble.set_settings(bundle, (0,), "mean_square", catalog=catalog)
    return source, native, bundle


def test_size_seen_says_whether_the_reference_has_the_photos_size(tiny_model, tmp_path, capsys):
    """Issue 20: `size_seen` is True where the photo's pixel size, in either orientation, is one of the closest
    camera's catalog sizes (the reference's), False for a size the reference lacks (here a crop), and empty for a
    bundle that never recorded its cameras' sizes."""
    import dataclasses
    import json

    from camid.inference.answers import answers, score_photos
    from camid.inference.ensemble import Ensemble

    source, native, bundle = sized_bundle(tiny_model, tmp_path)
    turned, cropped = tmp_path / "turned.jpg", tmp_path / "cropped.jpg"
    native.transpose(Image.Transpose.TRANSPOSE).save(turned, quality=95)
    native.crop((0, 0, native.width - 16, native.height - 16)).save(cropped, quality=95)
    out = tmp_path / "sizes.csv"
    assert predict(source, turned, cropped, "--model", bundle, "--full-image", "--patches", "4",
                   "--no-tta", "--out", out) == 0
    table = pd.read_csv(tmp_path / "sizes.probs.csv")
    assert list(table.size_seen) == [True, True, False]
    assert "note:" not in capsys.readouterr().out  # none unknown: the tiny bundle has no open-set rule
    # A rule that rejects every photo (a top-probability threshold above 1): the summary says how many of the
    # unknown photos are of a size the reference lacks.
    spec = json.loads((bundle / "ensemble.json").read_text())
    (bundle / "ensemble.json").write_text(json.dumps({**spec, "open_set": {"threshold": {"photo": 2.0, "patch": 2.0}}}))
    assert predict(source, turned, cropped, "--model", bundle, "--full-image", "--patches", "4",
                   "--no-tta", "--out", out) == 0
    assert pd.read_csv(tmp_path / "sizes.probs.csv").unknown.all()
    printed = capsys.readouterr().out
    assert "(3 unlike every catalog camera" in printed
    assert "note: 1 of the unknown photos have a pixel size none of their closest camera's reference" in printed
    ensemble = Ensemble.load(bundle)
    assert all(ensemble.camera_sizes(label) for label in ensemble.labels)
    scores = score_photos(ensemble, [source, cropped], patches=4, tta=False)
    assert scores.sizes == [(native.height, native.width), (native.height - 16, native.width - 16)]
    # `camid explain` hands the photo over already cut (answers.Cut), with its size: the same verdict.
    from camid.inference.answers import Cut, cut

    crops, size = cut(Path(source).read_bytes(), ensemble.patch, 4)
    assert answers(ensemble, score_photos(ensemble, [Cut(crops, size=size)], tta=False)).size_seen.tolist() == [True]
    older = dataclasses.replace(ensemble, cameras=[{k: v for k, v in c.items() if k != "sizes"} for c in ensemble.cameras])
    assert answers(older, scores).size_seen.isna().all()


def test_exif_against_pixels_is_undecided_for_a_size_the_exif_cameras_reference_lacks(tiny_model, tmp_path):
    """Issue 20: a genuine photo of a size mode the EXIF camera's reference never shot (a Nikon D60 reference of
    full-size photos, questioned on the camera's downscaled "S" photos) lies outside what the pixels learnt of that
    camera, so pixels that point elsewhere do not make it `consistent: false`: it is undecided (None), and the card
    says why. The same pixels on a photo of the reference's size still contradict the EXIF."""
    import dataclasses

    from camid.inference.answers import answers, score_photos
    from camid.inference.ensemble import Ensemble
    from camid.tools.cards import _exif_reading

    source, native, bundle = sized_bundle(tiny_model, tmp_path)
    ensemble = Ensemble.load(bundle)
    scores = score_photos(ensemble, [source, source], patches=4, tta=False)
    named = ensemble.cameras[1]
    pixels = np.full((2, len(ensemble.labels)), 1e-9)
    pixels[:, 0] = 1.0  # the pixels: all on the first camera; the EXIF: the second camera's model
    other = (native.height // 2, native.width // 2)
    scores = dataclasses.replace(scores, pixels=pixels / pixels.sum(1, keepdims=True),
                                 exif_models=[named["models"][0]] * 2, sizes=[(native.height, native.width), other])
    table = answers(ensemble, scores, {"jpeg_tables": False, "open_set": False})
    assert list(table.exif_camera) == [named["label"]] * 2
    assert not pd.isna(table.consistent[0]) and not table.consistent[0]  # the reference's size: contradicted
    assert pd.isna(table.consistent[1])  # a size the EXIF camera's reference lacks: undecided
    row = table.iloc[1]
    card = {"error": "", "answer": {"exif_model": row.exif_model, "exif_camera": row.exif_camera, "consistent": None,
                                    "closest_camera": row.closest_camera},
            "exif_reference_sizes": [list(hw) for hw in ensemble.camera_sizes(named["label"])]}
    reading = _exif_reading(card)
    assert "cannot judge the EXIF: undecided" in reading and f"{native.height}x{native.width}" in reading
