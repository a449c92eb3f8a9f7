"""The served model in-process: `predict_frame` (what the pyfunc runs) and the logged pyfunc, no HTTP server."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from camid.serving.model import predict_frame

STATUS = ["camera", "closest_camera", "camera_group", "confidence", "unknown", "unknown_by", "reference_devices", "size_seen", "manipulated", "manipulated_estimated", "patches",
          "tables_evidence", "exif_model", "exif_camera", "consistent", "error"]


@pytest.fixture(scope="module")
def ensemble(tiny_model):
    """The tiny model as if its evaluation had kept all eight D4 views (an unevaluated bundle keeps the identity)."""
    import dataclasses

    from camid.inference.ensemble import Ensemble

    return dataclasses.replace(Ensemble.load(tiny_model.bundle), views=tuple(range(8)))


@pytest.fixture(scope="module")
def photos(tiny_model):
    """The held-out photos' bytes, one per camera twice over (the split keeps 2 of 6 per camera)."""
    return [open(path, "rb").read() for path in tiny_model.test.path], list(tiny_model.test.label)


def solid_png(width: int, height: int) -> bytes:
    """A black 1-bit PNG of any size, compressed row by row: 20000x20000 costs 50 MB of zeros and 60 kB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (1 + -(-width // 8))  # filter byte 0, then 8 pixels a byte
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def jpeg(size=(96, 96), seed=0) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_predict_frame_scores_image_bytes(ensemble, photos):
    images, _ = photos
    out = predict_frame(ensemble, pd.DataFrame({"image": images[:3]}))
    assert list(out.columns) == STATUS + ensemble.labels and len(out) == 3
    assert set(out.camera) <= set(ensemble.labels)
    assert np.allclose(out[ensemble.labels].sum(axis=1), 1)
    assert list(out.camera) == [ensemble.labels[i] for i in out[ensemble.labels].to_numpy().argmax(1)]


def test_tta_on_and_off_give_the_same_shape(ensemble, photos):
    images, _ = photos
    frame = pd.DataFrame({"image": images[:4], "manipulated": [False, True, False, True]})
    with_tta = predict_frame(ensemble, frame, {"tta": True})
    without = predict_frame(ensemble, frame, {"tta": False})
    assert with_tta.shape == without.shape and list(with_tta.columns) == list(without.columns)
    assert not np.allclose(with_tta[ensemble.labels], without[ensemble.labels])  # eight views, not one


def test_optimal_balance_gives_equal_counts_on_a_closed_set(ensemble, photos):
    images, labels = photos
    # One photo per camera unaltered, the other manipulated: each group is a closed set of one per camera.
    seen, flags = set(), []
    for label in labels:
        flags.append(label in seen)
        seen.add(label)
    frame = pd.DataFrame({"image": images, "manipulated": flags})
    raw = predict_frame(ensemble, frame)
    balanced = predict_frame(ensemble, frame, {"balance": "optimal"})
    for group in (False, True):
        counts = balanced.camera[balanced.manipulated == group].value_counts()
        assert len(counts) == len(ensemble.labels) and set(counts) == {1}, counts
    assert np.allclose(raw[ensemble.labels], balanced[ensemble.labels])  # balancing relabels, never rescores


def test_missing_manipulated_column_is_estimated_and_returned(ensemble, photos):
    images, _ = photos
    out = predict_frame(ensemble, pd.DataFrame({"image": images[:3]}))
    assert out.manipulated_estimated.tolist() == [True] * 3 and out.manipulated.dtype == bool
    given = predict_frame(ensemble, pd.DataFrame({"image": images[:3], "manipulated": [True, None, False]}))
    assert given.manipulated_estimated.tolist() == [False, True, False]
    assert given.manipulated[0] and not given.manipulated[2]


@pytest.mark.parametrize("bad, reason", [
    (b"definitely not an image", "not a decodable image"),
    (solid_png(1, 1), "smaller than the model"),
    (solid_png(20000, 20000), "over the limit"),
    (jpeg()[:300], "truncated"),
    (None, "no image given"),
    ("not base64 at all!", "not valid base64"),
    (b"", "empty image"),
])
def test_bad_rows_are_named_with_their_reason(ensemble, bad, reason):
    with pytest.raises(MlflowException) as caught:
        predict_frame(ensemble, pd.DataFrame({"image": [jpeg(), bad, jpeg(seed=1)]}))
    message = caught.value.message
    assert "row 1" in message and reason in message, message
    assert "row 0" not in message and "row 2" not in message, message


def test_every_bad_row_is_reported_at_once(ensemble):
    with pytest.raises(MlflowException) as caught:
        predict_frame(ensemble, pd.DataFrame({"image": [b"junk", jpeg(), None],
                                              "manipulated": [False, True, None]}))
    assert "row 0: not a decodable image" in caught.value.message and "row 2: no image given" in caught.value.message


def test_on_error_row_answers_the_good_rows_and_names_each_bad_one(ensemble, photos):
    images, _ = photos
    frame = pd.DataFrame({"image": [images[0], b"junk", images[1], None, images[2]],
                          "manipulated": [False, False, "yes", None, None]})
    out = predict_frame(ensemble, frame, {"on_error": "row"})
    assert list(out.columns) == STATUS + ensemble.labels and len(out) == 5
    assert out.error[1].startswith("not a decodable image") and out.error[3] == "no image given"
    assert "manipulated is 'yes'" in out.error[2]
    good = [0, 4]
    assert list(out.error[good]) == ["", ""] and out.camera[[1, 2, 3]].eq("").all()
    assert out.loc[[1, 2, 3], ensemble.labels].isna().all().all() and list(out.patches[[1, 2, 3]]) == [0, 0, 0]
    # the good rows get exactly the answer they get alone
    alone = predict_frame(ensemble, frame.iloc[good].reset_index(drop=True))
    assert list(out.camera[good]) == list(alone.camera)
    assert np.allclose(out.loc[good, ensemble.labels].to_numpy(float), alone[ensemble.labels].to_numpy())
    everything_bad = predict_frame(ensemble, pd.DataFrame({"image": [b"junk"]}), {"on_error": "row"})
    assert everything_bad.error[0] and everything_bad.camera[0] == ""


def test_by_default_a_bad_row_fails_the_request_and_says_how_to_answer_per_row(ensemble):
    with pytest.raises(MlflowException) as caught:
        predict_frame(ensemble, pd.DataFrame({"image": [jpeg(), b"junk"]}))
    assert "on_error=row" in caught.value.message


@pytest.mark.parametrize("params, word", [
    ({"on_error": "ignore"}, "on_error"),
    ({"blend": "median"}, "blend"),
    ({"balance": "hungarian"}, "balance"),
    ({"tta": "maybe"}, "tta"),
    ({"patches": "many"}, "patches"),
    ({"patches": -1}, "patches"),
    ({"patches": True}, "patches"),
    ({"jpeg_tables": "sometimes"}, "jpeg_tables"),
    ({"temperature": 2}, "unknown param"),
])
def test_bad_params_say_which_and_what_is_allowed(ensemble, params, word):
    with pytest.raises(MlflowException) as caught:
        predict_frame(ensemble, pd.DataFrame({"image": [jpeg()]}), params)
    assert word in caught.value.message


def test_patches_param_scores_a_full_photo_on_a_grid(ensemble, photos):
    from camid.core.imageio import decode_image
    from camid.core.patches import auto_patch_count, centre_crop

    images, _ = photos
    frame = pd.DataFrame({"image": images[:2], "manipulated": [False, False]})
    auto = predict_frame(ensemble, frame, {"tta": False})
    shape = decode_image(images[0]).shape
    assert auto.patches[0] == auto_patch_count(shape, ensemble.patch) > 1
    centre = predict_frame(ensemble, frame, {"tta": False, "patches": 1})
    assert list(centre.patches) == [1, 1]
    direct = ensemble.predict(np.stack([centre_crop(decode_image(b), ensemble.patch) for b in images[:2]]),
                              np.array([False, False]), tta=False)
    np.testing.assert_allclose(centre[ensemble.labels].to_numpy(), direct.probs, atol=1e-9)
    assert not np.allclose(auto[ensemble.labels], centre[ensemble.labels])
    assert list(predict_frame(ensemble, frame, {"tta": False, "patches": 4}).patches) == [4, 4]


def test_jpeg_table_evidence_moves_only_unaltered_jpegs(ensemble, photos):
    import dataclasses

    from camid.forensics.inspect import header_facts
    from camid.inference.jpeg_tables import TablePrior

    images, _ = photos
    target = len(ensemble.labels) - 1
    # Training photos as if the firmware of the last camera alone wrote these photos' tables, 40 times over.
    sigs = [header_facts(b)["jpeg_tables"] for b in images[:2]]
    prior = TablePrior.fit(sigs * 40, [target] * 80, ensemble.labels)
    informed = dataclasses.replace(ensemble, tables=prior, use_tables=True)
    frame = pd.DataFrame({"image": images[:2], "manipulated": [False, True]})
    plain = predict_frame(ensemble, frame, {"tta": False, "patches": 1})
    moved = predict_frame(informed, frame, {"tta": False, "patches": 1})
    assert moved.camera[0] == ensemble.labels[target]
    assert moved[ensemble.labels].iloc[0, target] > plain[ensemble.labels].iloc[0, target]
    np.testing.assert_allclose(moved[ensemble.labels].iloc[1], plain[ensemble.labels].iloc[1])  # manipulated row
    assert moved.tables_evidence.tolist() == ["used", "none"] and set(plain.tables_evidence) == {"none"}
    # Without a flag the evidence applies whatever the auxiliary head estimates: the tables are the firmware's.
    unflagged = predict_frame(informed, pd.DataFrame({"image": images[:2]}), {"tta": False, "patches": 1})
    assert list(unflagged.camera) == [ensemble.labels[target]] * 2
    off = predict_frame(informed, frame, {"tta": False, "patches": 1, "jpeg_tables": False})
    np.testing.assert_allclose(off[ensemble.labels], plain[ensemble.labels])
    assert set(off.tables_evidence) == {"none"}
    # A PNG has no tables: nothing to add.
    buf = io.BytesIO()
    Image.open(io.BytesIO(images[0])).save(buf, "PNG")
    png = pd.DataFrame({"image": [buf.getvalue()], "manipulated": [False]})
    from_png = predict_frame(informed, png, {"tta": False})
    np.testing.assert_allclose(from_png[ensemble.labels], predict_frame(ensemble, png, {"tta": False})[ensemble.labels])
    assert list(from_png.tables_evidence) == ["none"]  # no tables to see


def test_exif_model_is_checked_against_the_camera_the_pixels_point_to(ensemble, photos, catalog):
    import dataclasses

    images, labels = photos
    cameras = [{"label": c.label, "make": c.make, "models": list(c.models)} for c in catalog.cameras]
    checked = dataclasses.replace(ensemble, cameras=cameras)
    out = predict_frame(checked, pd.DataFrame({"image": images}), {"tta": False, "patches": 1})
    assert list(out.exif_camera) == labels  # the zoo writes each camera's EXIF Model
    # EXIF contradicts the pixels only where they give its camera under 5% and it is outside the camera group
    expected = [label in group.split(" or ") or p >= 0.05
                for label, group, p in zip(labels, out.camera_group, [out[l].iloc[i] for i, l in enumerate(labels)])]
    assert out.consistent.tolist() == expected
    assert all(group.split(" or ")[0] == closest for group, closest in zip(out.camera_group, out.closest_camera))
    # A photo whose EXIF names a camera outside the catalog, and one with no EXIF at all.
    exif = Image.Exif()
    exif[0x0110] = "Phone 9000"
    other, bare = io.BytesIO(), io.BytesIO()
    Image.open(io.BytesIO(images[0])).save(other, "JPEG", quality=95, exif=exif.tobytes())
    Image.open(io.BytesIO(images[0])).save(bare, "PNG")
    out = predict_frame(checked, pd.DataFrame({"image": [other.getvalue(), bare.getvalue()]}), {"patches": 1})
    assert list(out.exif_model) == ["Phone 9000", ""] and list(out.exif_camera) == ["", ""]
    assert out.consistent[0] is False or out.consistent[0] == False  # noqa: E712 (pandas' nullable boolean)
    assert pd.isna(out.consistent[1])
    # Without a catalog in the bundle (made before this check existed) nothing is claimed.
    assert predict_frame(ensemble, pd.DataFrame({"image": images[:1]}), {"patches": 1}).consistent.isna().all()


def test_bad_manipulated_value_names_the_row(ensemble):
    with pytest.raises(MlflowException, match=r"row 1: manipulated is 'yes'"):
        predict_frame(ensemble, pd.DataFrame({"image": [jpeg(), jpeg()], "manipulated": [True, "yes"]}))


def test_missing_image_column_says_what_to_send(ensemble):
    with pytest.raises(MlflowException, match="no 'image' column"):
        predict_frame(ensemble, pd.DataFrame({"picture": [jpeg()]}))


def test_logged_pyfunc_takes_raw_bytes_and_base64_alike(registered_model, photos):
    """Through MLflow's schema enforcement: `image` is declared a string so base64 errors can name the row;
    Python callers still pass raw bytes, JSON clients base64 (with or without MIME line breaks)."""
    import mlflow

    model = mlflow.pyfunc.load_model(registered_model.local_uri)
    images, _ = photos
    as_bytes = model.predict(pd.DataFrame({"image": images[:2], "manipulated": [False, None]}))
    as_text = model.predict(pd.DataFrame({"image": [base64.b64encode(images[0]).decode(),
                                                    base64.encodebytes(images[1]).decode()],
                                          "manipulated": [False, None]}))
    pd.testing.assert_frame_equal(as_bytes, as_text)
    with pytest.raises(MlflowException, match=r"row 1: not valid base64"):
        model.predict(pd.DataFrame({"image": [images[0], "%%%"]}))
