"""The acquire stage: `camid acquire --out data/raw` builds the raw photos from `params.acquire.source`.

    synthetic  the virtual camera zoo (camid.data.synth), made afresh
    folder     `acquire.folder`, a Kaggle-layout or <label>/<files> tree, linked in (camid.stages.acquire.ingest)
    flickr     originals crawled from Flickr (camid.stages.acquire.flickr); needs FLICKR_API_KEY, resumes where it stopped

Whatever the source, OUT has the Kaggle layout: `OUT/train/<label>/<files>` (plus `OUT/test/*` when a Kaggle
test folder is ingested).
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from camid.config import ConfigError, Params, load_params
from camid.errors import CamidError

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "folder", "flickr")


def acquire(out: str | Path, params: Params, *, progress: bool = True) -> None:
    """Build OUT from the source `params.acquire.source` names."""
    out, source = Path(out), params.acquire.source
    if source == "synthetic":
        from camid.data.synth import synthesize

        synthesize(out, params.catalog, params.synth, progress=progress)
    elif source == "folder":
        from camid.stages.acquire.ingest import ingest

        folder = params.acquire.folder
        if not folder or not Path(folder).is_dir():
            problem = "is not a folder" if folder else "is empty"
            raise CamidError(f"acquire.source is 'folder' but acquire.folder {folder!r} {problem}: set acquire.folder "
                             "in params.yaml to a Kaggle-layout (train/<label>/*) or <label>/<files> tree")
        try:
            ingest(folder, out, params.catalog)
        except CamidError as exc:
            raise CamidError(f"acquire.folder: {exc}") from None
    elif source == "flickr":
        from camid.stages.acquire.flickr import MANIFEST, crawl, format_summary

        if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
            log.info("removing %s: it was built from another source", out)
            shutil.rmtree(out)
        tallies = crawl(out, params.catalog, params.acquire.flickr, progress=progress)
        print(format_summary(tallies))
        failed = sum(t.failed for t in tallies.values())
        if failed:
            raise CamidError(f"{failed} Flickr downloads still failed after every retry: run again to resume")
    else:
        raise ConfigError(f"acquire.source is {source!r}; choose one of {', '.join(SOURCES)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="the raw data folder to build, e.g. data/raw")


def run(args: argparse.Namespace) -> int:
    acquire(args.out, load_params())
    return 0
