"""camid.forensics._dcscan: the 1/8-scale luma image from DC coefficients must be byte-identical to libjpeg's
1/8-scale grayscale decode (what Pillow's draft mode gives), refuse (None) whatever it does not handle, and never
crash or read out of bounds on damaged files. `camid inspect` must give the same records with it and without."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camid.forensics import inspect as inspect_module
from camid.forensics.inspect import DC_SCAN, inspect_file
from tests.test_inspect import jpeg_bytes as encode
from tests.test_jpeg_quality import imagemagick_convert

ROOT = Path(__file__).resolve().parents[1]
REAL_JPEGS = ROOT.parent / "shared" / "samples" / "real-jpeg"

CONVERT = imagemagick_convert()
built = pytest.mark.skipif(not DC_SCAN, reason="camid.forensics._dcscan is not built (see test_extension_is_built)")


def test_extension_is_built():
    assert DC_SCAN, ("camid.forensics._dcscan did not build: `pip install -e .` needs a C compiler (gcc); without it "
                     "`camid inspect` falls back to Pillow and is about half as fast")


def texture(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Smooth colour, grain, and hard edges: small and large AC coefficients, long and short Huffman codes."""
    rng = np.random.default_rng(seed)
    width, height = size
    bands = 3 if mode == "RGB" else 1
    smooth = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(smooth, dtype=np.float64)[..., :bands] + rng.normal(0, 10, (height, width, bands))
    pixels[rng.random((height, width)) < 0.02] = 255  # specks: large high-frequency coefficients
    pixels[:, : width // 7] = 0  # a black band: saturated DC values
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode)


def libjpeg_eighth(data: bytes) -> tuple[tuple[int, int], bytes]:
    """libjpeg's own 1/8-scale grayscale decode, through Pillow's draft mode."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (image.width // 8, image.height // 8))
        image.load()
        assert image.mode == "L"
        return image.size, image.tobytes()


def dc_image(data: bytes):
    from camid.forensics import _dcscan

    found = _dcscan.dc_image(data)
    return None if found is None else ((found[0], found[1]), found[2])


CASES = {
    "4:2:0 q95": (dict(quality=95, subsampling=2), (203, 157), "RGB"),
    "4:2:2 q75": (dict(quality=75, subsampling=1), (160, 96), "RGB"),
    "4:4:4 q100": (dict(quality=100, subsampling=0), (96, 80), "RGB"),
    "q1": (dict(quality=1), (120, 88), "RGB"),
    "optimized tables": (dict(quality=90, optimize=True), (144, 104), "RGB"),
    "grayscale q90": (dict(quality=90), (130, 77), "L"),
    "grayscale q100": (dict(quality=100), (64, 64), "L"),
    "restart every block": (dict(quality=92, restart_marker_blocks=1), (97, 71), "RGB"),
    "restart every 3 blocks": (dict(quality=92, restart_marker_blocks=3), (97, 71), "RGB"),
    "restart every row": (dict(quality=92, restart_marker_rows=1), (128, 72), "RGB"),
    "grayscale restarts": (dict(quality=92, restart_marker_blocks=5), (77, 51), "L"),
    "16-bit tables (SOF1)": (dict(qtables=[[300] + [2] * 63, [700] * 64]), (88, 64), "RGB"),
    "smallest": (dict(quality=90), (8, 8), "RGB"),
    "odd sizes": (dict(quality=90), (9, 17), "RGB"),
    "wide": (dict(quality=85, subsampling=2), (1000, 9), "RGB"),
}


@built
@pytest.mark.parametrize("name", CASES)
def test_identical_to_libjpeg_eighth_scale(name):
    options, size, mode = CASES[name]
    for seed in range(3):
        data = encode(texture(seed, size, mode), **options)
        assert dc_image(data) == libjpeg_eighth(data), f"{name}, seed {seed}"


@built
def test_sof1_and_restart_markers_are_really_exercised():
    sixteen = encode(texture(0, (88, 64)), qtables=[[300] + [2] * 63, [700] * 64])
    assert b"\xff\xc1" in sixteen  # 16-bit tables make libjpeg write an extended-sequential frame
    restarts = encode(texture(0, (97, 71)), restart_marker_blocks=1)
    assert b"\xff\xdd" in restarts and b"\xff\xd7" in restarts


@built
@pytest.mark.skipif(CONVERT is None, reason="ImageMagick (make imagemagick) writes the other samplings")
@pytest.mark.parametrize("sampling", ["4:1:1", "1x2,1x1,1x1", "2x2,1x2,2x1", "4x1,2x1,1x1"])
def test_other_samplings_written_by_imagemagick(tmp_path, sampling):
    source, target = tmp_path / "in.png", tmp_path / "out.jpg"
    texture(1, (150, 94)).save(source)
    subprocess.run([CONVERT, str(source), "-sampling-factor", sampling, "-quality", "93", str(target)],
                   check=True)
    data = target.read_bytes()
    assert dc_image(data) == libjpeg_eighth(data)


@built
@pytest.mark.skipif(not REAL_JPEGS.is_dir(), reason="../shared/samples/real-jpeg is not beside this checkout")
def test_real_camera_jpegs():
    """Camera firmware JPEGs: whatever the scanner accepts must be identical; it accepts nearly all of them."""
    files = sorted(REAL_JPEGS.glob("*.jpg"))
    accepted = 0
    for path in files:
        data = path.read_bytes()
        found = dc_image(data)
        if found is not None:
            accepted += 1
            assert found == libjpeg_eighth(data), path.name
    assert accepted >= 0.9 * len(files), f"only {accepted} of {len(files)} camera JPEGs took the fast path"


@built
def test_refuses_what_it_does_not_handle():
    rgb = texture(2, (120, 80))
    baseline = encode(rgb, quality=90)
    app14 = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # transform 0: RGB-coded colour
    refused = {
        "progressive": encode(rgb, quality=90, progressive=True),
        "CMYK": encode(rgb.convert("CMYK"), quality=90),
        "RGB component ids": patch_component_ids(baseline, b"RGB"),
        "Adobe transform 0": baseline[:2] + app14 + baseline[2:],
        "subsampled luma": patch_sampling(baseline, [0x11, 0x22, 0x11]),
        "no EOI": baseline[:-2],
        "garbage before EOI": baseline[:-2] + b"\x12\x34" + baseline[-2:],
        "PNG": png_bytes(rgb),
        "empty": b"",
        "SOI only": b"\xff\xd8",
    }
    for name, data in refused.items():
        assert dc_image(data) is None, name
    assert dc_image(baseline + b"trailer after EOI, as some phones write") == libjpeg_eighth(baseline)
    with pytest.raises(TypeError):
        dc_image("not bytes")


def patch_component_ids(data: bytes, ids: bytes) -> bytes:
    sof = data.index(b"\xff\xc0")
    out = bytearray(data)
    for i, component_id in enumerate(ids):
        out[sof + 10 + 3 * i] = component_id
    sos = data.index(b"\xff\xda")
    for i, component_id in enumerate(ids):
        out[sos + 5 + 2 * i] = component_id
    return bytes(out)


def patch_sampling(data: bytes, factors: list[int]) -> bytes:
    sof = data.index(b"\xff\xc0")
    out = bytearray(data)
    for i, value in enumerate(factors):
        out[sof + 11 + 3 * i] = value
    return bytes(out)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@built
def test_truncated_anywhere_is_refused():
    data = encode(texture(3, (64, 48)), quality=95, restart_marker_blocks=2)
    for cut in range(len(data) - 2):
        assert dc_image(data[:cut]) is None, cut


@built
def test_damaged_bytes_never_crash():
    """Random damage in headers and scan data: None, or an image of the frame's 1/8 size; never a crash."""
    rng = np.random.default_rng(0)
    for options in (dict(quality=95), dict(quality=80, restart_marker_blocks=1), dict(quality=100, subsampling=0)):
        data = encode(texture(4, (72, 56)), **options)
        for _ in range(300):
            damaged = bytearray(data)
            for at in rng.integers(2, len(data), rng.integers(1, 6)):
                damaged[at] = rng.integers(0, 256)
            found = dc_image(bytes(damaged))
            if found is not None:
                (width, height), pixels = found
                assert len(pixels) == width * height


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory) -> dict[str, Path]:
    """Photos big enough (>= 2048 px on each side) for inspect's draft decode to be at 1/8 scale."""
    folder = tmp_path_factory.mktemp("dcscan-big")
    image = texture(5, (2048, 2056))
    files = {"big": folder / "big.jpg", "big_gray": folder / "big_gray.jpg", "just_small": folder / "small.jpg",
             "truncated": folder / "truncated.jpg", "progressive": folder / "progressive.jpg"}
    image.save(files["big"], "JPEG", quality=95)
    image.convert("L").save(files["big_gray"], "JPEG", quality=90)
    image.crop((0, 0, 2048, 2047)).save(files["just_small"], "JPEG", quality=95)  # 2047 // 256 = 7: scale 1/4
    files["truncated"].write_bytes(files["big"].read_bytes()[:-50_000])
    image.save(files["progressive"], "JPEG", quality=95, progressive=True)
    return files


class CountingScanner:
    def __init__(self, scanner):
        self.scanner, self.calls = scanner, 0

    def dc_image(self, data):
        self.calls += 1
        return self.scanner.dc_image(data)


@built
def test_inspect_records_identical_with_and_without_the_scanner(big_jpegs, monkeypatch):
    counter = CountingScanner(inspect_module._dcscan)
    monkeypatch.setattr(inspect_module, "_dcscan", counter)
    for name, path in big_jpegs.items():
        before = counter.calls
        fast, slow = inspect_file(path), inspect_file(path, dc_scan=False)
        assert fast == slow, name
        used = counter.calls > before
        assert used == (name != "just_small"), name  # scale 1/4 there: Pillow decodes
    assert inspect_file(big_jpegs["truncated"])["error"].startswith("truncated:")
