"""The registered MLflow pyfunc model: image bytes in, camera out, through `camid.inference.answers`.

Input: a DataFrame with an `image` column (JPEG, PNG or TIFF bytes; base64 in JSON requests) and an optional
`manipulated` column (bool; missing or null -> estimated by the model). Params: `tta` (bool: the D4 views the
evaluation chose, stored in the bundle; false: the identity only), `blend` (`model`: the bundle's, or
mean_square | arithmetic | geometric), `patches` (0, the default: auto, the photo tiled without overlap, at most
64 patches on a grid; 1: the centre patch, as the Kaggle test crops were cut; N: N grid patches),
`jpeg_tables` (true: use the JPEG-table evidence where the model's evaluation kept it, for rows not flagged
`manipulated: true`; false: pixels only), `balance`
(none | optimal | greedy: only for a request that is a closed set with equal class counts). Output: one row per
input with `camera` (a catalog label, or `unknown` when the photo is unlike every catalog camera: its features
are far from the training photos', below the kNN threshold fitted on validation, or its JPEG tables are unseen
where validation allowed that ground, `camid.inference.openset`; param `open_set: false` never answers
unknown; or, where the catalog has background cameras, photos of other models trained as a class of their own,
the pixels are most like them, whatever `open_set`), `closest_camera` (the catalog camera the pixels point to,
even when unknown; never a background camera), `confidence` (the calibrated top probability; with background
cameras, the closest catalog camera's),
`unknown`, `unknown_by` (why it is unknown: `pixels`, `tables` or `pixels and tables`;
"" when it is not), `manipulated`, `manipulated_estimated`, `patches` (how many were scored),
`tables_evidence` (what the JPEG quantisation tables said: `used`, a catalog camera's firmware wrote them and the
evidence entered the answer, whose `confidence` is then calibrated and `unknown` decided on that setting's own
scale; `family`, tables of a catalog firmware's family at another quality, which enter the answer as `used` does;
`unseen`, no training photo's family has them, another camera's firmware or a re-save, which counts as `unknown`
where validation allowed it; `none`, not applicable: no JPEG, flagged manipulated, or `jpeg_tables: false`), what the
metadata claims (`exif_model`; `exif_camera`, the catalog camera that EXIF Model names, "" if none;
`consistent`: false only where the pixels give that camera under 5% and it is not in the photo's
`camera_group`, the closest camera with every camera the pixels find nearly as likely, and its twins (pairs
validation could not separate, or one-reference-device cameras that share JPEG tables and size), e.g. "Nikon-D70
or Nikon-D70s", or where the EXIF names no catalog camera and the pixels pass the open-set rule's pixel ground
(true where they point to no catalog camera: rejected on the pixels, or led by the background cameras); null
without an EXIF Model) and the probability
of every camera (one column per camera label).

The signature declares `image` as a string, not MLflow's `binary`: for a binary column the scoring server
decodes base64 before this code runs and answers a bad row with a generic 400 that names no row. A string
column arrives untouched, so base64 is decoded here with a message per row, while raw bytes (Python callers,
Spark binary columns through `spark_udf`) pass MLflow's schema check as they are.

A row that cannot be used (not an image, corrupt, too small for the model's patch, too large) fails the whole
request with HTTP 400 and a message naming each bad row and why; the server keeps serving. With the param
`on_error: row` (batch jobs, `spark_udf`) each bad row is answered instead: its `error` says what was wrong,
its camera is "" and its probabilities are NaN, and the good rows are scored as usual. Every param, its
default and its choices are defined once, in `camid.inference.options`.
"""
from __future__ import annotations

import base64
import binascii

import numpy as np
import pandas as pd

try:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
except ImportError:  # pragma: no cover - mlflow is a hard dependency; this keeps the module importable for docs
    raise

from camid.core.imageio import DEFAULT_MAX_PIXELS, ImageError
from camid.inference import options
from camid.inference.answers import ANSWER_COLUMNS, answer_photos
from camid.inference.ensemble import Ensemble

STATUS_COLUMNS = ANSWER_COLUMNS  # the served answer's columns before one probability column per camera


def signature(labels: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "image"), ColSpec("boolean", "manipulated", required=False)])
    outputs = Schema([ColSpec("string", "camera"), ColSpec("string", "closest_camera"),
                      ColSpec("string", "camera_group"), ColSpec("double", "confidence"),
                      ColSpec("boolean", "unknown", required=False), ColSpec("string", "unknown_by", required=False),
                      ColSpec("long", "reference_devices", required=False),
                      ColSpec("boolean", "size_seen", required=False),
                      ColSpec("boolean", "manipulated"),
                      ColSpec("boolean", "manipulated_estimated"), ColSpec("long", "patches"),
                      ColSpec("string", "tables_evidence"),
                      ColSpec("string", "exif_model"), ColSpec("string", "exif_camera"),
                      ColSpec("boolean", "consistent", required=False), ColSpec("string", "error")]
                     + [ColSpec("double", label) for label in labels])
    params = ParamSchema([ParamSpec(o.name, o.mlflow_type, o.default) for o in options.OPTIONS.values()])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def image_bytes(value) -> bytes:
    """A row's image as bytes: raw bytes as given, a string decoded as base64 (line breaks allowed)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("not valid base64: send the image file's bytes base64-encoded") from None
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        raise ImageError("no image given")
    raise ImageError(f"expected image bytes or a base64 string, got {type(value).__name__}")


def row_flags(values) -> tuple[np.ndarray, list[str]]:
    """The `manipulated` column as True/False/None (None: estimate it), and each row's error ("" if none)."""
    flags, errors = [], []
    for value in values:
        if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
            flags.append(None)
            errors.append("")
        elif isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
            flags.append(bool(value))
            errors.append("")
        else:
            flags.append(None)
            errors.append(f"manipulated is {value!r}; send true, false or null")
    return np.array(flags, dtype=object), errors


def resolve_params(params: dict | None) -> dict:
    try:
        return options.resolve(params)
    except options.OptionError as exc:
        raise bad_request(str(exc)) from None


def predict_frame(ensemble: Ensemble, frame: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
    """The whole served prediction, callable without MLflow: the request's rows through the one photo-scoring
    path (`camid.inference.answers`, as `camid predict` and the evaluate stage), streamed in bounded batches."""
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if "image" not in frame.columns:
        raise bad_request(f"the request has no 'image' column (columns: {list(frame.columns)}); send base64 image bytes "
                          "in a column named 'image'")
    settings = resolve_params(params)
    images, errors = [], []
    for value in frame["image"].tolist():
        try:
            images.append(image_bytes(value))
            errors.append("")
        except ImageError as exc:
            images.append(b"")
            errors.append(str(exc))
    flags = np.full(len(frame), None, dtype=object)
    if "manipulated" in frame.columns:
        flags, flag_errors = row_flags(frame["manipulated"].tolist())
        errors = [e or f for e, f in zip(errors, flag_errors)]
    out = answer_photos(ensemble, images, settings, flags=list(flags), errors=errors, max_pixels=DEFAULT_MAX_PIXELS)
    if settings["on_error"] == "fail" and (out.error != "").any():  # every bad row named at once
        raise _bad_rows(list(out.error))
    return out


def _bad_rows(errors: list[str]) -> MlflowException:
    return bad_request("; ".join(f"row {row}: {e}" for row, e in enumerate(errors) if e)
                       + " (param on_error=row answers the other rows and gives each bad row its error)")


class CamidModel(mlflow.pyfunc.PythonModel):
    """The registered model: an ensemble bundle (artifact `bundle`) behind `predict_frame`."""

    def load_context(self, context):
        self.ensemble = Ensemble.load(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return predict_frame(self.ensemble, model_input, params)
