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
from campe.core.config import read_yaml
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
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from campe.data import shards`
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
    # the instrument: stages/train.py imports campe.train.loop at the top; stages/ablate.py imports stages lazily
    assert "campe/train/loop.py" in imports_of("stages/train.py")
    assert "stages/params.py" in imports_of("stages/cache.py")  # inside run()
    assert "stages/params.py" in imports_of("stages/ablate.py")  # inside a function


def test_every_stage_lists_the_library_modules_it_runs():
    """Editing a module a stage imports (directly or not) must re-run that stage: dvc.yaml lists it in deps."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = _expand_foreach(dvc, read_yaml(ROOT / "params.yaml"))
    missing = {}
    for name, stage in stages.items():
        command = re.match(r"campe (\S+)", stage["cmd"]).group(1)
        script = module_file(cli.commands()[command][0])
        needed = closure(script)
        listed = set(stage["deps"])
        if needed - listed:
            missing[name] = sorted(needed - listed)
    assert not missing, f"dvc.yaml stages miss deps they import: {missing}"


APP = ("stages", "pipelines")


def app_references(path: str, root: Path = ROOT) -> list[str]:
    """What the module at `path` names of the app side: imports at any depth (absolute or relative) and string
    literals that name an app module (`"stages.train"`, as handed to importlib)."""
    tree = ast.parse((root / path).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in APP]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.split(".")[0] in APP:
                found.append(node.module)
            elif node.level > 0:  # relative: resolve against the module's own package
                pkg = Path(path).parent.parts[:len(Path(path).parent.parts) - (node.level - 1)]
                target = ".".join([*pkg, *(node.module.split(".") if node.module else [])])
                if target.split(".")[0] in APP:
                    found.append(target)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += re.findall(r"\b(?:stages|pipelines)\.[A-Za-z_]\w*", node.value)
    return found


def test_the_library_never_imports_the_app():
    """Imports flow one way: nothing under campe/ imports stages/ or pipelines/, statically, inside a function, or
    by a module name in a string (importlib); the CLI's command table lives in pyproject.toml's entry points."""
    offenders = {f.relative_to(ROOT).as_posix(): refs for f in sorted((ROOT / "campe").rglob("*.py"))
                 if (refs := app_references(f.relative_to(ROOT).as_posix()))}
    assert not offenders, f"library modules that reach up into the app: {offenders}"


def test_app_reference_reader_sees_every_kind_of_reference(tmp_path):
    src = ("import stages.train\nfrom pipelines import campe_flow\n"
           "def f():\n    from stages.cache import run_stage\n    importlib.import_module('stages.evaluate')\n"
           "from ..pipelines import flow_params\n"
           "x = 'a stages folder'  # prose, not a module name\n")
    (tmp_path / "campe").mkdir()
    (tmp_path / "campe" / "m.py").write_text(src)
    refs = app_references("campe/m.py", root=tmp_path)
    assert sorted(refs) == ["pipelines", "pipelines", "stages.cache", "stages.evaluate", "stages.train"]


# The library's layers, bottom up: a module imports only from its own package or from a lower layer.
# The locked image tower sits under the model (build_model builds either tower), the search page over campe.load.
LAYERS = {"core": 0, "data": 1, "text": 2, "towers": 2, "locked": 3, "model": 4, "embed": 5, "plots": 5, "train": 5,
          "attriprompt": 5, "pretrain_clip": 5, "cli": 6, "api": 6, "serve": 7, "mlflow_model": 7}


def layer_of(path: str) -> str:
    """campe/core/io.py -> "core"; campe/model.py -> "model"."""
    parts = Path(path).parts
    return parts[1] if len(parts) > 2 else Path(path).stem


def test_library_layers_import_only_downwards():
    """core < data < text, towers < locked < model < embed, plots, train < cli, api < serve, mlflow_model: no import
    runs back up (or sideways between two packages of one layer), so a new method's package can stand on the layers
    below it."""
    files = sorted(f.relative_to(ROOT).as_posix() for f in (ROOT / "campe").rglob("*.py"))
    unknown = {layer_of(f) for f in files if not f.endswith("__init__.py")} - set(LAYERS)
    assert not unknown, f"campe modules/packages without a layer in LAYERS: {sorted(unknown)}"
    upward = [f"{f} -> {g}" for f in files for g in sorted(imports_of(f))
              if g.startswith("campe/") and layer_of(g) != layer_of(f) and LAYERS[layer_of(g)] >= LAYERS[layer_of(f)]]
    assert not upward, f"imports that run up (or across) the library's layers: {upward}"


def test_dvc_metrics_are_the_headlines_of_full_files_the_stage_writes():
    """`dvc metrics show` prints the headline files only (a few figures per stage and set); each stage lists the
    full metrics file beside its headline (campe.core.io.headline_path) as an output."""
    from campe.core.io import headline_path

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = read_yaml(ROOT / "params.yaml")
    stages = _expand_foreach(dvc, params)

    def value(match):
        section, key = match.group(1).split(".")
        return str(params[section][key])

    def paths(entries):
        return [re.sub(r"\$\{(\w+\.\w+)\}", value, next(iter(e)) if isinstance(e, dict) else e)
                for e in entries or []]

    without = set()
    for name, stage in stages.items():
        outs = paths(stage.get("outs"))
        if not stage.get("metrics"):
            without.add(name)
        for m in paths(stage.get("metrics")):
            assert m.endswith(".headline.json"), (name, m)
            assert any(headline_path(o).as_posix() == m for o in outs), (name, m, outs)
    # Every stage has headline metrics but those that make data (generate, cache, fewshot_data) and the prompt
    # learners' training, whose per-cell files the eval stage's report sums up.
    assert without == {"generate", "cache", "fewshot_data", "prompt_learn_train"}
