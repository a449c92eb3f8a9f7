"""The dealing rules of the split stage (camid.stages.split, whose docstring explains them): each camera's photos to
train / validation / test by device where it has three devices or more, else by photo. A building block, so that
the training plan (`camid catalog from-folder`, camid.tools.plan) counts the photos each set will get with the
very rules the split stage deals them by.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from camid.config import SplitParams
from camid.errors import CamidError

SETS = ("train", "val", "test")
# How each camera was split (summary "mode"): only "devices" gives a model-identification test figure.
MODES = {
    "devices": "train, val and test have devices of their own",
    "val_photo_split": "two devices: test has its own; val and train are photos of the other",
    "photo_split": "one device (or none known): photos of it in all three sets",
}
PHOTO_FRACTION = SplitParams.photo_fraction  # params.yaml's default (camid.config), for callers that pass none
MIN_DEVICES = 3  # a camera is dealt by device from this many known devices on: one each for train, val and test
MIN_PHOTOS = 3   # fewer photos than this cannot be dealt at all
# Shots further apart in capture time than this are two sessions (outings, days): the photos of one session share
# its scenes and light, those of two do not. A documented default, not fitted: the real references at hand are one
# session of two to four minutes, or sessions months apart (README, "Held-out photos as a run of shots").
SESSION_GAP = pd.Timedelta(hours=1)
EXIF_TIME = "%Y:%m:%d %H:%M:%S"  # DateTimeOriginal as EXIF writes it


def _counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) out of n >= 3 groups: the fractions rounded, at least one each, leaving train at least one."""
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    while n_val + n_test > n - 1:
        if n_val >= n_test and n_val > 1:
            n_val -= 1
        elif n_test > 1:
            n_test -= 1
        else:
            break
    return n_val, n_test


def in_capture_order(photos: pd.DataFrame) -> pd.DataFrame:
    """`photos` in the order they were taken: by the `taken` column (EXIF DateTimeOriginal as written,
    "YYYY:MM:DD HH:MM:SS", which sorts as text) where there is one, photos of no known time after them; then by
    path, which for a camera's own file names (DSC_0001, ...) is the order they were shot."""
    taken = photos["taken"].fillna("") if "taken" in photos else pd.Series("", index=photos.index)
    keys = pd.DataFrame({"unknown": taken == "", "taken": taken, "path": photos["path"]}, index=photos.index)
    return photos.loc[keys.sort_values(["unknown", "taken", "path"], kind="stable").index]


def sessions(photos: pd.DataFrame) -> list[pd.DataFrame]:
    """`photos` in capture order (in_capture_order), cut where two consecutive shots are more than SESSION_GAP
    apart; one part where any photo has no readable capture time (its place in time is unknown)."""
    ordered = in_capture_order(photos)
    if "taken" not in ordered:
        return [ordered]
    taken = pd.to_datetime(ordered["taken"], format=EXIF_TIME, errors="coerce")
    if taken.isna().any():
        return [ordered]
    starts = np.flatnonzero(np.r_[True, np.diff(taken.to_numpy()) > SESSION_GAP.to_timedelta64()])
    return [ordered.iloc[a:b] for a, b in zip(starts, [*starts[1:], len(ordered)])]


def _session_split(photos: pd.DataFrame, fraction: float,
                   rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(rest, held) with whole sessions held, where the photos are two sessions or more: a session drawn (seeded)
    among those of at most twice the photos `fraction` asks for, then the sessions after it in time (round to the
    first) that keep the held photos within twice that, until they have it; always leaving two photos. None where no
    session fits. A run of consecutive shots keeps the held-out photos out of the training photos' seconds but not
    out of their session; sessions of their own are as new to training as another device's photos are."""
    parts = sessions(photos)
    n_held = max(1, round(len(photos) * fraction))

    def fits(size: int, held: int) -> bool:
        return held + size <= 2 * n_held and len(photos) - held - size >= 2

    small = [i for i, part in enumerate(parts) if fits(len(part), 0)]
    if len(parts) < 2 or not small:
        return None
    first = small[int(rng.integers(len(small)))]
    chosen, held = set(), 0
    for i in [*range(first, len(parts)), *range(first)]:
        if held >= n_held:
            break
        if fits(len(parts[i]), held):
            chosen.add(i)
            held += len(parts[i])
    return (pd.concat([part for i, part in enumerate(parts) if i not in chosen]),
            pd.concat([parts[i] for i in sorted(chosen)]))


def _photo_split(photos: pd.DataFrame, fraction: float, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest, held) with about `fraction` of the photos held, at least one each side when there are two. The
    held photos are one run of consecutive shots (in_capture_order) at a random place, not photos drawn one by
    one: a device's photos come in sessions of near-identical scenes a few seconds apart, and a held-out photo
    whose neighbour in time is a training photo is scored against its own scene. Held out as a run, validation
    sees scenes training did not, as the photos of another device will be, and the thresholds and temperatures
    fitted on it (camid.inference.openset) are not set by scene overlap."""
    ordered = in_capture_order(photos)
    n_held = min(len(photos) - 1, max(1, round(len(photos) * fraction)))
    start = int(rng.integers(0, len(photos) - n_held + 1))
    return (pd.concat([ordered.iloc[:start], ordered.iloc[start + n_held:]]),
            ordered.iloc[start:start + n_held])


def split_camera(photos: pd.DataFrame, val_fraction: float, test_fraction: float, rng: np.random.Generator,
                 photo_fraction: float = PHOTO_FRACTION,
                 by_session: bool = False) -> tuple[dict[str, pd.DataFrame], str]:
    """One camera's photos (columns path, label, device, and optionally taken) dealt to SETS; returns the sets and
    the mode. With three devices or more, `val_fraction` and `test_fraction` of the devices; otherwise photo
    splits holding out `photo_fraction` of the photos for each held-out set, each a run of consecutive shots; with
    `by_session` (split.session_validation), validation is whole sessions of its own where the photos are several
    sessions (`_session_split`)."""
    known = photos[photos["device"] != ""]
    unknown = photos[photos["device"] == ""]
    ids = np.array(sorted(known["device"].unique()))
    if len(ids) >= MIN_DEVICES:
        order = rng.permutation(ids)
        n_val, n_test = _counts(len(ids), val_fraction, test_fraction)
        chosen = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        sets = {name: known[known["device"].isin(group)] for name, group in chosen.items()}
        sets["train"] = pd.concat([sets["train"], unknown])
        return sets, "devices"
    if len(photos) < MIN_PHOTOS:
        raise CamidError(f"camera {photos['label'].iloc[0]!r} has {len(photos)} photo(s) after filtering; the split "
                         "needs at least 3 (one each for train, val and test)")
    if len(ids) == 2:
        held_device = rng.permutation(ids)[0]
        test = known[known["device"] == held_device]
        rest = pd.concat([known[known["device"] != held_device], unknown])
        held = _session_split(rest, photo_fraction, rng) if by_session else None
        train, val = held or _photo_split(rest, photo_fraction, rng)
        if len(train) and len(val):
            return {"train": train, "val": val, "test": test}, "val_photo_split"
    session = _session_split(photos, photo_fraction, rng) if by_session else None
    if session is not None:  # validation first: the open-set rule's near end is fitted on it (camid.inference.openset)
        rest, val = session
        train, test = _photo_split(rest, photo_fraction / (1 - photo_fraction), rng)
    else:
        rest, test = _photo_split(photos, photo_fraction, rng)
        train, val = _photo_split(rest, photo_fraction / (1 - photo_fraction), rng)
    return {"train": train, "val": val, "test": test}, "photo_split"


def device_split(files: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int,
                 photo_fraction: float = PHOTO_FRACTION,
                 by_session: bool = False) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Split `files` (path, label, device; optionally taken, the EXIF capture time that orders a photo split) per
    camera (`split_camera`; `by_session`: split.session_validation); returns {set: table} and {label: mode}."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise CamidError(f"split.val_fraction ({val_fraction}) and split.test_fraction ({test_fraction}) must each be "
                         "between 0 and 1, and leave some photos for training")
    if not 0 < photo_fraction < 0.5:
        raise CamidError(f"split.photo_fraction ({photo_fraction}) must be between 0 and 0.5: it is held out twice "
                         "(validation and test) and must leave photos for training")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in SETS}
    modes = {}
    for label, photos in files.groupby("label", sort=True):
        sets, modes[label] = split_camera(photos.sort_values("path"), val_fraction, test_fraction, rng,
                                          photo_fraction, by_session)
        for name in SETS:
            parts[name].append(sets[name])
    tables = {name: pd.concat(parts[name])[["path", "label", "device"]].sort_values("path").reset_index(drop=True)
              for name in SETS}
    return tables, modes
