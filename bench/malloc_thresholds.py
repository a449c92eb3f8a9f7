"""What TensorFlow's malloc setting costs a training step, and what camid's undoing of it costs in memory.

TensorFlow's `tf.data` generators (behind every Keras PyDataset on the TensorFlow backend, so camid's training
patches) set glibc's M_TRIM_THRESHOLD to 128 KiB when one starts, which pins the mmap threshold at 128 KiB: every
larger tensor is then a fresh mmap, page faults and a munmap (camid.models.callbacks.restore_malloc_thresholds).
This bench trains the default network (smallcnn, 64 px, batch 32) through `fit` on a PyDataset of random batches, as
training feeds it (camid.tools.plan.time_network_fit, the plan's measurement), in fresh processes side by side: TensorFlow's setting (the baseline, `CAMID_MALLOC_THRESHOLDS=0`) and camid's
(the malloc callback of the train and tune stages). Each at two lengths (--steps and 4x --steps), so that memory
that grows with the steps would show. Per run: wall ms per step, CPU ms per step, minor page faults per step, and
the process's peak RSS.

    python bench/malloc_thresholds.py [--steps 40] [--repeats 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WARMUP = 3


def run_one(steps: int) -> dict:
    """In this process: the plan's measurement of the network (smallcnn, 64 px, batch 32, the train stage's malloc
    callback): timed windows of `steps` steps inside one `fit`."""
    from camid.tools.plan import time_network_fit

    cost = time_network_fit("smallcnn", 64, 32, steps=steps, warmup=WARMUP)
    return {"steps": steps, "ms_per_step": 1000 * cost["wall_s"] / steps,
            "cpu_ms_per_step": 1000 * cost["cpu_s"] / steps, "faults_per_step": cost["minor_faults"] / steps,
            "peak_rss_mb": cost["peak_rss_mb"]}


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
