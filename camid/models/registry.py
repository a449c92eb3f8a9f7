"""The backbone registry and its one front door, `create_model(arch, ...)`.

Each backbone knows how to build itself, the input preprocessing its ImageNet weights expect, its smallest
input size and where those weights come from. Every camid model, whatever its backbone, has the same shape:

    image (P, P, 3) 0..255 -> preprocessing -> backbone -> average-pooled features ─┬─ + manipulated flag
                                                                                     │   -> dense stack -> camera
                                                                                     └─> manipulation

`camera` is a softmax over the cameras. `manipulation` is a softmax over "none" (class 0) and the eight test-set
manipulations; it sees the features, not the flag, so it can estimate the flag when a caller doesn't know it.
Preprocessing is a layer of the model, so a saved .keras file is all serving needs.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import keras

from camid.errors import CamidError
from camid.models.layers import BackbonePreprocessing
from camid.models.smallcnn import MIN_SIZE as SMALLCNN_MIN_SIZE
from camid.models.smallcnn import SmallCNN

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class Backbone:
    name: str
    builder: Callable[..., keras.Model]  # (input_shape=, weights=) -> model emitting average-pooled features
    preprocessing: str                   # a camid.models.layers.PREPROCESSING_MODES entry
    min_size: int                        # smallest patch side the backbone accepts
    weights_file: str | None             # ImageNet notop file in the Keras cache; None: no ImageNet weights
    description: str
    weights_folder: str = ""             # where weights_file lives under KERAS_WEIGHTS_URL
    weights_sizes: tuple[int, ...] = ()  # MobileNets: input sizes with their own file ({size}); others use 224

    def imagenet_file(self, patch: int) -> str | None:
        """The cache file name Keras uses for this backbone's ImageNet weights at this patch size."""
        if self.weights_file is None:
            return None
        return self.weights_file.format(size=patch if patch in self.weights_sizes else 224)

    def imagenet_url(self, patch: int) -> str | None:
        file = self.imagenet_file(patch)
        return None if file is None else f"{KERAS_WEIGHTS_URL}{self.weights_folder}/{file}"


def _application(constructor: Callable, **options) -> Callable[..., keras.Model]:
    """A keras.applications backbone without its classifier, average-pooled; the input preprocessing is ours."""
    return partial(constructor, include_top=False, pooling="avg", **options)


_apps = keras.applications
BACKBONES: dict[str, Backbone] = {b.name: b for b in [
    Backbone("resnet50", _application(_apps.ResNet50), "caffe", 32,
             "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "ResNet-50 (He et al. 2015); 23.6M parameters",
             "resnet"),
    Backbone("densenet121", _application(_apps.DenseNet121), "torch", 32,
             "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", "DenseNet-121; 7.0M parameters", "densenet"),
    Backbone("densenet201", _application(_apps.DenseNet201), "torch", 32,
             "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "DenseNet-201; 18.3M parameters; the best published single model in the competition", "densenet"),
    Backbone("inceptionresnetv2", _application(_apps.InceptionResNetV2), "tf", 75,
             "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "Inception-ResNet-v2; 54.3M parameters", "inception_resnet_v2"),
    Backbone("inceptionv3", _application(_apps.InceptionV3), "tf", 75,
             "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "Inception-v3; 21.8M parameters",
             "inception_v3"),
    Backbone("xception", _application(_apps.Xception), "tf", 71,
             "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", "Xception; 20.9M parameters", "xception"),
    Backbone("mobilenet", _application(_apps.MobileNet), "tf", 32, "mobilenet_1_0_{size}_tf_no_top.h5",
             "MobileNet v1, width 1.0; 3.2M parameters", "mobilenet", (128, 160, 192, 224)),
    Backbone("mobilenetv2", _application(_apps.MobileNetV2), "tf", 32,
             "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5",
             "MobileNet v2, width 1.0; 2.3M parameters", "mobilenet_v2", (96, 128, 160, 192, 224)),
    # Large rather than Small: the traces are subtle and the extra width costs little next to the data pipeline.
    Backbone("mobilenetv3", _application(_apps.MobileNetV3Large, include_preprocessing=False), "tf", 32,
             "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", "MobileNet v3 Large, width 1.0; 3.0M parameters",
             "mobilenet_v3"),
    Backbone("efficientnetv2", _application(_apps.EfficientNetV2B0, include_preprocessing=False), "torch", 32,
             "efficientnetv2-b0_notop.h5", "EfficientNetV2-B0; 5.9M parameters", "efficientnet_v2"),
    Backbone("convnext", _application(_apps.ConvNeXtTiny, include_preprocessing=False), "torch", 32,
             "convnext_tiny_notop.h5", "ConvNeXt Tiny; 27.8M parameters", "convnext"),
    Backbone("vgg16", _application(_apps.VGG16), "caffe", 32, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "VGG-16; 14.7M parameters", "vgg16"),
    Backbone("smallcnn", SmallCNN, "raw", SMALLCNN_MIN_SIZE, None,
             "fixed SRM noise residuals + 7 conv/BN/ReLU layers, no early downsampling; 0.15M parameters; "
             "learns camera traces from 64-px patches on a CPU"),
    Backbone("smallcnn_learned", partial(SmallCNN, front="learned"), "raw", SMALLCNN_MIN_SIZE, None,
             "smallcnn with learned prediction-error filters (Bayar & Stamm's constrained convolution) in place of "
             "the fixed SRM residuals"),
    Backbone("smallcnn_rgb", partial(SmallCNN, front="rgb"), "raw", SMALLCNN_MIN_SIZE, None,
             "smallcnn on the pixels themselves, no residual front end (a control)"),
]}


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def get_backbone(arch: str) -> Backbone:
    try:
        return BACKBONES[arch]
    except KeyError:
        raise CamidError(f"unknown arch {arch!r}; the registry has: {', '.join(list_backbones())}") from None


def create_model(arch: str, num_classes: int, patch: int, weights: str = "none",
                 dense: Sequence[int] = (128,), dropout: Sequence[float] = (0.3,),
                 n_manipulations: int = 9) -> keras.Model:
    """Build a camid model: inputs {"image", "manipulated"}, outputs {"camera", "manipulation"} (module docstring).

    weights: "none" (random init), "imagenet" (backbone from the Keras cache, downloaded if possible), or a file:
    a .weights.h5 or .keras file of a whole camid model built with the same arguments, or a keras-applications
    notop .h5 file for the backbone alone.
    """
    backbone = get_backbone(arch)
    if patch < backbone.min_size:
        raise CamidError(f"arch={arch} needs patches of at least {backbone.min_size} px, got patch={patch}: "
                         "raise the patch size or pick another arch")
    rates = _dropout_per_layer(dense, dropout)
    backbone_weights, model_weights = _resolve_weights(backbone, weights, patch)

    image = keras.Input((patch, patch, 3), name="image")
    manipulated = keras.Input((1,), name="manipulated")
    x = BackbonePreprocessing(backbone.preprocessing, name="preprocessing")(image)
    features = backbone.builder(input_shape=(patch, patch, 3), weights=backbone_weights)(x)
    x = keras.layers.Concatenate(name="features_and_flag")([features, manipulated])
    for i, (units, rate) in enumerate(zip(dense, rates), start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{i}")(x)
        x = keras.layers.Dropout(rate, name=f"dropout_{i}")(x)
    # float32 softmax outputs even under mixed precision: float16 probabilities underflow in the log loss.
    camera = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="camera")(x)
    manipulation = keras.layers.Dense(n_manipulations, activation="softmax", dtype="float32",
                                      name="manipulation")(features)
    model = keras.Model({"image": image, "manipulated": manipulated},
                        {"camera": camera, "manipulation": manipulation}, name=f"camid_{arch}")
    if model_weights is not None:
        try:
            model.load_weights(model_weights)
        except (ValueError, KeyError) as error:
            raise CamidError(f"could not load {model_weights} into a {arch} model with {num_classes} cameras, "
                             f"patch {patch}, dense {list(dense)}: the file was saved from a model built with "
                             f"other arguments ({error})") from error
    return model


def compile_model(model: keras.Model, learning_rate: float, aux_weight: float) -> None:
    """Adam; sparse cross-entropy on both heads, the manipulation head weighted by aux_weight; camera accuracy."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss={"camera": "sparse_categorical_crossentropy", "manipulation": "sparse_categorical_crossentropy"},
        loss_weights={"camera": 1.0, "manipulation": aux_weight},
        metrics={"camera": ["accuracy"]},
    )


def _dropout_per_layer(dense: Sequence[int], dropout: Sequence[float]) -> list[float]:
    """One rate per dense layer: a shorter list repeats its last rate (an empty one means no dropout)."""
    dropout = list(dropout)
    if len(dropout) > len(dense):
        raise CamidError(f"dropout {dropout} has more rates than there are dense layers {list(dense)}")
    return dropout + [dropout[-1] if dropout else 0.0] * (len(dense) - len(dropout))


def keras_cache_dir() -> Path:
    """Where Keras caches downloads: $KERAS_HOME, else ~/.keras (read now, not when Keras was imported)."""
    return Path(os.environ.get("KERAS_HOME") or Path("~/.keras").expanduser())


def _resolve_weights(backbone: Backbone, weights: str, patch: int) -> tuple[str | None, str | None]:
    """Map the `weights` argument to (file for the backbone, file for the whole model)."""
    if weights == "none":
        return None, None
    if weights == "imagenet":
        return _imagenet_weights(backbone, patch), None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise CamidError(f"weights file {path} not found; weights takes none, imagenet, or the path of a "
                         ".weights.h5 / .keras file (a whole camid model) or of a keras-applications notop .h5 "
                         "file (the backbone)")
    if path.name.endswith((".weights.h5", ".keras")):
        return None, str(path)
    if path.suffix == ".h5":
        return str(path), None
    raise CamidError(f"weights file {path}: expected a .weights.h5 or .keras file (a whole camid model) "
                     "or a keras-applications notop .h5 file (the backbone)")


def _imagenet_weights(backbone: Backbone, patch: int) -> str:
    """The cached ImageNet weights file, downloading it if it's missing; a clear error when that fails."""
    file, url = backbone.imagenet_file(patch), backbone.imagenet_url(patch)
    if file is None:
        raise CamidError(f"{backbone.name} has no ImageNet weights: use weights=none or a weights file")
    cache = keras_cache_dir()
    cached = cache / "models" / file
    if cached.is_file():
        return str(cached)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return keras.utils.get_file(file, url, cache_subdir="models", cache_dir=str(cache))
    except Exception as error:  # Keras wraps every network failure in a bare Exception
        raise CamidError(
            f"ImageNet weights for {backbone.name} ({file}) are not in the Keras cache and could not be "
            f"downloaded: {error}\n"
            f"  Fetch {url}\n"
            f"  and put it at {cached} (the cache is $KERAS_HOME/models, else ~/.keras/models),\n"
            f"  or pass weights=/path/to/{file}") from error


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """Make a stalled download fail instead of hanging (urllib uses the global default timeout)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
