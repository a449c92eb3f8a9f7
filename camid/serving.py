"""The registered MLflow pyfunc model: image bytes in, camera out, through `Ensemble.predict`.

Input: a DataFrame with an `image` column (JPEG, PNG or TIFF bytes; base64 in JSON requests) and an optional
`manipulated` column (bool; missing or null -> estimated by the model). Params: `tta` (bool), `blend`
(mean_square | arithmetic | geometric), `balance` (none | optimal | greedy: only for a request that is a
closed set with equal class counts). Output: one row per input with `camera`, `manipulated`,
`manipulated_estimated` and the probability of every camera (one column per camera label).

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
from camid.patches import centre_crop

DEFAULT_PARAMS = {"tta": True, "blend": "mean_square", "balance": "none"}


def signature(labels: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "image"), ColSpec("boolean", "manipulated", required=False)])
    outputs = Schema([ColSpec("string", "camera"), ColSpec("boolean", "manipulated"),
                      ColSpec("boolean", "manipulated_estimated")] + [ColSpec("double", label) for label in labels])
    params = ParamSchema([ParamSpec("tta", "boolean", DEFAULT_PARAMS["tta"]),
                          ParamSpec("blend", "string", DEFAULT_PARAMS["blend"]),
                          ParamSpec("balance", "string", DEFAULT_PARAMS["balance"])])
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


def row_patches(images, patch: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode each row's bytes and cut the centre patch (as the Kaggle test set was cut); collect every failure."""
    patches, errors = [], []
    for row, value in enumerate(images):
        try:
            pixels = decode_image(image_bytes(value), max_pixels)
            if min(pixels.shape[:2]) < patch:
                raise ImageError(f"image is {pixels.shape[1]}x{pixels.shape[0]}, smaller than the model's "
                                 f"{patch}x{patch} patch")
            patches.append(centre_crop(pixels, patch))
        except ImageError as exc:
            errors.append(f"row {row}: {exc}")
    if errors:
        raise bad_request("; ".join(errors))
    return np.stack(patches) if patches else np.zeros((0, patch, patch, 3), np.uint8)


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
    if resolved["blend"] not in ("mean_square", "arithmetic", "geometric"):
        raise bad_request(f"param blend={resolved['blend']!r}; choose mean_square, arithmetic or geometric")
    if resolved["balance"] not in BALANCE_CHOICES:
        raise bad_request(f"param balance={resolved['balance']!r}; choose one of {', '.join(BALANCE_CHOICES)}")
    tta = resolved["tta"]
    if isinstance(tta, str) and tta.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        tta = tta.strip().lower() in ("true", "1", "yes")
    if not isinstance(tta, (bool, np.bool_)):
        raise bad_request(f"param tta={resolved['tta']!r}; send true or false")
    resolved["tta"] = bool(tta)
    return resolved


def predict_frame(ensemble: Ensemble, frame: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
    """The whole served prediction, callable without MLflow."""
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if "image" not in frame.columns:
        raise bad_request(f"the request has no 'image' column (columns: {list(frame.columns)}); send base64 image bytes "
                          "in a column named 'image'")
    settings = resolve_params(params)
    patches = row_patches(frame["image"].tolist(), ensemble.patch)
    flags = None if "manipulated" not in frame.columns else row_flags(frame["manipulated"].tolist())
    columns = ["camera", "manipulated", "manipulated_estimated"] + list(ensemble.labels)
    if len(patches) == 0:
        return pd.DataFrame(columns=columns)
    pred = ensemble.predict(patches, flags, tta=bool(settings["tta"]), blend=settings["blend"],
                            balance=settings["balance"])
    out = pd.DataFrame(pred.probs, columns=ensemble.labels)
    out.insert(0, "camera", np.asarray(ensemble.labels)[pred.labels])
    out.insert(1, "manipulated", pred.manipulated.astype(bool))
    out.insert(2, "manipulated_estimated", pred.manipulated_estimated.astype(bool))
    return out


class CamidModel(mlflow.pyfunc.PythonModel):
    """The registered model: an ensemble bundle (artifact `bundle`) behind `predict_frame`."""

    def load_context(self, context):
        self.ensemble = Ensemble.load(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return predict_frame(self.ensemble, model_input, params)
