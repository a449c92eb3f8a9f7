"""The DVC graph: every module a stage runs is a dependency of that stage, so `dvc repro` re-runs exactly
what a code change affects. The modules come from the import closure of the stage's `camid` subcommand,
imports inside functions included (camid imports heavy modules lazily)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from camid.cli import COMMANDS
from tests.conftest import ROOT

PACKAGE = ROOT / "camid"


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py", path.with_suffix(".c")):
        if candidate.is_file():
            return candidate
    return None


def imports_of(file: Path) -> set[str]:
    """camid modules a file imports (absolute `camid...` imports; `from camid.x import y` may name a module y)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "camid"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "camid":
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}")}
    return found


def closure(module: str) -> set[Path]:
    """Every camid source file `module` runs: its imports, theirs, and each package's __init__ on the way."""
    files, todo = set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for k in range(1, len(parts) + 1):  # importing camid.a.b runs camid/__init__ and camid/a/__init__
            file = module_file(".".join(parts[:k]))
            if file and file not in files:
                files.add(file)
                todo += sorted(imports_of(file)) if file.suffix == ".py" else []
    if (PACKAGE / "forensics" / "_dcscan.c").is_file() and any("forensics" in f.parts for f in files):
        files.add(PACKAGE / "forensics" / "_dcscan.c")  # the C extension inspect imports
    return files


def stages() -> list[tuple[str, str, list[str]]]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = []
    for name, stage in spec.items():
        stage = stage.get("do", stage)
        words = stage["cmd"].split()
        assert words[0] == "camid", f"stage {name} does not run camid: {stage['cmd']}"
        found.append((name, words[1], [str(d) for d in stage.get("deps", [])]))
    return found


@pytest.mark.parametrize("stage, command, deps", stages(), ids=[s[0] for s in stages()])
def test_every_module_a_stage_runs_is_one_of_its_dependencies(stage, command, deps):
    covered = [ROOT / d for d in deps]
    missing = sorted(str(f.relative_to(ROOT)) for f in closure(COMMANDS[command][0])
                     if not any(f == c or c in f.parents for c in covered))
    assert not missing, f"stage {stage} runs {missing} but does not list them as deps in dvc.yaml"


def test_the_closure_follows_lazy_imports():
    files = {f.relative_to(ROOT).as_posix() for f in closure("camid.stages.evaluate")}
    assert {"camid/stages/evaluate.py", "camid/data/dataset.py", "camid/inference/ensemble.py",
            "camid/core/metrics.py"} <= files
