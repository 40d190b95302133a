"""The code's structure, read from its import graph: dvc.yaml lists every library module a stage runs.

Imports are read statically (ast), at any depth (function-level imports included), resolved to files of this
checkout. One edge is left out on purpose: `stages.params` (the whole-file params check every stage runs first)
imports every stage's params class, but it can only refuse a file, never change an output, so it does not make
one stage depend on another stage's code.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from campe import cli
from campe.config import read_yaml
from tests.test_config import _expand_foreach

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("campe", "stages", "pipelines")
VALIDATION_ONLY = {"stages/params.py"}


def module_file(name: str) -> str | None:
    """A dotted module name -> its file in this checkout (relative path), or None when it is not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.exists():
            return cand.relative_to(ROOT).as_posix()
    return None


def imports_of(path: str) -> set[str]:
    """Files of this checkout that the module at `path` imports (anywhere in it)."""
    tree = ast.parse((ROOT / path).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from campe import shards`
    return {f for f in map(module_file, names) if f and f != path}


def closure(path: str) -> set[str]:
    seen, todo = set(), [path]
    while todo:
        f = todo.pop()
        if f in seen or f in VALIDATION_ONLY:
            continue
        seen.add(f)
        todo += sorted(imports_of(f))
    return seen - {f for f in seen if f.endswith("__init__.py") and not (ROOT / f).read_text().strip()}


def test_import_reader_sees_function_level_and_from_imports():
    # the instrument: stages/train.py imports campe.train_loop at the top; campe/ablate.py imports stages lazily
    assert "campe/train_loop.py" in imports_of("stages/train.py")
    assert "stages/params.py" in imports_of("stages/cache.py")  # inside run()


def test_every_stage_lists_the_library_modules_it_runs():
    """Editing a module a stage imports (directly or not) must re-run that stage: dvc.yaml lists it in deps."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = _expand_foreach(dvc, read_yaml(ROOT / "params.yaml"))
    missing = {}
    for name, stage in stages.items():
        command = re.match(r"campe (\S+)", stage["cmd"]).group(1)
        script = module_file(cli.COMMANDS[command][0])
        needed = closure(script)
        listed = set(stage["deps"])
        if needed - listed:
            missing[name] = sorted(needed - listed)
    assert not missing, f"dvc.yaml stages miss deps they import: {missing}"
