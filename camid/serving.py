"""The registered MLflow pyfunc model: image bytes in, camera out, through `Ensemble.predict`.

Input: a DataFrame with an `image` column (JPEG, PNG or TIFF bytes; base64 in JSON requests) and an optional
`manipulated` column (bool; missing or null -> estimated by the model). Params: `tta` (bool), `blend`
(mean_square | arithmetic | geometric), `balance` (none | optimal | greedy: only for a request that is a
closed set with equal class counts). Output: one row per input with `camera`, `manipulated`,
`manipulated_estimated` and the probability of every camera (one column per camera label).

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

    inputs = Schema([ColSpec("binary", "image"), ColSpec("boolean", "manipulated", required=False)])
    outputs = Schema([ColSpec("string", "camera"), ColSpec("boolean", "manipulated"),
                      ColSpec("boolean", "manipulated_estimated")] + [ColSpec("double", label) for label in labels])
    params = ParamSchema([ParamSpec("tta", "boolean", DEFAULT_PARAMS["tta"]),
                          ParamSpec("blend", "string", DEFAULT_PARAMS["blend"]),
                          ParamSpec("balance", "string", DEFAULT_PARAMS["balance"])])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def row_patches(images, patch: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode each row's bytes and cut the centre patch (as the Kaggle test set was cut); collect every failure."""
    patches, errors = [], []
    for row, value in enumerate(images):
        try:
            if isinstance(value, str):  # a caller that bypassed the schema's base64 decoding
                try:
                    value = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise ImageError("not valid base64") from None
            if value is None or (isinstance(value, float) and np.isnan(value)):
                raise ImageError("no image given")
            pixels = decode_image(bytes(value), max_pixels)
            if min(pixels.shape[:2]) < patch:
                raise ImageError(f"image is {pixels.shape[1]}x{pixels.shape[0]}, smaller than the model's "
                                 f"{patch}x{patch} patch")
            patches.append(centre_crop(pixels, patch))
        except ImageError as exc:
            errors.append(f"row {row}: {exc}")
    if errors:
        raise bad_request("; ".join(errors))
    return np.stack(patches) if patches else np.zeros((0, patch, patch, 3), np.uint8)


def resolve_params(params: dict | None) -> dict:
    resolved = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    unknown = set(resolved) - set(DEFAULT_PARAMS)
    if unknown:
        raise bad_request(f"unknown param(s) {sorted(unknown)}; known: {sorted(DEFAULT_PARAMS)}")
    if resolved["blend"] not in ("mean_square", "arithmetic", "geometric"):
        raise bad_request(f"param blend={resolved['blend']!r}; choose mean_square, arithmetic or geometric")
    if resolved["balance"] not in BALANCE_CHOICES:
        raise bad_request(f"param balance={resolved['balance']!r}; choose one of {', '.join(BALANCE_CHOICES)}")
    if isinstance(resolved["tta"], str):
        resolved["tta"] = resolved["tta"].strip().lower() in ("1", "true", "yes")
    return resolved


def predict_frame(ensemble: Ensemble, frame: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
    """The whole served prediction, callable without MLflow (batch prediction uses it too)."""
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if "image" not in frame.columns:
        raise bad_request(f"the request has no 'image' column (columns: {list(frame.columns)}); send base64 image bytes "
                          "in a column named 'image'")
    settings = resolve_params(params)
    patches = row_patches(frame["image"].tolist(), ensemble.patch)
    flags = None
    if "manipulated" in frame.columns:
        flags = np.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else bool(v)
                          for v in frame["manipulated"].tolist()], dtype=object)
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
