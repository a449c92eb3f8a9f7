"""`camid catalog from-folder`: real JPEGs with real EXIF in, a params.yaml that loads with the new catalog out."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from camid.tools.catalog import build_entry, fnmatch_escape, from_folder, scan_folder
from camid.tools.plan import NETWORK_S_PER_MEGAPIXEL
from camid.config import Camera, load_params
from camid.errors import CamidError
from camid.forensics.inspect import FIELDS
from tests.conftest import ROOT
from tests.helpers_data import subprocess_env


def jpeg(path: Path, model: str | None = "A1", *, make: str = "Acme", serial: str | None = None,
         size: tuple[int, int] = (64, 96), quality: int = 95, software: str | None = None) -> Path:
    """A small JPEG of `size` (h, w) stored pixels, with EXIF Make/Model/serial/Software, at ImageMagick `quality`."""
    exif = Image.Exif()
    exif[0x010F] = make
    if model:
        exif[0x0110] = model
    if software:
        exif[0x0131] = software
    if serial:
        exif.get_ifd(0x8769)[0xA431] = serial
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = size
    Image.new("RGB", (width, height), (90, 120, 150)).save(path, quality=quality, exif=exif)
    return path


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def comments(text: str) -> list[str]:
    return re.findall(r"#.*$", text, flags=re.MULTILINE)


def run_catalog(folder, params_file, name="mine", **options) -> list[dict]:
    """`from_folder`, its plan costed at the reference machine's training speed (the plan's own test measures it)."""
    options.setdefault("network_s_per_mp", NETWORK_S_PER_MEGAPIXEL["smallcnn"])
    return from_folder(str(folder), name, str(params_file), progress=False, **options)


def test_cli_flat_layout_writes_an_active_catalog_and_keeps_comments(tmp_path, params_file):
    for serial in ("S1", "S2", "S3"):
        jpeg(tmp_path / "photos" / "Cam-A" / f"{serial}.jpg", "A1", serial=serial)
        jpeg(tmp_path / "photos" / "Cam_B" / f"{serial}.jpg", "B7 Pro", make="Boreal", size=(96, 64), serial=serial)
    before = params_file.read_text()

    def catalog(*options):
        return subprocess.run([sys.executable, "-m", "camid", "catalog", "from-folder", "photos", "--name", "mine",
                               "--workers", "1", *options], cwd=tmp_path,
                              env=subprocess_env({"CAMID_PARAMS": str(params_file)}), capture_output=True, text=True,
                              timeout=60)

    # a training speed that is no positive number is refused at the argument, before anything is read or written
    refused = catalog("--train-cost", "0")
    assert refused.returncode == 2 and "argument --train-cost: must be above 0, got 0" in refused.stderr
    assert params_file.read_text() == before
    proc = catalog("--train-cost", "1.2")
    assert proc.returncode == 0, proc.stderr
    assert "dvc repro" in proc.stdout and "warning" not in proc.stdout
    # --train-cost: the machine's training speed given, not measured; the plan says what it assumed
    assert "measuring" not in proc.stdout and "trains smallcnn at 1.20 s per megapixel" in proc.stdout

    params = load_params(params_file)
    assert params.catalog.name == "mine" and params.catalog.labels == ["Cam-A", "Cam_B"]
    assert params.catalog.get("Cam_B") == Camera("Cam_B", "Boreal", ("B7 Pro",), ((96, 64),), False, "Cam B")
    assert (params.acquire.source, params.acquire.folder) == ("folder", "photos")
    assert params.filter.min_quality == 94
    after = params_file.read_text()
    assert set(comments(before)) <= set(comments(after))
    assert '    - {label: Cam-A, make: Acme, models: ["A1"], sizes: [[64, 96]], rot90: false, search: "Cam A"}\n' in after
    kept = [line for line in before.splitlines() if "label: HTC-1-M7" in line or "label: Aster-A1," in line]
    assert all(line in after.splitlines() for line in kept)


def test_device_subfolders_and_orientations(tmp_path, params_file, capsys):
    for device in ("d1", "d2", "d3"):  # stored landscape and portrait: rot90
        jpeg(tmp_path / "Cam-A" / device / "land.jpg", serial="same")
        jpeg(tmp_path / "Cam-A" / device / "portrait.jpg", size=(96, 64))
    for serial in ("S1", "S2"):  # landscape only, two devices known from EXIF serials
        jpeg(tmp_path / "Cam-B" / f"{serial}.jpg", "B7", serial=serial, size=(80, 96))
    jpeg(tmp_path / "Cam-B" / "noserial.jpg", "B7", size=(80, 96))
    (tmp_path / "Cam-B" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / ".trash").mkdir()

    entries = {e["label"]: e for e in run_catalog(tmp_path, params_file)}
    assert entries["Cam-A"]["rot90"] is True and entries["Cam-A"]["sizes"] == [[64, 96]]
    assert entries["Cam-B"]["rot90"] is False and entries["Cam-B"]["sizes"] == [[80, 96]]
    out = capsys.readouterr().out
    assert re.search(r"^Cam-A\s+6\s+3\s", out, flags=re.MULTILINE)
    assert re.search(r"^Cam-B\s+3\s+2\s", out, flags=re.MULTILINE)
    assert "warning: Cam-B has 2 known device(s) and 1 photo(s) of unknown device; the split keeps" in out
    assert "warning: Cam-A" not in out
    assert "note: Cam-A" not in out and "note: Cam-B" not in out  # several devices: no coverage note


def test_a_one_device_reference_is_told_what_it_covers(tmp_path, params_file, capsys):
    """Real photos (README, one reference device each): a Nikon's full-size Fine photos lay outside a reference of
    its downscaled Normal ones. The catalog says what a one-device reference covers and what lies outside it."""
    for i in range(4):
        jpeg(tmp_path / "Cam-A" / "d1" / f"{i}.jpg", size=(64, 96), quality=90 + i)
    run_catalog(tmp_path, params_file)
    out = capsys.readouterr().out
    assert "note: Cam-A's reference is one device, and what it covers is what camid can recognise: sizes 64x96, " \
           "JPEG quality 90-93." in out
    assert "add photos of every size and quality mode you will be asked about" in out


def test_one_device_cameras_with_the_same_tables_and_size_are_named_twins(tmp_path, params_file, capsys):
    """Two one-device cameras whose photos carry the same JPEG tables at the same size (a D70 and a D70s): only the
    pixels can separate them, which one device each cannot show, and the evaluate stage treats them as twins
    (camid.inference.metadata.firmware_twins): the catalog says so. A third at another size is not named."""
    for label, model in (("Nikon-D70", "NIKON D70"), ("Nikon-D70s", "NIKON D70s")):
        for i in range(3):
            jpeg(tmp_path / label / "d1" / f"{i}.jpg", model, make="NIKON", size=(64, 96), quality=95)
    jpeg(tmp_path / "Nikon-D200" / "d1" / "0.jpg", "NIKON D200", make="NIKON", size=(80, 96), quality=95)
    run_catalog(tmp_path, params_file)
    out = capsys.readouterr().out
    assert "note: Nikon-D70 and Nikon-D70s write the same JPEG tables at the same size (96x64), so only the pixels " \
           "can tell them apart" in out
    assert "D200 write the same" not in out and "and Nikon-D200" not in out


def test_one_device_cameras_in_two_quality_modes_of_one_table_family_are_named_twins(tmp_path, params_file, capsys):
    """The D70's reference was shot in one quality mode and the D70s's in another: their tables differ, but they
    are one firmware's base tables at two qualities (IJG's, as Pillow writes them at 90 and 80), so nothing but the
    pixels separates the two models either."""
    for label, model, quality in (("Nikon-D70", "NIKON D70", 90), ("Nikon-D70s", "NIKON D70s", 80)):
        for i in range(3):
            jpeg(tmp_path / label / "d1" / f"{i}.jpg", model, make="NIKON", size=(64, 96), quality=quality)
    run_catalog(tmp_path, params_file)
    out = capsys.readouterr().out
    assert "note: Nikon-D70 and Nikon-D70s write JPEG tables of one family (one firmware's tables at two " \
           "qualities: their photos were taken in different quality modes of one maker's cameras) at the same " \
           "size (96x64)" in out


def test_cameras_of_two_makers_with_one_table_family_are_not_named_twins(tmp_path, params_file, capsys):
    """IJG's tables are one family that many makers' firmware writes: two makers' cameras at one size with them
    at two qualities are not twins (exact tables would be)."""
    for label, make, model, quality in (("Sony-Cybershot", "SONY", "CYBERSHOT", 90),
                                        ("HP-735", "Hewlett-Packard", "hp photosmart 735", 80)):
        for i in range(3):
            jpeg(tmp_path / label / "d1" / f"{i}.jpg", model, make=make, size=(64, 96), quality=quality)
    run_catalog(tmp_path, params_file)
    assert "write JPEG tables of one family" not in capsys.readouterr().out


def test_kaggle_layout_and_hidden_names(tmp_path):
    jpeg(tmp_path / "train" / "Cam-A" / "1.jpg")
    jpeg(tmp_path / "train" / "Cam-A" / "dev" / "2.jpg")
    jpeg(tmp_path / "train" / "Cam-A" / "dev" / "deeper" / "3.jpg")  # ingest links no deeper than <device>/
    (tmp_path / "train" / "Cam-A" / ".hidden.jpg").write_bytes(b"")
    (tmp_path / "train" / ".cache").mkdir()
    jpeg(tmp_path / "test" / "x.jpg")
    found = scan_folder(tmp_path)
    assert list(found) == ["Cam-A"]
    assert [(device, path.name) for device, path in found["Cam-A"]] == [(None, "1.jpg"), ("dev", "2.jpg")]


def record(height, width, model="A1", make="Acme", quality=95) -> dict:
    return {**dict.fromkeys(FIELDS), "format": "JPEG", "height": height, "width": width, "model": model,
            "make": make, "quality": quality, "edited": False, "device": None}


def test_build_entry_merges_orientations_and_picks_the_common_make():
    records = [record(64, 96), record(64, 96), record(96, 64), record(80, 96, make="ACME"), record(100, 100),
               record(64, 96, model="A1 Pro")]
    assert build_entry("My_cam-1", records) == {
        "label": "My_cam-1", "make": "Acme", "models": ["A1", "A1 Pro"], "sizes": [[64, 96], [80, 96], [100, 100]],
        "rot90": True, "search": "My cam 1"}
    assert build_entry("Square", [record(100, 100)])["rot90"] is False


@pytest.mark.parametrize("model", ["X*1", "Y[2]?", "Cam [Pro]"])
def test_models_with_glob_characters_match_exactly(model):
    camera = Camera("c", "", (fnmatch_escape(model),), ((1, 1),), False)
    assert camera.matches_model(model)
    assert not camera.matches_model(model.replace("*", "11").replace("?", "x").replace("[", "").replace("]", ""))


def test_glob_characters_survive_params_yaml(tmp_path, params_file):
    jpeg(tmp_path / "Cam" / "1.jpg", "Zoom*2 [EU]?")
    run_catalog(tmp_path, params_file)
    camera = load_params(params_file).catalog.get("Cam")
    assert camera.matches_model("Zoom*2 [EU]?") and not camera.matches_model("Zoom-2 E?")


def test_low_quality_lowers_min_quality_unless_kept(tmp_path, params_file, capsys):
    jpeg(tmp_path / "Cam" / "fine.jpg", quality=97)
    jpeg(tmp_path / "Cam" / "normal1.jpg", quality=90)
    jpeg(tmp_path / "Cam" / "normal2.jpg", quality=91)

    run_catalog(tmp_path, params_file, keep_min_quality=True)
    assert load_params(params_file).filter.min_quality == 94
    assert "filter.min_quality stays 94: the filter stage will drop 2 photo(s)" in capsys.readouterr().out

    run_catalog(tmp_path, params_file, force=True)
    assert load_params(params_file).filter.min_quality == 90
    assert "filter.min_quality: 94 -> 90" in capsys.readouterr().out


def test_skipped_files_are_counted(tmp_path, params_file, capsys):
    jpeg(tmp_path / "Cam" / "good.jpg")
    jpeg(tmp_path / "Cam" / "edited.jpg", software="Adobe Photoshop CC")
    jpeg(tmp_path / "Cam" / "stripped.jpg", model=None)
    Image.new("RGB", (8, 8)).save(tmp_path / "Cam" / "shot.png")
    (tmp_path / "Cam" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    entries = run_catalog(tmp_path, params_file)
    assert entries[0]["models"] == ["A1"]
    skipped = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Cam: skipped"))
    assert skipped == "Cam: skipped 4 file(s): 1 edited, 1 no_exif_model, 1 not_jpeg, 1 truncated"


@pytest.mark.parametrize("layout, name, message", [
    ({}, "mine", "does not exist"),
    ({"loose.jpg": "A1"}, "mine", "holds no <label> folders"),
    ({"Cam/notes.txt": None}, "mine", "camera 'Cam' has no usable JPEG (1 not_image)"),
    ({"Cam/1.jpg": ""}, "mine", "none of its JPEGs has an EXIF Model, and the filter stage keeps only photos"),
    ({"Cam/1.jpg": "A1", "Other/1.jpg": "A1"}, "mine", "cameras 'Cam' and 'Other' both have photos with EXIF Model 'A1'"),
    ({"Cam/1.jpg": "A1"}, "active", "catalog name 'active' is not allowed"),
    ({"Cam/1.jpg": "A1"}, "my catalog", "catalog name 'my catalog' is not allowed"),
    ({"Cam/1.jpg": "A1"}, "kaggle", "already has a catalog 'kaggle': choose another --name, or pass --force"),
])
def test_errors_leave_params_untouched(tmp_path, params_file, layout, name, message):
    photos = tmp_path / "photos"
    for rel, model in layout.items():
        if model is None:
            (photos / rel).parent.mkdir(parents=True, exist_ok=True)
            (photos / rel).write_text("not a photo")
        else:
            jpeg(photos / rel, model)
    before = params_file.read_text()
    with pytest.raises(CamidError, match=re.escape(message)):
        run_catalog(photos, params_file, name=name)
    assert params_file.read_text() == before


def test_a_file_is_not_a_folder_an_empty_label_is_an_error_and_force_replaces(tmp_path, params_file):
    with pytest.raises(CamidError, match="is not a folder"):
        run_catalog(jpeg(tmp_path / "one.jpg"), params_file)
    (tmp_path / "empty" / "Cam").mkdir(parents=True)
    with pytest.raises(CamidError, match=re.escape("camera 'Cam' has no usable JPEG (the folder is empty)")):
        run_catalog(tmp_path / "empty", params_file)
    jpeg(tmp_path / "photos" / "Cam" / "1.jpg")
    run_catalog(tmp_path / "photos", params_file, name="kaggle", force=True)
    assert load_params(params_file).catalog.labels == ["Cam"]


def test_cli_error_exits_2(tmp_path, params_file):
    proc = subprocess.run([sys.executable, "-m", "camid", "catalog", "from-folder", "nowhere", "--name", "mine",
                           "--params", str(params_file)], cwd=tmp_path, env=subprocess_env({}),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "camid catalog: error: nowhere does not exist" in proc.stderr
