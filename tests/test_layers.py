"""The package's layers point one way: CLI -> stages and tools -> building blocks -> core. A building block
never imports a stage, no stage imports another stage, and the core imports nothing of camid but itself and
the error type. Imports inside functions count (camid imports heavy modules lazily)."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT
from tests.test_dvc_graph import PACKAGE, imports_of

BUILDING_BLOCKS = ("core", "data", "forensics", "models", "inference", "serving")


def module_name(file) -> str:
    parts = file.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def files_in(*folders: str):
    return sorted(f for folder in folders for f in (PACKAGE / folder).rglob("*.py"))


def stage_of(module: str) -> str | None:
    """camid.stages.acquire.flickr -> 'acquire'; None outside camid.stages."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["camid", "stages"] and len(parts) > 2 else None


@pytest.mark.parametrize("file", files_in(*BUILDING_BLOCKS), ids=lambda f: module_name(f))
def test_building_blocks_import_no_stage_tool_or_cli(file):
    bad = sorted(m for m in imports_of(file) if m.split(".")[:2] in (["camid", "stages"], ["camid", "tools"],
                                                                      ["camid", "cli"]))
    assert not bad, f"{module_name(file)} imports {bad}: move what it needs into a building block"


@pytest.mark.parametrize("file", files_in("stages"), ids=lambda f: module_name(f))
def test_no_stage_imports_another_stage(file):
    own = stage_of(module_name(file))
    others = sorted(m for m in imports_of(file) if stage_of(m) not in (None, own))
    assert not others, f"stage {own} imports {others}: shared code belongs in a building block"
    assert not {m for m in imports_of(file) if m.startswith("camid.cli")}


@pytest.mark.parametrize("file", files_in("core"), ids=lambda f: module_name(f))
def test_the_core_depends_on_nothing_else_in_camid(file):
    outside = sorted(m for m in imports_of(file) if not m.startswith(("camid.core", "camid.errors")))
    assert not outside, f"{module_name(file)} imports {outside}"


def test_every_command_module_exists_and_stages_are_where_dvc_runs_them():
    import importlib

    from camid.cli import COMMANDS
    from tests.test_dvc_graph import stages

    for name, (module, _) in COMMANDS.items():
        assert hasattr(importlib.import_module(module), "run"), name
    for stage, command, _ in stages():
        assert COMMANDS[command][0].startswith("camid.stages."), f"dvc stage {stage} runs {COMMANDS[command][0]}"


@pytest.mark.parametrize("file", sorted((ROOT / "bench").glob("*.py")), ids=lambda f: f.name)
def test_benchmarks_use_the_package_not_the_tests(file):
    """bench/ scripts run from a checkout without the test suite's helpers: they import camid, never tests."""
    import ast

    for node in ast.walk(ast.parse(file.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        assert not any(n.split(".")[0] == "tests" for n in names), f"{file.name} imports {names}"


# The layers in order, one way: stages -> tools and serving -> inference -> data, forensics, models -> core. A
# module imports only from its own layer's package or a lower layer.
RANK = {"core": 0, "data": 1, "forensics": 1, "models": 1, "inference": 2, "serving": 3, "tools": 3, "stages": 4}


@pytest.mark.parametrize("file", files_in(*RANK), ids=lambda f: module_name(f))
def test_layers_point_one_way(file):
    own = module_name(file).split(".")[1]
    upward = sorted(m for m in imports_of(file)
                    if m.split(".")[:1] == ["camid"] and len(m.split(".")) > 1 and m.split(".")[1] in RANK
                    and m.split(".")[1] != own and RANK[m.split(".")[1]] >= RANK[own])
    assert not upward, f"{module_name(file)} ({own}) imports {upward}, a layer at or above its own"
