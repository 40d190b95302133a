"""campe.load and the training run's MLflow Model, on a tiny model trained by the real stages (generate, download,
cache, train, evaluate through `campe ...`) with a real SQLite MLflow store: the API's embeddings are the ones
`campe evaluate` ranks, the logged pyfunc model gives the same, the run lists its datasets, and CLIP_benchmark's own
retrieval evaluator gets `campe evaluate`'s recalls."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from campe.cli import main
from tests.tiny_config import write_tiny_params

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tiny_lm, tmp_path_factory):
    """The tiny pipeline through the CLI: {"root", "params", "out", "uri", "run_id", "gen"}; the model is
    registered as `campe-tiny` (train --register)."""
    root = tmp_path_factory.mktemp("api")
    params = write_tiny_params(root / "params.yaml", root=root, text_model=tiny_lm)
    gen = root / "data" / "generated"
    for argv in (["generate", "--out", str(gen)], ["download"], ["cache"], ["train", "--register", "campe-tiny"],
                 ["evaluate"]):
        assert main([argv[0], "--params", str(params), *argv[1:]]) == 0, argv
    out = root / "data" / "models" / "campe"
    return {"root": root, "params": params, "out": out, "uri": f"sqlite:///{root / 'mlflow.db'}", "gen": gen,
            "run_id": (out / "mlflow_run_id.txt").read_text().strip()}


def _karpathy(gen: Path):
    from campe.data.evaldata import load_karpathy
    return load_karpathy(gen / "dataset_karpathy.json", split="test", max_captions=5)


def test_load_gives_the_embeddings_and_the_metrics_campe_evaluate_computed(run):
    import campe
    from campe.core.retrieval import retrieval_metrics

    m = campe.load(run["out"], batch_size=32)  # evaluate.batch_size of the tiny params
    ds = _karpathy(run["gen"])
    img, txt = m.encode_image(ds.image_paths), m.encode_text(ds.captions)
    assert img.shape == (len(ds.image_paths), 64) and txt.shape == (len(ds.captions), 64)
    assert torch.allclose(img.norm(dim=1), torch.ones(len(img)), atol=1e-5)
    assert m.n_aspects == 2 and m.embed_dim == 64 and m.transform(ds.image_paths[0]).shape == (3, 32, 32)
    # The numbers `campe evaluate` wrote for this checkpoint, from the API's embeddings with its settings.
    rec = json.loads((run["root"] / "metrics" / "eval" / "generated.json").read_text())
    got = retrieval_metrics(img, txt, torch.tensor(ds.txt_to_img), ks=[1, 5, 10])
    assert {"i2t_R@1", "t2i_R@10", "rsum"} <= set(got)  # the record also holds the aspect breakdown (its own tests)
    assert got == pytest.approx({k: rec["metrics"][k] for k in got}, abs=1e-6)  # (written rounded to 6 decimals)
    # PIL images, paths and a tensor through `transform` give the same image embeddings.
    from PIL import Image
    pil = [Image.open(p) for p in ds.image_paths[:3]]
    assert torch.equal(m.encode_image(pil), m.encode_image(ds.image_paths[:3]))
    assert torch.equal(m.encode_image(torch.stack([m.transform(p) for p in pil])), img[:3])
    # similarity: cosine, and with aspect weights sum_k w_k <v_k, t_k> (campe.core.retrieval's definition).
    from campe.core.retrieval import segment_similarity
    s = m.similarity(ds.image_paths[:3], ds.captions[:4])
    assert torch.allclose(s, img[:3] @ txt[:4].T, atol=1e-6)
    sw = m.similarity(ds.image_paths[:3], ds.captions[:4], aspect_weights=[2.0, 0.5])
    assert torch.allclose(sw, segment_similarity(img[:3], txt[:4], 2, [2.0, 0.5]), atol=1e-6)
    assert not torch.allclose(sw, s, atol=1e-4)
    with pytest.raises(ValueError, match="K=2 prompt segments"):
        m.similarity(ds.image_paths[:1], ["a red circle"], aspect_weights=[1.0, 1.0, 1.0])
    vid = sorted((run["gen"] / "msrvtt" / "videos").glob("*.mp4"))[:2]
    assert m.encode_video(vid).shape == (2, 64)


def test_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path, run):
    import campe
    (tmp_path / "notes.txt").write_text("hello")
    for bad, why in ((tmp_path, "is not a campe model: it has no model.pt"), (tmp_path / "nope", "does not exist"),
                     (tmp_path / "notes.txt", "is a file")):
        with pytest.raises(campe.NotACampeModel, match=why) as e:
            campe.load(bad)
        assert str(bad) in str(e.value) and "campe train" in str(e.value)
    with pytest.raises(campe.NotACampeModel, match="runs:/0123456789abcdef/model: not found"):
        campe.load("runs:/0123456789abcdef/model", tracking_uri=run["uri"])


def test_import_campe_stays_cheap():
    code = ("import sys, campe; print(sorted({'torch', 'mlflow', 'campe.api'} & set(sys.modules))); "
            "campe.load; print(sorted({'torch', 'campe.api'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "['campe.api',", "'torch']"]  # torch comes with the first use of campe.load


def test_logged_mlflow_model_loads_offline_and_gives_campe_loads_embeddings(run):
    import mlflow
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.tracking import MlflowClient

    import campe
    client = MlflowClient(tracking_uri=run["uri"])
    r = client.get_run(run["run_id"])
    assert r.info.status == "FINISHED"
    mlflow.set_tracking_uri(run["uri"])
    try:
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{run['run_id']}/model")
        logged = client.search_logged_models(experiment_ids=[r.info.experiment_id])
        version = client.get_model_version("campe-tiny", "1")
    finally:
        mlflow.set_tracking_uri("")
    assert [(lm.name, lm.source_run_id) for lm in logged] == [("model", run["run_id"])]  # the run page lists it
    assert version.run_id == run["run_id"] and version.status == "READY"
    sig = pyfunc.metadata.signature
    assert sig.inputs.input_names() == ["text", "image"] and sig.outputs.inputs[0].shape == (-1, 64)
    ds = _karpathy(run["gen"])
    ref = campe.load(run["out"])
    txt = pyfunc.predict(pd.DataFrame({"text": ds.captions[:5]}))
    assert torch.allclose(torch.from_numpy(txt), ref.encode_text(ds.captions[:5]), atol=1e-6)
    images = [Path(p).read_bytes() for p in ds.image_paths[:3]]
    img = pyfunc.predict(pd.DataFrame({"image": images}))
    assert torch.allclose(torch.from_numpy(img), ref.encode_image(ds.image_paths[:3]), atol=1e-6)
    with pytest.raises(Exception, match="one column"):
        pyfunc.predict(pd.DataFrame({"text": ["a"], "image": [images[0]]}))
    # The registered version loads the same model.
    by_name = campe.load("models:/campe-tiny/1", tracking_uri=run["uri"])
    assert torch.equal(by_name.encode_text(ds.captions[:5]), ref.encode_text(ds.captions[:5]))


def test_the_training_run_lists_its_datasets_with_digests(run):
    from mlflow.tracking import MlflowClient

    from campe.core.tracking import folder_digest
    inputs = MlflowClient(tracking_uri=run["uri"]).get_run(run["run_id"]).inputs.dataset_inputs
    by_name = {d.dataset.name: d for d in inputs}
    assert set(by_name) == {"train-shards", "text-cache"}
    for name, folder in (("train-shards", "shards"), ("text-cache", "cache")):
        d = by_name[name]
        path = run["root"] / "data" / folder / "train"
        assert json.loads(d.dataset.source) == {"uri": str(path)}
        assert d.dataset.digest == folder_digest(path)  # no dvc.lock beside this params file: computed
        profile = json.loads(d.dataset.profile)
        assert profile["digest"] == "computed" and profile["files"] == sum(1 for f in path.rglob("*") if f.is_file())
        assert [(t.key, t.value) for t in d.tags] == [("mlflow.data.context", "train")]


def test_clip_benchmark_zero_shot_retrieval_gets_campe_evaluates_recalls(run):
    """CLIP_benchmark's own evaluator on the generated Karpathy test split vs the recalls `campe evaluate` wrote.
    Tie rules differ: campe counts a negative within tie_tol (1e-5) of the positive as ranked above it
    (pessimistic), CLIP_benchmark keeps torch.topk's order. So its recalls lie between campe's pessimistic and
    optimistic ones, and equal `campe evaluate`'s wherever no score lies within the tolerance of a positive; the
    text->image direction of this set has none (checked), so there they are equal."""
    from clip_benchmark.metrics.zeroshot_retrieval import evaluate

    import campe
    from campe.api import clip_benchmark_model
    from campe.core.retrieval import retrieval_metrics
    m = campe.load(run["out"], batch_size=32)
    ds = _karpathy(run["gen"])
    model, transform, tokenizer = clip_benchmark_model(m)
    caps = [[] for _ in ds.image_paths]
    for c, i in zip(ds.captions, ds.txt_to_img):
        caps[i].append(c)
    data = [(transform(p), caps[i]) for i, p in enumerate(ds.image_paths)]
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=lambda b: (
        torch.stack([x for x, _ in b]), [t for _, t in b]))
    ks = [1, 5]  # (its top-k needs k <= the 8 test images)
    got = evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=ks)
    rec = json.loads((run["root"] / "metrics" / "eval" / "generated.json").read_text())
    pess = rec["metrics"]
    img, txt, t2i = m.encode_image(ds.image_paths), m.encode_text(ds.captions), torch.tensor(ds.txt_to_img)
    opt = retrieval_metrics(img, txt, t2i, ks=ks, ties="optimistic", tie_tol=rec["tie_tol"])
    scores = txt @ img.T  # [M captions, N images]: no image within the tolerance of a caption's own image
    own = scores[torch.arange(len(t2i)), t2i]
    others = scores.masked_fill(torch.nn.functional.one_hot(t2i, len(img)).bool(), float("inf"))
    assert (others - own[:, None]).abs().min() > 10 * rec["tie_tol"]
    for k in ks:
        cb = {"t2i": 100 * got[f"image_retrieval_recall@{k}"], "i2t": 100 * got[f"text_retrieval_recall@{k}"]}
        assert cb["t2i"] == pytest.approx(pess[f"t2i_R@{k}"], abs=1e-4)
        for d in ("i2t", "t2i"):
            assert pess[f"{d}_R@{k}"] - 1e-4 <= cb[d] <= opt[f"{d}_R@{k}"] + 1e-4, (d, k, cb, pess, opt)
