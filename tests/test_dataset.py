"""Training batches and the validation set, decoded from real photos indexed by the prepare stage."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from camid.data.dataset import EvalSet, TrainPatches, eval_patches
from camid.errors import CamidError
from camid.core.manipulations import MANIPULATIONS, apply
from camid.data.cache import prepare, read_index
from tests.test_prepare import make_split

PATCH = 64


def column_ramp(height: int, width: int, seed: int) -> np.ndarray:
    """Every row the same, which every manipulation preserves exactly: a patch with unequal rows was turned."""
    rng = np.random.default_rng(seed)
    row = rng.integers(0, 256, (1, width, 3))
    return np.repeat(row, height, axis=0).astype(np.uint8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, catalog):
    labels = catalog.labels
    # Aster-A1 (rot90) has one photo, Boreal-B7 (no rot90) three: sampling must still balance the cameras.
    chosen = {"Aster-A1": 1, "Boreal-B7": 3, "Corvid-C3": 1, "Dune-D5": 1}
    assert [catalog.get(label).rot90 for label in chosen] == [True, False, True, False]
    train = [label for label, n in chosen.items() for _ in range(n)]
    folder = tmp_path_factory.mktemp("dataset")
    split_dir = make_split(folder / "split", {"train": train, "val": [labels[0], labels[2], labels[2]]},
                           pixels=column_ramp)
    prepare(split_dir, folder / "cache", catalog, patch=PATCH, workers=1)
    return folder / "cache"


def patches(cache, catalog, **overrides):
    options = dict(patch=PATCH, batch_size=16, steps_per_epoch=5, manipulation_prob=0.5, seed=3)
    options.update(overrides)
    return TrainPatches(cache, catalog, **options)


def test_batch_shapes_and_dtypes(cache, catalog):
    inputs, targets = patches(cache, catalog, patch=48)[0]
    assert set(inputs) == {"image", "manipulated"} and set(targets) == {"camera", "manipulation"}
    assert inputs["image"].shape == (16, 48, 48, 3) and inputs["image"].dtype == np.float32
    assert 0 <= inputs["image"].min() and inputs["image"].max() <= 255
    assert inputs["manipulated"].shape == (16, 1) and inputs["manipulated"].dtype == np.float32
    assert targets["camera"].shape == targets["manipulation"].shape == (16,)
    assert targets["camera"].dtype == targets["manipulation"].dtype == np.int32
    assert len(patches(cache, catalog)) == 5
    with pytest.raises(IndexError):
        patches(cache, catalog)[5]


def test_cameras_are_balanced_not_photos(cache, catalog):
    dataset = patches(cache, catalog, batch_size=100, manipulation_prob=0.0)
    cameras = np.concatenate([dataset[i][1]["camera"] for i in range(4)])
    counts = np.bincount(cameras, minlength=len(catalog))
    present = [catalog.index(label) for label in ("Aster-A1", "Boreal-B7", "Corvid-C3", "Dune-D5")]
    assert counts.sum() == counts[present].sum() == 400
    assert all(60 <= counts[c] <= 140 for c in present), counts  # 100 expected each; Boreal has 3x the photos


def test_manipulated_flag_follows_the_manipulation(cache, catalog):
    for probability, check in ((0.0, lambda m: (m == 0).all()), (1.0, lambda m: (m > 0).all()),
                               (0.5, lambda m: 0.3 < (m > 0).mean() < 0.7)):
        inputs, targets = patches(cache, catalog, batch_size=64, manipulation_prob=probability)[1]
        manipulation = targets["manipulation"]
        assert check(manipulation), (probability, manipulation)
        assert np.array_equal(inputs["manipulated"][:, 0], (manipulation > 0).astype(np.float32))
    assert set(np.unique(manipulation)) <= set(range(len(MANIPULATIONS) + 1))


def test_rot90_only_for_cameras_that_allow_it(cache, catalog):
    rotated = {label: 0 for label in catalog.labels}
    dataset = patches(cache, catalog, batch_size=64)
    for i in range(len(dataset)):
        inputs, targets = dataset[i]
        for image, camera in zip(inputs["image"], targets["camera"]):
            across_rows = np.abs(image - image[:1]).max()      # 0 unless the patch was turned a quarter
            across_columns = np.abs(image - image[:, :1]).max()
            if across_rows:
                # JPEG's chroma rounding alternates by column, so a turned patch is only nearly column-constant
                assert across_columns < across_rows
            rotated[catalog.labels[camera]] += bool(across_rows)
    assert rotated["Boreal-B7"] == rotated["Dune-D5"] == 0
    assert rotated["Aster-A1"] > 0 and rotated["Corvid-C3"] > 0


def test_the_diagonal_flip_that_keeps_a_cameras_layout_turns_half_its_patches_and_no_other_cameras(
        cache, catalog, tmp_path):
    """The prepare stage's phase measures say Boreal-B7's photos keep their layout under the transpose (as a BGGR
    sensor's do) and the other cameras' photos tell nothing: about half of Boreal-B7's patches come transposed
    (column-constant, its photos being row-constant ramps), no other non-rotating camera's, and none without
    `cfa_flips`."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    index = read_index(copy, "train")
    boreal = index["label"] == "Boreal-B7"
    index.loc[boreal, ["phase_transpose", "phase_anti"]] = (0.01, 0.30)
    index.loc[~boreal, ["phase_transpose", "phase_anti"]] = (0.01, 0.012)
    index.to_parquet(copy / "train" / "index.parquet", index=False)

    def transposed(dataset) -> dict[str, list[bool]]:
        found = {"Boreal-B7": [], "Dune-D5": []}
        for i in range(len(dataset)):
            inputs, targets = dataset[i]
            for image, camera in zip(inputs["image"], targets["camera"]):
                label = catalog.labels[camera]
                if label in found:
                    found[label].append(bool(np.abs(image - image[:1]).max()))  # rows differ: turned
        return found

    flipped = patches(copy, catalog, batch_size=64, manipulation_prob=0.0, cfa_flips=True)
    assert flipped.flip_views == {"Boreal-B7": "flip_rot90"}
    found = transposed(flipped)
    assert 0.3 < np.mean(found["Boreal-B7"]) < 0.7 and not any(found["Dune-D5"])
    plain = patches(copy, catalog, batch_size=64, manipulation_prob=0.0, cfa_flips=False)
    assert not any(transposed(plain)["Boreal-B7"])
    assert patches(cache, catalog, cfa_flips=True).flip_views == {}  # the module's ramps show no CFA trace


def test_deterministic_per_seed_epoch_and_batch(cache, catalog):
    first, second = patches(cache, catalog), patches(cache, catalog)
    later = first[3]
    first[1]
    assert all(np.array_equal(a, b) for a, b in zip(_flat(later), _flat(second[3])))
    assert all(np.array_equal(a, b) for a, b in zip(_flat(first[3]), _flat(pickle.loads(pickle.dumps(first))[3])))
    assert not np.array_equal(first[3][0]["image"], first[2][0]["image"])
    first.on_epoch_end()
    assert not np.array_equal(first[3][0]["image"], later[0]["image"])
    assert not np.array_equal(patches(cache, catalog, seed=4)[3][0]["image"], later[0]["image"])


def test_the_same_batches_whatever_the_threads_and_the_order(cache, catalog):
    one = patches(cache, catalog, threads=1, crops_per_decode=2)
    three = patches(cache, catalog, threads=3, crops_per_decode=2)
    backwards = [three[i] for i in reversed(range(len(three)))][::-1]
    for i in range(len(one)):
        assert all(np.array_equal(a, b) for a, b in zip(_flat(one[i]), _flat(backwards[i]))), i


def _position_photo(height: int, width: int, seed: int) -> np.ndarray:
    """Each pixel says where it is: red and green the row and column halved, blue zero."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([y // 2, x // 2, np.zeros_like(y)], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def position_cache(tmp_path_factory, catalog):
    """Two lossless photos (PNG) of Boreal-B7 (no rot90), 300 x 400: a patch's pixels give its position."""
    folder = tmp_path_factory.mktemp("positions")
    split_dir = make_split(folder / "split", {"train": ["Boreal-B7", "Boreal-B7"]}, pixels=_position_photo,
                           size=(300, 400))
    for jpeg in (folder / "split").glob("*.jpg"):  # lossless, so the pixel values survive
        Image.fromarray(_position_photo(300, 400, 0)).save(jpeg, format="PNG")
    prepare(split_dir, folder / "cache", catalog, patch=PATCH, workers=1)
    return folder / "cache"


def test_patches_come_from_all_over_every_photo_at_even_offsets(position_cache, catalog):
    dataset = patches(position_cache, catalog, batch_size=8, steps_per_epoch=16, manipulation_prob=0.0,
                      crops_per_decode=4)
    tops, lefts = [], []
    for i in range(len(dataset)):
        for image in dataset[i][0]["image"]:
            # the patch is the centre of a 64-px source cut at (top, left): its first pixel is (top, left)
            top, left = 2 * int(image[0, 0, 0]), 2 * int(image[0, 0, 1])
            assert np.array_equal(image[:, :, 0], np.repeat((np.arange(top, top + PATCH) // 2)[:, None], PATCH, 1))
            tops.append(top)
            lefts.append(left)
    assert len(set(zip(tops, lefts))) > 100           # 128 patches, nearly all at different places
    assert min(tops) < 40 and max(tops) > 300 - PATCH - 40 and max(lefts) > 400 - PATCH - 40


def test_one_decode_feeds_crops_per_decode_batches(cache, catalog, monkeypatch):
    import camid.data.dataset as dataset_module

    decodes = []
    real = dataset_module.decode_photo
    monkeypatch.setattr(dataset_module, "decode_photo", lambda *a, **k: decodes.append(a[0]) or real(*a, **k))
    dataset = patches(cache, catalog, batch_size=6, steps_per_epoch=8, crops_per_decode=4, threads=2)
    batches = [dataset[i] for i in range(len(dataset))]
    assert len(decodes) <= 2 * 6  # two groups of at most 6 distinct photos, each decoded once
    for group in (batches[:4], batches[4:]):  # each batch holds one patch of each of the group's photos
        assert all(np.array_equal(group[0][1]["camera"], b[1]["camera"]) for b in group)


def test_a_training_photo_changed_since_prepare_stops_training_with_the_fix(tmp_path, catalog):
    from camid.data.cache import PhotoChanged

    split_dir = make_split(tmp_path / "split", {"train": ["Boreal-B7"]})
    prepare(split_dir, tmp_path / "cache", catalog, patch=PATCH, workers=1)
    Image.fromarray(column_ramp(144, 176, 5)).save(next((tmp_path / "split").glob("train-*.jpg")), quality=70)
    with pytest.raises(PhotoChanged, match="dvc repro prepare"):
        patches(tmp_path / "cache", catalog, threads=1)[0]


def _flat(batch):
    inputs, targets = batch
    return [inputs["image"], inputs["manipulated"], targets["camera"], targets["manipulation"]]


def test_cache_too_small_or_for_another_catalog(cache, catalog):
    with pytest.raises(CamidError, match="too small"):
        patches(cache, catalog, patch=PATCH + 2)
    other = type(catalog)("other", catalog.cameras[::-1])
    with pytest.raises(CamidError, match="re-run the prepare stage"):
        patches(cache, other)


def test_eval_set_holds_every_crop_unaltered_and_manipulated(cache, catalog):
    evaluation = eval_patches(cache, catalog=catalog)
    assert isinstance(evaluation, EvalSet) and len(evaluation) == 3 * 9
    assert evaluation.images.shape == (27, PATCH, PATCH, 3) and evaluation.images.dtype == np.uint8
    assert list(evaluation.manipulation) == list(range(9)) * 3
    assert list(evaluation.image_id) == [i for i in range(3) for _ in range(9)]
    assert list(evaluation.labels) == [0] * 9 + [2] * 18
    assert np.array_equal(evaluation.manipulated, evaluation.manipulation > 0)
    assert evaluation.camera_labels == tuple(catalog.labels) and evaluation.path[9] == evaluation.path[17]
    row = read_index(cache, "val").iloc[1]
    crop = np.asarray(Image.open(row["path"]).convert("RGB"))[row["top"]:row["top"] + 128, row["left"]:row["left"] + 128]
    assert np.array_equal(evaluation.images[9], crop[32:96, 32:96])
    for m, name in enumerate(MANIPULATIONS, start=1):
        assert np.array_equal(evaluation.images[9 + m], apply(crop, name, PATCH))
    assert eval_patches(cache, split="train", patch=32).images.shape == (6 * 9, 32, 32, 3)  # their centre crops


def test_eval_stream_builds_the_same_rows_chunk_by_chunk(cache, catalog):
    """The training stage's validation rows: the pixels of `eval_patches`, built a few whole batches at a time,
    with every row's label, manipulation, id and path held without its pixels."""
    from camid.data.dataset import eval_stream

    whole = eval_patches(cache, split="train", patch=32, catalog=catalog)
    # 2 batches of 5 rows per chunk: chunks cut photos (9 rows each) in the middle
    stream = eval_stream(cache, split="train", patch=32, batch_size=5, catalog=catalog, chunk_bytes=2 * 5 * 32 * 32 * 3)
    assert stream.rows_per_chunk == 10 and len(stream) == len(whole)
    for name in ("labels", "manipulation", "image_id", "path"):
        assert np.array_equal(getattr(stream, name), getattr(whole, name)), name
    chunks = list(stream.chunks())
    assert [start for start, _ in chunks] == list(range(0, len(whole), 10))
    assert max(len(pixels) for _, pixels in chunks) == 10
    assert np.array_equal(np.concatenate([pixels for _, pixels in chunks]), whole.images)


def test_scoring_a_stream_gives_the_answers_of_the_whole_array(cache, catalog):
    from camid.data.dataset import eval_stream
    from camid.models import create_model
    from camid.models.callbacks import predict_cameras

    whole = eval_patches(cache, split="val", patch=32, catalog=catalog)
    stream = eval_stream(cache, split="val", patch=32, batch_size=4, catalog=catalog, chunk_bytes=3 * 4 * 32 * 32 * 3)
    model = create_model("smallcnn", num_classes=len(catalog.labels), patch=32)
    expected = predict_cameras(model, whole.images, whole.manipulation > 0, 4)
    assert np.array_equal(predict_cameras(model, stream, stream.manipulation > 0, 4), expected)
    assert np.array_equal(predict_cameras(model, whole, whole.manipulation > 0, 4), expected)
