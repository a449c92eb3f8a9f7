"""Where training runs: all visible GPUs in data parallel, mixed precision on GPU, plain float32 on CPU.

Call `configure_devices()` before building the model and build it inside `strategy.scope()`. The TensorFlow
parts are imported only under the TensorFlow backend, so this module imports under JAX or PyTorch too.
"""
from __future__ import annotations

import contextlib

import keras


class SingleDevice:
    """The strategy stand-in for backends without tf.distribute: `scope()` does nothing."""

    num_replicas_in_sync = 1

    def scope(self):
        return contextlib.nullcontext()


def configure_devices(mixed_precision: bool = True):
    """Return the distribution strategy for the visible GPUs; switch to mixed_float16 when there is a GPU.

    TensorFlow: MirroredStrategy over several GPUs, the default strategy otherwise. JAX: several GPUs get a
    keras.distribution.DataParallel and a SingleDevice stand-in. PyTorch: one device. The model's softmax
    outputs stay float32 (create_model sets their dtype).
    """
    backend = keras.backend.backend()
    gpus = _gpu_count(backend)
    if gpus and mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.distribute.MirroredStrategy() if gpus > 1 else tf.distribute.get_strategy()
    if backend == "jax" and gpus > 1:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    return SingleDevice()


def _gpu_count(backend: str) -> int:
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return sum(device.platform == "gpu" for device in jax.devices())
    if backend == "torch":
        import torch

        return torch.cuda.device_count()
    return 0
