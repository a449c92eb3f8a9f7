"""The eight manipulations, pixel-exact against computations made here independently of camid, and the
CFA alignment of every crop."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from camid.errors import CamidError
from camid.core.manipulations import (MANIPULATIONS, apply, manipulation_index, manipulation_name, max_source_size,
                                 source_size)
from camid.core.patches import aligned_offsets, centre_crop, centre_offsets, random_aligned_crop

PATCH = 64


def photo_like(size: int, seed: int = 0) -> np.ndarray:
    """Smooth content plus sensor-like noise and a few hard edges (which exercise the kernel's overshoot)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = 128 + 90 * np.sin(6 * x + 3 * y)[..., None] * np.array([1.0, 0.8, 0.6])
    base[size // 3: size // 2] = 250
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def centre(img: np.ndarray, size: int) -> np.ndarray:
    top = (img.shape[0] - size) // 2 // 2 * 2
    left = (img.shape[1] - size) // 2 // 2 * 2
    return img[top:top + size, left:left + size]


# --- an independent bicubic resize: Keys' cubic (a = -0.5), separable, horizontal pass first -------------
# Pillow's documented resampling: each output pixel's centre maps to (o + 0.5) * in/out; the kernel's
# support (2) is stretched by in/out when reducing (antialiasing); the taps are normalised to sum 1;
# 8-bit images are rounded and clipped to 0..255 after each of the two passes.

def keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, a * (((x - 5) * x + 8) * x - 4), 0.0))


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    weights = np.zeros((n_out, n_in))
    for o in range(n_out):
        centre_in = (o + 0.5) * scale
        lo = max(int(centre_in - 2 * stretch + 0.5), 0)
        hi = min(int(centre_in + 2 * stretch + 0.5), n_in)
        taps = keys_cubic((np.arange(lo, hi) - centre_in + 0.5) / stretch)
        weights[o, lo:hi] = taps / taps.sum()
    return weights


def bicubic_float(img: np.ndarray, side: int) -> np.ndarray:
    """Float arithmetic throughout, rounded (halves up) and clipped after each pass."""
    def round_clip(x):
        return np.clip(np.floor(x + 0.5), 0, 255)
    rows = round_clip(np.einsum("oi,hic->hoc", resize_weights(img.shape[1], side), img.astype(np.float64)))
    return round_clip(np.einsum("oi,iwc->owc", resize_weights(img.shape[0], side), rows)).astype(np.uint8)


def bicubic_fixed_point(img: np.ndarray, side: int) -> np.ndarray:
    """The same float taps quantised to 22 fractional bits (rounded away from zero), integer sums."""
    def quantise(weights):
        scaled = weights * (1 << 22)
        return np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)

    def one_pass(weights, x, spec):
        return np.clip((np.einsum(spec, quantise(weights), x.astype(np.int64)) + (1 << 21)) >> 22, 0, 255)
    rows = one_pass(resize_weights(img.shape[1], side), img, "oi,hic->hoc")
    return one_pass(resize_weights(img.shape[0], side), rows, "oi,iwc->owc").astype(np.uint8)


RESIZES = {"resize0.5": (0.5, 128, 64), "resize0.8": (0.8, 80, 64), "resize1.5": (1.5, 43, 65),
           "resize2.0": (2.0, 32, 64)}  # name -> (s, ceil(64/s), round(ceil(64/s) * s), halves up: 64.5 -> 65)


@pytest.mark.parametrize("name", RESIZES)
def test_resize_matches_an_independent_bicubic_exactly(name):
    _, source, side = RESIZES[name]
    crop = photo_like(2 * PATCH + 10, seed=1)
    expected = centre(bicubic_fixed_point(centre(crop, source), side), PATCH)
    assert np.array_equal(apply(crop, name, PATCH), expected)


@pytest.mark.parametrize("name", RESIZES)
def test_resize_matches_a_float_bicubic_within_one_level_on_rare_ties(name):
    # Exact equality is impossible in plain floating point: Pillow quantises the taps to 22 fractional bits,
    # so a sum that is exactly n + 0.5 in floats (common when upscaling by 2) can round the other way. That
    # moves a pixel by one level, on a tiny share of pixels. (At the image border, where the truncated kernel's
    # gain exceeds 1, a first-pass tie can even reach 2 levels; the central patch keeps clear of that here.)
    _, source, side = RESIZES[name]
    crop = photo_like(2 * PATCH + 10, seed=2)
    expected = centre(bicubic_float(centre(crop, source), side), PATCH).astype(int)
    diff = np.abs(apply(crop, name, PATCH).astype(int) - expected)
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.002


@pytest.mark.parametrize("quality", [70, 90])
def test_jpeg_is_pillows_own_round_trip(quality):
    crop = photo_like(2 * PATCH, seed=3)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(centre(crop, PATCH))).save(buffer, "JPEG", quality=quality)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    got = apply(crop, f"jpeg{quality}", PATCH)
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, centre(crop, PATCH))  # really lossy


def test_jpeg70_loses_more_than_jpeg90():
    crop = photo_like(PATCH, seed=4)
    error = {q: np.abs(apply(crop, f"jpeg{q}", PATCH).astype(int) - crop).mean() for q in (70, 90)}
    assert error[70] > error[90] > 0


@pytest.mark.parametrize("gamma", [0.8, 1.2])
def test_gamma_is_the_formula_rounded(gamma):
    crop = np.random.default_rng(5).integers(0, 256, (PATCH + 6, PATCH + 6, 3), dtype=np.uint8)
    expected = np.clip(np.rint(255.0 * (centre(crop, PATCH) / 255.0) ** gamma), 0, 255).astype(np.uint8)
    assert np.array_equal(apply(crop, f"gamma{gamma}", PATCH), expected)


def test_none_is_the_central_patch_at_even_offsets():
    crop = photo_like(2 * PATCH + 6)
    got = apply(crop, None, PATCH)
    assert np.array_equal(got, crop[34:34 + PATCH, 34:34 + PATCH])  # (134 - 64) // 2 = 35, rounded down to 34
    got[:] = 0
    assert crop.any(), "apply returns a new array, not a view"


@pytest.mark.parametrize("patch", [64, 512, 480, 299])
def test_source_sizes_and_output_shape(patch):
    expected = {"resize0.5": -(-patch * 2 // 1), "resize0.8": -(-patch * 5 // 4), "resize1.5": -(-patch * 2 // 3),
                "resize2.0": -(-patch // 2)}
    for name in MANIPULATIONS:
        assert source_size(patch, name) == expected.get(name, patch)
    assert source_size(patch, None) == patch
    assert max_source_size(patch) == 2 * patch
    if patch <= 64:
        crop = photo_like(max_source_size(patch))
        for name in (None, *MANIPULATIONS):
            out = apply(crop, name, patch)
            assert out.shape == (patch, patch, 3) and out.dtype == np.uint8


def test_source_sizes_at_competition_patch():
    assert [source_size(512, f"resize{s}") for s in ("0.5", "0.8", "1.5", "2.0")] == [1024, 640, 342, 256]


def test_apply_uses_only_the_central_source():
    crop = photo_like(2 * PATCH + 20, seed=6)
    for name in (None, *MANIPULATIONS):
        assert np.array_equal(apply(crop, name, PATCH), apply(centre(crop, source_size(PATCH, name)), name, PATCH))


def test_manipulation_index_round_trip_and_errors():
    assert manipulation_index(None) == 0
    assert [manipulation_index(n) for n in MANIPULATIONS] == list(range(1, 9))
    assert all(manipulation_name(manipulation_index(n)) == n for n in (None, *MANIPULATIONS))
    with pytest.raises(CamidError, match="unknown manipulation"):
        apply(photo_like(PATCH), "blur3", PATCH)
    with pytest.raises(CamidError, match="cannot cut"):
        apply(photo_like(PATCH), "resize0.5", PATCH)


@pytest.mark.parametrize("shape,size", [((100, 120), 64), ((101, 131), 64), ((67, 64), 64), ((4000, 6000), 1024)])
def test_centre_offsets_are_even_and_central(shape, size):
    top, left = centre_offsets(shape, size)
    assert top % 2 == 0 and left % 2 == 0
    assert abs(top - (shape[0] - size) / 2) <= 1.5 and abs(left - (shape[1] - size) / 2) <= 1.5
    assert centre_crop(np.zeros((*shape, 3), np.uint8), size).shape == (size, size, 3)


def test_random_crops_are_even_and_cover_every_even_offset():
    rng = np.random.default_rng(7)
    img = np.arange(20 * 24).reshape(20, 24, 1) % 256
    seen = set()
    for _ in range(2000):
        top, left = aligned_offsets(img.shape, 12, rng)
        assert top % 2 == 0 and left % 2 == 0 and top + 12 <= 20 and left + 12 <= 24
        seen.add((top, left))
    assert seen == {(t, l) for t in range(0, 9, 2) for l in range(0, 13, 2)}
    crop = random_aligned_crop(img, 12, rng)
    top, left = divmod(int(crop[0, 0, 0]), 24)
    assert top % 2 == 0 and left % 2 == 0
