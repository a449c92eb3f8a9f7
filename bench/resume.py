"""A killed pipeline finishes the same: `dvc repro` run uninterrupted on one private copy of the repository, and on
a second copy SIGKILLed (its whole process group, as a lost machine would be) in the middle of a training epoch,
then again in the middle of the evaluate stage, then run to the end. Compared: metrics/evaluate.json (exactly,
value for value and byte for byte), the output hashes dvc.lock records, and each file of the train outputs.

    python bench/resume.py                       # kill during training epoch 6, then half-way through evaluate
    python bench/resume.py --kill-epoch 3 --keep /tmp/resume

Each copy holds the working tree's files (tracked and untracked, not ignored) and the built C extension, in a git
repository of its own (DVC needs one), and runs its own code (PYTHONPATH). One full `dvc repro` takes 3-4 minutes
on 2 CPU cores; the bench takes about three of them. Exit status 0 when evaluate.json is the same.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = "Running stage '"


def copy_repository(target: Path) -> Path:
    """The working tree's files (tracked or untracked, not ignored) and the built extension, committed to git."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    files = sorted({f for f in listed if f and (ROOT / f).is_file()} |
                   {str(p.relative_to(ROOT)) for p in (ROOT / "camid").rglob("*.so")})
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    subprocess.run(git + ["add", "-A"], cwd=target, check=True)
    subprocess.run(git + ["commit", "-qm", "base"], cwd=target, check=True)
    return target


def environment(copy: Path) -> dict[str, str]:
    drop = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "CAMID_CHECKPOINTS", "CAMID_PARAMS",
            "CAMID_STAGE_RUNS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": str(copy),
            "MLFLOW_TRACKING_URI": f"sqlite:///{copy / 'mlflow.db'}", "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONUNBUFFERED": "1"}


class Repro:
    """One `dvc repro` in `copy`, its output timestamped line by line (and appended to `log`)."""

    def __init__(self, copy: Path, log: Path):
        self.start = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.sink = open(log, "a")
        self.proc = subprocess.Popen(["dvc", "repro"], cwd=copy, env=environment(copy), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.start, line.rstrip("\n")))
            self.sink.write(line)
            self.sink.flush()

    def seen(self, text: str) -> float | None:
        """When a line starting with `text` first came (seconds since the start), None if not yet."""
        return next((t for t, line in list(self.lines) if line.startswith(text)), None)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # dvc and the stage it runs
        self.wait()

    def wait(self) -> int:
        code = self.proc.wait()
        self.reader.join()
        self.sink.close()
        return code

    def stage_times(self) -> dict[str, tuple[float, float]]:
        """stage -> (start, end) in seconds; the last stage ends with the output."""
        starts = [(t, line[len(STAGE_LINE):].split("'")[0]) for t, line in self.lines if line.startswith(STAGE_LINE)]
        ends = [t for t, _ in starts[1:]] + [self.lines[-1][0] if self.lines else 0.0]
        return {name: (t, end) for (t, name), end in zip(starts, ends)}


def epoch_lines(repro: Repro, epochs: int) -> list[float]:
    """When Keras announced each training epoch ('Epoch k/N')."""
    return [t for t, line in repro.lines if line.startswith("Epoch ") and line.endswith(f"/{epochs}")]


def backed_up(copy: Path) -> int:
    """Epochs the train stage has backed up: a backup is a folder epoch-<n> that appears whole, by a rename
    (camid.models.callbacks)."""
    return max((int(p.parent.name.split("-")[1]) for p in
                (copy / ".camid" / "checkpoints").glob("*/backup/epoch-*/state.json")), default=0)


def kill_when(repro: Repro, ready, what: str) -> float:
    while not ready():
        if repro.proc.poll() is not None:
            repro.wait()
            raise SystemExit(f"dvc repro ended (status {repro.proc.returncode}) before {what}")
        time.sleep(0.02)
    repro.kill()
    return repro.elapsed()


def lock_outs(copy: Path) -> dict[str, str]:
    """Every output in dvc.lock -> its md5."""
    lock = yaml.safe_load((copy / "dvc.lock").read_text())
    return {out["path"]: out.get("md5", "?") for stage in lock["stages"].values() for out in stage.get("outs", [])}


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-epoch", type=int, default=6, help="kill half-way through this training epoch (1-based)")
    parser.add_argument("--keep", type=Path, help="work here and keep the copies (default: a temporary folder, removed)")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="camid-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("base", "uninterrupted", "killed"):
        shutil.rmtree(work / name, ignore_errors=True)
    base = copy_repository(work / "base")
    clean, killed = work / "uninterrupted", work / "killed"
    shutil.copytree(base, clean, symlinks=True)
    shutil.copytree(base, killed, symlinks=True)
    epochs = int(yaml.safe_load((base / "params.yaml").read_text())["train"]["epochs"])
    if not 1 <= args.kill_epoch <= epochs:
        raise SystemExit(f"--kill-epoch must lie in 1..{epochs}")
    print(f"copies in {work} (logs: {work}/*.log)", flush=True)

    # 1. Uninterrupted: the reference, and the timings the kills aim at.
    reference = Repro(clean, work / "uninterrupted.log")
    if reference.wait():
        raise SystemExit(f"the uninterrupted dvc repro failed: see {work}/uninterrupted.log")
    stages = reference.stage_times()
    announced = epoch_lines(reference, epochs)
    epoch_s = (announced[-1] - announced[0]) / max(len(announced) - 1, 1)
    evaluate_s = stages["evaluate"][1] - stages["evaluate"][0]
    print(f"uninterrupted dvc repro: {reference.elapsed():.0f} s; a training epoch {epoch_s:.1f} s, "
          f"evaluate {evaluate_s:.0f} s", flush=True)

    # 2. Killed half-way through training epoch k, then half-way through evaluate, then to the end.
    first = Repro(killed, work / "killed.log")

    def mid_epoch() -> bool:
        # Half-way through epoch k by this run's own pace (its epoch k - 1 took as long), with k - 1 backed up.
        announced = epoch_lines(first, epochs)
        if len(announced) < args.kill_epoch or backed_up(killed) < args.kill_epoch - 1:
            return False
        pace = announced[-1] - announced[-2] if len(announced) > 1 else epoch_s
        return first.elapsed() >= announced[args.kill_epoch - 1] + pace / 2

    at = kill_when(first, mid_epoch, f"training epoch {args.kill_epoch}")
    done = backed_up(killed)
    where = f"during training epoch {done + 1}/{epochs}" if done < epochs else "after the last training epoch"
    print(f"SIGKILL at {at:.0f} s, {where} ({done} epochs backed up; aimed at epoch {args.kill_epoch})", flush=True)
    second = Repro(killed, work / "killed.log")
    at = kill_when(second, lambda: (t := second.seen(f"{STAGE_LINE}evaluate'")) is not None
                   and second.elapsed() >= t + evaluate_s / 2, "evaluate")
    resumed = [line for _, line in second.lines if "resuming" in line]
    print(f"SIGKILL at {at:.0f} s of the rerun, half-way through evaluate; the rerun's training: "
          f"{resumed[0].strip() if resumed else 'did not resume (no backup?)'}", flush=True)
    third = Repro(killed, work / "killed.log")
    if third.wait():
        raise SystemExit(f"the final dvc repro failed: see {work}/killed.log")
    print(f"final dvc repro: {third.elapsed():.0f} s, ran {', '.join(third.stage_times()) or 'nothing'}", flush=True)

    # 3. Compare.
    metrics = [json.loads((c / "metrics" / "evaluate.json").read_text()) for c in (clean, killed)]
    same_bytes = (clean / "metrics" / "evaluate.json").read_bytes() == (killed / "metrics" / "evaluate.json").read_bytes()
    print(f"\ntest weighted accuracy: uninterrupted {metrics[0].get('weighted_accuracy')}, "
          f"killed twice and rerun {metrics[1].get('weighted_accuracy')}")
    print(f"metrics/evaluate.json: {'identical' if metrics[0] == metrics[1] else 'DIFFERENT'} values, "
          f"{'identical' if same_bytes else 'different'} bytes")
    if metrics[0] != metrics[1]:
        for key in sorted(set(metrics[0]) | set(metrics[1])):
            if metrics[0].get(key) != metrics[1].get(key):
                print(f"  {key}: {metrics[0].get(key)!r} vs {metrics[1].get(key)!r}")
    committed = lock_outs(base)
    outs = [lock_outs(c) for c in (clean, killed)]
    print(f"\n{'dvc.lock output':<34} {'uninterrupted == killed':>24} {'== committed':>14}")
    for path in sorted(set(outs[0]) | set(outs[1])):
        same = outs[0].get(path) == outs[1].get(path)
        print(f"{path:<34} {'same' if same else 'DIFFERENT':>24} "
              f"{'yes' if outs[0].get(path) == committed.get(path) else 'no':>14}")
    for folder in sorted((clean / "models" / "train").iterdir()):
        if folder.is_dir():
            hashes = [file_hashes(c / "models" / "train" / folder.name) for c in (clean, killed)]
            differ = sorted(name for name in set(hashes[0]) | set(hashes[1]) if hashes[0].get(name) != hashes[1].get(name))
            print(f"models/train/{folder.name}: files that differ: {', '.join(differ) or 'none'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if metrics[0] == metrics[1] else 1


if __name__ == "__main__":
    sys.exit(main())
