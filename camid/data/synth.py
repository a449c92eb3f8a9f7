"""The virtual camera zoo (`camid synth`): real JPEGs from simulated imaging pipelines.

Every camera photographs scenes drawn from one shared procedural distribution, so content says nothing about
the camera; only the imaging pipeline differs, the way it does between real cameras:

    scene (linear RGB) -> optics blur -> white-balance-scaled sensor response -> device PRNU -> Bayer mosaic
    -> shot + read noise, ADC -> demosaicing -> white balance -> chroma noise reduction -> tone curve
    -> unsharp mask -> orientation -> JPEG (firmware quantization tables, chroma subsampling) + EXIF

Each camera model has a `Pipeline` (defaults in `DEFAULT_PIPELINES`, keyed by catalog label; any field can be
overridden per label in params.yaml `synth.pipelines`). Each model has `synth.devices_per_model` devices
(default 4: the split stage needs at least three, so that train, validation and test each get devices of their
own), each with its own serial and fixed sensor pattern. `Aster-A1` and `Aster-A1s` differ only in firmware (tone curve and JPEG tables).

A `bad_fraction` share of files is deliberately spoiled the ways crawled photos are (`BAD_KINDS`); the
manifest records why, the file names don't.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import logging
import re
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from camid.core import fileio
from camid.config import Camera, Catalog, ConfigError, SynthParams

log = logging.getLogger(__name__)

MANIFEST = "synth_manifest.csv"
CFA_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
DEMOSAIC_METHODS = ("bilinear", "edge_directed", "nearest", "smooth_hue")
SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}
# The fields a firmware update can change; everything else is the sensor and its processing hardware.
FIRMWARE_FIELDS = ("gamma", "contrast", "jpeg_quality", "jpeg_tweak", "firmware")

# What the filter stage must reject, one rule each: EXIF Software, quality, size, EXIF Model, decoding, phash.
BAD_KINDS = ("edited", "recompressed", "resized", "stripped", "truncated", "duplicate")
EDITORS = ("Adobe Photoshop CC 2017 (Windows)", "Adobe Photoshop Lightroom Classic 7.3 (Windows)", "GIMP 2.10.4")


@dataclass(frozen=True)
class Pipeline:
    """One camera model's imaging pipeline. Intensities are fractions of sensor full scale."""

    # sensor
    cfa: str = "RGGB"                 # Bayer pattern, top-left 2x2 block read row by row
    bits: int = 10                    # ADC depth
    blur: float = 0.5                 # optics + anti-aliasing filter, Gaussian sigma in pixels
    prnu: float = 0.01                # std of the device's multiplicative per-pixel sensitivity pattern
    read_noise: float = 0.002         # std of additive read noise
    shot_noise: float = 4e-4          # photon noise variance per unit signal (1 / full well)
    # image signal processor
    demosaic: str = "bilinear"        # one of DEMOSAIC_METHODS
    wb: tuple[float, float, float] = (1.9, 1.0, 1.5)  # white balance gains (R, G, B)
    chroma_nr: float = 0.0            # chroma noise reduction, Gaussian sigma in pixels (0: off)
    sharpen_amount: float = 0.5       # unsharp mask on luma
    sharpen_radius: float = 1.0
    subsampling: str = "4:2:0"        # JPEG chroma subsampling
    # firmware (FIRMWARE_FIELDS)
    gamma: float = 2.2                # tone curve: x ** (1 / gamma) ...
    contrast: float = 0.0             # ... then an S-curve of this strength (0: none, < 1)
    jpeg_quality: int = 96            # IJG quality the firmware's quantization tables are scaled from
    jpeg_tweak: int = 0               # 0: standard IJG tables; else the seed of the vendor's +-1 hand tuning
    firmware: str = "{model} Firmware 1.0.0"  # EXIF Software; {model} is the EXIF Model

    def __post_init__(self):
        if self.cfa not in CFA_PATTERNS:
            raise ConfigError(f"synth pipeline cfa {self.cfa!r}: choose one of {', '.join(CFA_PATTERNS)}")
        if self.demosaic not in DEMOSAIC_METHODS:
            raise ConfigError(f"synth pipeline demosaic {self.demosaic!r}: choose one of {', '.join(DEMOSAIC_METHODS)}")
        if self.subsampling not in SUBSAMPLING:
            raise ConfigError(f"synth pipeline subsampling {self.subsampling!r}: choose one of {', '.join(SUBSAMPLING)}")
        if not 94 <= self.jpeg_quality <= 100:
            raise ConfigError(f"synth pipeline jpeg_quality {self.jpeg_quality}: camera originals need 94..100")
        if not 0 <= self.contrast < 1:
            raise ConfigError(f"synth pipeline contrast {self.contrast}: must be in [0, 1) to keep the curve monotone")
        if len(self.wb) != 3:
            raise ConfigError(f"synth pipeline wb {self.wb!r}: three gains (R, G, B)")


# A1 / A1s: one sensor and ISP, two firmware releases (tone curve + JPEG tables), like Nikon D70 / D70s;
# A1s is built from A1 so that they cannot drift apart in anything else.
_ASTER_A1 = dict(cfa="RGGB", demosaic="edge_directed", blur=0.5, prnu=0.010, read_noise=0.0025, shot_noise=5e-4,
                 wb=(2.0, 1.0, 1.6), sharpen_amount=0.7, sharpen_radius=1.0, subsampling="4:2:0",
                 gamma=2.2, contrast=0.0, jpeg_quality=95, jpeg_tweak=0, firmware="A1 Firmware 1.0.3")

DEFAULT_PIPELINES: dict[str, dict] = {
    "Aster-A1": _ASTER_A1,
    "Aster-A1s": {**_ASTER_A1, "gamma": 2.4, "contrast": 0.35, "jpeg_quality": 97, "jpeg_tweak": 11,
                  "firmware": "A1s Firmware 2.1.0"},
    "Boreal-B7": dict(cfa="BGGR", demosaic="bilinear", blur=0.4, prnu=0.015, read_noise=0.005, shot_noise=1.2e-3,
                      wb=(1.7, 1.0, 1.9), sharpen_amount=0.0, subsampling="4:2:0",
                      gamma=2.0, contrast=0.1, jpeg_quality=95, jpeg_tweak=0, firmware="B7 v4.2 build 0917"),
    "Corvid-C3": dict(cfa="GRBG", demosaic="nearest", blur=0.7, prnu=0.008, read_noise=0.0015, shot_noise=3e-4,
                      wb=(2.1, 1.0, 1.4), sharpen_amount=1.2, sharpen_radius=0.8, subsampling="4:2:2",
                      gamma=2.2, contrast=0.2, jpeg_quality=96, jpeg_tweak=3, firmware="C3 FW 3.01"),
    "Dune-D5": dict(cfa="GBRG", demosaic="smooth_hue", blur=0.6, prnu=0.012, read_noise=0.003, shot_noise=6e-4,
                    wb=(1.8, 1.0, 1.7), sharpen_amount=0.3, sharpen_radius=1.6, subsampling="4:4:4",
                    gamma=2.3, contrast=0.0, jpeg_quality=98, jpeg_tweak=0, bits=12, firmware="Dune D5 Ver.1.10"),
    "Ember-E2": dict(cfa="RGGB", demosaic="bilinear", blur=0.3, prnu=0.006, read_noise=0.001, shot_noise=2e-4,
                     wb=(1.95, 1.0, 1.55), chroma_nr=1.5, sharpen_amount=0.9, sharpen_radius=1.2, subsampling="4:2:0",
                     gamma=2.2, contrast=0.25, jpeg_quality=96, jpeg_tweak=5, firmware="E2-FW 0.9.8"),
    "Fjord-F9": dict(cfa="BGGR", demosaic="edge_directed", blur=0.8, prnu=0.014, read_noise=0.006, shot_noise=1.5e-3,
                     wb=(2.2, 1.0, 1.3), sharpen_amount=0.4, sharpen_radius=0.7, subsampling="4:4:4",
                     gamma=2.1, contrast=0.0, jpeg_quality=97, jpeg_tweak=0, firmware="F9 System 5.0.1"),
    "Gale-G4": dict(cfa="GRBG", demosaic="smooth_hue", blur=1.0, prnu=0.009, read_noise=0.002, shot_noise=4e-4,
                    wb=(1.85, 1.0, 1.75), chroma_nr=1.0, sharpen_amount=1.6, sharpen_radius=1.4, subsampling="4:2:0",
                    gamma=2.2, contrast=0.15, jpeg_quality=96, jpeg_tweak=7, firmware="G4 Firmware 1.2"),
    "Halo-H8": dict(cfa="GBRG", demosaic="nearest", blur=0.5, prnu=0.011, read_noise=0.0035, shot_noise=8e-4,
                    wb=(2.05, 1.0, 1.45), sharpen_amount=0.0, subsampling="4:2:2",
                    gamma=2.4, contrast=0.3, jpeg_quality=98, jpeg_tweak=2, firmware="H8 OS 8.1.0"),
    "Iris-I6": dict(cfa="RGGB", demosaic="edge_directed", blur=0.4, prnu=0.007, read_noise=0.0012, shot_noise=2.5e-4,
                    wb=(1.9, 1.0, 1.6), sharpen_amount=1.4, sharpen_radius=1.0, subsampling="4:4:4",
                    gamma=2.2, contrast=0.1, jpeg_quality=99, jpeg_tweak=0, firmware="I6 Firmware 6.0.2"),
}


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())


def _derived_pipeline(label: str) -> dict:
    """A deterministic pipeline for a label with no built-in default (e.g. a catalog of your own)."""
    rng = np.random.default_rng(_stable_hash(label))
    return dict(
        cfa=str(rng.choice(CFA_PATTERNS)), demosaic=str(rng.choice(DEMOSAIC_METHODS)),
        blur=round(float(rng.uniform(0.3, 1.0)), 2), prnu=round(float(rng.uniform(0.006, 0.015)), 4),
        read_noise=round(float(rng.uniform(0.001, 0.006)), 4), shot_noise=round(float(rng.uniform(2e-4, 1.5e-3)), 5),
        wb=(round(float(rng.uniform(1.7, 2.2)), 2), 1.0, round(float(rng.uniform(1.3, 1.9)), 2)),
        sharpen_amount=round(float(rng.uniform(0, 1.6)), 2), sharpen_radius=round(float(rng.uniform(0.7, 1.6)), 2),
        subsampling=str(rng.choice(list(SUBSAMPLING))), gamma=round(float(rng.uniform(2.0, 2.4)), 2),
        contrast=round(float(rng.uniform(0, 0.35)), 2), jpeg_quality=int(rng.integers(95, 99)),
        jpeg_tweak=int(rng.integers(0, 20)),
    )


def pipeline_for(label: str, overrides: dict | None = None) -> Pipeline:
    """The pipeline of camera `label`: the built-in default (or one derived from the label), then `overrides`."""
    fields = dict(DEFAULT_PIPELINES.get(label) or _derived_pipeline(label))
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Pipeline)})
    if unknown:
        raise ConfigError(f"synth.pipelines.{label}: unknown field(s) {', '.join(unknown)}")
    fields.update(overrides)
    if "wb" in fields:
        fields["wb"] = tuple(float(g) for g in fields["wb"])
    return Pipeline(**fields)


# ------------------------------------------------------------------------------------- the same bytes on every CPU
# numpy picks its SIMD kernels for the CPU it runs on (AVX2, AVX-512, ...), and its float32 sin and power kernels
# round differently on each: the zoo came out as other bytes on another CPU (17 of the default zoo's 640 files
# with numpy's kernels beyond the baseline turned off). Such functions are computed here in float64, whose
# last-place differences almost never survive the rounding to float32; the luma weights are plain products and
# sums (each exactly rounded, the same everywhere), not `@`, whose OpenBLAS kernel is also chosen by CPU.
# tests/test_synth.py makes a zoo with numpy's and OpenBLAS's SIMD kernels off and compares the bytes.

def _f32(function, x, *args) -> np.ndarray:
    """`function` (a numpy ufunc such as np.sin or np.power) of float32 `x` computed in float64, as float32."""
    return function(np.asarray(x, dtype=np.float64), *args).astype(np.float32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) luma with the Rec. 601 weights (_LUMA), product by product in a fixed order."""
    return rgb[..., 0] * _LUMA[0] + rgb[..., 1] * _LUMA[1] + rgb[..., 2] * _LUMA[2]


# ---------------------------------------------------------------------------------------------------- scenes

def _band_limited_noise(rng: np.random.Generator, h: int, w: int, beta: float) -> np.ndarray:
    """Zero-mean, unit-std noise with a 1/f**beta amplitude spectrum (natural-image-like texture)."""
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    f2 = fy * fy + fx * fx
    f2[0, 0] = 1.0
    spectrum = np.fft.rfft2(rng.standard_normal((h, w), dtype=np.float32)) * _f32(np.power, f2, -beta / 2)
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(h, w))
    return field / (field.std() + np.float32(1e-12))


def render_scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random scene in linear RGB (h, w, 3), float32, roughly [0, 1.5]: gradients, textures, shapes, edges.

    One distribution for every camera: the camera never influences what it photographs.
    """
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    # Illumination: a smooth gradient over a random base colour.
    base = rng.uniform(0.1, 0.8, 3).astype(np.float32)
    light = 1 + rng.uniform(-0.6, 0.6) * (xx - 0.5) + rng.uniform(-0.6, 0.6) * (yy - 0.5)
    img = base * light[..., None]
    # Texture: band-limited noise, from fine grain to large blotches: coloured under the objects ...
    tex = _band_limited_noise(rng, h, w, rng.uniform(0.8, 2.0))
    img = img + rng.uniform(0.02, 0.25) * tex[..., None] * rng.uniform(0.3, 1.0, 3).astype(np.float32)
    # ... and as surface detail over everything.
    surface = np.float32(rng.uniform(0.03, 0.3)) * _band_limited_noise(rng, h, w, rng.uniform(0.8, 2.0))
    # Objects: ellipses, rectangles and half-planes with sharp or soft edges, some striped (fine detail).
    for _ in range(rng.integers(4, 13)):
        kind = rng.integers(3)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        size = rng.uniform(0.05, 0.4) * min(h, w)
        softness = 0.5 if rng.random() < 0.6 else rng.uniform(1.5, 6.0)
        aspect = rng.uniform(0.4, 2.5)
        theta = rng.uniform(0, 2 * np.pi)
        # Work inside the shape's bounding window (half-planes cover the whole frame).
        reach = size * max(aspect, 1) * 1.5 + 2 * softness if kind < 2 else np.inf
        y0, y1 = int(max(0, cy - reach)), int(min(h, cy + reach + 1))
        x0, x1 = int(max(0, cx - reach)), int(min(w, cx + reach + 1))
        if y0 >= y1 or x0 >= x1:
            continue
        py = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
        px = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
        u = px * np.float32(np.cos(theta)) + py * np.float32(np.sin(theta))
        v = py * np.float32(np.cos(theta)) - px * np.float32(np.sin(theta)) if kind < 2 else None
        if kind == 0:
            dist = (np.sqrt((u / size) ** 2 + (v / (size * aspect)) ** 2) - 1) * size * min(aspect, 1)
        elif kind == 1:
            dist = np.maximum(np.abs(u) - size, np.abs(v) - size * aspect)
        else:
            dist = u
        alpha = np.clip(0.5 - dist / np.float32(2 * softness), 0, 1)
        rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
        if not len(rows):
            continue
        # Blend only where the object is (the frame's costliest step otherwise).
        ya, yb, xa, xb = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        alpha, py, px = alpha[ya:yb, xa:xb, None], py[ya:yb], px[:, xa:xb]
        y0, y1, x0, x1 = y0 + ya, y0 + yb, x0 + xa, x0 + xb
        colour = _f32(np.power, rng.uniform(0.0, 1.0, 3).astype(np.float32), 1.5)
        fill = colour.mean() + np.float32(rng.uniform(0.2, 1.0)) * (colour - colour.mean())
        if rng.random() < 0.35:
            freq, phi = rng.uniform(0.03, 0.45), rng.uniform(0, 2 * np.pi)
            stripes = 0.5 + 0.5 * _f32(np.sin, np.float32(2 * np.pi * freq) * (px * np.float32(np.cos(phi))
                                                                              + py * np.float32(np.sin(phi))))
            fill = fill * (0.3 + 0.7 * stripes[..., None])
        window = img[y0:y1, x0:x1]
        window += alpha * (fill - window)
    img *= 1 + surface[..., None]
    # Exposure: dark scenes to blown highlights.
    img = np.clip(img, 0, None) * np.float32(np.exp(rng.uniform(np.log(0.35), np.log(2.2))))
    return img


# ------------------------------------------------------------------------------------------ sensor and ISP

def _cfa_masks(cfa: str, h: int, w: int) -> np.ndarray:
    """(3, h, w) boolean masks: where the mosaic samples R, G and B."""
    channel = np.array(["RGB".index(c) for c in cfa]).reshape(2, 2)
    grid = channel[np.arange(h)[:, None] % 2, np.arange(w)[None, :] % 2]
    return np.stack([grid == c for c in range(3)])


def prnu_pattern(serial: str, h: int, w: int, strength: float) -> np.ndarray:
    """The device's fixed multiplicative sensitivity pattern, 1 + K, seeded by its serial number."""
    rng = np.random.default_rng(_stable_hash(serial))
    k = rng.standard_normal((h, w)).astype(np.float32)
    # Slight spatial correlation between neighbouring photosites, as measured PRNU has.
    k = 0.8 * k + 0.2 * ndimage.uniform_filter(k, 3, mode="mirror")
    return 1 + strength * k / k.std()


_K_G = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32) / 4
_K_RB_1D = np.array([0.5, 1, 0.5], np.float32)  # the R/B kernel [[1,2,1],[2,4,2],[1,2,1]]/4 is separable


def _interpolate_rb(samples: np.ndarray) -> np.ndarray:
    """Bilinear fill of a quarter-density (R or B) sample plane."""
    rows = ndimage.correlate1d(samples, _K_RB_1D, axis=0, mode="mirror")
    return ndimage.correlate1d(rows, _K_RB_1D, axis=1, mode="mirror")


def _bilinear(mosaic: np.ndarray, masks: np.ndarray) -> np.ndarray:
    out = np.empty(mosaic.shape + (3,), np.float32)
    out[..., 1] = ndimage.convolve(mosaic * masks[1], _K_G, mode="mirror")
    for c in (0, 2):
        out[..., c] = _interpolate_rb(mosaic * masks[c])
    return out


def _nearest(mosaic: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Naive block replication: each 2x2 block's R and B fill the block; G from the same row of the block."""
    h, w = mosaic.shape
    ys, xs = np.arange(h), np.arange(w)
    out = np.empty((h, w, 3), np.float32)
    for c in (0, 2):
        (oy,), (ox,) = np.nonzero(masks[c][:2, :2])
        rows = np.minimum((ys & ~1) + oy, h - 1)
        cols = np.minimum((xs & ~1) + ox, w - 1)
        out[..., c] = mosaic[rows[:, None], cols[None, :]]
    partner = np.minimum(xs ^ 1, w - 1)
    out[..., 1] = np.where(masks[1], mosaic, mosaic[:, partner])
    return out


def _edge_directed(mosaic: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Hamilton-Adams-like: green along the smoother direction with a Laplacian correction, then R/B by
    bilinear interpolation of colour differences."""
    h, w = mosaic.shape
    p = np.pad(mosaic, 2, mode="reflect")

    def at(dy, dx):
        return p[2 + dy:2 + dy + h, 2 + dx:2 + dx + w]

    lap_h = 2 * mosaic - at(0, -2) - at(0, 2)
    lap_v = 2 * mosaic - at(-2, 0) - at(2, 0)
    g_h = (at(0, -1) + at(0, 1)) / 2 + lap_h / 4
    g_v = (at(-1, 0) + at(1, 0)) / 2 + lap_v / 4
    d_h = np.abs(at(0, -1) - at(0, 1)) + np.abs(lap_h)
    d_v = np.abs(at(-1, 0) - at(1, 0)) + np.abs(lap_v)
    green = np.where(d_h < d_v, g_h, np.where(d_v < d_h, g_v, (g_h + g_v) / 2))
    green = np.where(masks[1], mosaic, green)
    out = np.empty((h, w, 3), np.float32)
    out[..., 1] = green
    for c in (0, 2):
        out[..., c] = green + _interpolate_rb((mosaic - green) * masks[c])
    return out


def _smooth_hue(mosaic: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Bilinear, then low-passed colour differences (a smooth-hue variant): fewer colour fringes, softer chroma."""
    out = _bilinear(mosaic, masks)
    for c in (0, 2):
        out[..., c] = out[..., 1] + ndimage.gaussian_filter(out[..., c] - out[..., 1], 0.8, mode="mirror")
    return out


_TONE_LEVELS = 4096


@functools.lru_cache(maxsize=None)
def tone_curve(gamma: float, contrast: float) -> np.ndarray:
    """The firmware's tone curve as a lookup table over linear [0, 1]: a gamma, then an optional S-curve."""
    x = _f32(np.power, np.linspace(0, 1, _TONE_LEVELS, dtype=np.float32), 1 / gamma)
    return (x - contrast * _f32(np.sin, 2 * np.pi * x) / (2 * np.pi)).astype(np.float32)


DEMOSAIC = {"bilinear": _bilinear, "edge_directed": _edge_directed, "nearest": _nearest, "smooth_hue": _smooth_hue}
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def develop(scene: np.ndarray, pipe: Pipeline, prnu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Take a photo of `scene` (linear RGB at sensor size) with this pipeline: uint8 RGB, sensor orientation."""
    h, w, _ = scene.shape
    wb = np.array(pipe.wb, np.float32)
    if pipe.blur > 0:
        scene = ndimage.gaussian_filter(scene, (pipe.blur, pipe.blur, 0), mode="mirror", truncate=3.0)
    masks = _cfa_masks(pipe.cfa, h, w)
    # The sensor sees the scene through its colour filters, whose unequal sensitivities white balance undoes.
    raw = np.einsum("hwc,chw->hw", scene / wb, masks.astype(np.float32)) * prnu[:h, :w]
    raw = np.clip(raw, 0, 1)
    sigma = np.sqrt(pipe.shot_noise * raw + pipe.read_noise ** 2)
    raw = raw + sigma * rng.standard_normal((h, w), dtype=np.float32)
    levels = 2 ** pipe.bits - 1
    raw = np.round(np.clip(raw, 0, 1) * levels).astype(np.float32) / levels
    rgb = DEMOSAIC[pipe.demosaic](raw, masks)
    rgb = np.clip(rgb * wb, 0, 1)
    if pipe.chroma_nr > 0:
        luma = _luma(rgb)
        chroma = ndimage.gaussian_filter(rgb - luma[..., None], (pipe.chroma_nr, pipe.chroma_nr, 0), mode="mirror")
        rgb = np.clip(luma[..., None] + chroma, 0, 1)
    tone = tone_curve(pipe.gamma, pipe.contrast)[np.round(rgb * (_TONE_LEVELS - 1)).astype(np.int32)]
    if pipe.sharpen_amount > 0:
        luma = _luma(tone)
        detail = luma - ndimage.gaussian_filter(luma, pipe.sharpen_radius, mode="mirror")
        tone = tone + pipe.sharpen_amount * detail[..., None]
    return np.clip(np.round(tone * 255), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------- JPEG

_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])
_IJG_CHROMA = np.array([
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32)


def ijg_tables(quality: int) -> list[np.ndarray]:
    """libjpeg's standard luma and chroma tables scaled to `quality` (natural row-major order)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [np.clip((base * scale + 50) // 100, 1, 255) for base in (_IJG_LUMA, _IJG_CHROMA)]


def firmware_tables(pipe: Pipeline) -> list[list[int]]:
    """The firmware's quantization tables: IJG tables at `jpeg_quality`, hand-tuned by +-1 if `jpeg_tweak`.

    A +-1 tuning keeps the tables within a step or two of their IJG quality, so ImageMagick's estimate
    (`identify -format %Q`) stays at the camera-original level (>= 94).
    """
    tables = ijg_tables(pipe.jpeg_quality)
    if pipe.jpeg_tweak:
        rng = np.random.default_rng(pipe.jpeg_tweak)
        tables = [np.clip(t + rng.integers(-1, 2, 64) * (np.arange(64) > 0), 1, 255) for t in tables]
    return [t.astype(int).tolist() for t in tables]


def exif_bytes(make: str, model: str, software: str, when: datetime, serial: str, height: int, width: int) -> bytes:
    exif = Image.Exif()
    stamp = when.strftime("%Y:%m:%d %H:%M:%S")
    exif[0x010F] = make
    exif[0x0110] = model
    exif[0x0131] = software
    exif[0x0132] = stamp
    exif[0x0112] = 1  # pixels are stored upright: portrait shots are rotated in the camera
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = stamp   # DateTimeOriginal
    sub[0xA002] = width   # PixelXDimension
    sub[0xA003] = height  # PixelYDimension
    sub[0xA431] = serial  # BodySerialNumber
    return exif.tobytes()


def encode_jpeg(pixels: np.ndarray, exif: bytes | None, *, qtables=None, subsampling: str = "4:2:0",
                quality: int | None = None) -> bytes:
    buf = io.BytesIO()
    options = {"subsampling": SUBSAMPLING[subsampling]}
    if qtables is not None:
        options["qtables"] = qtables
    else:
        options["quality"] = quality
    if exif:
        options["exif"] = exif
    Image.fromarray(pixels).save(buf, "JPEG", **options)
    return buf.getvalue()


# -------------------------------------------------------------------------------------------- the zoo

def exif_model_name(pattern: str) -> str:
    """A concrete EXIF Model string that matches a catalog glob pattern ("C3-*" -> "C3-1200")."""
    name = re.sub(r"\[!?(.)[^\]]*\]", r"\1", pattern)
    return name.replace("*", "1200").replace("?", "0")


@dataclass(frozen=True)
class Device:
    camera: Camera
    index: int
    serial: str
    model: str       # EXIF Model
    pipeline: Pipeline


def devices_of(camera: Camera, pipe: Pipeline, seed: int, count: int) -> list[Device]:
    devices = []
    for d in range(count):
        rng = np.random.default_rng([seed, _stable_hash(camera.label), d, 1])
        prefix = re.sub(r"[^A-Z0-9]", "", camera.label.upper())[:4]
        serial = f"{prefix}{rng.integers(10 ** 7):07d}"
        model = exif_model_name(camera.models[d % len(camera.models)])
        if not camera.matches_model(model):
            raise ConfigError(f"camera {camera.label}: cannot make an EXIF Model string from pattern {camera.models[d % len(camera.models)]!r}")
        devices.append(Device(camera, d, serial, model, pipe))
    return devices


def _bad_plan(catalog: Catalog, params: SynthParams) -> dict[str, dict[int, str]]:
    """Which file slots of each camera are spoiled, and how: a `bad_fraction` share, spread over cameras,
    the kinds dealt round-robin so every kind appears."""
    per_camera = params.devices_per_model * params.images_per_device
    total_bad = int(round(params.bad_fraction * per_camera * len(catalog)))
    counts = [total_bad // len(catalog) + (i < total_bad % len(catalog)) for i in range(len(catalog))]
    plan, k = {}, 0
    for camera, count in zip(catalog.cameras, counts):
        rng = np.random.default_rng([params.seed, _stable_hash(camera.label), 2])
        slots = sorted(rng.choice(per_camera, size=min(count, per_camera), replace=False).tolist())
        plan[camera.label] = {}
        for slot in slots:
            plan[camera.label][slot] = BAD_KINDS[k % len(BAD_KINDS)]
            k += 1
    return plan


def _spoil(kind: str, good: bytes, pixels: np.ndarray, device: Device, when: datetime, rng: np.random.Generator,
           earlier_good: list[tuple[Path, str]]) -> tuple[bytes, str, str]:
    """Make a bad file of `kind` from a photo; returns its bytes, the manifest reason and the device serial
    its EXIF names (a duplicate's is the original's). `earlier_good`: the camera's good photos written so far
    (their files, read back only for a duplicate, so memory does not grow with the zoo) and serials."""
    pipe, camera = device.pipeline, device.camera
    h, w = pixels.shape[:2]
    tables = firmware_tables(pipe)
    if kind == "duplicate" and earlier_good:
        original, serial = earlier_good[int(rng.integers(len(earlier_good)))]
        return Path(original).read_bytes(), "duplicate", serial
    if kind == "duplicate":
        kind = "stripped"  # no earlier original of this camera to copy
    if kind == "edited":
        editor = str(rng.choice(EDITORS))
        curved = np.clip(255 * (pixels / 255.0) ** rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
        exif = exif_bytes(camera.make, device.model, editor, when, device.serial, h, w)
        data, reason = encode_jpeg(curved, exif, quality=int(rng.integers(95, 99)), subsampling="4:4:4"), f"edited: {editor}"
    elif kind == "recompressed":
        quality = int(rng.integers(75, 86))
        exif = exif_bytes(camera.make, device.model, pipe.firmware.format(model=device.model), when, device.serial, h, w)
        data, reason = encode_jpeg(pixels, exif, quality=quality), f"recompressed: quality {quality}"
    elif kind == "resized":
        scale = rng.uniform(0.5, 0.9)
        size = (max(8, round(w * scale)), max(8, round(h * scale)))
        small = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC))
        exif = exif_bytes(camera.make, device.model, pipe.firmware.format(model=device.model), when, device.serial, h, w)
        data, reason = encode_jpeg(small, exif, qtables=tables, subsampling=pipe.subsampling), f"resized: {h}x{w} -> {size[1]}x{size[0]}"
    elif kind == "stripped":
        data, reason = encode_jpeg(pixels, None, qtables=tables, subsampling=pipe.subsampling), "stripped: no EXIF"
    elif kind == "truncated":
        keep = int(len(good) * rng.uniform(0.4, 0.9))
        data, reason = good[:keep], f"truncated: {keep} of {len(good)} bytes"
    else:
        raise ValueError(f"unknown bad kind {kind!r}")
    return data, reason, device.serial


def _shoot(device: Device, slot: int, seed: int, prnu: np.ndarray, portrait: bool):
    """One photo: pixels in stored orientation, the good JPEG bytes, its time stamp, and the photo's rng.
    `portrait`: the camera was held the other way, so the stored pixels are rotated by 90 degrees."""
    camera, pipe = device.camera, device.pipeline
    rng = np.random.default_rng([seed, _stable_hash(camera.label), device.index, slot, 0])
    h, w = camera.sizes[int(rng.integers(len(camera.sizes)))]
    scene = render_scene(rng, h, w)
    pixels = develop(scene, pipe, prnu, rng)
    if portrait:
        pixels = np.ascontiguousarray(np.rot90(pixels, 1 if rng.random() < 0.5 else 3))
    when = datetime(2017, 1, 1) + timedelta(seconds=int(rng.integers(0, 365 * 24 * 3600)))
    ph, pw = pixels.shape[:2]
    software = pipe.firmware.format(model=device.model)
    exif = exif_bytes(camera.make, device.model, software, when, device.serial, ph, pw)
    good = encode_jpeg(pixels, exif, qtables=firmware_tables(pipe), subsampling=pipe.subsampling)
    return pixels, good, when, rng


def synthesize(out: Path, catalog: Catalog, params: SynthParams, progress: bool = True) -> pd.DataFrame:
    """Build the virtual camera zoo in `out` (replaced whole): `train/<label>/<label>_NNNN.jpg` and
    `synth_manifest.csv` (file, label, device, bad). Returns the manifest. Deterministic for a seed."""
    out = Path(out)
    if params.devices_per_model < 1:
        raise ConfigError(f"synth.devices_per_model must be >= 1, got {params.devices_per_model}")
    if params.images_per_device < 1:
        raise ConfigError(f"synth.images_per_device must be >= 1, got {params.images_per_device}")
    if not 0 <= params.bad_fraction < 1:
        raise ConfigError(f"synth.bad_fraction must be in [0, 1), got {params.bad_fraction}")
    unknown = sorted(set(params.pipelines or {}) - set(catalog.labels))
    if unknown:
        raise ConfigError(f"synth.pipelines names camera(s) not in the {catalog.name!r} catalog: {', '.join(unknown)}")
    plan = _bad_plan(catalog, params)
    rows = []
    with fileio.atomic_dir(out) as tmp:
        for camera in catalog.cameras:
            pipe = pipeline_for(camera.label, (params.pipelines or {}).get(camera.label))
            # The sensor is the largest native size; smaller sizes are crops of it, sharing its PRNU.
            sensor = (max(h for h, _ in camera.sizes), max(w for _, w in camera.sizes))
            folder = tmp / "train" / camera.label
            earlier_good: list[tuple[Path, str]] = []
            per_device = params.images_per_device
            bar = tqdm(total=params.devices_per_model * per_device, desc=camera.label, unit="img",
                       disable=not progress)
            for device in devices_of(camera, pipe, params.seed, params.devices_per_model):
                prnu = prnu_pattern(device.serial, *sensor, pipe.prnu)
                for i in range(per_device):
                    slot = device.index * per_device + i
                    # Cameras used in both orientations alternate, so every device has both.
                    portrait = camera.rot90 and (i + device.index) % 2 == 1
                    pixels, good, when, rng = _shoot(device, slot, params.seed, prnu, portrait)
                    kind = plan[camera.label].get(slot)
                    name = f"{camera.label}_{slot + 1:04d}.jpg"
                    if kind is None:
                        data, reason, serial = good, "", device.serial
                        earlier_good.append((folder / name, serial))
                    else:
                        data, reason, serial = _spoil(kind, good, pixels, device, when, rng, earlier_good)
                    fileio.write_bytes(folder / name, data)
                    rows.append({"file": f"train/{camera.label}/{name}", "label": camera.label,
                                 "device": serial, "bad": reason})
                    bar.update()
            bar.close()
        manifest = pd.DataFrame(rows, columns=["file", "label", "device", "bad"])
        fileio.write_text(tmp / MANIFEST, manifest.to_csv(index=False))
    n_bad = int((manifest["bad"] != "").sum())
    log.info("synthesised %d files (%d bad) for %d cameras in %s", len(manifest), n_bad, len(catalog), out)
    return manifest


# ---------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (replaced whole)")
    parser.add_argument("--images-per-device", type=int, help="override synth.images_per_device")
    parser.add_argument("--seed", type=int, help="override synth.seed")
    parser.add_argument("--bad-fraction", type=float, help="override synth.bad_fraction")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from camid.config import load_params

    params = load_params()
    synth = params.synth
    overrides = {"images_per_device": args.images_per_device, "seed": args.seed, "bad_fraction": args.bad_fraction}
    synth = dataclasses.replace(synth, **{k: v for k, v in overrides.items() if v is not None})
    manifest = synthesize(args.out, params.catalog, synth, progress=not args.quiet)
    n_bad = int((manifest["bad"] != "").sum())
    print(f"{len(manifest)} files ({n_bad} deliberately bad) for {manifest['label'].nunique()} cameras in {args.out}; "
          f"manifest {Path(args.out) / MANIFEST}")
    return 0
