"""`camid ingest`: Kaggle-layout and <label>/<files> trees linked into the raw layout, never copied."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from camid.stages.acquire import ingest as ingest_module
from camid.stages.acquire.ingest import ingest, link_file, resolve_label
from camid.cli import main
from camid.errors import CamidError
from tests.fake_flickr import make_jpeg, write_params


@pytest.fixture
def params(tmp_path, monkeypatch):
    from camid.config import load_params

    path = write_params(tmp_path / "params.yaml")
    monkeypatch.setenv("CAMID_PARAMS", str(path))
    return load_params(path)


def put(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data or make_jpeg(32, 48, seed=sum(path.name.encode())))
    return path


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_kaggle_layout_is_hard_linked(tmp_path, params, capsys):
    src, out = tmp_path / "kaggle", tmp_path / "raw"
    a, b = params.catalog.labels[:2]
    put(src / "train" / a / "(1).jpg")
    put(src / "train" / a / "(2).jpg")
    put(src / "train" / b / "(1).JPG")
    put(src / "test" / "img_0001_unalt.tif", b"II*\x00tiff")
    put(src / "test" / "img_0002_manip.tif", b"II*\x00tiff")
    put(src / "sample_submission.csv", b"fname,camera\n")

    assert main(["ingest", str(src), "--out", str(out)]) == 0
    assert tree(out) == {f"train/{a}/(1).jpg", f"train/{a}/(2).jpg", f"train/{b}/(1).JPG",
                         "test/img_0001_unalt.tif", "test/img_0002_manip.tif"}
    for rel in tree(out):
        linked, original = out / rel, src / rel
        assert os.path.samefile(linked, original)  # the same inode: linked, not copied
        assert original.stat().st_nlink == 2
    assert "ingested 5 photos" in capsys.readouterr().out


def test_label_tree_with_loose_folder_names(tmp_path, params):
    src, out = tmp_path / "photos", tmp_path / "raw"
    put(src / "aster-a1" / "x.jpg")
    put(src / "ASTER_A1S" / "y.jpg")
    put(src / "Boreal B7" / "z.jpg")
    summary = ingest(src, out, params.catalog)
    assert tree(out) == {"train/Aster-A1/x.jpg", "train/Aster-A1s/y.jpg", "train/Boreal-B7/z.jpg"}
    assert dict(summary.train) == {"Aster-A1": 1, "Aster-A1s": 1, "Boreal-B7": 1}
    assert summary.links == {"hardlink": 3}


def test_resolve_label(params):
    catalog = params.catalog
    assert resolve_label("Aster-A1", catalog) == "Aster-A1"
    assert resolve_label("aster_a1s", catalog) == "Aster-A1s"
    assert resolve_label("Dune D5", catalog) == "Dune-D5"      # the camera's search name
    with pytest.raises(CamidError, match=r"'Zeta-Z1' is no camera of the 'virtual' catalog; known labels: Aster-A1, "):
        resolve_label("Zeta-Z1", catalog)


def test_unknown_folder_names_the_folder_and_the_known_labels(tmp_path, params, capsys):
    src = tmp_path / "kaggle"
    put(src / "train" / "Aster-A1" / "a.jpg")
    put(src / "train" / "Nokia-3310" / "b.jpg")
    assert main(["ingest", str(src), "--out", str(tmp_path / "raw")]) == 2
    err = capsys.readouterr().err
    assert "camid ingest: error:" in err and "Nokia-3310" in err and ", ".join(params.catalog.labels) in err
    assert not (tmp_path / "raw").exists()


def test_empty_missing_and_overlapping_sources(tmp_path, params):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(CamidError, match="holds no photos"):
        ingest(tmp_path / "empty", tmp_path / "raw", params.catalog)
    with pytest.raises(CamidError, match="is not a folder"):
        ingest(tmp_path / "nowhere", tmp_path / "raw", params.catalog)
    put(tmp_path / "src" / "Aster-A1" / "a.jpg")
    with pytest.raises(CamidError, match="overlap"):
        ingest(tmp_path / "src", tmp_path / "src" / "raw", params.catalog)


def test_reingest_replaces_the_output_whole(tmp_path, params):
    src, out = tmp_path / "src", tmp_path / "raw"
    put(src / "Aster-A1" / "a.jpg")
    put(out / "train" / "Gale-G4" / "stale.jpg")
    ingest(src, out, params.catalog)
    assert tree(out) == {"train/Aster-A1/a.jpg"}


def test_crawl_manifest_comes_along(tmp_path, params):
    src = tmp_path / "flickr"
    put(src / "train" / "Aster-A1" / "1.jpg")
    put(src / "manifest.jsonl", b'{"id": "1"}\n')
    ingest(src, tmp_path / "raw", params.catalog)
    assert (tmp_path / "raw" / "manifest.jsonl").read_bytes() == b'{"id": "1"}\n'


def test_link_falls_back_to_symlink_then_copy(tmp_path, monkeypatch):
    src = put(tmp_path / "a.jpg")

    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(ingest_module.os, "link", cross_device)
    assert link_file(src, tmp_path / "b.jpg") == "symlink"
    assert (tmp_path / "b.jpg").is_symlink() and (tmp_path / "b.jpg").read_bytes() == src.read_bytes()
    monkeypatch.setattr(ingest_module.os, "symlink", cross_device)
    assert link_file(src, tmp_path / "c.jpg") == "copy"
    assert (tmp_path / "c.jpg").read_bytes() == src.read_bytes()
