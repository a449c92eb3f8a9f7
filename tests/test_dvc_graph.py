"""The DVC graph: every module a stage runs is a dependency of that stage, and every params.yaml key it reads is
one of its params, so `dvc repro` re-runs exactly what a change affects.

The modules come from the import closure of the stage's `camid` subcommand, imports inside functions included
(camid imports heavy modules lazily; `camid.core.imports` walks them). The keys come from reading that closure's
source: what is taken from `load_params()` (`params.split.seed`), and what is read from a section handed on whole
to a function whose parameter is typed with the section's dataclass (`settings: EvaluateParams` ->
`settings.blend`). A section used any other way (asdict, `__dict__`, kept on an object, passed to a function that
does not type it) counts as all of its keys read."""
from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from camid import config
from camid.cli import COMMANDS
from camid.core.imports import camid_imports, closure as import_closure, module_file  # noqa: F401 (used by test_layers)
from tests.conftest import ROOT

PACKAGE = ROOT / "camid"


def imports_of(file: Path) -> set[str]:
    """camid modules a file imports (absolute `camid...` imports; `from camid.x import y` may name a module y)."""
    return camid_imports(file, ROOT)


def closure(module: str) -> set[Path]:
    """Every camid source file `module` runs: its imports, theirs, and each package's __init__ on the way."""
    files = import_closure(module, root=ROOT)
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


def declared_params() -> dict[str, list[str]]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: [str(p) for p in stage.get("do", stage).get("params", [])] for name, stage in spec.items()}


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


# -- params ----------------------------------------------------------------------------------------------------

CATALOG = "catalog"  # the active catalog: dvc.yaml declares it as catalog.active + catalog.${catalog.active}
CATALOG_DECLARED = ("catalog.active", "catalog.${catalog.active}")
# Keys a stage's code reads that it does not declare, on purpose: (stage, key or section) -> (a word its dvc.yaml
# command must hold for the reason to stand, or None; why).
NOT_DECLARED = {
    ("train", "train.archs"): (None, "the stage is a foreach over train.archs, one instance per arch (${item}); "
                                     "the list is only hashed into the name of the resume folder (run_key) and is "
                                     "not logged, so adding an arch must not retrain the others"),
    ("register", "evaluate"): ("--evaluation", "with --evaluation the stage registers the evaluate stage's figures "
                                               "and scores nothing; only `camid register --runs` (or without "
                                               "--evaluation) scores, with the evaluate settings"),
}


def stage_commands() -> dict[str, str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage)["cmd"] for name, stage in spec.items()}


def exempt(stage: str, key: str) -> bool:
    for (name, prefix), (word, _) in NOT_DECLARED.items():
        if name == stage and covers(prefix, key) and (word is None or word in stage_commands()[stage].split()):
            return True
    return False


def _sections() -> dict[str, type]:
    """params.yaml section (dotted) -> its dataclass; "" is the whole Params."""
    found = {"": config.Params}

    def walk(cls, prefix):
        for name, kind in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(kind) and kind is not config.Camera:
                found[prefix + name] = kind
                if kind is not config.Catalog:
                    walk(kind, f"{prefix}{name}.")

    walk(config.Params, "")
    return found


SECTIONS = _sections()
SECTION_OF = {cls.__name__: path for path, cls in SECTIONS.items() if cls is not config.Catalog}
NOT_KEYS = {"path"}  # Params fields that are not params.yaml keys


def leaf_keys(path: str) -> set[str]:
    """Every params.yaml key under a section (the section's dataclass fields, nested sections expanded)."""
    if path == CATALOG:
        return {CATALOG}
    cls = SECTIONS[path]
    keys = set()
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        if key in NOT_KEYS:
            continue
        keys |= leaf_keys(key) if key in SECTIONS else {key}
    return keys


def _name(node) -> str | None:
    """The name a call calls: f(...) -> f, a.b.f(...) -> f."""
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def _annotated_section(annotation) -> str | None:
    """The section a type annotation names (`settings: EvaluateParams`, `x: TrainParams | None`), or None."""
    if annotation is None:
        return None
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        annotation = ast.parse(annotation.value, mode="eval").body
    names = {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(annotation) if isinstance(n, ast.Attribute)}
    found = [SECTION_OF[n] for n in names if n in SECTION_OF]
    return found[0] if found else None


class ParamsReads:
    """The params.yaml keys a set of camid source files reads (see the module docstring)."""

    def __init__(self, files, skip_run: set[Path] = frozenset()):
        self.trees = [ast.parse(f.read_text()) for f in sorted(files) if f.suffix == ".py"]
        for file, tree in zip([f for f in sorted(files) if f.suffix == ".py"], self.trees):
            if file in skip_run:  # another command's entry point: its run() is that command, not this stage
                tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "run")]
        self.defs: dict[str, list] = {}   # function or class name -> its defs (a class: its __init__)
        for tree in self.trees:
            for node in ast.walk(tree):
                for child in ast.iter_child_nodes(node):
                    child.parent = node
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.defs.setdefault(node.name, []).append(node)
                elif isinstance(node, ast.ClassDef):
                    self.defs.setdefault(node.name, []).extend(
                        n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        self.returns = {name: _annotated_section(fns[0].returns) for name, fns in self.defs.items()
                        if fns and _annotated_section(fns[0].returns) is not None}
        self.read: set[tuple[str, str]] = set()   # (key or section, origin): origin "root" (from load_params)
        self.sourced: set[str] = set()           # sections handed from load_params to a typed parameter
        self.untyped: list[str] = []             # where params.yaml is read as raw YAML
        for tree in self.trees:
            self._scope(tree, {})

    # A binding is (section path, origin): origin "root" if it came from load_params() in this code, "typed" if
    # from a typed parameter (counted only where some stage hands that section on: `sourced`).
    def _resolve(self, node, scope):
        if isinstance(node, ast.Name):
            return scope.get(node.id)
        if isinstance(node, ast.Call):
            name = _name(node.func)
            if name == "load_params":
                return "", "root"
            if name == "replace" and node.args:
                return self._resolve(node.args[0], scope)
            kind = self.returns.get(name) or SECTION_OF.get(name)
            if kind is not None:
                inner = [self._resolve(n, scope) for n in ast.walk(node) if n is not node]
                return kind, "root" if any(r and r[1] == "root" for r in inner) else "typed"
            return None
        if isinstance(node, ast.Attribute):
            outer = self._resolve(node.value, scope)
            if outer is None:
                return None
            child = f"{outer[0]}.{node.attr}" if outer[0] else node.attr
            return (child, outer[1]) if child in SECTIONS else None
        if isinstance(node, ast.IfExp):
            return self._resolve(node.body, scope) or self._resolve(node.orelse, scope)
        return None

    def _own_nodes(self, owner):
        """The nodes of a function or module body, not those of functions or classes defined inside it."""
        todo = list(ast.iter_child_nodes(owner))
        while todo:
            node = todo.pop()
            yield node
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                todo += ast.iter_child_nodes(node)

    def _scope(self, owner, outer: dict) -> None:
        scope = dict(outer)
        if isinstance(owner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = owner.args
            for arg in args.posonlyargs + args.args + args.kwonlyargs:
                kind = _annotated_section(arg.annotation)
                if kind is not None:
                    scope[arg.arg] = (kind, "typed")
                else:
                    scope.pop(arg.arg, None)
        nodes = list(self._own_nodes(owner))
        for _ in range(3):  # a = params.x; b = a; ...
            for node in nodes:
                if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    bound = self._resolve(node.value, scope)
                    for target in targets:
                        if isinstance(target, ast.Name) and bound is not None:
                            scope[target.id] = bound
        for node in nodes:
            if isinstance(node, ast.Call) and _name(node.func) == "load_raw":
                self.untyped.append(ast.unparse(node))
            if isinstance(node, ast.Attribute):
                self._attribute(node, scope)
            if isinstance(node, (ast.Name, ast.Attribute, ast.Call)) and isinstance(getattr(node, "ctx", ast.Load()),
                                                                                      ast.Load):
                bound = self._resolve(node, scope)
                if bound is not None:
                    self._use(node, bound, owner)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                self._scope(node, scope)

    def _attribute(self, node: ast.Attribute, scope) -> None:
        outer = self._resolve(node.value, scope)
        if outer is None or outer[0] == CATALOG:
            return
        path, origin = outer
        key = f"{path}.{node.attr}" if path else node.attr
        if node.attr == "__dict__":
            self.read.add((path, origin))
        elif key in SECTIONS or key in NOT_KEYS:
            return  # a section: how it is used is `_use`'s business
        elif node.attr in {f.name for f in dataclasses.fields(SECTIONS[path])}:
            self.read.add((key, origin))

    def _use(self, node, bound, owner) -> None:
        """A section value `node` (bound: (path, origin)): a read of all its keys unless it is only passed on."""
        path, origin = bound
        if path == CATALOG:
            if isinstance(node, ast.Attribute):  # params.catalog: the active catalog is read
                self.read.add((CATALOG, origin))
            return
        parent = getattr(node, "parent", None)
        if isinstance(parent, ast.Attribute) and parent.value is node:
            return  # params.train.patch: `_attribute` has it
        if isinstance(parent, (ast.Assign, ast.AnnAssign)) and parent.value is node and all(
                isinstance(t, ast.Name) for t in (parent.targets if isinstance(parent, ast.Assign) else [parent.target])):
            return  # bound to a name: its uses are followed
        if isinstance(parent, ast.IfExp) and node is not parent.test:
            return  # the IfExp itself is followed
        if isinstance(parent, ast.Return) and _annotated_section(getattr(owner, "returns", None)) == path:
            return  # a typed return: the caller's binding is followed
        if isinstance(parent, ast.keyword):
            call, keyword = parent.parent, parent.arg
        elif isinstance(parent, ast.Call) and node in parent.args:
            call, keyword = parent, parent.args.index(node)
        else:
            self.read.add((path, origin))  # kept on an object, compared, returned untyped...
            return
        name = _name(call.func)
        if name == "replace" and call.args and call.args[0] is node:
            return  # dataclasses.replace(section, ...): the result is followed
        if keyword is not None and self._typed_parameter(name, keyword, path, call):
            if origin == "root":
                self.sourced.add(path)
            return
        self.read.add((path, origin))  # asdict, vars, or a function that does not type it: all of it

    def _typed_parameter(self, name, keyword, path, call) -> bool:
        """Whether every def named `name` types the parameter at `keyword` (an index or a name) as section `path`."""
        fns = self.defs.get(name or "", [])
        if not fns:
            return False
        for fn in fns:
            params = fn.args.posonlyargs + fn.args.args
            if params and params[0].arg in ("self", "cls"):
                params = params[1:]
            if isinstance(keyword, int):
                arg = params[keyword] if keyword < len(params) else None
            else:
                arg = next((a for a in params + fn.args.kwonlyargs if a.arg == keyword), None)
            if arg is None or _annotated_section(arg.annotation) != path:
                return False
        return True

    def keys(self) -> set[str]:
        """The keys read: a section read whole expands to all its keys; reads through typed parameters count
        where the section (or one above it) was handed on from load_params."""
        found = set()
        for path, origin in self.read:
            if origin == "typed" and not any(path == s or path.startswith(f"{s}.") or s == "" for s in self.sourced):
                continue
            found |= leaf_keys(path) if path in SECTIONS or path == CATALOG else {path}
        return found


def params_read(module: str) -> ParamsReads:
    """What the closure of `module` reads. camid/config.py is left out (the loader builds every section, reading
    none), and so is the `run()` of every other command's module the closure imports (`camid inspect`'s, say:
    the stages import forensics.inspect for its functions, never run its command)."""
    others = {module_file(m, ROOT) for m, _ in COMMANDS.values() if m != module}
    return ParamsReads(closure(module) - {PACKAGE / "config.py"}, skip_run=others)


def covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(f"{declared}.")


@pytest.mark.parametrize("stage, command", [(s[0], s[1]) for s in stages()], ids=[s[0] for s in stages()])
def test_every_params_key_a_stage_reads_is_one_of_its_params(stage, command):
    reads = params_read(COMMANDS[command][0])
    declared = declared_params()[stage]
    assert not reads.untyped, f"stage {stage} reads params.yaml as raw YAML ({reads.untyped}): read it with load_params"
    keys = reads.keys()
    missing = sorted(k for k in keys if not exempt(stage, k)
                     and not (k == CATALOG and all(d in declared for d in CATALOG_DECLARED))
                     and not any(covers(d, k) for d in declared))
    assert not missing, f"stage {stage} reads params {missing} but does not declare them in dvc.yaml"
    unread = sorted(d for d in declared if not (d in CATALOG_DECLARED and CATALOG in keys)
                    and not any(covers(d, k) for k in keys))
    assert not unread, f"stage {stage} declares params {unread} in dvc.yaml but never reads them (needless re-runs)"


def _reads_of(source: str, tmp_path) -> set[str]:
    file = tmp_path / "probe.py"
    file.write_text(source)
    return ParamsReads([file]).keys()


def test_the_params_reader_follows_sections_handed_on(tmp_path):
    source = '''
from camid.config import EvaluateParams, TrainParams, load_params

def fit(train: TrainParams):
    return train.patch, train.seed

def score(settings: EvaluateParams):
    return dict(settings.__dict__)

def untyped(x):
    return x

def run(args):
    params = load_params()
    fit(params.train)
    chosen = params.evaluate if args.x else None
    score(settings=chosen)
    untyped(params.register)
    return params.catalog.labels, load_params().split.seed
'''
    keys = _reads_of(source, tmp_path)
    assert {"train.patch", "train.seed", "split.seed", CATALOG} <= keys
    assert leaf_keys("evaluate") <= keys and leaf_keys("register") <= keys  # __dict__; a function that does not type it
    assert "train.epochs" not in keys and not any(k.startswith(("synth", "prepare")) for k in keys)


def test_typed_reads_count_only_where_the_section_is_handed_on(tmp_path):
    source = '''
from camid.config import TrainParams, load_params

def fit(train: TrainParams):
    return train.patch

def run(args):
    return load_params().split.seed
'''
    assert _reads_of(source, tmp_path) == {"split.seed"}


def test_evaluate_reads_the_active_catalog():
    """evaluate writes the catalog's model patterns into the bundle (the EXIF check): editing the active catalog
    must re-run it."""
    assert CATALOG in params_read("camid.stages.evaluate").keys()
    assert all(d in declared_params()["evaluate"] for d in CATALOG_DECLARED)
