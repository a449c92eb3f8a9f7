"""JPEG quality must equal ImageMagick's `identify -format %Q` on every JPEG: checked on a generated corpus."""
from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camid.forensics.jpeg_quality import (IJG_CHROMA, IJG_LUMA, IM_UNDEFINED_QUALITY, JpegFormatError,
                                          JpegHeaderTruncated, jpeg_quality, libjpeg_scaled_table,
                                          quality_from_tables, read_jpeg_header, reference_pairs)

ROOT = Path(__file__).resolve().parents[1]
REAL_JPEGS = ROOT.parent / "shared" / "samples" / "real-jpeg"
IDENTIFY = shutil.which("identify")
needs_identify = pytest.mark.skipif(
    IDENTIFY is None, reason="ImageMagick's identify (the reference) is not installed: run `make imagemagick`")


def imagemagick_convert() -> str | None:
    """The real ImageMagick convert (a stand-in of the same name may come first on PATH)."""
    for candidate in ("/usr/bin/convert", shutil.which("convert")):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-version"], capture_output=True, text=True)
            if "ImageMagick" in probe.stdout:
                return candidate
    return None


def identify_quality(files: list[Path]) -> dict[str, int]:
    """identify's %Q for many files in one process, keyed by file name."""
    out = subprocess.run([IDENTIFY, "-format", "%f\t%Q\n", *map(str, files)], capture_output=True, text=True).stdout
    return {name: int(q) for name, q in (line.split("\t") for line in out.splitlines())}


def photo(seed: int, size=(56, 40)) -> Image.Image:
    """A small image with smooth and textured areas, so every quality gives a distinct file."""
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noise = rng.normal(0, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(smooth) + noise, 0, 255).astype(np.uint8))


def custom_tables(rng: np.random.Generator, count: int, kind: int) -> list[list[int]]:
    """Non-standard tables as firmware and Photoshop write them: IJG scaled unevenly, flat, or random."""
    tables = []
    for i in range(count):
        base = np.array(IJG_LUMA if i == 0 else IJG_CHROMA)
        if kind == 0:  # IJG tables perturbed (camera firmware)
            table = base * rng.uniform(0.05, 0.6) + rng.integers(-2, 3, 64)
        elif kind == 1:  # flat small values (Photoshop at high quality)
            table = rng.integers(1, 6, 64)
        else:  # anything
            table = rng.integers(1, 256, 64)
        tables.append([int(v) for v in np.clip(table, 1, 255)])
    return tables


def insert_table_after_first_scan(data: bytes, slot: int, value: int) -> bytes:
    second_scan = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    dqt = b"\xff\xdb" + (67).to_bytes(2, "big") + bytes([slot]) + bytes([value] * 64)
    return data[:second_scan] + dqt + data[second_scan:]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> list[Path]:
    """JPEGs of every kind the rule must handle; file names carry Pillow's quality where there is one."""
    folder = tmp_path_factory.mktemp("jpeg-corpus")
    rgb, files = photo(0), []

    def save(name: str, image: Image.Image, **options) -> None:
        path = folder / f"{name}.jpg"
        image.save(path, "JPEG", **options)
        files.append(path)

    for q in range(1, 101):
        save(f"pillow_q{q:03d}_s{q % 3}", rgb, quality=q, subsampling=q % 3)
    for q in (5, 30, 50, 51, 75, 93, 94, 95, 100):
        save(f"progressive_q{q:03d}", rgb, quality=q, progressive=True, subsampling=q % 3)
    for q in range(3, 101, 12):
        save(f"gray_q{q:03d}", rgb.convert("L"), quality=q)
    save("cmyk_q093", rgb.convert("CMYK"), quality=93)
    rng = np.random.default_rng(7)
    for i in range(24):
        count = (1, 2, 3, 4)[i % 4]
        image = {1: rgb.convert("L"), 4: rgb.convert("CMYK")}.get(count, rgb)  # Pillow writes the tables used
        save(f"custom_{i:02d}_{count}tables", image, qtables=custom_tables(rng, count, i % 3))
    # hash above quality 2's and sum below it: ImageMagick's estimate fails (below 51 it wants an exact match)
    undefined = [[1] * 64, [1] * 64]
    undefined[0][2] = undefined[0][53] = undefined[1][0] = 255
    undefined[1][63] = 251
    save("undefined", rgb, qtables=undefined)
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=90, progressive=True)
    path = folder / "progressive_redefined_after_first_scan.jpg"
    path.write_bytes(insert_table_after_first_scan(buffer.getvalue(), 0, 40))
    files.append(path)

    convert = imagemagick_convert()
    if convert:
        source = folder / "source.png"
        rgb.save(source)
        for q, extra in ((35, []), (60, ["-sampling-factor", "4:4:4"]), (85, ["-interlace", "JPEG"]),
                         (92, ["-sampling-factor", "4:2:2"]), (97, ["-colorspace", "Gray"]), (100, [])):
            path = folder / f"imagemagick_q{q:03d}.jpg"
            subprocess.run([convert, str(source), "-quality", str(q), *extra, str(path)], check=True)
            files.append(path)
    return files


def test_reference_pairs_are_imagemagicks():
    """Spot values of the tables in ImageMagick's coders/jpeg.c, which camid computes from the IJG tables."""
    two, one = reference_pairs(True), reference_pairs(False)
    assert len(two) == len(one) == 100
    assert two[0] == (1020, 32640) and two[49] == (247, 9193) and two[94] == (25, 927) and two[99] == (4, 128)
    assert one[0] == (510, 16320) and one[49] == (131, 3688) and one[94] == (13, 369) and one[99] == (2, 64)


@pytest.mark.parametrize("quality", range(1, 101))
def test_standard_tables_give_their_quality(quality):
    luma, chroma = libjpeg_scaled_table(IJG_LUMA, quality), libjpeg_scaled_table(IJG_CHROMA, quality)
    assert quality_from_tables({0: luma, 1: chroma}) == quality
    assert quality_from_tables({0: luma}) == quality


def test_failed_estimate_prints_92_like_identify():
    assert quality_from_tables({}) == IM_UNDEFINED_QUALITY == 92
    assert quality_from_tables({1: IJG_CHROMA}) == 92  # no luma slot 0: ImageMagick does not estimate


def test_pillow_qualities_read_back(corpus):
    for path in corpus:
        if path.name.startswith(("pillow_q", "progressive_q", "gray_q")):
            assert jpeg_quality(path) == int(path.stem.split("_q")[1][:3]), path.name


def test_header_fields(corpus):
    by_name = {p.stem: p for p in corpus}

    def header(name):
        with open(by_name[name], "rb") as fp:
            return read_jpeg_header(fp)

    assert [header(f"pillow_q09{i}_s{i % 3}").subsampling for i in (0, 1, 2)] == ["4:4:4", "4:2:2", "4:2:0"]
    assert header("gray_q015").subsampling == "4:0:0"
    assert header("cmyk_q093").subsampling == "1x1,1x1,1x1,1x1"
    assert header("progressive_q095").progressive and not header("pillow_q095_s2").progressive
    assert (header("pillow_q095_s2").width, header("pillow_q095_s2").height) == (56, 40)
    assert sorted(header("custom_03_4tables").tables) == [0, 1, 2, 3]


def test_not_a_jpeg_or_cut_short(tmp_path, corpus):
    with pytest.raises(JpegFormatError):
        read_jpeg_header(io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100))
    data = corpus[0].read_bytes()
    with pytest.raises(JpegHeaderTruncated):
        read_jpeg_header(io.BytesIO(data[:data.index(b"\xff\xda")]))


@needs_identify
def test_quality_equals_identify_on_generated_corpus(corpus):
    assert len(corpus) >= 100
    reference = identify_quality(corpus)
    mismatches = {p.name: (jpeg_quality(p), reference[p.name]) for p in corpus if jpeg_quality(p) != reference[p.name]}
    assert not mismatches, f"camid vs identify: {mismatches}"
    assert reference["undefined.jpg"] == 92
    assert reference["progressive_redefined_after_first_scan.jpg"] == 90


@needs_identify
@pytest.mark.skipif(not REAL_JPEGS.is_dir(), reason=f"{REAL_JPEGS} (real camera JPEGs) is not present")
def test_quality_equals_identify_on_real_camera_jpegs():
    files = sorted(REAL_JPEGS.glob("*.jpg"))
    reference = identify_quality(files)
    assert len(reference) == len(files) > 50
    mismatches = {p.name: (jpeg_quality(p), reference[p.name]) for p in files if jpeg_quality(p) != reference[p.name]}
    assert not mismatches, f"camid vs identify: {mismatches}"


def _encoded_signature(quality=None, qtables=None, subsampling=2, seed=0):
    """The table signature of a real JPEG written by Pillow (libjpeg)."""
    options = {"quality": quality} if quality is not None else {"qtables": qtables}
    buffer = io.BytesIO()
    photo(seed).save(buffer, "JPEG", subsampling=subsampling, **options)
    buffer.seek(0)
    return read_jpeg_header(buffer).table_signature


def test_libjpeg_qualities_of_one_base_table_are_one_family():
    """Files libjpeg wrote at qualities 30..98 (one base table scaled: Fine / Normal / Basic of one firmware) are one
    family; other base tables, other sampling and the all-1 tables of quality 100 are not."""
    from camid.forensics.jpeg_quality import TableSignature, same_family, scale_ratio

    ijg = {q: _encoded_signature(quality=q) for q in (30, 50, 75, 90, 94, 98)}
    assert len(set(ijg.values())) == len(ijg) and all(isinstance(s, TableSignature) for s in ijg.values())
    assert all(same_family(a, b) for a in ijg.values() for b in ijg.values())
    low, high = scale_ratio(ijg[75].tables, ijg[50].tables)  # libjpeg's scales: 50 at q75, 100 at q50
    assert low <= 0.5 <= high and high - low < 0.1
    ramp = [[2 + (k % 7) * 3 for k in range(64)], [3 + (k % 5) * 4 for k in range(64)]]
    other = _encoded_signature(qtables=ramp)
    doubled = _encoded_signature(qtables=[[2 * v for v in t] for t in ramp])  # the other base, twice the scale
    assert same_family(other, doubled) and not any(same_family(other, s) for s in ijg.values())
    assert not same_family(ijg[90], _encoded_signature(quality=75, subsampling=0))  # 4:4:4: another configuration
    flat = _encoded_signature(quality=100)  # every entry 1: it fits any ratio, so it is only itself
    assert same_family(flat, flat) and not any(same_family(flat, s) for s in ijg.values())
    assert not same_family(str(ijg[90]), str(ijg[75])) and same_family(str(ijg[90]), ijg[90])  # plain strings: exact


def test_table_signature_is_the_plain_string_wherever_strings_go():
    import json
    import pickle

    from camid.forensics.jpeg_quality import TableSignature

    sig = _encoded_signature(quality=85)
    again = pickle.loads(pickle.dumps(sig))  # worker processes (camid inspect --workers) keep the tables
    assert type(again) is TableSignature and again == sig and again.tables == sig.tables
    assert again.components == sig.components == ((2, 2), (1, 1), (1, 1))
    assert json.loads(json.dumps({"s": sig})) == {"s": str(sig)} and {str(sig): 1}[sig] == 1 and len(sig) == 16
    assert TableSignature.from_quant(str(sig), json.loads(json.dumps(sig.quant()))).tables == sig.tables


def test_family_members_agrees_with_same_family_pair_by_pair():
    from camid.forensics.jpeg_quality import family_members, same_family

    ramp = [[2 + (k % 7) * 3 for k in range(64)], [3 + (k % 5) * 4 for k in range(64)]]
    members = [_encoded_signature(quality=q) for q in (40, 70, 95, 100)] + [
        _encoded_signature(qtables=ramp), _encoded_signature(quality=70, subsampling=0), "plain-string"]
    for query in members[:6]:
        assert family_members(query, members) == [same_family(query, m) for m in members]
    assert family_members(members[1], members)[:3] == [True, True, True]
