"""Balance predictions over a closed set known to hold equally many images of every class.

The Kaggle test set holds 132 images per camera among its unaltered images and again among its manipulated
ones, so labels can be chosen jointly: within each group every class gets the same number of slots.

- "optimal": the assignment that maximises the summed log-probability under the quota. It is the linear
  assignment of images to class slots (each class's column repeated `quota` times), solved as the
  equivalent min-cost flow over the few classes, which is over ten times faster on the Kaggle test set.
- "greedy": the seed author's method: confident predictions (p > 0.5) first, then the remaining
  image-class pairs by descending probability, each taken while its image is free and its class has room.
"""
from __future__ import annotations

import math

import numpy as np

from camid.inference.blending import UnknownMethodError

BALANCERS = ("optimal", "greedy")
_LOG_FLOOR = 1e-12  # log(0) would make an infeasible-looking slot; a large finite cost ranks it last instead
_CONFIDENT = 0.5
_TOLERANCE = 1e-9


def balance_to_quota(
    probs: np.ndarray,
    groups: np.ndarray | None = None,
    method: str = "optimal",
    quota: int | None = None,
) -> np.ndarray:
    """Labels (N,) for (N, C) probabilities such that, within each group, no class gets more than `quota`.

    `groups` (N,) of any labels splits the batch into groups balanced separately (e.g. the manipulated flag);
    None treats the batch as one group. `quota` defaults to ceil(n_group / C), so when n_group is not a
    multiple of C some classes end up with one image fewer.
    """
    if method not in BALANCERS:
        raise UnknownMethodError(f"unknown balancing method {method!r}; valid methods: {', '.join(BALANCERS)}")
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"balance_to_quota expects (images, classes) probabilities, got shape {probs.shape}")
    n_images, n_classes = probs.shape
    groups = np.zeros(n_images, dtype=int) if groups is None else np.asarray(groups)
    if groups.shape != (n_images,):
        raise ValueError(f"groups has shape {groups.shape}, expected ({n_images},) to match the probabilities")

    assign = _assign_optimal if method == "optimal" else _assign_greedy
    labels = np.empty(n_images, dtype=np.intp)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        group_quota = math.ceil(len(members) / n_classes) if quota is None else quota
        if group_quota * n_classes < len(members):
            raise ValueError(
                f"quota {group_quota} x {n_classes} classes leaves no slot for some of the {len(members)} images"
                f" in group {group!r}; the quota must be at least {math.ceil(len(members) / n_classes)}"
            )
        labels[members] = assign(probs[members], group_quota)
    return labels


def _assign_optimal(probs: np.ndarray, quota: int) -> np.ndarray:
    # Min-cost flow by successive shortest paths. The argmax is optimal without the quota; then one surplus
    # image at a time leaves an over-full class along the cheapest chain of reassignments (c0 -> c1 -> ...
    # -> a class with room, one image moving along each link). Starting from an optimum and always taking
    # the cheapest chain keeps it optimal, so this equals the linear assignment of images to class slots
    # (the tests check it against scipy's linear_sum_assignment) while moving only the surplus.
    cost = -np.log(np.maximum(probs, _LOG_FLOOR))
    n_classes = cost.shape[1]
    labels = cost.argmin(axis=1)
    counts = np.bincount(labels, minlength=n_classes)
    move_cost = np.full((n_classes, n_classes), np.inf)
    move_image = np.zeros((n_classes, n_classes), dtype=np.intp)
    changed = list(range(n_classes))
    while (over_full := np.flatnonzero(counts > quota)).size:
        _update_moves(move_cost, move_image, cost, labels, changed)
        source = over_full[0]
        distance, previous = _shortest_paths(move_cost, source)
        has_room = np.flatnonzero(counts < quota)
        target = node = has_room[np.argmin(distance[has_room])]
        changed = [target]
        while node != source:
            labels[move_image[previous[node], node]] = node
            node = previous[node]
            changed.append(node)
        counts[source] -= 1
        counts[target] += 1
    return labels


def _update_moves(move_cost, move_image, cost, labels, classes) -> None:
    """Recompute row a of move_cost and move_image for each class a given: for every class b, the least extra
    cost of moving one of a's images to b, and which image that is (a class without images moves none)."""
    move_cost[classes] = np.inf
    for cls in classes:
        members = np.flatnonzero(labels == cls)
        if members.size:
            extra = cost[members] - cost[members, cls][:, None]
            cheapest = extra.argmin(axis=0)
            move_cost[cls] = extra[cheapest, np.arange(len(move_cost))]
            move_cost[cls, cls] = np.inf
            move_image[cls] = members[cheapest]


def _shortest_paths(edge_cost: np.ndarray, source: int) -> tuple[np.ndarray, np.ndarray]:
    """Bellman-Ford over the classes (links may cost less than nothing, but no cycle does)."""
    n_nodes = len(edge_cost)
    distance = np.full(n_nodes, np.inf)
    distance[source] = 0.0
    previous = np.full(n_nodes, -1)
    for _ in range(n_nodes - 1):
        via = distance[:, None] + edge_cost
        best = via.argmin(axis=0)
        shortest = via.min(axis=0)
        # The tolerance stops round-off from passing for a cheaper cycle.
        shorter = shortest < distance - _TOLERANCE
        if not shorter.any():
            break
        distance[shorter] = shortest[shorter]
        previous[shorter] = best[shorter]
    return distance, previous


def _assign_greedy(probs: np.ndarray, quota: int) -> np.ndarray:
    n_images, n_classes = probs.shape
    flat = probs.ravel()
    # Stage 1 is the confident pairs, stage 2 the rest; each stage by descending probability.
    order = np.lexsort((-flat, flat <= _CONFIDENT))
    labels = np.full(n_images, -1, dtype=np.intp)
    room = np.full(n_classes, quota)
    left = n_images
    images, classes = np.divmod(order, n_classes)
    for image, cls in zip(images.tolist(), classes.tolist()):
        if labels[image] < 0 and room[cls] > 0:
            labels[image] = cls
            room[cls] -= 1
            left -= 1
            if not left:
                break
    return labels
