"""Training on several machines: TF_CONFIG parsing, and two real worker processes on 127.0.0.1 (CPU) training the
camid smallcnn under the MultiWorkerMirroredStrategy that `configure_devices()` returns.

The two-worker test starts `python -m tests.test_multiworker fit OUT` twice, each with its own TF_CONFIG
(worker 0, the chief, and worker 1). Each worker seeds its random generators differently, so only the strategy's
broadcast of the initial values and its all-reduce of the gradients (and of BatchNormalization's statistics) can
make the two models agree. The workers write what they saw into OUT (a JSON summary and the weights), and the test
compares them. About 15 s on 2 CPU cores (35 s when other jobs share them), most of it two TensorFlow start-ups and graph
tracings side by side.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from camid.errors import CamidError
from camid.models.devices import cluster_from_env, configure_devices, is_chief, same_on_all_workers

ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 180  # both workers together, start-up included
BIND_ATTEMPTS = 3       # fresh ports when a worker could not bind the ones it was given
# What TensorFlow's gRPC server says when a port was taken between choosing it and binding it.
BIND_FAILURES = ("address already in use", "failed to bind", "could not start grpc server", "unavailable: bind")

# The tiny training each worker runs.
CAMERAS, PATCH, GLOBAL_BATCH, SAMPLES, EPOCHS, PREDICT_SAMPLES = 4, 32, 16, 64, 2, 20


def tf_config(addresses: list[str], index: int, job: str = "worker") -> str:
    return json.dumps({"cluster": {job: addresses}, "task": {"type": job, "index": index}})


# --- TF_CONFIG parsing (in process: nothing here creates a strategy) -------------------------------------------

def test_no_tf_config_means_one_machine(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert cluster_from_env() is None and is_chief()
    monkeypatch.setenv("TF_CONFIG", "  ")
    assert cluster_from_env() is None


def test_workers_only_cluster_makes_worker_0_the_chief():
    addresses = ["10.0.0.1:2222", "10.0.0.2:2222", "10.0.0.3:2222"]
    for index in range(3):
        cluster = cluster_from_env({"TF_CONFIG": tf_config(addresses, index)})
        assert (cluster.workers, cluster.task_type, cluster.task_index) == (3, "worker", index)
        assert cluster.is_chief == (index == 0) and cluster.rank == index and cluster.addresses == tuple(addresses)


def test_chief_job_is_the_chief_and_workers_count_after_it():
    config = {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "chief", "index": 0}}
    chief = cluster_from_env({"TF_CONFIG": json.dumps(config)})
    assert chief.workers == 3 and chief.is_chief and chief.rank == 0 and chief.addresses == ("a:1", "b:1", "c:1")
    config["task"] = {"type": "worker", "index": 0}
    worker = cluster_from_env({"TF_CONFIG": json.dumps(config)})
    assert not worker.is_chief and worker.rank == 1


def test_one_worker_cluster_keeps_single_machine_training(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_config(["localhost:2222"], 0))
    assert cluster_from_env().workers == 1 and is_chief()
    import keras

    strategy = configure_devices()
    assert strategy.num_replicas_in_sync == 1
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        assert not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


@pytest.mark.parametrize("value, says", [
    ("{not json", "not valid JSON"),
    ('["a:1"]', "must be a JSON object"),
    ('{"task": {"type": "worker", "index": 0}}', 'no "cluster"'),
    ('{"cluster": {"worker": "a:1,b:1"}, "task": {"type": "worker", "index": 0}}', "non-empty list"),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "non-empty list"),
    ('{"cluster": {"worker": ["a:1", "b"]}, "task": {"type": "worker", "index": 0}}', "'b', which is not"),
    ('{"cluster": {"worker": ["a:1", "b:99999"]}, "task": {"type": "worker", "index": 0}}', "'b:99999'"),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}', "more than one task"),
    ('{"cluster": {"chief": ["a:1", "b:1"]}, "task": {"type": "chief", "index": 0}}', "at most one"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}', "parameter-server"),
    ('{"cluster": {"worker": ["a:1"], "evaluator": ["b:1"]}, "task": {"type": "worker", "index": 0}}', "evaluator"),
    ('{"cluster": {"trainer": ["a:1"]}, "task": {"type": "trainer", "index": 0}}', "job 'trainer'"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}}', 'no "task"'),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "chief", "index": 0}}', "task.type 'chief'"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}', "from 0 to 1"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": "1"}}', "task.index '1'"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker"}}', "task.index None"),
])
def test_malformed_tf_config_says_what_is_wrong_and_what_to_set(monkeypatch, value, says):
    monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(CamidError, match="TF_CONFIG") as caught:
        configure_devices()
    message = str(caught.value)
    assert says in message, message
    assert '"cluster": {"worker": ["host1:12345", "host2:12345"]}' in message and "unset it" in message


def test_multi_worker_needs_the_tensorflow_backend(monkeypatch):
    import keras

    monkeypatch.setenv("TF_CONFIG", tf_config(["a:1", "b:1"], 0))
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(CamidError, match="KERAS_BACKEND=tensorflow") as caught:
        configure_devices()
    assert "2 workers" in str(caught.value) and "unset TF_CONFIG" in str(caught.value)


# --- two real workers ------------------------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    """Ports free right now. TensorFlow binds them itself, so the sockets are closed before the workers start:
    another process may take one in between, which `run_workers` notices and retries."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _kill(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def run_workers(tmp_path: Path, mode: str = "fit", *args: str, count: int = 2, cwd: Path = ROOT,
                env: dict | None = None, timeout: float = WORKER_TIMEOUT_S) -> list[Path]:
    """Run `count` workers of one cluster on 127.0.0.1 (`python -m tests.test_multiworker MODE OUT *args`);
    return their output folders, in rank order.

    A worker that fails brings the others down at once (they would wait for it in their next collective); the
    whole attempt is killed after `timeout` s. A failure to bind a port is retried with fresh ports."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    base.update(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")])), **(env or {}))
    for attempt in range(1, BIND_ATTEMPTS + 1):
        addresses = [f"127.0.0.1:{port}" for port in free_ports(count)]
        outs, processes = [], []
        with contextlib.ExitStack() as logs:
            try:
                for index in range(count):
                    out = tmp_path / f"attempt{attempt}" / f"worker{index}"
                    (out / "tmp").mkdir(parents=True)
                    outs.append(out)
                    processes.append(subprocess.Popen(
                        [sys.executable, "-m", "tests.test_multiworker", mode, str(out), *args], cwd=cwd,
                        env={**base, "TF_CONFIG": tf_config(addresses, index), "TMPDIR": str(out / "tmp")},
                        stdout=logs.enter_context(open(out / "log.txt", "w")), stderr=subprocess.STDOUT))
                deadline = time.monotonic() + timeout
                while any(p.poll() is None for p in processes):
                    if any(p.returncode not in (None, 0) for p in processes) or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
            finally:
                timed_out = any(p.poll() is None for p in processes)
                _kill(processes)
        texts = [(out / "log.txt").read_text(errors="replace") for out in outs]
        if not timed_out and all(p.returncode == 0 for p in processes):
            return outs
        if attempt < BIND_ATTEMPTS and any(f in t.lower() for t in texts for f in BIND_FAILURES):
            continue
        report = "\n".join(f"--- worker {i} (exit {p.returncode}) ---\n{t[-4000:]}"
                           for i, (p, t) in enumerate(zip(processes, texts)))
        pytest.fail(f"{f'timed out after {timeout:.0f} s' if timed_out else 'a worker failed'}:\n{report}")
    raise AssertionError("unreachable")


def test_two_workers_train_the_same_model(tmp_path):
    started = time.monotonic()
    outs = run_workers(tmp_path)
    elapsed = time.monotonic() - started
    results = [json.loads((out / "result.json").read_text()) for out in outs]
    for rank, result in enumerate(results):
        assert result["strategy"] == "Keras3MultiWorkerMirroredStrategy"
        assert result["is_multi_worker_mirrored"] and result["num_replicas_in_sync"] == 2
        assert result["rank"] == rank and result["is_chief"] == (rank == 0)
        assert result["agree_on_same"] and not result["agree_on_rank"]

    # Auto-sharding (DATA): every worker took its own half of each global batch, and together they saw all of it.
    seen = [result["sample_ids"] for result in results]
    assert all(len(ids) == SAMPLES // 2 for ids in seen)
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(SAMPLES))
    assert all(len(batch) == GLOBAL_BATCH // 2 for batch in results[0]["batches"])

    # The same model on both workers, before training (the chief's initial values, broadcast) and after it.
    weights = [np.load(out / "weights.npz") for out in outs]
    assert weights[0].files == weights[1].files and len(weights[0].files) > 10
    for name in weights[0].files:
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)
    trained = [k for k in weights[0].files if k.startswith("trained/")]
    moved = [k for k in trained if not np.array_equal(weights[0][k], weights[0][k.replace("trained/", "initial/")])]
    assert len(moved) > len(trained) // 2, "training did not change the weights"
    # BatchNormalization's moving statistics too: averaged over both workers' shards, not one worker's own.
    assert any("moving_mean" in k for k in moved) and any("moving_variance" in k for k in moved)

    # The all-reduced losses agree, and predict() gathers every worker's share into the same full answer.
    assert results[0]["history"] == results[1]["history"]
    assert all(np.isfinite(v).all() for v in results[0]["history"].values())
    assert results[0]["pydataset_history"] == results[1]["pydataset_history"]
    predictions = [np.load(out / "predictions.npy") for out in outs]
    assert predictions[0].shape == (PREDICT_SAMPLES, CAMERAS)
    np.testing.assert_array_equal(predictions[0], predictions[1])
    print(f"two workers: {elapsed:.1f} s")


def train_stage_knows_several_machines() -> bool:
    """Whether camid/stages/train.py has the multi-worker changes: only the chief writes, the others resume from it."""
    import inspect

    import camid.stages.train

    return "cluster_from_env" in inspect.getsource(camid.stages.train)


@pytest.mark.slow
@pytest.mark.skipif(not train_stage_knows_several_machines(),
                    reason="camid/stages/train.py does not yet let only the chief write (multi-worker patch)")
def test_two_workers_run_the_train_stage_and_only_the_chief_writes(zoo, tmp_path):
    """The real train stage on two workers sharing one project folder (a shared file system): one model, one
    MLflow run, and nothing left behind by the other worker."""
    project = tmp_path / "project"
    project.mkdir()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outs = run_workers(tmp_path, "train", str(zoo.cache), cwd=project,
                       env={"MLFLOW_TRACKING_URI": store, "MLFLOW_EXPERIMENT_NAME": "camid-multiworker"})
    results = [json.loads((out / "result.json").read_text()) for out in outs]
    assert results[0]["run_id"] and results[0]["weighted_accuracy"] >= 0
    assert results[1] == {"arch": "smallcnn", "worker": 1, "workers": 2}
    model_dir = project / "models" / "smallcnn"
    assert {"model.keras", "run.json", "history.csv"} <= {p.name for p in model_dir.iterdir()}
    assert len((model_dir / "history.csv").read_text().splitlines()) == 1 + 2  # header + two epochs
    assert not any((project / ".camid" / "checkpoints").iterdir())  # the chief's work folder, removed when done
    assert not any((outs[1] / "tmp").iterdir())                      # the other worker's scratch folder too
    import mlflow

    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("camid-multiworker").experiment_id])
    assert [r.info.run_id for r in runs] == [results[0]["run_id"]] and runs[0].info.status == "FINISHED"


# --- the worker process ----------------------------------------------------------------------------------------

def synthetic_data(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = {"image": rng.uniform(0, 255, (count, PATCH, PATCH, 3)).astype("float32"),
         "manipulated": rng.integers(0, 2, (count, 1)).astype("float32")}
    y = {"camera": rng.integers(0, CAMERAS, count).astype("int32"),
         "manipulation": rng.integers(0, 9, count).astype("int32")}
    return x, y


def worker_main(out: Path) -> None:
    """One worker: the strategy configure_devices() picks, then smallcnn trained on synthetic patches."""
    started = time.monotonic()

    def step(what: str) -> None:  # progress in the worker's log, for a failure report
        print(f"{time.monotonic() - started:6.1f} s  {what}", flush=True)

    import keras

    from camid.models import compile_model, create_model

    cluster = cluster_from_env()
    strategy = configure_devices()  # first: TensorFlow sets collective ops up at program start only
    import tensorflow as tf

    step(f"{type(strategy).__name__}: {strategy.num_replicas_in_sync} replicas, rank {cluster.rank}")
    keras.utils.set_random_seed(1000 + cluster.rank)  # different on every worker, on purpose
    with strategy.scope():
        model = create_model("smallcnn", num_classes=CAMERAS, patch=PATCH, weights="none", dense=(16,),
                             dropout=(0.2,))
        compile_model(model, learning_rate=1e-3, aux_weight=0.3)
    step("model built")
    initial = {f"initial/{i:03d}-{v.path}": np.asarray(v) for i, v in enumerate(model.weights)}

    x, y = synthetic_data(SAMPLES)
    ids = np.arange(SAMPLES, dtype=np.int32)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # Which samples this worker gets from the distributed dataset: every worker iterates it (a collective).
    id_batches = [[int(i) for i in np.concatenate([np.asarray(t) for t in strategy.experimental_local_results(b)])]
                  for b in strategy.experimental_distribute_dataset(
                      tf.data.Dataset.from_tensor_slices(ids).batch(GLOBAL_BATCH).with_options(options))]
    step("distributed dataset read")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).with_options(options)
    history = model.fit(dataset, epochs=EPOCHS, verbose=0).history
    step("fit on tf.data")

    class Batches(keras.utils.PyDataset):  # the train stage feeds a PyDataset (camid.data.dataset.TrainPatches)
        def __len__(self):
            return SAMPLES // GLOBAL_BATCH

        def __getitem__(self, index):
            rows = slice(index * GLOBAL_BATCH, (index + 1) * GLOBAL_BATCH)
            return {k: v[rows] for k, v in x.items()}, {k: v[rows] for k, v in y.items()}

    pydataset_history = model.fit(Batches(), epochs=1, verbose=0).history
    step("fit on a PyDataset")
    px, _ = synthetic_data(PREDICT_SAMPLES, seed=1)
    predictions = model.predict(px, batch_size=GLOBAL_BATCH // 2, verbose=0)["camera"]

    step("predict")
    trained = {f"trained/{i:03d}-{v.path}": np.asarray(v) for i, v in enumerate(model.weights)}
    np.savez(out / "weights.npz", **initial, **trained)
    np.save(out / "predictions.npy", np.asarray(predictions))
    result = {
        "strategy": type(strategy).__name__,
        "is_multi_worker_mirrored": isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy),
        "num_replicas_in_sync": strategy.num_replicas_in_sync,
        "rank": cluster.rank, "is_chief": cluster.is_chief,
        "agree_on_same": same_on_all_workers(strategy, 3), "agree_on_rank": same_on_all_workers(strategy, cluster.rank),
        "sample_ids": sorted(i for batch in id_batches for i in batch), "batches": id_batches,
        "history": {k: [float(v) for v in vs] for k, vs in history.items()},
        "pydataset_history": {k: [float(v) for v in vs] for k, vs in pydataset_history.items()},
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    step("done")


def train_worker_main(out: Path, cache: str) -> None:
    """One worker of the train stage: smallcnn, two epochs of two steps, in the current folder."""
    from camid.config import load_params
    from camid.stages.train import train
    from tests.helpers_data import tiny_train

    params = load_params(ROOT / "params.yaml")
    settings = tiny_train(params.train, epochs=2, steps_per_epoch=2, batch_size=4, precise_bn=2)
    summary = train("smallcnn", Path(cache), Path("models/smallcnn"), settings, params.catalog.labels, params.catalog)
    (out / "result.json").write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    {"fit": worker_main, "train": train_worker_main}[sys.argv[1]](Path(sys.argv[2]), *sys.argv[3:])
