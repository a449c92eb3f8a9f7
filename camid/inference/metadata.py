"""Metadata against pixels: does the camera a photo's EXIF names agree with what its pixels say?

The pixels resolve cameras only as finely as they can. Two models of one maker and one sensor generation (a
Nikon D70 and D70s, the zoo's Aster-A1 and A1s) leave nearly the same traces, and a genuine D70s photo may read
D70 at 0.6 against 0.4. That is no evidence of a swapped EXIF, so the check says `consistent: false` only where
the pixels give the EXIF camera itself a low probability: below `inconsistent_below` (0.05 by default, a fixed
level, not tuned: validation reports how often genuine photos fall under it), and never where the EXIF camera is
in the photo's camera group or is a twin of its closest camera. The last matters with one reference device per
model: the network then learns each twin's reference *device* and may name the wrong twin of another device's
photo at 0.99 (the zoo, one reference device per model: 15 of 23 false alarms on other devices' genuine photos were
twins, `bench/device_gap.py`); the pixels cannot say which of two twins took a photo, however sure the network is.

A photo's camera group (`camera_groups`) is the closest camera together with every camera the pixels find at least
half as likely, and the closest camera's twins (`fit_twins`: pairs that validation could not tell apart) that are at
least a tenth as likely; an answer reads "Nikon-D70 or Nikon-D70s" where a photo sits between them. Validation
finds the twins from its photo-level confusion of the pixels alone: a pair is reported where at least
`TWIN_CONFUSION` of the two cameras' validation photos were named the other.

Validation's confusion says how the pixels separate two *models* only where validation holds devices training never
saw. With one reference device per model it is a photo split of that device, and it measures how the network tells
the two reference *devices* apart: two firmware twins may look separate there and still be named one for the other
on every photo of their other devices. So where one of two cameras had a single reference device, the pair is also
a twin when nothing but the pixels could separate them: their training photos share JPEG tables (the
firmware's quantization tables and chroma sampling, `camid.inference.jpeg_tables`: exactly, or, for two cameras of
one maker, one firmware's table family at two qualities, where the two references were set to different quality
modes) and a native size
(`firmware_twins`; `metadata.twins` entries say `by`: "validation" or "firmware"). The price is the twins' price:
an EXIF swapped between the two is not flagged, which pixels that learnt one device each could not have shown.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from camid.config import Camera

INCONSISTENT_BELOW = 0.05   # EXIF contradicts the pixels only where they give its camera less than this
TWIN_CONFUSION = 0.1        # a pair is "twins" where validation named this share of their photos the other
GROUP_RATIO = 0.5           # a camera joins the group at this share of the closest camera's probability
TWIN_RATIO = 0.1            # ... and a twin of the closest camera at this share
SEPARATOR = " or "


VALIDATION, FIRMWARE = "validation", "firmware"  # what found a pair of twins (`by`)


def _confusion(predicted: np.ndarray, actual: np.ndarray, a: int, b: int) -> tuple[float, int]:
    """(the share of the two cameras' validation photos named the other of the pair, how many photos they have)."""
    photos = int(np.sum(actual == a) + np.sum(actual == b))
    confused = int(np.sum((actual == a) & (predicted == b)) + np.sum((actual == b) & (predicted == a)))
    return (confused / photos if photos else 0.0), photos


def fit_twins(probs: np.ndarray, actual: np.ndarray, labels: list[str], min_confusion: float = TWIN_CONFUSION,
              min_photos: int = 4, firmware: list[tuple[int, int]] = ()) -> list[dict]:
    """The camera pairs the pixels cannot be trusted to separate: from (N, C) pixel probabilities of validation
    photos and their cameras, every pair whose photos (at least `min_photos` of the two) were named the other of
    the pair at least `min_confusion` of the time (`by`: "validation"), then the `firmware` pairs of camera indices
    (`firmware_twins`) not among them (`by`: "firmware", with their validation confusion); most confused first."""
    predicted = np.asarray(probs).argmax(1) if len(probs) else np.zeros(0, dtype=int)
    actual = np.asarray(actual)
    twins, found = [], set()
    for a in range(len(labels)):
        for b in range(a + 1, len(labels)):
            confused, photos = _confusion(predicted, actual, a, b)
            if photos >= min_photos and confused >= min_confusion:
                twins.append({"cameras": [labels[a], labels[b]], "confused": confused, "photos": photos,
                              "by": VALIDATION})
                found.add(frozenset((a, b)))
    extra = {tuple(sorted(pair)) for pair in firmware if pair[0] != pair[1] and frozenset(pair) not in found}
    for a, b in sorted(extra):
        confused, photos = _confusion(predicted, actual, a, b)
        twins.append({"cameras": [labels[a], labels[b]], "confused": confused, "photos": photos, "by": FIRMWARE})
    return sorted(twins, key=lambda t: -t["confused"])


def same_maker(a: str | None, b: str | None) -> bool:
    """Whether two EXIF makes name one maker: their first words, case aside ("NIKON" and "NIKON CORPORATION");
    never for an empty make."""
    def first(make: str | None) -> str:
        return (str(make or "").lower().split() or [""])[0]
    return bool(first(a)) and first(a) == first(b)


def firmware_twins(table_counts: dict[str, list[int]], sizes: dict[int, set], single: set[int],
                   family: Callable[[str], list[str]] | None = None,
                   makes: dict[int, str] | None = None) -> list[tuple[int, int]]:
    """The camera pairs (indices) of which at least one had a single reference device (`single`) and whose training
    photos share JPEG tables (`table_counts`: signature -> training photos per camera, `TablePrior.counts`) and a
    native size (`sizes`: camera -> its training photos' (long side, short side) sizes): nothing but the pixels
    separates them, and validation on one reference device cannot show whether the pixels do (module docstring).
    Tables are shared where they are exactly one signature or, given `family` (a seen signature -> the other seen
    signatures of its family, `TablePrior.seen_family`) and `makes` (camera -> the catalog's EXIF make), one
    firmware's family at two qualities in cameras of one maker (`same_maker`): the two references were set to
    different quality modes (Fine, Normal), which says nothing of their pixels. Only within a maker, because one
    family, IJG's, is written by many makers' firmware: among 82 real models of the samples, one photo each, the
    family paired 14 of the 175 pairs of one size, 12 of them across makers, where exact tables paired 2."""
    pairs = set()
    users = {sig: [c for c, n in enumerate(per_camera) if n > 0] for sig, per_camera in table_counts.items()}

    def add(a: int, b: int) -> None:
        if a != b and (a in single or b in single) and sizes.get(a, set()) & sizes.get(b, set()):
            pairs.add((min(a, b), max(a, b)))

    for sig, cameras in users.items():
        for a in cameras:
            for b in cameras:
                add(a, b)
        if family is None or makes is None or not any(c in single for c in cameras):
            continue  # the family test only where it can matter
        for other in family(sig):
            for a in cameras:
                for b in users.get(other, ()):
                    if same_maker(makes.get(a), makes.get(b)):
                        add(a, b)
    return sorted(pairs)


def native_sizes(cameras, heights, widths) -> dict[int, set[tuple[int, int]]]:
    """Each camera index's photo sizes, orientation-free ((long side, short side)), as `firmware_twins` takes them."""
    sizes: dict[int, set[tuple[int, int]]] = {}
    for camera, height, width in zip(cameras, heights, widths):
        sizes.setdefault(int(camera), set()).add((max(int(height), int(width)), min(int(height), int(width))))
    return sizes


def fit_metadata(pixels: np.ndarray, served: np.ndarray, actual: np.ndarray, labels: list[str],
                 inconsistent_below: float = INCONSISTENT_BELOW, firmware: list[tuple[int, int]] = ()) -> dict:
    """The bundle's metadata rule from validation photos: the twins (from the calibrated pixel probabilities, and
    the `firmware` pairs, `firmware_twins`), the level under which EXIF contradicts the pixels, and how many genuine
    validation photos (served probabilities) that level would have called inconsistent (`val_false_alarms`)."""
    actual = np.asarray(actual, dtype=int)
    rule = {"inconsistent_below": float(inconsistent_below),
            "twins": fit_twins(pixels, actual, labels, firmware=firmware)}
    served = np.asarray(served)
    picked = served.argmax(1) if len(actual) else np.zeros(0, dtype=int)
    groups, twins = camera_groups(served, picked, labels, rule), twin_map(rule)
    alarms = [contradicts(row, labels[a], group, labels, inconsistent_below, twins)
              for row, a, group in zip(served, actual, groups)]
    return {**rule, "fitted_on": int(len(actual)),
            "val_false_alarms": float(np.mean(alarms)) if len(actual) else float("nan")}


def contradicts(probs: np.ndarray, named: str, group: list[str], labels: list[str], below: float,
                twins: dict[str, set[str]]) -> bool:
    """Whether the pixels (a photo's (C,) calibrated probabilities and its camera group, the closest camera first)
    contradict the catalog camera `named` by its EXIF: it is outside the group, it is not a twin of the closest
    camera (`twins`, twin_map: a pair validation could not tell apart, so the pixels cannot say which of the two
    took the photo, however sure the network is), and the pixels give it less than `below` (inconsistent_below)."""
    return not (named in group or named in twins.get(group[0], ()) or probs[labels.index(named)] >= below)


def twin_map(metadata: dict | None) -> dict[str, set[str]]:
    twins: dict[str, set[str]] = {}
    for pair in (metadata or {}).get("twins", []):
        a, b = pair["cameras"]
        twins.setdefault(a, set()).add(b)
        twins.setdefault(b, set()).add(a)
    return twins


def camera_groups(probs: np.ndarray, picked: np.ndarray, labels: list[str], metadata: dict | None = None) -> list[list[str]]:
    """Each row's camera group, the picked (closest) camera first, then the others by probability (see the
    module's docstring)."""
    twins = twin_map(metadata)
    groups = []
    for row, top in zip(np.asarray(probs), np.asarray(picked)):
        lead, first = row[top], labels[top]
        members = [first] + [labels[c] for c in np.argsort(-row, kind="stable") if c != top and (
            row[c] >= GROUP_RATIO * lead or (labels[c] in twins.get(first, ()) and row[c] >= TWIN_RATIO * lead))]
        groups.append(members)
    return groups


def entry_camera(entry: dict):
    """A bundle's catalog entry (camid.inference.bundle: label, make, models, sizes) as a camid.config.Camera."""
    return Camera(entry["label"], entry.get("make", ""), tuple(entry.get("models", ())),
                  tuple((int(h), int(w)) for h, w in entry.get("sizes") or ()), False)


def metadata_check(catalog: list[dict], models, probs: np.ndarray, groups: list[list[str]], labels: list[str],
                   metadata: dict | None = None, background=None,
                   sizes=None, split=None) -> tuple[list[str], list[bool | None]]:
    """EXIF against pixels. For each photo's EXIF Model (None: none), its (C,) calibrated probabilities and its
    camera group: the catalog camera whose model patterns the EXIF Model matches ("" if none), and whether the
    pixels agree with it (None when the photo has no EXIF Model or the bundle no catalog to match with): False
    only where the pixels contradict that camera (`contradicts`: outside the group, not a twin of the closest
    camera, and under `inconsistent_below`), or where EXIF names no catalog camera while the pixels point to one.
    `background[i]` True: the pixels point to no catalog camera, which agrees with EXIF naming none (the answers
    pass the photos whose pixels the background cameras lead, and those the open-set rule's pixel ground rejects:
    a genuine photo of a camera outside the catalog, answered `unknown` on its pixels, is not read as a swapped
    EXIF). Background cameras (catalog entries marked `background`) are never named: EXIF naming one of their
    models names no catalog camera. `split[i]` True: the grounds disagree, the pixels accepting a catalog camera
    and the JPEG tables rejecting every one (the answers pass the photos answered `unknown` on the tables alone);
    EXIF naming no catalog camera is then left undecided (None): the tables support it, the pixels do not, and
    neither outweighs the other. Real photos (bench/real_devices.py): 7 of 81 genuine photos of other models,
    answered `unknown` on their tables, read `consistent: false` before.

    A contradiction is left undecided (None) where the photo's pixel size (`sizes[i]`, (height, width) or None)
    is none of the named camera's catalog sizes (the catalog entry's "sizes", where it records them): a size mode
    its reference never shot, or a crop, lies outside what the pixels learnt of that camera, since each size mode
    is resampled in the camera its own way, so a low probability for it is no evidence against the EXIF. Real
    photos (bench/real_devices.py): a Nikon D60 reference of 8 full-size photos read 32 of its other device's 34
    "S"-size photos as inconsistent."""
    below = float((metadata or {}).get("inconsistent_below", INCONSISTENT_BELOW))
    twins = twin_map(metadata)
    cameras = [entry_camera(c) for c in catalog if not c.get("background")]
    background = np.zeros(len(groups), dtype=bool) if background is None else np.asarray(background, dtype=bool)
    sizes = [None] * len(groups) if sizes is None else sizes
    split = np.zeros(len(groups), dtype=bool) if split is None else np.asarray(split, dtype=bool)
    named, consistent = [], []
    for model, row, group, elsewhere, size, torn in zip(models, np.asarray(probs), groups, background, sizes, split):
        camera = next((c for c in cameras if model and c.matches_model(model)), None)
        match = camera.label if camera else ""
        named.append(match)
        if not model or not cameras:
            consistent.append(None)
        elif not match or match not in labels:
            consistent.append(True if elsewhere else None if torn else False)
        elif not contradicts(row, match, group, labels, below, twins):
            consistent.append(True)
        else:
            unseen_size = size is not None and camera.sizes and not camera.is_native_size(*size)
            consistent.append(None if unseen_size else False)
    return named, consistent
