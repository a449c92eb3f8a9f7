"""`camid` command line: a thin door onto the stage modules.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their command runs, so `camid --help` and light commands stay fast
(TensorFlow is imported by the commands that need it, not by the CLI).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from camid import __version__
from camid.errors import CamidError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("camid.data.synth", "make the virtual camera zoo: real JPEGs from simulated imaging pipelines"),
    "acquire": ("camid.stages.acquire", "the acquire stage: build data/raw from the source set in params (synthetic|folder|flickr)"),
    "crawl": ("camid.stages.acquire.flickr", "crawl a photo site (flickr) for originals of the catalog's cameras"),
    "ingest": ("camid.stages.acquire.ingest", "link a Kaggle-layout or <label>/<files> tree into the raw data layout"),
    "inspect": ("camid.forensics.inspect", "forensic header inspection: EXIF, ImageMagick-exact JPEG quality, edits, phash"),
    "prnu": ("camid.forensics.prnu", "device-level identification: enrol a sensor's PRNU fingerprint, match photos by PCE"),
    "filter": ("camid.stages.filter", "the filter stage: keep only untouched originals of catalog cameras"),
    "split": ("camid.stages.split", "the split stage: stratified train/validation split of the filtered photos"),
    "prepare": ("camid.stages.prepare", "the prepare stage: decode each photo once into a cache of CFA-aligned crops"),
    "train": ("camid.stages.train", "train one backbone, tracked in MLflow"),
    "tune": ("camid.stages.tune", "keras-tuner search over a backbone's hyperparameters, one nested MLflow run per trial"),
    "evaluate": ("camid.stages.evaluate", "score trained models on the held-out split: weighted accuracy, confusion matrix"),
    "register": ("camid.stages.register", "bundle trained runs into the camid pyfunc model and register it in MLflow"),
    "predict": ("camid.stages.predict", "batch prediction with a registered model: Kaggle submission CSV and probabilities"),
    "profile": ("camid.tools.profile", "switch params.yaml to a named profile (e.g. kaggle)"),
    "catalog": ("camid.tools.catalog", "write a camera catalog into params.yaml from a folder of your own labelled photos"),
    "explain": ("camid.tools.explain", "why this camera: per-patch camera probabilities over the photo as a heat map, and Grad-CAM"),
    "ui": ("camid.tools.ui", "a local web page for an analyst: drop photos, read each one's card of verdict and evidence, export a case report"),
    "report": ("camid.tools.report", "a self-contained HTML case report of photos: answers, evidence, sha256, the model and its test figures"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camid", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"camid {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except CamidError as exc:
        print(f"camid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"camid {args.command}: interrupted", file=sys.stderr)
        return 130

