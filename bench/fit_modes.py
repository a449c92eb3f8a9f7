"""Why the plan's measurement of the network varied by 2x between runs on one machine: short fits on one core.

`camid catalog from-folder` plans the training from this machine's measured cost of training the network
(camid.tools.plan.measure_network). It used to time three whole `fit`s of 10 steps; on the project's 2-core cloud
machines that figure came out at two levels about 2x apart (on a 2-core AVX2 machine 1.97 or 3.94 s per megapixel
of patches). This bench times the same steps of the real network (smallcnn, 64 px, batch 32, random patches fed
through a Keras PyDataset with the train stage's malloc callback) three ways, in one process:

- `whole fits`: `--timings` fits of `--steps` steps each, each timed whole (the old measurement);
- `windows of one fit`: one fit of `--timings` + 1 windows of `--steps` steps, each window timed from a callback, the
  first not counted (camid.tools.plan.time_network_fit: the measurement now, and how a training epoch runs);
- `train_on_batch`: `--timings` loops of `--steps` calls (no tf.data iterator).

Per way: each timing's seconds per megapixel of patches and its CPU seconds over wall seconds (about 2 on a 2-core
machine when both cores worked, about 1 when it ran on one), and how many ran on one core. It also prints the
kernel's `sched_vcpu_pack` where the kernel has one (a setting of the cloud sandbox's guest kernel, which packs
runnable threads onto fewer virtual CPUs).

    python bench/fit_modes.py                          # 12 timings of each way, 10 steps each
    python bench/fit_modes.py --timings 30 --steps 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ONE_CORE = 1.3  # CPU seconds over wall seconds below this: the timing ran on one core


def whole_fits(steps: int, timings: int) -> list[tuple[float, float]]:
    """(wall, cpu) seconds of `timings` whole `fit`s of `steps` steps (the old measurement)."""
    from camid.models.callbacks import malloc_callback
    from camid.tools.plan import measurement_setup

    model, Batches, batches = measurement_setup()
    model.fit(Batches(batches, 3), epochs=1, verbose=0, shuffle=False, callbacks=[malloc_callback()])
    out = []
    for _ in range(timings):
        start, cpu = time.perf_counter(), time.process_time()
        model.fit(Batches(batches, steps), epochs=1, verbose=0, shuffle=False, callbacks=[malloc_callback()])
        out.append((time.perf_counter() - start, time.process_time() - cpu))
    return out


def train_on_batch(steps: int, timings: int) -> list[tuple[float, float]]:
    """(wall, cpu) seconds of `timings` loops of `steps` `train_on_batch` calls."""
    from camid.tools.plan import measurement_setup

    model, _, batches = measurement_setup()
    for i in range(3):
        model.train_on_batch(*batches[i % 4])
    out = []
    for _ in range(timings):
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(steps):
            model.train_on_batch(*batches[i % 4])
        out.append((time.perf_counter() - start, time.process_time() - cpu))
    return out


def summary(name: str, pairs: list[tuple[float, float]], steps: int) -> dict:
    megapixels = steps * 32 * 64 * 64 / 1e6
    per_mp = [wall / megapixels for wall, _ in pairs]
    ratio = [cpu / wall for wall, cpu in pairs]
    one = [p for p, r in zip(per_mp, ratio) if r < ONE_CORE]
    two = [p for p, r in zip(per_mp, ratio) if r >= ONE_CORE]
    return {"way": name, "timings": len(pairs), "one_core": len(one),
            "s_per_mp_two_cores": round(statistics.median(two), 2) if two else None,
            "s_per_mp_one_core": round(statistics.median(one), 2) if one else None,
            "median_s_per_mp": round(statistics.median(per_mp), 2),
            "each_s_per_mp": [round(p, 2) for p in per_mp], "each_cpu_over_wall": [round(r, 2) for r in ratio]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timing (the plan's measurement: 10)")
    parser.add_argument("--timings", type=int, default=12, help="timings of each way")
    parser.add_argument("--json", action="store_true", help="one JSON object per way")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from camid.tools.plan import time_network_fit

    pack = Path("/proc/sys/kernel/sched_vcpu_pack")
    print(f"cores: {os.cpu_count()}; kernel sched_vcpu_pack: {pack.read_text().strip() if pack.exists() else 'none'}")
    windows = time_network_fit("smallcnn", 64, 32, steps=args.steps, repeats=args.timings)
    rows = [summary("whole fits (the old measurement)", whole_fits(args.steps, args.timings), args.steps),
            summary("windows of one fit (the measurement now)",
                    list(zip(windows["wall_s_each"], windows["cpu_s_each"])), args.steps),
            summary("train_on_batch", train_on_batch(args.steps, args.timings), args.steps)]
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{row['way']}: {row['one_core']} of {row['timings']} on one core; s per megapixel: median "
                  f"{row['median_s_per_mp']} (both cores {row['s_per_mp_two_cores']}, one core "
                  f"{row['s_per_mp_one_core']})\n  each: {row['each_s_per_mp']}\n"
                  f"  CPU/wall: {row['each_cpu_over_wall']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
