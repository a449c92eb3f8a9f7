"""`camid explain`: per-patch camera probabilities over a real photo, and Grad-CAM, from a real tiny model."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from camid.cli import main
from camid.core.imageio import decode_image


@pytest.fixture(scope="module")
def ensemble(tiny_model):
    from camid.inference.ensemble import Ensemble

    return Ensemble.load(tiny_model.bundle)


@pytest.fixture(scope="module")
def photo(tiny_model) -> Path:
    """A held-out virtual-zoo photo: a real camera-pipeline JPEG."""
    return Path(tiny_model.test.path[0])


def explain(*args) -> int:
    return main(["explain", *map(str, args)])


def test_figure_and_numbers_match_batch_prediction(tiny_model, ensemble, photo, tmp_path, capsys):
    out, numbers = tmp_path / "heat.png", tmp_path / "heat.json"
    assert explain(photo, "--model", tiny_model.bundle, "--out", out, "--json", numbers, "--no-tta") == 0
    summary = capsys.readouterr().out
    with Image.open(out) as figure:
        figure.verify()
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.width >= 600 and figure.height >= 500
    doc = json.loads(numbers.read_text())
    pixels = decode_image(photo.read_bytes())
    height, width, _ = pixels.shape
    patch, offsets, probs = doc["patch"], np.array(doc["offsets"]), np.array(doc["probs"])
    assert patch == tiny_model.patch and doc["labels"] == tiny_model.labels and doc["shape"] == [height, width]
    assert len(offsets) == len(probs) == doc["patches"] > 1 and not doc["capped"]
    assert probs.shape == (len(offsets), len(tiny_model.labels)) and np.allclose(probs.sum(axis=1), 1)
    assert (offsets % 2 == 0).all() and (offsets >= 0).all()
    assert (offsets[:, 0] + patch <= height).all() and (offsets[:, 1] + patch <= width).all()
    assert len({tuple(o) for o in offsets}) == len(offsets)
    crops = np.stack([pixels[t:t + patch, x:x + patch] for t, x in offsets])
    # The photo answer is Ensemble.predict_photos on those patches, and what `camid predict` says.
    direct = ensemble.predict_photos([crops], tta=False)
    photo_probs = np.array([doc["photo"]["probs"][label] for label in tiny_model.labels])
    assert np.allclose(photo_probs, direct.probs[0], atol=1e-6)
    assert doc["photo"]["camera"] == tiny_model.labels[direct.labels[0]]
    assert np.allclose(probs, ensemble.predict(crops, tta=False).probs, atol=1e-6)
    submission = tmp_path / "predict.csv"
    assert main(["predict", str(photo), "--model", str(tiny_model.bundle), "--full-image", "--patches",
                 str(len(offsets)), "--no-tta", "--out", str(submission)]) == 0
    table = pd.read_csv(tmp_path / "predict.probs.csv")
    assert table.camera[0] == doc["photo"]["camera"]
    assert np.allclose(table[tiny_model.labels].to_numpy()[0], photo_probs, atol=1e-6)
    agree = np.mean(probs.argmax(axis=1) == tiny_model.labels.index(doc["photo"]["camera"]))
    assert doc["photo"]["agreement"] == pytest.approx(agree)
    assert doc["photo"]["camera"] in summary and f"{agree:.0%} of {len(offsets)} patches agree" in summary
    assert doc["photo"]["runner_up"] in summary and doc["gradcam"]["layer"].endswith("head_relu")


def test_stride_and_cap_and_grad_cam_can_be_skipped(tiny_model, ensemble, photo, tmp_path):
    from camid.inference.explain import patch_map

    out, numbers = tmp_path / "dense.png", tmp_path / "dense.json"
    # A JPEG the test makes itself: the zoo photo re-encoded, so nothing depends on the zoo's own files.
    made = tmp_path / "photo.jpg"
    Image.open(photo).save(made, quality=92)
    assert explain(made, "--model", tiny_model.bundle, "--out", out, "--json", numbers, "--stride", "32",
                   "--no-gradcam", "--no-tta") == 0
    doc = json.loads(numbers.read_text())
    height, width = doc["shape"]
    assert doc["patches"] == doc["requested_patches"] == ((height - 64) // 32 + 1) * ((width - 64) // 32 + 1)
    assert not doc["capped"] and doc["gradcam"] is None and doc["stride"] == 32
    assert (np.array(doc["offsets"]) % 2 == 0).all() and Image.open(out).format == "PNG"
    capped = patch_map(ensemble, decode_image(made.read_bytes()), stride=2, max_patches=30, tta=False)
    assert capped.capped and len(capped.offsets) == 30 < capped.requested and "capped at 30" in capped.notes[0]
    assert np.allclose(capped.probs.sum(axis=1), 1)


def test_grad_cam_map(ensemble, photo):
    import keras

    from camid.inference.explain import _camera_split, grad_cam, patch_map

    pixels = decode_image(photo.read_bytes())
    pm = patch_map(ensemble, pixels, tta=False)
    top, left = pm.offsets[pm.most_confident]
    patch = pixels[top:top + ensemble.patch, left:left + ensemble.patch]
    cam = grad_cam(ensemble, patch, pm.photo_index)
    assert cam.shape == (ensemble.patch, ensemble.patch) and cam.dtype.kind == "f"
    assert cam.min() >= 0 and cam.max() <= 1 and cam.max() == pytest.approx(1) and cam.std() > 1e-3
    other = grad_cam(ensemble, patch, (pm.photo_index + 1) % len(ensemble.labels))
    assert not np.allclose(cam, other)
    # The split the gradients flow through is the member itself: same camera probabilities.
    model = ensemble.models[0]
    head, tail, layer = _camera_split(model)
    feed = {"image": patch[None].astype("float32"), "manipulated": np.zeros((1, 1), "float32")}
    xs = [keras.ops.convert_to_tensor(feed[t.name]) for t in model.inputs]
    assert np.allclose(keras.ops.convert_to_numpy(tail(head(xs), xs)), model.predict_on_batch(feed)["camera"],
                       atol=1e-5)
    assert layer == "smallcnn/head_relu"


def _jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("case", ["missing", "bad bytes", "too small", "bad model"])
def test_failures_exit_2_name_the_problem_and_write_nothing(tiny_model, photo, tmp_path, capsys, case):
    image, model = tmp_path / "photo.jpg", tiny_model.bundle
    if case == "bad bytes":
        image.write_bytes(b"this is not a JPEG")
    elif case == "too small":
        image.write_bytes(_jpeg((tiny_model.patch - 8, 200)))
    elif case == "bad model":
        image.write_bytes(photo.read_bytes())
        model = tmp_path / "not-a-model"
        model.mkdir()
    before = set(tmp_path.iterdir())
    out, numbers = tmp_path / "out" / "heat.png", tmp_path / "out" / "heat.json"
    assert explain(image, "--model", model, "--out", out, "--json", numbers) == 2
    err = capsys.readouterr().err
    assert err.startswith("camid explain: error:")
    expected = {"missing": [str(image), "not found"], "bad bytes": [str(image), "not a decodable image"],
                "too small": [str(image), "smaller than the model's"], "bad model": [str(model), "cannot load"]}[case]
    assert all(word in err for word in expected), err
    assert not out.exists() and not numbers.exists()
    assert set(tmp_path.iterdir()) - before <= {tmp_path / "out"}
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
