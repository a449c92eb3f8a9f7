"""Metadata that says where a photo came from: EXIF fields, and whether editing software touched it.

Editing software leaves its name in several places: EXIF Software / ProcessingSoftware, XMP CreatorTool and
the XMP history's softwareAgent entries, and Photoshop's image resource blocks (IRB: the version-info resource
names the writer; IPTC's originating program may name a tool). Each of those strings is checked against the
editors listed in params (`filter.editors`, case-insensitive substrings). Camera firmware strings ("Ver.1.00",
"E5000v1.6", "fw 05.15 prm 07.53") name no editor, so they are not edits.
"""
from __future__ import annotations

import re
import warnings
from typing import Iterable, Iterator

from PIL import Image

# EXIF tags (IFD0 and the Exif sub-IFD)
MAKE, MODEL, SOFTWARE, PROCESSING_SOFTWARE, DATETIME, ORIENTATION = 0x010F, 0x0110, 0x0131, 0x000B, 0x0132, 0x0112
EXIF_IFD, DATETIME_ORIGINAL, PIXEL_X_DIMENSION, PIXEL_Y_DIMENSION = 0x8769, 0x9003, 0xA002, 0xA003
# The device's serial number: EXIF 2.3 BodySerialNumber (Exif IFD), else DNG's CameraSerialNumber (IFD0)
BODY_SERIAL_NUMBER, CAMERA_SERIAL_NUMBER = 0xA431, 0xC62F

# Photoshop image resources
IRB_IPTC, IRB_VERSION_INFO = 0x0404, 0x0421
IPTC_ORIGINATING_PROGRAM = (2, 65)

_XMP_AGENT = re.compile(
    r"(xmp:CreatorTool|stEvt:softwareAgent)\s*(?:=\s*[\"']([^\"']*)[\"']|>([^<]*)<)", re.IGNORECASE)


class MalformedExif(ValueError):
    """The EXIF block is present but cannot be parsed."""


def clean_text(value) -> str | None:
    """A metadata string as a person would read it: cut at the first NUL, padding stripped; None if empty."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = str(value).split("\x00", 1)[0].strip()
    return text or None


def _int(value) -> int | None:
    try:
        return int(value[0] if isinstance(value, tuple) else value)
    except (TypeError, ValueError, IndexError):
        return None


def parse_exif(exif: Image.Exif) -> dict:
    """The fields camid uses, from a loaded Pillow Exif."""
    sub = exif.get_ifd(EXIF_IFD)
    return {
        "make": clean_text(exif.get(MAKE)),
        "model": clean_text(exif.get(MODEL)),
        "software": clean_text(exif.get(SOFTWARE)),
        "processing_software": clean_text(exif.get(PROCESSING_SOFTWARE)),
        "datetime": clean_text(sub.get(DATETIME_ORIGINAL)) or clean_text(exif.get(DATETIME)),
        "orientation": _int(exif.get(ORIENTATION)),
        "exif_width": _int(sub.get(PIXEL_X_DIMENSION)),
        "exif_height": _int(sub.get(PIXEL_Y_DIMENSION)),
        "serial": clean_text(sub.get(BODY_SERIAL_NUMBER)) or clean_text(exif.get(CAMERA_SERIAL_NUMBER)),
    }


def read_exif(tiff: bytes) -> dict:
    """Parse an EXIF block (a TIFF structure, as carried in a JPEG's APP1 after "Exif\\0\\0").

    Raises MalformedExif when the block cannot be read at all; Pillow skips individual bad tags itself.
    """
    exif = Image.Exif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exif.load(b"Exif\x00\x00" + tiff)
            return parse_exif(exif)
    except Exception as exc:  # Pillow raises many types on corrupt TIFF structures
        raise MalformedExif(f"{type(exc).__name__}: {exc}") from None


def xmp_agents(xmp: bytes | None) -> list[tuple[str, str]]:
    """(field, value) for XMP CreatorTool and every history softwareAgent, in document order."""
    if not xmp:
        return []
    text = xmp.decode("utf-8", errors="replace")
    agents = []
    for match in _XMP_AGENT.finditer(text):
        value = clean_text(match.group(2) if match.group(2) is not None else match.group(3))
        if value:
            agents.append((f"XMP {match.group(1)}", value))
    return agents


def _irb_resources(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(resource id, data) for each block of Photoshop image resources ("8BIM" blocks)."""
    pos = 0
    while pos + 12 <= len(data) and data[pos:pos + 4] in (b"8BIM", b"MeSa", b"PHUT", b"AgHg", b"DCSR"):
        resource = int.from_bytes(data[pos + 4:pos + 6], "big")
        name_len = data[pos + 6] + 1
        name_len += name_len % 2  # Pascal string padded to even length
        start = pos + 6 + name_len + 4
        size = int.from_bytes(data[start - 4:start], "big")
        yield resource, data[start:start + size]
        pos = start + size + size % 2


def _unicode_strings(data: bytes) -> Iterator[str]:
    """Photoshop's length-prefixed UTF-16BE strings, found wherever they sit in a resource."""
    pos = 0
    while pos + 4 <= len(data):
        count = int.from_bytes(data[pos:pos + 4], "big")
        if 0 < count <= 256 and pos + 4 + 2 * count <= len(data):
            text = clean_text(data[pos + 4:pos + 4 + 2 * count].decode("utf-16-be", errors="replace"))
            if text and text.isprintable():
                yield text
                pos += 4 + 2 * count
                continue
        pos += 1


def _iptc_datasets(data: bytes) -> Iterator[tuple[tuple[int, int], bytes]]:
    pos = 0
    while pos + 5 <= len(data) and data[pos] == 0x1C:
        record, dataset = data[pos + 1], data[pos + 2]
        size = int.from_bytes(data[pos + 3:pos + 5], "big")
        if size & 0x8000:  # extended dataset: not used for program names
            return
        yield (record, dataset), data[pos + 5:pos + 5 + size]
        pos += 5 + size


def photoshop_agents(irb: bytes | None) -> list[tuple[str, str]]:
    """(field, value) for the software Photoshop's image resources name: version-info writer and reader,
    IPTC originating program."""
    agents = []
    for resource, data in _irb_resources(irb or b""):
        if resource == IRB_VERSION_INFO:
            agents += [("Photoshop IRB version info", text) for text in _unicode_strings(data[5:])]
        elif resource == IRB_IPTC:
            agents += [("IPTC OriginatingProgram", text) for key, value in _iptc_datasets(data)
                       if key == IPTC_ORIGINATING_PROGRAM and (text := clean_text(value))]
    return agents


def find_editor(agents: Iterable[tuple[str, str | None]], editors: Iterable[str]) -> str | None:
    """The first (field, value) whose value names an editor, as a reason string; None if none does."""
    editors = [e for e in editors if e]
    for field, value in agents:
        if not value:
            continue
        lowered = value.lower()
        for editor in editors:
            if editor.lower() in lowered:
                return f"{field} {value!r} names editor {editor!r}"
    return None


def edit_reason(fields: dict, xmp: bytes | None, irb: bytes | None, editors: Iterable[str]) -> str | None:
    """Why a file counts as edited (the first editor named anywhere in its metadata), or None."""
    agents = [("EXIF Software", fields.get("software")),
              ("EXIF ProcessingSoftware", fields.get("processing_software"))]
    return find_editor(agents + xmp_agents(xmp) + photoshop_agents(irb), editors)
