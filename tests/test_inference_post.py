"""Post-processing: D4 test-time views, blending across models and views, balancing to a quota."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from camid.inference import (
    BLENDS,
    D4,
    UnknownMethodError,
    balance_to_quota,
    blend,
    d4_view,
    d4_views,
    fold_views,
)


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)


def _undo(view_images, view):
    """The inverse of d4_view: rotate back, then mirror back."""
    back = np.rot90(view_images, -(view % 4), axes=(1, 2))
    return back[:, :, ::-1] if view >= 4 else back


# --- test-time augmentation -------------------------------------------------------------------------


def test_d4_gives_eight_distinct_symmetries_stacked_view_major(images):
    views = d4_views(images)
    assert len(D4) == 8 and views.shape == (8 * 3, 6, 6, 3)
    for view in range(8):
        np.testing.assert_array_equal(views[view * 3:(view + 1) * 3], d4_view(images, view))
    np.testing.assert_array_equal(views[:3], images)  # view 0 is the identity
    assert len({views[view * 3].tobytes() for view in range(8)}) == 8


def test_d4_views_are_invertible_and_symmetries(images):
    folded = fold_views(d4_views(images), len(D4))
    for view in range(8):
        np.testing.assert_array_equal(_undo(folded[view], view), images)
        # A symmetry of the square only moves pixels around.
        np.testing.assert_array_equal(np.sort(folded[view], axis=None), np.sort(images, axis=None))


def test_d4_is_closed_under_composition(images):
    views = {d4_view(images, v).tobytes() for v in range(8)}
    for a, b in itertools.product(range(8), repeat=2):
        assert d4_view(d4_view(images, a), b).tobytes() in views


def test_without_tta_the_batch_is_its_own_single_view(images):
    np.testing.assert_array_equal(d4_views(images, (0,)), images)
    assert fold_views(np.ones((3, 10)), 1).shape == (1, 3, 10)


def test_a_subset_of_views_is_stacked_in_the_order_given(images):
    views = d4_views(images, (0, 6, 2))
    assert views.shape == (9, 6, 6, 3)
    for k, view in enumerate((0, 6, 2)):
        np.testing.assert_array_equal(views[3 * k:3 * (k + 1)], d4_view(images, view))
    # Half turns and mirrors keep a non-square patch's shape; quarter turns do not.
    assert d4_views(np.zeros((2, 4, 6, 3)), (0, 2, 4, 6)).shape == (8, 4, 6, 3)
    with pytest.raises(ValueError, match="square"):
        d4_views(np.zeros((2, 4, 6, 3)), (0, 1))
    with pytest.raises(ValueError, match="indices into D4"):
        d4_views(images, (0, 8))


def _views_from_accuracy(correct: np.ndarray, n_classes: int = 4, seed: int = 0) -> np.ndarray:
    """(1, 8, N, C) probabilities whose view v puts 0.7 on the true class (0) where correct[v] says so,
    else on a wrong class that differs per image, like a view the model never saw in training."""
    rng = np.random.default_rng(seed)
    views, n = correct.shape
    probs = np.full((1, views, n, n_classes), 0.1)
    wrong = rng.integers(1, n_classes, (views, n))
    for v in range(views):
        probs[0, v, np.arange(n), np.where(correct[v], 0, wrong[v])] = 0.7
    return probs


def test_select_views_keeps_the_views_that_raise_the_score_and_drops_the_rest():
    from camid.inference.tta import select_views

    n = 60
    correct = np.zeros((8, n), bool)
    correct[0, :40] = True                       # the identity: 40 of 60
    correct[2, :20] = correct[2, 40:] = True     # rot180: right where the identity is wrong
    correct[4, :30] = True                       # the mirror: always right where the identity is, nothing else
    correct[[1, 3, 5, 6, 7]] = np.random.default_rng(1).random((5, n)) < 0.2  # views worse than chance here
    probs = _views_from_accuracy(correct)

    def score(p):
        return float(np.mean(p.argmax(1) == 0))

    views, best = select_views(probs, score, lambda p: blend(p, "arithmetic"))
    assert views[0] == 0 and 2 in views and not {1, 3, 5, 6, 7} & set(views)
    assert best > score(probs[0, 0]) and best == score(blend(probs[:, list(views)].reshape(-1, n, 4), "arithmetic"))


def test_select_views_never_scores_below_the_identity_alone():
    from camid.inference.tta import select_views

    for seed in range(5):
        probs = np.random.default_rng(seed).dirichlet(np.ones(5), size=(2, 8, 40))
        labels = np.random.default_rng(seed + 100).integers(0, 5, 40)

        def score(p):
            return float(np.mean(p.argmax(1) == labels))

        views, best = select_views(probs, score, lambda p: blend(p, "mean_square"))
        assert best >= score(blend(probs[:, 0], "mean_square"))
        assert views[0] == 0 and len(set(views)) == len(views)


def test_tta_rejects_what_it_cannot_rotate():
    with pytest.raises(ValueError, match="square"):
        d4_views(np.zeros((2, 4, 6, 3)))
    with pytest.raises(ValueError, match="N, H, W, C"):
        d4_views(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="views"):
        fold_views(np.zeros((10, 3)), 8)


# --- blending -----------------------------------------------------------------------------------------


PROBS = np.array([
    [[0.6, 0.4], [0.9, 0.1]],
    [[0.2, 0.8], [0.5, 0.5]],
])  # 2 models x 2 images x 2 classes


def test_mean_square_is_root_sum_of_squares_renormalised():
    root = np.sqrt([[0.6**2 + 0.2**2, 0.4**2 + 0.8**2], [0.9**2 + 0.5**2, 0.1**2 + 0.5**2]])
    np.testing.assert_allclose(blend(PROBS, "mean_square"), root / root.sum(axis=1, keepdims=True), rtol=1e-12)
    # The squares favour the confident model: image 0 leans to class 1 (0.8 beats 0.6).
    assert blend(PROBS, "mean_square")[0, 1] > 0.5


def test_arithmetic_and_geometric_by_hand():
    np.testing.assert_allclose(blend(PROBS, "arithmetic"), [[0.4, 0.6], [0.7, 0.3]])
    geometric = np.array([[np.sqrt(0.12), np.sqrt(0.32)], [np.sqrt(0.45), np.sqrt(0.05)]])
    np.testing.assert_allclose(blend(PROBS, "geometric"), geometric / geometric.sum(axis=1, keepdims=True))


@pytest.mark.parametrize("method", BLENDS)
def test_every_blend_returns_rows_summing_to_one(method):
    probs = np.random.default_rng(2).dirichlet(np.ones(10), size=(16, 5))  # 16 models x views, 5 images
    probs[3, 0] = 0.0  # a hard zero from one view must not break any blend
    probs[3, 0, 4] = 1.0
    blended = blend(probs, method)
    assert blended.shape == (5, 10) and np.isfinite(blended).all()
    np.testing.assert_allclose(blended.sum(axis=1), 1.0)


def test_single_model_blend_is_renormalised_input():
    probs = np.array([[[0.2, 0.2], [0.3, 0.1]]])
    for method in BLENDS:
        np.testing.assert_allclose(blend(probs, method), [[0.5, 0.5], [0.75, 0.25]])


def test_unknown_blend_names_the_valid_ones():
    with pytest.raises(UnknownMethodError, match="mean_square, arithmetic, geometric") as error:
        blend(PROBS, "median")
    assert isinstance(error.value, ValueError)


# --- balancing ----------------------------------------------------------------------------------------


def _log_prob(probs, labels):
    return np.log(np.maximum(probs[np.arange(len(probs)), labels], 1e-12)).sum()


def _noisy_closed_set(rng, n_classes, per_class, bias=1.0):
    truth = np.repeat(np.arange(n_classes), per_class)
    logits = rng.normal(0, 1, (len(truth), n_classes)) + rng.normal(0, bias, n_classes)
    logits[np.arange(len(truth)), truth] += 2.0
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True), truth


@pytest.mark.parametrize("method", ["optimal", "greedy"])
def test_balancing_respects_the_quota_in_each_group(method):
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(5, 0.3), size=70)
    probs[:, 0] += 1.0  # a classifier that loves class 0
    groups = np.repeat(["unaltered", "manipulated"], [40, 30])
    labels = balance_to_quota(probs, groups, method=method)
    assert np.bincount(labels[groups == "unaltered"], minlength=5).tolist() == [8] * 5
    assert np.bincount(labels[groups == "manipulated"], minlength=5).tolist() == [6] * 5


@pytest.mark.parametrize("method", ["optimal", "greedy"])
def test_uneven_and_explicit_quotas(method):
    probs = np.random.default_rng(4).dirichlet(np.ones(4), size=10)
    counts = np.bincount(balance_to_quota(probs, method=method), minlength=4)  # ceil(10 / 4) = 3
    assert counts.sum() == 10 and counts.max() <= 3
    counts = np.bincount(balance_to_quota(probs, method=method, quota=5), minlength=4)
    assert counts.max() <= 5
    with pytest.raises(ValueError, match="at least 3"):
        balance_to_quota(probs, method=method, quota=2)


def test_optimal_matches_brute_force_on_tiny_cases():
    rng = np.random.default_rng(5)
    for n_images, n_classes, quota in [(6, 3, 2), (5, 3, 2), (7, 2, 4), (6, 4, 2)]:
        for _ in range(5):
            probs = rng.dirichlet(np.full(n_classes, 0.5), size=n_images)
            best = max(
                _log_prob(probs, np.array(labels))
                for labels in itertools.product(range(n_classes), repeat=n_images)
                if max(np.bincount(labels, minlength=n_classes)) <= quota
            )
            labels = balance_to_quota(probs, method="optimal", quota=quota)
            assert np.bincount(labels, minlength=n_classes).max() <= quota
            assert _log_prob(probs, labels) == pytest.approx(best, abs=1e-9)


def test_optimal_equals_linear_assignment_and_beats_greedy():
    rng = np.random.default_rng(6)
    for _ in range(5):
        probs, _ = _noisy_closed_set(rng, n_classes=10, per_class=30)
        quota = 30
        _, slots = linear_sum_assignment(np.repeat(-np.log(np.maximum(probs, 1e-12)), quota, axis=1))
        optimal = balance_to_quota(probs, method="optimal")
        assert _log_prob(probs, optimal) == pytest.approx(_log_prob(probs, slots // quota), abs=1e-8)
        assert _log_prob(probs, optimal) >= _log_prob(probs, balance_to_quota(probs, method="greedy")) - 1e-9


@pytest.mark.parametrize("method", ["optimal", "greedy"])
def test_balanced_confident_predictions_are_left_alone(method):
    truth = np.repeat(np.arange(10), 20)
    probs = 0.02 / 9 * (1 - np.eye(10)[truth]) + 0.98 * np.eye(10)[truth]
    groups = np.tile([0, 1], 100)
    np.testing.assert_array_equal(balance_to_quota(probs, groups, method=method), truth)


def test_balancing_fixes_a_biased_classifier():
    probs, truth = _noisy_closed_set(np.random.default_rng(8), n_classes=10, per_class=50, bias=1.5)
    raw = (probs.argmax(axis=1) == truth).mean()
    assert (balance_to_quota(probs, method="optimal") == truth).mean() > raw


def test_kaggle_sized_balancing_is_fast():
    rng = np.random.default_rng(9)
    probs, _ = _noisy_closed_set(rng, n_classes=10, per_class=264)
    groups = np.tile([False, True], 1320)
    start = time.perf_counter()
    labels = balance_to_quota(probs, groups)
    assert time.perf_counter() - start < 1.0
    assert np.bincount(labels[groups], minlength=10).tolist() == [132] * 10


def test_unknown_balancing_method_names_the_valid_ones():
    with pytest.raises(UnknownMethodError, match="optimal, greedy"):
        balance_to_quota(np.full((4, 2), 0.5), method="hungarian")
