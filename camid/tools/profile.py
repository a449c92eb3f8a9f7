"""`camid profile NAME`: write a named profile of params.yaml (e.g. `kaggle`) into the active blocks.

A profile maps dotted keys (`train.patch`) to values. params.yaml is rewritten in place, comments kept,
atomically; `dvc repro` then re-runs exactly the stages whose keys changed.
"""
from __future__ import annotations

import argparse
import io
import os

from ruamel.yaml import YAML

from camid.config import PARAMS_FILE, load_params
from camid.errors import CamidError
from camid.core.fileio import atomic_path


def _load(path):
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096                             # keep long lines (one catalog entry per line) as they are
    yaml.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout
    with open(path) as f:
        return yaml, yaml.load(f)


def set_params(updates: dict, path: str = PARAMS_FILE) -> dict:
    """Set dotted keys (`train.patch`) in params.yaml, keeping its comments; returns {key: (old, new)}."""
    yaml, doc = _load(path)
    changed = {}
    for dotted, value in updates.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            if key not in node:
                raise CamidError(f"cannot set {dotted}: {path} has no section {key!r}")
            node = node[key]
        changed[dotted] = (node.get(leaf), value)
        node[leaf] = value
    buf = io.StringIO()
    yaml.dump(doc, buf)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
        load_params(tmp)  # the new file must load before it replaces the old one
    return changed


def apply_profile(name: str, path: str = PARAMS_FILE) -> dict:
    _, doc = _load(path)
    profiles = doc.get("profiles") or {}
    if name not in profiles:
        raise CamidError(f"no profile {name!r} in {path}; profiles: {', '.join(profiles) or 'none'}")
    return set_params(dict(profiles[name]), path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="profile name under `profiles:` in params.yaml (e.g. kaggle)")
    parser.add_argument("--params", default=None, help="params file to rewrite (default $CAMID_PARAMS or params.yaml)")


def run(args: argparse.Namespace) -> int:
    path = args.params or os.environ.get("CAMID_PARAMS", PARAMS_FILE)
    for key, (old, new) in apply_profile(args.name, path).items():
        print(f"{key}: {old} -> {new}")
    return 0
