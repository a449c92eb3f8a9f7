"""`camid report`: a self-contained HTML case report whose answers are `camid predict --full-image`'s, with each
file's sha256 and size, the model, its version and test-set figures, and the options used."""
from __future__ import annotations

import hashlib
import html
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from camid import __version__
from camid.cli import main
from tests.conftest import ROOT

HOSTILE = '<img src=x onerror="alert(1)">.jpg'  # a legal file name on Linux, and markup if not escaped


def report_cards(text: str) -> dict[str, dict]:
    """The cards of a report, by file name: camera, closest, confidence, probabilities, sha256, error, heat map."""
    cards = {}
    for block in re.findall(r'<details class="card.*?</details>', text, flags=re.S):
        attr = dict(re.findall(r'data-(camera|closest|confidence|error)="([^"]*)"', block.split(">", 1)[0]))
        name = html.unescape(re.search(r'<span class="name">(.*?)</span>', block, flags=re.S).group(1))
        probs = {html.unescape(c): float(p) for c, p in re.findall(r'<tr class="bar[^"]*" data-camera="([^"]*)" '
                                                                   r'data-p="([^"]*)"', block)}
        cards[name] = {"camera": html.unescape(attr["camera"]), "closest": html.unescape(attr["closest"]),
                       "confidence": float(attr["confidence"]) if attr["confidence"] else None,
                       "error": html.unescape(attr["error"]), "probs": probs,
                       "sha256": re.search(r'<code class="sha256">([^<]*)</code>', block).group(1),
                       "heatmap": 'class="heatmap-figure"' in block, "text": block}
    return cards


@pytest.fixture(scope="module")
def photos(tiny_model, tmp_path_factory) -> tuple[list[Path], Path]:
    """Four held-out zoo photos (one under a name that is markup), and a truncated JPEG."""
    folder = tmp_path_factory.mktemp("report-photos")
    files = []
    for i, source in enumerate(tiny_model.test.path[:4]):
        target = folder / (HOSTILE if i == 0 else Path(source).name)
        target.write_bytes(Path(source).read_bytes())
        files.append(target)
    bad = folder / "truncated.jpg"
    bad.write_bytes(files[1].read_bytes()[:3000])
    return files, bad


@pytest.fixture()
def store(registered_model, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered_model.tracking_uri)
    monkeypatch.setenv("CAMID_PARAMS", str(ROOT / "params.yaml"))
    return registered_model


def test_report_answers_are_predicts_with_sha256_model_and_options(store, photos, tmp_path, capsys):
    from camid.inference.ensemble import load_ensemble
    from camid.stages.predict import predict_files

    files, bad = photos
    out = tmp_path / "case" / "report.html"
    assert main(["report", *map(str, files), str(bad), "--model", store.model_uri, "--out", str(out)]) == 0
    assert "4 of 5 photos answered" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # written whole, no temporary left
    text = out.read_text()
    cards = report_cards(text)
    assert list(cards) == [str(p) for p in files + [bad]]
    assert '<input type="checkbox" data-filter="size"> size not in reference' in text  # the batch table's filters
    # The same answers as `camid predict --full-image` on the same files, to the last digit it prints.
    expected = predict_files(load_ensemble(store.model_uri), files, patches_per_image=0)
    for path, (_, row) in zip(files, expected.iterrows()):
        card = cards[str(path)]
        assert card["camera"] == row.camera and card["closest"] == row.closest_camera and not card["error"]
        assert card["confidence"] == pytest.approx(row.confidence, abs=1e-9)
        assert np.allclose([card["probs"][label] for label in store.labels], row[store.labels].astype(float),
                           atol=1e-9)
        assert card["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert f"{path.stat().st_size} bytes" in card["text"]
        assert card["heatmap"] and "data:image/jpeg;base64," in card["text"]
    broken = cards[str(bad)]
    assert broken["camera"] == "" and "truncated" in broken["error"] and not broken["probs"]
    assert broken["sha256"] == hashlib.sha256(bad.read_bytes()).hexdigest()
    # Markup in a file name is shown as text, never run.
    assert HOSTILE not in text and "&lt;img src=x onerror=" in text
    # What it was made with: model URI and version, its test-set figure, camid, options, date.
    assert f'<code class="model-uri">{store.model_uri}</code>' in text
    assert '<b class="model-version">1</b>' in text
    assert re.search(r'data-key="weighted_accuracy"><th>[^<]*</th><td class="num">' + f"{store.weighted_accuracy:.4f}",
                     text)
    assert f'<td class="camid-version">{__version__}</td>' in text
    assert "camid predict --full-image" in text and "patches=0" in text and "open_set=true" in text
    assert datetime.now(timezone.utc).strftime("%Y-%m-%d") in re.search(r'<td class="date">([^<]*)', text).group(1)
    # Self-contained: no URL but data: ones, and a policy that forbids any request.
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert "default-src 'none'" in text


def test_prnu_matches_and_a_bundle_folder(store, tmp_path):
    """Enrolled devices' PCE on every card; a bundle folder as the model says it carries no test figures."""
    import pandas as pd

    from camid.forensics import prnu

    test = store.test
    device, label = test.device[0], test.label[0]
    own = [Path(p) for p, d in zip(test.path, test.device) if d == device]
    train = pd.read_csv(store.root / "split" / "train.csv")
    other = Path(train.path[(train.label == label) & (train.device != device)].iloc[0])  # same model, other device
    prnu.save_fingerprint(prnu.enroll(own), tmp_path / "device-A.npz")
    out = tmp_path / "report.html"
    assert main(["report", str(own[0]), str(other), "--model", str(store.bundle), "--out", str(out),
                 "--prnu", str(tmp_path), "--no-heatmaps"]) == 0
    text = out.read_text()
    cards = report_cards(text)
    mine, theirs = cards[str(own[0])]["text"], cards[str(other)]["text"]
    assert "taken by device-A (PCE" in mine and '<tr class="match"><td>device-A</td>' in mine
    assert "no enrolled device matches: best device-A" in theirs
    pce = [float(v) for v in re.findall(r'<td class="num pce">([^<]*)</td>', mine + theirs)]
    assert pce[0] > prnu.DEFAULT_THRESHOLD > pce[1]
    assert "device-A.npz" in text and "carries no test-set figures" in text
    assert not cards[str(other)]["heatmap"] and "not drawn for this report" in theirs


def test_failures_are_clear_and_leave_the_old_report(store, photos, tmp_path, capsys):
    files, _ = photos
    out = tmp_path / "report.html"
    out.write_text("the previous report")
    assert main(["report", str(files[1]), "--model", "models:/no-such-model@champion", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot load model 'models:/no-such-model@champion'" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "missing.jpg"), "--model", str(store.bundle), "--out", str(out)]) == 2
    assert "missing.jpg does not exist" in capsys.readouterr().err
    assert main(["report", str(files[1]), "--model", str(store.bundle), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert out.read_text() == "the previous report" and sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_the_tables_reading_names_the_firmware_family():
    """A card whose tables are a catalog firmware's family at another quality says so, and whose; unseen says no
    training photo's family has them."""
    from camid.tools.cards import _tables_reading

    family = [{"camera": "Aster-A1", "photos": 3, "share": 0.75}, {"camera": "Aster-A1s", "photos": 1, "share": 0.25}]
    card = {"error": None, "answer": {"tables_evidence": "family"}, "firmware": [], "firmware_family": family,
            "inspection": {"format": "JPEG"}, "flag_from_name": False}
    text = _tables_reading(card, True)
    assert "family" in text and "Aster-A1 (3 training photos), Aster-A1s (1 training photo)" in text
    assert "entered the answer" in text
    unseen = _tables_reading({**card, "answer": {"tables_evidence": "unseen"}, "firmware_family": []}, True)
    assert "or tables of their family" in unseen and "did not enter" in unseen


def test_an_unknown_answer_says_which_ground_decided_it():
    """Issue 20: an analyst acts on an `unknown` differently when the pixels decided it (another camera) and when
    the JPEG tables did (perhaps a quality mode the reference never shot): the card's reading says which."""
    from camid.tools.cards import UNKNOWN_BY, readings

    answer = {"camera": "unknown", "closest_camera": "Aster-A1", "confidence": 0.9, "camera_group": "Aster-A1",
              "reference_devices": 1, "patches": 12, "manipulated": False, "tables_evidence": "unseen",
              "exif_model": "", "exif_camera": "", "consistent": None}
    card = {"error": None, "answer": answer, "firmware": [], "firmware_family": [], "inspection": None,
            "flag_from_name": None, "prnu": None}
    for ground, words in UNKNOWN_BY.items():
        text = readings({**card, "answer": {**answer, "unknown_by": ground}}, True)["answer"]
        assert text.startswith(f"unlike every catalog camera ({words})") and "closest is Aster-A1" in text
        assert "one device only" in text
    assert "quality mode" in UNKNOWN_BY["tables"]
    # A genuine photo of a camera outside the catalog, rejected by the pixels: its EXIF is no contradiction.
    outside = {**answer, "unknown_by": "pixels", "exif_model": "iPhone 4", "consistent": True}
    assert readings({**card, "answer": outside}, True)["exif"] == (
        "EXIF Model 'iPhone 4' names no catalog camera, and the pixels are unlike every catalog camera (`unknown` on "
        "the pixel ground): no contradiction, though camid has no reference to confirm that camera")
    # Rejected by the tables alone (the pixels accept Aster-A1): the grounds disagree, and the card says so.
    torn = {**answer, "unknown_by": "tables", "exif_model": "iPhone 4", "consistent": None}
    text = readings({**card, "answer": torn}, True)["exif"]
    assert text.startswith("EXIF Model 'iPhone 4' names no catalog camera; the pixels lean to Aster-A1, but the JPEG "
                           "tables are no catalog firmware's and made the answer `unknown`")
    assert "undecided" in text and "camid prnu" in text


def test_a_card_says_when_the_photo_is_most_like_the_background_cameras():
    """With background cameras (other models' photos, never an answer), an unknown whose probabilities lead with
    them says so, and EXIF naming no catalog camera agrees with it."""
    from camid.tools.cards import readings

    answer = {"camera": "unknown", "closest_camera": "Nikon-D60", "confidence": 0.1, "camera_group": "Nikon-D60",
              "reference_devices": 1, "patches": 12, "manipulated": False, "tables_evidence": "unseen",
              "unknown_by": "pixels", "exif_model": "E995", "exif_camera": "", "consistent": True}
    card = {"error": None, "answer": answer, "probs": {"DJI-FC6360": 0.02, "Nikon-D60": 0.1, "other-cameras": 0.88},
            "background": ["other-cameras"], "firmware": [], "firmware_family": [], "inspection": None,
            "flag_from_name": None, "prnu": None}
    text = readings(card, True)
    assert text["answer"].startswith("unlike every catalog camera: the photo is most like the background cameras")
    assert "(other-cameras, p=0.88)" in text["answer"] and "closest catalog camera is Nikon-D60 (p=0.10)" in text["answer"]
    assert "its pixel ground is the background cameras" in text["answer"]
    assert text["exif"] == ("EXIF Model 'E995' names no catalog camera, and the pixels put the photo with the "
                            "background cameras (other models): no contradiction")
    led = readings({**card, "probs": {"DJI-FC6360": 0.02, "Nikon-D60": 0.9, "other-cameras": 0.08}}, True)["answer"]
    assert led.startswith("unlike every catalog camera (by its pixels")
    used = {**card, "answer": {**answer, "tables_evidence": "used"},
            "firmware": [{"camera": "other-cameras", "photos": 2, "share": 1.0}]}
    assert readings(used, True)["tables"] == ("written by catalog firmware (other-cameras (background: other models) "
                                              "(2 training photos)); they entered the answer")


def test_the_exif_reading_says_when_a_twin_is_why_there_is_no_contradiction():
    """EXIF naming a twin of the closest camera is consistent however sure the pixels are (metadata.contradicts):
    the card says it is the twins, not that the pixels leave the EXIF camera a chance; a camera in the group reads
    as before."""
    from camid.tools.cards import readings

    answer = {"camera": "Nikon-D70", "closest_camera": "Nikon-D70", "confidence": 0.99, "camera_group": "Nikon-D70",
              "reference_devices": 1, "patches": 12, "manipulated": False, "tables_evidence": "used",
              "unknown_by": "", "exif_model": "NIKON D70s", "exif_camera": "Nikon-D70s", "consistent": True}
    card = {"error": None, "answer": answer, "probs": {"Nikon-D70": 0.995, "Nikon-D70s": 0.004}, "firmware": [],
            "firmware_family": [], "inspection": None, "flag_from_name": None, "prnu": None}
    text = readings(card, True)["exif"]
    assert "give Nikon-D70s 0.00" in text and "twins the pixels cannot be trusted to tell apart" in text
    grouped = {**card, "answer": {**answer, "camera_group": "Nikon-D70 or Nikon-D70s"},
               "probs": {"Nikon-D70": 0.6, "Nikon-D70s": 0.4}}
    text = readings(grouped, True)["exif"]
    assert "do not rule Nikon-D70s out (group Nikon-D70 or Nikon-D70s)" in text and "twins" not in text


def test_a_card_says_when_the_photo_is_of_a_size_the_reference_lacks():
    """Issue 20: a questioned photo of a size mode the reference never shot (the real Nikon D60's other device is
    full-size Fine, its reference 1296x1936 Normal) is `unknown` whatever the rule: the card says the size is none
    of the reference's and what to add, and says nothing of sizes where the reference has the photo's."""
    from camid.tools.cards import flags, readings

    answer = {"camera": "unknown", "closest_camera": "Nikon-D60", "confidence": 0.1, "camera_group": "Nikon-D60",
              "reference_devices": 1, "size_seen": False, "patches": 12, "manipulated": False,
              "tables_evidence": "unseen", "unknown_by": "pixels and tables", "exif_model": "", "exif_camera": "",
              "consistent": None, "unknown": True}
    card = {"error": None, "answer": answer, "probs": {"Nikon-D60": 0.1, "DJI-FC6360": 0.9}, "firmware": [],
            "firmware_family": [], "inspection": {"format": "JPEG", "width": 3872, "height": 2592, "quality": 97,
                                                 "subsampling": "4:2:0", "edited": False, "edit_reason": "", "error": None},
            "reference_sizes": [[1296, 1936]], "flag_from_name": None, "prnu": None}
    text = readings(card, True)["answer"]
    assert ("the photo is 2592x3872 (h x w), none of the sizes of Nikon-D60's reference photos (1296x1936)"
            in text)
    assert "add reference photos of Nikon-D60 at this size" in text
    assert readings(card, True)["inspection"].startswith("JPEG 3872x2592; quality 97, 4:2:0")
    accepted = readings({**card, "answer": {**answer, "camera": "Nikon-D60", "unknown_by": ""}}, True)["answer"]
    assert "none of the sizes" in accepted and "add reference photos" not in accepted
    bare = readings({**card, "inspection": None, "reference_sizes": []}, True)["answer"]
    assert "the photo has a size, none of the sizes of Nikon-D60's reference photos: a size mode" in bare
    for seen in (True, None):
        assert "sizes" not in readings({**card, "answer": {**answer, "size_seen": seen}}, True)["answer"]
        assert "size" not in flags({**card, "answer": {**answer, "size_seen": seen}})
    assert flags(card) == ["unknown", "low", "size"]  # the batch table's filter for such photos
