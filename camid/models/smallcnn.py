"""A small CNN that learns camera traces from 64-px patches on a CPU in minutes: the demo backbone.

Fixed SRM noise residuals first, then conv/BN/ReLU blocks. Nothing downsamples before the first block has
looked at full resolution: the traces (colour filter array interpolation, sensor noise, JPEG grid) live at
the pixel level and a strided stem would blur them away.
"""
from __future__ import annotations

import keras
from keras import layers

from camid.models.layers import HighPassResiduals, PredictionErrors

BLOCK_FILTERS = (16, 32, 64)
HEAD_FILTERS = 128
MIN_SIZE = 2 ** len(BLOCK_FILTERS) * 2  # the last block still sees at least 2x2
RESIDUAL_TRUNCATE = 3 / 255  # three grey levels, for inputs scaled to 0..1
# Demo runs last a few hundred steps: at Keras's default momentum (0.99) the moving statistics that inference
# uses would still be far from the training batches' and validation accuracy would lag far behind training.
BN_MOMENTUM = 0.9
# The front ends `SmallCNN(front=...)` takes: "srm" the fixed SRM residuals (the default backbone, `smallcnn`),
# "learned" Bayar & Stamm's constrained prediction errors (`smallcnn_learned`), "rgb" the pixels themselves
# (`smallcnn_rgb`, the control that shows what a residual front end buys). README, "Choosing the CPU default".
FRONTS = ("srm", "learned", "rgb")


def _conv_bn_relu(x, filters: int, name: str):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def SmallCNN(input_shape: tuple[int, int, int], weights: str | None = None, name: str = "smallcnn",
             front: str = "srm") -> keras.Model:
    """Images scaled to 0..1 in, average-pooled features (HEAD_FILTERS) out; `weights` a weights file or None;
    `front` one of FRONTS."""
    inputs = keras.Input(input_shape)
    if front == "srm":
        x = HighPassResiduals(truncate=RESIDUAL_TRUNCATE, name="residuals")(inputs)
    elif front == "learned":
        x = PredictionErrors(filters=3, truncate=RESIDUAL_TRUNCATE, name="residuals")(inputs)
    elif front == "rgb":
        x = inputs
    else:
        raise ValueError(f"unknown front {front!r}; expected one of {FRONTS}")
    for block, filters in enumerate(BLOCK_FILTERS, start=1):
        x = _conv_bn_relu(x, filters, f"block{block}a")
        x = _conv_bn_relu(x, filters, f"block{block}b")
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    x = _conv_bn_relu(x, HEAD_FILTERS, "head")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model
