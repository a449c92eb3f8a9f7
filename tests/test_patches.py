"""Where patches are cut from a full photo: CFA-aligned, distinct, spread evenly, exactly as many as asked."""
from __future__ import annotations

import numpy as np
import pytest

from camid.errors import CamidError
from camid.core.patches import AUTO_MAX_PATCHES, auto_patch_count, centre_offsets, grid_crops, grid_offsets


@pytest.mark.parametrize("shape", [(288, 384), (384, 288), (4000, 6000), (2322, 4128), (512, 512)])
@pytest.mark.parametrize("count", [1, 2, 4, 5, 7, 9, 16, 25, 64])
def test_grid_gives_exactly_count_distinct_aligned_positions_inside_the_photo(shape, count):
    offsets = grid_offsets(shape, 64, count)
    assert len(offsets) == count and len(set(offsets)) == count
    for top, left in offsets:
        assert top % 2 == 0 and left % 2 == 0
        assert 0 <= top <= shape[0] - 64 and 0 <= left <= shape[1] - 64


def test_one_patch_is_the_centre_crop():
    assert grid_offsets((288, 384), 64, 1) == [centre_offsets((288, 384), 64)]


@pytest.mark.parametrize("count, rows, cols", [(4, 2, 2), (9, 3, 3), (16, 4, 4), (25, 5, 5)])
def test_square_counts_make_a_full_grid_from_corner_to_corner(count, rows, cols):
    offsets = grid_offsets((288, 384), 64, count)
    tops, lefts = sorted({t for t, _ in offsets}), sorted({x for _, x in offsets})
    assert (len(tops), len(lefts)) == (rows, cols)
    assert tops[0] == 0 and lefts[0] == 0 and tops[-1] == 288 - 64 and lefts[-1] == 384 - 64
    assert len(set(np.diff(lefts)) | set(np.diff(tops))) <= 4  # evenly spaced (up to rounding to even)


def test_the_grid_follows_the_photo_aspect():
    wide = grid_offsets((2000, 6000), 64, 8)
    assert len({t for t, _ in wide}) == 2 and len({x for _, x in wide}) == 4
    tall = grid_offsets((6000, 2000), 64, 8)
    assert len({t for t, _ in tall}) == 4 and len({x for _, x in tall}) == 2


def test_a_photo_with_room_for_fewer_positions_gets_all_of_them():
    assert grid_offsets((64, 64), 64, 9) == [(0, 0)]
    assert sorted(grid_offsets((66, 68), 64, 20)) == [(t, x) for t in (0, 2) for x in (0, 2, 4)]


def test_auto_tiles_without_overlap_up_to_the_limit():
    assert auto_patch_count((288, 384), 64) == 4 * 6
    assert auto_patch_count((4000, 6000), 64) == AUTO_MAX_PATCHES
    assert auto_patch_count((100, 100), 64) == 1
    photo = np.arange(288 * 384 * 3, dtype=np.uint32).reshape(288, 384, 3).astype(np.uint8)
    crops = grid_crops(photo, 64, 0)
    assert crops.shape == (24, 64, 64, 3) and crops.base is None  # copies: the photo can be freed
    top, left = grid_offsets(photo.shape, 64, 24)[5]
    np.testing.assert_array_equal(crops[5], photo[top:top + 64, left:left + 64])


def test_bad_requests_are_clear_errors():
    with pytest.raises(CamidError, match="at least 1"):
        grid_offsets((288, 384), 64, 0)
    with pytest.raises(CamidError, match="cannot cut"):
        grid_offsets((32, 384), 64, 4)


def _mosaicked(cfa: str, demosaic: str, seed: int, shape=(240, 320)) -> np.ndarray:
    """A smooth random scene through a Bayer mosaic of `cfa` and the zoo's `demosaic`, as uint8 (H, W, 3)."""
    from scipy import ndimage

    from camid.data.synth import DEMOSAIC, _cfa_masks

    rng = np.random.default_rng(seed)
    scene = np.stack([ndimage.gaussian_filter(rng.random(shape), 1.5) for _ in range(3)], axis=-1)
    scene = (scene - scene.min()) / (scene.max() - scene.min())
    masks = _cfa_masks(cfa, *shape)
    mosaic = (scene * np.moveaxis(masks, 0, -1)).sum(axis=-1) + rng.normal(0, 0.004, shape)
    return np.clip(DEMOSAIC[demosaic](mosaic, masks) * 255, 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("demosaic", ["bilinear", "edge_directed", "smooth_hue"])
def test_the_phase_keeping_flip_is_read_off_the_pixels_and_turns_with_the_photo(demosaic):
    """The transpose keeps RGGB and BGGR, the anti-transpose GRBG and GBRG; a photo stored a quarter turn round
    shows the other layout family; a photo with no CFA trace tells nothing."""
    from camid.core.patches import (ANTI_TRANSPOSE, TRANSPOSE, d4_view, phase_keeping_view, phase_symmetry)

    for seed, (cfa, view) in enumerate([("RGGB", TRANSPOSE), ("BGGR", TRANSPOSE), ("GRBG", ANTI_TRANSPOSE),
                                        ("GBRG", ANTI_TRANSPOSE)]):
        photo = _mosaicked(cfa, demosaic, seed)
        assert phase_keeping_view(*phase_symmetry(photo)) == view, cfa
        assert phase_keeping_view(*phase_symmetry(np.rot90(photo))) == ({TRANSPOSE, ANTI_TRANSPOSE} - {view}).pop()
        kept = d4_view(photo[None, :240, :240], view)[0]  # the flip that keeps the layout keeps the measure
        assert phase_keeping_view(*phase_symmetry(kept)) == view
    smooth = np.repeat(np.random.default_rng(9).integers(0, 256, (120, 160, 1), dtype=np.uint8), 2, axis=0)
    assert phase_keeping_view(*phase_symmetry(np.repeat(np.repeat(smooth, 2, axis=1), 3, axis=2)[:240])) is None
    assert phase_keeping_view(0.01, 0.02) is None and phase_keeping_view(0.3, 0.2) is None  # too weak, too alike
