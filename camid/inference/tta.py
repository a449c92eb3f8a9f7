"""Test-time augmentation over D4, the 8 symmetries of the square (4 rotations x mirror).

A camera's traces (colour filter array, demosaicing, JPEG blocks) survive these symmetries up to a fixed
permutation, so a model that scores every view sees eight slightly different takes on the same pixels.
Views are stacked view-major, so one forward pass scores them all and `fold_views` undoes the stacking.
"""
from __future__ import annotations

import numpy as np

# View k is: mirror left-right when k >= 4, then rotate by (k % 4) quarter turns counter-clockwise.
D4 = ("identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270")


def d4_view(images: np.ndarray, view: int) -> np.ndarray:
    """One D4 symmetry (an index into `D4`) applied to every image of a (N, H, W, C) batch."""
    if view >= 4:
        images = images[:, :, ::-1]
    return np.rot90(images, view % 4, axes=(1, 2))


def d4_views(images: np.ndarray, tta: bool = True) -> np.ndarray:
    """Stack the D4 views of a (N, H, W, C) batch view-major: (8*N, H, W, C), or the batch itself if not tta."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"d4_views expects a (N, H, W, C) batch, got shape {images.shape}")
    if not tta:
        return images
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"D4 views need square images (a rotation swaps height and width), got {images.shape[1:3]}")
    return np.concatenate([d4_view(images, view) for view in range(len(D4))])


def fold_views(outputs: np.ndarray, n_views: int) -> np.ndarray:
    """Undo the view-major stacking of `d4_views`: (V*N, K) outputs -> (V, N, K)."""
    outputs = np.asarray(outputs)
    if n_views < 1 or len(outputs) % n_views:
        raise ValueError(f"{len(outputs)} outputs do not split into {n_views} views of equal size")
    return outputs.reshape(n_views, len(outputs) // n_views, *outputs.shape[1:])
