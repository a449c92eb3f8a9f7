"""Metadata against pixels: does the camera a photo's EXIF names match the camera its pixels point to?"""
from __future__ import annotations


def metadata_check(catalog: list[dict], models, predicted) -> tuple[list[str], list[bool | None]]:
    """EXIF says one camera, the pixels another? For each photo's EXIF Model (None: none) and predicted
    label: the catalog camera whose model patterns the EXIF Model matches ("" if none), and whether that is
    the predicted camera (None when the photo has no EXIF Model, or the bundle no catalog to match with). `catalog`: the bundle's cameras (label, make, models).."""
    from camid.config import Camera

    cameras = [Camera(c["label"], c.get("make", ""), tuple(c["models"]), (), False) for c in catalog]
    named, consistent = [], []
    for model, label in zip(models, predicted):
        match = next((c.label for c in cameras if model and c.matches_model(model)), "")
        named.append(match)
        consistent.append(None if not model or not cameras else match == label)
    return named, consistent
