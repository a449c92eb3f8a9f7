"""The prepare stage: tiny JPEGs made here, checked and indexed (no pixels are cached)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from camid import cli
from camid.errors import CamidError
from camid.data.cache import SPLITS, prepare, read_index, read_meta

PATCH = 64          # crops are 2 * PATCH = 128
SIZE = (144, 176)   # even, as native sizes are


def textured(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 3 + y * 5)[..., None] % 256 + rng.integers(0, 40, (height, width, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def make_split(folder: Path, photos: dict[str, list[str]], *, pixels=textured, size=SIZE) -> Path:
    """Write JPEGs and train/val/test.csv; `photos` maps split -> labels, one photo per entry (splits left out
    are written empty)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, labels in photos.items():
        rows = []
        for i, label in enumerate(labels):
            path = folder / f"{split}-{i:03d}-{label}.jpg"
            Image.fromarray(pixels(*size, seed=i if split == "train" else 100 + i)).save(path, quality=95)
            rows.append({"path": str(path), "label": label})
        pd.DataFrame(rows, columns=["path", "label"]).to_csv(folder / f"{split}.csv", index=False)
    for split in set(SPLITS) - set(photos):
        pd.DataFrame(columns=["path", "label"]).to_csv(folder / f"{split}.csv", index=False)
    return folder


@pytest.fixture
def split_dir(tmp_path, catalog):
    labels = catalog.labels
    return make_split(tmp_path / "split", {"train": [labels[0], labels[1], labels[1], labels[2]],
                                           "val": [labels[0], labels[2]]})


def run_prepare(split_dir, out, catalog, workers=1):
    return prepare(split_dir, out, catalog, patch=PATCH, workers=workers)


def test_index_and_meta_hold_every_photo_and_no_pixels(split_dir, tmp_path, catalog):
    out = tmp_path / "cache"
    meta = run_prepare(split_dir, out, catalog)
    assert read_meta(out) == json.loads(json.dumps(meta))
    assert meta["patch"] == PATCH and meta["crop"] == 2 * PATCH and meta["labels"] == catalog.labels
    photo_bytes = sum(Path(p).stat().st_size for p in split_dir.glob("train-*.jpg"))
    assert meta["splits"]["train"] == {"photos": 4, "skipped": 0, "pixels": 4 * 144 * 176, "bytes": photo_bytes}
    assert meta["splits"]["val"]["photos"] == 2
    assert sorted(p.name for p in (out / "train").iterdir()) == ["index.parquet"]  # an index, no crops

    index = read_index(out, "train")
    assert list(index["image"]) == [0, 1, 2, 3] and "top" not in index.columns
    assert list(index["label_index"]) == [catalog.index(label) for label in index["label"]]
    for row in index.itertuples():
        data = Path(row.path).read_bytes()
        assert (row.height, row.width, row.bytes) == (144, 176, len(data))
        assert row.sha256 == hashlib.sha256(data).hexdigest()

    index = read_index(out, "val")
    assert list(index["top"]) == [8, 8] and list(index["left"]) == [24, 24]  # (144-128)/2, (176-128)/2


def test_the_index_takes_no_room_beside_the_photos(tmp_path, catalog):
    """What the crop store cost is gone: the cache is a small fraction of the photos' own bytes."""
    labels = catalog.labels
    split_dir = make_split(tmp_path / "split", {"train": labels[:4] * 2, "val": labels[:2], "test": labels[:2]},
                           size=(600, 800))
    out = tmp_path / "cache"
    run_prepare(split_dir, out, catalog)
    photos = sum(p.stat().st_size for p in split_dir.glob("*.jpg"))
    cache = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert cache < 0.1 * photos, (cache, photos)


def test_deterministic_whatever_the_worker_count(split_dir, tmp_path, catalog):
    run_prepare(split_dir, tmp_path / "a", catalog, workers=1)
    run_prepare(split_dir, tmp_path / "b", catalog, workers=2)
    for split in SPLITS:
        pd.testing.assert_frame_equal(read_index(tmp_path / "a", split), read_index(tmp_path / "b", split))
    assert read_meta(tmp_path / "a") == read_meta(tmp_path / "b")


def test_a_photo_that_changed_since_prepare_is_a_clear_error(split_dir, tmp_path, catalog):
    from camid.data.cache import PhotoChanged, decode_photo

    run_prepare(split_dir, tmp_path / "cache", catalog)
    row = read_index(tmp_path / "cache", "train").iloc[0]
    assert decode_photo(row["path"], row["bytes"], row["sha256"]).shape == (144, 176, 3)
    Image.fromarray(textured(*SIZE, seed=99)).save(row["path"], quality=80)
    with pytest.raises(PhotoChanged, match="changed since the prepare stage.*dvc repro prepare"):
        decode_photo(row["path"], row["bytes"], row["sha256"])
    Path(row["path"]).unlink()
    with pytest.raises(PhotoChanged, match="gone since the prepare stage"):
        decode_photo(row["path"], row["bytes"])


def test_a_params_file_with_the_old_prepare_block_says_what_to_do(tmp_path):
    import yaml

    from camid.config import ConfigError, load_params

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["prepare"] = {"crops_per_image": 8, "shard_size": 256, "seed": 11}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="no longer caches crops.*train.crops_per_decode"):
        load_params(tmp_path / "params.yaml")


def test_unusable_photos_are_skipped_with_a_reason(tmp_path, catalog, caplog):
    labels = catalog.labels
    split_dir = make_split(tmp_path / "split", {"train": [labels[0], labels[1]], "val": [labels[0]]})
    small = tmp_path / "split" / "small.jpg"
    Image.fromarray(textured(100, 300, 1)).save(small)
    truncated = tmp_path / "split" / "truncated.jpg"
    truncated.write_bytes((tmp_path / "split" / "train-000-{}.jpg".format(labels[0])).read_bytes()[:600])
    table = pd.read_csv(split_dir / "train.csv")
    extra = [{"path": str(small), "label": labels[1]}, {"path": str(truncated), "label": labels[1]},
             {"path": str(tmp_path / "nowhere.jpg"), "label": labels[1]}]
    pd.concat([table, pd.DataFrame(extra)]).to_csv(split_dir / "train.csv", index=False)

    meta = run_prepare(split_dir, tmp_path / "cache", catalog)
    assert meta["splits"]["train"]["photos"] == 2 and meta["splits"]["train"]["skipped"] == 3
    reasons = {Path(s["path"]).name: s["reason"] for s in meta["skipped"]}
    assert reasons["small.jpg"] == "100x300 is smaller than the 128x128 crop"
    assert reasons["truncated.jpg"].startswith("cannot decode")
    assert reasons["nowhere.jpg"] == "file not found"
    assert "small.jpg" in caplog.text
    assert list(read_index(tmp_path / "cache", "train")["image"].unique()) == [0, 1]


def test_unknown_labels_and_missing_files_are_clear_errors(split_dir, tmp_path, catalog):
    (split_dir / "val.csv").write_text("path,label\nx.jpg,No-Such-Camera\n")
    with pytest.raises(CamidError, match="No-Such-Camera"):
        run_prepare(split_dir, tmp_path / "cache", catalog)
    (split_dir / "val.csv").unlink()
    with pytest.raises(CamidError, match="val.csv not found"):
        run_prepare(split_dir, tmp_path / "cache", catalog)
    assert not (tmp_path / "cache").exists()


def test_cli_builds_the_cache_from_params(split_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CAMID_PARAMS", str(Path(__file__).resolve().parents[1] / "params.yaml"))
    out = tmp_path / "cache"
    assert cli.main(["prepare", str(split_dir), "--out", str(out), "--workers", "1"]) == 0
    meta = read_meta(out)
    assert meta["crop"] == 2 * meta["patch"] and (out / "train" / "index.parquet").is_file()


def test_a_grayscale_photo_is_read_as_rgb_as_serving_decodes_it(tmp_path, catalog):
    """One decoder everywhere: a photo the served model accepts is not skipped by evaluation."""
    from camid.data.dataset import eval_patches

    labels = catalog.labels
    split_dir = make_split(tmp_path / "split", {"train": [labels[0]], "test": [labels[0]]})
    gray = tmp_path / "split" / "gray.jpg"
    Image.fromarray(textured(*SIZE, seed=3)[..., 0]).save(gray, quality=95)
    pd.DataFrame([{"path": str(gray), "label": labels[0]}]).to_csv(split_dir / "test.csv", index=False)
    meta = run_prepare(split_dir, tmp_path / "cache", catalog)
    assert meta["splits"]["test"]["photos"] == 1 and meta["splits"]["test"]["skipped"] == 0
    index = read_index(tmp_path / "cache", "test")
    top, left = index["top"][0], index["left"][0]
    expected = np.asarray(Image.open(gray).convert("RGB"))[top + 32:top + 96, left + 32:left + 96]
    np.testing.assert_array_equal(eval_patches(tmp_path / "cache", "test", PATCH).images[0], expected)
