"""The eight manipulations of the competition's test set, made exactly as its `*_manip` images were.

Training, validation and serving all call `apply`, so a patch is manipulated one way everywhere:

- ``jpeg70``, ``jpeg90``: a real JPEG encode/decode round trip through Pillow (libjpeg) at that quality, with
  Pillow's defaults otherwise: the IJG standard tables scaled by the quality, 4:2:0 chroma subsampling,
  baseline; decoded with libjpeg's default (accurate integer) IDCT and fancy upsampling.
- ``resize0.5`` .. ``resize2.0``: cut the central ``ceil(P/s)`` pixels, resize by ``s`` with Pillow's
  BICUBIC (Keys a=-0.5 kernel, widened by 1/s when reducing, so downscaling is antialiased), then take the
  central P. The resized side is ``round(ceil(P/s) * s)`` (halves up), never less than P.
- ``gamma0.8``, ``gamma1.2``: ``255 * (x/255) ** g``, rounded to the nearest integer (halves up; no exact
  halves occur for these gammas) and clipped to 0..255, applied as a 256-entry lookup table.

Every crop (the central source, the central P) starts at even offsets (`camid.core.patches.centre_crop`).
The auxiliary head's class for a manipulation is `manipulation_index(name)`: 0 for none, then 1..8 in the
order of MANIPULATIONS.
"""
from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np
from PIL import Image

from camid.errors import CamidError
from camid.core.patches import centre_crop

MANIPULATIONS = ("jpeg70", "jpeg90", "resize0.5", "resize0.8", "resize1.5", "resize2.0", "gamma0.8", "gamma1.2")

# name -> (kind, exact parameter); Fraction keeps ceil(P/s) exact (64/0.8 is not 80 in floating point).
_SPECS: dict[str, tuple[str, Fraction]] = {}
for _name in MANIPULATIONS:
    _kind = _name.rstrip("0123456789.")
    _SPECS[_name] = (_kind, Fraction(_name[len(_kind):]))

_GAMMA_LUTS = {
    name: np.clip(np.floor(255.0 * (np.arange(256) / 255.0) ** float(value) + 0.5), 0, 255).astype(np.uint8)
    for name, (kind, value) in _SPECS.items() if kind == "gamma"
}


def _spec(name: str) -> tuple[str, Fraction]:
    try:
        return _SPECS[name]
    except KeyError:
        raise CamidError(f"unknown manipulation {name!r}; choose one of {', '.join(MANIPULATIONS)}") from None


def manipulation_index(name: str | None) -> int:
    """The auxiliary head's class: 0 for an unaltered patch, 1 + MANIPULATIONS.index(name) otherwise."""
    if name is None:
        return 0
    _spec(name)
    return 1 + MANIPULATIONS.index(name)


def manipulation_name(index: int) -> str | None:
    """Inverse of `manipulation_index`."""
    return None if index == 0 else MANIPULATIONS[index - 1]


def source_size(patch: int, name: str | None) -> int:
    """Side of the crop to cut so that `apply(crop, name, patch)` yields a patch x patch result."""
    if name is None:
        return patch
    kind, value = _spec(name)
    return math.ceil(patch / value) if kind == "resize" else patch


def max_source_size(patch: int) -> int:
    """The largest source any manipulation needs (2P, for resize0.5): the cache's crop size."""
    return max(source_size(patch, name) for name in (None, *MANIPULATIONS))


def _resized_side(source: int, scale: Fraction) -> int:
    return math.floor(source * scale + Fraction(1, 2))


def jpeg_round_trip(img: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def apply(crop: np.ndarray, name: str | None, patch: int) -> np.ndarray:
    """Manipulate the centre of `crop` as the test set did; a new uint8 (patch, patch, 3) array.

    `crop` must be at least `source_size(patch, name)` on each side; name None gives the central patch.
    """
    if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
        raise CamidError(f"apply() needs a uint8 (H, W, 3) crop, got {crop.dtype} {crop.shape}")
    if name is None:
        return np.array(centre_crop(crop, patch))
    kind, value = _spec(name)
    if kind == "jpeg":
        return jpeg_round_trip(np.ascontiguousarray(centre_crop(crop, patch)), int(value))
    if kind == "gamma":
        return _GAMMA_LUTS[name][centre_crop(crop, patch)]
    source = source_size(patch, name)
    side = _resized_side(source, value)
    resized = Image.fromarray(np.ascontiguousarray(centre_crop(crop, source))).resize(
        (side, side), Image.Resampling.BICUBIC)
    return np.array(centre_crop(np.asarray(resized), patch))
