"""`camid inspect PATH... [--json] [--workers N]`: what a photo's file says about where it came from.

One record per file, with the keys in FIELDS. JPEG headers are parsed directly (no pixel decoding) for size,
sampling, ImageMagick's quality, EXIF, XMP and Photoshop resources; the perceptual hash comes from a reduced
decode (JPEG draft mode, 1/2 to 1/8 scale), which still runs the entropy decoder over the whole scan, so a
truncated file is caught. Other formats go through Pillow. A file that cannot be read gets an `error` of the
form "<kind>: <detail>" (kinds in ERROR_KINDS) and never stops a run.

At 1/8 scale (photos of 2048 px and more on each side) the draft image of a baseline JPEG is just its DC
coefficients, and the C extension camid.forensics._dcscan produces it byte for byte as libjpeg would, about
twice as fast, because it skips AC coefficients instead of decoding them. Anything it does not handle
(progressive, CMYK, truncated, corrupt, ...) goes to Pillow as before, so records are identical either way.
Without a C compiler at install time the extension is absent and Pillow does all of it (DC_SCAN is False).

With `--model BUNDLE_OR_URI` every record also gets `firmware_match` (`firmware_match`, which
camid.inference.jpeg_tables `TablePrior.matches` calls too): the catalog cameras whose training photos carried
exactly the file's JPEG table signature, most photos first ([]: none did, the file was re-saved by other
software or its camera is not in the catalog; None: no JPEG tables), and `firmware_family` (`firmware_family`,
`TablePrior.family_matches`): where no training photo had the exact tables, the cameras whose training photos
had tables of their family (`camid.forensics.jpeg_quality.same_family`: the same base table at another quality,
another quality mode of the same firmware); the table's firmware cell then reads "family A|B". Only the bundle's jpeg_tables.json is
read (`read_table_counts`), never its Keras models. Both live here, not in camid.inference: the filter and split
stages import this module, and their DVC dependencies (tests/test_dvc_graph.py) stay forensics, core and config.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import multiprocessing
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image, UnidentifiedImageError

from camid.core.fileio import iter_files
from camid.errors import CamidError
from camid.forensics.exif import MalformedExif, edit_reason, parse_exif, read_exif
from camid.forensics.jpeg_quality import (JpegFormatError, JpegHeaderTruncated, TableSignature, family_members,
                                          read_jpeg_header)

try:
    from camid.forensics import _dcscan
except ImportError:  # built without a C compiler (the extension is optional): Pillow decodes instead
    _dcscan = None

DC_SCAN = _dcscan is not None  # whether the fast 1/8-scale path is available

FIELDS = ("path", "format", "width", "height", "exif_width", "exif_height", "orientation", "make", "model",
          "serial", "software", "datetime", "quality", "subsampling", "jpeg_tables", "edited", "edit_reason",
          "sha256", "phash", "error")

# "<kind>: <detail>" in `error`; the filter stage uses the kind as its rejection reason.
ERROR_KINDS = {
    "unreadable": "the file could not be opened or read",
    "empty": "zero-byte file",
    "not_image": "not an image format camid can read (HEIC without a plug-in, text, ...)",
    "too_large": "pixel count above max_pixels (decompression-bomb guard)",
    "truncated": "the file ends before its image data does",
    "corrupt": "malformed image data or header",
    "bad_exif": "an EXIF block that cannot be parsed",
}
_PHASH_DRAFT_SIZE = (256, 256)  # draft decode to the smallest scale at least this big
_DC_SCALE = 8  # the draft scale at which a decoded pixel is a block's DC coefficient


class InspectError(Exception):
    def __init__(self, kind: str, detail: str):
        assert kind in ERROR_KINDS, kind
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def error_kind(error: str | None) -> str | None:
    """The kind of an `error` string from inspect_file (see ERROR_KINDS)."""
    return error.partition(":")[0] if error else None


def inspect_file(path: str | os.PathLike, editors: Sequence[str] = (), max_pixels: int = 100_000_000, *,
                 hashes: bool = True, dc_scan: bool = True) -> dict:
    """Inspect one file; never raises for a bad file (its `error` says why).

    editors: names of editing software (params filter.editors); max_pixels: decompression-bomb guard.
    hashes=False skips sha256 and phash, leaving pure header work (no pixel decoding, no full read).
    dc_scan=False makes Pillow do every draft decode (for comparisons: the records are the same).
    """
    record = dict.fromkeys(FIELDS)
    record.update(path=str(path), edited=False)
    try:
        _inspect(Path(path), record, tuple(editors), max_pixels, hashes, dc_scan and DC_SCAN)
    except InspectError as exc:
        record["error"] = str(exc)
    except MemoryError:
        record["error"] = "too_large: out of memory while decoding"
    except Exception as exc:  # one bad file never stops a run: what a decoder raises on it is reported as corrupt
        if _raised_in_camid(exc):
            raise  # a bug in camid itself, not a bad file: never hidden as "corrupt"
        record["error"] = f"corrupt: {type(exc).__name__}: {exc}"
    return record


_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


def _raised_in_camid(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc` is camid's own code (and not a library it called)."""
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE_DIR)


def _inspect(path: Path, record: dict, editors: tuple[str, ...], max_pixels: int, hashes: bool,
             dc_scan: bool) -> None:
    try:
        if path.stat().st_size == 0:
            raise InspectError("empty", "zero-byte file")
        if hashes:
            data = path.read_bytes()
            record["sha256"] = hashlib.sha256(data).hexdigest()
            fp = io.BytesIO(data)
        else:
            fp = open(path, "rb")
    except OSError as exc:
        raise InspectError("unreadable", exc.strerror or str(exc)) from None
    with fp:
        is_jpeg = fp.read(2) == b"\xff\xd8"
        fp.seek(0)
        if is_jpeg:
            metadata_error = _inspect_jpeg(fp, record, editors, max_pixels, hashes, dc_scan)
        else:
            metadata_error = _inspect_other(fp, record, editors, max_pixels, hashes)
    if metadata_error:
        raise metadata_error


def _metadata(record: dict, fields: dict | None, xmp, irb, editors) -> None:
    fields = fields or {}
    for key in ("exif_width", "exif_height", "orientation", "make", "model", "serial", "software", "datetime"):
        record[key] = fields.get(key)
    record["edit_reason"] = edit_reason(fields, xmp, irb, editors)
    record["edited"] = record["edit_reason"] is not None


def header_facts(data: bytes) -> dict:
    """What an image's header says of its camera, without decoding pixels: `jpeg_tables` (the JPEG encoder's
    table signature, None for other formats), EXIF `make` and `model` (None where absent or unreadable)."""
    facts = {"jpeg_tables": None, "make": None, "model": None}
    fields = None
    try:
        if data[:2] == b"\xff\xd8":
            header = read_jpeg_header(io.BytesIO(data))
            facts["jpeg_tables"] = header.table_signature
            fields = read_exif(header.exif) if header.exif else None
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as image:
                    fields = parse_exif(image.getexif())
    except (JpegFormatError, MalformedExif, UnidentifiedImageError, OSError, SyntaxError, ValueError):
        pass  # a damaged header says nothing; the pixels decide whether the image can be used at all
    if fields:
        facts.update(make=fields.get("make"), model=fields.get("model"))
    return facts


def _check_size(record: dict, max_pixels: int) -> None:
    if record["width"] * record["height"] > max_pixels:
        raise InspectError("too_large", f"{record['width']}x{record['height']} pixels exceeds max_pixels {max_pixels}")


def _inspect_jpeg(fp, record, editors, max_pixels, hashes, dc_scan) -> InspectError | None:
    try:
        header = read_jpeg_header(fp)
    except JpegHeaderTruncated as exc:
        raise InspectError("truncated", str(exc)) from None
    except JpegFormatError as exc:
        raise InspectError("corrupt", str(exc)) from None
    record.update(format="JPEG", width=header.width, height=header.height, quality=header.quality,
                  subsampling=header.subsampling, jpeg_tables=header.table_signature)
    metadata_error, fields = None, None
    if header.exif:
        try:
            fields = read_exif(header.exif)
        except MalformedExif as exc:
            metadata_error = InspectError("bad_exif", str(exc))
    _metadata(record, fields, header.xmp, header.photoshop, editors)
    _check_size(record, max_pixels)
    if hashes:
        record["phash"] = (dc_scan and _dc_phash(fp, header.width, header.height)) or _phash(fp, draft=True)
    return metadata_error


def _dc_phash(fp: io.BytesIO, width: int, height: int) -> str | None:
    """The phash of the 1/8-scale draft image from camid.forensics._dcscan, where Pillow's draft would pick
    scale 8 for _PHASH_DRAFT_SIZE (Image.draft's rule); None where it doesn't apply (then Pillow decodes)."""
    if min(width // _PHASH_DRAFT_SIZE[0], height // _PHASH_DRAFT_SIZE[1]) < _DC_SCALE:
        return None
    found = _dcscan.dc_image(fp.getvalue())  # the bytes BytesIO was made from: no copy
    if found is None:
        return None
    import imagehash

    dc_width, dc_height, pixels = found
    return str(imagehash.phash(Image.frombytes("L", (dc_width, dc_height), pixels)))


def _inspect_other(fp, record, editors, max_pixels, hashes) -> InspectError | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise InspectError("too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise InspectError("not_image", "not a format Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InspectError("corrupt", str(exc)) from None
    with image:
        record.update(format=image.format, width=image.width, height=image.height)
        metadata_error, fields = None, None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fields = parse_exif(image.getexif())
        except Exception as exc:  # Pillow raises many types on corrupt TIFF structures
            metadata_error = InspectError("bad_exif", f"{type(exc).__name__}: {exc}")
        xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
        irb = getattr(image, "tag_v2", {}).get(34377) if image.format == "TIFF" else None
        _metadata(record, fields, xmp.encode() if isinstance(xmp, str) else xmp,
                  irb if isinstance(irb, bytes) else None, editors)
        _check_size(record, max_pixels)
        if hashes:
            record["phash"] = _phash(fp, draft=False)
    return metadata_error


def _phash(fp, draft: bool) -> str:
    import imagehash  # imports scipy: only when hashing

    fp.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(fp) as image:
                if draft:
                    image.draft("L", _PHASH_DRAFT_SIZE)
                image.load()
                return str(imagehash.phash(image))
    except Image.DecompressionBombError as exc:
        raise InspectError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        kind = "truncated" if "truncated" in str(exc) else "corrupt"
        raise InspectError(kind, str(exc) or type(exc).__name__) from None


def inspect_paths(files: Sequence[str | os.PathLike], editors: Sequence[str] = (), max_pixels: int = 100_000_000,
                  *, workers: int = 1, hashes: bool = True, dc_scan: bool = True, chunksize: int = 4) -> Iterator[dict]:
    """inspect_file over `files`, in `workers` processes, yielding records in input order."""
    job = functools.partial(inspect_file, editors=tuple(editors), max_pixels=max_pixels, hashes=hashes,
                            dc_scan=dc_scan)
    if workers <= 1 or len(files) < 2:
        yield from map(job, files)
        return
    with multiprocessing.get_context("fork").Pool(min(workers, len(files))) as pool:
        yield from pool.imap(job, files, chunksize=chunksize)


TABLES_FILE = "jpeg_tables.json"  # a bundle's JPEG-table counts (camid.inference.jpeg_tables.FILE)
BUNDLE_ARTIFACT = "bundle"  # the registered pyfunc's artifact holding the bundle (camid.stages.register)
_NO_TABLES_HINT = ("the evaluate stage writes it (`camid evaluate`, `dvc repro evaluate`); a bundle gathered "
                   "without evaluating (`camid register --runs`) has none")
_DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # camid.tracking.DEFAULT_TRACKING_URI (tests check they agree)


def firmware_match(counts: dict[str, list[int]], labels: Sequence[str], signature: str | None) -> list[dict] | None:
    """The cameras (`labels`) whose training photos carried exactly `signature` (`counts`: signature -> photos
    per camera, as in jpeg_tables.json), most photos first, catalog order among ties: [{"camera", "photos",
    "share"}], share = that camera's part of those photos. [] when no training photo had it (re-saved by other
    software, or a camera outside the catalog); None for no signature (not a JPEG, or a damaged header)."""
    if signature is None:
        return None
    return _cameras_of(counts.get(signature) or [], labels)


def _cameras_of(row: Sequence[int], labels: Sequence[str]) -> list[dict]:
    """[{"camera", "photos", "share"}] of a count row (photos per camera), most photos first, catalog order among
    ties, cameras with none left out."""
    total = sum(row)
    order = sorted((k for k, n in enumerate(row) if n > 0), key=lambda k: (-row[k], k))
    return [{"camera": labels[k], "photos": int(row[k]), "share": round(row[k] / total, 4)} for k in order]


def firmware_family(counts: dict[str, list[int]], labels: Sequence[str], quant: dict[str, dict],
                    signature: str | None) -> list[dict] | None:
    """The cameras whose training photos carried tables of `signature`'s family (`same_family`) other than the
    exact tables (`quant`: signature -> its tables, jpeg_tables.json's "quant"), listed as `firmware_match` lists
    them, photos summed over the family's signatures. [] when none did, or `signature` carries no tables (a
    plain string) or the counts none (a bundle written before families); None for no signature."""
    if signature is None:
        return None
    if not isinstance(signature, TableSignature) or not quant:
        return []
    others = [TableSignature.from_quant(other, tables) for other, tables in quant.items()
              if other != str(signature) and other in counts]
    row = [0] * len(labels)
    for other, fits in zip(others, family_members(signature, others)):
        if fits:
            row = [a + b for a, b in zip(row, counts[str(other)])]
    return _cameras_of(row, labels)


def _tracking_uri() -> str:
    """camid.tracking.tracking_uri(), which this module may not import (see the module docstring)."""
    return os.environ.get("MLFLOW_TRACKING_URI", _DEFAULT_TRACKING_URI)


def read_table_counts(model: str | os.PathLike) -> dict:
    """jpeg_tables.json ({"labels", "alpha", "counts"}) of a bundle folder, a local pyfunc folder or an MLflow
    model URI (models:/name@alias, models:/name/version, runs:/<run>/model), read or downloaded alone: no Keras
    model is loaded. The pyfunc keeps the bundle at the path its MLmodel names for artifact `bundle`
    (`artifacts/<bundle folder name>`). CamidError saying what to check when it cannot be read."""
    text = str(model)
    path = Path(text)
    if path.is_dir():
        if (path / TABLES_FILE).is_file():
            return _read_counts(path / TABLES_FILE, text)
        if (path / "MLmodel").is_file():
            return _read_counts(path / _bundle_path(path / "MLmodel", text) / TABLES_FILE, text)
        if (path / "ensemble.json").is_file():
            raise CamidError(f"{path / TABLES_FILE} not found: bundle {path} has no JPEG-table counts; {_NO_TABLES_HINT}")
        raise CamidError(f"{path} is neither an ensemble bundle (jpeg_tables.json, ensemble.json) nor an MLflow "
                         "pyfunc folder (MLmodel): pass a bundle folder or a model URI such as models:/camid@champion")
    if not _is_uri(text):
        raise CamidError(f"model {text!r} not found: no such folder, and not an MLflow model URI. Pass an ensemble "
                         "bundle folder (e.g. models/ensemble) or a model URI such as models:/camid@champion")
    return _download_counts(text.rstrip("/"))


def _download_counts(uri: str) -> dict:
    import tempfile

    import mlflow
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(_tracking_uri())
    bar = os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"  # two small files: no progress bars on stderr
    try:
        with tempfile.TemporaryDirectory(prefix="camid-tables-") as tmp:
            try:
                mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=tmp)
            except (MlflowException, OSError) as exc:
                raise CamidError(f"cannot read model {uri!r} from tracking store {_tracking_uri()}: {exc}. Check the "
                                 "URI (e.g. models:/camid@champion, models:/camid/3, runs:/<run id>/model) and "
                                 "MLFLOW_TRACKING_URI, or pass an ensemble bundle folder") from None
            artifact = _bundle_path(Path(mlmodel), uri)
            try:
                tables = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{artifact}/{TABLES_FILE}", dst_path=tmp)
            except (MlflowException, OSError):
                raise CamidError(f"model {uri!r} has no {artifact}/{TABLES_FILE}: it was registered from a bundle "
                                 f"without JPEG-table counts; {_NO_TABLES_HINT}") from None
            try:  # beside the counts: which labels are background cameras (a small file; optional)
                mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{artifact}/ensemble.json", dst_path=tmp)
            except (MlflowException, OSError):
                pass
            return _read_counts(Path(tables), uri)
    finally:
        if bar is None:
            os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)
        else:
            os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = bar


def _read_counts(path: Path, model: str) -> dict:
    if not path.is_file():
        raise CamidError(f"{path} not found: model {model!r} has no JPEG-table counts; {_NO_TABLES_HINT}")
    try:
        spec = json.loads(path.read_text())
        counts, labels = dict(spec["counts"]), list(spec["labels"])
        if any(len(row) != len(labels) for row in counts.values()):
            raise ValueError(f"a count row is not {len(labels)} long (one per label)")
        quant = dict(spec.get("quant") or {})
        for tables in quant.values():
            TableSignature.from_quant("check", tables)  # malformed tables fail here, with the file named
        return {"labels": labels, "alpha": spec.get("alpha", 0.5), "counts": counts, "quant": quant,
                "background": _background_labels(path.parent / "ensemble.json")}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CamidError(f"{path} is not a JPEG-table count file ({type(exc).__name__}: {exc}); "
                         f"{_NO_TABLES_HINT}") from None


def _background_labels(spec_file: Path) -> list[str]:
    """The background cameras (photos of other models, never an answer: camid.config.Camera) that the bundle's
    ensemble.json names beside its table counts; [] where it names none or is not there."""
    try:
        cameras = json.loads(spec_file.read_text()).get("cameras") or []
        return [c["label"] for c in cameras if c.get("background")]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return []


def _is_uri(text: str) -> bool:
    """Whether `text` starts with a URI scheme (models:/, runs:/, file:, s3://, ...), not a drive letter."""
    scheme, colon, _ = text.partition(":")
    return bool(colon) and len(scheme) > 1 and scheme[0].isalpha() and all(c.isalnum() or c in "+.-" for c in scheme)


def _bundle_path(mlmodel: Path, model: str) -> str:
    """Where the pyfunc described by `mlmodel` (an MLmodel file) keeps its bundle, relative to the model root."""
    from mlflow.models import Model

    try:
        return Model.load(str(mlmodel)).flavors["python_function"]["artifacts"][BUNDLE_ARTIFACT]["path"]
    except Exception as exc:  # a damaged or foreign MLmodel file: MLflow and YAML raise many types
        raise CamidError(f"model {model!r} is not a camid model: its MLmodel has no pyfunc artifact "
                         f"{BUNDLE_ARTIFACT!r} ({type(exc).__name__}: {exc}); register one with `camid register`") from None


_TABLE = (("quality", 7), ("size", 11), ("sampling", 8), ("model", 18), ("software", 22), ("edited", 6))
_FIRMWARE = ("firmware", 24)  # the column --model adds
NONE_SEEN = "none seen"  # the firmware cell when no catalog camera's training photos had the file's tables


FAMILY_PREFIX = "family "  # the firmware cell of tables seen only at another quality of their family
BACKGROUND_MARK = "*"  # after a background camera's name in the firmware cell: other models' photos, not a catalog camera


def firmware_cell(matches: list[dict] | None, width: int = _FIRMWARE[1], family: list[dict] | None = None) -> str:
    """`firmware_match` for the table: "A|B" (as many names as fit, then "|+N"), "family A|B" where only
    `family` (`firmware_family`) names cameras, NONE_SEEN where neither does, "" for None."""
    if matches is None:
        return ""
    if not matches and family:
        return FAMILY_PREFIX + firmware_cell(family, width - len(FAMILY_PREFIX))
    if not matches:
        return NONE_SEEN
    names = [m["camera"] + (BACKGROUND_MARK if m.get("background") else "") for m in matches]
    for shown in range(len(names), 0, -1):
        text = "|".join(names[:shown]) + (f"|+{len(names) - shown}" if shown < len(names) else "")
        if len(text) <= width or shown == 1:
            return text
    return ""  # unreachable: the loop returns at shown == 1


def _table_row(record: dict, columns=_TABLE) -> str:
    size = f"{record['width']}x{record['height']}" if record["width"] else ""
    cells = {"quality": record["quality"], "size": size, "sampling": record["subsampling"],
             "model": record["model"], "software": record["software"], "edited": "yes" if record["edited"] else ""}
    if "firmware_match" in record:
        cells["firmware"] = firmware_cell(record["firmware_match"], family=record.get("firmware_family"))
    text = " ".join(str(cells[name] if cells[name] is not None else "")[:width].ljust(width) for name, width in columns)
    return f"{text} {record['path']}" + (f"  [{record['error']}]" if record["error"] else "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or directories (walked)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all CPUs)")
    parser.add_argument("--no-hash", dest="hashes", action="store_false",
                        help="header fields only: skip sha256 and the perceptual hash (no pixel decoding)")
    parser.add_argument("--model", metavar="URI_OR_BUNDLE",
                        help="add firmware_match: the catalog cameras whose training photos had the file's JPEG "
                             "tables, from this bundle folder or MLflow model URI (e.g. models:/camid@champion); "
                             "reads only its jpeg_tables.json")


def run(args: argparse.Namespace) -> int:
    from camid.config import load_params

    params = load_params().filter
    tables = read_table_counts(args.model) if getattr(args, "model", None) else None  # before any output
    files = iter_files(args.paths)
    columns = _TABLE + ((_FIRMWARE,) if tables is not None else ())
    if not args.json:
        print(" ".join(name.ljust(width) for name, width in columns), "path")
    unseen, background = 0, False
    for record in inspect_paths(files, params.editors, params.max_pixels, workers=args.workers, hashes=args.hashes):
        if tables is not None:
            record["firmware_match"] = firmware_match(tables["counts"], tables["labels"], record["jpeg_tables"])
            record["firmware_family"] = (firmware_family(tables["counts"], tables["labels"], tables["quant"],
                                                         record["jpeg_tables"]) if record["firmware_match"] == []
                                         else None if record["firmware_match"] is None else [])
            unseen += record["firmware_match"] == [] and not record["firmware_family"]
            for match in (record["firmware_match"] or []) + (record["firmware_family"] or []):
                if match["camera"] in tables["background"]:
                    match["background"] = background = True
        print(json.dumps(record) if args.json else _table_row(record, columns))
    if unseen and not args.json:
        print(f"firmware {NONE_SEEN!r} ({unseen} file{'s' if unseen > 1 else ''}): no catalog camera's training photos "
              "had these JPEG tables or tables of their family; re-saved by other software, or a camera outside "
              "the catalog")
    if background and not args.json:
        print(f"firmware {BACKGROUND_MARK!r} after a name: a background camera, photos of other models trained so "
              "that the answer can say 'another camera', never a catalog camera: tables of some other model's firmware")
    return 0
