"""Where training runs: all visible GPUs in data parallel, several machines when TF_CONFIG names a cluster, mixed
precision on GPU, plain float32 on CPU.

Call `configure_devices()` before building the model and build it inside `strategy.scope()`. The TensorFlow
parts are imported only under the TensorFlow backend, so this module imports under JAX or PyTorch too.

Several machines: set TF_CONFIG on each (TensorFlow's own format, parsed by `cluster_from_env`) and run the same
command on every one; `configure_devices()` then returns a `tf.distribute.MultiWorkerMirroredStrategy`. Every
worker trains on its share of each global batch, gradients are all-reduced, and the weights stay identical on all
workers. TensorFlow only sets collective ops up at program start, so call `configure_devices()` before anything
runs a TensorFlow op (importing TensorFlow and Keras, listing devices and seeding are fine).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass

import keras

from camid.errors import CamidError

TF_CONFIG = "TF_CONFIG"
# What a valid TF_CONFIG looks like, for the error messages.
EXAMPLE_TF_CONFIG = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}')
TRAINING_JOBS = ("chief", "worker")  # the jobs that train under MultiWorkerMirroredStrategy
_multi_worker_strategies: dict[str, object] = {}  # TF_CONFIG -> its strategy: collectives are set up once a process


class SingleDevice:
    """The strategy stand-in for backends without tf.distribute: `scope()` does nothing."""

    num_replicas_in_sync = 1

    def scope(self):
        return contextlib.nullcontext()


@dataclass(frozen=True)
class Cluster:
    """This process's place in the TF_CONFIG cluster."""

    workers: int                # tasks that train: the chief (if any) and the workers
    task_type: str              # "chief" or "worker"
    task_index: int
    addresses: tuple[str, ...]  # host:port of every training task, chief first
    has_chief_task: bool        # the cluster names a "chief" job (else worker 0 is the chief)

    @property
    def is_chief(self) -> bool:
        """The chief writes the outputs: the "chief" task, or worker 0 when the cluster names none (TF's rule)."""
        return self.rank == 0

    @property
    def rank(self) -> int:
        """0 for the chief, then 1, 2, ... for the other workers."""
        return 0 if self.task_type == "chief" else self.task_index + int(self.has_chief_task)


def _fail(problem: str) -> CamidError:
    return CamidError(f"TF_CONFIG {problem}. Set it on every machine to JSON naming the whole cluster and this "
                      f"machine's task, e.g. {EXAMPLE_TF_CONFIG} (index 1 on the second machine), or unset it to "
                      "train on one machine")


def _addresses(job: str, entries) -> list[str]:
    if not isinstance(entries, list) or not entries:
        raise _fail(f"cluster.{job} must be a non-empty list of \"host:port\" strings, got {entries!r}")
    for entry in entries:
        host, sep, port = entry.rpartition(":") if isinstance(entry, str) else ("", "", "")
        if not (host and sep and port.isdigit() and 0 < int(port) < 65536):
            raise _fail(f"cluster.{job} has {entry!r}, which is not a \"host:port\" address")
    return entries


def cluster_from_env(environ=None) -> Cluster | None:
    """The cluster TF_CONFIG describes (None when it is unset or empty); CamidError when it is malformed."""
    raw = (os.environ if environ is None else environ).get(TF_CONFIG, "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise _fail(f"is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise _fail(f"must be a JSON object, got {type(config).__name__}")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise _fail('has no "cluster" object naming the machines')
    for job in cluster:
        if job == "ps":
            raise _fail('names "ps" tasks: parameter-server training is not supported, camid trains with '
                        'MultiWorkerMirroredStrategy (only "chief" and "worker" tasks)')
        if job == "evaluator":
            raise _fail('names an "evaluator" task: not supported, every worker scores the validation set at the '
                        'end of each epoch (only "chief" and "worker" tasks)')
        if job not in TRAINING_JOBS:
            raise _fail(f'names a job {job!r}: only "chief" and "worker" tasks are supported')
    jobs = {job: _addresses(job, cluster[job]) for job in TRAINING_JOBS if job in cluster}
    if len(jobs.get("chief", [])) > 1:
        raise _fail(f"names {len(jobs['chief'])} chiefs: at most one")
    addresses = [*jobs.get("chief", []), *jobs.get("worker", [])]
    duplicates = sorted({a for a in addresses if addresses.count(a) > 1})
    if duplicates:
        raise _fail(f"gives the address {', '.join(duplicates)} to more than one task: each needs a port of its own")
    task = config.get("task")
    if not isinstance(task, dict):
        raise _fail('has no "task" object saying which of the cluster\'s tasks this machine is')
    task_type, index = task.get("type"), task.get("index")
    if not isinstance(task_type, str) or task_type not in jobs:
        raise _fail(f"says task.type {task_type!r}, which is not a job of its cluster ({', '.join(jobs)})")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(jobs[task_type]):
        raise _fail(f"says task.index {index!r}: it must be an integer from 0 to {len(jobs[task_type]) - 1} "
                    f"(the position of this machine in cluster.{task_type})")
    return Cluster(workers=len(addresses), task_type=task_type, task_index=index, addresses=tuple(addresses),
                   has_chief_task="chief" in jobs)


def is_chief() -> bool:
    """Whether this process writes the outputs (models, metrics, MLflow runs): always, unless TF_CONFIG names a
    cluster of several workers and this is not its chief."""
    cluster = cluster_from_env()
    return cluster is None or cluster.workers < 2 or cluster.is_chief


def configure_devices(mixed_precision: bool = True):
    """Return the distribution strategy; switch to mixed_float16 when there is a GPU.

    TensorFlow: MultiWorkerMirroredStrategy when TF_CONFIG names a cluster of more than one worker (all of each
    machine's GPUs, or its CPU), else MirroredStrategy over several GPUs, else the default strategy. JAX: several
    GPUs get a keras.distribution.DataParallel and a SingleDevice stand-in. PyTorch: one device. Several machines
    need the TensorFlow backend. The model's softmax outputs stay float32 (create_model sets their dtype).
    """
    backend = keras.backend.backend()
    cluster = cluster_from_env()
    multi_worker = cluster is not None and cluster.workers > 1
    if multi_worker and backend != "tensorflow":
        raise CamidError(f"TF_CONFIG names a cluster of {cluster.workers} workers, but training on several machines "
                         f"runs on TensorFlow's MultiWorkerMirroredStrategy and the Keras backend is {backend!r}: "
                         "set KERAS_BACKEND=tensorflow on every machine, or unset TF_CONFIG to train on this one")
    gpus = _gpu_count(backend)
    if gpus and mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    if backend == "tensorflow":
        import tensorflow as tf

        if multi_worker:
            return _multi_worker_strategy(gpus)
        return tf.distribute.MirroredStrategy() if gpus > 1 else tf.distribute.get_strategy()
    if backend == "jax" and gpus > 1:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    return SingleDevice()


def _multi_worker_strategy(gpus: int):
    """The process's MultiWorkerMirroredStrategy for TF_CONFIG, made on the first call (TensorFlow configures
    collective ops once per process) and returned again by later ones (a second train() in the same process)."""
    import tensorflow as tf

    key = os.environ[TF_CONFIG]
    if key in _multi_worker_strategies:
        return _multi_worker_strategies[key]
    if _multi_worker_strategies:
        raise CamidError("TF_CONFIG changed after this process had joined a cluster: TensorFlow sets up its "
                         "collective ops once per process; start a fresh process for the new cluster")
    # NCCL between GPUs (a hint: TensorFlow falls back when it cannot); between CPUs TensorFlow's choice (ring
    # all-reduce over gRPC).
    implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL if gpus
                      else tf.distribute.experimental.CommunicationImplementation.AUTO)
    try:
        strategy = _keras3_multi_worker_class()(
            communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation))
    except RuntimeError as error:
        if "program startup" not in str(error):
            raise
        raise CamidError("TF_CONFIG names a cluster, but this process ran TensorFlow operations before "
                         "configure_devices() could set up the collective ops MultiWorkerMirroredStrategy needs "
                         "(TensorFlow only allows that at program start): call configure_devices() first, in a "
                         "fresh process (`camid train` does)") from error
    _multi_worker_strategies[key] = strategy
    return strategy


@functools.cache
def _keras3_multi_worker_class():
    """tf.distribute.MultiWorkerMirroredStrategy with the two things Keras 3's fit needs across machines.

    1. `reduce` takes nested structures and scalars. Keras 3 (3.15 at least) calls `strategy.reduce` on a whole
       (inputs, targets) batch, to build the model before the first step, and on the scalar per-step logs with
       `axis=0`. Across several workers TensorFlow reduces one tensor at a time and takes no axis for a scalar,
       so `fit` fails before its first step (keras-team/keras#20329, #20585). Reducing leaf by leaf, scalars
       without an axis, gives what Keras means.
    2. Inside `scope()`, the non-trainable float variables Keras makes without an aggregation (BatchNormalization's
       moving mean and variance; optimizer slots, which are only written in cross-replica context and so
       unaffected) are averaged across replicas when written. Keras 3 leaves them without one, so each worker
       would keep moving statistics of its own shard of the batch and the workers' models would differ. With MEAN
       the statistics are those of the whole global batch, as on one device, and every worker holds the same model.
    """
    import tensorflow as tf

    def mean_aggregated_statistics(next_creator, **kwargs):
        if (not kwargs.get("trainable", True)
                and kwargs.get("aggregation") in (None, tf.VariableAggregation.NONE)
                and kwargs.get("synchronization") in (None, tf.VariableSynchronization.AUTO,
                                                      tf.VariableSynchronization.ON_WRITE)
                and tf.as_dtype(kwargs.get("dtype") or tf.float32).is_floating):
            kwargs["aggregation"] = tf.VariableAggregation.MEAN
        return next_creator(**kwargs)

    class Keras3MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            def one(leaf):
                local = leaf.values[0] if isinstance(leaf, tf.distribute.DistributedValues) else leaf
                rank = len(local.shape) if hasattr(local, "shape") else 0
                return super(Keras3MultiWorkerMirroredStrategy, self).reduce(reduce_op, leaf,
                                                                             None if rank == 0 else axis)

            return tf.nest.map_structure(one, value)

        def scope(self):
            stack = contextlib.ExitStack()
            stack.enter_context(super().scope())
            stack.enter_context(tf.variable_creator_scope(mean_aggregated_statistics))
            return stack

    return Keras3MultiWorkerMirroredStrategy


def same_on_all_workers(strategy, value: float) -> bool:
    """Whether every worker of a multi-worker strategy passed the same `value` (True with one worker).

    A collective: every worker must call it, at the same point. For checks such as: do all workers resume from
    the same epoch (they do only when they read the same checkpoint folder)?
    """
    if not getattr(getattr(strategy, "extended", None), "_in_multi_worker_mode", lambda: False)():
        return True
    import tensorflow as tf

    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant([float(value)], tf.float32))
    values = strategy.gather(per_replica, axis=0).numpy()
    return bool((values == values[0]).all())


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
