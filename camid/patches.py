"""CFA-aligned crops.

A camera's sensor sits behind a 2x2 colour filter array (CFA); demosaicing leaves a periodic trace with that
2-pixel period, which is much of what a camera-model classifier learns. A crop whose offset is odd along an
axis shifts that pattern by one pixel (an RGGB layout would read GRBG), so every crop here starts at even
offsets: a training patch then shows the CFA phase the camera itself produced, as the test set's centre crops
did. Flips and odd shifts are never used for the same reason; rot90 is allowed only for cameras whose photos
come in both orientations (see camid.dataset).
"""
from __future__ import annotations

import numpy as np

from camid.errors import CamidError


def _check_fits(img: np.ndarray, size: int) -> tuple[int, int]:
    height, width = img.shape[:2]
    if size <= 0 or height < size or width < size:
        raise CamidError(f"cannot cut a {size}x{size} crop from a {height}x{width} image")
    return height, width


def _even(n: int) -> int:
    return n - (n % 2)


def centre_offsets(shape: tuple[int, ...], size: int) -> tuple[int, int]:
    """(top, left) of the central size x size crop, each rounded down to an even number (CFA-aligned)."""
    height, width = shape[:2]
    return _even((height - size) // 2), _even((width - size) // 2)


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The central size x size crop at even offsets (`centre_offsets`). A view of `img`, not a copy."""
    _check_fits(img, size)
    top, left = centre_offsets(img.shape, size)
    return img[top:top + size, left:left + size]


def aligned_offsets(shape: tuple[int, ...], size: int, rng: np.random.Generator) -> tuple[int, int]:
    """A uniformly random (top, left) with both offsets even, such that a size x size crop fits."""
    height, width = shape[:2]
    return 2 * int(rng.integers(0, (height - size) // 2 + 1)), 2 * int(rng.integers(0, (width - size) // 2 + 1))


def random_aligned_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size crop at uniformly random even offsets. A view of `img`, not a copy."""
    _check_fits(img, size)
    top, left = aligned_offsets(img.shape, size, rng)
    return img[top:top + size, left:left + size]
