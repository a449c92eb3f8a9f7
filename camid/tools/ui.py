"""`camid ui --model URI [--prnu FINGERPRINT...] [--folder DIR] [--port 8050]`: a page an analyst reads.

A local web app (Starlette, served by uvicorn on 127.0.0.1 only): drop one photo or many, or answer the folder
given with `--folder`, and read one card per photo (`camid.tools.cards`: the answer `camid predict --full-image`
gives, the evidence with a reading of each piece, the heat map and Grad-CAM on request), a sortable, filterable
table of the batch that opens the cards, and the case report of one photo or of the batch (`camid.tools.report`)
to download.

Safe by default. It listens on 127.0.0.1 and answers only requests addressed to 127.0.0.1 or localhost (a page
elsewhere cannot reach it by DNS rebinding), and takes a POST only from its own page. A batch is a job: the page
sends each photo in a request of its own, which is capped in bytes (`--max-upload-mb`) and written under a name
the server makes (photo 0, 1, ...) in the job's own temporary folder: no name from the client becomes a path.
Every photo is decoded under a pixel cap (`--max-pixels`). The folder of all jobs is removed when the app stops;
only the last KEPT_JOBS jobs are kept while it runs. The model runs in one worker thread, so polling, uploads and
the page stay responsive while a batch is scored; the page polls the job for its progress. A file that cannot be
answered gets a card that says why, and the others are answered.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import re
import secrets
import shutil
import socket
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from camid import __version__
from camid.core.imageio import DEFAULT_MAX_PIXELS
from camid.core.arguments import positive
from camid.errors import CamidError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_PORT = 8050
DEFAULT_MAX_MB = 50
DEFAULT_MAX_FILES = 500
KEPT_JOBS = 20          # jobs kept (with their uploads) while the app runs; older ones are removed
MAX_JSON_BYTES = 64 * 1024
MAX_NAME = 255          # characters of a client's file name kept for display
STATIC = {"camid.css": "text/css", "camid.js": "text/javascript", "ui.js": "text/javascript"}
# The page loads only its own files; pictures are data: URIs; nothing else may be fetched or framed.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
                    "referrer-policy": "no-referrer", "x-frame-options": "DENY", "cache-control": "no-store"}


@dataclass(frozen=True)
class Limits:
    max_bytes: int = DEFAULT_MAX_MB * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = DEFAULT_MAX_FILES

    @property
    def max_mb(self) -> str:
        return f"{self.max_bytes / 2 ** 20:g}"


@dataclass
class Job:
    """One batch: its photos (uploaded into `folder`, or a server-side folder's), its progress and its cards."""
    id: str
    folder: Path
    photos: list = field(default_factory=list)
    state: str = "uploading"  # uploading -> scoring -> done | failed
    stage: str = ""
    done: int = 0
    error: str = ""
    cards: list | None = None
    source: str = "photos uploaded to camid ui"
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))

    def progress(self, stage: str, done: int, total: int) -> None:
        self.stage, self.done = stage, done

    def status(self) -> dict:
        answered = None if self.cards is None else sum(not c["error"] for c in self.cards)
        return {"id": self.id, "state": self.state, "stage": self.stage, "done": self.done, "total": len(self.photos),
                "answered": answered, "error": self.error}


def display_name(text: str | None, index: int) -> str:
    """A client's file name as shown on a card (control characters dropped, at most MAX_NAME characters); it
    names nothing on disk."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", text or "").strip()
    return name[:MAX_NAME] or f"photo {index + 1}"


class App:
    """The state behind the routes: the model, its worker thread, the jobs and their temporary folder."""

    def __init__(self, ensemble, model: dict, workdir: Path, *, devices=(), editors=(), limits: Limits = Limits(),
                 folder: Path | None = None):
        self.ensemble, self.model, self.workdir = ensemble, model, Path(workdir)
        self.devices, self.editors, self.limits, self.folder = list(devices), tuple(editors), limits, folder
        self.jobs: OrderedDict[str, Job] = OrderedDict()  # touched by the event loop's thread only
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camid-model")

    async def in_worker(self, fn, *args):
        """Run model work in the one worker thread (the model is never used by two threads at once)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def new_job(self, photos=(), **kwargs) -> Job:
        """A job of its own folder; the oldest job not being scored (and its uploads) goes past KEPT_JOBS."""
        while len(self.jobs) >= KEPT_JOBS:
            oldest = next((j for j in self.jobs.values() if j.state != "scoring"), None)
            if oldest is None:
                raise CamidError(f"{KEPT_JOBS} batches are being scored; wait for one to finish")
            del self.jobs[oldest.id]
            shutil.rmtree(oldest.folder, ignore_errors=True)
        job = Job(secrets.token_urlsafe(12), self.workdir / f"job-{secrets.token_hex(8)}", list(photos), **kwargs)
        job.folder.mkdir()
        self.jobs[job.id] = job
        return job

    def start(self, job: Job) -> None:
        job.state = "scoring"
        self.worker.submit(self.score, job)

    def score(self, job: Job) -> None:
        """The worker's part of a job: every photo's card (`camid.tools.cards.build_cards`)."""
        from camid.tools.cards import build_cards

        try:
            job.cards = build_cards(self.ensemble, job.photos, devices=self.devices, editors=self.editors,
                                    max_pixels=self.limits.max_pixels, progress=job.progress)
            job.state = "done"
        except Exception as exc:  # the page says what went wrong, and the app goes on serving
            log.exception("job %s failed", job.id)
            job.error, job.state = f"the batch could not be scored: {type(exc).__name__}: {exc}", "failed"

    def folder_photos(self):
        from camid.tools.cards import folder_photos

        return folder_photos([self.folder], root=self.folder)


# -- responses ----------------------------------------------------------------------------------------------
def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _Refusal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _job(app: App, request) -> Job:
    job = app.jobs.get(request.path_params["job"])
    if job is None:
        raise _Refusal(404, f"no such batch: only the last {KEPT_JOBS} are kept, and none survive a restart of "
                            "camid ui; answer the photos again")
    return job


def _same_origin(request) -> None:
    """A POST only from this app's own page: a browser names the page's origin, which must be this server."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"http://{request.headers.get('host', '')}":
        raise _Refusal(403, f"requests from {origin} are not accepted: use the page camid ui serves")


async def _small_json(request) -> dict:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise _Refusal(413, "request too large")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise _Refusal(400, "the request is not JSON") from None
    if not isinstance(data, dict):
        raise _Refusal(400, "the request is not a JSON object")
    return data


def create_app(app: App) -> Starlette:
    """The Starlette application: the page, its static files, the job API, results, heat maps and reports."""
    from camid.tools.cards import Photo
    from camid.tools.report import add_heat_maps, render_report, static_text, templates

    def handled(handler):
        async def endpoint(request):
            try:
                return await handler(request)
            except _Refusal as exc:
                return _error(exc.status, str(exc))
            except CamidError as exc:
                return _error(400, str(exc))
        return endpoint

    async def page(request):
        folder = None
        if app.folder is not None:
            folder = {"name": str(app.folder), "count": len(app.folder_photos())}
        html = templates().get_template("ui.html").render(
            model=app.model, limits=app.limits, folder=folder, devices=[d.name for d in app.devices],
            version=__version__)
        return HTMLResponse(html)

    async def static(request):
        name = request.path_params["name"]
        if name not in STATIC:
            raise _Refusal(404, f"no such file: {name}")
        return Response(static_text(name), media_type=STATIC[name])

    async def create_job(request):
        _same_origin(request)
        source = (await _small_json(request)).get("source", "upload")
        if source == "folder":
            if app.folder is None:
                raise _Refusal(400, "no folder to answer: start camid ui with --folder DIR")
            photos = app.folder_photos()[:app.limits.max_files + 1]
            if len(photos) > app.limits.max_files:
                raise _Refusal(413, f"{app.folder} holds more than {app.limits.max_files} photos (--max-files)")
            job = app.new_job(photos, source=f"the folder {app.folder}")
            app.start(job)
        elif source == "upload":
            job = app.new_job()
        else:
            raise _Refusal(400, f"unknown source {source!r}: upload or folder")
        return JSONResponse(job.status())

    def room_for_one(job: Job) -> int:
        if job.state != "uploading":
            raise _Refusal(409, "this batch is already being scored: start a new one")
        if len(job.photos) >= app.limits.max_files:
            raise _Refusal(413, f"at most {app.limits.max_files} photos a batch (camid ui --max-files)")
        return len(job.photos)

    def too_large(size: int) -> str:
        return (f"not uploaded: {size:,} bytes, over the limit of {app.limits.max_bytes:,} bytes "
                f"({app.limits.max_mb} MB) per photo (camid ui --max-upload-mb)")

    async def upload(request):
        _same_origin(request)
        job = _job(app, request)
        index = room_for_one(job)
        name = display_name(request.query_params.get("name"), index)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > app.limits.max_bytes:
            job.photos.append(Photo(name, None, too_large(int(declared)), int(declared)))
            raise _Refusal(413, too_large(int(declared)))
        path = job.folder / f"{index:05d}"  # the server's name: the client's names nothing on disk
        size = 0
        with open(path, "xb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > app.limits.max_bytes:
                    break
                out.write(chunk)
        if size > app.limits.max_bytes:
            path.unlink()
            job.photos.append(Photo(name, None, too_large(size), size))
            raise _Refusal(413, too_large(size))
        job.photos.append(Photo(name, path))
        return JSONResponse({"index": index, "name": name, "size": size})

    async def refused(request):
        _same_origin(request)
        job = _job(app, request)
        index = room_for_one(job)
        data = await _small_json(request)
        size = data.get("size")
        size = int(size) if isinstance(size, int) and size >= 0 else 0
        job.photos.append(Photo(display_name(str(data.get("name", "")), index), None, too_large(size), size))
        return JSONResponse({"index": index})

    async def start(request):
        _same_origin(request)
        job = _job(app, request)
        if job.state != "uploading":
            raise _Refusal(409, "this batch is already being scored")
        if not job.photos:
            raise _Refusal(400, "no photos in this batch: drop or choose some first")
        app.start(job)
        return JSONResponse(job.status())

    async def status(request):
        return JSONResponse(_job(app, request).status())

    def done_job(request) -> Job:
        job = _job(app, request)
        if job.state != "done":
            raise _Refusal(409, f"the batch is {job.state}, not done: {job.error}" if job.error else
                           f"the batch is still {job.state}")
        return job

    def card_of(job: Job, text: str) -> int:
        if not text.isdigit() or int(text) >= len(job.cards):
            raise _Refusal(404, f"no photo {text} in this batch of {len(job.cards)}")
        return int(text)

    async def results(request):
        job = done_job(request)
        return HTMLResponse(templates().get_template("results.html").render(cards=job.cards, job=job.id))

    async def heatmap(request):
        job = done_job(request)
        index = card_of(job, request.path_params["photo"])
        card = job.cards[index]
        await app.in_worker(add_heat_maps, app.ensemble, job.photos[index:index + 1], [card], app.limits.max_pixels)
        if card["heatmap"] is None:
            raise _Refusal(422, card["readings"].get("heatmap", f"{card['name']} was not answered"))
        return HTMLResponse(str(templates().get_template("macros.html").module.heatmap(card)))

    async def report(request):
        from camid.tools.cards import run_facts

        job = done_job(request)
        chosen = list(range(len(job.cards)))
        if "photo" in request.query_params:
            chosen = [card_of(job, request.query_params["photo"])]
        heatmaps = request.query_params.get("heatmaps", "1") == "1"
        cards, photos = [job.cards[i] for i in chosen], [job.photos[i] for i in chosen]
        if heatmaps:
            await app.in_worker(add_heat_maps, app.ensemble, photos, cards, app.limits.max_pixels)
        facts = run_facts(max_pixels=app.limits.max_pixels, devices=app.devices, heatmaps=heatmaps,
                          extra={"photos": job.source})
        html = render_report(cards, app.model, facts)
        suffix = f"-photo-{chosen[0] + 1}" if len(chosen) == 1 and len(job.cards) > 1 else ""
        name = f"camid-report-{job.created}{suffix}.html"
        return HTMLResponse(html, headers={"content-disposition": f'attachment; filename="{name}"'})

    routes = [Route("/", handled(page)), Route("/static/{name}", handled(static)),
              Route("/api/jobs", handled(create_job), methods=["POST"]),
              Route("/api/jobs/{job}", handled(status)),
              Route("/api/jobs/{job}/files", handled(upload), methods=["POST"]),
              Route("/api/jobs/{job}/refused", handled(refused), methods=["POST"]),
              Route("/api/jobs/{job}/start", handled(start), methods=["POST"]),
              Route("/jobs/{job}/results", handled(results)),
              Route("/jobs/{job}/photos/{photo}/heatmap", handled(heatmap)),
              Route("/jobs/{job}/report.html", handled(report))]
    middleware = [Middleware(_SecurityHeaders),
                  Middleware(TrustedHostMiddleware, allowed_hosts=[HOST, "localhost"], www_redirect=False)]
    return Starlette(routes=routes, middleware=middleware)


class _SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in names]
            await send(message)

        await self.app(scope, receive, with_headers)


# -- the command ----------------------------------------------------------------------------------------------
def bind(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1:`port` (0: a free one); CamidError saying what to do when it cannot be."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CamidError(f"port {port} on {HOST} is in use (another camid ui?): stop it, or pass --port N "
                             "(--port 0 picks a free one)") from None
        raise CamidError(f"cannot listen on {HOST}:{port}: {exc.strerror or exc}; pass another --port") from None
    return sock


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(app, sock: socket.socket) -> None:
    """Serve the ASGI `app` with uvicorn on a bound socket until Ctrl-C or SIGTERM. uvicorn stops gracefully,
    then raises the signal it stopped on again: SIGTERM then interrupts like Ctrl-C, so the caller's clean-up (the
    uploads' folder) runs instead of the process dying at once."""
    import signal

    import uvicorn

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")).run(sockets=[sock])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models:/camid@champion",
                        help="MLflow model URI or ensemble bundle folder (default models:/camid@champion)")
    parser.add_argument("--prnu", nargs="+", type=Path, metavar="FINGERPRINT",
                        help="PRNU fingerprints (`camid prnu enroll` files, or folders of them): every photo's card "
                             "gets each device's PCE")
    parser.add_argument("--folder", type=Path, help="a folder on this machine the page can answer with one click")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port on {HOST} (default {DEFAULT_PORT}; 0: a free one)")
    parser.add_argument("--max-upload-mb", type=positive(float), default=DEFAULT_MAX_MB,
                        help=f"largest photo accepted, in MB (default {DEFAULT_MAX_MB})")
    parser.add_argument("--max-pixels", type=positive(int), default=DEFAULT_MAX_PIXELS,
                        help=f"a photo over this many pixels gets a card saying so (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--max-files", type=positive(int), default=DEFAULT_MAX_FILES,
                        help=f"most photos in one batch (default {DEFAULT_MAX_FILES})")


def run(args: argparse.Namespace) -> int:
    from camid.config import load_params
    from camid.tools.cards import load_devices, load_model, model_facts

    if args.folder is not None and not args.folder.is_dir():
        raise CamidError(f"--folder {args.folder} is not a folder on this machine")
    editors = load_params().filter.editors
    sock = bind(args.port)  # before the slow model load: a port in use is said at once
    try:
        devices = load_devices(args.prnu) if args.prnu else []
        ensemble = load_model(args.model)
        model = model_facts(args.model, ensemble)
        limits = Limits(int(args.max_upload_mb * 2 ** 20), args.max_pixels, args.max_files)
        with tempfile.TemporaryDirectory(prefix="camid-ui-") as workdir:
            app = App(ensemble, model, Path(workdir), devices=devices, editors=editors, limits=limits,
                      folder=args.folder.resolve() if args.folder else None)
            print(f"camid ui: http://{HOST}:{sock.getsockname()[1]}/ (model {args.model}; Ctrl-C stops it and "
                  f"removes the uploads)", flush=True)
            try:
                serve(create_app(app), sock)
            finally:
                app.worker.shutdown(wait=False, cancel_futures=True)
    finally:
        sock.close()
    return 0
