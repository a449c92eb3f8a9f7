"""CFA-aligned crops.

A camera's sensor sits behind a 2x2 colour filter array (CFA); demosaicing leaves a periodic trace with that
2-pixel period, which is much of what a camera-model classifier learns. A crop whose offset is odd along an
axis shifts that pattern by one pixel (an RGGB layout would read GRBG), so every crop here starts at even
offsets: a training patch then shows the CFA phase the camera itself produced, as the test set's centre crops
did. Odd shifts are never used for the same reason; rot90 is allowed only for cameras whose photos come in both
orientations (see camid.data.dataset).

Of the eight symmetries of the square (`D4`), two keep some layouts: the transpose (`flip_rot90`) maps the 2x2
phases (0,1) and (1,0) onto each other and keeps (0,0) and (1,1), so it keeps RGGB and BGGR (the greens swap with
greens); the anti-transpose (`flip_rot270`) keeps (0,1) and (1,0) and swaps (0,0) with (1,1), so it keeps GRBG and
GBRG. Which one keeps a camera's layout is read off its photos (`phase_symmetry`): demosaicing leaves the red and
blue channels' high-pass energy different at a colour's own sites and at the sites it was interpolated to, so the
flip that keeps the layout leaves their per-phase energies unchanged and the other swaps them.
"""
from __future__ import annotations

import math

import numpy as np

from camid.errors import CamidError

# View k is: mirror left-right when k >= 4, then rotate by (k % 4) quarter turns counter-clockwise.
D4 = ("identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270")
TRANSPOSE, ANTI_TRANSPOSE = D4.index("flip_rot90"), D4.index("flip_rot270")
SYMMETRY_SIDE = 1024     # phase_symmetry reads the central SYMMETRY_SIDE x SYMMETRY_SIDE pixels (at even offsets)
SYMMETRY_MIN = 0.05      # a layout is read only where the flip that breaks it changes the energies this much ...
SYMMETRY_RATIO = 3.0     # ... and this many times as much as the other flip does


def d4_view(images: np.ndarray, view: int) -> np.ndarray:
    """One D4 symmetry (an index into `D4`) applied to every image of a (N, H, W, C) batch."""
    if view >= 4:
        images = images[:, :, ::-1]
    return np.rot90(images, view % 4, axes=(1, 2))


def phase_symmetry(img: np.ndarray) -> tuple[float, float]:
    """How much the transpose and the anti-transpose change the CFA phase structure of an (H, W, 3) photo as stored:
    for each flip, the summed absolute difference of the red and blue channels' log mean high-pass energy
    (|4x - its 4 neighbours|) between the 2x2 phases the flip maps onto each other, over the central
    SYMMETRY_SIDE pixels. Small for the flip that keeps the layout; both small where the pixels show no CFA trace
    (a downscaled photo, heavy compression)."""
    side = min(SYMMETRY_SIDE, _even(min(img.shape[:2])))
    top, left = centre_offsets(img.shape, side)
    x = np.asarray(img[top:top + side, left:left + side], dtype=np.float32)
    energy = np.empty((2, 2, 2))  # channel (red, blue), row phase, column phase
    for c, channel in enumerate((x[..., 0], x[..., 2])):
        high = np.abs(4 * channel[1:-1, 1:-1] - channel[:-2, 1:-1] - channel[2:, 1:-1] - channel[1:-1, :-2]
                      - channel[1:-1, 2:])  # high[i, j] is pixel (i + 1, j + 1)
        for a in range(2):
            for b in range(2):
                energy[c, a, b] = high[1 - a::2, 1 - b::2].mean() + 1e-3
    log = np.log(energy)
    transpose = float(np.abs(log[:, 0, 1] - log[:, 1, 0]).sum())
    anti = float(np.abs(log[:, 0, 0] - log[:, 1, 1]).sum())
    return transpose, anti


def phase_keeping_view(transpose: float, anti: float) -> int | None:
    """The D4 view (TRANSPOSE or ANTI_TRANSPOSE) that keeps the CFA layout `phase_symmetry` measured, or None
    where the measure does not tell (no trace, or both flips alike)."""
    low, high = sorted((transpose, anti))
    if high < SYMMETRY_MIN or high < SYMMETRY_RATIO * low:
        return None
    return TRANSPOSE if transpose < anti else ANTI_TRANSPOSE


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


# Patches per photo when a caller asks for "auto" (0): the photo tiled without overlap, at most this many.
AUTO_MAX_PATCHES = 64


def auto_patch_count(shape: tuple[int, ...], size: int, limit: int = AUTO_MAX_PATCHES) -> int:
    """How many patches "auto" scores: as many as tile the photo without overlap, between 1 and `limit`."""
    height, width = shape[:2]
    return max(1, min(limit, (height // size) * (width // size)))


def grid_offsets(shape: tuple[int, ...], size: int, count: int) -> list[tuple[int, int]]:
    """`count` distinct CFA-aligned (top, left) positions spread evenly over the photo, row by row.

    One is the centre crop. More lie on an r x c grid that spans the photo from edge to edge, its shape
    chosen to follow the photo's aspect (a 3x3 grid for 9 on a near-square photo, 2x4 for 8 on a wide one);
    where no grid has exactly `count` cells, `count` of its cells are taken evenly through it. A photo with
    room for fewer distinct even positions than `count` gets all of them.
    """
    height, width = _check_fits(np.empty((*shape[:2], 0)), size)
    if count < 1:
        raise CamidError(f"the number of patches must be at least 1, got {count}")
    if count == 1:
        return [centre_offsets(shape, size)]
    max_rows, max_cols = (height - size) // 2 + 1, (width - size) // 2 + 1
    count = min(count, max_rows * max_cols)
    aspect = np.log((width - size + 1) / (height - size + 1))

    def cost(rows: int) -> float:
        cols = math.ceil(count / rows)
        return abs(np.log(cols / rows) - aspect) + 2 * (rows * cols - count) / count

    rows = min((r for r in range(1, max_rows + 1) if math.ceil(count / r) <= max_cols), key=cost)
    cols = math.ceil(count / rows)
    tops = np.linspace(0, height - size, rows).astype(int) // 2 * 2 if rows > 1 else [centre_offsets(shape, size)[0]]
    lefts = np.linspace(0, width - size, cols).astype(int) // 2 * 2 if cols > 1 else [centre_offsets(shape, size)[1]]
    cells = [(int(t), int(x)) for t in tops for x in lefts]
    return [cells[i] for i in np.linspace(0, len(cells) - 1, count).round().astype(int)]


def grid_crops(img: np.ndarray, size: int, count: int) -> np.ndarray:
    """The (count', size, size, 3) crops at `grid_offsets` (count 0: `auto_patch_count`), copied out of `img`
    so the photo itself can be freed."""
    count = count or auto_patch_count(img.shape, size)
    return np.stack([img[top:top + size, left:left + size] for top, left in grid_offsets(img.shape, size, count)])
