"""Test-time augmentation over D4, the 8 symmetries of the square (4 rotations x mirror).

A view helps only if the model was trained on such views. No rotation or mirror keeps the 2x2 colour filter
array's phase, so to a network trained without them (camid trains with rot90 only for cameras whose photos
come in both orientations, never with mirrors) most views show layouts no camera of its class produces, and
averaging them can lower accuracy. The evaluate stage therefore picks the views on the validation set
(`select_views`), keeps only those that raise its score, and stores them in the ensemble bundle, so serving
averages exactly the views that were evaluated. Views are stacked view-major, so one forward pass scores them
all and `fold_views` undoes the stacking.
"""
from __future__ import annotations

import numpy as np

from camid.core.patches import D4, d4_view  # noqa: F401  (the symmetries are a core building block; training uses two)


def d4_views(images: np.ndarray, views=range(len(D4))) -> np.ndarray:
    """Stack the given D4 views (indices into `D4`, default all 8) of a (N, H, W, C) batch view-major:
    (len(views) * N, H, W, C). The identity alone returns the batch itself."""
    images = np.asarray(images)
    views = tuple(int(v) for v in views)
    if images.ndim != 4:
        raise ValueError(f"d4_views expects a (N, H, W, C) batch, got shape {images.shape}")
    if not views or any(not 0 <= v < len(D4) for v in views):
        raise ValueError(f"views must be indices into D4 (0..{len(D4) - 1}), got {views}")
    if views == (0,):
        return images
    if images.shape[1] != images.shape[2] and any(v % 2 for v in views):
        raise ValueError(f"quarter-turn views need square images (a rotation swaps height and width), got {images.shape[1:3]}")
    return np.concatenate([d4_view(images, view) for view in views])


def fold_views(outputs: np.ndarray, n_views: int) -> np.ndarray:
    """Undo the view-major stacking of `d4_views`: (V*N, K) outputs -> (V, N, K)."""
    outputs = np.asarray(outputs)
    if n_views < 1 or len(outputs) % n_views:
        raise ValueError(f"{len(outputs)} outputs do not split into {n_views} views of equal size")
    return outputs.reshape(n_views, len(outputs) // n_views, *outputs.shape[1:])


def select_views(member_views: np.ndarray, score, blend) -> tuple[tuple[int, ...], float]:
    """The D4 views worth averaging, chosen greedily on held-out data, and the score they reach.

    `member_views` is (models, 8, N, C): every model's probabilities under every D4 view for N held-out
    images; `score(probs) -> float` rates (N, C) probabilities (higher is better); `blend((K, N, C)) -> (N, C)`
    combines K (model, view) pairs. Starting from the identity, each other view is tried in order of its own
    score and kept only if it raises the score of the blend, so on this data the result never scores below
    the identity alone.
    """
    member_views = np.asarray(member_views)
    if member_views.ndim != 4 or member_views.shape[1] != len(D4):
        raise ValueError(f"select_views expects (models, {len(D4)}, N, C) probabilities, got {member_views.shape}")

    def rate(views: list[int]) -> float:
        return score(blend(member_views[:, views].reshape(-1, *member_views.shape[2:])))

    chosen, best = [0], rate([0])
    alone = {view: rate([view]) for view in range(1, len(D4))}
    for view in sorted(alone, key=lambda v: (-alone[v], v)):
        trial = rate(chosen + [view])
        if trial > best + 1e-12:
            chosen, best = chosen + [view], trial
    return tuple(chosen), best
