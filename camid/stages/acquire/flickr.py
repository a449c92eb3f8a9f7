"""`camid crawl flickr`: originals of the catalog's cameras from Flickr, fetched politely and resumably.

For each camera, `flickr.photos.search` is asked for the camera's search text, then for the same words as a tag
(`Nexus 5X` -> `nexus5x`), oldest upload first so that new uploads do not shift the pages of a resumed crawl.
Photos without a downloadable original, or whose original is not a native size of the camera (`o_dims`), are
skipped before any download; with `check_exif`, `flickr.photos.getExif` must also name a model of the camera.

OUT gets the raw data layout plus two append-only JSON-lines files:
    train/<label>/<photo id>.jpg   originals, each checked (a complete JPEG of a native size) before it is named
    manifest.jsonl                 one line per photo in train/: id, camera, file, url, page_url, owner,
                                   owner_name, license (Flickr licence id), title, date_taken, width, height,
                                   bytes, sha256
    rejected.jsonl                 one line per (photo, camera) not to ask about again: id, camera, outcome
                                   (skipped_exif | skipped_size | gone), reason

A download goes to `.<id>.jpg.part` and is renamed once complete and checked; its manifest line follows.
Killing the crawler at any point and running it again gives the same final set: partial downloads are removed,
a photo renamed before its manifest line was written is checked and recorded, a torn last manifest line is
cut off, and everything already recorded is skipped.

The API key comes from FLICKR_API_KEY and is never printed, logged or written: it is cut out of error messages
and of urllib3's debug log of request URLs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import requests
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from camid.stages.acquire.ingest import loose_name, resolve_label
from camid.config import Camera, Catalog, FlickrParams, load_params
from camid.errors import CamidError

log = logging.getLogger(__name__)

API_KEY_ENV = "FLICKR_API_KEY"
EXTRAS = "url_o,o_dims,license,owner_name,date_taken"
MANIFEST = "manifest.jsonl"
REJECTED = "rejected.jsonl"
PART_SUFFIX = ".part"
EXIF_HIDDEN_CODES = {1, 2}    # getExif: photo not found, permission denied (the owner hides EXIF)
GONE_STATUSES = {403, 404, 410}  # an original deleted or made private since the search


class FlickrError(CamidError):
    """Flickr refused (stat: fail), or a request kept failing after every retry."""


class FlickrApiError(FlickrError):
    def __init__(self, method: str, code, message: str):
        super().__init__(f"Flickr API error {code} from {method}: {message}")
        self.code = code


class _Retryable(Exception):
    """A failure worth another try: a timeout, a dropped or truncated transfer, 429, 5xx, a garbled answer."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class _Skip(Exception):
    """This photo is not to be fetched again: `outcome` names its CameraTally field, the message the reason."""

    def __init__(self, outcome: str, reason: str):
        super().__init__(reason)
        self.outcome = outcome


_NETWORK_ERRORS = (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                   requests.exceptions.ContentDecodingError)


def api_key_from_env() -> str:
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise CamidError(f"{API_KEY_ENV} is not set: get a key at https://www.flickr.com/services/apps/create/ "
                         f"and `export {API_KEY_ENV}=...` (it is read from the environment only, never from a file)")
    return key


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def jpeg_size(path: Path) -> tuple[int, int]:
    """(height, width) of a complete JPEG; ValueError saying what is wrong otherwise (a full decode proves the end)."""
    try:
        with Image.open(path) as image:
            if image.format != "JPEG":
                raise ValueError(f"not a JPEG but {image.format}")
            image.load()
            return image.height, image.width
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a complete JPEG ({exc})") from None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class JsonLines:
    """An append-only JSON-lines file that survives a kill mid-write: a torn last line is ignored and cut off."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records = []
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                log.warning("%s: skipping an unreadable line", self.path)
        return records

    def repair(self) -> None:
        """Cut a torn last line (a kill during append) so the next append starts on a line of its own."""
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


class _RateLimiter:
    """At most `per_second` requests per second, spaced evenly."""

    def __init__(self, per_second: float):
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self.next_at = 0.0

    def wait(self) -> None:
        now = time.monotonic()
        if self.next_at > now:
            time.sleep(self.next_at - now)
        self.next_at = max(now, self.next_at) + self.interval


class FlickrClient:
    """The few Flickr REST calls the crawler needs, each rate-limited and retried with exponential backoff."""

    def __init__(self, api_key: str, params: FlickrParams, session: requests.Session | None = None):
        self.api_key = api_key
        self.params = params
        self.session = session or requests.Session()
        self.limiter = _RateLimiter(params.requests_per_second)

    def redact(self, text) -> str:
        return re.sub(r"(api_key=)[^&\s'\"]+", r"\1[redacted]", str(text).replace(self.api_key, "[redacted]"))

    def _retrying(self, what: str, attempt):
        for n in range(self.params.retries + 1):
            self.limiter.wait()
            try:
                return attempt()
            except _Retryable as exc:
                if n == self.params.retries:
                    raise FlickrError(f"{what}: {exc} (gave up after {n + 1} tries)") from None
                delay = exc.retry_after if exc.retry_after is not None else self.params.backoff_s * 2 ** n
                log.warning("%s: %s; retry %d of %d in %.1fs", what, exc, n + 1, self.params.retries, delay)
                time.sleep(delay)

    def _get(self, url: str, params: dict | None = None, stream: bool = False) -> requests.Response:
        try:
            response = self.session.get(url, params=params, timeout=self.params.timeout_s, stream=stream)
        except _NETWORK_ERRORS as exc:
            raise _Retryable(self.redact(exc)) from None
        if response.status_code == 429 or response.status_code >= 500:
            response.close()
            raise _Retryable(f"HTTP {response.status_code}", _retry_after(response.headers.get("Retry-After")))
        return response

    def call(self, method: str, **args) -> dict:
        """One REST call; FlickrApiError with Flickr's own message on `stat: fail`."""
        query = {"method": method, "api_key": self.api_key, "format": "json", "nojsoncallback": 1, **args}

        def attempt() -> dict:
            with self._get(self.params.api_url, query) as response:
                if response.status_code != 200:
                    host = urlsplit(self.params.api_url).netloc
                    raise FlickrError(f"{method}: HTTP {response.status_code} from {host}")
                try:
                    payload = response.json()
                except ValueError:
                    raise _Retryable("the answer is not valid JSON") from None
            if not isinstance(payload, dict) or "stat" not in payload:
                raise _Retryable("the answer is not a Flickr API response")
            if payload["stat"] != "ok":
                raise FlickrApiError(method, payload.get("code"), self.redact(payload.get("message", "no message")))
            return payload

        return self._retrying(method, attempt)

    def search(self, **criteria) -> Iterator[dict]:
        """Every photo matching `criteria`, page by page, fetched lazily (stop iterating to stop calling)."""
        page, pages = 1, 1
        while page <= pages:  # Flickr answers a page past the end with the last page again, so count pages
            result = self.call("flickr.photos.search", **criteria, extras=EXTRAS, per_page=self.params.per_page,
                               page=page, sort="date-posted-asc", media="photos")["photos"]
            pages = int(result.get("pages") or 0)
            yield from result.get("photo") or []
            page += 1

    def exif_model(self, photo: dict) -> str | None:
        """The EXIF Model Flickr read from the photo, or None where the owner hides EXIF."""
        try:
            exif = self.call("flickr.photos.getExif", photo_id=photo["id"], secret=photo.get("secret", ""))
        except FlickrApiError as exc:
            if exc.code in EXIF_HIDDEN_CODES:
                return None
            raise
        return next((str(tag.get("raw", {}).get("_content", "")) for tag in exif["photo"].get("exif", [])
                     if tag.get("tag") == "Model"), None)

    def download(self, url: str, part: Path) -> tuple[int, str, tuple[int, int]]:
        """Fetch `url` into `part` and check it: (bytes, sha256, (height, width)); _Skip on 403/404/410."""

        def attempt():
            with self._get(url, stream=True) as response:
                if response.status_code in GONE_STATUSES:
                    raise _Skip("gone", f"original gone (HTTP {response.status_code})")
                if response.status_code != 200:
                    raise FlickrError(f"HTTP {response.status_code}")
                digest, size = hashlib.sha256(), 0
                with open(part, "wb") as f:
                    try:
                        for chunk in response.iter_content(1 << 16):
                            f.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                    except _NETWORK_ERRORS as exc:
                        raise _Retryable(f"transfer broken after {size} bytes ({self.redact(exc)})") from None
                    f.flush()
                    os.fsync(f.fileno())
                expected = response.headers.get("Content-Length")
            if expected is not None and int(expected) != size:
                raise _Retryable(f"got {size} of {expected} bytes")
            try:
                dims = jpeg_size(part)
            except ValueError as exc:
                raise _Retryable(str(exc)) from None
            return size, digest.hexdigest(), dims

        return self._retrying(f"download {urlsplit(url).path}", attempt)


@dataclass
class CameraTally:
    """What happened to the photos a search found for one camera."""
    found: int = 0          # distinct photos the searches returned (up to the point the quota was met)
    had: int = 0            # already downloaded by an earlier run
    skipped_size: int = 0   # no downloadable original, not a JPEG, or not a native size
    skipped_exif: int = 0   # getExif named another model, or the owner hides EXIF
    duplicate: int = 0      # already downloaded for another camera
    gone: int = 0           # the original answered 403/404/410
    downloaded: int = 0
    failed: int = 0         # still failing after every retry; a re-run tries again


def search_queries(camera: Camera) -> list[dict]:
    """The camera's search text, then the same words as a Flickr tag (Flickr tags drop case, spaces, punctuation)."""
    text = camera.search or camera.label
    return [{"text": text}, {"tags": loose_name(text)}]


def _original_dims(photo: dict) -> tuple[int, int] | None:
    """(height, width) of the original from the o_dims extra (url_o's own fields as a fallback)."""
    try:
        return int(photo.get("o_height") or photo["height_o"]), int(photo.get("o_width") or photo["width_o"])
    except (KeyError, TypeError, ValueError):
        return None


def _rehost(url: str, host: str) -> str:
    if not host:
        return url
    new, old = urlsplit(host), urlsplit(url)
    return urlunsplit((new.scheme, new.netloc, new.path.rstrip("/") + old.path, old.query, ""))


class _Crawl:
    """One crawl into OUT: the manifest state, the client, and the per-photo decisions."""

    def __init__(self, out: Path, client: FlickrClient, params: FlickrParams):
        self.out, self.client, self.params = out, client, params
        self.manifest, self.rejected = JsonLines(out / MANIFEST), JsonLines(out / REJECTED)
        for lines in (self.manifest, self.rejected):
            lines.repair()
        self.done = {str(r["id"]): r for r in self.manifest.read()}
        self.skips = {(r["camera"], str(r["id"])): r["outcome"] for r in self.rejected.read()}
        for part in out.glob(f"train/*/.*{PART_SUFFIX}"):  # downloads a killed run left unfinished
            part.unlink()

    def camera(self, camera: Camera, limit: int, progress: bool) -> CameraTally:
        tally = CameraTally()
        have = tally.had = sum(r["camera"] == camera.label for r in self.done.values())
        seen: set[str] = set()
        with tqdm(total=limit, initial=min(have, limit), desc=camera.label, unit="photo", disable=not progress) as bar:
            for query in search_queries(camera):
                if have >= limit:
                    break
                for photo in self.client.search(**query):
                    pid = str(photo["id"])
                    if pid in seen:
                        continue
                    seen.add(pid)
                    tally.found += 1
                    outcome = self.photo(camera, photo)
                    if outcome is None:  # downloaded by an earlier run: counted in `had`
                        continue
                    setattr(tally, outcome, getattr(tally, outcome) + 1)
                    if outcome == "downloaded":
                        have += 1
                        bar.update()
                        if have >= limit:
                            break
        return tally

    def photo(self, camera: Camera, photo: dict) -> str | None:
        """Handle one search hit; returns the CameraTally field it counts under (None: an earlier download)."""
        pid = str(photo["id"])
        if pid in self.done:
            return None if self.done[pid]["camera"] == camera.label else "duplicate"
        if (camera.label, pid) in self.skips:  # EXIF of another model, or gone: decided by an earlier run
            return self.skips[camera.label, pid]
        url, dims = photo.get("url_o"), _original_dims(photo)
        if not url or not urlsplit(url).path.lower().endswith((".jpg", ".jpeg")) or dims is None \
                or not camera.is_native_size(*dims):
            return "skipped_size"
        if self.params.check_exif:
            model = self.client.exif_model(photo)
            if not camera.matches_model(model):
                return self.skip(camera, pid, "skipped_exif", f"EXIF model {model!r}" if model else "EXIF hidden")
        dest = self.out / "train" / camera.label / f"{pid}.jpg"
        try:
            size, sha256, (height, width) = self.fetch(_rehost(url, self.params.image_host), dest, camera)
        except _Skip as exc:
            return self.skip(camera, pid, exc.outcome, str(exc))
        except FlickrError as exc:
            log.warning("photo %s (%s): %s", pid, camera.label, exc)
            return "failed"
        record = {
            "id": pid, "camera": camera.label, "file": dest.relative_to(self.out).as_posix(), "url": url,
            "page_url": f"https://www.flickr.com/photos/{photo.get('owner', '')}/{pid}",
            "owner": photo.get("owner", ""), "owner_name": photo.get("ownername", ""),
            "license": str(photo.get("license", "")), "title": photo.get("title", ""),
            "date_taken": photo.get("datetaken", ""), "width": width, "height": height, "bytes": size,
            "sha256": sha256,
        }
        self.manifest.append(record)
        self.done[pid] = record
        return "downloaded"

    def fetch(self, url: str, dest: Path, camera: Camera) -> tuple[int, str, tuple[int, int]]:
        """Download to a temporary name, check, rename; a complete file left by a killed run is adopted as is."""
        if dest.exists():
            try:
                return dest.stat().st_size, _sha256(dest), jpeg_size(dest)
            except ValueError:
                dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f".{dest.name}{PART_SUFFIX}")
        try:
            size, sha256, (height, width) = self.client.download(url, part)
            if not camera.is_native_size(height, width):
                raise _Skip("skipped_size", f"the original is {height}x{width}, not a native size")
            os.replace(part, dest)
            return size, sha256, (height, width)
        finally:
            part.unlink(missing_ok=True)

    def skip(self, camera: Camera, pid: str, outcome: str, reason: str) -> str:
        """Record that this photo is not to be fetched for this camera again; returns `outcome`."""
        self.rejected.append({"id": pid, "camera": camera.label, "outcome": outcome, "reason": reason})
        self.skips[camera.label, pid] = outcome
        return outcome


@contextlib.contextmanager
def _redacted_logs(client: FlickrClient):
    """urllib3 logs each request URL (api_key included) at debug level: cut the key out while crawling."""
    def redact(record: logging.LogRecord) -> bool:
        record.msg, record.args = client.redact(record.getMessage()), ()
        return True

    logger = logging.getLogger("urllib3.connectionpool")
    logger.addFilter(redact)
    try:
        yield
    finally:
        logger.removeFilter(redact)


def crawl(out: str | os.PathLike, catalog: Catalog, params: FlickrParams, *, cameras: Sequence[str] | None = None,
          api_key: str | None = None, progress: bool = True) -> dict[str, CameraTally]:
    """Crawl Flickr for up to `params.max_per_camera` originals of each camera into OUT; resumable.

    Stops with FlickrError on an API error or an API call that keeps failing; a photo whose download keeps
    failing is counted in `failed` and tried again by the next run.
    """
    chosen = [catalog.get(resolve_label(name, catalog)) for name in cameras] if cameras else list(catalog.cameras)
    api_key = api_key or api_key_from_env()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    client = FlickrClient(api_key, params)
    state = _Crawl(out, client, params)
    tallies: dict[str, CameraTally] = {}
    with _redacted_logs(client), logging_redirect_tqdm():
        try:
            for camera in chosen:
                tallies[camera.label] = state.camera(camera, params.max_per_camera, progress)
        except requests.RequestException as exc:  # anything unforeseen: its message may hold the request URL
            raise FlickrError(client.redact(exc)) from None
    return tallies


def format_summary(tallies: dict[str, CameraTally]) -> str:
    columns = [f.name for f in dataclasses.fields(CameraTally)]
    rows = [(label, [getattr(t, c) for c in columns]) for label, t in tallies.items()]
    rows.append(("total", [sum(values[i] for _, values in rows) for i in range(len(columns))]))
    width = max(len(label) for label, _ in rows)
    lines = [f"{'camera':<{width}} " + " ".join(f"{c:>12}" for c in columns)]
    lines += [f"{label:<{width}} " + " ".join(f"{v:>12}" for v in values) for label, values in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("site", choices=["flickr"], help="the photo site to crawl")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to fill (train/<label>/*.jpg + manifest.jsonl)")
    parser.add_argument("--cameras", nargs="+", metavar="LABEL", help="catalog labels to crawl (default: all)")
    parser.add_argument("--max-per-camera", type=int, metavar="N", help="photos to download per camera (default: params)")
    parser.add_argument("--api-url", metavar="URL", help="Flickr REST endpoint (default: params acquire.flickr.api_url)")
    parser.add_argument("--image-host", metavar="URL", help="serve originals from this scheme://host instead of url_o's host")


def run(args: argparse.Namespace) -> int:
    params = load_params()
    overrides = {"max_per_camera": args.max_per_camera, "api_url": args.api_url, "image_host": args.image_host}
    flickr = dataclasses.replace(params.acquire.flickr, **{k: v for k, v in overrides.items() if v is not None})
    tallies = crawl(args.out, params.catalog, flickr, cameras=args.cameras)
    print(format_summary(tallies))
    failed = sum(t.failed for t in tallies.values())
    if failed:
        print(f"{failed} downloads still failed after {flickr.retries} retries: run the same command again to retry")
        return 1
    return 0
