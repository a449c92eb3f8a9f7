"""Open-set rejection: answer `unknown` when a photo is unlike every catalog camera.

The competition was a closed set; an analyst's photo may come from a camera the catalog does not hold, and a
closed-set model still names one of its cameras for it. The score here is the calibrated maximum probability
(Hendrycks & Gimpel, 2017: the maximum softmax probability is a strong baseline for out-of-distribution
detection; after temperature scaling it is also a probability that means what it says). A photo whose score is
below a threshold is answered `unknown`, with the closest catalog camera still given beside it.

Where the bundle holds a feature bank (every bundle the evaluate stage writes), the pixels' score is instead the
kNN typicality of the photo's penultimate features (the input of the camera layer, unit length; a photo's is the
normalised mean of its patches'): the cosine similarity to its K_NEIGHBOURS-th nearest training photo (Sun et
al., 2022, "Out-of-distribution detection with deep nearest neighbors"). A network's top probability says how
sure it is between the catalog's cameras, not whether the photo is like any of them; its features do (on the zoo
with two models held out, AUROC about 0.95 against 0.7 to 0.8 for the top probability: bench/open_set.py). The
bank (`open_set_bank.npz` in the bundle) holds the training photos' features and up to PATCH_BANK_MAX of their
patches', for single-patch answers.

The threshold is chosen on the validation split, which holds devices of its own but only catalog cameras: it is
the score that accepts `accept` (e.g. 0.95) of the validation photos, so about 1 - accept of the photos of known
cameras are rejected by design, and what that buys on unknown cameras is measured by `bench/open_set.py`
(two virtual camera models held out of training: AUROC and the accuracy/rejection trade-off). Single patches
and whole photos are scored on different scales (a photo blends many patches), and so are answers with and
without the JPEG-table evidence (the tables make a camera original's answer far surer), so each setting has its
threshold, as it has its temperature (`camid.inference.ensemble.KINDS`, `PIXELS_ONLY`; `Ensemble.is_unknown`).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

SCORE = "max_prob"  # the calibrated maximum camera probability
KNN_SCORE = "knn_cosine"  # the kNN typicality of the features, where the bundle has a bank
UNKNOWN = "unknown"  # the answer for a rejected photo
K_NEIGHBOURS = 5     # the k of the kNN score (Sun et al. use k small against the bank's size; not tuned here)
PATCH_BANK_MAX = 20000  # training patches kept for single-patch answers (a seeded random subset beyond that)
PATCH_BANK_BYTES = 64 * 2**20  # and at most this much float32 (ResNet-50's 2048-d features: 8192 patches)
BANK_FILE = "open_set_bank.npz"


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def features_of(member_features: list[np.ndarray]) -> np.ndarray:
    """(N, D) one feature row per patch from each member's (N, D_m): each member's unit-length, side by side, the
    whole unit-length again (members weigh alike whatever their width)."""
    return unit(np.concatenate([unit(f) for f in member_features], axis=1))


def photo_features(patch_features: np.ndarray, counts) -> np.ndarray:
    """(photos, D) a photo's feature from its consecutive `counts` patch rows: the unit-length mean."""
    bounds = np.cumsum([0, *counts])
    return unit(np.stack([patch_features[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]))


def patch_bank_rows(dim: int) -> int:
    """How many training patches the bank keeps for features of `dim` values: PATCH_BANK_MAX, fewer where that
    would pass PATCH_BANK_BYTES."""
    return int(max(1, min(PATCH_BANK_MAX, PATCH_BANK_BYTES // (4 * max(1, dim)))))


def knn_score(features: np.ndarray, bank: np.ndarray, k: int = K_NEIGHBOURS) -> np.ndarray:
    """(N,) the cosine similarity of each unit-length feature row to its k-th nearest bank row (higher: more like
    the training photos); k is capped by the bank's size."""
    features, bank = np.asarray(features, dtype=np.float32), np.asarray(bank, dtype=np.float32)
    if not len(features):
        return np.zeros(0)
    k = max(1, min(k, len(bank)))
    scores = []
    for start in range(0, len(features), 1024):  # bounded memory: 1024 x bank similarities at a time
        sims = features[start:start + 1024] @ bank.T
        scores.append(-np.partition(-sims, k - 1, axis=1)[:, k - 1])
    return np.concatenate(scores).astype(np.float64)


def fit_bank(patch_features: np.ndarray, counts, seed: int = 0) -> dict:
    """The bank from the training photos' patch features (consecutive `counts` rows per photo): every photo's
    feature, and the patches' (a seeded random PATCH_BANK_MAX of them where there are more)."""
    photos = photo_features(patch_features, counts)
    patches = np.asarray(patch_features, dtype=np.float32)
    size = patch_bank_rows(patches.shape[1])
    if len(patches) > size:
        patches = patches[np.sort(np.random.default_rng(seed).choice(len(patches), size, replace=False))]
    return {"patch": patches, "photo": photos}


def write_bank(bundle, bank: dict) -> None:
    """Store the bank in a bundle folder, atomically."""
    import io
    from pathlib import Path

    from camid.core.fileio import write_bytes

    buffer = io.BytesIO()
    labels = {"photo_labels": np.asarray(bank["photo_labels"], dtype=np.int32)} if "photo_labels" in bank else {}
    np.savez_compressed(buffer, patch=bank["patch"].astype(np.float32), photo=bank["photo"].astype(np.float32),
                        **labels)
    write_bytes(Path(bundle) / BANK_FILE, buffer.getvalue())


def read_bank(bundle) -> dict | None:
    """The bank of a bundle folder; None where it has none (bundles made before it existed)."""
    from pathlib import Path

    path = Path(bundle) / BANK_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:  # photo_labels: each bank photo's camera index (bundles before it have none)
        return {key: data[key] for key in ("patch", "photo", "photo_labels") if key in data.files}


def confidence(probs: np.ndarray) -> np.ndarray:
    """(N,) the open-set score of (N, C) calibrated probabilities: the top probability."""
    return np.asarray(probs, dtype=np.float64).max(axis=1)


# Validation scores must come from devices training never saw: a threshold that accepts 95% of the training device's
# own held-out photos rejects many photos of the same model's other devices (issue 20). Where at least
# MIN_UNSEEN_DEVICE_PHOTOS validation photos come from unseen devices (cameras the split dealt by device), the
# thresholds and temperatures are fitted on those alone. A camera with one reference device (or two, one of them the
# test set) has no unseen device in validation: its whole-photo answers are judged instead against that camera's
# own training photos, with a threshold of its own (`camera_thresholds`). It sits between two typical cosine
# distances, on a log scale: of the camera's held-out reference photos to its training photos (0: how far a photo
# of the reference device lies) and of the *other* catalog cameras' validation photos to them (1: how far another
# model lies), at `evaluate.single_device_reach` of the way. The log scale makes the rule independent of how
# tightly a network packs its features. Where another device of the model lies on that scale cannot be measured
# from one device; the reach is a documented default from the zoo's cross-device gap (bench/device_gap.py: one
# reference device per zoo model, 480 photos of 3 other devices each, judged against their own camera): the zoo's
# other devices are accepted at 0.88 (reach 0.5), 0.91 (0.6), 0.95 (0.7) and 0.98 (0.8), so 0.7 accepts them as
# often as `open_set_accept` accepts the reference's own photos. Checked, not fitted, on real photos
# (bench/real_devices.py: DJI FC6360 and Nikon D60, one reference device each): at 0.7 the DJI's other device is
# accepted 5/5 after a short and after a planned training (0.5 accepted it 5/5 and 1/5: the longer training
# learns the reference device better and pushes the other device from 9 to 27 times as far as its own held-out
# photos), and the pixels alone reject 0.84-0.90 of 81 other real models (0.975-1.0 at 0.5). The other way round
# (the DJI's 5-photo device as the reference, 32 photos of its other device questioned) 0.7 accepted 7 of the 32
# (0.8: 29) and the pixels rejected 0.728: the rule missed on both sides there, with the closest camera right for
# all 32 (README, "Smaller references, and the DJI the other way round"). Both medians come
# from the catalog's own photos. One reference device cannot show either which JPEG quality modes the model's other
# devices use, so for such a camera unseen tables do not answer `unknown` alone: they ask the pixels to pass the
# same scale's threshold at `evaluate.unseen_tables_reach` (0.5) instead (`Ensemble.unknown_grounds`). A camera's
# twins (metadata.twins: pairs the pixels cannot separate, by validation or by firmware) are not its far end: their
# photos lie where the model's other devices lie, and as the far end they would set the bar at the reference
# device's own spread; and a photo whose closest camera has twins is judged against each twin's threshold, the best
# margin counting (`Ensemble.twin_group_margins`), since which twin the network named is chance.
MIN_UNSEEN_DEVICE_PHOTOS = 5
UNSEEN_DEVICES, SINGLE_DEVICE = "unseen devices", "single device (per camera, log scale)"
MIN_DISTANCE = 1e-6  # a floor under cosine distances before their logarithm (identical features)


def camera_knn_score(features: np.ndarray, cameras, bank: np.ndarray, bank_labels: np.ndarray,
                     k: int = K_NEIGHBOURS) -> np.ndarray:
    """(N,) each feature row's kNN score against the bank rows of its own camera (`cameras[i]`, an index): the
    cosine similarity to the k-th nearest training photo of that camera (NaN where it has none)."""
    features, cameras, bank_labels = np.asarray(features), np.asarray(cameras), np.asarray(bank_labels)
    out = np.full(len(features), np.nan)
    for camera in np.unique(cameras):
        rows, own = cameras == camera, bank_labels == camera
        if own.any():
            out[rows] = knn_score(features[rows], bank[own], k)
    return out


def nearest_camera(features: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray, cameras: int,
                   k: int = 1) -> np.ndarray:
    """(N,) for each feature row, the camera index whose training photos lie nearest: the highest
    `camera_knn_score` (cosine similarity to its k-th nearest training photo) over the `cameras` catalog cameras.
    The benches compare it with the network's closest camera (bench/device_gap.py, bench/real_devices.py)."""
    near = np.stack([camera_knn_score(features, np.full(len(features), camera), bank, bank_labels, k)
                     for camera in range(cameras)], axis=1)
    return np.nanargmax(near, axis=1)


def log_midpoint(own: np.ndarray, other: np.ndarray, reach: float = 0.5) -> float:
    """The score `reach` of the way, on a log scale of cosine distance (1 - score), from the median of `own` to the
    median of `other` (0.5: halfway, the geometric mean of the two median distances)."""
    low, high = (np.log(max(1.0 - float(np.median(group)), MIN_DISTANCE)) for group in (own, other))
    return 1.0 - float(np.exp(low + reach * (high - low)))


def camera_thresholds(features: np.ndarray, labels: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray,
                      cameras, accept: float, k: int = K_NEIGHBOURS, reach: float = 0.7,
                      twins: dict[int, set[int]] | None = None) -> dict[int, dict]:
    """For each camera index in `cameras` (those with one reference device), its whole-photo kNN threshold on
    `camera_knn_score`: the lower of the quantile that accepts `accept` of its validation photos (`features`
    rows whose `labels` is that camera) and the score `reach` of the way, on a log scale of distance, from their
    median distance to its training photos to the other cameras' validation photos' median distance to them
    (`log_midpoint`; module comment above). The other cameras are those not among the camera's `twins` (camera ->
    the cameras the pixels cannot tell from it, `camid.inference.metadata.twin_map` by index): a twin's photos lie
    where another device of the model lies, not where another model does, so they would pull the far end in and
    reject the model's own other devices; where every other camera is a twin they stay (no other far end).
    Without other cameras' photos, the quantile alone. {camera: {"threshold", "quantile", "own_median",
    "other_cameras_median", "photos", "twins_left_out"}}; a camera without validation photos or training photos is
    left out."""
    features, labels, bank_labels = np.asarray(features), np.asarray(labels), np.asarray(bank_labels)
    twins = twins or {}
    fitted = {}
    for camera in cameras:
        own_rows, bank_rows = labels == camera, bank_labels == camera
        if not own_rows.any() or not bank_rows.any():
            continue
        twin_rows = np.isin(labels, sorted(twins.get(int(camera), ())))
        left_out = sorted(int(c) for c in np.unique(labels[twin_rows]))
        other_rows = ~own_rows & ~twin_rows
        if not other_rows.any():  # only twins besides it: their distance is the one far end there is
            other_rows, left_out = ~own_rows, []
        own = knn_score(features[own_rows], bank[bank_rows], k)
        other = knn_score(features[other_rows], bank[bank_rows], k) if other_rows.any() else np.zeros(0)
        fit = {"quantile": fit_threshold(own, accept), "own_median": float(np.median(own)),
               "other_cameras_median": float(np.median(other)) if len(other) else None, "photos": int(own_rows.sum()),
               "twins_left_out": left_out}
        fitted[int(camera)] = {"threshold": reach_threshold(fit, reach), **fit}
    return fitted


def reach_threshold(fit: dict, reach: float) -> float:
    """A `camera_thresholds` fit's threshold at `reach`: the lower of its quantile and the score `reach` of the way
    (log scale) from its own median to the other cameras' median; the quantile alone without the latter."""
    if fit["other_cameras_median"] is None:
        return fit["quantile"]
    return min(fit["quantile"], log_midpoint([fit["own_median"]], [fit["other_cameras_median"]], reach))


def fit_threshold(scores: np.ndarray, accept: float) -> float:
    """The threshold that accepts (score >= threshold) the fraction `accept` of `scores` (known photos)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    if not 0 < accept <= 1:
        raise ValueError(f"accept must be in (0, 1], got {accept}")
    if not len(scores):
        return 0.0
    rejected = int(np.floor((1 - accept) * len(scores) + 1e-9))  # at most this many known photos fall below
    return float(scores[rejected]) if rejected < len(scores) else float(scores[-1])


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling known photos (higher score) from unknown ones: the probability that a
    random known photo scores above a random unknown one (ties count half; Mann-Whitney U)."""
    known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    if not len(known) or not len(unknown):
        return float("nan")
    ranks = rankdata(np.concatenate([known, unknown]))
    u = ranks[:len(known)].sum() - len(known) * (len(known) + 1) / 2
    return float(u / (len(known) * len(unknown)))


def tradeoff(known: np.ndarray, known_correct: np.ndarray, unknown: np.ndarray, thresholds) -> list[dict]:
    """At each threshold: the share of known photos accepted, the accuracy on those accepted, the share of
    unknown photos rejected, and the accuracy of the open-set answer over all photos (a known photo is right
    when accepted and named correctly, an unknown one when rejected)."""
    known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    known_correct = np.asarray(known_correct, dtype=bool)
    rows = []
    for t in thresholds:
        accepted = known >= t
        right = int((accepted & known_correct).sum()) + int((unknown < t).sum())
        rows.append({"threshold": float(t), "known_accepted": float(accepted.mean()) if len(known) else float("nan"),
                     "accuracy_accepted": float(known_correct[accepted].mean()) if accepted.any() else float("nan"),
                     "unknown_rejected": float((unknown < t).mean()) if len(unknown) else float("nan"),
                     "open_set_accuracy": right / max(len(known) + len(unknown), 1)})
    return rows
