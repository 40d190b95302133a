"""The evaluation report of a prompt_learn run: the summary as metrics and three pictures.

    from campe.attriprompt.report import report
    report(params, plots_dir="plots/prompt_learning", metrics_file="metrics/prompt_learning/report.json")

- bnh.png: base / novel / HM per method (the dataset average over the section's datasets; seed spread as error bars);
- usage_<dataset>.png: how often each prompt-pool entry is retrieved per prompted text block, on the dataset's
  test images (base and novel classes), by the attriprompt learner of the first seed;
- clusters.png: the k-means clusters of the patch tokens of each vision layer AttriPrompt reads, drawn over a few
  test images of the first dataset (one colour per cluster).
Reads the per-cell metrics and checkpoints `campe prompt-learn train` wrote; trains nothing.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from campe.attriprompt.config import PromptLearnParams
from campe.attriprompt.fewshot import _spread, hm, read_split
from campe.core.io import atomic_file, atomic_write_json, write_metrics


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)
    _plt().close(fig)


def method_averages(p: PromptLearnParams) -> dict[str, dict[str, Any]]:
    """method -> base/novel/HM dataset averages, formed per seed and spread over the seeds (base2new)."""
    from campe.attriprompt.trainer import metrics_path

    out: dict[str, dict[str, Any]] = {}
    for m in p.methods:
        per_seed = []
        for s in p.seeds:
            rows = [json.loads(metrics_path(p, m, d, s).read_text()) for d in p.datasets
                    if metrics_path(p, m, d, s).is_file()]
            if len(rows) == len(p.datasets):
                b = statistics.fmean(r["base_acc"] for r in rows)
                n = statistics.fmean(r["novel_acc"] for r in rows)
                per_seed.append({"base_acc": b, "novel_acc": n, "hm": hm(b, n)})
        if per_seed:
            out[m] = {k: _spread([r[k] for r in per_seed]) for k in ("base_acc", "novel_acc", "hm")}
    return out


def plot_bnh(avgs: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(avgs)), 3.5))
    for i, (k, label) in enumerate((("base_acc", "base"), ("novel_acc", "novel"), ("hm", "HM"))):
        ax.bar([j + (i - 1) * 0.27 for j in range(len(avgs))], [a[k]["mean"] for a in avgs.values()], 0.27,
               yerr=[a[k]["std"] or 0.0 for a in avgs.values()], label=label, capsize=2)  # one seed: no bar
    ax.set_xticks(range(len(avgs)), list(avgs))
    ax.set_ylabel("accuracy (%), dataset average")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _attri(p: PromptLearnParams, bb, dataset: str):
    """The attriprompt learner of the first seed on `dataset`, from its checkpoint (None without retrieval)."""
    from campe.attriprompt.methods import build_method
    from campe.attriprompt.trainer import Runner

    if "attriprompt" not in p.methods or not p.retrieval:
        return None
    seed = p.seeds[0]
    method = build_method("attriprompt", bb, p, seed + p.init_seed)
    method.load_state_dict(Runner(p, backbone=bb).checkpoint("attriprompt", dataset, seed))
    return method.eval()


@torch.no_grad()
def retrieval_usage(p: PromptLearnParams, bb, dataset: str) -> torch.Tensor | None:
    """(depth, pool_size) fraction of the test images that retrieved each entry, per prompted text block."""
    from campe.attriprompt.trainer import encode_set

    method = _attri(p, bb, dataset)
    if method is None:
        return None
    vis = encode_set(bb, read_split(p.data_root, dataset).test, method.vision_layers(), p, f"usage {dataset}")
    rows = []
    for r in method.retrieve(vis):
        counts = torch.zeros(p.pool_size)
        counts.index_add_(0, r.index.flatten().cpu(), torch.ones(r.index.numel()))
        rows.append(counts / r.index.shape[0])
    return torch.stack(rows)


def plot_usage(usage: torch.Tensor, dataset: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1 + 0.5 * usage.shape[1], 1 + 0.5 * usage.shape[0]))
    im = ax.imshow(usage.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xlabel("pool entry")
    ax.set_ylabel("prompted text block")
    ax.set_title(f"{dataset}: share of test images retrieving each entry", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save(fig, path)


@torch.no_grad()
def plot_clusters(p: PromptLearnParams, bb, dataset: str, path: Path, n_images: int = 4) -> list[int]:
    """The k-means assignment of the patch tokens of AttriPrompt's vision layers over n test images."""
    import numpy as np

    from campe.attriprompt.kmeans import kmeans
    from campe.attriprompt.methods import text_depth, vision_layer_for
    from campe.attriprompt.trainer import load_image

    test = read_split(p.data_root, dataset).test
    items = [test[i * len(test) // n_images] for i in range(n_images)]  # spread over the classes
    layers = sorted({vision_layer_for(i, bb.text_layers, bb.vision_layers) for i in range(text_depth(bb, p))})
    images = [load_image(d) for d in items]
    _, hidden = bb.encode_image(bb.preprocess(images))
    plt = _plt()
    fig, axes = plt.subplots(n_images, 1 + len(layers), figsize=(2 * (1 + len(layers)), 2 * n_images), squeeze=False)
    for j, layer in enumerate(layers):
        tokens = hidden[layer - 1][:, 1:]
        side = int(round(tokens.shape[1] ** 0.5))
        _, _, assign = kmeans(tokens, p.clusters, p.kmeans_iters)
        for i, img in enumerate(images):
            grid = assign[i].reshape(side, side).numpy()
            axes[i, 1 + j].imshow(np.asarray(img.resize((side * 8, side * 8))))
            axes[i, 1 + j].imshow(np.kron(grid, np.ones((8, 8))), cmap="tab10", alpha=0.5, vmin=0, vmax=9)
            axes[0, 1 + j].set_title(f"layer {layer}", fontsize=8)
    for i, (img, d) in enumerate(zip(images, items)):
        axes[i, 0].imshow(np.asarray(img))
        axes[i, 0].set_title(d.classname, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    return layers


def report(p: PromptLearnParams, plots_dir: str | Path, metrics_file: str | Path) -> dict[str, Any]:
    """Pictures into plots_dir; the method averages and retrieval statistics into metrics_file (JSON)."""
    from campe.attriprompt.backbone import load_backbone

    plots_dir = Path(plots_dir)
    out: dict[str, Any] = {"protocol": p.protocol, "seeds": list(p.seeds)}
    if p.protocol == "base2new":
        out["average"] = method_averages(p)
        if out["average"]:
            plot_bnh(out["average"], plots_dir / "bnh.png")
    bb = load_backbone(p.clip_path)
    datasets = p.datasets if p.protocol == "base2new" else [p.source]
    usage: dict[str, Any] = {}
    for d in datasets:
        u = retrieval_usage(p, bb, d)
        if u is not None:
            plot_usage(u, d, plots_dir / f"usage_{d}.png")
            # entries used by at least 1 % of the images, per block: how much of the pool is alive
            usage[d] = {"entries_used": [int((row > 0.01).sum()) for row in u], "pool_size": p.pool_size}
    out["retrieval"] = usage
    out["cluster_layers"] = plot_clusters(p, bb, datasets[0], plots_dir / "clusters.png")
    # `dvc metrics show` prints the headline (each method's dataset-average HM, seed mean); the full file keeps
    # base/novel with their spread and the retrieval statistics.
    write_metrics(metrics_file, out, {f"hm/{m}": a["hm"]["mean"] for m, a in out.get("average", {}).items()})
    return out
