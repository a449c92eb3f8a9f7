"""Atomic writes and the file walker: a failed write leaves the old file (or nothing), never half a file."""
from __future__ import annotations

import os
import stat

import pytest

from camid.core import fileio
from camid.errors import CamidError


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_path_replaces_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    fileio.write_json(target, {"b": 1, "a": 2})
    assert target.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            tmp.write_text('{"half": ')
            raise RuntimeError("killed mid-write")
    assert target.read_text().startswith('{\n  "a": 2')  # the old file, whole
    assert leftovers(target.parent) == []                 # and no temporary left beside it


def test_a_finished_file_gets_the_usual_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "model.txt"
        fileio.write_text(target, "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~fileio._UMASK


def test_atomic_dir_swaps_the_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "bundle"
    with fileio.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(ValueError):
        with fileio.atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise ValueError("failed half way")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with fileio.atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]  # replaced whole: a.txt is gone
    assert leftovers(tmp_path) == []


def test_iter_files_walks_nested_folders_sorted_and_skips_hidden(tmp_path):
    (tmp_path / "cam" / "deep").mkdir(parents=True)
    (tmp_path / ".dvc").mkdir()
    for name in ("cam/b.jpg", "cam/deep/a.jpg", "cam/.hidden.jpg", ".dvc/config", "z.jpg"):
        (tmp_path / name).write_bytes(b"x")
    files = fileio.iter_files([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["cam/b.jpg", "cam/deep/a.jpg", "z.jpg"]
    assert fileio.iter_files([tmp_path / "z.jpg"]) == [tmp_path / "z.jpg"]
    with pytest.raises(CamidError, match="does not exist"):
        fileio.iter_files([tmp_path / "missing"])
