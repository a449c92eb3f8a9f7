"""Open-set rejection: the threshold, its measures, and `unknown` answers from serving and `camid predict`."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from camid.cli import main
from camid.inference.ensemble import Ensemble
from camid.inference.openset import UNKNOWN, auroc, confidence, fit_threshold, tradeoff
from camid.serving.model import predict_frame


def test_the_threshold_accepts_the_asked_share_of_known_photos():
    scores = np.random.default_rng(0).random(200)
    for accept in (0.5, 0.9, 0.95, 1.0):
        assert np.mean(scores >= fit_threshold(scores, accept)) == pytest.approx(accept, abs=0.005)
    with pytest.raises(ValueError, match="accept"):
        fit_threshold(scores, 0)


def test_auroc_is_the_chance_a_known_photo_scores_above_an_unknown_one():
    known, unknown = np.array([0.9, 0.8, 0.7]), np.array([0.2, 0.3])
    assert auroc(known, unknown) == 1.0 and auroc(unknown, known) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5
    assert auroc(np.array([0.9, 0.4]), np.array([0.5])) == 0.5  # one pair of two above, one below


def test_the_tradeoff_counts_accepted_right_answers_and_rejected_unknowns():
    rows = tradeoff(np.array([0.9, 0.8, 0.4]), np.array([True, False, True]), np.array([0.3, 0.85]), [0.5])
    assert rows[0] == {"threshold": 0.5, "known_accepted": pytest.approx(2 / 3), "accuracy_accepted": 0.5,
                       "unknown_rejected": 0.5, "open_set_accuracy": pytest.approx(2 / 5)}


@pytest.fixture(scope="module")
def open_bundle(tiny_model, tmp_path_factory):
    """The tiny bundle with an open-set photo threshold at the median confidence of its test photos."""
    bundle = tmp_path_factory.mktemp("open") / "bundle"
    shutil.copytree(tiny_model.bundle, bundle)
    images = [open(p, "rb").read() for p in tiny_model.test.path]
    closed = predict_frame(Ensemble.load(bundle), pd.DataFrame({"image": images}))
    cut = float(np.median(closed.confidence))
    Ensemble.set_confidence(bundle, {}, {"score": "max_prob", "accept": 0.5, "threshold": {"patch": cut, "photo": cut}})
    return bundle, images, closed, cut


def test_served_answers_are_unknown_below_the_threshold_with_the_closest_camera_beside(open_bundle, tiny_model):
    bundle, images, closed, cut = open_bundle
    ensemble = Ensemble.load(bundle)
    out = predict_frame(ensemble, pd.DataFrame({"image": images}))
    below = closed.confidence.to_numpy() < cut
    assert below.any() and not below.all()
    assert list(out.unknown) == list(below)
    assert list(out.camera) == [UNKNOWN if b else c for b, c in zip(below, closed.camera)]
    assert list(out.closest_camera) == list(closed.camera)
    assert np.allclose(out.confidence, confidence(out[tiny_model.labels].to_numpy()))
    never = predict_frame(ensemble, pd.DataFrame({"image": images}), {"open_set": False})
    assert not never.unknown.any() and list(never.camera) == list(closed.camera)


def test_camid_predict_says_unknown_and_the_submission_still_names_a_catalog_camera(open_bundle, tiny_model,
                                                                                   tmp_path):
    bundle, _, _, cut = open_bundle
    out = tmp_path / "sub.csv"
    assert main(["predict", *tiny_model.test.path, "--model", str(bundle), "--out", str(out), "--full-image"]) == 0
    probs = pd.read_csv(tmp_path / "sub.probs.csv", keep_default_na=False)
    assert list(probs.unknown) == list(probs.confidence < cut) and probs.unknown.any()
    assert (probs.camera[probs.unknown] == UNKNOWN).all()
    assert (probs.camera[~probs.unknown] == probs.closest_camera[~probs.unknown]).all()
    submission = pd.read_csv(out)
    assert list(submission.camera) == list(probs.closest_camera) and set(submission.camera) <= set(tiny_model.labels)
    assert main(["predict", *tiny_model.test.path, "--model", str(bundle), "--out", str(out), "--full-image",
                 "--closed-set"]) == 0
    assert not pd.read_csv(tmp_path / "sub.probs.csv").unknown.any()


def test_answers_without_the_jpeg_tables_are_calibrated_and_judged_on_their_own_scale(tiny_model):
    """With the tables, camera originals are far more confident than from the pixels alone: a pixels-only answer
    (`jpeg_tables: false`, a flagged manipulated photo, a PNG) takes the pixels-only temperature and threshold,
    an answer the tables entered the tables' own."""
    import dataclasses

    from camid.forensics.inspect import header_facts
    from camid.inference.calibration import apply_temperature
    from camid.inference.jpeg_tables import TablePrior

    images = [open(p, "rb").read() for p in tiny_model.test.path]
    truth = [tiny_model.labels.index(label) for label in tiny_model.test.label]
    prior = TablePrior.fit([header_facts(b)["jpeg_tables"] for b in images], truth, tiny_model.labels)
    raw = dataclasses.replace(Ensemble.load(tiny_model.bundle), tables=prior, use_tables=True, temperature={},
                              open_set={})
    frame = pd.DataFrame({"image": images})
    raw_tables, raw_pixels = (predict_frame(raw, frame, {"jpeg_tables": on}) for on in (True, False))
    assert set(raw_tables.tables_evidence) == {"used"} and set(raw_pixels.tables_evidence) == {"none"}
    cut_pixels = float(np.median(raw_pixels.confidence))  # would reject about half of the pixels-only answers
    cut_tables = float(np.min(raw_tables.confidence))      # accepts every tables answer...
    assert cut_tables > cut_pixels                          # ...and, for the pixels, would reject more than half
    fitted = dataclasses.replace(raw, temperature={"photo": 0.5, "photo_pixels_only": 2.0}, open_set={
        "score": "max_prob", "accept": 0.5, "threshold": {"photo": 0.0, "photo_pixels_only": 0.0}})
    for on, answers, t in ((True, raw_tables, 0.5), (False, raw_pixels, 2.0)):
        out = predict_frame(fitted, frame, {"jpeg_tables": on})
        np.testing.assert_allclose(out[tiny_model.labels], apply_temperature(answers[tiny_model.labels].to_numpy(), t))
    judged = dataclasses.replace(raw, open_set={"score": "max_prob", "accept": 0.5, "threshold": {
        "photo": cut_tables, "photo_pixels_only": cut_pixels}})
    pixels = predict_frame(judged, frame, {"jpeg_tables": False})
    assert list(pixels.unknown) == list(raw_pixels.confidence < cut_pixels) and not pixels.unknown.all()
    tables = predict_frame(judged, frame, {"jpeg_tables": True})
    assert not tables.unknown.any()
    flagged = predict_frame(judged, frame.assign(manipulated=True))  # the caller's flag rules the tables out
    assert set(flagged.tables_evidence) == {"none"} and list(flagged.unknown) == list(flagged.confidence < cut_pixels)
    # A bundle fitted before pixels-only settings existed judges every answer on its one scale, as it did.
    old = dataclasses.replace(raw, open_set={"score": "max_prob", "accept": 0.5, "threshold": {"photo": cut_tables}})
    assert list(predict_frame(old, frame, {"jpeg_tables": False}).unknown) == list(raw_pixels.confidence < cut_tables)


def test_jpeg_tables_no_catalog_camera_wrote_count_as_unknown_only_where_validation_allows(tiny_model):
    import dataclasses
    import io

    from PIL import Image

    from camid.forensics.inspect import header_facts
    from camid.inference.jpeg_tables import TablePrior

    images = [open(p, "rb").read() for p in tiny_model.test.path[:3]]
    resaved = io.BytesIO()
    Image.open(io.BytesIO(images[0])).save(resaved, "JPEG", quality=83)  # an editor's tables, not a camera's
    prior = TablePrior.fit([header_facts(b)["jpeg_tables"] for b in images], [0] * 3, tiny_model.labels)
    frame = pd.DataFrame({"image": images + [resaved.getvalue()]})
    base = dataclasses.replace(Ensemble.load(tiny_model.bundle), tables=prior, use_tables=True, temperature={})
    rule = {"score": "max_prob", "accept": 0.95, "threshold": {"photo": 0.0, "photo_pixels_only": 0.0}}
    allowed = predict_frame(dataclasses.replace(base, open_set={**rule, "unseen_tables": True}), frame)
    assert allowed.tables_evidence.tolist() == ["used"] * 3 + ["unseen"]
    assert allowed.unknown.tolist() == [False] * 3 + [True] and allowed.camera[3] == UNKNOWN
    assert allowed.closest_camera[3] in tiny_model.labels
    not_allowed = predict_frame(dataclasses.replace(base, open_set={**rule, "unseen_tables": False}), frame)
    assert not not_allowed.unknown.any() and not_allowed.tables_evidence[3] == "unseen"
    flagged = predict_frame(dataclasses.replace(base, open_set={**rule, "unseen_tables": True}),
                            frame.assign(manipulated=[False] * 3 + [True]))
    assert flagged.tables_evidence[3] == "none" and not flagged.unknown[3]  # the caller said: re-saved


def test_validation_allows_the_unseen_tables_rule_only_when_catalog_originals_show_none(tiny_model):
    import dataclasses

    from camid.config import load_params
    from camid.data.cache import read_index
    from camid.inference.jpeg_tables import TablePrior, signature_of_file
    from camid.inference.scoring import fit_confidence
    from camid.tiny import ROOT

    cache, settings = tiny_model.root / "cache", load_params(ROOT / "params.yaml").evaluate
    val = read_index(cache, "val").drop_duplicates("image")
    ensemble = Ensemble.load(tiny_model.bundle)
    knows_val = TablePrior.fit([signature_of_file(p) for p in val.path], val.label_index, tiny_model.labels)
    _, rule = fit_confidence(dataclasses.replace(ensemble, tables=knows_val, use_tables=True), cache, settings)
    assert rule["val_tables_seen"] == 1.0 and rule["unseen_tables"]
    assert set(rule["threshold"]) == {"patch", "photo", "patch_pixels_only", "photo_pixels_only"}
    knows_nothing = TablePrior.fit([], [], tiny_model.labels)  # as if every camera picked new tables per photo
    _, rule = fit_confidence(dataclasses.replace(ensemble, tables=knows_nothing, use_tables=True), cache, settings)
    assert rule["val_tables_seen"] == 0.0 and not rule["unseen_tables"]
    _, rule = fit_confidence(dataclasses.replace(ensemble, use_tables=False), cache, settings)
    assert set(rule["threshold"]) == {"patch", "photo"} and not rule["unseen_tables"]
