"""The training plan: patches per decode, steps and epochs from the photos and a time budget (camid.tools.plan),
and `camid catalog from-folder` writing it into params.yaml."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest

from camid.config import load_params
from camid.errors import CamidError
from camid.tools.plan import (MAX_COVERAGE, MAX_EPOCHS, MIN_EPOCHS, NETWORK_S_PER_MEGAPIXEL, Photos,
                              measure_network, plan_training, time_network_fit)
from tests.conftest import ROOT
from tests.test_catalog import jpeg, run_catalog

REAL = Photos(train=105, held_out=45, val=22, megapixels=14.0)   # issue 22: about 150 reference photos of 14 MP
ZOO = Photos(train=448, held_out=192, val=96, megapixels=0.11)


def test_large_photos_get_many_patches_per_decode_and_the_plan_fits_the_budget():
    plan = plan_training(REAL, budget_s=15 * 60, cores=2)
    assert plan.crops_per_decode > 8 and plan.limited_by == "time"
    assert plan.total_s <= 15 * 60 * 1.02 and plan.seconds["train"] > 0.5 * plan.total_s
    assert MIN_EPOCHS <= plan.epochs <= MAX_EPOCHS
    assert plan.params() == {"train.crops_per_decode": plan.crops_per_decode,
                             "train.steps_per_epoch": plan.steps_per_epoch, "train.epochs": plan.epochs}
    small = plan_training(ZOO, budget_s=15 * 60, cores=2)
    assert small.crops_per_decode == 8  # a 0.1-MP photo decodes in a millisecond: no need to cut more from it


def test_more_time_or_cores_buy_more_steps_until_coverage_stops_them():
    short, long = (plan_training(REAL, budget_s=minutes * 60, cores=2) for minutes in (10, 20))
    assert long.steps_per_epoch * long.epochs > 1.5 * short.steps_per_epoch * short.epochs
    four = plan_training(REAL, budget_s=10 * 60, cores=4)
    assert four.steps_per_epoch * four.epochs > short.steps_per_epoch * short.epochs
    few = Photos(train=20, held_out=10, val=5, megapixels=0.3)  # little to learn from: coverage stops it early
    plan = plan_training(few, budget_s=60 * 60, cores=2)
    assert plan.limited_by == "coverage" and plan.coverage <= MAX_COVERAGE * 1.01 and plan.total_s < 60 * 60 / 2


def test_a_costlier_front_end_gets_fewer_steps_in_the_same_budget():
    srm, learned = (plan_training(REAL, budget_s=15 * 60, cores=2, arch=arch) for arch in ("smallcnn", "smallcnn_learned"))
    assert learned.steps_per_epoch * learned.epochs < srm.steps_per_epoch * srm.epochs
    assert learned.total_s <= 15 * 60 * 1.02


def test_from_folder_prints_the_plan_and_writes_it_unless_told_to_keep_the_train_block(tmp_path, capsys):
    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    for camera, model in (("Cam-A", "A1"), ("Cam-B", "B7")):
        for i in range(12):
            jpeg(tmp_path / "photos" / camera / f"{i}.jpg", model, serial="ONE", size=(480, 640))
    before = load_params(params_file).train
    run_catalog(tmp_path / "photos", params_file, minutes=6)
    out = capsys.readouterr().out
    assert "training plan for 24 photos (16 train, 8 validation and test" in out and "a 6.0 min budget" in out
    assert "expected dvc repro:" in out
    after = load_params(params_file).train
    assert (after.epochs, after.steps_per_epoch) != (before.epochs, before.steps_per_epoch)
    assert f"train.epochs: {before.epochs} -> {after.epochs}" in out
    with pytest.raises(CamidError, match="--train-cost must be a positive number"):
        run_catalog(tmp_path / "photos", params_file, minutes=6, network_s_per_mp=0.0, force=True)
    shutil.copy(ROOT / "params.yaml", params_file)
    run_catalog(tmp_path / "photos", params_file, minutes=None)
    assert "training plan" not in capsys.readouterr().out and load_params(params_file).train == before


def test_no_plan_for_backbones_its_costs_were_not_measured_for(tmp_path, capsys):
    from camid.tools.profile import set_params

    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    set_params({"train.archs": ["mobilenet"]}, str(params_file))
    for i in range(3):
        jpeg(tmp_path / "photos" / "Cam-A" / f"{i}.jpg", "A1")
    before = load_params(params_file).train
    run_catalog(tmp_path / "photos", params_file)
    assert "no training plan: train.archs is ['mobilenet']" in capsys.readouterr().out
    assert load_params(params_file).train == before


@pytest.mark.parametrize("cores", [1, 2, 16])
def test_the_plan_is_plain_numbers_params_yaml_can_hold(cores):
    plan = plan_training(REAL, cores=cores)
    assert all(isinstance(v, int) and v > 0 for v in plan.params().values())


def test_the_plan_counts_photos_with_the_split_stages_own_dealing():
    """expected_photos deals the catalog's photos with camid.data.splitting.device_split: whole devices where a
    camera has three or more, photo splits of split.photo_fraction otherwise."""
    from camid.config import SplitParams
    from camid.data.splitting import device_split
    from camid.tools.catalog import expected_photos

    def record(device, height=1000):
        return {"error": None, "format": "JPEG", "edited": False, "model": "X", "height": height, "width": 2000,
                "device": device}

    many = [record(f"d{i % 4}") for i in range(4 * 9 + 2)]  # four devices of 9-10 photos
    one = [record("only") for _ in range(20)]
    split = SplitParams()
    photos = expected_photos({"Many": many, "One": one}, split)
    assert photos.total == 58 and photos.megapixels == 2.0
    sets = device_split(pd.DataFrame([{"path": f"One/{i}", "label": "One", "device": "only"} for i in range(20)]),
                        split.val_fraction, split.test_fraction, split.seed, split.photo_fraction)[0]
    held_many = photos.held_out - len(sets["val"]) - len(sets["test"])
    assert held_many in (19, 20)  # two whole devices of the four (9 or 10 photos each), not a share of photos

    # Training draws a camera uniformly, then one of its photos: a camera of few large photos is decoded as often as
    # one of many small ones, so a training decode costs the mean of the cameras' mean sizes.
    large = [record("big", height=5000) for _ in range(10)]
    photos = expected_photos({"Many": many, "Large": large}, split)
    assert photos.megapixels == (38 * 2.0 + 10 * 10.0) / 48 and photos.decoded_megapixels == (2.0 + 10.0) / 2


def test_the_plan_scales_the_networks_costs_by_this_machines_measured_speed():
    """Machines of the same core count differ several-fold in what the network costs: the plan takes this
    machine's measured figure (camid catalog from-folder measures it) and buys fewer steps where it is slower,
    within the same budget; measured as fast as the reference machine, it is the reference's plan."""
    measured = measure_network("smallcnn", 64, 32, steps=2)
    assert 0.0 < measured < 100.0
    # The figure is the median of the timed windows inside one fit (whole short fits ran on one core at times).
    cost = time_network_fit("smallcnn", 16, 4, steps=2, warmup=1, repeats=3)
    assert len(cost["wall_s_each"]) == 3 and cost["wall_s"] == sorted(cost["wall_s_each"])[1]
    median = cost["wall_s_each"].index(cost["wall_s"])  # each timing's CPU seconds beside its wall seconds
    assert len(cost["cpu_s_each"]) == 3 and cost["cpu_s"] == cost["cpu_s_each"][median] and min(cost["cpu_s_each"]) > 0
    reference = NETWORK_S_PER_MEGAPIXEL["smallcnn"]
    estimate = plan_training(REAL, budget_s=15 * 60, cores=2)
    assert plan_training(REAL, budget_s=15 * 60, cores=2, network_s_per_mp=reference).params() == estimate.params()
    slow = plan_training(REAL, budget_s=15 * 60, cores=2, network_s_per_mp=4 * reference)
    assert slow.steps_per_epoch * slow.epochs < 0.5 * estimate.steps_per_epoch * estimate.epochs
    assert slow.total_s <= 15 * 60 * 1.02
    assert f"this machine trains smallcnn at {4 * reference:.2f} s per megapixel of patches" in "\n".join(slow.lines(REAL))
