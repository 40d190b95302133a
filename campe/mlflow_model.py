"""A training run's model as an MLflow Model: a pyfunc wrapper around campe.api, with a signature and an input example.

    from campe.mlflow_model import log_model, register_model
    log_model(tracking_uri, run_id, out_dir)          # logged model "model" of the run: runs:/<run id>/model
    register_model(tracking_uri, run_id, "campe")     # a new version of "campe" in the store's Model Registry

    import mlflow.pyfunc, pandas as pd
    m = mlflow.pyfunc.load_model("runs:/<run id>/model")              # MLFLOW_TRACKING_URI = the run's store
    m.predict(pd.DataFrame({"text": ["a red circle"]}))                # [N, D] float32 text embeddings
    m.predict(pd.DataFrame({"image": [open("a.jpg", "rb").read()]}))   # [N, D] image embeddings (encoded files)
    m.unwrap_python_model().model                                      # the campe.api.CampeModel itself

The Model holds the run's model.pt + train_config.json (artifacts/checkpoint/); the frozen LM comes from
text_encoder.model_path as at training (the packaged MiniLM by default), and loading needs campe installed. The
embeddings equal campe.load's (tests/test_api.py).
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np

from campe.api import CHECKPOINT_ARTIFACT, CONFIG, find_checkpoint, tracking_store
from campe.train.checkpoint import FINAL

ARTIFACT = "model"  # runs:/<run id>/model
EXAMPLE = ["a red circle on a blue background"]


class CampePyfunc(mlflow.pyfunc.PythonModel):
    """predict(DataFrame) -> float32 [N, D]: column `text` (captions) or `image` (encoded image files, bytes)."""

    def load_context(self, context: Any) -> None:
        from campe.api import load

        self.model = load(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        cols = [c for c in ("text", "image") if c in model_input.columns and model_input[c].notna().any()]
        if len(cols) != 1:
            raise ValueError(f"give one column, 'text' (captions) or 'image' (encoded image bytes); got "
                             f"{list(model_input.columns)}")
        values = model_input[cols[0]].tolist()
        if cols == ["text"]:
            return self.model.encode_text([str(v) for v in values]).numpy()
        return self.model.encode_image([bytes(v) for v in values]).numpy()


def signature(embed_dim: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("string", "text", required=False), ColSpec("binary", "image", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]))


@contextlib.contextmanager
def _fluent_run(tracking_uri: str, run_id: str):
    """MLflow's model logging works on the fluent active run: open `run_id` in `tracking_uri` for it (the process's
    tracking URI put back after: campe.api.tracking_store). The run keeps its status."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    status = client.get_run(run_id).info.status
    with tracking_store(tracking_uri):
        try:
            with mlflow.start_run(run_id=run_id):
                yield
        finally:
            client.update_run(run_id, status=status)  # leaving start_run marked it FINISHED


def _requirements() -> list[str]:
    """Explicit, so MLflow does not infer them (that loads the model in a subprocess: seconds)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "mlflow", "pillow", "av", "pandas", "numpy")]


def log_model(tracking_uri: str, run_id: str, out_dir: str | Path, embed_dim: int | None = None) -> Any:
    """Log the finished run in out_dir (model.pt + train_config.json) as the run's MLflow Model `model`
    (runs:/<run_id>/model); returns MLflow's ModelInfo."""
    ckpt = find_checkpoint(out_dir)
    if embed_dim is None:
        import json

        embed_dim = int(json.loads((ckpt / "model_config.json").read_text())["embed_dim"])
    with tempfile.TemporaryDirectory(prefix="campe-mlflow-model-") as tmp:
        # Only what loading needs (the run's other files are artifacts of the run already).
        staged = Path(tmp) / CHECKPOINT_ARTIFACT
        staged.mkdir()
        for name in (FINAL, CONFIG, "model_config.json"):
            if (ckpt / name).exists():
                shutil.copy2(ckpt / name, staged / name)
        with _fluent_run(tracking_uri, run_id), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)  # we give a signature
            return mlflow.pyfunc.log_model(
                name=ARTIFACT, python_model=CampePyfunc(), artifacts={CHECKPOINT_ARTIFACT: str(staged)},
                signature=signature(embed_dim), input_example={"text": EXAMPLE}, pip_requirements=_requirements())


def register_model(tracking_uri: str, run_id: str, name: str) -> Any:
    """A new version of the registered model `name` (created if needed) from runs:/<run_id>/model, in the same
    store's Model Registry; returns the ModelVersion."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if "already exists" not in str(e).lower() and getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = next((m.model_id for m in client.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{ARTIFACT}'")), None)
    source = f"models:/{model_id}" if model_id else f"runs:/{run_id}/{ARTIFACT}"
    with tracking_store(tracking_uri):  # the registry looks the logged model up through the global store
        return client.create_model_version(name, source, run_id=run_id, model_id=model_id)
