"""Run `img2dataset.download(**kwargs)` in a process of its own.

    python -m campe.data.img2dataset_runner kwargs.json

img2dataset installs a SIGINT handler, which Python allows only in the main thread, and spawns workers that
re-import the caller's main module. Running it as its own process makes it safe to call from anywhere (a Prefect
task thread, a notebook, a test) and keeps its module-level imports (wandb, albumentations) out of our process.
"""
from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # otherwise every worker checks the network on import
    os.environ.setdefault("WANDB_MODE", "disabled")
    with open(sys.argv[1]) as f:
        kwargs = json.load(f)
    from img2dataset import download

    download(**kwargs)
