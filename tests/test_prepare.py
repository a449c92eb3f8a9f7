"""The prepare stage: tiny JPEGs made here, cached into shards whose every crop is checked against the photo."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from camid import cli
from camid.errors import CamidError
from camid.data.cache import SPLITS, prepare, read_index, read_meta, shard_path

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


def run_prepare(split_dir, out, catalog, workers=1, crops=3, shard_size=4):
    return prepare(split_dir, out, catalog, patch=PATCH, crops_per_image=crops, shard_size=shard_size, seed=5,
                   workers=workers)


def load_all(out, split):
    index = read_index(out, split)
    shards = [np.load(shard_path(out, split, k), mmap_mode="r") for k in range(index["shard"].max() + 1)]
    return index, np.stack([shards[s][r] for s, r in zip(index["shard"], index["row"])])


def test_shards_index_and_meta(split_dir, tmp_path, catalog):
    out = tmp_path / "cache"
    meta = run_prepare(split_dir, out, catalog)
    assert read_meta(out) == json.loads(json.dumps(meta))
    assert meta["patch"] == PATCH and meta["crop"] == 2 * PATCH and meta["labels"] == catalog.labels
    assert meta["splits"]["train"] == {"photos": 4, "crops": 12, "skipped": 0, "shards": 3}
    assert meta["splits"]["val"] == {"photos": 2, "crops": 2, "skipped": 0, "shards": 1}

    shard = np.load(shard_path(out, "train", 2), mmap_mode="r")
    assert isinstance(shard, np.memmap) and shard.dtype == np.uint8 and shard.shape == (4, 128, 128, 3)

    index, crops = load_all(out, "train")
    assert list(index["image"]) == [i for i in range(4) for _ in range(3)]
    assert list(index["label_index"]) == [catalog.index(label) for label in index["label"]]
    assert (index["top"] % 2 == 0).all() and (index["left"] % 2 == 0).all()
    assert len(set(zip(index["top"], index["left"]))) > 3  # random positions
    for row, crop in zip(index.itertuples(), crops):
        photo = np.asarray(Image.open(row.path))
        assert np.array_equal(crop, photo[row.top:row.top + 128, row.left:row.left + 128])

    index, crops = load_all(out, "val")
    assert list(index["top"]) == [8, 8] and list(index["left"]) == [24, 24]  # (144-128)/2, (176-128)/2
    photo = np.asarray(Image.open(index["path"][1]))
    assert np.array_equal(crops[1], photo[8:136, 24:152])


def test_deterministic_whatever_the_worker_count(split_dir, tmp_path, catalog):
    run_prepare(split_dir, tmp_path / "a", catalog, workers=1)
    run_prepare(split_dir, tmp_path / "b", catalog, workers=2)
    for split in ("train", "val"):
        index_a, crops_a = load_all(tmp_path / "a", split)
        index_b, crops_b = load_all(tmp_path / "b", split)
        pd.testing.assert_frame_equal(index_a, index_b)
        assert np.array_equal(crops_a, crops_b)


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


def test_a_grayscale_photo_is_cached_as_rgb_as_serving_decodes_it(tmp_path, catalog):
    """One decoder everywhere: a photo the served model accepts is not skipped by evaluation."""
    labels = catalog.labels
    split_dir = make_split(tmp_path / "split", {"train": [labels[0]], "test": [labels[0]]})
    gray = tmp_path / "split" / "gray.jpg"
    Image.fromarray(textured(*SIZE, seed=3)[..., 0]).save(gray, quality=95)
    pd.DataFrame([{"path": str(gray), "label": labels[0]}]).to_csv(split_dir / "test.csv", index=False)
    meta = run_prepare(split_dir, tmp_path / "cache", catalog)
    assert meta["splits"]["test"] == {"photos": 1, "crops": 1, "skipped": 0, "shards": 1}
    index, crops = load_all(tmp_path / "cache", "test")
    top, left = index["top"][0], index["left"][0]
    expected = np.asarray(Image.open(gray).convert("RGB"))[top:top + 128, left:left + 128]
    np.testing.assert_array_equal(crops[0], expected)
