"""Decoding untrusted image bytes into RGB pixels, with a reason for every way it can fail.

Used by batch prediction and the served model: a request row that is not a decodable image, a bomb, or too
small for the model's patch gets an `ImageError` whose message says which and what to send instead.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from camid.errors import CamidError
from camid.core.fileio import iter_files

DEFAULT_MAX_PIXELS = 100_000_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}


class ImageError(CamidError):
    """These bytes cannot be used as an image for the model."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """JPEG, PNG or TIFF bytes -> uint8 RGB array (H, W, 3). Raises ImageError with the reason."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                                     f"{max_pixels:,}; send a crop instead")
                img.load()
                rgb = img.convert("RGB") if img.mode != "RGB" else img
                return np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (Image.MAX_IMAGE_PIXELS) can fire in Image.open, before the size check above.
        raise ImageError(f"image too large, over the limit of Pillow's decompression bomb guard ({exc}); "
                         "send a crop instead") from None
    except UnidentifiedImageError:
        raise ImageError("not a decodable image (expected JPEG, PNG or TIFF bytes)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None


def list_images(paths) -> list[Path]:
    """Files named, and the image files under the folders named (recursively, sorted, hidden names skipped: the
    one walker, `camid.core.fileio.iter_files`); CamidError if a path is missing or nothing is found."""
    named = {Path(p) for p in paths if Path(p).is_file()}
    files = [p for p in iter_files(paths) if p in named or p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise CamidError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(map(str, paths))}")
    return files


def list_labelled(root: Path, labels: list[str]) -> pd.DataFrame:
    """Every image under `root/<label>/` (recursively, hidden names skipped, sorted), for the catalog's labels:
    columns path, label and folder (the first subfolder below the label: a device folder, or "")."""
    rows = []
    for label in labels:
        folder = root / label
        if not folder.is_dir():
            continue
        for path in iter_files([folder]):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                parts = path.relative_to(folder).parts
                rows.append((str(path), label, parts[0] if len(parts) > 1 else ""))
    return pd.DataFrame(rows, columns=["path", "label", "folder"])
