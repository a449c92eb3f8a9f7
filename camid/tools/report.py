"""`camid report PHOTOS... --model URI --out report.html`: a case report to hand on, one self-contained HTML file.

Every photo's card (`camid.tools.cards`: the answer `camid predict --full-image` gives, and the evidence with a
reading of each piece), a sortable, filterable table of the batch, each file's sha256 and size, the model (URI,
registered version, its test-set figures), the options the answers were made with, camid's version and the date.
Pictures are inlined as data: URIs, the stylesheet and the table's script are inlined too, and the page's
Content-Security-Policy forbids any request: it opens offline, from a file, anywhere. `camid ui` exports the same
report from its page; both render the templates in camid/tools/templates. The file is written whole under a
temporary name, then renamed.
"""
from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path

from camid.core.fileio import write_text
from camid.core.imageio import DEFAULT_MAX_PIXELS
from camid.errors import CamidError

log = logging.getLogger(__name__)

FLAG_NAMES = {"unknown": "unknown", "inconsistent": "EXIF inconsistent", "edited": "edited",
              "low": "low confidence", "size": "size not in reference", "error": "error"}
INSPECTED_SHOWN = ("quality", "subsampling", "make", "model", "serial", "software", "datetime", "orientation", "phash")


@functools.cache
def templates():
    """The Jinja2 environment of camid/tools/templates, HTML-escaping everything it is given (names from
    clients and EXIF included)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("camid.tools", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.globals.update(FLAG_NAMES=FLAG_NAMES, INSPECTED_SHOWN=INSPECTED_SHOWN)
    return env


def static_text(name: str) -> str:
    """A stylesheet or script of the templates folder, as text."""
    return templates().loader.get_source(templates(), name)[0]


def render_report(cards: list[dict], model: dict, run: dict, title: str | None = None) -> str:
    """The self-contained case report of `cards` (`camid.tools.cards.build_cards`), `model`
    (`model_facts`) and `run` (`run_facts`)."""
    title = title or f"camid case report: {len(cards)} photo{'' if len(cards) == 1 else 's'}"
    return templates().get_template("report.html").render(
        cards=cards, model=model, run=run, title=title, css=static_text("camid.css"),
        js=static_text("camid.js"))


def add_heat_maps(ensemble, photos, cards: list[dict], max_pixels: int = DEFAULT_MAX_PIXELS, progress=None) -> None:
    """Draw the heat map of every answered card that has none yet (`camid.tools.cards.heat_map`); a photo that
    cannot be drawn gets a reading that says why."""
    from camid.tools.cards import heat_map

    pairs = list(zip(photos, cards))
    for photo, card in progress(pairs) if progress else pairs:
        if card["error"] or card["heatmap"] is not None:
            continue
        try:
            card["heatmap"] = heat_map(ensemble, photo, card, max_pixels)
        except CamidError as exc:
            card["readings"]["heatmap"] = f"no heat map: {exc}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photos", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--model", default="models:/camid@champion",
                        help="MLflow model URI or ensemble bundle folder (default models:/camid@champion)")
    parser.add_argument("--out", type=Path, required=True, help="the report (HTML), written atomically")
    parser.add_argument("--prnu", nargs="+", type=Path, metavar="FINGERPRINT",
                        help="PRNU fingerprints (`camid prnu enroll` files, or folders of them) to match every photo "
                             "against")
    parser.add_argument("--no-heatmaps", dest="heatmaps", action="store_false",
                        help="leave out the patch heat maps and Grad-CAM (faster)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"a photo over this many pixels gets a card saying so (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--title", help="the report's title (default: camid case report: N photos)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from camid.config import load_params
    from camid.tools.cards import build_cards, folder_photos, load_devices, load_model, model_facts, run_facts

    if args.out.is_dir():
        raise CamidError(f"--out {args.out} is a folder: name the report file, e.g. {args.out / 'report.html'}")
    editors = load_params().filter.editors
    photos = folder_photos(args.photos)
    devices = load_devices(args.prnu) if args.prnu else []
    ensemble = load_model(args.model)
    model = model_facts(args.model, ensemble)
    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:  # one bar per stage: scoring, evidence
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=stage, unit="photo")
        bar = bars[stage]
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    cards = build_cards(ensemble, photos, devices=devices, editors=editors, max_pixels=args.max_pixels,
                        progress=progress)
    if args.heatmaps:
        add_heat_maps(ensemble, photos, cards, args.max_pixels,
                      progress=lambda items: tqdm(items, desc="heat maps", unit="photo"))
    html = render_report(cards, model, run_facts(max_pixels=args.max_pixels, devices=devices, heatmaps=args.heatmaps),
                         args.title)
    try:
        write_text(args.out, html)
    except OSError as exc:
        raise CamidError(f"cannot write {args.out}: {exc.strerror or exc}; name a writable file with --out") from None
    answered = sum(not c["error"] for c in cards)
    for card in cards:
        if card["error"]:
            log.warning("cannot answer %s: %s", card["name"], card["error"])
    print(f"{answered} of {len(cards)} photos answered ({sum(c['answer']['unknown'] is True for c in cards)} unknown, "
          f"{sum('inconsistent' in c['flags'] for c in cards)} EXIF-inconsistent): {args.out}")
    return 0
