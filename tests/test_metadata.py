"""EXIF against pixels at the resolution the pixels have: camera groups, validation twins, and `consistent`."""
from __future__ import annotations

import numpy as np

from camid.inference.metadata import (FIRMWARE, INCONSISTENT_BELOW, VALIDATION, camera_groups, firmware_twins,
                                      fit_metadata, fit_twins, metadata_check)

LABELS = ["Nikon-D70", "Nikon-D70s", "Nikon-D200", "Canon-450D"]
CATALOG = [{"label": "Nikon-D70", "make": "NIKON", "models": ["NIKON D70"]},
           {"label": "Nikon-D70s", "make": "NIKON", "models": ["NIKON D70s"]},
           {"label": "Nikon-D200", "make": "NIKON", "models": ["NIKON D200"]},
           {"label": "Canon-450D", "make": "Canon", "models": ["Canon EOS 450D"]}]


def check(models, probs, metadata=None):
    probs = np.asarray(probs, dtype=float)
    groups = camera_groups(probs, probs.argmax(1), LABELS, metadata)
    return groups, metadata_check(CATALOG, models, probs, groups, LABELS, metadata)


def test_a_genuine_photo_of_a_twin_is_not_read_as_a_forgery():
    """The D70s photo the pixels read D70 at 0.6 against 0.4: both in the group, EXIF consistent."""
    groups, (named, consistent) = check(["NIKON D70s"], [[0.6, 0.4, 0.0, 0.0]])
    assert groups == [["Nikon-D70", "Nikon-D70s"]] and named == ["Nikon-D70s"] and consistent == [True]


def test_exif_is_contradicted_only_where_the_pixels_give_its_camera_little():
    models = ["Canon EOS 450D", "Canon EOS 450D", "NIKON D200", "Phone 9000", None]
    probs = [[0.97, 0.02, 0.0, 0.01],      # Canon at 1%: the pixels say otherwise
             [0.80, 0.10, 0.0, 0.10],      # Canon at 10%: not the closest, but not excluded either
             [0.05, 0.05, 0.90, 0.0],
             [0.25, 0.25, 0.25, 0.25],     # EXIF names a camera outside the catalog
             [0.25, 0.25, 0.25, 0.25]]     # no EXIF Model: nothing to check
    groups, (named, consistent) = check(models, probs)
    assert named == ["Canon-450D", "Canon-450D", "Nikon-D200", "", ""]
    assert consistent == [False, True, True, False, None]
    assert groups[0] == ["Nikon-D70"] and groups[3] == LABELS  # a flat answer: every camera as likely


def test_exif_naming_no_catalog_camera_is_undecided_where_pixels_and_tables_disagree():
    """EXIF naming no catalog camera: contradicted where the pixels point to one (False), agreed with where they
    point to none (`background`, True), undecided where the answer's grounds split (`split`: the pixels accept a
    catalog camera, the JPEG tables reject every one, None)."""
    probs = np.array([[0.97, 0.01, 0.01, 0.01]] * 3)
    groups = camera_groups(probs, probs.argmax(1), LABELS)
    named, consistent = metadata_check(CATALOG, ["Phone 9000"] * 3, probs, groups, LABELS, None,
                                       background=[False, True, False], split=[False, False, True])
    assert named == ["", "", ""] and consistent == [False, True, None]


def test_validation_twins_widen_the_group_and_are_reported():
    actual = np.repeat([0, 1, 2, 3], 10)
    probs = np.eye(4)[actual] * 0.9 + 0.025
    probs[10:16] = [0.7, 0.2, 0.05, 0.05]   # six D70s photos read D70
    twins = fit_twins(probs, actual, LABELS)
    assert [t["cameras"] for t in twins] == [["Nikon-D70", "Nikon-D70s"]] and twins[0]["confused"] == 6 / 20
    rule = fit_metadata(probs, probs, actual, LABELS)
    assert rule["twins"] == twins and rule["inconsistent_below"] == INCONSISTENT_BELOW and rule["fitted_on"] == 40
    assert rule["val_false_alarms"] == 0.0
    # 0.15 is under half the D70's 0.8, but the D70s is its twin: the group says "D70 or D70s"
    row = [[0.8, 0.15, 0.05, 0.0]]
    assert check(["NIKON D70s"], row)[0] == [["Nikon-D70"]]
    groups, (_, consistent) = check(["NIKON D70s"], row, rule)
    assert groups == [["Nikon-D70", "Nikon-D70s"]] and consistent == [True]


def test_a_twin_named_by_exif_is_never_contradicted_however_sure_the_network_is():
    """One reference device per model: the network learns each twin's reference device and may give a genuine
    D70s photo of another device 0.995 D70. Validation found the pair twins, so the pixels cannot say which of the
    two took it: consistent. A camera that is no twin at the same probability is still contradicted, and
    validation counts the twin's photo as no false alarm."""
    twins = {"inconsistent_below": INCONSISTENT_BELOW,
             "twins": [{"cameras": ["Nikon-D70", "Nikon-D70s"], "confused": 0.4, "photos": 20}]}
    row = [[0.995, 0.004, 0.001, 0.0]]
    groups, (_, consistent) = check(["NIKON D70s"], row, twins)
    assert groups == [["Nikon-D70"]] and consistent == [True]  # under a tenth of the lead: not in the group
    assert check(["NIKON D70s"], row)[1][1] == [False]  # without the twins: read as a forgery
    assert check(["NIKON D200"], row, twins)[1][1] == [False]
    actual = np.repeat([0, 1, 2, 3], 10)
    probs = np.eye(4)[actual] * 0.9 + 0.025
    probs[10:14] = [0.97, 0.01, 0.01, 0.01]  # four D70s photos read D70 at 0.97: twins, no false alarm
    probs[20] = [0.01, 0.01, 0.01, 0.97]      # a D200 photo read Canon at 0.97: a false alarm
    rule = fit_metadata(probs, probs, actual, LABELS)
    assert [t["cameras"] for t in rule["twins"]] == [["Nikon-D70", "Nikon-D70s"]]
    assert rule["val_false_alarms"] == 1 / 40


def test_one_reference_device_cameras_with_the_same_tables_and_size_are_twins_by_firmware():
    """With one reference device per model, validation measures how the network tells the two reference *devices*
    apart. The D70 and D70s reference photos were told apart on every validation photo, but nothing besides the
    pixels separates the two models (same tables, same size): firmware twins, so a genuine D70s photo of another
    device that the network reads D70 at 0.995 is consistent. The D200 shares a table with the D70 but not its
    size; the Canon shares both with nobody. Cameras whose validation held unseen devices are not paired."""
    same, d200, canon = (3008, 2000), (3872, 2592), (4272, 2848)
    counts = {"nikon-fine": [5, 4, 0, 0], "nikon-normal": [2, 0, 6, 0], "canon": [0, 0, 0, 9]}
    sizes = {0: {same}, 1: {same}, 2: {d200}, 3: {canon}}
    assert firmware_twins(counts, sizes, single={0, 1, 2, 3}) == [(0, 1)]
    assert firmware_twins(counts, sizes, single={1}) == [(0, 1)]  # one of the two is enough
    assert firmware_twins(counts, sizes, single={2, 3}) == []      # both had devices validation never saw
    assert firmware_twins(counts, {**sizes, 2: {same, d200}}, single={0, 1, 2, 3}) == [(0, 1), (0, 2)]
    # The two references shot in different quality modes of one firmware's table family: twins too, given the
    # family (TablePrior.seen_family); without it, or at another size, not.
    # Only within one maker: IJG's family is written by many makers' firmware.
    modes = {"nikon-fine": [5, 0, 0, 0], "nikon-normal": [0, 4, 0, 0], "canon": [0, 0, 0, 9]}
    kin = {"nikon-fine": ["nikon-normal"], "nikon-normal": ["nikon-fine"]}
    makes = {0: "NIKON CORPORATION", 1: "NIKON", 2: "NIKON CORPORATION", 3: "Canon"}

    def family(sig):
        return kin.get(sig, [])
    assert firmware_twins(modes, sizes, single={0, 1, 2, 3}) == []
    assert firmware_twins(modes, sizes, {0, 1, 2, 3}, family, makes) == [(0, 1)]
    assert firmware_twins(modes, sizes, {0, 1, 2, 3}, family) == []  # no makes: exact tables only
    assert firmware_twins(modes, sizes, {0, 1, 2, 3}, family, {**makes, 1: "Sony"}) == []
    assert firmware_twins(modes, sizes, {2, 3}, family, makes) == []
    assert firmware_twins(modes, {**sizes, 1: {d200}}, {0, 1}, family, makes) == []
    actual = np.repeat([0, 1, 2, 3], 10)
    probs = np.eye(4)[actual] * 0.9 + 0.025  # validation separates every reference device
    assert fit_twins(probs, actual, LABELS) == []
    rule = fit_metadata(probs, probs, actual, LABELS, firmware=firmware_twins(counts, sizes, {0, 1, 2, 3}))
    assert rule["twins"] == [{"cameras": ["Nikon-D70", "Nikon-D70s"], "confused": 0.0, "photos": 20, "by": FIRMWARE}]
    row = [[0.995, 0.004, 0.001, 0.0]]
    assert check(["NIKON D70s"], row)[1][1] == [False]
    assert check(["NIKON D70s"], row, rule)[1][1] == [True]
    assert check(["NIKON D200"], row, rule)[1][1] == [False]
    probs[10:14] = [0.7, 0.2, 0.05, 0.05]  # validation confuses them too: one entry, found by validation
    assert [(t["cameras"], t["by"]) for t in fit_twins(probs, actual, LABELS, firmware=[(1, 0)])] == \
        [(["Nikon-D70", "Nikon-D70s"], VALIDATION)]


def test_a_contradiction_at_a_size_the_exif_cameras_reference_lacks_is_undecided():
    """The same pixels contradict the EXIF camera at one of its reference sizes, and are undecided at another size
    (a size mode its reference never shot, or a crop); a camera whose sizes the catalog does not record, and a photo
    whose size is not known, keep the plain check."""
    sized = [dict(c, sizes=[[2000, 3008]]) if c["label"] == "Canon-450D" else c for c in CATALOG]
    probs = np.array([[0.97, 0.02, 0.0, 0.01]] * 4)
    groups = camera_groups(probs, probs.argmax(1), LABELS)
    named, consistent = metadata_check(sized, ["Canon EOS 450D"] * 3 + ["NIKON D200"], probs, groups, LABELS,
                                       sizes=[(3008, 2000), (1000, 1504), None, (1000, 1504)])
    assert named == ["Canon-450D"] * 3 + ["Nikon-D200"]
    assert consistent == [False, None, False, False]
