"""The registered MLflow pyfunc model: image bytes in, camera out, through `Ensemble.predict`.

Input: a DataFrame with an `image` column (JPEG, PNG or TIFF bytes; base64 in JSON requests) and an optional
`manipulated` column (bool; missing or null -> estimated by the model). Params: `tta` (bool: the D4 views the
evaluation chose, stored in the bundle; false: the identity only), `blend` (`model`: the bundle's, or
mean_square | arithmetic | geometric), `patches` (0, the default: auto, the photo tiled without overlap, at most
64 patches on a grid; 1: the centre patch, as the Kaggle test crops were cut; N: N grid patches),
`jpeg_tables` (true: use the JPEG-table evidence where the model's evaluation kept it, for rows not flagged
`manipulated: true`; false: pixels only), `balance`
(none | optimal | greedy: only for a request that is a closed set with equal class counts). Output: one row per
input with `camera`, `manipulated`, `manipulated_estimated`, `patches` (how many were scored), what the
metadata claims (`exif_model`; `exif_camera`, the catalog camera that EXIF Model names, "" if none;
`consistent`, whether that is the camera the pixels point to, null without an EXIF Model) and the probability
of every camera (one column per camera label).

The signature declares `image` as a string, not MLflow's `binary`: for a binary column the scoring server
decodes base64 before this code runs and answers a bad row with a generic 400 that names no row. A string
column arrives untouched, so base64 is decoded here with a message per row, while raw bytes (Python callers,
Spark binary columns through `spark_udf`) pass MLflow's schema check as they are.

A row that cannot be used (not an image, corrupt, too small for the model's patch, too large) fails the whole
request with HTTP 400 and a message naming each bad row and why; the server keeps serving.
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

from camid.imageio import DEFAULT_MAX_PIXELS, ImageError, decode_image
from camid.inference.ensemble import BALANCE_CHOICES, Ensemble
from camid.inference.blending import BLENDS
from camid.forensics.inspect import header_facts
from camid.patches import grid_crops

MODEL_BLEND = "model"  # the blend the bundle's evaluation scored
STATUS_COLUMNS = ["camera", "manipulated", "manipulated_estimated", "patches", "exif_model", "exif_camera",
                  "consistent"]
DEFAULT_PARAMS = {"tta": True, "blend": MODEL_BLEND, "balance": "none", "patches": 0, "jpeg_tables": True}


def signature(labels: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "image"), ColSpec("boolean", "manipulated", required=False)])
    outputs = Schema([ColSpec("string", "camera"), ColSpec("boolean", "manipulated"),
                      ColSpec("boolean", "manipulated_estimated"), ColSpec("long", "patches"),
                      ColSpec("string", "exif_model"), ColSpec("string", "exif_camera"),
                      ColSpec("boolean", "consistent", required=False)]
                     + [ColSpec("double", label) for label in labels])
    params = ParamSchema([ParamSpec("tta", "boolean", DEFAULT_PARAMS["tta"]),
                          ParamSpec("blend", "string", DEFAULT_PARAMS["blend"]),
                          ParamSpec("balance", "string", DEFAULT_PARAMS["balance"]),
                          ParamSpec("patches", "long", DEFAULT_PARAMS["patches"]),
                          ParamSpec("jpeg_tables", "boolean", DEFAULT_PARAMS["jpeg_tables"])])
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


def row_patches(images, patch: int, count: int = 0,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[np.ndarray], list[dict]]:
    """Decode each row's bytes and cut its `count` grid patches (`camid.patches.grid_crops`; 0: auto) at once,
    so only the patches stay in memory; also what each row's header says (`header_facts`). Collects every
    failure."""
    patches, facts, errors = [], [], []
    for row, value in enumerate(images):
        try:
            data = image_bytes(value)
            pixels = decode_image(data, max_pixels)
            if min(pixels.shape[:2]) < patch:
                raise ImageError(f"image is {pixels.shape[1]}x{pixels.shape[0]}, smaller than the model's "
                                 f"{patch}x{patch} patch")
            patches.append(grid_crops(pixels, patch, count))
            facts.append(header_facts(data))
        except ImageError as exc:
            errors.append(f"row {row}: {exc}")
    if errors:
        raise bad_request("; ".join(errors))
    return patches, facts


def row_flags(values) -> np.ndarray:
    """The `manipulated` column as True/False/None (None: estimate it); anything else is a bad row."""
    flags, errors = [], []
    for row, value in enumerate(values):
        if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
            flags.append(None)
        elif isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
            flags.append(bool(value))
        else:
            errors.append(f"row {row}: manipulated is {value!r}; send true, false or null")
    if errors:
        raise bad_request("; ".join(errors))
    return np.array(flags, dtype=object)


def resolve_params(params: dict | None) -> dict:
    resolved = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    unknown = set(resolved) - set(DEFAULT_PARAMS)
    if unknown:
        raise bad_request(f"unknown param(s) {sorted(unknown)}; known: {sorted(DEFAULT_PARAMS)}")
    if resolved["blend"] not in (MODEL_BLEND, *BLENDS):
        raise bad_request(f"param blend={resolved['blend']!r}; choose {MODEL_BLEND} (the model's own) or "
                          f"{', '.join(BLENDS)}")
    patches = resolved["patches"]
    if isinstance(patches, str) and patches.strip().isdigit():
        patches = int(patches)
    if isinstance(patches, (bool, np.bool_)) or not isinstance(patches, (int, np.integer)) or not 0 <= patches <= 1024:
        raise bad_request(f"param patches={resolved['patches']!r}; send 0 (auto), 1 (the centre patch) or up to 1024")
    resolved["patches"] = int(patches)
    if resolved["balance"] not in BALANCE_CHOICES:
        raise bad_request(f"param balance={resolved['balance']!r}; choose one of {', '.join(BALANCE_CHOICES)}")
    for name in ("tta", "jpeg_tables"):
        value = resolved[name]
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            value = value.strip().lower() in ("true", "1", "yes")
        if not isinstance(value, (bool, np.bool_)):
            raise bad_request(f"param {name}={resolved[name]!r}; send true or false")
        resolved[name] = bool(value)
    return resolved


def predict_frame(ensemble: Ensemble, frame: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
    """The whole served prediction, callable without MLflow."""
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if "image" not in frame.columns:
        raise bad_request(f"the request has no 'image' column (columns: {list(frame.columns)}); send base64 image bytes "
                          "in a column named 'image'")
    settings = resolve_params(params)
    patches, facts = row_patches(frame["image"].tolist(), ensemble.patch, settings["patches"])
    flags = None if "manipulated" not in frame.columns else row_flags(frame["manipulated"].tolist())
    columns = STATUS_COLUMNS + list(ensemble.labels)
    if len(patches) == 0:
        return pd.DataFrame(columns=columns)
    pred = ensemble.predict_photos(patches, flags, signatures=[f["jpeg_tables"] for f in facts], tta=settings["tta"],
                                   blend=None if settings["blend"] == MODEL_BLEND else settings["blend"],
                                   jpeg_tables=settings["jpeg_tables"], balance=settings["balance"])
    out = pd.DataFrame(pred.probs, columns=ensemble.labels)
    out.insert(0, "camera", np.asarray(ensemble.labels)[pred.labels])
    out.insert(1, "manipulated", pred.manipulated.astype(bool))
    out.insert(2, "manipulated_estimated", pred.manipulated_estimated.astype(bool))
    out.insert(3, "patches", np.array([len(p) for p in patches], dtype=np.int64))
    models = [f["model"] for f in facts]
    named, consistent = ensemble.metadata_check(models, out["camera"])
    out.insert(4, "exif_model", [m or "" for m in models])
    out.insert(5, "exif_camera", named)
    out.insert(6, "consistent", pd.array(consistent, dtype="boolean"))
    return out


class CamidModel(mlflow.pyfunc.PythonModel):
    """The registered model: an ensemble bundle (artifact `bundle`) behind `predict_frame`."""

    def load_context(self, context):
        self.ensemble = Ensemble.load(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return predict_frame(self.ensemble, model_input, params)
