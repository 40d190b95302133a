"""Evaluation figures (matplotlib, Agg backend; written atomically as PNG).

    from campe.plots import retrieval_examples_grid, aspect_maps_grid, recall_bars
    retrieval_examples_grid(captions, top5_paths, top5_is_correct, "plots/retrieval_examples.png")
    aspect_maps_grid(images_uint8, apt_maps, ["subject", "position", "secondary", "background"], "plots/apt_maps.png")
    recall_bars({"plain": m, "re-weighted": m_w}, "plots/recall.png")
    grouped_bars({"t2i R@1": {"vanilla": {"subject": [41.0, 43.5]}}}, "plots/by_aspect.png")   # per-seed values
    heatmaps({"t2i R@5": (matrix, row_labels, column_labels)}, "plots/specialisation.png")
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from campe.data.imageprep import to_rgb
from campe.core.io import atomic_write_bytes

CORRECT, WRONG = "#2ca02c", "#d62728"


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only: no display on CI/servers), imported on first use: every
    stage imports this module through the params check, and pyplot's import (~0.7 s) is for the ones that draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | Path, dpi: int = 100) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return Path(out_png)


def _as_image(x) -> np.ndarray:
    """Path or array -> float RGB [H, W, 3] in [0, 1] (uint8 is divided by 255)."""
    if isinstance(x, (str, Path)):
        with Image.open(x) as im:
            x = to_rgb(im)  # campe.data.imageprep's colour conversion (16-bit, alpha, palette, ...), size kept
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:  # CHW -> HWC
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {a.shape}")
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else np.clip(a.astype(np.float32), 0, 1)


def retrieval_examples_grid(query_captions: Sequence[str], topk_image_paths: Sequence[Sequence[str]],
                            correct_flags: Sequence[Sequence[bool]], out_png: str | Path,
                            title: str | None = None, missed: Sequence[tuple[str, int] | None] | None = None
                            ) -> Path:
    """One row per text query: the caption, then its top-k retrieved images (rank order), the correct one(s) framed
    in green and marked with a check, the others in red. missed[r] = (path, rank) of the right image when it is
    not in the top k: shown after them, framed green, with its rank."""
    q = len(query_captions)
    if q == 0 or len(topk_image_paths) != q or len(correct_flags) != q:
        raise ValueError(f"retrieval_examples_grid: need one caption, one top-k list and one flag list per query "
                         f"(got {q}, {len(topk_image_paths)}, {len(correct_flags)})")
    missed = list(missed) if missed is not None else [None] * q
    if len(missed) != q:
        raise ValueError(f"retrieval_examples_grid: {len(missed)} missed entries for {q} queries")
    k = max(len(p) for p in topk_image_paths)
    extra = 1 if any(missed) else 0
    fig, axes = _pyplot().subplots(q, k + 1 + extra, figsize=(2.6 + 1.6 * (k + extra), 1.75 * q), squeeze=False,
                                   gridspec_kw={"width_ratios": [1.6] + [1] * k + [1.15] * extra})
    for r in range(q):
        if len(correct_flags[r]) != len(topk_image_paths[r]):
            raise ValueError(f"retrieval_examples_grid: query {r} has {len(topk_image_paths[r])} images but "
                             f"{len(correct_flags[r])} flags")
        ax = axes[r, 0]
        ax.axis("off")
        found = next((i + 1 for i, c in enumerate(correct_flags[r]) if c), None)
        status = (f"found at rank {found}" if found else f"right image at rank {missed[r][1]}" if missed[r]
                  else f"not in top {len(correct_flags[r])}")
        ax.text(0, 0.5, textwrap.fill(str(query_captions[r]), 30) + f"\n[{status}]", fontsize=8, va="center",
                ha="left", transform=ax.transAxes, color="black" if found else WRONG)
        cells = [(p, bool(f), f"#{c + 1}" + (" \u2713" if f else "")) for c, (p, f) in
                 enumerate(zip(topk_image_paths[r], correct_flags[r]))]
        cells += [None] * (k - len(cells))
        if extra:
            cells.append((missed[r][0], True, f"right: #{missed[r][1]}") if missed[r] else None)
        for c, cell in enumerate(cells):
            ax = axes[r, c + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if cell is None:
                ax.axis("off")
                continue
            path, ok, label = cell
            ax.imshow(_as_image(path), interpolation="nearest")
            for side in ax.spines.values():
                side.set_edgecolor(CORRECT if ok else WRONG)
                side.set_linewidth(4 if ok else 1.5)
            ax.set_title(label, fontsize=8, color=CORRECT if ok else "black")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def aspect_maps_grid(images, maps, aspect_names: Sequence[str], out_png: str | Path, alpha: float = 0.55,
                     caption: str | None = None, scale_label: str = "similarity") -> Path:
    """Per-APT patch maps: images [B, H, W, 3] (uint8 or float in [0,1]), maps [B, K, h, w] (upsampled to H x W).
    Row = image; columns = the image, then one overlay per aspect. All maps share one colour scale (their min to
    max), shown by a colour bar labelled `scale_label`, so aspects and images compare; `caption` says below the grid
    what is mapped."""
    imgs = [_as_image(x) for x in (images.numpy() if hasattr(images, "numpy") else images)]
    m = np.asarray(maps.detach().cpu().numpy() if hasattr(maps, "detach") else maps, dtype=np.float32)
    if m.ndim != 4 or m.shape[0] != len(imgs):
        raise ValueError(f"aspect_maps_grid: maps must be [B, K, h, w] with B={len(imgs)} images, got {m.shape}")
    b, k = m.shape[:2]
    if len(aspect_names) != k:
        raise ValueError(f"aspect_maps_grid: {len(aspect_names)} aspect names for K={k} maps")
    lo, hi = float(m.min()), float(m.max())
    hi = hi if hi > lo else lo + 1e-6
    plt = _pyplot()
    fig, axes = plt.subplots(b, k + 1, figsize=(1.7 * (k + 1) + 0.9, 1.7 * b + (0.6 if caption else 0)),
                             squeeze=False)
    shown = None
    for r in range(b):
        h, w = imgs[r].shape[:2]
        axes[r, 0].imshow(imgs[r], interpolation="nearest")
        for c in range(k):
            up = np.asarray(Image.fromarray(m[r, c]).resize((w, h), Image.BILINEAR))
            axes[r, c + 1].imshow(imgs[r], interpolation="nearest")
            shown = axes[r, c + 1].imshow(up, cmap="jet", alpha=alpha, vmin=lo, vmax=hi, interpolation="nearest")
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("image" if c == 0 else aspect_names[c - 1], fontsize=8)
    fig.tight_layout(rect=(0, 0.08 if caption else 0, 0.9, 1))
    bar = fig.colorbar(shown, cax=fig.add_axes((0.92, 0.15, 0.02, 0.7)))
    bar.set_alpha(1)
    bar.set_label(scale_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if caption:
        fig.text(0.02, 0.01, textwrap.fill(caption, 40 + 22 * k), fontsize=7, va="bottom", ha="left")
    return _save(fig, out_png)


def recall_bars(metrics: dict, out_png: str | Path, title: str | None = None) -> Path:
    """Grouped bars of the R@k metrics (i2t_R@1 ... t2i_R@10) of one run, or of several runs given as
    {run name: metrics} (e.g. plain vs aspect re-weighted), with values printed on the bars."""
    runs = metrics if metrics and all(isinstance(v, dict) for v in metrics.values()) else {"": metrics}
    names = [k for k in next(iter(runs.values())) if "_R@" in k]
    if not names:
        raise ValueError(f"recall_bars: no '<dir>_R@k' keys in metrics (got {list(next(iter(runs.values())))[:6]})")
    x = np.arange(len(names))
    width = 0.8 / len(runs)
    fig, ax = _pyplot().subplots(figsize=(1.0 + 0.9 * len(names) * max(1, len(runs) * 0.6), 3.2))
    for i, (run, m) in enumerate(runs.items()):
        vals = [float(m.get(n, np.nan)) for n in names]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, label=run or None)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 110)
    ax.grid(axis="y", alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8, loc="upper left")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def seed_spread_bars(panels: dict[str, dict[str, list[float]]], out_png: str | Path, title: str | None = None) -> Path:
    """One panel per {panel title: {variant: [value per seed]}}: a bar at the mean, an error bar of the sample std
    (n - 1; none for one seed) and every seed's value as a dot, so the spread is seen, not only summarised."""
    if not panels or not any(panels.values()):
        raise ValueError("seed_spread_bars: nothing to plot (no panel has a variant with values)")
    panels = {k: v for k, v in panels.items() if v}
    n_var = max(len(v) for v in panels.values())
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(cols * (0.5 * n_var + 1.5), rows * 3.6), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, by_variant) in zip(axes.flat, panels.items()):
        labels = list(by_variant)
        x = np.arange(len(labels))
        vals = [np.asarray(by_variant[v], dtype=float) for v in labels]
        means = [v.mean() for v in vals]
        stds = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(x, means, 0.7, yerr=stds, capsize=3, color="#9ecae1", edgecolor="#3182bd")
        for i, v in enumerate(vals):
            ax.plot(np.full(len(v), x[i]) + np.linspace(-0.15, 0.15, len(v)), v, "o", ms=3, color="#08519c")
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def grouped_bars(panels: dict[str, dict[str, dict[str, list[float]]]], out_png: str | Path,
                 ylabel: str = "recall (%)", title: str | None = None) -> Path:
    """One panel per {panel title: {series: {group: [value per seed]}}}: groups along x (e.g. aspect mixes), one
    bar per series (e.g. method) at the mean, with the sample std (n - 1) as an error bar when there are >= 2
    values."""
    panels = {k: v for k, v in panels.items() if v and any(v.values())}
    if not panels:
        raise ValueError("grouped_bars: nothing to plot (no panel has a series with values)")
    groups = list(dict.fromkeys(g for p in panels.values() for s in p.values() for g in s))
    n_series = max(len(p) for p in panels.values())
    fig, axes = _pyplot().subplots(len(panels), 1, squeeze=False,
                                   figsize=(max(5.0, 0.35 * len(groups) * max(n_series, 2) + 1.5), 3.4 * len(panels)))
    x = np.arange(len(groups))
    for ax, (name, series) in zip(axes[:, 0], panels.items()):
        width = 0.8 / max(len(series), 1)
        for i, (label, by_group) in enumerate(series.items()):
            vals = [np.asarray(by_group.get(g, []), dtype=float) for g in groups]
            means = [v.mean() if len(v) else np.nan for v in vals]
            stds = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
            spread = any(len(v) > 1 for v in vals)  # one value per group: no error bar to draw
            ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=stds if spread else None, capsize=2,
                   label=label or None)
        ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=6, ncol=min(4, len(series)), loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def heatmaps(panels: dict[str, tuple], out_png: str | Path, title: str | None = None, fmt: str = "%.1f",
             cmap: str = "viridis") -> Path:
    """One annotated heat map per {panel title: (matrix [R, C], row labels, column labels)} (e.g. the K x aspect
    specialisation matrix with its all-segments row); each panel has its own colour scale, centred on 0 (diverging
    colours) when it holds negative values."""
    if not panels:
        raise ValueError("heatmaps: no panel")
    fig, axes = _pyplot().subplots(1, len(panels), squeeze=False,
                                   figsize=(sum(1.2 + 0.75 * len(c) for _, _, c in panels.values()),
                                            1.2 + 0.45 * max(len(r) for _, r, _ in panels.values())))
    for ax, (name, (matrix, rows, cols)) in zip(axes[0], panels.items()):
        m = np.asarray(matrix, dtype=float)
        if m.shape != (len(rows), len(cols)):
            raise ValueError(f"heatmaps: panel {name!r} is {m.shape}, labels say {(len(rows), len(cols))}")
        finite = m[np.isfinite(m)]
        if finite.size and finite.min() < 0:
            lim = float(np.abs(finite).max()) or 1.0
            im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        else:
            im = ax.imshow(m, cmap=cmap, aspect="auto")
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, fmt % v if np.isfinite(v) else "-", ha="center", va="center", fontsize=7,
                    color="black", bbox=dict(boxstyle="round,pad=0.1", fc="white", alpha=0.6, lw=0))
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(name, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)
