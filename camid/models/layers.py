"""camid's own Keras layers, registered so a saved .keras file loads anywhere `camid.models` is imported.

Both are fixed (no trainable weights) and written with `keras.ops` only, so they run on any Keras backend.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

PREPROCESSING_MODES = ("tf", "torch", "caffe", "none", "raw")
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="camid")
class BackbonePreprocessing(keras.layers.Layer):
    """Turn RGB pixels in 0..255 into what a backbone was trained on, inside the model.

    Modes (the same as `keras.applications.imagenet_utils.preprocess_input`, plus two):
    "tf" x/127.5 - 1; "torch" x/255 then ImageNet mean/std; "caffe" RGB->BGR then ImageNet mean subtracted;
    "raw" x/255; "none" unchanged.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {PREPROCESSING_MODES}")
        self.mode = mode

    def call(self, images):
        if self.mode == "tf":
            return images / 127.5 - 1.0
        if self.mode == "raw":
            return images / 255.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(IMAGENET_MEAN_RGB, dtype=images.dtype)
            std = ops.convert_to_tensor(IMAGENET_STD_RGB, dtype=images.dtype)
            return (images / 255.0 - mean) / std
        if self.mode == "caffe":
            return ops.flip(images, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=images.dtype)
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def srm_kernels() -> np.ndarray:
    """Three SRM high-pass kernels (Fridrich & Kodovsky's rich model, as used by RGB-N), shape (5, 5, 3).

    Each sums to zero, so flat and smoothly varying scene content cancels while the pixel-level noise left by
    the sensor, the demosaicing and the JPEG encoder stays.
    """
    second_order_2d = np.array([[0, 0, 0, 0, 0],
                                [0, -1, 2, -1, 0],
                                [0, 2, -4, 2, 0],
                                [0, -1, 2, -1, 0],
                                [0, 0, 0, 0, 0]]) / 4.0
    square_5x5 = np.array([[-1, 2, -2, 2, -1],
                           [2, -6, 8, -6, 2],
                           [-2, 8, -12, 8, -2],
                           [2, -6, 8, -6, 2],
                           [-1, 2, -2, 2, -1]]) / 12.0
    second_order_row = np.zeros((5, 5))
    second_order_row[2, 1:4] = [1, -2, 1]
    second_order_row /= 2.0
    return np.stack([second_order_2d, square_5x5, second_order_row], axis=-1).astype("float32")


def truncated(residuals, truncate: float | None):
    """Residuals clipped at +-`truncate` and divided by it (spanning [-1, 1]); unchanged where `truncate` is None."""
    if truncate is None:
        return residuals
    return ops.clip(residuals, -truncate, truncate) / truncate


@keras.saving.register_keras_serializable(package="camid")
class HighPassResiduals(keras.layers.Layer):
    """Noise residuals: each SRM kernel applied to each input channel (C in -> 3C out), then truncated.

    The kernels are constants, not weights: the front end stays a fixed high-pass filter, so the network
    can't learn to look at scene content. Truncating at `truncate` (in input units) clips strong edges, whose
    residuals would otherwise swamp the faint camera traces; the result is then divided by `truncate`, so it
    spans [-1, 1] whatever the input scale (tiny activations would leave BatchNormalization's moving variance
    far from the batch variance for thousands of steps, and inference would disagree with training).
    """

    def __init__(self, truncate: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.truncate = truncate

    def call(self, images):
        channels = images.shape[-1]
        kernel = np.repeat(srm_kernels()[:, :, None, :], channels, axis=2)  # (5, 5, C, 3): depthwise multiplier 3
        residuals = ops.depthwise_conv(images, ops.convert_to_tensor(kernel, dtype=images.dtype), padding="same")
        return truncated(residuals, self.truncate)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] * 3)

    def get_config(self):
        return {**super().get_config(), "truncate": self.truncate}


@keras.saving.register_keras_serializable(package="camid")
class PredictionErrors(keras.layers.Layer):
    """Learned noise residuals: `filters` prediction-error filters per input channel (C in -> filters*C out).

    Bayar & Stamm's constrained convolution (2016, 2018): each 5x5 filter predicts the centre pixel from its 24
    neighbours and subtracts the pixel, so the layer can only ever emit a prediction error, never scene content,
    yet it learns which neighbours predict well for the cameras at hand (a demosaicing's interpolation, say). The
    constraint is a reparametrisation, not a clip after each step: the neighbours' weights are a softmax of free
    weights (positive, summing to 1) and the centre weight is -1, so every filter sums to zero on any backend and
    any optimiser. As in `HighPassResiduals`, the errors are truncated at `truncate` and divided by it.
    """

    SIZE = 5

    def __init__(self, filters: int = 3, truncate: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.truncate = truncate

    def build_free(self, input_shape) -> np.ndarray:
        """The free weights' start, (24, C, filters): near the mean of the 8 nearest neighbours (free weights 0
        there, -2 further out), each filter a little apart (seeded noise, so a build is reproducible)."""
        start = np.full((self.SIZE, self.SIZE), -2.0)
        start[1:4, 1:4] = 0.0
        start = np.delete(start.reshape(-1), self.SIZE * self.SIZE // 2)
        shape = (self.SIZE * self.SIZE - 1, input_shape[-1], self.filters)
        return (start[:, None, None] + np.random.default_rng(0).normal(0, 0.1, shape)).astype("float32")

    def build(self, input_shape):
        start = self.build_free(input_shape)
        self.free = self.add_weight(name="free", shape=start.shape,
                                    initializer=lambda shape, dtype=None: ops.convert_to_tensor(start, dtype=dtype))

    def kernel(self):
        """The (5, 5, C, filters) depthwise kernel: softmax weights on the neighbours, -1 at the centre."""
        weights = ops.softmax(self.free, axis=0)
        centre = self.SIZE * self.SIZE // 2
        minus_one = -ops.ones((1, *self.free.shape[1:]), dtype=weights.dtype)
        full = ops.concatenate([weights[:centre], minus_one, weights[centre:]], axis=0)
        return ops.reshape(full, (self.SIZE, self.SIZE, *self.free.shape[1:]))

    def call(self, images):
        errors = ops.depthwise_conv(images, ops.cast(self.kernel(), images.dtype), padding="same")
        return truncated(errors, self.truncate)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] * self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "truncate": self.truncate}
