"""The backbone registry: every backbone builds and trains, the model's contract, saving, and the weights errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from camid.errors import CamidError
from camid.models import (BACKBONES, BackbonePreprocessing, HighPassResiduals, PredictionErrors, compile_model,
                          configure_devices, create_model, get_backbone, list_backbones)
from camid.models.layers import PREPROCESSING_MODES
from tests.conftest import ROOT

CAMERAS = 10


def batch(patch: int, n: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = {"image": rng.uniform(0, 255, (n, patch, patch, 3)).astype("float32"),
         "manipulated": (np.arange(n) % 2).astype("float32").reshape(n, 1)}
    y = {"camera": np.arange(n) % CAMERAS, "manipulation": np.arange(n) % 9}
    return x, y


def test_registry_holds_the_issue_backbones():
    assert list_backbones() == sorted([
        "resnet50", "densenet201", "inceptionresnetv2", "mobilenet", "mobilenetv2", "mobilenetv3", "efficientnetv2",
        "convnext", "xception", "inceptionv3", "vgg16", "densenet121", "smallcnn", "smallcnn_learned", "smallcnn_rgb"])
    for backbone in BACKBONES.values():
        assert backbone.preprocessing in PREPROCESSING_MODES
    assert {a: BACKBONES[a].min_size for a in ("inceptionresnetv2", "inceptionv3", "xception", "resnet50")} == {
        "inceptionresnetv2": 75, "inceptionv3": 75, "xception": 71, "resnet50": 32}


# The two heaviest (30-40 s each on a shared 2-core CPU) run with `pytest -m slow`; their siblings densenet121
# and inceptionv3 take the same path (same preprocessing, same minimum size) in the default run.
HEAVIEST = {"densenet201", "inceptionresnetv2"}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in HEAVIEST else a
                                  for a in list_backbones()])
def test_every_backbone_builds_trains_one_step_and_predicts(arch):
    patch = get_backbone(arch).min_size
    model = create_model(arch, num_classes=CAMERAS, patch=patch)
    compile_model(model, learning_rate=1e-3, aux_weight=0.2)
    # One step through a traced graph costs up to a minute per large backbone on a CPU; eager mode runs the same
    # losses, gradients and Adam update in seconds. smallcnn, the CPU demo model, goes through the graph.
    model.run_eagerly = not arch.startswith("smallcnn")
    x, y = batch(patch)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert {"loss", "camera_loss", "manipulation_loss", "camera_accuracy"} <= set(logs)
    assert np.isfinite(logs["loss"])
    out = model.predict(x, verbose=0)
    assert set(out) == {"camera", "manipulation"}
    assert out["camera"].shape == (2, CAMERAS) and out["manipulation"].shape == (2, 9)
    assert out["camera"].dtype == np.float32
    np.testing.assert_allclose(out["camera"].sum(1), 1, rtol=1e-5)
    keras.backend.clear_session()


def test_unknown_arch_lists_the_registry():
    with pytest.raises(CamidError, match="unknown arch 'resnet51'.*densenet201.*smallcnn"):
        create_model("resnet51", num_classes=CAMERAS, patch=64)


def test_patch_below_the_backbone_minimum_is_refused():
    with pytest.raises(CamidError, match="inceptionv3 needs patches of at least 75 px, got patch=64"):
        create_model("inceptionv3", num_classes=CAMERAS, patch=64)


@pytest.mark.parametrize("mode", ["tf", "torch", "caffe"])
def test_preprocessing_matches_keras_applications(mode):
    x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = keras.applications.imagenet_utils.preprocess_input(x.copy(), mode=mode)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(BackbonePreprocessing(mode)(x)), expected, atol=1e-4)


@pytest.mark.parametrize("arch,constructor", [("mobilenetv3", "MobileNetV3Large"),
                                              ("efficientnetv2", "EfficientNetV2B0"), ("convnext", "ConvNeXtTiny")])
def test_registry_preprocessing_replaces_the_builtin_one(arch, constructor):
    """These three carry their own preprocessing; the registry builds them without it and declares the mode."""
    app = getattr(keras.applications, constructor)(include_top=False, weights=None, input_shape=(32, 32, 3))
    builtin = [layer for layer in app.layers if type(layer).__name__ in ("Rescaling", "Normalization")]
    x = np.random.default_rng(2).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    expected = x
    for layer in builtin:
        expected = layer(expected)
    ours = BackbonePreprocessing(get_backbone(arch).preprocessing)(x)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(expected), atol=1e-4)


def test_custom_layers_serialise():
    for layer in [BackbonePreprocessing("caffe"), HighPassResiduals(truncate=0.5), PredictionErrors(2, 0.5)]:
        config = keras.saving.serialize_keras_object(layer)
        assert config["registered_name"] == f"camid>{type(layer).__name__}"
        clone = keras.saving.deserialize_keras_object(config)
        assert type(clone) is type(layer) and clone.get_config() == layer.get_config()


def test_high_pass_residuals_cancel_flat_and_linear_content():
    ramp = np.tile(np.arange(16, dtype="float32"), (16, 1))
    x = np.stack([ramp, ramp.T, np.full((16, 16), 7.0, "float32")], axis=-1)[None]
    residuals = keras.ops.convert_to_numpy(HighPassResiduals()(x))
    assert residuals.shape == (1, 16, 16, 9)
    np.testing.assert_allclose(residuals[:, 2:-2, 2:-2], 0, atol=1e-4)  # away from the zero-padded border


def test_prediction_errors_stay_prediction_errors_through_training():
    """Bayar & Stamm's constraint as a reparametrisation: every filter is -1 at the centre and its neighbours are
    positive and sum to 1, before and after optimiser steps, so flat content cancels and a saved model reloads it."""
    layer = PredictionErrors(filters=2)
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(layer(inputs)))
    model.compile(optimizer=keras.optimizers.Adam(0.5), loss="mse")
    rng = np.random.default_rng(0)
    for _ in range(3):
        model.train_on_batch(rng.uniform(0, 1, (4, 16, 16, 3)).astype("float32"), rng.normal(0, 1, (4, 6)))
    kernel = keras.ops.convert_to_numpy(layer.kernel())
    assert kernel.shape == (5, 5, 3, 2)
    np.testing.assert_allclose(kernel[2, 2], -1)
    np.testing.assert_allclose(kernel.sum(axis=(0, 1)), 0, atol=1e-5)
    assert (np.delete(kernel.reshape(25, 3, 2), 12, axis=0) > 0).all()
    assert not np.allclose(keras.ops.convert_to_numpy(layer.free), PredictionErrors(2).build_free((16, 16, 3)))
    flat = np.full((1, 16, 16, 3), 0.4, "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(flat))[:, 2:-2, 2:-2], 0, atol=1e-5)


@pytest.mark.parametrize("arch", ["smallcnn_learned", "smallcnn_rgb"])
def test_the_smallcnn_front_ends_save_and_reload(arch, tmp_path):
    model = create_model(arch, num_classes=CAMERAS, patch=32)
    x, _ = batch(32)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(model.predict(x, verbose=0)["camera"], again.predict(x, verbose=0)["camera"],
                               atol=1e-6)
    keras.backend.clear_session()


def test_flag_feeds_the_camera_head_and_not_the_manipulation_head():
    model = create_model("smallcnn", num_classes=CAMERAS, patch=32)
    x, _ = batch(32)
    x0 = {**x, "manipulated": np.zeros((2, 1), "float32")}
    x1 = {**x, "manipulated": np.ones((2, 1), "float32")}
    out0, out1 = model(x0, training=False), model(x1, training=False)
    assert not np.allclose(out0["camera"], out1["camera"])
    np.testing.assert_array_equal(out0["manipulation"], out1["manipulation"])


def test_dense_stack_takes_sizes_and_broadcasts_dropout():
    model = create_model("smallcnn", num_classes=CAMERAS, patch=32, dense=(64, 32, 16), dropout=(0.5,))
    assert [layer.units for layer in model.layers if layer.name.startswith("dense_")] == [64, 32, 16]
    assert [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)] == [0.5, 0.5, 0.5]
    bare = create_model("smallcnn", num_classes=CAMERAS, patch=32, dense=(), dropout=())
    assert not [layer for layer in bare.layers if isinstance(layer, (keras.layers.Dropout,))]
    with pytest.raises(CamidError, match="more rates than there are dense layers"):
        create_model("smallcnn", num_classes=CAMERAS, patch=32, dense=(64,), dropout=(0.1, 0.2))


def test_saved_model_predicts_the_same_in_a_fresh_process(tmp_path):
    model = create_model("smallcnn", num_classes=CAMERAS, patch=32, dense=(16,))
    x, _ = batch(32, n=4)
    np.savez(tmp_path / "x.npz", **x)
    model.save(tmp_path / "model.keras")
    expected = model.predict(x, verbose=0)
    script = (
        "import sys, numpy as np, keras, camid.models\n"
        "model = keras.models.load_model(sys.argv[1])\n"
        "out = model.predict(dict(np.load(sys.argv[2])), verbose=0)\n"
        "np.savez(sys.argv[3], **out)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.keras"), str(tmp_path / "x.npz"),
                    str(tmp_path / "out.npz")], check=True, cwd=ROOT, env={**os.environ, "KERAS_BACKEND": keras.backend.backend()})
    got = np.load(tmp_path / "out.npz")
    assert set(got.files) == {"camera", "manipulation"}
    for name in ("camera", "manipulation"):
        np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.filterwarnings("ignore:Skipping nested container")  # Keras warns on its way to the mismatch error
def test_whole_model_weights_file_restores_the_model(tmp_path):
    model = create_model("smallcnn", num_classes=CAMERAS, patch=32)
    x, _ = batch(32)
    model.save_weights(tmp_path / "model.weights.h5")
    model.save(tmp_path / "model.keras")
    for file in ("model.weights.h5", "model.keras"):
        restored = create_model("smallcnn", num_classes=CAMERAS, patch=32, weights=str(tmp_path / file))
        np.testing.assert_array_equal(restored.predict(x, verbose=0)["camera"], model.predict(x, verbose=0)["camera"])
    with pytest.raises(CamidError, match="other arguments"):
        create_model("smallcnn", num_classes=CAMERAS + 1, patch=32, weights=str(tmp_path / "model.weights.h5"))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(CamidError, match="weights file .*nope.weights.h5 not found; weights takes none, imagenet"):
        create_model("smallcnn", num_classes=CAMERAS, patch=32, weights=str(tmp_path / "nope.weights.h5"))


def test_smallcnn_has_no_imagenet_weights():
    with pytest.raises(CamidError, match="smallcnn has no ImageNet weights"):
        create_model("smallcnn", num_classes=CAMERAS, patch=32, weights="imagenet")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Keras cache and no network: name resolution fails at once, as on an air-gapped machine."""
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "keras" / "models"


def test_imagenet_weights_missing_offline_says_what_to_fetch_and_where(offline):
    with pytest.raises(CamidError) as error:
        create_model("resnet50", num_classes=CAMERAS, patch=32, weights="imagenet")
    message = str(error.value)
    file = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert f"https://storage.googleapis.com/tensorflow/keras-applications/resnet/{file}" in message
    assert str(offline / file) in message
    assert f"weights=/path/to/{file}" in message
    assert not (offline / file).exists()


def test_imagenet_file_names_follow_keras():
    assert get_backbone("mobilenet").imagenet_file(128) == "mobilenet_1_0_128_tf_no_top.h5"
    assert get_backbone("mobilenet").imagenet_file(512) == "mobilenet_1_0_224_tf_no_top.h5"
    assert get_backbone("mobilenetv2").imagenet_url(96) == ("https://storage.googleapis.com/tensorflow/keras-"
                                                             "applications/mobilenet_v2/mobilenet_v2_weights_tf_dim_"
                                                             "ordering_tf_kernels_1.0_96_no_top.h5")
    assert get_backbone("efficientnetv2").imagenet_file(64) == "efficientnetv2-b0_notop.h5"
    assert get_backbone("smallcnn").imagenet_file(64) is None


def test_imagenet_weights_come_from_the_cache_or_a_backbone_file(offline):
    # A stand-in for the real notop file: same layers, random values, written the way keras-applications files are.
    reference = keras.applications.MobileNet(include_top=False, pooling="avg", weights=None, input_shape=(32, 32, 3))
    offline.mkdir(parents=True)
    cached = offline / "mobilenet_1_0_224_tf_no_top.h5"
    reference.save(cached)
    for weights in ("imagenet", str(cached)):
        model = create_model("mobilenet", num_classes=CAMERAS, patch=32, weights=weights)
        backbone = model.layers[2]
        assert backbone.name.startswith("mobilenet")
        for got, want in zip(backbone.get_weights(), reference.get_weights()):
            np.testing.assert_array_equal(got, want)


def test_configure_devices_on_cpu_keeps_float32():
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            pytest.skip("this machine has a GPU")
    strategy = configure_devices()
    with strategy.scope():
        pass
    assert keras.mixed_precision.global_policy().name == "float32"


def test_mixed_precision_keeps_float32_outputs():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = create_model("smallcnn", num_classes=CAMERAS, patch=32)
        out = model(batch(32)[0], training=False)
        assert keras.backend.standardize_dtype(out["camera"].dtype) == "float32"
        assert keras.backend.standardize_dtype(out["manipulation"].dtype) == "float32"
        assert model.get_layer("dense_1").compute_dtype == "float16"
    finally:
        keras.mixed_precision.set_global_policy("float32")


MALLOC_PROBE = r"""
import ctypes, json
from camid.tools.plan import time_network_fit

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mmapped(size=16 * 2 ** 20):
    # glibc marks a chunk it mmapped with bit 2 of the size field just before the pointer; freeing one first lets
    # glibc's dynamic threshold (where it is still dynamic) rise above the size
    libc.free(libc.malloc(size))
    pointers = [libc.malloc(size) for _ in range(4)]
    flags = [bool(ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value & 2) for p in pointers]
    for p in pointers:
        libc.free(p)
    return all(flags)

time_network_fit("smallcnn", patch=16, batch_size=4, steps=2, warmup=1)  # PyDataset fits with the malloc callback
print(json.dumps({"mmapped": mmapped()}))
"""


@pytest.mark.skipif(keras.backend.backend() != "tensorflow" or not sys.platform.startswith("linux"),
                    reason="TensorFlow's malloc setting is made on the TensorFlow backend with glibc")
@pytest.mark.parametrize("switch", ["1", "0"])
def test_training_undoes_tensorflows_malloc_setting(switch):
    """A PyDataset fit makes TensorFlow pin glibc's mmap threshold at 128 KiB (every MiB-sized tensor a fresh mmap:
    a training step twice as slow, bench/malloc_thresholds.py); the training callback puts it back, so a 16-MiB
    allocation comes from the heap again. CAMID_MALLOC_THRESHOLDS=0 leaves TensorFlow's setting. In a fresh process,
    since the setting is the process's."""
    env = {**os.environ, "CAMID_MALLOC_THRESHOLDS": switch, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE], env=env, cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"mmapped": switch == "0"}
