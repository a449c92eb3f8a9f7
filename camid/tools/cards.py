"""One card per photo, for `camid ui` and `camid report`: the answer `camid predict --full-image` gives, and the
evidence beside it, each piece with a one-line reading.

The answer comes from the one photo-scoring path (`camid.inference.answers.answer_photos`) under the options
`camid predict --full-image` runs with by default (PREDICT_OPTIONS), the manipulated flag taken from the file's
name as `camid predict` takes it (`flag_from_name`), so a card never shows an answer the batch command would not
give. The evidence: the JPEG tables and the catalog firmware that wrote them, EXIF against the pixels, the file's
inspection (`camid.forensics.inspect`: quality, size, editor traces, sha256), PRNU matches against enrolled devices
(`camid.forensics.prnu`), and, on request, `camid explain`'s patch heat map and Grad-CAM, drawn over the very
patches the answer scored. A card is a plain dict (JSON-able): the HTML templates render it.
"""
from __future__ import annotations

import base64
import io
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from camid import __version__
from camid.core.imageio import DEFAULT_MAX_PIXELS, ImageError, decode_image, list_images
from camid.errors import CamidError
from camid.forensics.inspect import header_facts, inspect_file
from camid.inference.answers import ANSWER_COLUMNS, answer_photos, flag_from_name
from camid.inference.ensemble import UNKNOWN_GROUNDS
from camid.inference.jpeg_tables import FAMILY, UNSEEN, USED
from camid.inference.metadata import INCONSISTENT_BELOW, SEPARATOR
from camid.inference.openset import UNKNOWN
from camid.inference.options import batch_options

# `camid predict --full-image` with its defaults: every photo on its auto grid of patches, the bundle's TTA views
# and blend, the JPEG-table evidence, no balancing, the open-set rule (`on_error` is the served model's alone).
PREDICT_OPTIONS = batch_options(0)
PREDICT_COMMAND = "camid predict --full-image"
THUMBNAIL_SIDE = 320
FIGURE_DPI = 60  # the explain figure (13 x 10.5 in) at about 780 x 630 px: readable, and small inlined

# A registered model's test-set figures (its run's evaluation.json, what the evaluate stage measured), in order.
TEST_FIGURES = (
    ("weighted_accuracy", "weighted accuracy (0.7 unaltered + 0.3 manipulated)"),
    ("accuracy_unaltered", "accuracy, unaltered patches"),
    ("accuracy_manipulated", "accuracy, manipulated patches"),
    ("weighted_accuracy_pixels_only", "weighted accuracy, pixels only"),
    ("full_image.accuracy", f"whole photos ({PREDICT_COMMAND})"),
    ("full_image.accuracy_pixels_only", "whole photos, pixels only"),
    ("chance", "chance"),
    ("images", "test photos"),
    ("device_disjoint", "test devices never seen in training"),
    ("test_data", "test data fingerprint"),
)


@dataclass(frozen=True)
class Photo:
    """A photo to answer: `name` is what the analyst knows it by (shown, never used as a path); `path` is where
    its bytes are (None when they were refused, `error` saying why)."""
    name: str
    path: Path | None
    error: str = ""
    size: int | None = None  # bytes, where the file is not at `path`


def folder_photos(paths: Sequence[str | Path], root: Path | None = None) -> list[Photo]:
    """The images named, and those under the folders named (`list_images`), each known by its path (relative to
    `root` if given)."""
    return [Photo(str(path.relative_to(root) if root else path), path) for path in list_images(paths)]


# -- the model ----------------------------------------------------------------------------------------------
def load_model(uri: str):
    """The ensemble behind a bundle folder or an MLflow model URI; CamidError saying what to pass otherwise."""
    from camid.tools.explain import _load_model

    return _load_model(str(uri))


def model_facts(uri: str, ensemble) -> dict:
    """What a report says of the model: its URI, registered name and version, run, cameras, members, and the
    test-set figures the registered model carries (its run's evaluation.json; a bundle folder carries none)."""
    facts = {"uri": str(uri), "name": None, "version": None, "run_id": None, "labels": list(ensemble.labels),
             "patch": int(ensemble.patch), "members": list(ensemble.names), "views": list(ensemble.views),
             "jpeg_tables": bool(ensemble.use_tables), "open_set": bool(ensemble.open_set), "figures": [],
             "figures_note": ""}
    if (Path(uri) / "ensemble.json").is_file():
        facts["figures_note"] = ("an ensemble bundle folder carries no test-set figures: they are the evaluate "
                                 "stage's (metrics/evaluate.json) and the registered model's")
        return facts
    try:
        facts.update(_registered(str(uri)))
    except Exception as exc:  # the model loaded, its record did not (a copied pyfunc folder, a store gone)
        facts["figures_note"] = f"no test-set figures: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return facts


def _registered(uri: str) -> dict:
    """name, version, run_id and figures of an MLflow model URI (models:/name/version, models:/name@alias,
    runs:/<run>/..., or a pyfunc folder whose MLmodel names its run)."""
    import mlflow
    from mlflow import MlflowClient

    from camid.tracking import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri())
    out = {}
    registered = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@(.+))", uri)
    if registered:
        name, version, alias = registered.groups()
        held = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
        out.update(name=name, version=str(held.version), run_id=held.run_id)
    elif uri.startswith("runs:/"):
        out["run_id"] = uri.split("/")[1]
    elif (Path(uri) / "MLmodel").is_file():
        from camid.config import read_yaml

        out["run_id"] = read_yaml((Path(uri) / "MLmodel").read_text()).get("run_id")
    if not out.get("run_id"):
        return {**out, "figures_note": "no test-set figures: the model names no MLflow run"}
    mlflow.set_tracking_uri(tracking_uri())
    evaluation = mlflow.artifacts.load_dict(f"runs:/{out['run_id']}/evaluation.json")
    figures = []
    for key, label in TEST_FIGURES:
        value = evaluation
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            figures.append({"key": key, "label": label, "value": value})
    split = evaluation.get("split", "test")
    return {**out, "figures": figures,
            "figures_note": f"measured by the evaluate stage on the {split} split (its run's evaluation.json)"}


# -- PRNU devices -------------------------------------------------------------------------------------------
@dataclass
class Device:
    """An enrolled device: its fingerprint file's name (without .npz) and a matcher built once."""
    name: str
    file: Path
    matcher: object


def load_devices(paths: Sequence[str | Path]) -> list[Device]:
    """The PRNU fingerprints named (`camid prnu enroll` files) and those in the folders named (*.npz)."""
    from camid.forensics.prnu import Matcher, load_fingerprint

    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.npz"))
            if not found:
                raise CamidError(f"--prnu {path}: no fingerprint (*.npz) in the folder; make one with "
                                 "`camid prnu enroll PHOTOS --out DEVICE.npz`")
            files += found
        else:
            files.append(path)
    return [Device(f.stem, f, Matcher(load_fingerprint(f))) for f in files]


def match_devices(devices: Sequence[Device], pixels: np.ndarray) -> list[dict]:
    """Each device's PCE for the photo (most likely first), `match` above the conventional threshold; a device
    whose fingerprint the photo cannot fit gets `error` instead."""
    from camid.forensics.prnu import DEFAULT_THRESHOLD

    rows = []
    for device in devices:
        try:
            score = device.matcher.score(pixels)
        except CamidError as exc:
            rows.append({"device": device.name, "error": str(exc)})
            continue
        rows.append({"device": device.name, "pce": float(score.pce), "correlation": float(score.correlation),
                     "rotation": int(score.rotation), "match": bool(score.pce > DEFAULT_THRESHOLD),
                     "threshold": DEFAULT_THRESHOLD})
    return sorted(rows, key=lambda r: -r.get("pce", -np.inf))


# -- the cards ----------------------------------------------------------------------------------------------
def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail(path: Path, side: int = THUMBNAIL_SIDE) -> str | None:
    """A small JPEG of the photo, upright as a viewer shows it, as a data: URI (None if it cannot be drawn)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.draft("RGB", (side, side))
            small = ImageOps.exif_transpose(image).convert("RGB")
        small.thumbnail((side, side))
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=80)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return data_uri("image/jpeg", buffer.getvalue())


def _value(value):
    """A table cell as plain JSON: pandas NA and NaN -> None, numpy scalars -> Python."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


INSPECTED = ("format", "width", "height", "quality", "subsampling", "make", "model", "serial", "software",
             "datetime", "orientation", "edited", "edit_reason", "phash", "error")


def build_cards(ensemble, photos: Sequence[Photo], *, devices: Sequence[Device] = (), editors: Sequence[str] = (),
                max_pixels: int = DEFAULT_MAX_PIXELS,
                progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """The cards of `photos`, in order: the answer table of the whole batch first (one call of `answer_photos`,
    as `camid predict --full-image` makes it), then each photo's evidence. `progress(stage, done, total)` is
    told as photos go by. A photo that cannot be answered gets a card whose `error` says why."""
    photos = list(photos)
    total = len(photos)
    report = progress or (lambda stage, done, n: None)

    def counted(items):
        for done, item in enumerate(items):
            report("scoring", done, total)
            yield item
        report("scoring", total, total)

    table = answer_photos(ensemble, [p.path if p.path is not None and not p.error else b"" for p in photos],
                          PREDICT_OPTIONS, flags=[flag_from_name(p.name) for p in photos],
                          errors=[p.error for p in photos], max_pixels=max_pixels, progress=counted)
    labels = list(ensemble.labels)
    cards = []
    for index, (photo, row) in enumerate(zip(photos, table.to_dict("records"))):
        report("evidence", index, total)
        cards.append(_card(ensemble, index, photo, row, labels, devices, editors, max_pixels))
    report("evidence", total, total)
    return cards


def _card(ensemble, index: int, photo: Photo, row: dict, labels: list[str], devices, editors, max_pixels) -> dict:
    error = row["error"]
    card = {"index": index, "name": photo.name, "error": error, "size": photo.size, "sha256": None,
            "flag_from_name": flag_from_name(photo.name),
            "answer": {key: _value(row[key]) for key in ANSWER_COLUMNS if key != "error"},
            "probs": {label: _value(row[label]) for label in labels},
            "background": [label for label, other in zip(ensemble.labels, ensemble.background) if other],
            "reference_sizes": [list(hw) for hw in ensemble.camera_sizes(row["closest_camera"])],
            "exif_reference_sizes": [list(hw) for hw in ensemble.camera_sizes(row["exif_camera"])]
            if row["exif_camera"] else [],
            "inspection": None, "firmware": None, "firmware_family": None, "prnu": None, "thumbnail": None,
            "heatmap": None}
    if photo.path is None:
        return _with_readings(card, ensemble)
    card["size"] = photo.path.stat().st_size
    record = inspect_file(photo.path, editors, max_pixels)
    card["sha256"] = record["sha256"]
    card["inspection"] = {key: _value(record[key]) for key in INSPECTED}
    if ensemble.tables is not None:
        card["firmware"] = ensemble.tables.matches(record["jpeg_tables"])
        if card["firmware"] == []:
            card["firmware_family"] = ensemble.tables.family_matches(record["jpeg_tables"])
    if not error:
        card["thumbnail"] = thumbnail(photo.path)
        if devices:
            try:
                card["prnu"] = match_devices(devices, decode_image(photo.path.read_bytes(), max_pixels))
            except (ImageError, OSError) as exc:
                card["prnu"] = [{"device": d.name, "error": str(exc)} for d in devices]
    return _with_readings(card, ensemble)


def _with_readings(card: dict, ensemble) -> dict:
    card["readings"] = readings(card, ensemble.use_tables)
    card["flags"] = flags(card)
    return card


# -- what each piece of evidence says, in one line ----------------------------------------------------------
LOW_CONFIDENCE = 0.5  # a calibrated top probability under this: the answer is more likely wrong than right


def flags(card: dict) -> list[str]:
    """The batch table's filters a card falls under: error, unknown, inconsistent, edited, low confidence, and
    size (a pixel size none of the closest camera's reference photos have: `size_seen` false)."""
    answer, inspection = card["answer"], card["inspection"] or {}
    out = []
    if card["error"]:
        return ["error"]
    if answer["unknown"]:
        out.append("unknown")
    if answer["consistent"] is False:
        out.append("inconsistent")
    if inspection.get("edited"):
        out.append("edited")
    if answer["confidence"] is not None and answer["confidence"] < LOW_CONFIDENCE:
        out.append("low")
    if answer.get("size_seen") is False:
        out.append("size")
    return out


# What decided an `unknown` (the answer's `unknown_by`, camid.inference.ensemble.UNKNOWN_GROUNDS), in words.
UNKNOWN_BY = dict(zip(UNKNOWN_GROUNDS, (
    "by its pixels, which lie further from the closest camera's training photos than the open-set threshold allows",
    "by its JPEG tables, which no catalog firmware's family writes; for a camera of one reference device, also "
    "because the pixels are not near enough its reference to outweigh them: a reference photo in the questioned "
    "photo's quality mode would settle it",
    "by its pixels and by its JPEG tables, which no catalog firmware's family writes")))


def readings(card: dict, model_uses_tables: bool) -> dict[str, str]:
    """One sentence per piece of evidence: answer, tables, exif, inspection, prnu."""
    answer, out = card["answer"], {}
    if card["error"]:
        out["answer"] = f"not answered: {card['error']}"
    else:
        closest, p = answer["closest_camera"], answer["confidence"]
        elsewhere = _background_lead(card)
        if answer["camera"] == UNKNOWN and elsewhere:
            out["answer"] = (f"unlike every catalog camera: the photo is most like the background cameras, photos of "
                             f"other models ({elsewhere[0]}, p={elsewhere[1]:.2f}); the closest catalog camera is "
                             f"{closest} (p={p:.2f})")
        elif answer["camera"] == UNKNOWN:
            out["answer"] = (f"unlike every catalog camera ({UNKNOWN_BY.get(answer.get('unknown_by'), 'the open-set rule')});"
                             f" the closest is {closest} (p={p:.2f})")
        else:
            out["answer"] = f"{closest} with calibrated confidence {p:.2f}"
            if p < LOW_CONFIDENCE:
                out["answer"] += f" (under {LOW_CONFIDENCE}: more likely wrong than right)"
        group = str(answer.get("camera_group") or closest)
        if " or " in group:
            out["answer"] += f"; the pixels cannot tell apart {group}"
        devices = answer.get("reference_devices")
        if devices == 1 and card.get("background"):
            out["answer"] += (f"; {closest} was learnt from one device only, so its pixel ground is the background "
                              "cameras rather than a distance from that device's photos")
        elif devices == 1:
            out["answer"] += (f"; {closest} was learnt from one device only, so its open-set threshold rests on a "
                              "single-device margin")
        if answer.get("size_seen") is False:
            out["answer"] += _size_reading(card)
        given = card["flag_from_name"]
        if given is None:
            flag = f"estimated {'manipulated' if answer['manipulated'] else 'unaltered'} by the model"
        else:
            flag = f"flagged {'manipulated' if given else 'unaltered'} by its name"
        out["answer"] += f"; {answer['patches']} patches; {flag}"
    out["tables"] = _tables_reading(card, model_uses_tables)
    out["exif"] = _exif_reading(card)
    out["inspection"] = _inspection_reading(card)
    if card["prnu"] is not None:
        out["prnu"] = _prnu_reading(card["prnu"])
    return out


def _size_reading(card: dict) -> str:
    """The clause for a photo whose pixel size is none of its closest camera's reference sizes (`size_seen`
    False): a size mode the reference lacks (cameras scale and compress each mode their own way), or a photo
    cropped or resized since."""
    answer, inspection = card["answer"], card["inspection"] or {}
    closest, sizes = answer["closest_camera"], card.get("reference_sizes") or []
    size = f"is {inspection['height']}x{inspection['width']} (h x w)" if inspection.get("width") else "has a size"
    known = f" ({', '.join(f'{h}x{w}' for h, w in sizes)})" if sizes else ""
    out = (f"; the photo {size}, none of the sizes of {closest}'s reference photos{known}: a size mode the "
           "reference lacks, or a photo cropped or resized since")
    if answer["camera"] == UNKNOWN:
        out += (f"; a camera scales and compresses each size mode its own way, so this `unknown` may say only that "
                f"the reference lacks the mode: add reference photos of {closest} at this size to settle it")
    return out


def _firmware_names(matches, background=()) -> str:
    """The cameras whose training photos carried the tables, a background camera (other models' photos) named as
    such: its tables are some other model's firmware, not a catalog camera's."""
    return ", ".join(f"{m['camera']}{' (background: other models)' if m['camera'] in background else ''} "
                     f"({m['photos']} training photo{'s' if m['photos'] != 1 else ''})" for m in matches)


def _tables_reading(card: dict, model_uses_tables: bool) -> str:
    evidence, firmware = card["answer"]["tables_evidence"], card["firmware"]
    if card["error"]:
        return "not read: the photo was not answered"
    if evidence == USED:
        return (f"written by catalog firmware ({_firmware_names(firmware or [], card.get('background', ()))}); they "
                "entered the answer")
    if evidence == FAMILY:
        family = _firmware_names(card.get("firmware_family") or [], card.get("background", ()))
        return (f"tables of a catalog firmware's family at another quality ({family}):"
                " another quality mode of that firmware, or an encoder scaling the same base table; they entered "
                "the answer")
    if evidence == UNSEEN:
        return ("no training photo had these JPEG tables or tables of their family: another camera's firmware, or "
                "a re-save by other software; they did not enter the answer")
    if (card["inspection"] or {}).get("format") not in (None, "JPEG"):
        return "not a JPEG: no quantization tables to read"
    if card["flag_from_name"]:
        return "not used: the file's name flags it manipulated (a re-save carries its editor's tables)"
    if model_uses_tables:
        return "not used: no readable quantization tables in the header"
    why = "not used: this model does not use the JPEG-table evidence (its evaluation did not keep it)"
    if firmware:
        return f"{why}; catalog firmware that writes them: {_firmware_names(firmware, card.get('background', ()))}"
    return why if firmware is None else f"{why}; no training photo had these tables"


def _background_lead(card: dict) -> tuple[str, float] | None:
    """(label, probability) where the card's probabilities put the photo with a background camera (other models'
    photos, never an answer: camid.config.Camera), else None."""
    probs = {label: p for label, p in (card.get("probs") or {}).items() if p is not None}
    if not card.get("background") or not probs:
        return None
    top = max(probs, key=probs.get)
    return (top, probs[top]) if top in card["background"] else None


def _exif_reading(card: dict) -> str:
    answer = card["answer"]
    model, named, consistent = answer["exif_model"], answer["exif_camera"], answer["consistent"]
    if card["error"]:
        return f"EXIF Model {model!r}" if model else "no EXIF Model"
    if not model:
        return "no EXIF Model: nothing to check the pixels against"
    if consistent is None and named:  # answers: a size none of the EXIF camera's reference photos have
        sizes = card.get("exif_reference_sizes") or []
        known = f" ({', '.join(f'{h}x{w}' for h, w in sizes)})" if sizes else ""
        return (f"EXIF Model {model!r} names {named}; the pixels point to {answer['closest_camera']}, but the photo's "
                f"size is none of {named}'s reference sizes{known}, so the pixels cannot judge the EXIF: undecided "
                f"(add reference photos of {named} at this size to settle it)")
    if consistent is None and answer.get("unknown_by") == "tables":  # answers: the grounds disagree
        closest = answer["closest_camera"]
        return (f"EXIF Model {model!r} names no catalog camera; the pixels lean to {closest}, but the JPEG tables are "
                "no catalog firmware's and made the answer `unknown`: the two grounds disagree, so neither judges the "
                f"EXIF: undecided (another camera whose pixels resemble {closest}'s, or a {closest} photo re-saved "
                f"under another EXIF; `camid prnu` against a {closest} device's fingerprint can tell)")
    if consistent is None:
        return f"EXIF Model {model!r}; the model carries no catalog to match it with"
    if consistent and not named:  # answers: the pixels point to no catalog camera
        if _background_lead(card):
            return (f"EXIF Model {model!r} names no catalog camera, and the pixels put the photo with the background "
                    "cameras (other models): no contradiction")
        return (f"EXIF Model {model!r} names no catalog camera, and the pixels are unlike every catalog camera "
                "(`unknown` on the pixel ground): no contradiction, though camid has no reference to confirm that "
                "camera")
    if consistent:
        closest = answer["closest_camera"]
        if named == closest:
            return f"EXIF Model {model!r} names {named}, the camera the pixels point to"
        group = str(answer.get("camera_group") or closest).split(SEPARATOR)
        given = (card.get("probs") or {}).get(named)
        if named not in group and given is not None and given < INCONSISTENT_BELOW:  # metadata.contradicts: twins
            return (f"EXIF Model {model!r} names {named}; the pixels point to {closest} and give {named} {given:.2f}, "
                    f"but the two are twins the pixels cannot be trusted to tell apart (validation could not, or "
                    "one reference device each with the same JPEG tables, or one maker's tables in two quality "
                    "modes, and one size): no contradiction")
        return (f"EXIF Model {model!r} names {named}; the pixels lean to {closest} but do not rule "
                f"{named} out (group {SEPARATOR.join(group)}): no contradiction")
    if named:
        return (f"EXIF says {named} ({model!r}) but the pixels point to {answer['closest_camera']} and give {named} "
                "under 5%: they disagree")
    return f"EXIF Model {model!r} names no catalog camera; the pixels point to {answer['closest_camera']}"


def _inspection_reading(card: dict) -> str:
    record = card["inspection"]
    if record is None:
        return "not inspected: the file was not kept"
    if record["error"]:
        return f"the file is damaged or unreadable: {record['error']}"
    parts = [f"{record['format']} {record['width']}x{record['height']}"]
    if record["quality"] is not None:
        parts.append(f"quality {record['quality']}" + (f", {record['subsampling']}" if record["subsampling"] else ""))
    parts.append(f"edited: {record['edit_reason']}" if record["edited"] else "no editing software named")
    return "; ".join(parts)


def _prnu_reading(rows: list[dict]) -> str:
    scored = [r for r in rows if "pce" in r]
    if not scored:
        return f"no enrolled device fits the photo: {rows[0]['error']}" if rows else "no device enrolled"
    matches = [r for r in scored if r["match"]]
    if matches:
        return "taken by " + ", ".join(f"{r['device']} (PCE {r['pce']:.0f})" for r in matches) + \
            f", above the threshold {matches[0]['threshold']:g}"
    best = scored[0]
    return f"no enrolled device matches: best {best['device']} with PCE {best['pce']:.1f} (threshold {best['threshold']:g})"


# -- the heat map -------------------------------------------------------------------------------------------
class _OnPurpose(logging.Filter):
    """`patch_map` warns when the cap cuts its grid (and suggests a larger --stride); a card's grid is cut on
    purpose, to the patches its answer scored."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("capped at")


def heat_map(ensemble, photo: Photo, card: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """`camid explain`'s figure for a card, drawn over the very patches its answer scored (the auto grid of
    `camid predict --full-image`), so the figure's camera is the card's: {"figure": data: URI (JPEG), "reading",
    "camera", "agreement", "patches"}. CamidError when the photo cannot be explained (it was not answered)."""
    from camid.inference import explain

    if card["error"] or photo.path is None:
        raise CamidError(f"{photo.name} was not answered ({card['error']}): there are no patches to map")
    data = photo.path.read_bytes()
    pixels = decode_image(data, max_pixels)
    facts = header_facts(data)
    quiet, explain_log = _OnPurpose(), logging.getLogger(explain.__name__)
    explain_log.addFilter(quiet)
    try:
        pm = explain.patch_map(ensemble, pixels, max_patches=card["answer"]["patches"], tta=PREDICT_OPTIONS["tta"],
                               manipulated=card["flag_from_name"], signature=facts["jpeg_tables"],
                               exif_model=facts["model"])
    finally:
        explain_log.removeFilter(quiet)
    cam, note = None, "no Grad-CAM"
    top, left = pm.offsets[pm.most_confident]
    try:
        cam = explain.grad_cam(ensemble, pixels[top:top + pm.patch, left:left + pm.patch], pm.photo_index,
                               manipulated=pm.manipulated)
        note = f"{ensemble.names[0]}: {explain.gradcam_layer(ensemble)}"
    except CamidError as exc:
        note = "no Grad-CAM: " + str(exc).split(";")[0]
    runner, runner_p = pm.runner_up
    title = (f"{photo.name}: {pm.camera} (p={pm.probability:.2f}); runner-up {runner} (p={runner_p:.2f}); "
             f"{pm.agreement:.0%} of the {len(pm.offsets)} patches the answer scored agree")
    figure = explain.render_figure(pm, pixels, cam, title=title, gradcam_note=note)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="jpeg", dpi=FIGURE_DPI, pil_kwargs={"quality": 82})
    reading = (f"{pm.agreement:.0%} of the {len(pm.offsets)} patches name {pm.camera} on their own; runner-up "
               f"{runner} (p={runner_p:.2f}); Grad-CAM inside the patch most sure of it at ({top}, {left}): {note}")
    return {"figure": data_uri("image/jpeg", buffer.getvalue()), "reading": reading, "camera": pm.camera,
            "agreement": float(pm.agreement), "patches": len(pm.offsets), "gradcam": cam is not None}


# -- what a report records of how it was made -----------------------------------------------------------------
def run_facts(*, max_pixels: int, devices: Sequence[Device] = (), heatmaps: bool, extra: dict | None = None) -> dict:
    """The options and provenance a report states: camid's version, the date, the scoring options (those of
    `camid predict --full-image`), the heat maps and the PRNU fingerprints used."""
    return {"camid_version": __version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": PREDICT_COMMAND, "options": dict(PREDICT_OPTIONS), "max_pixels": int(max_pixels),
            "heatmaps": bool(heatmaps), "prnu": [d.file.name for d in devices], "extra": dict(extra or {})}
