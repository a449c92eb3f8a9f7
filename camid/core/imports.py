"""What camid's code imports, read from its source (no module is run): the import closure of a module, imports
inside functions included (camid imports heavy modules lazily), and the third-party modules that closure names.

Two users: tests/test_dvc_graph.py (every camid file a stage runs is one of its DVC deps) and the register stage
(the served model's requirements.txt lists the distributions the serving path imports,
`camid.stages.register.serving_requirements`). The closure is per module, not per call path: a module's every
import counts, even one in a function the caller never runs, so it can only list too much, never too little.
"""
from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]   # .../camid
ROOT = PACKAGE_DIR.parent                            # the folder holding the package (the repo root in a checkout)
PACKAGE = PACKAGE_DIR.name


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source of module `name` under `root` (a .py, a package's __init__.py, or a C extension's .c), or None."""
    path = Path(root) / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py", path.with_suffix(".c")):
        if candidate.is_file():
            return candidate
    return None


def _module_of(file: Path, root: Path) -> str:
    parts = file.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _statements(file: Path, root: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Every import statement of `file`, anywhere in it, as (absolute module, names imported from it); a plain
    `import a.b` gives ("a.b", ()). Relative imports are resolved against the file's own package."""
    found = []
    package = _module_of(file, root).split(".")
    if file.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, tuple(alias.name for alias in node.names)))
    return tuple(found)


def camid_imports(file: Path, root: Path = ROOT, package: str = PACKAGE) -> set[str]:
    """The `package` modules a file imports (`from camid.x import y` may name a module camid.x.y)."""
    found = set()
    for module, names in _statements(Path(file), Path(root)):
        if module.split(".")[0] != package:
            continue
        found.add(module)
        found |= {f"{module}.{name}" for name in names if module_file(f"{module}.{name}", root)}
    return found


def third_party_imports(file: Path, root: Path = ROOT, package: str = PACKAGE) -> set[str]:
    """The modules outside `package` and the standard library that a file imports, by their full dotted names
    (`from PIL import Image` -> "PIL", `import mlflow.pyfunc` -> "mlflow.pyfunc")."""
    return {module for module, _ in _statements(Path(file), Path(root))
            if module and module.split(".")[0] not in (package, "__future__")
            and module.split(".")[0] not in sys.stdlib_module_names}


def closure(*modules: str, root: Path = ROOT, package: str = PACKAGE) -> set[Path]:
    """Every `package` source file the modules run: their imports, theirs, and each package's __init__ on the way."""
    root = Path(root)
    files, todo = set(), list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for k in range(1, len(parts) + 1):  # importing camid.a.b runs camid/__init__ and camid/a/__init__
            file = module_file(".".join(parts[:k]), root)
            if file and file not in files:
                files.add(file)
                todo += sorted(camid_imports(file, root, package)) if file.suffix == ".py" else []
    return files


def closure_imports(*modules: str, root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[Path]]:
    """The third-party modules the closure of `modules` imports, each with the files that import it."""
    found: dict[str, set[Path]] = {}
    for file in closure(*modules, root=root, package=package):
        if file.suffix == ".py":
            for module in third_party_imports(file, root, package):
                found.setdefault(module, set()).add(file)
    return found


def _holds(dist, module: str) -> bool:
    """Whether distribution `dist` installs the source of `module` (a .py, a package, or an extension)."""
    stem = module.replace(".", "/")
    for path in dist.files or ():
        text = path.as_posix()
        if text in (f"{stem}.py", f"{stem}/__init__.py") or (text.startswith(f"{stem}.") and "/" not in text[len(stem):]):
            return True
    return False


def distributions_of(module: str) -> list[str]:
    """The installed distributions that provide `module` (importlib.metadata.packages_distributions on its top-level
    name; where several share it, a namespace package or a split project like mlflow / mlflow-skinny, the ones
    whose files hold the module itself). Empty if nothing installed provides it."""
    from importlib.metadata import distribution

    dists = sorted(set(_top_level().get(module.split(".")[0], [])))
    if len(dists) <= 1:
        return dists
    holders = [name for name in dists if _holds(distribution(name), module)]
    return holders or dists


@lru_cache(maxsize=1)
def _top_level() -> dict:
    """importlib.metadata.packages_distributions(), read once (it scans every installed distribution)."""
    from importlib.metadata import packages_distributions

    return packages_distributions()
