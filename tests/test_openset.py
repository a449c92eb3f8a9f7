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


def val_passes(ensemble: Ensemble, cache, settings) -> dict:
    """The validation passes `fit_confidence` makes, made once for fits that differ only in the JPEG-table
    evidence (the passes are the pixels alone)."""
    from camid.inference.scoring import validation_scores
    from camid.stages.evaluate import score_split_photos

    return {"val": validation_scores(ensemble, cache, settings), "val_photos": score_split_photos(ensemble, cache, "val")}


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
    an answer the tables entered the tables' own. The photos are scored once (`score_photos`, the pixels alone)
    and answered under each bundle and option by `answers`, the step every served answer ends with."""
    import dataclasses

    from camid.forensics.inspect import header_facts
    from camid.inference.answers import answers, score_photos
    from camid.inference.calibration import apply_temperature
    from camid.inference.jpeg_tables import TablePrior
    from camid.inference.options import resolve

    images = [open(p, "rb").read() for p in tiny_model.test.path]
    truth = [tiny_model.labels.index(label) for label in tiny_model.test.label]
    prior = TablePrior.fit([header_facts(b)["jpeg_tables"] for b in images], truth, tiny_model.labels)
    raw = dataclasses.replace(Ensemble.load(tiny_model.bundle), tables=prior, use_tables=True, temperature={},
                              open_set={})
    scored = score_photos(raw, images)
    flagged_scores = score_photos(raw, images, flags=[True] * len(images))  # the caller's flag rules the tables out

    def answer(ensemble, jpeg_tables=None, scores=scored):
        return answers(ensemble, scores, resolve({"jpeg_tables": jpeg_tables}))

    assert answer(raw).equals(predict_frame(raw, pd.DataFrame({"image": images})))  # as served
    raw_tables, raw_pixels = (answer(raw, on) for on in (True, False))
    assert set(raw_tables.tables_evidence) == {"used"} and set(raw_pixels.tables_evidence) == {"none"}
    cut_pixels = float(np.median(raw_pixels.confidence))  # would reject about half of the pixels-only answers
    cut_tables = float(np.min(raw_tables.confidence))      # accepts every tables answer...
    assert cut_tables > cut_pixels                          # ...and, for the pixels, would reject more than half
    fitted = dataclasses.replace(raw, temperature={"photo": 0.5, "photo_pixels_only": 2.0}, open_set={
        "score": "max_prob", "accept": 0.5, "threshold": {"photo": 0.0, "photo_pixels_only": 0.0}})
    for on, answered, t in ((True, raw_tables, 0.5), (False, raw_pixels, 2.0)):
        out = answer(fitted, on)
        np.testing.assert_allclose(out[tiny_model.labels], apply_temperature(answered[tiny_model.labels].to_numpy(), t))
    judged = dataclasses.replace(raw, open_set={"score": "max_prob", "accept": 0.5, "threshold": {
        "photo": cut_tables, "photo_pixels_only": cut_pixels}})
    pixels = answer(judged, False)
    assert list(pixels.unknown) == list(raw_pixels.confidence < cut_pixels) and not pixels.unknown.all()
    tables = answer(judged, True)
    assert not tables.unknown.any()
    flagged = answer(judged, scores=flagged_scores)
    assert set(flagged.tables_evidence) == {"none"} and list(flagged.unknown) == list(flagged.confidence < cut_pixels)
    # A bundle fitted before pixels-only settings existed judges every answer on its one scale, as it did.
    old = dataclasses.replace(raw, open_set={"score": "max_prob", "accept": 0.5, "threshold": {"photo": cut_tables}})
    assert list(answer(old, False).unknown) == list(raw_pixels.confidence < cut_tables)


def test_jpeg_tables_no_catalog_camera_wrote_count_as_unknown_only_where_validation_allows(tiny_model):
    import dataclasses
    import io

    from PIL import Image

    from camid.forensics.inspect import header_facts
    from camid.inference.jpeg_tables import TablePrior

    images = [open(p, "rb").read() for p in tiny_model.test.path[:3]]
    resaved, ijg = io.BytesIO(), io.BytesIO()
    editor = [[3 + (5 * k) % 11 for k in range(64)], [4 + (3 * k) % 13 for k in range(64)]]
    Image.open(io.BytesIO(images[0])).save(resaved, "JPEG", qtables=editor)  # an editor's tables, not a camera's
    Image.open(io.BytesIO(images[0])).save(ijg, "JPEG", quality=83)  # libjpeg's tables: the zoo firmware's family
    prior = TablePrior.fit([header_facts(b)["jpeg_tables"] for b in images], [0] * 3, tiny_model.labels)
    assert prior.evidence([header_facts(ijg.getvalue())["jpeg_tables"]], [True]).tolist() == ["family"]
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
    from camid.inference.openset import UNSEEN_DEVICES
    from camid.stages.evaluate import fit_confidence
    from camid.tiny import ROOT

    cache, settings = tiny_model.root / "cache", load_params(ROOT / "params.yaml").evaluate
    val = read_index(cache, "val").drop_duplicates("image")
    ensemble = Ensemble.load(tiny_model.bundle)
    knows_val = TablePrior.fit([signature_of_file(p) for p in val.path], val.label_index, tiny_model.labels)
    passes = val_passes(ensemble, cache, settings)
    _, rule, _, _ = fit_confidence(dataclasses.replace(ensemble, tables=knows_val, use_tables=True), cache, settings,
                                   **passes)
    assert rule["val_tables_seen"] == 1.0 and rule["unseen_tables"]
    assert set(rule["threshold"]) == {"patch", "photo", "patch_pixels_only", "photo_pixels_only"}
    # Every camera split by device: the unseen tables rule measured on the unseen devices, no per-camera rule.
    assert rule["reference"] == UNSEEN_DEVICES and not rule["knn_threshold_camera"]
    knows_nothing = TablePrior.fit([], [], tiny_model.labels)  # as if every camera picked new tables per photo
    _, rule, _, _ = fit_confidence(dataclasses.replace(ensemble, tables=knows_nothing, use_tables=True), cache,
                                   settings, **passes)
    assert rule["val_tables_seen"] == 0.0 and not rule["unseen_tables"]
    _, rule, _, _ = fit_confidence(dataclasses.replace(ensemble, use_tables=False), cache, settings, **passes)
    assert set(rule["threshold"]) == {"patch", "photo"} and not rule["unseen_tables"]
    assert "knn_threshold_camera_unseen_tables" not in rule


def test_knn_score_is_the_similarity_to_the_kth_nearest_training_feature():
    from camid.inference.openset import fit_bank, knn_score, photo_features, unit

    bank = unit(np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], dtype=np.float32))
    query = unit(np.array([[1, 0.1], [-1, -0.1]], dtype=np.float32))
    sims = query @ bank.T
    for k in (1, 2, 4):
        np.testing.assert_allclose(knn_score(query, bank, k), np.sort(sims, axis=1)[:, ::-1][:, k - 1], rtol=1e-6)
    np.testing.assert_allclose(knn_score(query, bank, 99), sims.min(axis=1), rtol=1e-6)  # k capped by the bank
    feats = unit(np.random.default_rng(0).normal(size=(7, 3)))
    photos = photo_features(feats, [3, 4])
    np.testing.assert_allclose(photos, unit(np.stack([feats[:3].mean(0), feats[3:].mean(0)])), rtol=1e-6)
    from camid.inference import openset

    big = fit_bank(unit(np.random.default_rng(1).normal(size=(openset.PATCH_BANK_MAX + 10, 3))), [openset.PATCH_BANK_MAX + 10])
    assert len(big["patch"]) == openset.PATCH_BANK_MAX and len(big["photo"]) == 1


@pytest.fixture(scope="module")
def knn_bundle(tiny_model, tmp_path_factory):
    """The tiny bundle with the training photos' feature bank and a kNN photo threshold at the median score of
    its test photos."""
    from camid.inference.openset import read_bank
    from camid.stages.evaluate import training_bank

    bundle = tmp_path_factory.mktemp("knn") / "bundle"
    shutil.copytree(tiny_model.bundle, bundle)
    bank = training_bank(Ensemble.load(bundle), tiny_model.root / "cache")
    Ensemble.set_confidence(bundle, {}, {"score": "knn_cosine", "accept": 0.5, "threshold": {"patch": 0.0, "photo": 0.0},
                                         "knn_threshold": {"patch": 0.0, "photo": 0.0}}, bank)
    stored = read_bank(bundle)
    assert {k: v.shape for k, v in stored.items()} == {k: v.shape for k, v in bank.items()}
    ensemble = Ensemble.load(bundle)
    images = [open(p, "rb").read() for p in tiny_model.test.path]
    probe = predict_frame(ensemble, pd.DataFrame({"image": images}), {"open_set": False})
    from camid.core.imageio import decode_image
    from camid.core.patches import grid_crops

    crops = [grid_crops(decode_image(b), ensemble.patch, 0) for b in images]
    pred = ensemble.predict_photos(crops)
    margin = ensemble.open_set_margin(pred.probs, [len(c) for c in crops], pred.tables_evidence, pred.features)
    cut = float(np.median(margin))
    Ensemble.set_confidence(bundle, {}, {"score": "knn_cosine", "accept": 0.5, "threshold": {"patch": 0.0, "photo": 0.0},
                                         "knn_threshold": {"patch": 0.0, "photo": cut}})
    return bundle, images, probe, margin, cut


def test_the_knn_ground_rejects_photos_whose_features_are_unlike_the_training_photos(knn_bundle, tiny_model, tmp_path):
    bundle, images, probe, margin, cut = knn_bundle
    ensemble = Ensemble.load(bundle)
    assert ensemble.bank is not None and ensemble.open_set["score"] == "knn_cosine"
    below = margin < cut
    assert below.any() and not below.all()
    out = predict_frame(ensemble, pd.DataFrame({"image": images}))
    assert list(out.unknown) == list(below)  # the features decide, not the top probability
    assert list(out.closest_camera) == list(probe.camera)
    out_csv = tmp_path / "sub.csv"
    assert main(["predict", *tiny_model.test.path, "--model", str(bundle), "--out", str(out_csv), "--full-image"]) == 0
    probs = pd.read_csv(tmp_path / "sub.probs.csv", keep_default_na=False)
    assert list(probs.unknown) == list(below)
    # A training photo's own feature is in the bank: at k = 1 it is its own nearest neighbour.
    from camid.inference.openset import knn_score

    train = pd.read_csv(tiny_model.root / "split" / "train.csv", keep_default_na=False)
    from camid.core.imageio import decode_image
    from camid.core.patches import grid_crops

    crops = [grid_crops(decode_image(open(p, "rb").read()), ensemble.patch, 0) for p in train.path[:4]]
    feats = ensemble.predict_photos(crops, [False] * 4, tta=False).features
    np.testing.assert_allclose(knn_score(feats, ensemble.bank["photo"], k=1), 1.0, atol=1e-4)


def exif_model(jpeg: bytes) -> str:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(jpeg)).getexif()[0x0110]


def with_exif_model(jpeg: bytes, model: str) -> bytes:
    """The same JPEG, pixels and tables untouched, its EXIF Model rewritten in place (same length)."""
    old = exif_model(jpeg)
    assert len(model) == len(old)
    head = jpeg.index(b"\xff\xdb")  # the EXIF segment ends before the first quantization table
    out = jpeg[:head].replace(old.encode() + b"\x00", model.encode() + b"\x00", 1) + jpeg[head:]
    assert exif_model(out) == model
    return out


def test_exif_naming_no_catalog_camera_agrees_with_pixels_the_open_set_rule_rejects(knn_bundle, catalog):
    """Issue 20: a genuine photo of a camera outside the catalog, its EXIF naming that camera, answered `unknown`
    on its pixels, agrees with its EXIF (`consistent: true`), as a photo the background cameras lead does: the
    pixels point to no catalog camera either. Where the pixels accept a catalog camera, EXIF naming none
    contradicts them (`false`)."""
    import dataclasses

    bundle, images, probe, margin, cut = knn_bundle
    cameras = [{"label": c.label, "make": c.make, "models": list(c.models)} for c in catalog.cameras]
    ensemble = dataclasses.replace(Ensemble.load(bundle), cameras=cameras)
    renamed = [with_exif_model(jpeg, "Q" * len(exif_model(jpeg))) for jpeg in images]  # no catalog camera's model
    out = predict_frame(ensemble, pd.DataFrame({"image": renamed}))
    below = margin < cut
    assert below.any() and not below.all()
    assert list(out.unknown) == list(below) and set(out.unknown_by[below]) == {"pixels"}
    assert (out.exif_camera == "").all()
    assert list(out.consistent) == list(below)
    # The original EXIF names each photo's own catalog camera: the usual check (camera group, 5% level), whatever
    # the pixel ground says.
    original = predict_frame(ensemble, pd.DataFrame({"image": images}))
    assert (original.exif_camera != "").all()
    expected = [named in group.split(" or ") or original[named].iloc[i] >= 0.05
                for i, (named, group) in enumerate(zip(original.exif_camera, original.camera_group))]
    assert list(original.consistent) == expected


def test_exif_naming_no_catalog_camera_is_undecided_where_only_the_tables_made_the_photo_unknown(knn_bundle, catalog,
                                                                                                 tiny_model):
    """Real photos (bench/real_devices.py): genuine photos of other models whose pixels pass a catalog camera's
    threshold but whose JPEG tables no catalog firmware wrote are `unknown` on the tables alone; their EXIF, naming
    no catalog camera, read `consistent: false` (a forgery alarm) though the tables agree with it. The grounds
    disagree there, so the EXIF is undecided (None); where the pixels reject the photo it agrees (True)."""
    import dataclasses
    import io

    from PIL import Image

    from camid.inference.jpeg_tables import TablePrior, signature_of_file

    bundle, images, probe, margin, cut = knn_bundle
    cameras = [{"label": c.label, "make": c.make, "models": list(c.models)} for c in catalog.cameras]
    ensemble = Ensemble.load(bundle)
    labels = list(ensemble.labels)
    tables = TablePrior.fit([signature_of_file(p) for p in tiny_model.test.path],
                            [labels.index(label) for label in tiny_model.test.label], labels)
    odd = np.random.default_rng(0).integers(3, 60, size=(2, 64)).tolist()  # no scaled family of any firmware's
    try:
        Ensemble.set_confidence(bundle, {}, {**ensemble.open_set, "unseen_tables": True})
        judged = dataclasses.replace(Ensemble.load(bundle), cameras=cameras, tables=tables, use_tables=True)
        resaved = []  # the same pixels under tables no zoo firmware writes, EXIF naming no catalog camera
        for jpeg in images:
            out = io.BytesIO()
            with Image.open(io.BytesIO(jpeg)) as image:
                image.save(out, "JPEG", qtables=odd, exif=image.info.get("exif", b""))
            resaved.append(with_exif_model(out.getvalue(), "Q" * len(exif_model(jpeg))))
        out = predict_frame(judged, pd.DataFrame({"image": resaved}))
        assert (out.tables_evidence == "unseen").all() and out.unknown.all() and (out.exif_camera == "").all()
        by_tables = (out.unknown_by == "tables").to_numpy()
        assert by_tables.any() and not by_tables.all()
        assert out.consistent[by_tables].isna().all()
        assert (out.consistent[~by_tables] == True).all()  # noqa: E712  (the pixel ground rejects them too)
    finally:
        Ensemble.set_confidence(bundle, {}, ensemble.open_set)  # the module's fixture as it was


def test_one_reference_device_gets_a_threshold_of_its_own_halfway_on_a_log_scale_to_the_other_cameras():
    """Camera 0's held-out reference photos lie at cosine distance about 0.004 from its training photos, camera 1's
    photos at about 0.9: its threshold is the score at the geometric mean of the two median distances, far looser
    than the quantile of its own photos; a camera with validation photos only of its own keeps the quantile."""
    from camid.inference.openset import camera_knn_score, camera_thresholds, fit_threshold, log_midpoint, unit

    def around(direction, distance, n, seed):  # unit rows at about `distance` (1 - cosine) from `direction`
        rng = np.random.default_rng(seed)
        direction = unit(np.asarray(direction, dtype=np.float32)[None])[0]
        noise = unit(rng.normal(size=(n, len(direction))).astype(np.float32))
        noise -= (noise @ direction)[:, None] * direction  # orthogonal to the direction
        angle = np.arccos(1 - distance * rng.uniform(0.8, 1.2, size=n))
        return unit(np.cos(angle)[:, None] * direction + np.sin(angle)[:, None] * unit(noise))

    a, b = np.eye(8, dtype=np.float32)[0], np.eye(8, dtype=np.float32)[1]
    bank = np.concatenate([around(a, 0.002, 12, 0), around(b, 0.002, 12, 1)])
    bank_labels = np.array([0] * 12 + [1] * 12)
    val = np.concatenate([around(a, 0.004, 6, 2), around(b, 0.004, 6, 3)])
    labels = np.array([0] * 6 + [1] * 6)
    fitted = camera_thresholds(val, labels, bank, bank_labels, [0, 1], accept=0.95, reach=0.5)
    own = camera_knn_score(val[:6], [0] * 6, bank, bank_labels)
    other = camera_knn_score(val[6:], [0] * 6, bank, bank_labels)
    assert fitted[0]["quantile"] == pytest.approx(fit_threshold(own, 0.95))
    expected = 1 - np.sqrt((1 - np.median(own)) * (1 - np.median(other)))
    assert log_midpoint(own, other) == pytest.approx(expected)
    assert log_midpoint(own, other, 0.0) == pytest.approx(np.median(own))  # reach: 0 the own median, 1 the other's
    assert log_midpoint(own, other, 1.0) == pytest.approx(np.median(other))
    further = camera_thresholds(val, labels, bank, bank_labels, [0, 1], accept=0.95, reach=0.75)
    assert further[0]["threshold"] < fitted[0]["threshold"]
    assert fitted[0]["threshold"] == pytest.approx(min(fit_threshold(own, 0.95), expected))
    assert fitted[0]["threshold"] < fitted[0]["quantile"] - 0.01  # room for another device of the model
    another_device = camera_knn_score(around(a, 0.02, 20, 4), [0] * 20, bank, bank_labels)  # 5x as far
    another_model = camera_knn_score(around(unit(a + b), 0.05, 20, 5), [0] * 20, bank, bank_labels)
    assert (another_device >= fitted[0]["threshold"]).all() and (another_model < fitted[0]["threshold"]).all()
    alone = camera_thresholds(val[:6], labels[:6], bank, bank_labels, [0, 1], accept=0.95)
    assert set(alone) == {0} and alone[0]["threshold"] == alone[0]["quantile"]
    assert alone[0]["other_cameras_median"] is None


def test_a_cameras_twins_are_not_its_far_end():
    """Camera 1 is camera 0's twin (its photos lie where another device of camera 0 would), camera 2 another model.
    With camera 1's photos in the far end, camera 0's threshold sits near its own photos and rejects its other
    device; left out as twins, the far end is camera 2's and the other device gets in, while another model stays
    out. Where every other camera is a twin, the twins stay the far end (there is no other)."""
    from camid.inference.openset import camera_knn_score, camera_thresholds, unit

    def around(direction, distance, n, seed):  # unit rows at about `distance` (1 - cosine) from `direction`
        rng = np.random.default_rng(seed)
        direction = unit(np.asarray(direction, dtype=np.float32)[None])[0]
        noise = unit(rng.normal(size=(n, len(direction))).astype(np.float32))
        noise -= (noise @ direction)[:, None] * direction
        angle = np.arccos(1 - distance * rng.uniform(0.8, 1.2, size=n))
        return unit(np.cos(angle)[:, None] * direction + np.sin(angle)[:, None] * unit(noise))

    a, c = np.eye(8, dtype=np.float32)[0], np.eye(8, dtype=np.float32)[2]
    bank = np.concatenate([around(a, 0.002, 12, 0), around(a, 0.002, 12, 1), around(c, 0.002, 12, 2)])
    bank_labels = np.repeat([0, 1, 2], 12)
    val = np.concatenate([around(a, 0.004, 6, 3), around(a, 0.02, 10, 4), around(c, 0.004, 6, 5)])
    labels = np.repeat([0, 1, 2], [6, 10, 6])  # more twin photos than other-model photos: they would be the median
    pooled = camera_thresholds(val, labels, bank, bank_labels, [0], accept=0.95, reach=0.5)[0]
    apart = camera_thresholds(val, labels, bank, bank_labels, [0], accept=0.95, reach=0.5, twins={0: {1}, 1: {0}})[0]
    assert pooled["twins_left_out"] == [] and apart["twins_left_out"] == [1]
    other_model = camera_knn_score(val[labels == 2], [0] * 6, bank, bank_labels)
    assert apart["other_cameras_median"] == pytest.approx(float(np.median(other_model)))
    assert apart["threshold"] < pooled["threshold"] - 0.001
    another_device = camera_knn_score(around(a, 0.03, 20, 6), [0] * 20, bank, bank_labels)
    another_model = camera_knn_score(around(unit(a + c), 0.05, 20, 7), [0] * 20, bank, bank_labels)
    assert (another_device < pooled["threshold"]).all()
    assert (another_device >= apart["threshold"]).all() and (another_model < apart["threshold"]).all()
    only_twins = camera_thresholds(val[labels < 2], labels[labels < 2], bank, bank_labels, [0], accept=0.95,
                                   twins={0: {1}})[0]
    assert only_twins["twins_left_out"] == [] and only_twins["other_cameras_median"] is not None


def test_a_photo_whose_closest_camera_has_its_own_threshold_is_judged_against_that_camera(knn_bundle, tiny_model):
    from camid.inference.openset import camera_knn_score

    bundle, images, probe, margin, cut = knn_bundle
    ensemble = Ensemble.load(bundle)
    from camid.core.imageio import decode_image
    from camid.core.patches import grid_crops

    crops = [grid_crops(decode_image(b), ensemble.patch, 0) for b in images]
    pred = ensemble.predict_photos(crops)
    closest = pred.probs.argmax(1)
    own = camera_knn_score(pred.features, closest, ensemble.bank["photo"], ensemble.bank["photo_labels"])
    first = ensemble.labels[int(closest[0])]
    per_camera = {first: float(own[0]) + 1e-6}  # just above the first photo's own score: it is rejected
    rule = {**ensemble.open_set, "knn_threshold_camera": per_camera}
    Ensemble.set_confidence(bundle, {}, rule)
    judged = Ensemble.load(bundle)
    counts = [len(c) for c in crops]
    new = judged.open_set_margin(pred.probs, counts, pred.tables_evidence, pred.features)
    mine = closest == int(closest[0])
    np.testing.assert_allclose(new[mine], own[mine] - per_camera[first], atol=1e-9)
    np.testing.assert_allclose(new[~mine], margin[~mine] - cut, atol=1e-9)  # the others: the bank-wide rule
    assert judged.is_unknown(pred.probs, counts, pred.tables_evidence, pred.features)[0]
    # Where the closest camera has a twin with a threshold of its own, the photo is judged against each and the
    # better margin counts: the pixels cannot say which twin the network should have named.
    twin = next(label for label in ensemble.labels if label != first)
    theirs = camera_knn_score(pred.features, np.full(len(closest), ensemble.labels.index(twin)), ensemble.bank["photo"],
                              ensemble.bank["photo_labels"])
    rule = {**rule, "knn_threshold_camera": {**per_camera, twin: float(theirs[0]) - 1e-3}}
    twins = {"twins": [{"cameras": [first, twin], "confused": 0.5, "photos": 4, "by": "validation"}]}
    Ensemble.set_confidence(bundle, {}, rule, metadata=twins)
    grouped = Ensemble.load(bundle).open_set_margin(pred.probs, counts, pred.tables_evidence, pred.features)
    assert grouped[0] == pytest.approx(1e-3, abs=1e-6) and grouped[0] > 0 > new[0]
    np.testing.assert_allclose(grouped[mine], np.fmax(own[mine] - per_camera[first], theirs[mine] - theirs[0] + 1e-3),
                               atol=1e-9)
    Ensemble.set_confidence(bundle, {}, rule, metadata=ensemble.metadata)
    # A single patch keeps the bank-wide rule.
    one = judged.open_set_margin(pred.probs[:1], [1], None, pred.features[:1])
    assert one[0] == pytest.approx(float(ensemble.open_set_margin(pred.probs[:1], [1], None, pred.features[:1])[0]))
    Ensemble.set_confidence(bundle, {}, ensemble.open_set)  # the module's fixture as it was


def test_unseen_tables_raise_a_single_device_cameras_bar_instead_of_deciding_alone(knn_bundle, tiny_model):
    """Issue 20: one reference device cannot show the quality modes of the model's other devices, so for a photo
    judged by such a camera's own threshold, unseen JPEG tables ask its pixels to pass a stricter threshold
    (`knn_threshold_camera_unseen_tables`) rather than answer `unknown` alone; elsewhere they decide as before.
    Each answer says which ground decided (`unknown_by`)."""
    from camid.core.imageio import decode_image
    from camid.core.patches import grid_crops
    from camid.inference.jpeg_tables import FAMILY, UNSEEN, USED
    from camid.inference.openset import camera_knn_score

    bundle, images, probe, margin, cut = knn_bundle
    ensemble = Ensemble.load(bundle)
    crops = [grid_crops(decode_image(b), ensemble.patch, 0) for b in images]
    pred = ensemble.predict_photos(crops)
    counts = [len(c) for c in crops]
    closest = pred.probs.argmax(1)
    own = camera_knn_score(pred.features, closest, ensemble.bank["photo"], ensemble.bank["photo_labels"])
    first = ensemble.labels[int(closest[0])]
    mine = closest == int(closest[0])
    evidence = np.full(len(images), USED, dtype=object)
    unseen = evidence.copy()
    unseen[0] = UNSEEN
    try:
        # The first photo's camera has one reference device: its own threshold lets every photo of it in, the
        # stricter one for unseen tables lets the first photo's score just miss.
        per_camera = {first: float(own[mine].min()) - 1e-3}
        rule = {**ensemble.open_set, "unseen_tables": True, "knn_threshold_camera": per_camera,
                "knn_threshold_camera_unseen_tables": {first: float(own[0]) + 1e-6}}
        Ensemble.set_confidence(bundle, {}, rule)
        judged = Ensemble.load(bundle)
        seen = judged.unknown_grounds(pred.probs, counts, evidence, pred.features)
        assert (seen[mine] == "").all()  # seen tables: the camera's own threshold, which every one passes
        grounds = judged.unknown_grounds(pred.probs, counts, unseen, pred.features)
        assert grounds[0] == "tables"  # passes its own threshold, not the stricter one the unseen tables ask
        assert (grounds[1:] == seen[1:]).all()
        assert judged.is_unknown(pred.probs, counts, unseen, pred.features)[0]
        family = unseen.copy()
        family[0] = FAMILY
        assert judged.unknown_grounds(pred.probs, counts, family, pred.features)[0] == ""
        # Pixels near enough the reference outweigh unseen tables.
        Ensemble.set_confidence(bundle, {}, {**rule, "knn_threshold_camera_unseen_tables": {first: float(own[0]) - 1e-6}})
        assert Ensemble.load(bundle).unknown_grounds(pred.probs, counts, unseen, pred.features)[0] == ""
        # Pixels beyond the camera's own threshold: both grounds say so.
        Ensemble.set_confidence(bundle, {}, {**rule, "knn_threshold_camera": {first: float(own[0]) + 1e-3}})
        assert Ensemble.load(bundle).unknown_grounds(pred.probs, counts, unseen, pred.features)[0] == "pixels and tables"
        assert Ensemble.load(bundle).unknown_grounds(pred.probs, counts, evidence, pred.features)[0] == "pixels"
        # A bundle without the stricter threshold (made before it): unseen tables decide alone, where allowed.
        old = {k: v for k, v in rule.items() if k != "knn_threshold_camera_unseen_tables"}
        Ensemble.set_confidence(bundle, {}, old)
        assert Ensemble.load(bundle).unknown_grounds(pred.probs, counts, unseen, pred.features)[0] == "tables"
        Ensemble.set_confidence(bundle, {}, {**old, "unseen_tables": False})
        assert Ensemble.load(bundle).unknown_grounds(pred.probs, counts, unseen, pred.features)[0] == ""
    finally:
        Ensemble.set_confidence(bundle, {}, ensemble.open_set)  # the module's fixture as it was


def one_device_cache(tiny_model, cache):
    """A copy of the tiny model's cache whose split says every camera was dealt by photos: one reference device
    each, as the single-device rule sees it."""
    import json

    from camid.data.cache import META

    shutil.copytree(tiny_model.root / "cache", cache)
    meta = json.loads((cache / META).read_text())
    meta["split"]["modes"] = {label: "photos" for label in tiny_model.labels}
    (cache / META).write_text(json.dumps(meta))
    return cache


def test_a_camera_of_one_reference_device_gets_a_stricter_threshold_for_unseen_tables(tiny_model, tmp_path):
    """fit_confidence on a catalog whose cameras each had one reference device (the split's photo mode): each
    camera's own threshold at `single_device_reach`, and a stricter one at `unseen_tables_reach` that unseen JPEG
    tables ask of the pixels (Ensemble.unknown_grounds); without the tables' evidence, none. Two such cameras whose
    training photos share exact tables and a size are twins in the metadata rule (by firmware), and so are two of
    one maker whose tables are one family at two qualities."""
    import dataclasses

    from camid.config import load_params
    from camid.inference.metadata import FIRMWARE, TWIN_CONFUSION
    from camid.inference.openset import SINGLE_DEVICE, reach_threshold
    from camid.stages.evaluate import fit_confidence
    from camid.tiny import ROOT

    cache = one_device_cache(tiny_model, tmp_path / "cache")
    settings = load_params(ROOT / "params.yaml").evaluate
    ensemble = dataclasses.replace(Ensemble.load(tiny_model.bundle), use_tables=True)
    passes = val_passes(ensemble, cache, settings)
    _, rule, _, _ = fit_confidence(ensemble, cache, settings, **passes)
    per_camera, stricter = rule["knn_threshold_camera"], rule["knn_threshold_camera_unseen_tables"]
    assert rule["reference"] == SINGLE_DEVICE and per_camera and set(stricter) == set(per_camera)
    assert rule["unseen_tables_reach"] == settings.unseen_tables_reach < settings.single_device_reach
    for label, fit in rule["single_device"].items():
        assert per_camera[label] == pytest.approx(reach_threshold(fit, settings.single_device_reach))
        assert stricter[label] == pytest.approx(reach_threshold(fit, settings.unseen_tables_reach))
        assert stricter[label] >= per_camera[label]
    # Without the tables' evidence, none; and where two such cameras' training photos share exact tables and a
    # native size (Aster-A1 and A1s: 288x384), they are twins by firmware in the metadata rule, whatever
    # validation's confusion (camid.inference.metadata.firmware_twins); A1 and Boreal-B7 (320x240) share tables only.
    from camid.inference.jpeg_tables import TablePrior

    labels = list(ensemble.labels)
    sharing = {"aster": ("Aster-A1", "Aster-A1s"), "mixed": ("Aster-A1", "Boreal-B7")}
    shared = TablePrior({signature: [int(label in cameras) for label in labels]
                         for signature, cameras in sharing.items()}, labels)
    _, rule, _, metadata = fit_confidence(dataclasses.replace(ensemble, use_tables=False, tables=shared), cache,
                                          settings, **passes)
    assert rule["knn_threshold_camera"] and "knn_threshold_camera_unseen_tables" not in rule
    pair = [t for t in metadata["twins"] if t["cameras"] == ["Aster-A1", "Aster-A1s"]]
    assert len(pair) == 1 and (pair[0]["by"] == FIRMWARE or pair[0]["confused"] >= TWIN_CONFUSION)
    # and neither is the other's far end (openset.camera_thresholds).
    fits = rule["single_device"]
    assert "Aster-A1s" in fits["Aster-A1"]["twins_left_out"] and "Aster-A1" in fits["Aster-A1s"]["twins_left_out"]
    assert "Boreal-B7" not in [c for t in metadata["twins"] if t["by"] == FIRMWARE for c in t["cameras"]]
    # The same where A1's reference was shot in one quality mode and A1s's in another: their tables differ but are
    # one family (IJG's at 90 and 80, real JPEG headers), and both are Aster's (the catalog's make).
    from PIL import Image

    from camid.inference.jpeg_tables import signature_of_file
    from camid.stages.evaluate import training_firmware_twins

    signatures = []
    for quality in (90, 80):
        Image.new("RGB", (32, 32), (90, 120, 150)).save(tmp_path / f"q{quality}.jpg", quality=quality)
        signatures.append(signature_of_file(tmp_path / f"q{quality}.jpg"))
    modes = TablePrior.fit(signatures, [labels.index("Aster-A1"), labels.index("Aster-A1s")], labels)
    assert len(modes.counts) == 2 and modes.seen_family(str(signatures[0])) == [str(signatures[1])]
    one_device = np.zeros(len(labels), dtype=bool)
    pair = (labels.index("Aster-A1"), labels.index("Aster-A1s"))
    makes = [{"label": label, "make": label.split("-")[0]} for label in labels]  # as the bundle's catalog entries
    assert pair in training_firmware_twins(dataclasses.replace(ensemble, tables=modes, cameras=makes), cache,
                                           one_device)
    exact_only = TablePrior(modes.counts, labels)  # the same signatures without their tables: no family test
    assert pair not in training_firmware_twins(dataclasses.replace(ensemble, tables=exact_only, cameras=makes), cache,
                                               one_device)
    other_maker = [{**camera, "make": "Boreal"} if camera["label"] == "Aster-A1s" else camera for camera in makes]
    assert pair not in training_firmware_twins(dataclasses.replace(ensemble, tables=modes, cameras=other_maker), cache,
                                               one_device)


def test_nearest_camera_is_the_camera_of_the_nearest_training_photo():
    """openset.nearest_camera: the camera whose k-th nearest training photo lies nearest (the benches compare it
    with the network's closest camera). A query beside one photo of a camera whose others lie far: k=1 follows
    that photo, k=2 the camera whose photos lie together."""
    from camid.inference.openset import nearest_camera, unit

    bank = unit(np.array([[1, 0, 0], [0, 1, 0], [0.9, 0.1, 0], [0.8, 0.2, 0], [0, 0, 1]], dtype=np.float32))
    bank_labels = np.array([0, 0, 1, 1, 2])
    query = unit(np.array([[1, 0.01, 0], [0.85, 0.15, 0], [0.1, 0, 1]], dtype=np.float32))
    assert list(nearest_camera(query, bank, bank_labels, 3)) == [0, 1, 2]
    assert list(nearest_camera(query[:1], bank, bank_labels, 3, k=2)) == [1]  # camera 0's 2nd photo lies far
