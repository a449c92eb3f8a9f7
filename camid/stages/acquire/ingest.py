"""`camid ingest SRC --out DIR`: link an existing photo tree into the raw data layout, without copying.

SRC is either the Kaggle layout (`train/<label>/*`, optionally `test/*`) or any `<label>/<files>` tree; a
subfolder of a label folder is one device of that camera (`<label>/<device>/<files>`) and is kept as such,
so the split stage can keep each device's photos in one set.
Folder names are mapped onto catalog labels: exact labels, or the same letters and digits in any case and
punctuation (`htc-1-m7`, `HTC_1_M7`), or the camera's search name (`Nexus 5X`). OUT always gets the Kaggle
layout, `OUT/train/<label>/[<device>/]<file>` and `OUT/test/<file>`, built beside OUT and swapped in whole.

Files are hard-linked; across filesystems, where a hard link cannot be made, they are symlinked, and copied
only where neither works. A crawl's `manifest.jsonl` (photo attribution) is linked along with the photos.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from camid.config import Catalog, load_params
from camid.errors import CamidError
from camid.core.fileio import atomic_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"  # the attribution manifest a crawl writes beside train/


def loose_name(name: str) -> str:
    """The letters and digits of a name, lower-cased: `HTC-1-M7`, `htc_1_m7` and `HTC 1 M7` all read `htc1m7`."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def resolve_label(name: str, catalog: Catalog) -> str:
    """The catalog label a folder (or command-line) name stands for; CamidError naming the known labels if none."""
    if name in catalog.labels:
        return name
    key = loose_name(name)
    matches = sorted({c.label for c in catalog.cameras
                      if key and key in (loose_name(c.label), loose_name(c.search))})
    if len(matches) == 1:
        return matches[0]
    why = f"could be any of {', '.join(matches)}" if matches else f"is no camera of the {catalog.name!r} catalog"
    raise CamidError(f"{name!r} {why}; known labels: {', '.join(catalog.labels)}")


def link_file(src: Path, dst: Path) -> str:
    """Put `src` at `dst` without copying where possible; returns how: 'hardlink', 'symlink' or 'copy'."""
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:  # another filesystem, or one without hard links
        pass
    try:
        os.symlink(src.resolve(), dst)
        return "symlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


@dataclass
class IngestSummary:
    train: Counter = field(default_factory=Counter)   # label -> files
    test: int = 0
    links: Counter = field(default_factory=Counter)   # 'hardlink' | 'symlink' | 'copy' -> files


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _plan(src: Path, catalog: Catalog) -> list[tuple[Path, Path]]:
    """(source file, path relative to OUT) for every photo in SRC; raises on unknown labels and name clashes."""
    kaggle = (src / "train").is_dir()
    label_root = src / "train" if kaggle else src
    plan: dict[Path, Path] = {}
    for folder in _visible(label_root):
        if not folder.is_dir():
            log.info("ignoring %s: not a <label> folder", folder)
            continue
        try:
            label = resolve_label(folder.name, catalog)
        except CamidError as exc:
            raise CamidError(f"{folder}: folder {exc}") from None
        for item in _visible(folder):
            # A subfolder of a label folder is one device of that camera (the split keeps devices apart).
            photos = [(item, Path("train", label, item.name))] if item.is_file() else \
                [(p, Path("train", label, item.name, p.name)) for p in _visible(item) if p.is_file()]
            if item.is_dir() and any(p.is_dir() for p in _visible(item)):
                log.warning("ignoring the folders inside %s: photos are expected in <label>/ or <label>/<device>/", item)
            for photo, rel in photos:
                if rel in plan:
                    raise CamidError(f"{photo} and {plan[rel]} would both become {rel}: rename one of them")
                plan[rel] = photo
    if kaggle and (src / "test").is_dir():
        for item in _visible(src / "test"):
            if item.is_file():
                plan[Path("test", item.name)] = item
    return [(source, rel) for rel, source in plan.items()]


def ingest(src: str | os.PathLike, out: str | os.PathLike, catalog: Catalog) -> IngestSummary:
    """Link the photos under SRC into OUT in the Kaggle layout; OUT is replaced whole, SRC is left untouched."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CamidError(f"{src} is not a folder: give a Kaggle-layout (train/<label>/*) or <label>/<files> tree")
    src_abs, out_abs = src.resolve(), out.resolve()
    if src_abs == out_abs or src_abs in out_abs.parents or out_abs in src_abs.parents:
        raise CamidError(f"{src} and {out} overlap: ingest into a folder outside the source tree")
    plan = _plan(src, catalog)
    if not plan:
        raise CamidError(f"{src} holds no photos: expected train/<label>/* (Kaggle layout) or <label>/<files>")
    if (src / MANIFEST).is_file():
        plan.append((src / MANIFEST, Path(MANIFEST)))
    summary = IngestSummary()
    with atomic_dir(out) as tmp:
        for source, rel in plan:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            summary.links[link_file(source, tmp / rel)] += 1
            if rel.parts[0] == "train":
                summary.train[rel.parts[1]] += 1
            elif rel.parts[0] == "test":
                summary.test += 1
    if summary.links["copy"]:
        log.warning("%d files were copied: neither a hard link nor a symlink could be made", summary.links["copy"])
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="a Kaggle layout (train/<label>/*, test/*) or a <label>/<files> tree")
    parser.add_argument("--out", type=Path, required=True, help="the raw data folder to (re)build, e.g. data/raw")


def run(args: argparse.Namespace) -> int:
    summary = ingest(args.src, args.out, load_params().catalog)
    for label, n in sorted(summary.train.items()):
        print(f"{label:<24} {n:>7}")
    if summary.test:
        print(f"{'test':<24} {summary.test:>7}")
    links = ", ".join(f"{n} {how}" for how, n in sorted(summary.links.items()))
    print(f"ingested {sum(summary.train.values()) + summary.test} photos into {args.out} ({links})")
    return 0
