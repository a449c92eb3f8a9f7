"""`camid ui` in a real browser: the real app (`camid ui` in a process of its own, uvicorn on 127.0.0.1), headless
Chromium driven by Playwright. Photos go in through the page's file input; each card must say what
`camid predict --full-image` says of the same file; the batch table filters and opens cards; the heat map opens;
the exported case report works offline; and the app's safety rules hold for a client that is not its page."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from camid.cli import main
from tests.conftest import ROOT
from tests.helpers_data import subprocess_env

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (`make test` installs it); Playwright downloads no browser
MAX_MB = 0.2  # the app under test refuses photos over 200 KB (zoo photos are about 50-70 KB)
START_TIMEOUT = 120
HOSTILE = "<img src=x onerror=alert(1)>.jpg"


def _chromium_missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"no {CHROMIUM}: install Debian's chromium package (make chromium) to run the browser tests"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -e '.[test]'"
    return None


@pytest.fixture(scope="module")
def uploads(registered_model, tmp_path_factory) -> dict[str, bytes]:
    """What the page uploads, by file name: five held-out zoo photos, a truncated JPEG and a photo over the cap."""
    from PIL import Image

    photos = {Path(p).name: Path(p).read_bytes() for p in registered_model.test.path[:5]}
    photos[HOSTILE] = photos.pop(Path(registered_model.test.path[1]).name)  # markup as a name: shown, never run
    first = next(iter(photos.values()))
    big = tmp_path_factory.mktemp("big") / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(big)
    return {**photos, "truncated.jpg": first[:3000], "big.png": big.read_bytes()}


@pytest.fixture(scope="module")
def server(registered_model, tmp_path_factory):
    """`camid ui` on a free port, serving the registered model, with its temporary files in a folder of ours."""
    tmp = tmp_path_factory.mktemp("ui-tmp")
    folder = tmp_path_factory.mktemp("ui-folder")
    for path in registered_model.test.path[5:8]:
        shutil.copy(path, folder)
    env = subprocess_env({"MLFLOW_TRACKING_URI": registered_model.tracking_uri, "TMPDIR": str(tmp),
                          "CAMID_PARAMS": str(ROOT / "params.yaml")})
    proc = subprocess.Popen([sys.executable, "-m", "camid", "ui", "--model", registered_model.model_uri, "--port", "0",
                             "--folder", str(folder), "--max-upload-mb", str(MAX_MB)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp)
    lines, started = [], threading.Event()

    def read_output():  # all of it, so that the app never blocks on a full pipe
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"camid ui: http://127\.0\.0\.1:\d+/", line):
                started.set()
        started.set()

    threading.Thread(target=read_output, daemon=True).start()
    found = started.wait(START_TIMEOUT) and re.search(r"camid ui: (http://127\.0\.0\.1:\d+/)", "".join(lines))
    if not found:
        proc.kill()
        pytest.fail("camid ui did not start:\n" + "".join(lines))
    url = found.group(1)
    for _ in range(100):  # the line is printed just before uvicorn listens
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            time.sleep(0.1)
    yield {"url": url, "tmp": tmp, "folder": folder, "proc": proc}
    proc.terminate()
    proc.wait(timeout=60)
    assert proc.returncode in (0, 130), "".join(lines)
    assert not list(tmp.glob("camid-ui-*")), "the uploads' temporary folder outlived the app"


@pytest.fixture(scope="module")
def browser():
    missing = _chromium_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def expected(registered_model, uploads, tmp_path_factory, monkeypatch_module):
    """`camid predict --full-image`'s answers (predict_files) for the uploaded files, under their names."""
    from camid.inference.ensemble import load_ensemble
    from camid.stages.predict import predict_files

    folder = tmp_path_factory.mktemp("predict")
    files = []
    for name, data in uploads.items():
        (folder / name).write_bytes(data)
        files.append(folder / name)
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", registered_model.tracking_uri)
    table = predict_files(load_ensemble(registered_model.model_uri), files, patches_per_image=0)
    return table.set_index("fname")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _payload(uploads: dict[str, bytes]) -> list[dict]:
    return [{"name": name, "mimeType": "application/octet-stream", "buffer": data} for name, data in uploads.items()]


def _card_answers(page) -> dict[str, dict]:
    """Every card on the page: its name, verdict, closest camera, confidence, bars and error, as the DOM has them."""
    return {c["name"]: c for c in page.eval_on_selector_all("details.card", """cards => cards.map(card => ({
        name: card.querySelector("summary .name").textContent,
        camera: card.dataset.camera, closest: card.dataset.closest, confidence: card.dataset.confidence,
        error: card.dataset.error, sha256: card.querySelector("code.sha256").textContent,
        probs: Object.fromEntries(Array.from(card.querySelectorAll("tr.bar"),
                                             r => [r.dataset.camera, parseFloat(r.dataset.p)])),
        text: card.textContent}))""")}


def _check_answers(cards: dict[str, dict], expected, labels: list[str], uploads: dict[str, bytes]) -> None:
    assert sorted(cards) == sorted(uploads)
    for name, card in cards.items():
        assert card["sha256"] == hashlib.sha256(uploads[name]).hexdigest() or name == "big.png", name
        row = expected.loc[name]
        if name == "big.png":  # refused at the door, so not the decoder's message: the upload cap's
            assert card["camera"] == "" and "over the limit" in card["error"] and "--max-upload-mb" in card["error"]
            continue
        assert card["error"] == row.error
        if row.error:
            assert card["camera"] == "" and "truncated" in card["text"]
            continue
        assert card["camera"] == row.camera and card["closest"] == row.closest_camera, name
        assert float(card["confidence"]) == pytest.approx(row.confidence, abs=1e-9)
        assert np.allclose([card["probs"][label] for label in labels], row[labels].astype(float), atol=1e-9)


def test_cards_heat_map_table_and_offline_report(server, browser, uploads, expected, registered_model, tmp_path):
    page = browser.new_page(accept_downloads=True, viewport={"width": 1280, "height": 900})
    problems = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
    page.goto(server["url"])
    page.set_input_files("#files", _payload(uploads))
    page.wait_for_selector(".results details.card", timeout=60_000)
    assert page.text_content("#status-text") == f"{len(uploads) - 2} of {len(uploads)} photos answered"
    _check_answers(_card_answers(page), expected, registered_model.labels, uploads)

    # The batch table: one row per photo; filters show only the flagged rows; a header sorts; a row opens its card.
    rows = page.locator("table.batch-table tbody tr")
    assert rows.count() == len(uploads)
    page.check("input[data-filter=error]")
    visible = [r for r in page.locator("table.batch-table tbody tr:visible").all_text_contents()]
    assert len(visible) == 2 and all(("truncated.jpg" in r) != ("big.png" in r) for r in visible)
    assert page.text_content(".shown") == f"2 of {len(uploads)} shown"
    page.uncheck("input[data-filter=error]")
    page.fill("input.search", "Aster-A1s")
    assert page.locator("table.batch-table tbody tr:visible").count() == \
        sum("Aster-A1s" in name for name in uploads)
    page.fill("input.search", "")
    page.click("th:has-text('confidence')")
    shown = [float(v) for v in page.eval_on_selector_all(
        "table.batch-table tbody tr td:nth-child(5)", "cells => cells.map(c => c.dataset.value)")]
    assert shown == sorted(shown)
    name = next(iter(uploads))
    page.click(f"table.batch-table tbody tr:has-text('{name}')")
    card = page.locator("details.card", has=page.locator(f"summary .name:text-is('{name}')"))
    assert card.get_attribute("open") is not None and page.evaluate("location.hash").startswith("#card-")

    # The heat map: drawn on request over the patches the answer scored, naming the card's camera.
    card.locator("button.show-heatmap").click()
    figure = card.locator(".heatmap-figure img")
    figure.wait_for(timeout=60_000)
    assert figure.get_attribute("src").startswith("data:image/jpeg;base64,")
    caption = card.locator(".heatmap-figure figcaption").text_content()
    row = expected.loc[name]
    assert f"of the {row.patches} patches name {row.closest_camera}" in caption

    # The case report, exported and opened from a file with every request refused: answers and sha256 are there.
    with page.expect_download() as download:
        page.click("a.export-all")
    report = tmp_path / "report.html"
    download.value.save_as(report)
    assert re.fullmatch(r"camid-report-\d{8}-\d{6}\.html", download.value.suggested_filename)
    offline = browser.new_context(offline=True)
    requests = []
    offline.route("**/*", lambda route: (requests.append(route.request.url), route.continue_() if
                                         route.request.url.startswith("file://") else route.abort()))
    view = offline.new_page()
    view.on("pageerror", lambda exc: problems.append(str(exc)))
    view.goto(report.as_uri())
    assert all(url.startswith("file://") for url in requests), requests
    _check_answers(_card_answers(view), expected, registered_model.labels, uploads)
    assert view.locator(".heatmap-figure img").count() == len(uploads) - 2
    assert registered_model.model_uri in view.text_content(".model-uri")
    view.check("input[data-filter=error]")  # the report's table works offline too
    assert view.locator("table.batch-table tbody tr:visible").count() == 2
    offline.close()
    assert not problems, problems


def test_a_folder_given_on_the_command_line_and_a_dropped_photo(server, browser, registered_model, uploads,
                                                                expected):
    page = browser.new_page()
    page.goto(server["url"])
    page.click("#folder")
    page.wait_for_selector(".results details.card", timeout=60_000)
    names = page.eval_on_selector_all("details.card summary .name", "n => n.map(x => x.textContent)")
    assert names == sorted(Path(p).name for p in registered_model.test.path[5:8])
    # One photo dropped on the page: its card alone, open, no batch table.
    name = next(iter(uploads))
    page.evaluate("""([name, bytes]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], name, {type: "image/jpeg"}));
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", [name, list(uploads[name])])
    page.wait_for_function("n => document.querySelectorAll('details.card').length === 1 && "
                           "document.querySelector('details.card summary .name').textContent === n", arg=name,
                           timeout=60_000)
    assert page.get_attribute("details.card", "open") is not None and not page.locator("table.batch-table").count()
    assert page.get_attribute("details.card", "data-camera") == expected.loc[name].camera


def _request(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None):
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


def test_safety_for_clients_that_are_not_the_page(server, uploads):
    base = server["url"].rstrip("/")
    json_headers = {"content-type": "application/json"}
    status, body, headers = _request(base + "/")
    assert status == 200 and "default-src 'none'" in headers["content-security-policy"]
    # Only requests addressed to this machine by name (no DNS rebinding), and POSTs only from its own page.
    assert _request(base + "/", headers={"host": "camid.example.com"})[0] == 400
    status, body, _ = _request(base + "/api/jobs", b"{}", {**json_headers, "origin": "http://evil.example"})
    assert status == 403 and "not accepted" in json.loads(body)["error"]
    job = json.loads(_request(base + "/api/jobs", b'{"source": "upload"}', json_headers)[1])["id"]
    # A name with a path in it names nothing on disk; an upload over the cap is refused and gets its card.
    sneaky = "../../etc/passwd"
    status, body, _ = _request(f"{base}/api/jobs/{job}/files?name={urllib.request.quote(sneaky)}",
                               next(iter(uploads.values())), {"content-type": "application/octet-stream"})
    assert status == 200 and json.loads(body)["name"] == sneaky
    status, body, _ = _request(f"{base}/api/jobs/{job}/files?name=big.png", uploads["big.png"],
                               {"content-type": "application/octet-stream"})
    assert status == 413 and "over the limit" in json.loads(body)["error"]
    stored = [p.name for p in server["tmp"].glob("camid-ui-*/job-*/*")]
    assert stored and all(re.fullmatch(r"\d{5}", n) for n in stored), stored
    assert json.loads(_request(f"{base}/api/jobs/{job}/start", b"{}", json_headers)[1])["state"] == "scoring"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = json.loads(_request(f"{base}/api/jobs/{job}")[1])
        if state["state"] == "done":
            break
        time.sleep(0.1)
    assert state["answered"] == 1 and state["total"] == 2
    status, body, _ = _request(f"{base}/jobs/{job}/results")
    assert "../../etc/passwd" in body.decode() and "over the limit" in body.decode()
    assert _request(f"{base}/api/jobs/nope")[0] == 404
    assert _request(f"{base}/jobs/{job}/photos/7/heatmap")[0] == 404
    assert _request(base + "/static/../../cli.py")[0] == 404


def test_port_in_use_and_a_model_that_cannot_load_are_clear_errors(registered_model, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered_model.tracking_uri)
    monkeypatch.setenv("CAMID_PARAMS", str(ROOT / "params.yaml"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--model", registered_model.model_uri, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err and "--port" in err and "Traceback" not in err
    assert main(["ui", "--model", "models:/no-such-model@champion", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot load model 'models:/no-such-model@champion'" in err and "Traceback" not in err
