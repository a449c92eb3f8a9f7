"""A fake Flickr on 127.0.0.1: the REST API's JSON answers, real JPEG originals, and injectable faults.

It answers `flickr.photos.search` (text or tags, extras, paging, including Flickr's habit of answering a page
past the end with the last page) and `flickr.photos.getExif` in the shapes api.flickr.com uses, `stat: fail`
errors included. `url_o` points at live.staticflickr.com as the real one does, so a crawl must be given this
server as its image host. Faults are queued per target ('search', 'exif', 'image') and used up in order:

    slow               wait `delay` seconds, then answer normally
    500, 429           an HTTP error (429 with `retry_after` as its Retry-After header)
    truncate           send Content-Length for the whole body, then only half of it and hang up
    truncate_nolength  send half the body with no Content-Length and hang up (only the data shows it)
    badjson            200 with a body that is not JSON
    404                the original is gone
"""
from __future__ import annotations

import io
import json
import math
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml
from PIL import Image

from camid.stages.acquire.flickr import search_queries

API_PATH = "/services/rest/"
REAL_IMAGE_HOST = "https://live.staticflickr.com"


def make_jpeg(height: int, width: int, *, make: str = "", model: str = "", seed: int = 0, quality: int = 95,
              grain: float = 0.0) -> bytes:
    """A real camera-like JPEG: smooth random content (plus `grain`, 0..1, of noise: bigger files), EXIF Make and
    Model."""
    rng = random.Random(seed)
    small = Image.frombytes("RGB", (max(1, width // 16), max(1, height // 16)),
                            rng.randbytes(max(1, width // 16) * max(1, height // 16) * 3))
    image = small.resize((width, height), Image.Resampling.BICUBIC)
    if grain:
        image = Image.blend(image, Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)), grain)
    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


@dataclass
class FakePhoto:
    id: str
    height: int
    width: int
    text: str                      # the search text it is found by
    tags: tuple[str, ...] = ()     # the (normalised) tags it is found by
    make: str = ""
    model: str = ""
    owner: str = "12345678@N00"
    ownername: str = "Test Owner"
    license: int = 4
    title: str = "a photo"
    original: bool = True          # False: the owner does not share the original (no url_o, no o_dims)
    exif_visible: bool = True      # False: getExif answers 'Permission denied'
    file_dims: tuple[int, int] | None = None  # (h, w) of the served file when it differs from what o_dims says
    grain: float = 0.0             # noise in the served file (make_jpeg): makes it bigger
    secret: str = "a1b2c3d4e5"
    server: str = "65535"
    _jpeg: bytes | None = field(default=None, repr=False)

    @property
    def jpeg(self) -> bytes:
        if self._jpeg is None:
            h, w = self.file_dims or (self.height, self.width)
            self._jpeg = make_jpeg(h, w, make=self.make, model=self.model, seed=int(self.id), grain=self.grain)
        return self._jpeg

    @property
    def path(self) -> str:
        return f"/{self.server}/{self.id}_{self.secret}_o.jpg"

    def search_record(self, extras: set[str]) -> dict:
        record = {"id": self.id, "owner": self.owner, "secret": self.secret, "server": self.server, "farm": 66,
                  "title": self.title, "ispublic": 1, "isfriend": 0, "isfamily": 0}
        if "license" in extras:
            record["license"] = str(self.license)
        if "date_taken" in extras:
            record.update(datetaken="2016-05-01 10:11:12", datetakengranularity=0, datetakenunknown="0")
        if "owner_name" in extras:
            record["ownername"] = self.ownername
        if self.original and "o_dims" in extras:
            record.update(o_width=str(self.width), o_height=str(self.height))
        if self.original and "url_o" in extras:
            record.update(url_o=REAL_IMAGE_HOST + self.path, height_o=self.height, width_o=self.width)
        return record


@dataclass
class Fault:
    kind: str                      # "" (none), slow, 500, 429, 404, badjson, truncate, truncate_nolength, hold
    delay: float = 0.0
    retry_after: str | None = None
    hold_after: int = 0            # hold: send this many bytes, set FakeFlickr.holding, wait for .release


class FakeFlickr:
    """Start with `with FakeFlickr(photos) as fake:`; point the crawler at `fake.api_url` and `fake.image_host`."""

    def __init__(self, photos: list[FakePhoto], *, api_key: str = "test-key", chunk_size: int = 4096,
                 chunk_delay: float = 0.0):
        self.photos = list(photos)
        self.api_key = api_key
        self.chunk_size = chunk_size
        self.chunk_delay = chunk_delay    # seconds between image chunks: makes downloads slow enough to kill
        self.faults: dict[str, deque[Fault]] = {"search": deque(), "exif": deque(), "image": deque()}
        self.log: list[tuple[str, dict]] = []   # (target, query) of every request, in order
        self.holding = threading.Event()  # set while a "hold" fault keeps a download half-sent
        self.release = threading.Event()  # set it to let a held download go on
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}{API_PATH}"

    @property
    def image_host(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> FakeFlickr:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def inject(self, target: str, kind: str, times: int = 1, **options) -> None:
        with self._lock:
            self.faults[target].extend(Fault(kind, **options) for _ in range(times))

    def requests(self, target: str) -> list[dict]:
        with self._lock:
            return [query for t, query in self.log if t == target]

    def downloads(self) -> list[str]:
        """Photo ids of every image request, in order."""
        return [q["id"] for q in self.requests("image")]

    def _next_fault(self, target: str) -> Fault | None:
        with self._lock:
            return self.faults[target].popleft() if self.faults[target] else None

    # -- the API -------------------------------------------------------------------------------------------

    def _search(self, query: dict) -> dict:
        text, tags = query.get("text", "").lower(), query.get("tags", "").lower()
        hits = [p for p in self.photos if (text and p.text.lower() == text) or (tags and tags in p.tags)]
        per_page = min(int(query.get("per_page", 100)), 500)
        pages = max(1, math.ceil(len(hits) / per_page))
        page = min(max(1, int(query.get("page", 1))), pages)   # past the end: the last page again, as Flickr does
        extras = set(query.get("extras", "").split(","))
        photos = [p.search_record(extras) for p in hits[(page - 1) * per_page: page * per_page]]
        return {"photos": {"page": page, "pages": pages, "perpage": per_page, "total": len(hits), "photo": photos},
                "stat": "ok"}

    def _exif(self, query: dict) -> dict:
        photo = next((p for p in self.photos if p.id == query.get("photo_id")), None)
        if photo is None:
            return {"stat": "fail", "code": 1, "message": "Photo not found"}
        if not photo.exif_visible:
            return {"stat": "fail", "code": 2, "message": "Permission denied"}
        tags = [("Make", photo.make), ("Model", photo.model), ("Software", "firmware 1.0")]
        return {"photo": {"id": photo.id, "secret": photo.secret, "server": photo.server, "farm": 66,
                          "camera": f"{photo.make} {photo.model}".strip(),
                          "exif": [{"tagspace": "IFD0", "tagspaceid": 0, "tag": tag, "label": tag,
                                    "raw": {"_content": value}} for tag, value in tags]},
                "stat": "ok"}

    def _api(self, query: dict) -> tuple[str, dict]:
        method = query.get("method", "")
        target = {"flickr.photos.search": "search", "flickr.photos.getExif": "exif"}.get(method, "search")
        key = query.get("api_key", "")
        if not key or not re.fullmatch(r"[0-9A-Za-z-]+", key):
            return target, {"stat": "fail", "code": 100, "message": "Invalid API Key (Key has invalid format)"}
        if key != self.api_key:
            return target, {"stat": "fail", "code": 100, "message": "Invalid API Key (Key not found)"}
        if method == "flickr.photos.search":
            return target, self._search(query)
        if method == "flickr.photos.getExif":
            return target, self._exif(query)
        return target, {"stat": "fail", "code": 112, "message": f'Method "{method}" not found'}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                if url.path == API_PATH:
                    target, payload = fake._api(query)
                    body = json.dumps(payload).encode()
                    if query.get("nojsoncallback") != "1":
                        body = b"jsonFlickrApi(" + body + b")"
                    content_type = "application/json"
                else:
                    photo = next((p for p in fake.photos if p.path == url.path), None)
                    target, query = "image", {"id": photo.id if photo else url.path}
                    if photo is None:
                        self.send_error(404)
                        return
                    body, content_type = photo.jpeg, "image/jpeg"
                with fake._lock:
                    fake.log.append((target, query))
                fault = fake._next_fault(target)
                try:
                    self._answer(fault, body, content_type)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout, a kill)
                    pass

            def _answer(self, fault: Fault | None, body: bytes, content_type: str) -> None:
                kind = fault.kind if fault else ""
                if kind == "slow":
                    time.sleep(fault.delay)
                if kind in ("500", "429", "404"):
                    self.send_response(int(kind))
                    if fault.retry_after is not None:
                        self.send_header("Retry-After", fault.retry_after)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if kind == "badjson":
                    body = b'{"photos": {"page": 1, "pho'
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                if kind != "truncate_nolength":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if kind.startswith("truncate"):
                    body = body[: len(body) // 2]
                for start in range(0, len(body), fake.chunk_size):
                    if kind == "hold" and start >= fault.hold_after and not fake.holding.is_set():
                        fake.holding.set()
                        fake.release.wait(timeout=60)
                    self.wfile.write(body[start: start + fake.chunk_size])
                    self.wfile.flush()
                    if content_type == "image/jpeg" and fake.chunk_delay:
                        time.sleep(fake.chunk_delay)

        return Handler


def camera_photos(camera, n: int, *, first_id: int = 1000, **overrides) -> list[FakePhoto]:
    """`n` native-size photos of a catalog camera, found by its search text and its tag, with a matching model."""
    text, tag = (q for query in search_queries(camera) for q in query.values())
    height, width = camera.sizes[0]
    model = next((m for m in camera.models if not any(ch in m for ch in "*?[")), camera.models[0])
    fields = {"height": height, "width": width, "text": text, "tags": (tag,), "make": camera.make, "model": model,
              **overrides}
    return [FakePhoto(id=str(first_id + i), title=f"{camera.label} #{i}", **fields) for i in range(n)]


def write_params(path, *, flickr: dict | None = None, **acquire) -> Path:
    """A copy of the project's params.yaml for a test: the virtual catalog, and fast, impatient Flickr settings."""
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["catalog"]["active"] = "virtual"
    raw["acquire"].update(acquire)
    raw["acquire"]["flickr"].update({"requests_per_second": 1000.0, "timeout_s": 5, "retries": 3, "backoff_s": 0.01,
                                     "per_page": 3, **(flickr or {})})
    path = Path(path)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
