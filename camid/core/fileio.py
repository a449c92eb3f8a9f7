"""Writes that never leave a half-written file behind: everything goes to a temporary name, then is renamed."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from camid.errors import CamidError
from typing import Callable, Iterable, Iterator

# The earliest date a zip entry can hold: what a reproducible archive stamps on every member.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

# A stage output's tracking record (MLflow run ids, store paths): what differs between two identical runs. It lives
# beside the output's own files under this name, which .dvcignore lists, so it never enters an output's hash.
TRACKING_FILE = "tracking.json"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a finished file gets the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; it replaces `path` whole only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_reproducible_zip(src: str | os.PathLike, dst: str | os.PathLike,
                           rewrite: dict[str, Callable[[bytes], bytes]] | None = None) -> None:
    """Copy the zip archive `src` to `dst` (atomically) so that equal contents give equal bytes.

    The members keep their order, names, compression and permission bits; their dates become ZIP_EPOCH and the
    archive comment goes. `rewrite` maps a member name to a function of its bytes (e.g. one dropping a save date).
    `src` and `dst` may be the same file.
    """
    rewrite = rewrite or {}
    with zipfile.ZipFile(src) as source, atomic_path(dst) as tmp:
        with zipfile.ZipFile(tmp, "w") as target:
            for member in source.infolist():
                data = source.read(member)
                if member.filename in rewrite:
                    data = rewrite[member.filename](data)
                info = zipfile.ZipInfo(member.filename, date_time=ZIP_EPOCH)
                info.compress_type, info.external_attr = member.compress_type, member.external_attr
                info.create_system = 3  # unix, whichever system wrote `src`
                target.writestr(info, data)


def iter_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named, and files under the directories named (sorted; hidden names skipped)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*")
                            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists():
            files.append(path)
        else:
            raise CamidError(f"{path} does not exist")
    return files
