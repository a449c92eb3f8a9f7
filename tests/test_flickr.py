"""The Flickr crawler against a fake Flickr on 127.0.0.1: paging, filtering, faults, resuming, and the key."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from camid.stages.acquire.flickr import (MANIFEST, REJECTED, FlickrError, JsonLines, _rehost, crawl, search_queries)
from camid.config import load_params
from camid.errors import CamidError
from tests.fake_flickr import FakeFlickr, FakePhoto, camera_photos, write_params

ROOT = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdefSECRETKEY"


@pytest.fixture
def params(tmp_path):
    return load_params(write_params(tmp_path / "params.yaml"))


@pytest.fixture
def cam(params):
    return params.catalog.cameras[0]


def run_crawl(fake, params, out, cameras, **flickr):
    settings = dataclasses.replace(params.acquire.flickr, api_url=fake.api_url, image_host=fake.image_host, **flickr)
    return crawl(out, params.catalog, settings, cameras=[c.label for c in cameras], api_key=KEY, progress=False)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def files(out: Path) -> dict[str, set[str]]:
    return {d.name: {f.name for f in d.iterdir()} for d in sorted((out / "train").iterdir())}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_downloads_native_originals_with_attribution(tmp_path, params, cam):
    good = camera_photos(cam, 5)
    small = FakePhoto(id="900", height=100, width=100, text=good[0].text)
    hidden = FakePhoto(id="901", height=cam.sizes[0][0], width=cam.sizes[0][1], text=good[0].text, original=False)
    with FakeFlickr([*good[:2], small, hidden, *good[2:]], api_key=KEY) as fake:
        tally = run_crawl(fake, params, tmp_path / "out", [cam])[cam.label]
        searches = fake.requests("search")
        downloads = fake.downloads()
    assert downloads == [p.id for p in good]  # skipped before download, each fetched once
    assert (tally.found, tally.skipped_size, tally.downloaded, tally.failed) == (7, 2, 5, 0)
    # 7 text hits and 5 tag hits at 3 per page, and no page asked for past the end
    text, tag = good[0].text, good[0].tags[0]
    assert [(q.get("text"), q.get("tags"), q["page"]) for q in searches] == [
        (text, None, "1"), (text, None, "2"), (text, None, "3"), (None, tag, "1"), (None, tag, "2")]
    assert all(q["extras"] == "url_o,o_dims,license,owner_name,date_taken" and q["nojsoncallback"] == "1"
               for q in searches)
    out = tmp_path / "out"
    assert files(out) == {cam.label: {f"{p.id}.jpg" for p in good}}
    records = {r["id"]: r for r in manifest(out)}
    assert set(records) == {p.id for p in good}
    for photo in good:
        record, path = records[photo.id], out / records[photo.id]["file"]
        assert path.read_bytes() == photo.jpeg
        assert (record["sha256"], record["bytes"]) == (sha256(path), len(photo.jpeg))
        assert (record["camera"], record["owner"], record["owner_name"], record["license"]) == (
            cam.label, photo.owner, photo.ownername, "4")
        assert (record["height"], record["width"]) == cam.sizes[0]
        assert record["url"].startswith("https://live.staticflickr.com/")  # the real url_o is what is recorded


def test_rerun_downloads_nothing_again(tmp_path, params, cam):
    with FakeFlickr(camera_photos(cam, 4), api_key=KEY) as fake:
        run_crawl(fake, params, tmp_path / "out", [cam])
        again = run_crawl(fake, params, tmp_path / "out", [cam])[cam.label]
        assert len(fake.downloads()) == 4
    assert (again.had, again.downloaded) == (4, 0)
    assert len(manifest(tmp_path / "out")) == 4


def test_max_per_camera_stops_searching_early(tmp_path, params, cam):
    photos = camera_photos(cam, 10)
    with FakeFlickr(photos, api_key=KEY) as fake:
        tally = run_crawl(fake, params, tmp_path / "out", [cam], max_per_camera=4)[cam.label]
        assert [q["page"] for q in fake.requests("search")] == ["1", "2"]
        assert fake.downloads() == [p.id for p in photos[:4]]
    assert tally.downloaded == 4


def test_tag_search_and_duplicates_across_cameras(tmp_path, params):
    a1, a1s = params.catalog.get("Aster-A1"), params.catalog.get("Aster-A1s")  # same native size
    assert a1.sizes == a1s.sizes
    by_text = camera_photos(a1, 2)
    by_tag_only = camera_photos(a1, 1, first_id=2000, text="something else")
    both = camera_photos(a1, 1, first_id=3000, tags=(search_queries(a1)[1]["tags"], search_queries(a1s)[1]["tags"]))
    with FakeFlickr([*by_text, *by_tag_only, *both], api_key=KEY) as fake:
        tallies = run_crawl(fake, params, tmp_path / "out", [a1, a1s])
        assert sorted(fake.downloads()) == ["1000", "1001", "2000", "3000"]
    assert (tallies[a1.label].found, tallies[a1.label].downloaded) == (4, 4)
    assert (tallies[a1s.label].found, tallies[a1s.label].duplicate, tallies[a1s.label].downloaded) == (1, 1, 0)
    assert files(tmp_path / "out") == {a1.label: {"1000.jpg", "1001.jpg", "2000.jpg", "3000.jpg"}}


def test_check_exif_rejects_before_download_and_remembers(tmp_path, params, cam):
    good, wrong, hidden = camera_photos(cam, 3)
    wrong.model = "Some Other Phone"
    hidden.exif_visible = False
    with FakeFlickr([good, wrong, hidden], api_key=KEY) as fake:
        tally = run_crawl(fake, params, tmp_path / "out", [cam], check_exif=True)[cam.label]
        assert fake.downloads() == [good.id]
        assert len(fake.requests("exif")) == 3
        run_crawl(fake, params, tmp_path / "out", [cam], check_exif=True)
        assert len(fake.requests("exif")) == 3  # rejections are recorded, not asked about again
    assert (tally.skipped_exif, tally.downloaded) == (2, 1)
    rejected = {r["id"]: (r["outcome"], r["reason"]) for r in JsonLines(tmp_path / "out" / REJECTED).read()}
    assert rejected == {wrong.id: ("skipped_exif", "EXIF model 'Some Other Phone'"),
                        hidden.id: ("skipped_exif", "EXIF hidden")}


def test_exif_rejection_for_one_camera_does_not_hide_the_photo_from_another(tmp_path, params):
    a1, a1s = params.catalog.get("Aster-A1"), params.catalog.get("Aster-A1s")
    photo = camera_photos(a1s, 1, text=search_queries(a1)[0]["text"])[0]  # an A1s photo that says "Aster A1"
    with FakeFlickr([photo], api_key=KEY) as fake:
        tallies = run_crawl(fake, params, tmp_path / "out", [a1, a1s], check_exif=True)
    assert (tallies[a1.label].skipped_exif, tallies[a1s.label].downloaded) == (1, 1)
    assert files(tmp_path / "out") == {a1s.label: {f"{photo.id}.jpg"}}


def test_file_not_matching_o_dims_is_not_kept(tmp_path, params, cam):
    liar = camera_photos(cam, 1, file_dims=(64, 64))[0]
    with FakeFlickr([liar], api_key=KEY) as fake:
        tally = run_crawl(fake, params, tmp_path / "out", [cam])[cam.label]
    assert (tally.skipped_size, tally.downloaded) == (1, 0)
    assert not list((tmp_path / "out").glob("train/*/*")) and not list((tmp_path / "out").glob("train/*/.*"))


@pytest.mark.parametrize("target, kind, options", [
    ("search", "500", {}),
    ("search", "429", {"retry_after": "0"}),
    ("search", "slow", {"delay": 0.6}),       # longer than the client's timeout
    ("search", "badjson", {}),
    ("search", "truncate", {}),
    ("exif", "500", {}),
    ("exif", "truncate_nolength", {}),
    ("image", "500", {}),
    ("image", "429", {}),
    ("image", "slow", {"delay": 0.6}),
    ("image", "truncate", {}),
    ("image", "truncate_nolength", {}),       # only the JPEG itself shows it is cut short
])
def test_transient_faults_are_retried(tmp_path, params, cam, target, kind, options):
    photos = camera_photos(cam, 2)
    with FakeFlickr(photos, api_key=KEY) as fake:
        fake.inject(target, kind, times=2, **options)
        tally = run_crawl(fake, params, tmp_path / "out", [cam], check_exif=True, timeout_s=0.3)[cam.label]
        assert len(fake.requests(target)) == {"search": 2, "exif": 2, "image": 2}[target] + 2
    assert (tally.downloaded, tally.failed) == (2, 0)
    for record in manifest(tmp_path / "out"):
        assert sha256(tmp_path / "out" / record["file"]) == record["sha256"]
    assert not list((tmp_path / "out").rglob("*.part"))


def test_retry_after_is_honoured(tmp_path, params, cam, monkeypatch):
    with FakeFlickr(camera_photos(cam, 1), api_key=KEY) as fake:
        fake.inject("search", "429", retry_after="7")
        waits = []
        monkeypatch.setattr("camid.stages.acquire.flickr.time.sleep", waits.append)  # the crawler's waits, not run
        run_crawl(fake, params, tmp_path / "out", [cam], backoff_s=0.0)
    assert 7 in waits  # the server's Retry-After, not the (zero) backoff
    assert manifest(tmp_path / "out")  # and after it the crawl went on


def test_persistent_download_failure_is_counted_and_retried_next_run(tmp_path, params, cam, monkeypatch, capsys):
    from camid.cli import main

    photos = camera_photos(cam, 3)
    monkeypatch.setenv("FLICKR_API_KEY", KEY)
    monkeypatch.setenv("CAMID_PARAMS", str(params.path))
    with FakeFlickr(photos, api_key=KEY) as fake:
        fake.inject("image", "500", times=params.acquire.flickr.retries + 1)  # the first photo, every try
        argv = ["crawl", "flickr", "--out", str(tmp_path / "out"), "--cameras", cam.label.lower(),
                "--api-url", fake.api_url, "--image-host", fake.image_host]
        assert main(argv) == 1
        assert "1 downloads still failed" in capsys.readouterr().out
        assert files(tmp_path / "out")[cam.label] == {f"{p.id}.jpg" for p in photos[1:]}
        assert main(argv) == 0
    assert files(tmp_path / "out")[cam.label] == {f"{p.id}.jpg" for p in photos}
    assert len(manifest(tmp_path / "out")) == 3


def test_gone_original_is_not_fetched_again(tmp_path, params, cam):
    photos = camera_photos(cam, 2)
    with FakeFlickr(photos, api_key=KEY) as fake:
        fake.inject("image", "404")
        tally = run_crawl(fake, params, tmp_path / "out", [cam])[cam.label]
        again = run_crawl(fake, params, tmp_path / "out", [cam])[cam.label]
        assert fake.downloads() == [photos[0].id, photos[1].id]
    assert (tally.gone, tally.downloaded) == (1, 1)
    assert (again.gone, again.had) == (1, 1)


def test_api_error_stops_with_flickrs_message(tmp_path, params, cam):
    with FakeFlickr(camera_photos(cam, 1), api_key="the-right-key") as fake:
        with pytest.raises(FlickrError, match=r"Invalid API Key \(Key not found\)") as info:
            run_crawl(fake, params, tmp_path / "out", [cam])
        assert len(fake.requests("search")) == 1  # an API refusal is not retried
    assert KEY not in str(info.value)


def test_gives_up_after_the_configured_retries(tmp_path, params, cam):
    with FakeFlickr(camera_photos(cam, 1), api_key=KEY) as fake:
        fake.inject("search", "500", times=10)
        with pytest.raises(FlickrError, match="gave up after 4 tries"):
            run_crawl(fake, params, tmp_path / "out", [cam])
        assert len(fake.requests("search")) == 4


def test_missing_key(tmp_path, params, cam, monkeypatch):
    monkeypatch.delenv("FLICKR_API_KEY", raising=False)
    with pytest.raises(CamidError, match="FLICKR_API_KEY is not set"):
        crawl(tmp_path / "out", params.catalog, params.acquire.flickr, cameras=[cam.label], progress=False)


def test_key_never_printed_logged_or_written(tmp_path, params, cam, monkeypatch, capsys, caplog):
    from camid.cli import main

    caplog.set_level(logging.DEBUG)  # urllib3 logs every request URL at debug level
    monkeypatch.setenv("FLICKR_API_KEY", KEY)
    monkeypatch.setenv("CAMID_PARAMS", str(write_params(tmp_path / "impatient.yaml", flickr={"timeout_s": 0.3})))
    with FakeFlickr(camera_photos(cam, 2), api_key=KEY) as fake:
        fake.inject("search", "slow", delay=0.6)
        fake.inject("image", "truncate")
        assert main(["-v", "crawl", "flickr", "--out", str(tmp_path / "out"), "--cameras", cam.label,
                     "--api-url", fake.api_url, "--image-host", fake.image_host]) == 0
    with socket.socket() as s:  # a port nobody listens on: connection errors quote the request URL
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/services/rest/"
    assert main(["crawl", "flickr", "--out", str(tmp_path / "out2"), "--api-url", closed]) == 2
    captured = capsys.readouterr()
    assert "api_key=[redacted]" in captured.err + caplog.text
    for text in (captured.out, captured.err, caplog.text):
        assert KEY not in text
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or KEY.encode() not in path.read_bytes()


def test_torn_manifest_line_and_unrecorded_file_are_repaired(tmp_path, params, cam):
    photos = camera_photos(cam, 3)
    out = tmp_path / "out"
    with FakeFlickr(photos, api_key=KEY) as fake:
        run_crawl(fake, params, out, [cam], max_per_camera=1)
    # a kill after the second photo was renamed into place but mid-way through writing its manifest line
    (out / "train" / cam.label / f"{photos[1].id}.jpg").write_bytes(photos[1].jpeg)
    with open(out / MANIFEST, "ab") as f:
        f.write(b'{"bytes": 123, "camera": "Ast')
    (out / "train" / cam.label / f".{photos[2].id}.jpg.part").write_bytes(photos[2].jpeg[:100])
    with FakeFlickr(photos, api_key=KEY) as fake:
        run_crawl(fake, params, out, [cam])
        assert fake.downloads() == [photos[2].id]  # the complete file was adopted, not fetched again
    records = manifest(out)
    assert [r["id"] for r in records] == [p.id for p in photos]
    assert all(sha256(out / r["file"]) == r["sha256"] for r in records)
    assert files(out) == {cam.label: {f"{p.id}.jpg" for p in photos}}


def test_jsonlines_ignores_torn_last_line(tmp_path):
    lines = JsonLines(tmp_path / "m.jsonl")
    lines.append({"id": "1"})
    with open(lines.path, "ab") as f:
        f.write(b'{"id": "2", "cam')
    assert lines.read() == [{"id": "1"}]
    lines.repair()
    lines.append({"id": "3"})
    assert lines.read() == [{"id": "1"}, {"id": "3"}]


def test_rehost_keeps_the_path():
    assert _rehost("https://live.staticflickr.com/65535/1_ab_o.jpg", "http://127.0.0.1:8080") == \
        "http://127.0.0.1:8080/65535/1_ab_o.jpg"
    assert _rehost("https://live.staticflickr.com/1_o.jpg", "") == "https://live.staticflickr.com/1_o.jpg"


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _partial_download(out: Path) -> bool:
    """A .part file with some bytes in it (it may vanish while we look: the download finished)."""
    for part in out.glob("train/*/.*.part"):
        try:
            if part.stat().st_size:
                return True
        except FileNotFoundError:
            pass
    return False


def test_kill_and_resume_gives_the_same_final_set(tmp_path, params):
    """SIGKILL the real command mid-download, run it again, and find exactly the set an unbroken run gives."""
    a, b = params.catalog.cameras[:2]
    # grainy photos, bigger than the crawler's 64 KB reads, so part of a held download reaches the disk
    photos = {a.label: camera_photos(a, 3, grain=0.5), b.label: camera_photos(b, 3, first_id=2000, grain=0.5)}
    assert min(len(p.jpeg) for ps in photos.values() for p in ps) > 100_000
    out = tmp_path / "out"
    env = {**os.environ, "FLICKR_API_KEY": KEY, "CAMID_PARAMS": str(params.path)}
    with FakeFlickr([p for ps in photos.values() for p in ps], api_key=KEY, chunk_size=8192, chunk_delay=0.005) as fake:
        fake.inject("image", "", times=2)                     # two photos download whole,
        fake.inject("image", "hold", hold_after=80_000)       # the third stops after 80 KB until released
        command = [sys.executable, "-m", "camid", "crawl", "flickr", "--out", str(out), "--cameras", a.label, b.label,
                   "--api-url", fake.api_url, "--image-host", fake.image_host]
        crawler = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (fake.holding.is_set() and _count_lines(out / MANIFEST) >= 2 and _partial_download(out)):
            assert crawler.poll() is None, "the crawler ended before it could be killed"  # it waits for us: no race
            time.sleep(0.01)
        crawler.send_signal(signal.SIGKILL)
        crawler.wait()
        fake.release.set()
        parts = list(out.glob("train/*/.*.part"))
        assert parts and all(part.stat().st_size > 0 for part in parts), "the kill should leave a partial download"

        # a second kill mid-download in the resumed run (held there by the server), then a run to the end
        fake.holding.clear()
        fake.release.clear()
        fake.inject("image", "hold", hold_after=40_000)
        crawler = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not fake.holding.wait(timeout=0.05):
            assert crawler.poll() is None, "the resumed crawler ended before its download was held"
        crawler.send_signal(signal.SIGKILL)
        crawler.wait()
        fake.release.set()
        final = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert final.returncode == 0, final.stderr
        assert KEY not in final.stdout + final.stderr

    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]
    assert files(out) == {label: {f"{p.id}.jpg" for p in ps} for label, ps in photos.items()}
    records = manifest(out)
    assert len(records) == len({r["id"] for r in records}) == 6  # no duplicates, nothing lost
    jpegs = {p.id: p.jpeg for ps in photos.values() for p in ps}
    for record in records:
        data = (out / record["file"]).read_bytes()
        assert data == jpegs[record["id"]]
        assert (record["sha256"], record["bytes"]) == (hashlib.sha256(data).hexdigest(), len(data))
