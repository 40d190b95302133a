"""What the MLflow Model and the dataset inputs add to a training run, at the default config's model size.

    python bench/mlflow_model.py [--params params.yaml]

Builds the default run's model (params.yaml: text_encoder, model, loss, train; untrained weights: the cost does not
depend on them), saves it as a `campe train` out_dir in a temporary folder, opens a run in a fresh SQLite store and
times campe.mlflow_model.log_model (the pyfunc Model: copy, signature, input example check), register_model, and
Tracker.log_datasets on the configured shards/cache folders when they exist (the dvc.lock digest, else computed).
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    import torch

    from campe.core.io import atomic_write_json
    from campe.core.tracking import Tracker
    from campe.mlflow_model import log_model, register_model
    from campe.model import save_config
    from campe.train.checkpoint import FINAL, build_run_model, trainable_state
    from stages.train import load_run_config

    cfg = load_run_config(args.params)
    rows = []
    with tempfile.TemporaryDirectory(prefix="campe-bench-") as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        t = time.perf_counter()
        model, resolved, _ = build_run_model(cfg, "plain")
        torch.save({"model": trainable_state(model), "config": resolved, "step": 0}, out / FINAL)
        save_config(resolved, out / "model_config.json")
        atomic_write_json(out / "train_config.json", {"config": cfg.to_dict(), "params_hash": cfg.hash()})
        rows.append(("build + save the default model (not part of the cost)", time.perf_counter() - t))
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        tp = cfg.train
        tp.tracking_uri, tp.artifact_root = uri, str(Path(tmp) / "artifacts")
        tracker = Tracker(tp, base_dir=tmp)
        folders = {n: f for n, f in (("train-shards", tp.shards_dir), ("text-cache", tp.cache_dir))
                   if f and Path(f).is_dir()}
        t = time.perf_counter()
        tracker.log_datasets(folders, base_dir=cfg.base_dir)
        rows.append((f"log_datasets {sorted(folders) or '(no data folders here)'}", time.perf_counter() - t))
        t = time.perf_counter()
        log_model(uri, tracker.run_id, out)
        rows.append(("log_model (pyfunc Model, signature, input example)", time.perf_counter() - t))
        t = time.perf_counter()
        register_model(uri, tracker.run_id, "campe-bench")
        rows.append(("register_model", time.perf_counter() - t))
        size = (out / FINAL).stat().st_size
    print(f"model.pt: {size / 1e6:.1f} MB")
    print(f"{'step':<70} {'seconds':>8}")
    for name, sec in rows:
        print(f"{name:<70} {sec:8.2f}")
    print(json.dumps({"model_pt_mb": round(size / 1e6, 1), **{k: round(v, 2) for k, v in (
        ("log_datasets_s", rows[1][1]), ("log_model_s", rows[2][1]), ("register_s", rows[3][1]))}}))


if __name__ == "__main__":
    main()
