"""The `campe` command: one subcommand per pipeline stage (plus debugging helpers).

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

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args) -> int`; the module
is imported only when its subcommand is used, so `campe --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from campe.config import ConfigError
from campe.io import OutputInUse

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("stages.generate", "generate the embedded default benchmark (images, videos, annotations)"),
    "download": ("stages.download", "download a URL list with img2dataset into webdataset shards"),
    "ablate": ("campe.ablate", "the ablation table: methods x softmax/sigmoid x seeds, mean ± std (resumable)"),
    "flow": ("pipelines.campe_flow", "run, show or serve the Prefect flow (scheduled deployment from params.yaml)"),
    "cache": ("stages.cache", "precompute the frozen text-LM hidden states of every caption (resumable, sharded)"),
    "train": ("stages.train", "train CAMPE or a baseline from the cache or online (DDP under torchrun, MLflow)"),
    "evaluate": ("stages.evaluate", "image/video retrieval, zero-shot classification and pictures for a checkpoint"),
    "prompts": ("campe.prompts_debug", "show the multi-prompt token layout and attention mask of a caption"),
    "params": ("stages.params", "check params.yaml (every section, across sections) or write its JSON Schema"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
    return "usage: campe <command> [options]\n\ncommands:\n" + "\n".join(lines) + "\n\n`campe <command> -h` for options."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"campe: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"campe {name}", description=COMMANDS[name][1])
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
