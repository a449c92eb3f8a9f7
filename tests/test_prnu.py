"""PRNU device identification on the virtual zoo: two devices of one model (same CFA, demosaicing, JPEG
tables), so a fingerprint that tells them apart is the sensor's, not the model's."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from camid.data import synth
from camid.cli import main
from camid.config import SynthParams
from camid.errors import CamidError
from camid.forensics import prnu
from tests.helpers_data import subprocess_env

LABEL = "Aster-A1"  # 288x384, shot in both orientations
ENROLLED = 24       # reference photos of device A; the rest of A's are held out


def _zoo(tmp_path_factory, catalog, name, images, pipelines):
    out = tmp_path_factory.mktemp(name)
    one = dataclasses.replace(catalog, cameras=(catalog.get(LABEL),))
    manifest = synth.synthesize(out / "zoo", one, SynthParams(seed=11, devices_per_model=2, images_per_device=images,
                                                              bad_fraction=0, pipelines=pipelines), progress=False)
    a, b = ([out / "zoo" / f for f in group.file] for _, group in manifest.groupby("device", sort=False))
    return out, a, b, list(dict.fromkeys(manifest.device))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, catalog):
    """The model's default PRNU strength (0.01)."""
    return _zoo(tmp_path_factory, catalog, "prnu", ENROLLED + 4, {})


@pytest.fixture(scope="module")
def strong_zoo(tmp_path_factory, catalog):
    """PRNU three times stronger: few photos, and crops small enough to keep the tests quick."""
    return _zoo(tmp_path_factory, catalog, "prnu_strong", 8, {LABEL: {"prnu": 0.03}})


@pytest.fixture(scope="module")
def fingerprint_file(zoo):
    """`camid prnu enroll` in a subprocess, with an undecodable file among the photos."""
    out, a, _, _ = zoo
    broken = out / "broken.jpg"
    broken.write_bytes(a[0].read_bytes()[:2000])
    proc = subprocess.run([sys.executable, "-m", "camid", "prnu", "enroll", *map(str, a[:ENROLLED]), str(broken),
                           "--out", str(out / "device.npz"), "--quiet"], cwd=out, env=subprocess_env({}),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped {broken}" in proc.stderr
    assert f"fingerprint of {ENROLLED} photo(s)" in proc.stdout
    return out / "device.npz"


def _truth(serial):
    return synth.prnu_pattern(serial, 288, 384, synth.pipeline_for(LABEL).prnu) - 1


def test_rot_box_follows_np_rot90():
    a = np.arange(7 * 10).reshape(7, 10)
    for box in ((0, 0, 7, 10), (1, 2, 3, 5), (2, 4, 4, 4)):
        top, left, h, w = box
        for k in range(4):
            t, l, rh, rw = prnu.rot_box(box, a.shape, k)
            turned = np.rot90(a[top:top + h, left:left + w], k)
            np.testing.assert_array_equal(np.rot90(a, k)[t:t + rh, l:l + rw], turned)
    assert prnu.central_box((288, 384), 202) == (42, 90, 202, 202)  # even offsets keep the CFA phase


def test_fingerprint_is_the_device_sensor_pattern(zoo, fingerprint_file):
    _, a, b, serials = zoo
    fingerprint = prnu.load_fingerprint(fingerprint_file)
    assert fingerprint.k.dtype == np.float32 and fingerprint.k.shape == fingerprint.sensor == (288, 384)
    assert len(fingerprint.files) == ENROLLED and set(fingerprint.rotations) == {0, 1, 3}  # portraits were turned
    # Every turn was the right one: the estimate lines up with the true pattern, not with the other device's.
    assert prnu._ncc(fingerprint.k, _truth(serials[0])) > 0.3
    assert abs(prnu._ncc(fingerprint.k, _truth(serials[1]))) < 0.02
    matcher = prnu.Matcher(fingerprint)
    for path in a[ENROLLED:]:
        pixels = prnu.read_photo(path)
        score = matcher.score(pixels)
        portrait = pixels.shape[0] > pixels.shape[1]
        assert score.pce > prnu.DEFAULT_THRESHOLD, (path, score)
        assert score.correlation > 0.02 and score.shift == (0, 0)
        assert score.rotation in ((90, 270) if portrait else (0,))
    for path in b[:8]:  # the same model's other device
        score = matcher.score(prnu.read_photo(path))
        assert score.pce < prnu.DEFAULT_THRESHOLD, (path, score)


def test_cli_match_prints_json_lines_for_a_folder(zoo, fingerprint_file, tmp_path):
    _, a, b, _ = zoo
    queries = tmp_path / "queries"
    queries.mkdir()
    for path in a[ENROLLED:] + b[:4]:
        (queries / f"{'A' if path in a else 'B'}_{path.name}").write_bytes(path.read_bytes())
    (queries / "notes.txt").write_text("not a photo, not an image suffix: not even looked at")
    proc = subprocess.run([sys.executable, "-m", "camid", "prnu", "match", str(queries), "--fingerprint",
                           str(fingerprint_file), "--json"], env=subprocess_env({}), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 8 and not proc.stderr
    assert set(rows[0]) == {"file", "pce", "correlation", "rotation", "shift", "decision"}
    for row in rows:
        device = row["file"].rsplit("/", 1)[1][0]
        assert row["decision"] == ("match" if device == "A" else "no match"), row


def test_cropped_and_turned_queries_are_found(strong_zoo, tmp_path):
    _, a, b, _ = strong_zoo
    matcher = prnu.Matcher(prnu.enroll(a[:6]))
    landscape = next(pixels for pixels in map(prnu.read_photo, a[6:]) if pixels.shape[:2] == (288, 384))
    crop = landscape[40:200, 64:288]
    Image.fromarray(np.ascontiguousarray(np.rot90(crop, 3))).save(tmp_path / "crop.png")  # lossless
    for query in (crop, prnu.read_photo(tmp_path / "crop.png")):
        score = matcher.score(query)
        assert score.pce > prnu.DEFAULT_THRESHOLD and score.shift == (40, 64), score
    assert score.rotation == 90
    assert matcher.score(prnu.read_photo(b[0])[40:200, 64:288]).pce < prnu.DEFAULT_THRESHOLD
    # A full-size photo whose content moved: only --search-shifts looks away from zero shift.
    moved = np.roll(landscape, (8, 12), axis=(0, 1))
    assert matcher.score(moved).pce < prnu.DEFAULT_THRESHOLD
    score = prnu.Matcher(matcher.fingerprint, search=True).score(moved)
    assert score.pce > prnu.DEFAULT_THRESHOLD and score.shift == (-8, -12), score


def test_crop_option_keeps_the_sensor_frame_for_either_orientation(strong_zoo):
    _, a, b, _ = strong_zoo
    # (288 - 202) / 2 is odd: a portrait photo's crop must be taken where the landscape sensor's lies.
    fingerprint = prnu.enroll(a[:6], crop=202)
    assert fingerprint.box == (42, 90, 202, 202) and fingerprint.sensor == (288, 384)
    matcher = prnu.Matcher(fingerprint)
    scores = [matcher.score(prnu.read_photo(p)) for p in a[6:]]
    assert {s.rotation for s in scores} == {0, 90} or {s.rotation for s in scores} == {0, 270}
    assert all(s.pce > prnu.DEFAULT_THRESHOLD and s.shift == (0, 0) for s in scores), scores
    assert matcher.score(prnu.read_photo(b[1])).pce < prnu.DEFAULT_THRESHOLD
    with pytest.raises(CamidError, match="reaches outside"):
        prnu.Matcher(fingerprint, crop=256)


def _jpeg(path, height, width):
    pixels = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def test_enroll_errors_name_the_problem(zoo, tmp_path):
    _, a, _, _ = zoo
    (tmp_path / "empty").mkdir()
    with pytest.raises(CamidError, match="no images"):
        prnu.enroll([tmp_path / "empty"])
    with pytest.raises(CamidError, match="does not exist"):
        prnu.enroll([tmp_path / "nowhere"])
    other = _jpeg(tmp_path / "other.jpg", 336, 448)
    with pytest.raises(CamidError, match=r"differ in size: 288x384 .*: 2 photo.*; 336x448 .*: 1 photo\(s\), e.g. .*other.jpg"):
        prnu.enroll([a[0], a[2], other])
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(a[0].read_bytes()[:3000])
    with pytest.raises(CamidError, match="none of the 1 photos could be decoded"):
        prnu.enroll([tmp_path / "bad.jpg", truncated])
    with pytest.raises(CamidError, match="--crop 300"):
        prnu.enroll([a[0]], crop=300)


def test_match_errors_name_the_problem(fingerprint_file, tmp_path, capsys):
    assert main(["prnu", "match", str(fingerprint_file), "--fingerprint", str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz not found" in capsys.readouterr().err
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "text.npz").write_text("hello")
    for name in ("other.npz", "array.npy", "text.npz"):
        assert main(["prnu", "match", str(fingerprint_file), "--fingerprint", str(tmp_path / name)]) == 2
        assert "is not a camid PRNU fingerprint" in capsys.readouterr().err
    np.savez(tmp_path / "future.npz", format=prnu.FORMAT, version=99)
    with pytest.raises(CamidError, match="version 99 fingerprint"):
        prnu.load_fingerprint(tmp_path / "future.npz")
    # A photo of a bigger sensor fits this 288x384 fingerprint in no orientation.
    big = _jpeg(tmp_path / "big.jpg", 336, 448)
    assert main(["prnu", "match", str(big), "--fingerprint", str(fingerprint_file)]) == 2
    err = capsys.readouterr().err
    assert "big.jpg: it is 336x448, which fits the fingerprint's 288x384 sensor in no orientation" in err
