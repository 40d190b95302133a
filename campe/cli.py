"""The `campe` command: a dispatcher over the commands that installed packages register.

    campe generate            # make the embedded default benchmark (images, videos, URL list)
    campe download            # img2dataset -> webdataset shards, stats roll-up
    campe download --retry-failed
    campe cache               # frozen-LM hidden states of every caption -> Parquet shards + manifest
    campe ablate              # baselines and ablations over seeds -> metrics/ablation.md / .csv
    campe flow run | show | serve
    campe train               # the multi-prompt objective (or a baseline: --method) from the cache
    campe evaluate            # retrieval R@1/5/10 both ways, zero-shot, pictures; logs into the training run
    campe prompts "a red circle on a blue background"
    campe params check        # every section and the checks across them; `campe params schema` writes the schema

The command table is the entry-point group `campe.commands` (pyproject.toml: `name = "module"`), so this library
module names no application module: the stages and the flow (the app side) register themselves, and a second
method's package can add its own commands the same way. Each command module provides `add_arguments(parser)`,
`run(args) -> int` and `HELP` (a one-line string literal). `campe --help` reads HELP from the module's source with
ast, and a module is imported only when its command runs, so `campe --help` stays fast.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import importlib.util
import sys

from campe.core.config import ConfigError
from campe.core.io import OutputInUse

GROUP = "campe.commands"


def _help_of(module: str) -> str:
    """The module's HELP string, read from its source (the module is not imported; its parent packages are)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(f"campe: the module {module!r} of a `{GROUP}` entry point is not installed")
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), spec.origin)
    for node in tree.body:
        if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["HELP"]
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    return ""


def _modules() -> dict[str, str]:
    """name -> module of the registered commands (the first distribution that registers a name wins)."""
    table: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        table.setdefault(ep.name, ep.value)
    return table


def commands() -> dict[str, tuple[str, str]]:
    """name -> (module, one-line help), by name."""
    return {name: (module, _help_of(module)) for name, module in sorted(_modules().items())}


def _usage(table: dict[str, tuple[str, str]]) -> str:
    if not table:
        return f"usage: campe <command> [options]\n\nno commands registered (entry points `{GROUP}`): reinstall campe"
    width = max(map(len, table))
    lines = [f"  {n:<{width}}  {h}" for n, (_, h) in table.items()]
    return "usage: campe <command> [options]\n\ncommands:\n" + "\n".join(lines) + "\n\n`campe <command> -h` for options."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(commands()))
        return 0
    name, rest = argv[0], argv[1:]
    eps = _modules()
    if name not in eps:
        print(f"campe: unknown command '{name}'\n\n{_usage(commands())}", file=sys.stderr)
        return 2
    module = importlib.import_module(eps[name])
    parser = argparse.ArgumentParser(prog=f"campe {name}", description=module.HELP)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, OutputInUse) as e:
        # User-facing errors: one clear line, no traceback.
        print(f"campe {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
