"""JPEG quality exactly as ImageMagick's `identify -format %Q` reports it, read from the quantization tables.

ImageMagick (coders/jpeg.c) sums every entry of every quantization table and takes a "hash" of four entries
(luma entries 2 and 53, chroma entries 0 and 63, natural order; luma only with a single table). It then walks
reference (hash, sum) pairs from quality 1 upwards and stops at the first pair the image reaches. Above 50 the
stopping quality is the answer; up to 50 only an exact match counts, otherwise the quality stays undefined and
`%Q` prints 92. The reference pairs are the IJG example tables scaled by libjpeg's quality formula, so they are
computed here rather than copied.

The tables are those defined before the first scan, a later definition of a slot replacing an earlier one.
A table redefined between the scans of a progressive file does not count: `identify` reports the first scan's
tables there too (checked against identify in tests/test_jpeg_quality.py).

Table families. Most firmware (and libjpeg) scales one base table by a quality factor: a camera's Fine, Normal
and Basic modes, or an encoder that adapts its quality per scene, write tables of one family. An entry x of an
8-bit table written as clamp(round(base * s), 1, 255) says base * s lies in [x - 1/2, x + 1/2) ([0, 3/2) for 1,
[254.5, inf) for 255), so two tables A and B come from one base at some pair of scales exactly when one ratio
r = s_A / s_B fits every entry: max(lo_A / hi_B) <= min(hi_A / lo_B) (`same_family`). Luma and chroma share the
ratio, as libjpeg scales them with one factor. Tables with fewer than `FAMILY_MIN_INFORMATIVE` entries of at
least 2 (near quality 100 every entry is 1 or 2) carry too little to tell a family and match only themselves.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import BinaryIO, Mapping, Sequence

import numpy as np

# ITU-T T.81 Annex K example tables (the IJG defaults), natural (row-major) order.
IJG_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)
IJG_CHROMA = (
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
) + (99,) * 32

# Position in natural order of the k-th coefficient of a DQT segment (zigzag order).
ZIGZAG_TO_NATURAL = (
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
)

# What `%Q` prints when ImageMagick's estimate fails (image->quality left undefined).
IM_UNDEFINED_QUALITY = 92
_EXACT_ONLY_UP_TO = 50  # at or below this quality ImageMagick accepts only an exact match

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}
_STANDALONE = {0x01} | set(range(0xD0, 0xD8))  # TEM, RST0-7: no length field


class JpegFormatError(ValueError):
    """The bytes are not a JPEG stream, or its header is malformed."""


class JpegHeaderTruncated(JpegFormatError):
    """The file ends before the JPEG header does (before the first scan)."""


def libjpeg_scaled_table(base: Sequence[int], quality: int) -> tuple[int, ...]:
    """`base` scaled as libjpeg's jpeg_set_quality(quality, force_baseline=TRUE) does."""
    quality = min(100, max(1, quality))
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return tuple(min(255, max(1, (q * scale + 50) // 100)) for q in base)


def _hash(luma: Sequence[int], chroma: Sequence[int] | None) -> int:
    value = luma[2] + luma[53]
    if chroma is not None:
        value += chroma[0] + chroma[63]
    return value


@functools.cache
def reference_pairs(two_tables: bool) -> tuple[tuple[int, int], ...]:
    """ImageMagick's (hash, sum) reference for qualities 1..100 (index 0 is quality 1)."""
    pairs = []
    for quality in range(1, 101):
        luma = libjpeg_scaled_table(IJG_LUMA, quality)
        chroma = libjpeg_scaled_table(IJG_CHROMA, quality) if two_tables else None
        pairs.append((_hash(luma, chroma), sum(luma) + (sum(chroma) if chroma else 0)))
    return tuple(pairs)


def quality_from_tables(tables: Mapping[int, Sequence[int]]) -> int:
    """ImageMagick's %Q for quantization tables given as {slot: 64 values in natural order}."""
    total = sum(sum(tables[slot]) for slot in tables if 0 <= slot < 4)
    if 0 in tables and 1 in tables:
        pairs, value = reference_pairs(True), _hash(tables[0], tables[1])
    elif 0 in tables:
        pairs, value = reference_pairs(False), _hash(tables[0], None)
    else:
        return IM_UNDEFINED_QUALITY
    for index, (ref_hash, ref_sum) in enumerate(pairs):
        if value < ref_hash and total < ref_sum:
            continue
        quality = index + 1
        exact = value <= ref_hash and total <= ref_sum
        return quality if exact or quality > _EXACT_ONLY_UP_TO else IM_UNDEFINED_QUALITY
    return IM_UNDEFINED_QUALITY


# Entries of at least 2 a table needs, in every slot, before it is compared by family: all-1 (quality 100) tables
# fit every ratio test and would join every family.
FAMILY_MIN_INFORMATIVE = 16


class TableSignature(str):
    """A table signature (`JpegHeader.table_signature`, 16 hex digits) that also carries what it hashes: `tables`
    ({slot: 64 natural-order values}) and `components` ((h, v) per component), for the family test
    (`same_family`). It is the plain string wherever strings go (JSON, CSV, dict keys, comparisons); pickling
    keeps the tables (worker processes)."""

    def __new__(cls, digest: str, tables: Mapping[int, Sequence[int]], components: Sequence[Sequence[int]]):
        self = super().__new__(cls, digest)
        self.tables = {int(slot): tuple(int(v) for v in values) for slot, values in tables.items()}
        self.components = tuple(tuple(int(c) for c in comp) for comp in components)
        return self

    def __reduce__(self):
        return TableSignature, (str(self), self.tables, self.components)

    def quant(self) -> dict:
        """The tables and sampling as JSON-ready lists (a bundle's jpeg_tables.json "quant" entry)."""
        return {"tables": {str(slot): list(values) for slot, values in sorted(self.tables.items())},
                "components": [list(comp) for comp in self.components]}

    @classmethod
    def from_quant(cls, digest: str, quant: Mapping) -> "TableSignature":
        return cls(digest, {int(slot): values for slot, values in quant["tables"].items()}, quant["components"])


def _entry_bounds(values: Sequence[int]) -> tuple[list[float], list[float]]:
    """Where base * scale lay for each entry of a table written as clamp(round(base * scale), 1, 255)."""
    lo = [0.0 if v <= 1 else v - 0.5 for v in values]
    hi = [math.inf if v == 255 else v + 0.5 for v in values]
    return lo, hi


def _informative(tables: Mapping[int, Sequence[int]]) -> bool:
    return bool(tables) and all(sum(v >= 2 for v in values) >= FAMILY_MIN_INFORMATIVE for values in tables.values())


def scale_ratio(a: Mapping[int, Sequence[int]], b: Mapping[int, Sequence[int]]) -> tuple[float, float] | None:
    """The interval of ratios r = scale_a / scale_b for which tables `a` and `b` ({slot: natural-order values})
    are one base table at two scales, or None when no ratio fits (or the slots differ)."""
    if sorted(a) != sorted(b):
        return None
    low, high = 0.0, math.inf
    for slot in a:
        lo_a, hi_a = _entry_bounds(a[slot])
        lo_b, hi_b = _entry_bounds(b[slot])
        for la, ha, lb, hb in zip(lo_a, hi_a, lo_b, hi_b):
            low = max(low, 0.0 if math.isinf(hb) else la / hb)
            high = min(high, math.inf if lb == 0 else ha / lb)
            if low > high:
                return None
    return low, high


def same_family(a: TableSignature, b: TableSignature) -> bool:
    """Whether two signatures' tables are one base table at two quality scales, with the same sampling: equal
    signatures always; otherwise both need `FAMILY_MIN_INFORMATIVE` informative entries per slot and a common
    ratio (`scale_ratio`). Plain strings (no tables) match only themselves."""
    if str(a) == str(b):
        return True
    tables_a, tables_b = getattr(a, "tables", None), getattr(b, "tables", None)
    if not tables_a or not tables_b or a.components != b.components:
        return False
    if not (_informative(tables_a) and _informative(tables_b)):
        return False
    return scale_ratio(tables_a, tables_b) is not None


def _stacked_bounds(tables: Mapping[int, Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([tables[slot] for slot in sorted(tables)], dtype=np.float64).ravel()
    lo = np.where(values <= 1, 0.0, values - 0.5)
    hi = np.where(values == 255, np.inf, values + 0.5)
    return lo, hi


def family_members(query: TableSignature, members: Sequence[TableSignature]) -> list[bool]:
    """`same_family(query, m)` for every m of `members`, in one array operation per sampling and slot layout
    (a catalog of crawled phones holds thousands of signatures)."""
    out = [str(query) == str(m) for m in members]
    tables = getattr(query, "tables", None)
    if not tables or not _informative(tables):
        return out
    q_lo, q_hi = _stacked_bounds(tables)
    rows = [k for k, m in enumerate(members)  # the members laid out as the query is (slots, sampling)
            if not out[k] and getattr(m, "tables", None) and m.components == query.components
            and sorted(m.tables) == sorted(tables) and _informative(m.tables)]
    if rows:
        bounds = [_stacked_bounds(members[k].tables) for k in rows]
        m_lo, m_hi = np.stack([b[0] for b in bounds]), np.stack([b[1] for b in bounds])
        with np.errstate(divide="ignore", invalid="ignore"):
            low = np.where(np.isinf(m_hi), 0.0, q_lo / m_hi).max(axis=1)
            high = np.where(m_lo == 0, np.inf, q_hi / m_lo).min(axis=1)
        for k, fits in zip(rows, low <= high):
            out[k] = bool(fits)
    return out


@dataclass
class JpegHeader:
    """What the markers of a JPEG stream say, read without decoding any pixels."""

    width: int = 0
    height: int = 0
    precision: int = 8
    sof: int = 0                                   # SOFn marker byte (0xC0 baseline, 0xC2 progressive, ...)
    components: tuple[tuple[int, int], ...] = ()   # (h, v) sampling factors per component
    tables: dict[int, tuple[int, ...]] = field(default_factory=dict)  # slot -> natural-order table
    exif: bytes | None = None                      # first APP1 Exif payload (from the TIFF header on)
    xmp: bytes | None = None                       # APP1 XMP packet (standard, then extended parts)
    photoshop: bytes | None = None                 # APP13 "Photoshop 3.0" IRB data, all segments joined

    @property
    def progressive(self) -> bool:
        return self.sof in _PROGRESSIVE_SOF

    @property
    def subsampling(self) -> str:
        """"4:2:0", "4:2:2", "4:4:4", ... for Y + two 1x1 chroma components; "4:0:0" for grayscale;
        otherwise ImageMagick's jpeg:sampling-factor form ("2x2,1x1,1x1,1x1")."""
        comps = self.components
        if len(comps) == 1:
            return "4:0:0"
        if len(comps) == 3 and comps[1] == comps[2] == (1, 1):
            named = {(1, 1): "4:4:4", (2, 1): "4:2:2", (2, 2): "4:2:0", (1, 2): "4:4:0", (4, 1): "4:1:1",
                     (4, 2): "4:1:0"}
            if comps[0] in named:
                return named[comps[0]]
        return ",".join(f"{h}x{v}" for h, v in comps)

    @property
    def quality(self) -> int:
        return quality_from_tables(self.tables)

    @property
    def table_signature(self) -> TableSignature:
        """The firmware's JPEG encoder settings in 16 hex digits: a hash of every quantization table (slot and
        natural-order values) and the components' sampling factors. Two files share it when one encoder
        configuration wrote both; a re-save by other software almost always changes it. The string carries the
        tables too (`TableSignature`), for the family test."""
        blob = repr((sorted(self.tables.items()), self.components)).encode()
        return TableSignature(hashlib.blake2b(blob, digest_size=8).hexdigest(), self.tables, self.components)


def _read_dqt(payload: bytes, tables: dict[int, tuple[int, ...]]) -> None:
    pos = 0
    while pos < len(payload):
        precision, slot = payload[pos] >> 4, payload[pos] & 15
        size = 128 if precision else 64
        chunk = payload[pos + 1:pos + 1 + size]
        if slot > 3 or len(chunk) < size:
            raise JpegFormatError("malformed DQT segment")
        values = chunk if not precision else [int.from_bytes(chunk[i:i + 2], "big") for i in range(0, 128, 2)]
        natural = [0] * 64
        for k, value in enumerate(values):
            natural[ZIGZAG_TO_NATURAL[k]] = value
        tables[slot] = tuple(natural)
        pos += 1 + size


def _read_segment(header: JpegHeader, marker: int, payload: bytes) -> None:
    if marker == 0xDB:
        _read_dqt(payload, header.tables)
    elif marker in _SOF_MARKERS and not header.sof:
        if len(payload) < 6:
            raise JpegFormatError("malformed SOF segment")
        header.sof, header.precision = marker, payload[0]
        header.height, header.width = int.from_bytes(payload[1:3], "big"), int.from_bytes(payload[3:5], "big")
        count = payload[5]
        comps = payload[6:6 + 3 * count]
        header.components = tuple((comps[i + 1] >> 4, comps[i + 1] & 15) for i in range(0, len(comps), 3))
    elif marker == 0xE1:
        if payload.startswith(b"Exif\x00") and header.exif is None:
            header.exif = payload[6:]
        elif payload.startswith(b"http://ns.adobe.com/xap/1.0/\x00"):
            header.xmp = payload[29:] + (header.xmp or b"")
        elif payload.startswith(b"http://ns.adobe.com/xmp/extension/\x00"):
            header.xmp = (header.xmp or b"") + payload[35 + 32 + 8:]  # GUID + full length + offset
    elif marker == 0xED and payload.startswith(b"Photoshop 3.0\x00"):
        header.photoshop = (header.photoshop or b"") + payload[14:]


def read_jpeg_header(fp: BinaryIO) -> JpegHeader:
    """Parse the markers of the JPEG stream in `fp` (positioned at its start) up to the first scan.

    Reads only the header; raises JpegFormatError (JpegHeaderTruncated if the file ends inside it).
    """
    if fp.read(2) != b"\xff\xd8":
        raise JpegFormatError("not a JPEG stream (no SOI marker)")
    header = JpegHeader()
    while True:
        byte = fp.read(1)
        while byte and byte != b"\xff":  # garbage between segments: libjpeg skips it with a warning
            byte = fp.read(1)
        while byte == b"\xff":
            byte = fp.read(1)
        if not byte:
            raise JpegHeaderTruncated("JPEG header cut short before the first scan")
        marker = byte[0]
        if marker in _STANDALONE:
            continue
        if marker == 0xD9:
            raise JpegFormatError("JPEG stream ends before any scan")
        length_bytes = fp.read(2)
        length = int.from_bytes(length_bytes, "big")
        if len(length_bytes) < 2 or length < 2:
            raise JpegHeaderTruncated("JPEG header cut short before the first scan")
        payload = fp.read(length - 2)
        if len(payload) < length - 2:
            raise JpegHeaderTruncated("JPEG header cut short before the first scan")
        if marker == 0xDA:
            if not header.sof:
                raise JpegFormatError("JPEG scan before any frame header")
            return header
        _read_segment(header, marker, payload)


def jpeg_quality(path) -> int:
    """ImageMagick's %Q for the JPEG file at `path`. Raises JpegFormatError for a file that is not one."""
    with open(path, "rb") as fp:
        return read_jpeg_header(fp).quality
