"""The evaluate stage's roles: validation chooses the test-time settings, test is only scored and reported."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from camid.errors import CamidError
from camid.tiny import inside


@pytest.fixture(scope="module")
def evaluated(tiny_model, tmp_path_factory):
    from camid.config import load_params
    from camid.stages.evaluate import evaluate
    from camid.tiny import ROOT

    out = tmp_path_factory.mktemp("evaluated")
    settings = load_params(ROOT / "params.yaml").evaluate
    with inside(tiny_model.root, MLFLOW_TRACKING_URI=tiny_model.tracking_uri, MLFLOW_EXPERIMENT_NAME="camid-tests"):
        metrics = evaluate(tiny_model.members, tiny_model.root / "cache", out / "bundle", settings,
                           metrics_file=out / "metrics.json", plots_file=out / "plots.csv",
                           figure_file=out / "confusion.png")
    return metrics, out, settings


def test_figures_are_on_the_test_devices_only(tiny_model, evaluated):
    metrics, out, _ = evaluated
    split_dir = tiny_model.root / "split"
    sets = {name: pd.read_csv(split_dir / f"{name}.csv", keep_default_na=False) for name in ("train", "val", "test")}
    assert metrics["split"] == "test" and metrics["images"] == len(sets["test"]) == len(tiny_model.test)
    assert metrics["device_disjoint"] and metrics["full_image"]["photos"] == len(sets["test"])
    assert not set(sets["test"].device) & set(sets["train"].device) | set(sets["val"].device) & set(sets["test"].device)
    assert json.loads((out / "metrics.json").read_text())["weighted_accuracy"] == metrics["weighted_accuracy"]
    assert len(pd.read_csv(out / "plots.csv")) == 9 * len(sets["test"])


def test_the_chosen_settings_are_the_validation_optimum_and_are_stored_in_the_bundle(tiny_model, evaluated):
    """Scoring every candidate on val again gives back the stored choice and its score; on test the model's
    own setting is what the headline figure reports. One pass scores every D4 view (`score`), so each candidate's
    figure is read from it."""
    from camid.core.metrics import weighted_accuracy
    from camid.inference.blending import blend
    from camid.inference.scoring import ALL_VIEWS, score
    from camid.inference.ensemble import Ensemble
    from camid.inference.tta import D4

    metrics, out, settings = evaluated
    spec = json.loads((out / "bundle" / "ensemble.json").read_text())
    assert spec["views"][0] == 0 and [D4[v] for v in spec["views"]] == metrics["views"]
    assert spec["selection"]["val_weighted_accuracy_pixels_only"] >= spec["selection"][
        "val_weighted_accuracy_pixels_only_no_tta"]
    ensemble = Ensemble.load(out / "bundle")
    assert ensemble.views == tuple(spec["views"]) and ensemble.use_tables == metrics["jpeg_tables"]
    cache = tiny_model.root / "cache"
    on_val, table, member_views = score(ensemble, cache, settings, split="val")
    assert on_val["weighted_accuracy"] == pytest.approx(spec["selection"]["val_weighted_accuracy"])
    actual = np.asarray([ensemble.labels.index(label) for label in table.actual])

    def pixels_only(views) -> float:
        chosen = member_views[:, list(views)]
        probs = blend(chosen.reshape(-1, *chosen.shape[2:]), settings.blend)
        return weighted_accuracy(actual, probs.argmax(1), table.manipulation.to_numpy() > 0)

    assert pixels_only(spec["views"]) == pytest.approx(on_val["weighted_accuracy_pixels_only"])
    for view in ALL_VIEWS[1:]:
        if view not in spec["views"]:  # a view left out would not have raised the validation score
            assert pixels_only(tuple(spec["views"]) + (view,)) <= on_val["weighted_accuracy_pixels_only"] + 1e-12
    assert metrics["weighted_accuracy"] == pytest.approx(
        metrics["comparison"]["chosen_views"]["with_jpeg_tables" if metrics["jpeg_tables"] else "pixels_only"])


def test_the_tables_are_kept_where_they_only_trade_one_twin_for_the_other():
    """Cameras 0 and 1 are twins (the pixels split their photos half and half), camera 2 another model. The
    twins' references each carried a per-scene table the other's did not, and their validation photos the other
    one's: scored per camera the tables cost the twins' photos and would be dropped, with everything else they
    tell (the firmware ground of `unknown` goes with them); scored with the twins as one camera, they cost nothing
    and are kept. Tables that cost two cameras that are not twins are still dropped."""
    import dataclasses
    from types import SimpleNamespace

    from camid.config import load_params
    from camid.data.dataset import EvalSet
    from camid.inference.jpeg_tables import TablePrior
    from camid.inference.scoring import ValidationScores
    from camid.stages.evaluate import choose_settings, twin_groups
    from camid.tiny import ROOT

    assert twin_groups(5, [(3, 1), (1, 4)]).tolist() == [0, 1, 2, 1, 1]
    settings = dataclasses.replace(load_params(ROOT / "params.yaml").evaluate, tta=False, jpeg_tables=True)
    labels = ["A", "B", "C"]
    rng = np.random.default_rng(0)
    actual = np.repeat([0, 1, 2], 8)
    probs = np.zeros((24, 3))
    lean = rng.permutation(np.tile([0.6, 0.4], 8))  # the twins' photos lean half to the right twin, half not
    probs[:16, 0], probs[:16, 1] = lean, 1 - lean
    probs[16:, 2], probs[16:, 0] = 0.9, 0.1
    swapped = {0: "table B", 1: "table A", 2: "table C"}  # each twin's validation photos carry the other's table
    signatures = [swapped[int(c)] for c in actual]
    tables = TablePrior({"table A": [3, 0, 0], "table B": [0, 3, 0], "table C": [0, 0, 3]}, labels)
    evalset = EvalSet(labels=actual, manipulation=np.zeros(24, int), image_id=np.arange(24),
                      path=np.array([f"{i}.jpg" for i in range(24)], dtype=object), camera_labels=tuple(labels),
                      images=np.zeros((24, 1, 1, 3), np.uint8))
    val = ValidationScores(evalset=evalset, member_views=probs[None, None], signatures=signatures)
    ensemble = SimpleNamespace(labels=labels, background=np.zeros(3, dtype=bool))
    _, use_tables, selection = choose_settings(ensemble, val, settings, tables)
    assert selection["val_twins_for_jpeg_tables"] == [["A", "B"]] and use_tables
    assert selection["val_weighted_accuracy_with_jpeg_tables"] < selection["val_weighted_accuracy_pixels_only"]
    assert selection["val_weighted_accuracy_with_jpeg_tables_twins_merged"] == pytest.approx(1.0)
    # Not twins: the pixels tell A from B, and the tables (each swapped) cost them: dropped.
    probs[:8, :2], probs[8:16, :2] = [0.7, 0.3], [0.3, 0.7]
    val = ValidationScores(evalset=evalset, member_views=probs[None, None], signatures=signatures)
    _, use_tables, selection = choose_settings(ensemble, val, settings, tables)
    assert selection["val_twins_for_jpeg_tables"] == [] and not use_tables


def test_jpeg_table_evidence_counts_the_training_photos_only(tiny_model, evaluated):
    from camid.inference.jpeg_tables import TablePrior, signature_of_file

    _, out, _ = evaluated
    prior = TablePrior.read(out / "bundle")
    train = pd.read_csv(tiny_model.root / "split" / "train.csv", keep_default_na=False)
    assert sum(map(sum, prior.counts.values())) == len(train)
    per_camera = np.array(list(prior.counts.values())).sum(axis=0)
    assert per_camera.tolist() == [int((train.label == label).sum()) for label in tiny_model.labels]
    assert all(signature_of_file(p) in prior.counts for p in train.path)


def test_calibration_temperatures_are_fitted_on_val_stored_and_change_no_answer(tiny_model, evaluated):
    import dataclasses

    from camid.stages.evaluate import fit_confidence
    from camid.inference.ensemble import Ensemble

    metrics, out, settings = evaluated
    spec = json.loads((out / "bundle" / "ensemble.json").read_text())
    # With the JPEG tables, answers they enter and answers from the pixels alone each have their own scale.
    settings_fitted = {"patch", "photo"} | ({"patch_pixels_only", "photo_pixels_only"} if metrics["jpeg_tables"] else set())
    assert set(spec["temperature"]) == set(spec["open_set"]["threshold"]) == settings_fitted
    assert ("open_set_pixels_only" in metrics["full_image"]) == ("calibration_pixels_only" in metrics) \
        == metrics["jpeg_tables"]
    ensemble = Ensemble.load(out / "bundle")
    uncalibrated = dataclasses.replace(ensemble, temperature={})
    refit, open_set, _, _ = fit_confidence(uncalibrated, tiny_model.root / "cache", settings)
    assert refit == pytest.approx(spec["temperature"], rel=1e-6)  # the validation optimum, nothing else
    assert open_set["threshold"] == pytest.approx(spec["open_set"]["threshold"], rel=1e-6)
    assert metrics["calibration"]["temperature"] == pytest.approx(spec["temperature"]["patch"])
    assert {"ece_before", "ece_after"} <= set(metrics["calibration"]) <= {"ece_before", "ece_after", "temperature"}
    assert set(metrics["full_image"]["calibration"]) == {"temperature", "ece_before", "ece_after"}
    patches = np.stack([np.zeros((ensemble.patch, ensemble.patch, 3), np.uint8) + i for i in range(0, 250, 50)])
    flags = np.array([False] * len(patches))
    with_t, without = ensemble.predict(patches, flags), uncalibrated.predict(patches, flags)
    assert np.array_equal(with_t.labels, without.labels)
    assert not np.allclose(with_t.probs, without.probs) or spec["temperature"]["patch"] == pytest.approx(1.0)


@pytest.mark.parametrize("field,value,message", [("open_set_accept", 0.0, "evaluate.open_set_accept is 0.0"),
                                                 ("single_device_reach", 1.5, "evaluate.single_device_reach is 1.5"),
                                                 ("unseen_tables_reach", -0.1, "evaluate.unseen_tables_reach is -0.1"),
                                                 ("unseen_tables_reach", 0.8, r"unseen_tables_reach \(0.8\) is above")])
def test_open_set_settings_out_of_range_are_refused_before_any_work(tmp_path, field, value, message):
    import dataclasses

    from camid.config import EvaluateParams
    from camid.stages.evaluate import evaluate

    settings = dataclasses.replace(EvaluateParams(), **{field: value})
    with pytest.raises(CamidError, match=message):
        evaluate([tmp_path / "model"], tmp_path / "cache", tmp_path / "bundle", settings,
                 metrics_file=tmp_path / "m.json", plots_file=tmp_path / "p.csv")
    assert not (tmp_path / "bundle").exists()
