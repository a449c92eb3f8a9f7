"""camid inspect: the record of every file, bad files included, and edit detection on real camera JPEGs."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camid.cli import main
from camid.forensics.exif import clean_text, find_editor, xmp_agents
from camid.core.fileio import iter_files
from camid.forensics.inspect import ERROR_KINDS, FIELDS, error_kind, inspect_file, inspect_paths

ROOT = Path(__file__).resolve().parents[1]
REAL_JPEGS = ROOT.parent / "shared" / "samples" / "real-jpeg"
# Real camera JPEGs whose metadata names editing software (inspected by hand): EXIF Software / XMP for most;
# three carry only Photoshop's IRB version-info block ("Adobe Photoshop") behind a firmware Software string.
REAL_EDITED = {
    "Canon EOS 7D.jpg": "Lightroom",
    "Canon EOS D60.jpg": "Photoshop",
    "Canon IXUS 400.jpg": "ACD Systems",
    "FujiFilm FinePixS1Pro (3).jpg": "Photoshop",
    "Nikon D5000.jpg": "Bridge",
    "Olympus C3030Z.jpg": "CAMEDIA Master",
    "Olympus C960.jpg": "CAMEDIA Master",
    "Nikon E885.jpg": "Photoshop IRB",
    "Nikon E950.jpg": "Photoshop IRB",
    "Panasonic DMC-LC70 (Lumix).jpg": "Photoshop IRB",
}


def photo(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    return Image.fromarray(np.clip(np.asarray(smooth) + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255).astype(np.uint8))


def exif_for(model="NEX-7", software="Ver.1.00", size=None, orientation=None) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "SONY", model
    if software:
        exif[0x0131] = software
    if orientation:
        exif[0x0112] = orientation
    if size:
        exif.get_ifd(0x8769).update({0xA002: size[0], 0xA003: size[1]})
    exif.get_ifd(0x8769)[0x9003] = "2018:01:02 03:04:05"
    return exif


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One file per case the inspection must survive, named by case."""
    folder = tmp_path_factory.mktemp("inspect")
    image = photo(1)
    good = jpeg_bytes(image, quality=95, exif=exif_for("NEX-7\x00\x00  ", "Ver.1.00  ", (64, 48), 6))
    sof = good.index(b"\xff\xc0")
    bomb = bytearray(good)
    bomb[sof + 5:sof + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    app1 = b"Exif\x00\x00" + b"this is no TIFF header"
    tiff = io.BytesIO()
    image.save(tiff, "TIFF", exif=exif_for(software="Adobe Photoshop CC 2019 (Windows)"))
    png16 = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 65535, (40, 50)).astype(np.uint16)).save(png16, "PNG")
    png = io.BytesIO()
    image.save(png, "PNG")
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description xmp:CreatorTool="Adobe Photoshop '
           b'Lightroom Classic 9.0"/></rdf:RDF></x:xmpmeta>')
    cases = {
        "good.jpg": good,
        "zero.jpg": b"",
        "truncated.jpg": good[:len(good) * 2 // 3],
        "header_only.jpg": good[:sof + 4],
        "text.jpg": b"these are not the pixels you are looking for\n" * 4,
        "png_named.jpg": png.getvalue(),
        "photo.tiff": tiff.getvalue(),
        "deep.png": png16.getvalue(),
        "cmyk.jpg": jpeg_bytes(image.convert("CMYK"), quality=93),
        "bomb.jpg": bytes(bomb),
        "bad_exif.jpg": good[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + good[2:],
        "phone.heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
        "xmp_edited.jpg": jpeg_bytes(image, quality=95, exif=exif_for(software=None), xmp=xmp),
        "gray.jpg": jpeg_bytes(image.convert("L"), quality=75),
    }
    for name, data in cases.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in cases}


@pytest.fixture(scope="module")
def records(files, params) -> dict[str, dict]:
    return {name: inspect_file(path, params.filter.editors, params.filter.max_pixels) for name, path in files.items()}


def test_record_has_exactly_the_issue_keys(records):
    assert all(tuple(r) == FIELDS for r in records.values())
    assert set(FIELDS) == {"path", "format", "width", "height", "exif_width", "exif_height", "orientation", "make",
                           "model", "serial", "software", "datetime", "quality", "subsampling", "jpeg_tables",
                           "edited", "edit_reason", "sha256", "phash", "error"}


def test_good_jpeg(records, files):
    r = records["good.jpg"]
    assert r["error"] is None and r["format"] == "JPEG"
    assert (r["width"], r["height"], r["exif_width"], r["exif_height"], r["orientation"]) == (64, 48, 64, 48, 6)
    assert (r["make"], r["model"], r["software"]) == ("SONY", "NEX-7", "Ver.1.00")  # NULs and padding stripped
    assert r["datetime"] == "2018:01:02 03:04:05"
    assert (r["quality"], r["subsampling"], r["edited"], r["edit_reason"]) == (95, "4:2:0", False, None)
    assert len(r["sha256"]) == 64 and len(r["phash"]) == 16


@pytest.mark.parametrize("name, kind", [
    ("zero.jpg", "empty"), ("truncated.jpg", "truncated"), ("header_only.jpg", "truncated"),
    ("text.jpg", "not_image"), ("phone.heic", "not_image"), ("bomb.jpg", "too_large"), ("bad_exif.jpg", "bad_exif"),
])
def test_bad_files_get_an_error_kind_not_a_crash(records, name, kind):
    assert error_kind(records[name]["error"]) == kind and kind in ERROR_KINDS


def test_truncated_jpeg_keeps_its_header_fields(records):
    r = records["truncated.jpg"]
    assert (r["width"], r["quality"], r["model"], r["phash"]) == (64, 95, "NEX-7", None)


def test_other_formats(records):
    assert records["png_named.jpg"]["format"] == "PNG" and records["png_named.jpg"]["error"] is None
    assert records["png_named.jpg"]["quality"] is None
    tiff = records["photo.tiff"]
    assert (tiff["format"], tiff["model"], tiff["edited"], tiff["error"]) == ("TIFF", "NEX-7", True, None)
    assert records["deep.png"]["error"] is None and records["deep.png"]["phash"]
    cmyk = records["cmyk.jpg"]
    assert (cmyk["quality"], cmyk["subsampling"], cmyk["error"]) == (93, "1x1,1x1,1x1,1x1", None)
    assert (records["gray.jpg"]["quality"], records["gray.jpg"]["subsampling"]) == (75, "4:0:0")
    assert records["bomb.jpg"]["width"] == 60000 and records["bomb.jpg"]["phash"] is None


def test_xmp_creator_tool_is_an_edit(records):
    assert records["xmp_edited.jpg"]["edited"]
    assert "XMP xmp:CreatorTool" in records["xmp_edited.jpg"]["edit_reason"]


def test_editor_matching():
    assert clean_text(b"MAVICA\x003ghx7y") == "MAVICA" and clean_text("  \x00") is None
    assert xmp_agents(b"<stEvt:softwareAgent>Adobe Bridge CS5</stEvt:softwareAgent>") == \
        [("XMP stEvt:softwareAgent", "Adobe Bridge CS5")]
    editors = ("Photoshop", "GIMP")
    assert find_editor([("EXIF Software", "gimp 2.10")], editors) == "EXIF Software 'gimp 2.10' names editor 'GIMP'"
    assert find_editor([("EXIF Software", "E995v1.6"), ("EXIF Software", None)], editors) is None


def test_header_only_mode_skips_hashes(files):
    r = inspect_file(files["good.jpg"], hashes=False)
    assert (r["sha256"], r["phash"], r["quality"], r["model"]) == (None, None, 95, "NEX-7")


def test_parallel_run_keeps_order(files, params):
    paths = iter_files([files["good.jpg"].parent])
    assert paths == sorted(paths) and len(paths) == len(files)
    serial = list(inspect_paths(paths, params.filter.editors, workers=1))
    assert list(inspect_paths(paths, params.filter.editors, workers=2)) == serial


def test_cli_json_lines_and_table(files, capsys, monkeypatch):
    monkeypatch.setenv("CAMID_PARAMS", str(ROOT / "params.yaml"))
    assert main(["inspect", str(files["good.jpg"]), str(files["zero.jpg"]), "--json", "--workers", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["path"]).name for r in lines] == ["good.jpg", "zero.jpg"] and lines[0]["quality"] == 95
    assert main(["inspect", str(files["good.jpg"]), "--workers", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["quality", "size"] and "NEX-7" in table[1]


@pytest.mark.skipif(not REAL_JPEGS.is_dir(), reason=f"{REAL_JPEGS} (real camera JPEGs) is not present")
def test_real_camera_jpegs_edited_exactly_when_an_editor_is_named(params):
    records = list(inspect_paths(iter_files([REAL_JPEGS]), params.filter.editors))
    assert len(records) == 82 and not [r for r in records if r["error"]]
    edited = {Path(r["path"]).name: r["edit_reason"] for r in records if r["edited"]}
    assert set(edited) == set(REAL_EDITED)
    for name, source in REAL_EDITED.items():
        expected = "Photoshop IRB version info" if source == "Photoshop IRB" else source
        assert expected in edited[name], (name, edited[name])


def test_a_bug_in_camid_is_raised_not_reported_as_a_corrupt_file(tmp_path, monkeypatch):
    """A decoder's exception on a bad file is the file's `error`; camid's own exception is camid's bug."""
    import camid.forensics.inspect as inspect_module
    from PIL import Image as PILImage

    path = tmp_path / "photo.jpg"
    PILImage.new("RGB", (64, 48), (90, 120, 30)).save(path, quality=95)

    # A bug in camid's own code: one of its functions called with the wrong arguments, inside camid.
    monkeypatch.setattr(inspect_module, "edit_reason", clean_text)
    with pytest.raises(TypeError):
        inspect_file(path)
    monkeypatch.undo()

    import imagehash

    def library_fails(image):  # stands in for a library that chokes on a strange file
        raise TypeError("unsupported image layout")

    monkeypatch.setattr(imagehash, "phash", library_fails)
    assert inspect_file(path)["error"] == "corrupt: TypeError: unsupported image layout"


# --- firmware_match: which catalog cameras' firmware wrote a file's JPEG tables (camid inspect --model) ---

FIRMWARE_LABELS = ["Aster-A1", "Aster-A1s", "Borea-B2"]
# A custom luminance/chroma table pair, as a camera's firmware might use (no libjpeg quality writes it).
CUSTOM_QTABLES = [[2 + (k % 7) for k in range(64)], [3 + (k % 5) for k in range(64)]]
FOREIGN_QTABLES = [[3 + (5 * k) % 11 for k in range(64)], [4 + (3 * k) % 13 for k in range(64)]]  # no catalog family


@pytest.fixture(scope="module")
def firmware(tmp_path_factory):
    """Real JPEGs from three 'firmwares', a bundle whose jpeg_tables.json counts the training ones, and queries."""
    from camid.inference.jpeg_tables import TablePrior, signature_of_file

    folder = tmp_path_factory.mktemp("firmware")
    writers = {"q90": {"quality": 90}, "custom": {"qtables": CUSTOM_QTABLES}, "q80_444": {"quality": 80, "subsampling": 0},
               "q60": {"quality": 60}, "foreign": {"qtables": FOREIGN_QTABLES}}
    # q60: the IJG tables of q90 at another quality (their family); foreign: tables of no training photo's family

    def write(name, seed, writer):
        path = folder / name
        path.write_bytes(jpeg_bytes(photo(seed), **writers[writer]))
        return path

    # Aster-A1: 3 photos at q90; Aster-A1s (same maker): 1 at q90, 2 with its custom tables; Borea-B2: 2 at q80 4:4:4.
    training = [("q90", 0)] * 3 + [("q90", 1), ("custom", 1), ("custom", 1)] + [("q80_444", 2)] * 2
    paths = [write(f"train-{k}.jpg", 10 + k, writer) for k, (writer, _) in enumerate(training)]
    signatures = [signature_of_file(p) for p in paths]
    tables = TablePrior.fit(signatures, [cam for _, cam in training], FIRMWARE_LABELS)
    bundle = folder / "bundle"
    bundle.mkdir()
    tables.write(bundle)
    png = folder / "query.png"
    photo(99).save(png, "PNG")
    queries = {writer: write(f"query-{writer}.jpg", 50 + k, writer) for k, writer in enumerate(writers)}
    return {"bundle": bundle, "tables": tables, "queries": {**queries, "png": png}, "folder": folder}


def test_table_prior_matches_most_photos_first_with_shares(firmware):
    from camid.inference.jpeg_tables import TablePrior, signature_of_file

    tables, queries = firmware["tables"], firmware["queries"]
    assert len({signature_of_file(queries[w]) for w in ("q90", "custom", "q80_444", "q60", "foreign")}) == 5
    assert tables.matches(signature_of_file(queries["q90"])) == [
        {"camera": "Aster-A1", "photos": 3, "share": 0.75}, {"camera": "Aster-A1s", "photos": 1, "share": 0.25}]
    assert tables.matches(signature_of_file(queries["custom"])) == [{"camera": "Aster-A1s", "photos": 2, "share": 1.0}]
    assert tables.matches(signature_of_file(queries["q80_444"])) == [{"camera": "Borea-B2", "photos": 2, "share": 1.0}]
    assert tables.matches(signature_of_file(queries["q60"])) == []
    assert tables.matches(signature_of_file(queries["foreign"])) == []
    assert tables.matches(None) is None and signature_of_file(queries["png"]) is None
    # q60's exact tables were never seen, but q90's family was: the IJG tables at another quality. 4:4:4 at q80
    # (Borea-B2) is the same base table with other sampling, another encoder configuration: not the family.
    q60, foreign = signature_of_file(queries["q60"]), signature_of_file(queries["foreign"])
    assert tables.family_matches(q60) == [{"camera": "Aster-A1", "photos": 3, "share": 0.75},
                                          {"camera": "Aster-A1s", "photos": 1, "share": 0.25}]
    assert tables.family_matches(foreign) == [] and tables.family_matches(None) is None
    assert tables.family_matches(str(q60)) == []  # a plain string carries no tables: exact matches only
    from camid.inference.jpeg_tables import FAMILY, UNSEEN, USED, entered

    q90 = signature_of_file(queries["q90"])
    reread = TablePrior.from_model(firmware["bundle"])  # the tables travel in jpeg_tables.json ("quant")
    for prior in (tables, reread):
        evidence = prior.evidence([q60, foreign, q90, q60], [True, True, True, False])
        assert list(evidence) == [FAMILY, UNSEEN, USED, "none"] and list(entered(evidence)) == [True, False, True, False]
        assert np.allclose(prior.likelihood(q60), prior.likelihood(q90))  # q90 is the family's only member
        shifted = prior.apply(np.full((2, 3), 1 / 3), [q60, foreign], [True, True])
        assert shifted[0].argmax() == 0 and np.allclose(shifted[1], 1 / 3)
    # Ties keep catalog order; a row of zeros is as good as unseen; the round trip through the file keeps it all.
    tied = TablePrior({"s": [0, 2, 2], "z": [0, 0, 0]}, ["a", "b", "c"])
    assert [m["camera"] for m in tied.matches("s")] == ["b", "c"] and tied.matches("z") == []
    assert TablePrior.from_model(firmware["bundle"]).matches(signature_of_file(queries["custom"])) == \
        tables.matches(signature_of_file(queries["custom"]))


def _inspect_json(capsys, *args) -> dict[str, dict]:
    assert main(["inspect", *map(str, args), "--json", "--workers", "1"]) == 0
    return {Path(r["path"]).name: r for r in map(json.loads, capsys.readouterr().out.splitlines())}


def test_cli_firmware_match_from_a_bundle(firmware, capsys, monkeypatch):
    monkeypatch.setenv("CAMID_PARAMS", str(ROOT / "params.yaml"))
    q = firmware["queries"]
    files = [q["q90"], q["custom"], q["q60"], q["foreign"], q["png"]]
    records = _inspect_json(capsys, *files, "--model", firmware["bundle"])
    assert [m["camera"] for m in records["query-q90.jpg"]["firmware_match"]] == ["Aster-A1", "Aster-A1s"]
    assert records["query-custom.jpg"]["firmware_match"] == [{"camera": "Aster-A1s", "photos": 2, "share": 1.0}]
    assert records["query-q60.jpg"]["firmware_match"] == []
    assert [m["camera"] for m in records["query-q60.jpg"]["firmware_family"]] == ["Aster-A1", "Aster-A1s"]
    assert records["query-foreign.jpg"]["firmware_match"] == records["query-foreign.jpg"]["firmware_family"] == []
    assert records["query-q90.jpg"]["firmware_family"] == []  # the exact tables were seen: no family needed
    assert records["query.png"]["firmware_match"] is None and records["query.png"]["error"] is None
    assert records["query.png"]["firmware_family"] is None
    assert all(tuple(r) == FIELDS + ("firmware_match", "firmware_family") for r in records.values())
    # Without --model the records are exactly as before.
    assert all(tuple(r) == FIELDS for r in _inspect_json(capsys, *files).values())

    assert main(["inspect", *map(str, files), "--model", str(firmware["bundle"]), "--workers", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-2:] == ["firmware", "path"]
    rows = {line.split()[-1]: line for line in lines[1:] if line.split()[-1].endswith((".jpg", ".png"))}
    assert "Aster-A1|Aster-A1s" in rows[str(q["q90"])] and "none seen" in rows[str(q["foreign"])]
    assert "family Aster-A1|" in rows[str(q["q60"])] and "none seen" not in rows[str(q["q60"])]
    assert "Aster-A1s " in rows[str(q["custom"])] and "none seen" not in rows[str(q["png"])]
    assert "re-saved by other software, or a camera outside the catalog" in lines[-1]
    assert main(["inspect", str(q["q90"]), "--workers", "1"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.split() == ["quality", "size", "sampling", "model", "software", "edited", "path"]  # unchanged


def test_inspect_marks_a_background_camera_among_the_firmware(firmware, tmp_path, capsys, monkeypatch):
    """A background camera (photos of other models, `camid catalog from-folder --background`) is no catalog
    camera: `camid inspect --model` marks it where it names the firmware, as the analyst's card does."""
    import shutil

    monkeypatch.setenv("CAMID_PARAMS", str(ROOT / "params.yaml"))
    bundle = shutil.copytree(firmware["bundle"], tmp_path / "bundle")
    (bundle / "ensemble.json").write_text(json.dumps({"cameras": [
        {"label": label, "make": "", "models": [], **({"background": True} if label == "Aster-A1s" else {})}
        for label in FIRMWARE_LABELS]}))
    q = firmware["queries"]
    records = _inspect_json(capsys, q["q90"], q["q60"], q["q80_444"], "--model", bundle)
    assert records["query-q90.jpg"]["firmware_match"] == [
        {"camera": "Aster-A1", "photos": 3, "share": 0.75},
        {"camera": "Aster-A1s", "photos": 1, "share": 0.25, "background": True}]
    assert records["query-q60.jpg"]["firmware_family"][1] == {"camera": "Aster-A1s", "photos": 1, "share": 0.25,
                                                              "background": True}
    assert "background" not in records["query-q80_444.jpg"]["firmware_match"][0]
    assert main(["inspect", str(q["q90"]), str(q["q80_444"]), "--model", str(bundle), "--workers", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Aster-A1|Aster-A1s*" in lines[1] and "*" not in lines[2]
    assert lines[-1].startswith("firmware '*' after a name: a background camera, photos of other models")
    assert main(["inspect", str(q["q80_444"]), "--model", str(bundle), "--workers", "1"]) == 0
    assert "background camera" not in capsys.readouterr().out  # no mark shown, no footnote


def test_firmware_cell_keeps_the_column_narrow():
    from camid.forensics.inspect import firmware_cell

    names = [{"camera": f"Camera-{k}", "photos": 1, "share": 0.2} for k in range(5)]
    assert firmware_cell(names) == "Camera-0|Camera-1|+3"
    assert firmware_cell([]) == "none seen" and firmware_cell(None) == ""


def test_cli_bad_model_is_a_clear_error(firmware, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAMID_PARAMS", str(ROOT / "params.yaml"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    query = str(firmware["queries"]["q90"])

    def error(model) -> str:
        assert main(["inspect", query, "--model", str(model), "--workers", "1"]) == 2
        out, err = capsys.readouterr()
        assert out == ""  # nothing printed before the error: no half table
        return err

    assert "not found" in error(tmp_path / "no-such-bundle") and "models:/camid@champion" in error(tmp_path / "x")
    untabled = tmp_path / "old-bundle"
    untabled.mkdir()
    (untabled / "ensemble.json").write_text("{}")
    assert "jpeg_tables.json not found" in (err := error(untabled)) and "camid evaluate" in err
    err = error("models:/no-such-model@champion")
    assert "cannot read model 'models:/no-such-model@champion'" in err and "MLFLOW_TRACKING_URI" in err


@pytest.fixture(scope="module")
def registered_tables(firmware, tmp_path_factory):
    """The firmware bundle logged and registered as a pyfunc the way camid.stages.register does it (artifact
    `bundle`; the folder is named `ensemble` as dvc.yaml's models/ensemble), with a stand-in python model: no
    Keras model is trained or loaded, so this costs seconds, unlike conftest's registered_model (a training run)."""
    import shutil

    import mlflow
    from mlflow import MlflowClient

    from camid.tiny import inside

    root = tmp_path_factory.mktemp("registry")
    shutil.copytree(firmware["bundle"], root / "ensemble")
    # Borea-B2 as a background camera (photos of other models): inspect reads that from the bundle's ensemble.json.
    (root / "ensemble" / "ensemble.json").write_text(json.dumps({"cameras": [
        {"label": label, **({"background": True} if label == "Borea-B2" else {})} for label in FIRMWARE_LABELS]}))
    uri = f"sqlite:///{root / 'mlflow.db'}"

    class StandIn(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str]) -> list[str]:
            return model_input

    with inside(root, MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="camid-inspect-tests"):
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment("camid-inspect-tests").experiment_id  # not an earlier test's store's
        with mlflow.start_run(experiment_id=experiment) as run:
            info = mlflow.pyfunc.log_model(name="model", python_model=StandIn(), artifacts={"bundle": str(root / "ensemble")},
                                           pip_requirements=[], registered_model_name="camid")
        MlflowClient(tracking_uri=uri).set_registered_model_alias("camid", "champion", str(info.registered_model_version))
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/camid/{info.registered_model_version}",
                                                    dst_path=str(root / "pyfunc"))
    return {"tracking_uri": uri, "run_id": run.info.run_id, "local": local}


def test_cli_firmware_match_from_a_registered_model(firmware, registered_tables, capsys, monkeypatch):
    monkeypatch.setenv("CAMID_PARAMS", str(ROOT / "params.yaml"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered_tables["tracking_uri"])
    q = firmware["queries"]
    expected = {"query-custom.jpg": [{"camera": "Aster-A1s", "photos": 2, "share": 1.0}], "query-q60.jpg": [],
                "query.png": None}
    for model in ("models:/camid@champion", "models:/camid/1", f"runs:/{registered_tables['run_id']}/model",
                  registered_tables["local"]):
        records = _inspect_json(capsys, q["custom"], q["q60"], q["png"], "--model", model)
        assert {name: r["firmware_match"] for name, r in records.items()} == expected, model
        assert [m["camera"] for m in records["query-q60.jpg"]["firmware_family"]] == ["Aster-A1", "Aster-A1s"], model
        other = _inspect_json(capsys, q["q80_444"], "--model", model)["query-q80_444.jpg"]["firmware_match"]
        assert other == [{"camera": "Borea-B2", "photos": 2, "share": 1.0, "background": True}], model
    assert main(["inspect", str(q["custom"]), "--model", "models:/camid@no-such-alias", "--workers", "1"]) == 2
    assert "MLFLOW_TRACKING_URI" in capsys.readouterr().err


def test_inspect_reads_the_counts_the_way_the_inference_side_names_them(firmware, monkeypatch):
    """inspect may not import camid.inference or camid.tracking (the filter and split stages' DVC deps): the
    names it repeats agree with theirs, and TablePrior reads a model through inspect's reader."""
    import camid.forensics.inspect as inspect_module
    from camid import tracking
    from camid.inference import jpeg_tables

    assert inspect_module.TABLES_FILE == jpeg_tables.FILE
    assert inspect_module._DEFAULT_TRACKING_URI == tracking.DEFAULT_TRACKING_URI
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert inspect_module._tracking_uri() == tracking.tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert inspect_module._tracking_uri() == tracking.tracking_uri()
    prior = jpeg_tables.TablePrior.from_model(firmware["bundle"])
    assert (prior.counts, prior.labels) == (firmware["tables"].counts, firmware["tables"].labels)
