"""The split stage: train / val / test share no device; too few devices fall back to a photo split, named."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from camid.cli import main
from camid.errors import CamidError
from camid.stages.split import device_split, split

LABELS = ["Cam-A", "Cam-B", "Cam-C"]


def photo(path: Path, serial: str | None = None, seed: int = 0, taken: str | None = None) -> Path:
    """A real JPEG, with the EXIF BodySerialNumber a camera writes when `serial` is given, and DateTimeOriginal
    when `taken` is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if serial:
        exif.get_ifd(0x8769)[0xA431] = serial
    if taken:
        exif.get_ifd(0x8769)[0x9003] = taken
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def read_sets(out: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(out / f"{name}.csv", keep_default_na=False) for name in ("train", "val", "test")}


def test_no_device_has_photos_in_two_sets(tmp_path):
    """Devices from EXIF serials (Cam-A, Cam-B) and from <label>/<device>/ folders (Cam-C)."""
    root = tmp_path / "filtered"
    for label, devices in (("Cam-A", 5), ("Cam-B", 3)):
        for d in range(devices):
            for i in range(4):
                photo(root / label / f"{label}-{d}-{i}.jpg", serial=f"{label}-SN{d}", seed=d * 10 + i)
    for d in range(4):
        for i in range(3):
            photo(root / "Cam-C" / f"dev{d}" / f"{i}.jpg", seed=100 + d * 10 + i)
    summary = split(root, tmp_path / "split", LABELS, val_fraction=0.25, test_fraction=0.25, seed=7,
                    metrics_file=tmp_path / "split.json")
    sets = read_sets(tmp_path / "split")
    for label in LABELS:
        owners = {}
        for name, table in sets.items():
            for device in table.loc[table.label == label, "device"]:
                assert owners.setdefault(device, name) == name, f"{device} is in {owners[device]} and {name}"
        assert set(owners.values()) == {"train", "val", "test"}  # every set has a device of every camera
    assert sets["train"].device.str.startswith("serial:").sum() > 0
    assert set(sets["test"].loc[sets["test"].label == "Cam-C", "device"]) <= {f"folder:dev{d}" for d in range(4)}
    assert summary["device_disjoint"] and summary["fallback_cameras"] == []
    assert summary["cameras"]["Cam-A"]["devices"] == {"train": 3, "val": 1, "test": 1}
    assert json.loads((tmp_path / "split.json").read_text()) == summary
    all_paths = pd.concat(sets.values()).path
    assert all_paths.is_unique and len(all_paths) == 5 * 4 + 3 * 4 + 4 * 3


def test_few_devices_fall_back_to_a_photo_split_and_say_so(tmp_path, caplog):
    root = tmp_path / "filtered"
    for i in range(6):
        photo(root / "Cam-A" / f"a{i}.jpg", serial=f"SN{i % 2}", seed=i)      # two devices
        photo(root / "Cam-B" / f"b{i}.jpg", serial="ONLY", seed=10 + i)       # one device
        photo(root / "Cam-C" / f"c{i}.jpg", seed=20 + i)                      # no device known
    summary = split(root, tmp_path / "split", LABELS, val_fraction=0.25, test_fraction=0.25, seed=1)
    sets = read_sets(tmp_path / "split")
    modes = {label: summary["cameras"][label]["mode"] for label in LABELS}
    assert modes == {"Cam-A": "val_photo_split", "Cam-B": "photo_split", "Cam-C": "photo_split"}
    assert not summary["device_disjoint"] and summary["fallback_cameras"] == LABELS
    # With two devices, test still has a device of its own.
    test_a = set(sets["test"].loc[sets["test"].label == "Cam-A", "device"])
    rest_a = set(pd.concat([sets["train"], sets["val"]]).query("label == 'Cam-A'").device)
    assert len(test_a) == 1 and not test_a & rest_a
    assert "device identification" in caplog.text and "Cam-B" in caplog.text


def test_a_photo_split_holds_out_photo_fraction_for_val_and_for_test():
    """One reference device: every photo held out is one training cannot use, and its test figure measures the
    device whatever its size, so a photo split holds out `photo_fraction` (0.15) each, not the device shares."""
    one = pd.DataFrame({"path": [f"p{i:02d}" for i in range(40)], "label": "Cam-A", "device": "serial:ONLY"})
    sets, modes = device_split(one, 0.25, 0.25, seed=3)
    assert modes == {"Cam-A": "photo_split"}
    assert {name: len(table) for name, table in sets.items()} == {"train": 28, "val": 6, "test": 6}
    two = pd.DataFrame({"path": [f"p{i:02d}" for i in range(40)], "label": "Cam-A",
                        "device": ["serial:A"] * 30 + ["serial:B"] * 10})
    sets, modes = device_split(two, 0.25, 0.25, seed=3, photo_fraction=0.2)
    assert modes == {"Cam-A": "val_photo_split"} and len(sets["test"]) in (10, 30)
    assert len(sets["val"]) == round(0.2 * (40 - len(sets["test"])))
    with pytest.raises(CamidError, match="photo_fraction"):
        device_split(one, 0.25, 0.25, seed=3, photo_fraction=0.5)


def test_a_photo_split_holds_out_runs_of_consecutive_shots_in_capture_order(tmp_path):
    """A device's photos come in bursts of one scene: a held-out photo next in time to a training photo would be
    scored against its own scene. Each held-out set is one run of consecutive shots, ordered by EXIF
    DateTimeOriginal (the file names here are in another order, as hashed names are), not by name."""
    root = tmp_path / "filtered"
    order = np.random.default_rng(0).permutation(20)  # shot i is written under a name that sorts at place order[i]
    for shot, place in enumerate(order):
        photo(root / "Cam-A" / f"{place:02d}.jpg", serial="ONLY", seed=shot,
              taken=f"2024:05:01 10:{shot // 6:02d}:{shot % 6 * 10:02d}")
    for i in range(6):
        photo(root / "Cam-B" / f"b{i}.jpg", serial="ONE", seed=100 + i)  # no capture time: file name order
    for seed in (1, 2, 3):
        summary = split(root, tmp_path / f"split{seed}", ["Cam-A", "Cam-B"], val_fraction=0.25, test_fraction=0.25,
                        seed=seed, photo_fraction=0.2)
        assert summary["cameras"]["Cam-A"]["mode"] == "photo_split"
        assert summary["cameras"]["Cam-A"]["photos_with_capture_time"] == 20
        assert summary["cameras"]["Cam-B"]["photos_with_capture_time"] == 0
        sets = read_sets(tmp_path / f"split{seed}")
        shot_of = {f"{place:02d}.jpg": shot for shot, place in enumerate(order)}
        shots = {name: sorted(shot_of[Path(p).name] for p in table.loc[table.label == "Cam-A", "path"])
                 for name, table in sets.items()}
        assert len(shots["test"]) == 4 and len(shots["val"]) == 4 and len(shots["train"]) == 12
        assert shots["test"] == list(range(shots["test"][0], shots["test"][0] + 4))
        # val is a run of the photos left once test is out: consecutive among them
        left = [shot for shot in range(20) if shot not in shots["test"]]
        first = left.index(shots["val"][0])
        assert shots["val"] == left[first:first + 4]
        b_names = {name: sorted(Path(p).name for p in table.loc[table.label == "Cam-B", "path"])
                   for name, table in sets.items()}
        assert all(len(b_names[name]) == 1 for name in ("val", "test"))
        assert list(sets["train"].columns) == ["path", "label", "device"]


def test_session_validation_holds_out_a_whole_session_where_the_photos_are_several(tmp_path):
    """Real references come as sessions: the DJI's 5-photo device is four shots of four minutes and one of a year
    later (README). A run of shots kept validation out of training's seconds but not its session: its one photo lay
    as near the training photos as a copy. With split.session_validation, where the photos are several sessions
    (more than SESSION_GAP apart), validation is its share in whole sessions (here one), and test a run of the
    rest; a camera whose sessions are all too large is dealt in runs, and without the option every camera is."""
    root = tmp_path / "filtered"
    for shot in range(10):  # one morning, then two shots a month later
        photo(root / "Cam-A" / f"a{shot:02d}.jpg", serial="ONLY", seed=shot, taken=f"2024:05:01 10:{shot:02d}:00")
    for shot in (10, 11):
        photo(root / "Cam-A" / f"a{shot:02d}.jpg", serial="ONLY", seed=shot, taken=f"2024:06:01 09:{shot:02d}:00")
    for shot in range(12):  # two sessions of six: each more than twice validation's share (2 photos)
        day = 1 + shot // 6
        photo(root / "Cam-B" / f"b{shot:02d}.jpg", serial="ONE", seed=50 + shot,
              taken=f"2024:05:0{day} 10:{shot:02d}:00")
    for seed in (1, 2, 3):
        split(root, tmp_path / f"split{seed}", ["Cam-A", "Cam-B"], val_fraction=0.25, test_fraction=0.25, seed=seed,
              photo_fraction=0.15, by_session=True)
        sets = read_sets(tmp_path / f"split{seed}")
        names = {(name, label): sorted(Path(p).name for p in table.loc[table.label == label, "path"])
                 for name, table in sets.items() for label in ("Cam-A", "Cam-B")}
        assert names["val", "Cam-A"] == ["a10.jpg", "a11.jpg"]
        test = [int(name[1:3]) for name in names["test", "Cam-A"]]
        assert len(test) == 2 and test[1] == test[0] + 1 and test[1] < 10  # a run of the morning
        assert len(names["train", "Cam-A"]) == 8
        val_b = [int(name[1:3]) for name in names["val", "Cam-B"]]
        assert len(val_b) == 2 and val_b[1] == val_b[0] + 1  # a run, not a session of six
        assert len(names["train", "Cam-B"]) == 8
    vals = set()
    for seed in range(1, 7):  # the default: runs of shots, the later session no more often than any other run
        split(root, tmp_path / f"runs{seed}", ["Cam-A"], val_fraction=0.25, test_fraction=0.25, seed=seed,
              photo_fraction=0.15)
        val = read_sets(tmp_path / f"runs{seed}")["val"]
        vals.add(tuple(sorted(Path(p).name for p in val.path)))
    assert len(vals) > 1


def test_session_validation_takes_as_many_whole_sessions_as_its_share_needs():
    """A large reference of many short sessions: validation is not one session of ten photos but its share (30 of 200)
    in whole sessions, consecutive in time; the same seed deals the same sessions."""
    start = pd.Timestamp("2024-01-01 09:00:00")
    taken = [(start + pd.Timedelta(days=i // 10, seconds=5 * (i % 10))).strftime("%Y:%m:%d %H:%M:%S")
             for i in range(200)]
    photos = pd.DataFrame({"path": [f"p{i:03d}" for i in range(200)], "label": "Cam-A", "device": "serial:ONLY",
                           "taken": taken})
    for seed in (1, 2):
        sets, _ = device_split(photos, 0.25, 0.25, seed=seed, photo_fraction=0.15, by_session=True)
        days = sorted({int(p[1:]) // 10 for p in sets["val"].path})
        assert len(sets["val"]) == 30 and len(days) == 3
        assert all(int(p[1:]) // 10 in days for p in photos.path if p in set(sets["val"].path)) and \
            sum(int(p[1:]) // 10 in days for p in photos.path) == 30  # whole days
        assert days in ([d, d + 1, d + 2] for d in range(18)) or days in ([0, 1, 19], [0, 18, 19])  # round to the first
        again, _ = device_split(photos, 0.25, 0.25, seed=seed, photo_fraction=0.15, by_session=True)
        assert list(again["val"].path) == list(sets["val"].path)


def test_sessions_cut_at_an_hour_and_not_where_a_time_is_missing():
    from camid.data.splitting import sessions

    photos = pd.DataFrame({"path": list("abcd"),
                           "taken": ["2024:05:01 10:00:00", "2024:05:01 10:59:00", "2024:05:01 12:00:00",
                                     "2024:05:01 12:30:00"]})
    assert [list(part["path"]) for part in sessions(photos)] == [["a", "b"], ["c", "d"]]
    photos.loc[3, "taken"] = ""
    assert [list(part["path"]) for part in sessions(photos)] == [["a", "b", "c", "d"]]
    assert len(sessions(photos.drop(columns="taken"))) == 1


def test_capture_order_puts_photos_of_no_known_time_last_by_path():
    from camid.data.splitting import in_capture_order

    photos = pd.DataFrame({"path": ["d", "c", "b", "a"], "label": "Cam-A", "device": "x",
                           "taken": ["2020:01:01 00:00:02", "", "2020:01:01 00:00:01", ""]})
    assert list(in_capture_order(photos)["path"]) == ["b", "d", "a", "c"]
    assert list(in_capture_order(photos.drop(columns="taken"))["path"]) == ["a", "b", "c", "d"]


def test_photos_of_unknown_devices_only_ever_train():
    files = pd.DataFrame({"path": [f"p{i}" for i in range(12)], "label": "Cam-A",
                          "device": ["d0", "d1", "d2", "d3"] * 2 + [""] * 4})
    sets, modes = device_split(files, 0.25, 0.25, seed=3)
    assert modes == {"Cam-A": "devices"}
    assert (sets["val"].device != "").all() and (sets["test"].device != "").all()
    assert (sets["train"].device == "").sum() == 4


def test_the_split_is_deterministic_for_a_seed_and_changes_with_it():
    files = pd.DataFrame({"path": [f"p{i}" for i in range(40)], "label": "Cam-A",
                          "device": [f"d{i % 8}" for i in range(40)]})
    first = device_split(files, 0.25, 0.25, seed=5)[0]
    again = device_split(files, 0.25, 0.25, seed=5)[0]
    for name in first:
        pd.testing.assert_frame_equal(first[name], again[name])
    assert any(not set(first["test"].device) == set(device_split(files, 0.25, 0.25, seed=s)[0]["test"].device)
               for s in range(6, 12))


def test_bad_settings_and_too_few_photos_are_clear_errors(tmp_path):
    files = pd.DataFrame({"path": ["a", "b"], "label": "Cam-A", "device": ["", ""]})
    with pytest.raises(CamidError, match="at least 3"):
        device_split(files, 0.25, 0.25, seed=0)
    with pytest.raises(CamidError, match="leave some photos for training"):
        device_split(files, 0.5, 0.5, seed=0)
    assert main(["split", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2


# -- device identity from the raw folder's manifest ------------------------------------------------------------

def raw_and_filtered(tmp_path: Path, photos: dict[str, str | None]) -> tuple[Path, Path]:
    """raw/train/<key> photos (key -> EXIF serial or None) and filtered/<key> hard links to them, as the filter
    stage makes them."""
    raw, filtered = tmp_path / "raw", tmp_path / "filtered"
    for seed, (key, serial) in enumerate(sorted(photos.items())):
        source = photo(raw / "train" / key, serial=serial, seed=seed)
        (filtered / key).parent.mkdir(parents=True, exist_ok=True)
        (filtered / key).hardlink_to(source)
    return raw, filtered


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def device_of(out: Path) -> dict[str, str]:
    table = pd.concat(read_sets(out).values())
    return {Path(p).name: d for p, d in zip(table.path, table.device)}


def test_flickr_owners_are_devices_and_never_in_two_sets(tmp_path):
    keys = {f"{label}/{label}-{o}-{i}.jpg": None for label in LABELS for o in range(4) for i in range(3)}
    raw, filtered = raw_and_filtered(tmp_path, keys)
    write_jsonl(raw / "manifest.jsonl", [{"id": k, "camera": k.split("/")[0], "file": f"train/{k}",
                                          "owner": f"{k.split('-')[-2]}@N0{k.split('-')[1]}", "owner_name": "x"}
                                         for k in keys])
    summary = split(filtered, tmp_path / "split", LABELS, val_fraction=0.25, test_fraction=0.25, seed=2,
                    metrics_file=tmp_path / "split.json", raw=raw)
    sets = read_sets(tmp_path / "split")
    for label in LABELS:
        where = {}
        for name, table in sets.items():
            for device in table.loc[table.label == label, "device"]:
                assert device.startswith("owner:")
                assert where.setdefault(device, name) == name, f"{device} is in {where[device]} and {name}"
        assert set(where.values()) == {"train", "val", "test"}
    assert summary["device_disjoint"]
    assert summary["device_sources"] == {"folder": 0, "manifest": 0, "owner": 36, "serial": 0, "unknown": 0}
    assert json.loads((tmp_path / "split.json").read_text())["device_sources"]["owner"] == 36


def test_a_manifest_device_beats_owner_and_serial_and_a_folder_beats_all(tmp_path):
    keys = {"Cam-A/dev.jpg": "SN1", "Cam-A/owner.jpg": "SN2", "Cam-A/serial.jpg": "SN3", "Cam-A/none.jpg": None,
            "Cam-A/box/folder.jpg": "SN4", "Cam-A/other.jpg": "SN5"}
    raw, filtered = raw_and_filtered(tmp_path, keys)
    pd.DataFrame({"file": ["Cam-A/dev.jpg", "train/Cam-A/owner.jpg", "Cam-A/box/folder.jpg", "Cam-A/other.jpg"],
                  "device": ["body-7", "", "body-9", "body-5"], "owner": ["o1", "o2", "o3", ""]}
                 ).to_csv(raw / "manifest.csv", index=False)
    (raw / "train" / "Cam-A" / "other.jpg").unlink()  # its row is of another data set's photo
    (raw / "train" / "Cam-A" / "other.jpg").write_bytes(b"not the filtered photo")
    summary = split(filtered, tmp_path / "split", ["Cam-A"], val_fraction=0.25, test_fraction=0.25, seed=0, raw=raw)
    assert device_of(tmp_path / "split") == {"dev.jpg": "manifest:body-7", "owner.jpg": "owner:o2",
                                             "serial.jpg": "serial:SN3", "none.jpg": "", "folder.jpg": "folder:box",
                                             "other.jpg": "serial:SN5"}
    assert summary["device_sources"] == {"folder": 1, "manifest": 1, "owner": 1, "serial": 2, "unknown": 1}


def test_without_a_manifest_devices_are_folders_and_serials_as_before(tmp_path):
    keys = {f"Cam-A/{i}.jpg": f"SN{i % 3}" for i in range(6)} | {"Cam-A/d/x.jpg": None, "Cam-A/y.jpg": None}
    raw, filtered = raw_and_filtered(tmp_path, keys)
    with_raw = split(filtered, tmp_path / "a", ["Cam-A"], val_fraction=0.25, test_fraction=0.25, seed=4, raw=raw)
    without = split(filtered, tmp_path / "b", ["Cam-A"], val_fraction=0.25, test_fraction=0.25, seed=4)
    assert with_raw == without
    assert without["device_sources"] == {"folder": 1, "manifest": 0, "owner": 0, "serial": 6, "unknown": 1}
    for name in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() == (tmp_path / "b" / f"{name}.csv").read_bytes()
