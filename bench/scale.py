"""How each pipeline stage's cost grows with the number of photos: wall time, time per photo, peak RSS, bytes written.

Part 1, the virtual zoo: the default pipeline (dvc.yaml's stages, acquire -> ... -> register) at N photos per
device (`synth.images_per_device`, default params.yaml's value) and at FACTOR x N, each in a private copy of
this checkout (tracked and untracked-not-ignored files plus the built C extension, `git init`ed, so the code
measured is the checkout's as it is now and nothing here is touched). Per stage: wall time, milliseconds per
acquired photo, peak RSS, bytes written; then the ratio FACTOR x N / N of each and a flag on every stage whose
peak RSS grew by more than 1.25x (issue 19's bound: peak memory must not grow with the number of photos).

Part 2, `--real DIR` (a `<label>/<device>/<photos>` folder of real full-size camera JPEGs): a copy gets a
catalog read off DIR (`camid catalog from-folder`) and the Kaggle profile's data settings (`profiles.kaggle`:
train.patch 512, train.crops_per_decode 16, batch size, head), but `train.weights: none`, one backbone
(`--real-arch`, default smallcnn: the data path is what is measured, not a 2-core ResNet50) and a single epoch
of `--real-steps` steps; acquire, filter and split set the photos up, then prepare, train and evaluate run. It
prints the same per-stage figures and what prepare wrote (`data/cache`) against the photos' own bytes.

How it measures. Each stage's command is resolved by DVC from dvc.yaml (`dvc.repo.Repo(...).index.stages`:
`${item}` and params interpolated), ordered by its deps and outs, and run by this script as a child process
(`bash -c CMD` in the copy, PYTHONPATH=copy, the copy's own MLflow sqlite store), not through `dvc repro`, so
DVC's own process and its cache hashing are not in the figures (`--dvc` runs `dvc repro --single-item STAGE`
instead, and they are). Two peak-memory figures per stage:
  * tree: the sum of RSS over the stage's whole process tree (psutil, sampled every `--interval` s, 0.2 by
    default), the memory the stage holds at once, worker pools included. Shared pages (libraries mapped by
    each spawned worker) count once per process, and a peak shorter than the interval can be missed.
  * proc: the kernel's own high-water mark, exact, of the largest single process in the tree. Each stage runs
    under a fresh bare wrapper interpreter (`python -S`, nothing imported) that starts `bash -c CMD`, waits,
    and reports its own `getrusage(RUSAGE_CHILDREN).ru_maxrss`: the max RSS over every descendant it waited
    for (bash, camid, its worker pools), its sum never. One wrapper per stage, since RUSAGE_CHILDREN is a max
    over all children ever waited for; and a wrapper, not this script, as the parent, since a child inherits
    its parent's high-water mark through fork/vfork + exec, so every stage would read at least this script's
    own RSS.
Bytes written: the size of the stage's outputs (outs, metrics and plots in dvc.yaml) right after it ran,
counting each file once and only where every hard link to it lies in those outputs (a photo ingest hard-links
in, or a file an earlier stage wrote and this one links, is reported as linked, not written; symlinks count
as links). Time per photo divides by the photos acquired (data/raw), for every stage alike.

    python bench/scale.py                                 # N = params.yaml's, 4N; params' full training (long)
    python bench/scale.py --images-per-device 4 --factor 4 --epochs 1 --steps 5      # quick: ~8 min on 2 cores
    python bench/scale.py --images-per-device 16 --factor 4 --epochs 1 --steps 5     # 640 vs 2560: ~15 min
    python bench/scale.py --skip-zoo --real ../shared/samples/real-devices    # Kaggle patch, 79 photos: ~13 min
    python bench/scale.py --skip-zoo --dvc --real DIR --real-arch profile --real-no-tta --real-steps 2
                                       # the Kaggle profile's dvc repro, all four backbones, on real photos
    python bench/scale.py ... --keep /tmp/camid-scale     # keep the copies (zoo-<N>/, zoo-<4N>/, real/)
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psutil

from camid.config import load_raw
from camid.core.imageio import list_images
from camid.tools.profile import set_params

ROOT = Path(__file__).resolve().parents[1]
BOUND = 1.25  # issue 19: FACTOR x the photos may cost at most this much more peak RSS in any stage
MB = 1 << 20
# the real part runs the whole pipeline, register included
REAL_STAGES = ("acquire", "filter", "split", "prepare", "train", "evaluate", "register")


@dataclass
class Stage:
    name: str                      # DVC's address: "prepare", "train@smallcnn"
    cmd: str
    wdir: Path
    outs: list[Path]               # outs, metrics and plots
    deps: list[Path] = field(default_factory=list)


@dataclass
class Measure:
    stage: str
    wall: float                    # s
    tree_peak: int                 # bytes, sampled sum over the process tree
    proc_peak: int                 # bytes, kernel max over the processes
    written: int                   # bytes of new files in the outputs
    linked: int                    # bytes of the outputs that are links to files written elsewhere
    processes: int                 # most processes alive at once in the tree


# ---- the private copy ------------------------------------------------------------------------------------------

def checkout_files(root: Path) -> list[str]:
    """The checkout as `git` sees it (tracked + untracked not ignored, existing), plus the built extension
    modules the code imports (ignored build outputs: *.so under camid/)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            check=True, capture_output=True).stdout.decode().split("\0")
    files = {f for f in listed if f and (root / f).is_file()}
    files |= {str(p.relative_to(root)) for p in (root / "camid").rglob("*.so")}
    return sorted(files)


def make_copy(dest: Path) -> Path:
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"{dest} exists and is not empty: give --keep an empty or new folder")
    for name in checkout_files(ROOT):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "base"], cwd=dest, check=True)
    return dest


def stage_env(copy: Path) -> dict:
    """The copy's code, the copy's MLflow store and params.yaml, this venv's tools; no inherited CAMID_*/MLFLOW_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAMID_", "MLFLOW_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(copy)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               MLFLOW_TRACKING_URI=f"sqlite:///{copy}/mlflow.db", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return env


def pipeline(copy: Path) -> list[Stage]:
    """dvc.yaml's stages as DVC resolves them in the copy (its params), dependencies first."""
    from dvc.repo import Repo

    with Repo(str(copy)) as repo:
        stages = [Stage(s.name, s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd), Path(s.wdir),
                        [Path(o.fs_path) for o in s.outs], [Path(d.fs_path) for d in s.deps])
                  for s in repo.index.stages]

    def feeds(a: Stage, b: Stage) -> bool:  # an out of a is a dep of b, or holds one, or lies inside one
        return any(d == o or o in d.parents or d in o.parents for o in a.outs for d in b.deps)

    ordered, left = [], list(stages)
    while left:  # Kahn's order, ties in dvc.yaml's order
        ready = next((s for s in left if not any(feeds(t, s) for t in left if t is not s)), None)
        if ready is None:
            raise SystemExit("dvc.yaml's stages form a cycle")
        ordered.append(ready)
        left.remove(ready)
    return ordered


# ---- measuring ------------------------------------------------------------------------------------------------

def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(sum of RSS over proc's descendants, how many there are)."""
    total, count = 0, 0
    try:
        members = proc.children(recursive=True)
    except psutil.Error:
        return 0, 0
    for member in members:
        try:
            total += member.memory_info().rss
            count += 1
        except psutil.Error:  # ended between the listing and the read
            pass
    return total, count


# The stage's parent: a bare interpreter (no site, nothing imported) that runs the command, waits, and writes its
# own RUSAGE_CHILDREN ru_maxrss. A process started straight from this script would carry this script's RSS
# high-water mark (fork, or vfork then exec, hands the parent's mark on), so the kernel figure would never be
# below it; the wrapper's own mark is a few MB.
WRAPPER = ("import resource, subprocess, sys\n"
           "rc = subprocess.call(sys.argv[2:])\n"
           "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
           "sys.exit(rc)\n")


def run_measured(cmd: str, cwd: Path, env: dict, log_file: Path, interval: float) -> tuple[float, int, int, int, int]:
    """Run `bash -c cmd` under WRAPPER; (wall s, peak tree RSS, kernel max RSS of the tree's processes, most
    processes, rc). The tree is the wrapper's descendants, the wrapper itself left out."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    maxrss_file = log_file.with_suffix(".maxrss")
    with open(log_file, "wb") as log:
        start = time.perf_counter()
        wrapper = subprocess.Popen([sys.executable, "-S", "-c", WRAPPER, str(maxrss_file), "bash", "-c", cmd],
                                   cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        watched = psutil.Process(wrapper.pid)
        peak, most = 0, 0
        try:
            while wrapper.poll() is None:
                rss, count = tree_rss(watched)
                peak, most = max(peak, rss), max(most, count)
                time.sleep(interval)
        finally:
            if wrapper.poll() is None:  # interrupted (Ctrl-C, SIGTERM): end the stage's process group, ours only
                os.killpg(wrapper.pid, signal.SIGTERM)
                wrapper.wait()
        wall = time.perf_counter() - start
    maxrss = int(maxrss_file.read_text()) * 1024 if maxrss_file.is_file() else 0  # Linux: ru_maxrss in KiB
    return wall, peak, maxrss, most, wrapper.returncode


def output_bytes(paths: list[Path]) -> tuple[int, int]:
    """(bytes written, bytes linked) of the files under `paths`: a file is written when all its hard links are
    in `paths`; a symlink, or a file with links elsewhere, is linked (its target's size)."""
    seen: dict[tuple[int, int], list] = {}
    linked = 0
    for path in paths:
        if not os.path.lexists(path):
            continue
        files = [path] if not path.is_dir() or path.is_symlink() else \
            [Path(d) / f for d, _, names in os.walk(path) for f in names]
        for f in files:
            info = os.lstat(f)
            if os.path.islink(f):
                linked += os.stat(f).st_size if f.exists() else 0
                continue
            entry = seen.setdefault((info.st_dev, info.st_ino), [info.st_size, info.st_nlink, 0])
            entry[2] += 1
    written = sum(size for size, links, here in seen.values() if links == here)
    linked += sum(size for size, links, here in seen.values() if links != here)
    return written, linked


def run_stages(copy: Path, names: tuple[str, ...] | None, *, interval: float, via_dvc: bool,
               label: str) -> list[Measure]:
    env = stage_env(copy)
    results = []
    for stage in pipeline(copy):
        if names is not None and stage.name.split("@")[0] not in names:
            continue
        cmd = f"dvc repro --single-item {stage.name}" if via_dvc else stage.cmd
        cwd = copy if via_dvc else stage.wdir
        print(f"  [{label}] {stage.name} ...", end="", flush=True)
        log_file = copy / ".bench-logs" / f"{stage.name.replace('@', '-')}.log"
        wall, tree_peak, proc_peak, most, rc = run_measured(cmd, cwd, env, log_file, interval)
        print(f" {wall:.1f} s, {tree_peak / MB:.0f} MB", flush=True)
        if rc:
            tail = log_file.read_text(errors="replace").splitlines()[-30:]
            raise SystemExit(f"stage {stage.name} failed (exit {rc}) in {copy}; the end of {log_file}:\n"
                             + "\n".join(tail))
        written, linked = output_bytes(stage.outs)
        results.append(Measure(stage.name, wall, tree_peak, proc_peak, written, linked, most))
    return results


def photo_count(folder: Path) -> int:
    return len(list_images([folder])) if folder.is_dir() else 0


# ---- tables ---------------------------------------------------------------------------------------------------

def size_table(rows: list[Measure], photos: int) -> list[str]:
    lines = [(f"{'stage':<18}{'wall s':>9}{'ms/photo':>10}{'RSS tree MB':>13}{'RSS proc MB':>13}{'procs':>7}"
             f"{'written MB':>12}{'linked MB':>11}")]
    for m in rows:
        lines.append(f"{m.stage:<18}{m.wall:>9.1f}{1000 * m.wall / max(photos, 1):>10.1f}{m.tree_peak / MB:>13.0f}"
                     f"{m.proc_peak / MB:>13.0f}{m.processes:>7d}{m.written / MB:>12.2f}{m.linked / MB:>11.2f}")
    total = sum(m.wall for m in rows)
    lines.append(f"{'total':<18}{total:>9.1f}{1000 * total / max(photos, 1):>10.1f}"
                 f"{max(m.tree_peak for m in rows) / MB:>13.0f}{max(m.proc_peak for m in rows) / MB:>13.0f}"
                 f"{'':>7}{sum(m.written for m in rows) / MB:>12.2f}")
    return lines


def ratio_table(small: list[Measure], large: list[Measure], photos: float) -> tuple[list[str], list[str]]:
    def ratio(a, b):
        return b / a if a else float("nan")

    lines = [(f"{'stage':<18}{'wall':>8}{'ms/photo':>10}{'RSS tree':>10}{'RSS proc':>10}{'written':>9}  flag "
             f"(RSS > {BOUND}x)")]
    flagged = []
    by_name = {m.stage: m for m in small}
    for b in large:
        a = by_name.get(b.stage)
        if a is None:
            continue
        tree, proc = ratio(a.tree_peak, b.tree_peak), ratio(a.proc_peak, b.proc_peak)
        over = [what for what, r in (("tree", tree), ("proc", proc)) if r > BOUND]
        if over:
            flagged.append(b.stage)
        lines.append(f"{b.stage:<18}{ratio(a.wall, b.wall):>7.2f}x{ratio(a.wall, b.wall) / photos:>9.2f}x"
                     f"{tree:>9.2f}x{proc:>9.2f}x{ratio(a.written, b.written):>8.2f}x  "
                     + ("OVER: " + "+".join(over) if over else ""))
    return lines, flagged


# ---- the two parts --------------------------------------------------------------------------------------------

def zoo(base: Path, sizes: list[int], args) -> dict[int, tuple[int, list[Measure]]]:
    """{images_per_device: (photos acquired, per-stage measures)}."""
    results = {}
    for n in sizes:
        copy = make_copy(base / f"zoo-{n}")
        updates = {"synth.images_per_device": n}
        if args.epochs is not None:
            updates["train.epochs"] = args.epochs
        if args.steps is not None:
            updates["train.steps_per_epoch"] = args.steps
        set_params(updates, str(copy / "params.yaml"))
        print(f"zoo at images_per_device={n} in {copy}")
        measures = run_stages(copy, None, interval=args.interval, via_dvc=args.dvc, label=f"N={n}")
        results[n] = photo_count(copy / "data" / "raw"), measures
    return results


def split_photo_bytes(copy: Path) -> tuple[int, int, float]:
    """(photos the prepare stage read, their bytes, their mean megapixels) from the split CSVs."""
    from PIL import Image

    paths = pd.concat([pd.read_csv(copy / "data" / "split" / f"{s}.csv", dtype=str)["path"]
                       for s in ("train", "val", "test")])
    files = [p if Path(p).is_absolute() else copy / p for p in map(Path, paths)]
    pixels = []
    for f in files:
        with Image.open(f) as im:
            pixels.append(im.size[0] * im.size[1])
    return len(files), sum(os.stat(f).st_size for f in files), sum(pixels) / max(len(pixels), 1) / 1e6


def real(base: Path, folder: Path, args) -> tuple[list[str], list[Measure], int]:
    copy = make_copy(base / "real")
    env = stage_env(copy)
    print(f"real photos from {folder} in {copy}")
    done = subprocess.run(["camid", "catalog", "from-folder", str(folder.resolve()), "--name", "bench_real",
                           "--params", "params.yaml", "--workers", str(os.cpu_count() or 1)],
                          cwd=copy, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"camid catalog from-folder {folder} failed:\n{done.stdout}\n{done.stderr}")
    kaggle = dict((load_raw(str(copy / "params.yaml")).get("profiles") or {}).get("kaggle") or {})
    if not kaggle:
        raise SystemExit("params.yaml has no profiles.kaggle")
    # the profile's data and head settings; the catalog and source are the folder's, the training a dry run
    updates = {k: v for k, v in kaggle.items() if k.split(".")[0] == "train"}
    archs = list(kaggle["train.archs"]) if args.real_arch == "profile" else args.real_arch.split(",")
    updates.update({"train.archs": archs, "train.weights": "none", "train.epochs": 1,
                    "train.steps_per_epoch": args.real_steps})
    if args.real_no_tta:
        updates["evaluate.tta"] = False
    set_params(updates, str(copy / "params.yaml"))
    measures = run_stages(copy, REAL_STAGES, interval=args.interval, via_dvc=args.dvc, label="real")
    photos_in, photo_bytes, megapixels = split_photo_bytes(copy)
    cache = next(m for m in measures if m.stage == "prepare")
    params = load_raw(str(copy / "params.yaml"))
    notes = [(f"photos: {photo_count(copy / 'data' / 'raw')} acquired, {photos_in} through filter and split "
             f"({megapixels:.1f} MP mean, {photo_bytes / MB:.1f} MB); patch {params['train']['patch']}, "
             f"{params['train']['crops_per_decode']} patches per decode, archs {', '.join(archs)}, weights none, "
             f"evaluate.tta {params['evaluate']['tta']}, "
             f"{args.real_steps} step(s) of batch {params['train']['batch_size']}"),
             (f"what prepare wrote (data/cache): {cache.written / MB:.1f} MB = {cache.written / max(photo_bytes, 1):.2f}x the "
             f"{photo_bytes / MB:.1f} MB of the photos prepare read (issue 19's bound: 1.5x)")]
    return notes, measures, photo_count(copy / "data" / "raw")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-device", type=int, default=None,
                        help="N, photos per virtual device (default: params.yaml synth.images_per_device)")
    parser.add_argument("--factor", type=int, default=4, help="the larger run has FACTOR x N photos per device")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: params.yaml's)")
    parser.add_argument("--steps", type=int, default=None, help="train.steps_per_epoch (default: params.yaml's)")
    parser.add_argument("--real", type=Path, default=None, help="also run the Kaggle patch size on the real "
                                                                 "photos of DIR/<label>/<device>/<photos>")
    parser.add_argument("--real-arch", default="smallcnn", help="the backbones of the real part's training step "
                        "(comma-separated; `profile`: the Kaggle profile's four)")
    parser.add_argument("--real-no-tta", action="store_true", help="the real part's evaluate without test-time "
                        "views (8x less scoring: for the four ImageNet backbones on a CPU)")
    parser.add_argument("--real-steps", type=int, default=1, help="training steps of the real part")
    parser.add_argument("--skip-zoo", action="store_true", help="only the --real part")
    parser.add_argument("--dvc", action="store_true", help="run each stage as `dvc repro --single-item STAGE` "
                                                            "(DVC's process and cache hashing included)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between process-tree RSS samples")
    parser.add_argument("--keep", type=Path, default=None, help="keep the copies in this folder")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed run ends its stage too
    if args.factor < 2:
        parser.error("--factor must be at least 2")
    if args.skip_zoo and not args.real:
        parser.error("--skip-zoo needs --real DIR")
    if args.real and not args.real.is_dir():
        parser.error(f"--real {args.real} is not a folder")

    n = args.images_per_device or int(load_raw(str(ROOT / "params.yaml"))["synth"]["images_per_device"])
    sizes = [n, n * args.factor]
    base_holder = None
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        base = args.keep.resolve()
    else:
        base_holder = tempfile.TemporaryDirectory(prefix="camid-bench-scale-")
        base = Path(base_holder.name)
    started = time.perf_counter()
    try:
        if not args.skip_zoo:
            found = zoo(base, sizes, args)
            train_note = (f"train: {args.epochs if args.epochs is not None else 'params'} epoch(s) x "
                          f"{args.steps if args.steps is not None else 'params'} steps")
            report = []
            for size, (photos, measures) in found.items():
                report += ["", f"virtual zoo, images_per_device={size}: {photos} photos acquired; {train_note}"
                               + ("; via dvc repro" if args.dvc else "")]
                report += size_table(measures, photos)
            (p_small, small), (p_large, large) = found[sizes[0]], found[sizes[1]]
            lines, flagged = ratio_table(small, large, p_large / max(p_small, 1))
            report += ["", (f"ratio {sizes[1]}/{sizes[0]} per device ({p_large}/{p_small} photos); "
                           "ms/photo ratio 1.00x = linear time")] + lines
            report.append(f"stages whose peak RSS grew more than {BOUND}x: {', '.join(flagged) or 'none'}")
            print("\n".join(report), flush=True)
        if args.real:
            notes, measures, photos = real(base, args.real, args)
            print("\n".join(["", f"real photos, Kaggle profile's patch size ({args.real})"] + notes
                            + size_table(measures, photos)))
    finally:
        if base_holder:
            base_holder.cleanup()
    print(f"\n{time.perf_counter() - started:.0f} s in all" + (f"; copies kept in {base}" if args.keep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
