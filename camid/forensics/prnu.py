"""`camid prnu enroll` / `camid prnu match`: which *device* took a photo, from its sensor's PRNU fingerprint.

The classifier tells camera models apart by what their imaging pipelines share (CFA, demosaicing, JPEG
tables). Two phones of one model share all of that; what they do not share is the sensor itself: each photosite
is a little more or less sensitive than its neighbours, a fixed multiplicative pattern K (photo-response
non-uniformity) that every photo carries as I * K. It is as unique as a serial number and survives JPEG.
The method is the classic one (Lukas, Fridrich & Goljan 2006; PCE from Goljan, Fridrich & Filler 2009):

- noise residual W = I - F(I), F the Mihcak wavelet denoiser (4-level db8, local Wiener gain from the
  smallest 3/5/7/9-window variance, sigma0 = 3 grey levels), on the luminance: the literature denoises each
  colour channel and then takes the luminance of the residuals, which on the zoo correlates no better with
  the true pattern (all ten models measured) at three times the work;
- fingerprint K = sum W_i I_i / (sum I_i^2 + 1) over a device's photos (saturated pixels weigh 0, the +1 damps
  dark pixels as the reference implementation does), then each 2x2 CFA phase's row and column means removed
  and a Wiener filter in the Fourier domain: both strip periodic traces (CFA, JPEG blocks) that every device
  of the model shares, leaving what is this device's own;
- a query matches when its residual W_q correlates with I_q * K: the peak-to-correlation energy (PCE, the
  correlation peak squared over the mean energy of the cross-correlation away from it, with the peak's sign)
  is above a threshold (60 by convention). Since <W_q, I_q K_s> = <I_q W_q, K_s>, one FFT correlation of
  I_q W_q with K scores every shift s, so a cropped query (zero-padded) gets its position found the same way.

Everything is in the sensor frame, the majority orientation of the reference photos: a photo stored the other
way (portrait) is turned with rot90, as its stored pixel layout dictates; at enrolment the quarter turn that
agrees with the photos seen so far wins, at matching every turn that fits is tried and the best reported.
"""
from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pywt
import scipy.fft
from PIL import Image
from scipy import ndimage
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from camid.core import fileio
from camid.core.arguments import positive
from camid.errors import CamidError
from camid.core.imageio import ImageError, decode_image, list_images

log = logging.getLogger(__name__)

FORMAT, VERSION = "camid-prnu-fingerprint", 1
DEFAULT_THRESHOLD = 60.0
WAVELET, LEVELS, SIGMA0 = "db8", 4, 3.0
WINDOWS = (3, 5, 7, 9)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
SATURATED = 250      # a channel at or above this carries no PRNU: the pixel weighs 0
PEAK_RADIUS = 5      # PCE leaves out the 11x11 neighbourhood of the peak
MIN_SIDE = 64

Box = tuple[int, int, int, int]  # top, left, height, width


# ------------------------------------------------------------------------------------------ signal

def _wiener_gain(x: np.ndarray, sigma2: float, axes: tuple[int, ...], mode="reflect") -> np.ndarray:
    """Mihcak's local Wiener gain for the white-noise part of `x` (variance sigma2): sigma2 / max(v, sigma2),
    v the local mean energy over the smallest of the WINDOWS along `axes`."""
    energy = x * x
    local = None
    for size in WINDOWS:
        mean = ndimage.uniform_filter(energy, [size if a in axes else 1 for a in range(x.ndim)], mode=mode)
        local = mean if local is None else np.minimum(local, mean, out=local)
    return sigma2 / np.maximum(local, sigma2)


def noise_residual(luma: np.ndarray) -> np.ndarray:
    """Luminance in grey levels (h, w) -> float32 (h, w): its wavelet noise residual."""
    h, w = luma.shape
    padded = np.pad(np.asarray(luma, np.float32), ((0, -h % 2 ** LEVELS), (0, -w % 2 ** LEVELS)), mode="symmetric")
    with warnings.catch_warnings():  # periodization wraps at the borders: a high level is harmless
        warnings.filterwarnings("ignore", "Level value", UserWarning)
        coeffs = pywt.wavedec2(padded, WAVELET, "periodization", LEVELS)
    noise = [bands * _wiener_gain(bands, SIGMA0 ** 2, (1, 2)) for bands in map(np.stack, coeffs[1:])]
    approx = np.zeros_like(coeffs[0])  # the residual has no low-pass content
    return pywt.waverec2([approx, *map(tuple, noise)], WAVELET, "periodization")[:h, :w]


def residual_and_weight(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB -> the noise residual W (zero-mean rows and columns) and the weight I that scales the PRNU
    term in it: the luminance in [0, 1], 0 where a channel is saturated."""
    r, g, b = np.moveaxis(rgb, 2, 0)  # channel views: several times faster than reducing over the last axis
    luma = LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
    weight = luma / 255
    weight[np.maximum(np.maximum(r, g), b) >= SATURATED] = 0
    return _zero_mean(noise_residual(luma)), weight


def _zero_mean(x: np.ndarray) -> np.ndarray:
    """Remove the column then row means of each 2x2 CFA phase, in place: periodic traces the model shares."""
    for phase in (x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]):
        phase -= phase.mean(axis=0)
        phase -= phase.mean(axis=1, keepdims=True)
    return x


def _wiener_dft(x: np.ndarray) -> np.ndarray:
    """Keep the part of x's spectrum that looks white at x's own variance: peaks (periodic patterns) are damped."""
    spectrum = scipy.fft.rfft2(x)
    magnitude = np.abs(spectrum) / np.float32(np.sqrt(x.size))
    spectrum *= _wiener_gain(magnitude, float(x.var()), (0, 1), mode=("wrap", "reflect"))
    return scipy.fft.irfft2(spectrum, s=x.shape)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(np.sum(a * b, dtype=np.float64) / np.sqrt(np.sum(a * a, dtype=np.float64) *
                                                           np.sum(b * b, dtype=np.float64)))


def _pce(corr: np.ndarray, peak: tuple[int, int]) -> float:
    """Signed peak^2 over the mean energy of the correlation outside the peak's neighbourhood (circular)."""
    rows, cols = ((p + np.arange(-PEAK_RADIUS, PEAK_RADIUS + 1)) % n for p, n in zip(peak, corr.shape))
    near = corr[np.ix_(rows, cols)]
    energy = (np.sum(corr * corr, dtype=np.float64) - np.sum(near * near, dtype=np.float64)) / (corr.size - near.size)
    value = float(corr[peak])
    return float(np.sign(value) * value * value / energy)


# --------------------------------------------------------------------------------------- geometry

def rot_box(box: Box, shape: tuple[int, int], k: int) -> Box:
    """Where `box` of an array of `shape` lies in np.rot90(array, k)."""
    (top, left, h, w), (rows, cols) = box, shape
    for _ in range(k % 4):
        (top, left, h, w), (rows, cols) = (cols - left - w, top, w, h), (cols, rows)
    return top, left, h, w


def central_box(shape: tuple[int, int], crop: int | None) -> Box:
    """The central crop x crop box at even offsets (the CFA phase is kept), or the whole of `shape`."""
    rows, cols = shape
    if crop is None:
        return 0, 0, rows, cols
    if not MIN_SIDE <= crop <= min(shape):
        raise CamidError(f"--crop {crop}: must be between {MIN_SIDE} and the shorter side of {rows}x{cols}")
    return ((rows - crop) // 2) & ~1, ((cols - crop) // 2) & ~1, crop, crop


def _views(pixels: np.ndarray, boxes: dict[int, Box], wiener: bool) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each quarter turn k, the residual and weight of `boxes[k]` of np.rot90(pixels, k), each distinct
    region of the stored photo processed once."""
    h, w = pixels.shape[:2]
    done, views = {}, {}
    for k, box in boxes.items():
        region = rot_box(box, (h, w) if k % 2 == 0 else (w, h), -k)
        if region not in done:
            top, left, rows, cols = region
            residual, weight = residual_and_weight(pixels[top:top + rows, left:left + cols])
            done[region] = (_wiener_dft(residual) if wiener else residual, weight)
        views[k] = tuple(np.rot90(x, k) for x in done[region])
    return views


# -------------------------------------------------------------------------------------------- files

def read_photo(path: Path) -> np.ndarray:
    """The stored pixels (no EXIF rotation: PRNU lives in the sensor's layout); ImageError if unusable."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read it: {exc.strerror or exc}") from None
    return decode_image(data)


def _size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the header, or None (with a warning) if it is not an image."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        log.warning("skipped %s: not a readable image (%s)", path, exc)
        return None


# ---------------------------------------------------------------------------------------- enrolment

@dataclass(frozen=True)
class Fingerprint:
    k: np.ndarray                    # float32 (box height, box width), sensor frame
    sensor: tuple[int, int]          # the reference photos' (height, width) in the majority orientation
    box: Box                         # the part of the sensor k covers (all of it unless enrolled with --crop)
    files: tuple[str, ...]
    rotations: tuple[int, ...]       # np.rot90 quarter turns that brought each reference photo into the frame


def enroll(paths: Sequence[str | Path], crop: int | None = None, max_photos: int | None = None,
           progress: bool = False) -> Fingerprint:
    """Estimate a device's fingerprint from its photos (files or folders), one photo in memory at a time."""
    files = list_images(paths)
    sizes = {path: size for path in files if (size := _size(path))}
    if not sizes:
        raise CamidError(f"none of the {len(files)} files is a readable image")
    groups = defaultdict(list)
    for path, (h, w) in sizes.items():
        groups[max(h, w), min(h, w)].append(path)
    if len(groups) > 1:
        detail = "; ".join(f"{'x'.join(map(str, sizes[group[0]]))} (either way up): {len(group)} photo(s), "
                           f"e.g. {group[0]}" for group in sorted(groups.values(), key=len, reverse=True))
        raise CamidError(f"the photos differ in size: {detail}. A fingerprint is one sensor: enrol photos of "
                         "one device, as it saved them (no resized or cropped copies)")
    sensor = Counter(sizes.values()).most_common(1)[0][0]
    box = central_box(sensor, crop)
    # Photos in the majority orientation first: the first one sets the frame, later ones are turned to agree.
    order = sorted(sizes, key=lambda path: sizes[path] != sensor)
    total = np.zeros(box[2:], np.float32)
    energy = np.zeros(box[2:], np.float32)
    used, rotations = [], []
    limit = min(len(order), max_photos or len(order))
    with logging_redirect_tqdm(), tqdm(total=limit, desc="enrol", unit="photo", disable=not progress) as bar:
        for path in order:
            try:
                pixels = read_photo(path)
            except ImageError as exc:
                log.warning("skipped %s: %s", path, exc)
                continue
            turns = (0,) if pixels.shape[:2] == sensor else (1, 3)
            views = _views(pixels, dict.fromkeys(turns, box), wiener=False)
            if len(views) > 1:
                estimate = total / (energy + 1)
                turns = sorted(turns, key=lambda k: -_ncc(views[k][0], views[k][1] * estimate))
            residual, weight = views[turns[0]]
            total += residual * weight
            energy += weight * weight
            used.append(str(path))
            rotations.append(turns[0])
            bar.update()
            if len(used) == limit:
                break
    if not used:
        raise CamidError(f"none of the {len(sizes)} photos could be decoded")
    k = _wiener_dft(_zero_mean(total / (energy + 1)))
    return Fingerprint(k.astype(np.float32), sensor, box, tuple(used), tuple(rotations))


def save_fingerprint(fingerprint: Fingerprint, path: str | Path) -> None:
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as out:
        np.savez(out, format=FORMAT, version=VERSION, fingerprint=fingerprint.k, sensor=fingerprint.sensor,
                 box=fingerprint.box, n_photos=len(fingerprint.files), files=np.array(fingerprint.files),
                 rotations=fingerprint.rotations)


def load_fingerprint(path: str | Path) -> Fingerprint:
    path = Path(path)
    if not path.is_file():
        raise CamidError(f"fingerprint {path} not found: make one with `camid prnu enroll PHOTOS --out {path}`")
    not_ours = CamidError(f"{path} is not a camid PRNU fingerprint (make one with `camid prnu enroll`)")
    try:
        with np.load(path, allow_pickle=False) as data:  # a .npy file is an array: no `with`, a TypeError
            if str(data["format"]) != FORMAT:
                raise not_ours
            if (version := int(data["version"])) != VERSION:
                raise CamidError(f"{path} is a version {version} fingerprint; this camid reads version {VERSION}: "
                                 "enrol the device again")
            k, sensor, box, files, rotations = (data[name] for name in
                                                ("fingerprint", "sensor", "box", "files", "rotations"))
    except (OSError, ValueError, EOFError, KeyError, TypeError):
        raise not_ours from None
    box = tuple(int(v) for v in box)
    if k.shape != box[2:]:
        raise CamidError(f"{path} is damaged: its fingerprint is {k.shape}, its header says {box[2:]}")
    return Fingerprint(k, tuple(int(v) for v in sensor), box, tuple(map(str, files)), tuple(map(int, rotations)))


# ----------------------------------------------------------------------------------------- matching

@dataclass(frozen=True)
class Score:
    pce: float
    correlation: float               # normalised correlation of W_q with I_q * K at the best shift
    rotation: int                    # degrees counter-clockwise (np.rot90) that turn the query into the frame
    shift: tuple[int, int]           # where the query's top-left pixel lies on the sensor (0, 0: aligned)


class Matcher:
    """Scores photos against one fingerprint (its spectrum computed once).

    crop: compare only the sensor's central crop x crop (even offsets); search: look for the peak at every
    circular shift, not just at zero, for full-size queries (smaller queries are always searched).
    """

    def __init__(self, fingerprint: Fingerprint, crop: int | None = None, search: bool = False):
        self.fingerprint, self.crop, self.search = fingerprint, crop, search
        self.box = fingerprint.box if crop is None else central_box(fingerprint.sensor, crop)
        (top, left, h, w), (ftop, fleft, fh, fw) = self.box, fingerprint.box
        if not (ftop <= top and fleft <= left and top + h <= ftop + fh and left + w <= fleft + fw):
            raise CamidError(f"--crop {crop} reaches outside the {fh}x{fw} part of the sensor this fingerprint "
                             "was enrolled on (with --crop): use that crop or a smaller one")
        self.k = fingerprint.k[top - ftop:top - ftop + h, left - fleft:left - fleft + w]
        self.spectrum = scipy.fft.rfft2(self.k)

    def _boxes(self, shape: tuple[int, int]) -> dict[int, Box]:
        """Quarter turn -> the box of the turned query to compare, for every turn that fits the fingerprint."""
        boxes = {}
        for k in range(4):
            frame = shape if k % 2 == 0 else shape[::-1]
            if frame == self.fingerprint.sensor:
                boxes[k] = self.box
            elif min(frame) >= MIN_SIDE:
                box = central_box(frame, self.crop if self.crop and self.crop <= min(frame) else None)
                if box[2] <= self.k.shape[0] and box[3] <= self.k.shape[1]:
                    boxes[k] = box
        return boxes

    def score(self, pixels: np.ndarray) -> Score:
        """Raises CamidError when the photo fits the fingerprint in no orientation."""
        shape = pixels.shape[:2]
        boxes = self._boxes(shape)
        if not boxes:
            sensor = "x".join(map(str, self.fingerprint.sensor))
            compared = f"{sensor} sensor" if self.k.shape == self.fingerprint.sensor else \
                f"{self.k.shape[0]}x{self.k.shape[1]} crop of its {sensor} sensor"
            raise CamidError(f"it is {shape[0]}x{shape[1]}, which fits the fingerprint's {compared} in no "
                             "orientation: another camera?")
        aligned = shape in (self.fingerprint.sensor, self.fingerprint.sensor[::-1])
        views = _views(pixels, boxes, wiener=True)
        best = None
        for k, (residual, weight) in views.items():
            signal = residual * weight
            signal -= signal.mean()
            spectrum = np.conjugate(scipy.fft.rfft2(signal, s=self.k.shape))
            spectrum *= self.spectrum
            corr = scipy.fft.irfft2(spectrum, s=self.k.shape, overwrite_x=True)
            if aligned and not self.search:
                peak = (0, 0)
            else:  # every circular shift, or every position where the smaller query lies inside
                (ch, cw), (sh, sw) = corr.shape, signal.shape
                reach = corr if aligned else corr[:ch - sh + 1, :cw - sw + 1]
                peak = np.unravel_index(int(np.argmax(reach)), reach.shape)
            pce = _pce(corr, peak)
            if best is None or pce > best[0]:
                best = pce, k, peak
        pce, k, peak = best
        residual, weight = views[k]
        rows, cols = ((p + np.arange(n)) % m for p, n, m in zip(peak, residual.shape, self.k.shape))
        correlation = _ncc(residual, weight * self.k[np.ix_(rows, cols)])
        if aligned:
            peak = tuple(p - n if p > n // 2 else p for p, n in zip(peak, self.k.shape))
        shift = tuple(int(origin + p - start) for origin, p, start in zip(self.box[:2], peak, boxes[k][:2]))
        return Score(pce, correlation, 90 * k, shift)


# ---------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    enrol = sub.add_parser("enroll", help="estimate a device's fingerprint from its photos",
                           description="Estimate one device's PRNU fingerprint from photos it took (unedited, "
                                       "one sensor size; either orientation).")
    enrol.add_argument("photos", nargs="+", metavar="PHOTO_OR_FOLDER")
    enrol.add_argument("--out", required=True, type=Path, help="fingerprint file to write (.npz)")
    enrol.add_argument("--max-photos", type=positive(int), help="use at most this many photos (the first, sorted)")
    enrol.add_argument("--crop", type=positive(int), help="only the sensor's central N x N pixels (faster)")
    enrol.add_argument("--quiet", action="store_true", help="no progress bar")
    match = sub.add_parser("match", help="score photos against a device's fingerprint (PCE)",
                           description="Score photos against a device fingerprint: PCE above the threshold "
                                       "means the device took it.")
    match.add_argument("queries", nargs="+", metavar="QUERY_OR_FOLDER")
    match.add_argument("--fingerprint", required=True, type=Path, help="from `camid prnu enroll`")
    match.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                       help=f"PCE above which a photo is a match (default {DEFAULT_THRESHOLD:g})")
    match.add_argument("--crop", type=positive(int), help="compare only the sensor's central N x N pixels (faster)")
    match.add_argument("--search-shifts", action="store_true",
                       help="look for the peak at every shift, for full-size photos that were cropped and padded "
                            "or shifted (photos smaller than the sensor are always searched)")
    match.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")


def _enroll(args: argparse.Namespace) -> int:
    fingerprint = enroll(args.photos, args.crop, args.max_photos, progress=not args.quiet)
    save_fingerprint(fingerprint, args.out)
    h, w = fingerprint.sensor
    turned = sum(k != 0 for k in fingerprint.rotations)
    print(f"fingerprint of {len(fingerprint.files)} photo(s) ({turned} turned to {h}x{w}), "
          f"{fingerprint.k.shape[0]}x{fingerprint.k.shape[1]} pixels: {args.out}")
    return 0


def _match(args: argparse.Namespace) -> int:
    matcher = Matcher(load_fingerprint(args.fingerprint), args.crop, args.search_shifts)
    files = list_images(args.queries)
    problems = []
    if not args.json:
        print(f"{'PCE':>10} {'corr':>8} {'rot':>4} {'shift':>11}  {'decision':<9} file")
    for path in files:
        try:
            score = matcher.score(read_photo(path))
        except CamidError as exc:
            log.warning("skipped %s: %s", path, exc)
            problems.append(f"{path}: {exc}")
            continue
        decision = "match" if score.pce > args.threshold else "no match"
        if args.json:
            print(json.dumps({"file": str(path), "pce": round(score.pce, 2),
                              "correlation": round(score.correlation, 5), "rotation": score.rotation,
                              "shift": list(score.shift), "decision": decision}), flush=True)
        else:
            shift = f"{score.shift[0]},{score.shift[1]}"
            print(f"{score.pce:10.1f} {score.correlation:8.4f} {score.rotation:4d} {shift:>11}  {decision:<9} {path}",
                  flush=True)
    if len(problems) == len(files):
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CamidError(f"no photo could be scored against {args.fingerprint}: {problems[0]}{more}")
    return 0


def run(args: argparse.Namespace) -> int:
    return _enroll(args) if args.action == "enroll" else _match(args)
