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
