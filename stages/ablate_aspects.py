"""The ablation's aspect-by-aspect tables and pictures (issue 15 §4), from the rows and records of stages/ablate.py.

    from stages.ablate_aspects import aspect_tables, write_aspect_plots
    lines = aspect_tables(rows_of_one_set, "generated")      # Markdown under that set's table
    write_aspect_plots(ap, records, rows)                     # <plot stem>_aspects.png, <plot stem>_specialisation.png

The metrics are those of the evaluation stage (campe.core.aspects): mix/<mix>/t2i_R@k, aspect/<a>/t2i_R@k,
seg<k>/aspect/<a>/t2i_R@k and reweight/<a>/delta_t2i_R@k; a set or variant without them adds nothing.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stages.ablate import AblateParams


def _cell_text(r: dict[str, Any] | None) -> str:
    from stages.ablate_table import _cell_text as text  # one format for every table of the ablation
    return text(r)


def _groups_of(names: list[str], prefix: str, suffix: str) -> list[str]:
    """The <group> of every metric name <prefix><group><suffix> (e.g. mix/<mix>/t2i_R@1), in first-seen order."""
    return [n[len(prefix):-len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix)
            and "/" not in n[len(prefix):-len(suffix)]]


def _pivot(sub: list[dict[str, Any]], title: str, columns: dict[str, str], row_label: str = "method | loss"
           ) -> list[str]:
    """A Markdown table: one row per variant that has any of the metrics, columns {header: metric name}."""
    variants = [v for v in dict.fromkeys(r["variant"] for r in sub)
                if any(r["variant"] == v and r["metric"] in columns.values() for r in sub)]
    if not variants or not columns:
        return []
    out = [title, "", f"| {row_label} | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for v in variants:
        by = {r["metric"]: r for r in sub if r["variant"] == v}
        method, loss = v.split("-", 1)  # loss: the kind and, for an axis cell, its setting (as the main tables)
        out.append(f"| {method} | {loss} | " + " | ".join(_cell_text(by.get(m)) for m in columns.values()) + " |")
    return out + [""]


def aspect_tables(sub: list[dict[str, Any]], ds: str) -> list[str]:
    """Issue 15 §4 tables of one retrieval set (when its records have them): text -> image R@1 and R@5 by the
    query caption's aspect mix; the change aspect re-weighting makes on the captions of each aspect type (chosen on
    val); and per variant with prompt segments, the specialisation matrix (R@5 with segment k alone)."""
    names = list(dict.fromkeys(r["metric"] for r in sub))
    lines: list[str] = []
    for q in (1, 5):
        mixes = _groups_of(names, "mix/", f"/t2i_R@{q}")
        lines += _pivot(sub, f"### {ds}: text -> image R@{q} by the query caption's aspect mix",
                        {m: f"mix/{m}/t2i_R@{q}" for m in mixes})
    for q in (1, 5):
        aspects = _groups_of(names, "reweight/", f"/delta_t2i_R@{q}")
        lines += _pivot(sub, f"### {ds}: aspect re-weighting, change of text -> image R@{q} on the captions that "
                             f"mention the aspect (segment and weight chosen on val)",
                        {a: f"reweight/{a}/delta_t2i_R@{q}" for a in aspects})
    aspects = _groups_of(names, "aspect/", "/t2i_R@5")
    for v in dict.fromkeys(r["variant"] for r in sub if r["metric"].startswith("seg1/")):
        rows = [r for r in sub if r["variant"] == v]
        segs = sorted({int(r["metric"].split("/")[0][3:]) for r in rows if r["metric"].startswith("seg")})
        by = {r["metric"]: r for r in rows}
        lines += [f"### {ds}: specialisation of `{v}`, text -> image R@5 with segment k's similarity alone, by an "
                  f"aspect the query mentions", "", "| segment | " + " | ".join(aspects) + " |",
                  "|---|" + "---:|" * len(aspects)]
        for label, pre in [(f"APT-{k}", f"seg{k}/") for k in segs] + [("all", "")]:
            lines.append(f"| {label} | " + " | ".join(_cell_text(by.get(f"{pre}aspect/{a}/t2i_R@5"))
                                                      for a in aspects) + " |")
        lines.append("")
    return lines


def aspect_plot_paths(ap: AblateParams) -> tuple[Path, Path]:
    """The aspect pictures beside `ablate.plot`: <stem>_aspects.png (recall by aspect mix) and
    <stem>_specialisation.png (the K x aspect matrices)."""
    p = Path(ap.plot)
    return p.with_name(f"{p.stem}_aspects.png"), p.with_name(f"{p.stem}_specialisation.png")


def write_aspect_plots(ap: AblateParams, records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[Path]:
    """t2i R@1/R@5 by aspect mix per variant (bars: mean, std, over seeds) and, for every variant with prompt
    segments, its specialisation matrix (t2i R@5, mean over seeds) as heat maps; nothing without aspect metrics."""
    from campe.plots import grouped_bars, heatmaps
    bars_png, heat_png = aspect_plot_paths(ap)
    panels: dict[str, dict[str, dict[str, list[float]]]] = {}
    for ds in dict.fromkeys(d for r in records for d in r["metrics"]):
        for q in (1, 5):
            key = f"{ds}: text -> image R@{q} by the query caption's aspect mix"
            for r in records:
                m = r["metrics"].get(ds, {})
                for mix in _groups_of(list(m), "mix/", f"/t2i_R@{q}"):
                    panels.setdefault(key, {}).setdefault(r["variant"], {}).setdefault(mix, []).append(
                        m[f"mix/{mix}/t2i_R@{q}"])
    written = []
    if panels:
        written.append(grouped_bars(panels, bars_png, title=f"ablation {ap.name}: mean ± std over seeds"))
    mean = {(r["variant"], r["dataset"], r["metric"]): r["mean"] for r in rows}
    heat = {}
    for v, ds in dict.fromkeys((r["variant"], r["dataset"]) for r in rows if r["metric"].startswith("seg1/")):
        names = [r["metric"] for r in rows if (r["variant"], r["dataset"]) == (v, ds)]
        aspects = _groups_of(names, "aspect/", "/t2i_R@5")
        segs = sorted({int(n.split("/")[0][3:]) for n in names if n.startswith("seg")})
        pres = [f"seg{k}/" for k in segs] + [""]
        matrix = [[mean.get((v, ds, f"{pre}aspect/{a}/t2i_R@5"), math.nan) for a in aspects] for pre in pres]
        heat[f"{ds} {v}"] = (matrix, [f"APT-{k}" for k in segs] + ["all"], aspects)
    if heat:
        written.append(heatmaps(heat, heat_png, title=f"ablation {ap.name}: text -> image R@5 with segment k's "
                                                      f"similarity alone, by an aspect the query mentions (mean "
                                                      f"over seeds)"))
    return written
