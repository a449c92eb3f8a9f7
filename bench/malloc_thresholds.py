"""What TensorFlow's malloc setting costs a training step, and what camid's undoing of it costs in memory.

The first `tf.data` generator of a process (every Keras PyDataset on the TensorFlow backend, so camid's training
patches) sets glibc's M_TRIM_THRESHOLD to 128 KiB, which pins the mmap threshold at 128 KiB: every larger tensor is
then a fresh mmap, page faults and a munmap (camid.models.callbacks.restore_malloc_thresholds). This bench trains
the default network (smallcnn, 64 px, batch 32) through `fit` on a PyDataset of random batches, as training feeds
it, in fresh processes side by side: TensorFlow's setting (the baseline, `CAMID_MALLOC_THRESHOLDS=0`) and camid's
(the malloc callback of the train and tune stages). Each at two lengths (--steps and 4x --steps), so that memory
that grows with the steps would show. Per run: wall ms per step, CPU ms per step, minor page faults per step, and
the process's peak RSS.

    python bench/malloc_thresholds.py [--steps 40] [--repeats 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PATCH, BATCH, WARMUP = 64, 32, 3


def run_one(steps: int) -> dict:
    """In this process: warm up, then time `steps` steps of `fit` with the training stage's malloc callback."""
    import keras
    import numpy as np

    from camid.models import compile_model, create_model
    from camid.models.callbacks import malloc_callback

    rng = np.random.default_rng(0)
    batches = [({"image": rng.uniform(0, 255, (BATCH, PATCH, PATCH, 3)).astype(np.float32),
                 "manipulated": np.zeros((BATCH, 1), np.float32)},
                {"camera": rng.integers(2, size=BATCH).astype(np.int32),
                 "manipulation": rng.integers(9, size=BATCH).astype(np.int32)}) for _ in range(4)]

    class Batches(keras.utils.PyDataset):
        def __init__(self, count):
            super().__init__()
            self.count = count

        def __len__(self):
            return self.count

        def __getitem__(self, index):
            return batches[index % len(batches)]

    model = create_model("smallcnn", num_classes=2, patch=PATCH, weights="none")
    compile_model(model, learning_rate=1e-3, aux_weight=0.1)
    model.fit(Batches(WARMUP), epochs=1, verbose=0, shuffle=False, callbacks=[malloc_callback()])
    before = resource.getrusage(resource.RUSAGE_SELF)
    start, cpu = time.perf_counter(), time.process_time()
    model.fit(Batches(steps), epochs=1, verbose=0, shuffle=False, callbacks=[malloc_callback()])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"steps": steps, "ms_per_step": 1000 * wall / steps, "cpu_ms_per_step": 1000 * cpu / steps,
            "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "peak_rss_mb": after.ru_maxrss / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps of the shorter run (the longer: 4x)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setting and length")
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child)))
        return 0
    rows = []
    for steps in (args.steps, 4 * args.steps):
        for repeat in range(args.repeats):
            for setting, switch in (("tensorflow", "0"), ("camid", "1")):
                env = {**os.environ, "CAMID_MALLOC_THRESHOLDS": switch, "TF_CPP_MIN_LOG_LEVEL": "2"}
                out = subprocess.run([sys.executable, __file__, "--child", str(steps)], env=env, check=True,
                                     capture_output=True, text=True).stdout
                row = {"setting": setting, **json.loads(out.strip().splitlines()[-1])}
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(f"{setting:10s} {steps:4d} steps: {row['ms_per_step']:6.0f} ms/step wall, "
                          f"{row['cpu_ms_per_step']:6.0f} ms CPU, {row['faults_per_step']:7.0f} page faults/step, "
                          f"peak RSS {row['peak_rss_mb']:6.0f} MB", flush=True)
    if not args.json:
        for steps in (args.steps, 4 * args.steps):
            mean = {s: sum(r["ms_per_step"] for r in rows if r["setting"] == s and r["steps"] == steps)
                    / args.repeats for s in ("tensorflow", "camid")}
            print(f"{steps} steps: camid's setting takes {mean['camid'] / mean['tensorflow']:.2f}x the baseline's "
                  f"time per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
