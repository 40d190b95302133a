"""The comparison by one command: every method and AttriPrompt's ablations x seeds x every generated dataset.

    from campe.attriprompt.grid import run_grid, grid_table
    run_grid(params, "/tmp/grid")        # resumable cell by cell (a cell whose metrics JSON has its config hash stays)
    grid_table(params, "/tmp/grid")      # -> /tmp/grid/table.{md,csv,png}, table.json from the cells that exist

Variants: zsclip, coop, cocoop, ivlp, promptsrc, attriprompt, and attriprompt without each of its three parts
(-AR: retrieval false, -DCL: dcl none, -SR: sr false). Everything else is the prompt_learn section as given: one
budget for every method. Protocols: base2new on every base-to-novel set of <data_root>/manifest.json, and cross
(source = the section's source; cross-dataset targets = the other base-to-novel sets; DG targets = the shifted sets
of the source). Each variant has its own folder <out>/<variant>/{models,metrics} and an MLflow run per cell in
<out>/mlflow.db. Statistics: mean, sample std and the 95 % t-interval over seeds; a dataset average is formed per
seed (mean B, mean N, HM of those) and then spread over the seeds.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from campe.attriprompt.config import PromptLearnParams
from campe.attriprompt.fewshot import _spread, fmt_spread, hm
from campe.core.io import atomic_write_bytes, atomic_write_json

# variant -> (method, overrides of the section)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "zsclip": ("zsclip", {}), "coop": ("coop", {}), "cocoop": ("cocoop", {}), "ivlp": ("ivlp", {}),
    "promptsrc": ("promptsrc", {}), "attriprompt": ("attriprompt", {}),
    "attriprompt-AR": ("attriprompt", {"retrieval": False}), "attriprompt-DCL": ("attriprompt", {"dcl": "none"}),
    "attriprompt-SR": ("attriprompt", {"sr": False}),
}


def benchmark_sets(p: PromptLearnParams) -> dict[str, Any]:
    """base2new sets, the cross source, its cross-dataset and DG targets: from <data_root>/manifest.json (the
    generated sets: kind b2n / dg, variant_of), else from the section (datasets, source, xd_targets, dg_targets)."""
    man = Path(p.data_root) / "manifest.json"
    if man.is_file():
        sets = json.loads(man.read_text())["datasets"]
        b2n = [n for n, s in sets.items() if s["kind"] == "b2n"]
        dg = [n for n, s in sets.items() if s["kind"] == "dg" and s.get("variant_of") == p.source]
        return {"b2n": b2n, "source": p.source, "xd": [n for n in b2n if n != p.source], "dg": dg}
    return {"b2n": list(p.datasets), "source": p.source, "xd": list(p.xd_targets), "dg": list(p.dg_targets)}


def variant_params(p: PromptLearnParams, variant: str, protocol: str, out: str | Path,
                   seeds: list[int]) -> PromptLearnParams:
    method, over = VARIANTS[variant]
    sets = benchmark_sets(p)
    q = dataclasses.replace(p, **over, methods=[method], seeds=list(seeds), protocol=protocol, datasets=sets["b2n"],
                            xd_targets=sets["xd"], dg_targets=sets["dg"], out_dir=str(Path(out, variant, "models")),
                            metrics_dir=str(Path(out, variant, "metrics")),
                            fewshot_dir=str(Path(out, "split_fewshot")),
                            tracking_uri=f"sqlite:///{Path(out).resolve()}/mlflow.db",
                            artifact_root=str(Path(out).resolve() / "mlartifacts"))
    q.validate()
    return q


def run_grid(p: PromptLearnParams, out: str | Path, variants: list[str] | None = None,
             protocols: tuple[str, ...] = ("base2new", "cross")) -> None:
    """Seed by seed (so a partial grid has whole seeds), protocol, variant: run_all on one loaded backbone; the
    table is rewritten after each variant's cells."""
    from campe.attriprompt.backbone import load_backbone
    from campe.attriprompt.trainer import run_all

    bb = load_backbone(p.clip_path)
    for seed in p.seeds:
        for protocol in protocols:
            for v in variants or list(VARIANTS):
                run_all(variant_params(p, v, protocol, out, [seed]), base_dir=str(out), backbone=bb)
                grid_table(p, out, variants)


# ---------------------------------------------------------------------------------------------------- the table
def _cells(p: PromptLearnParams, out: str | Path, variant: str, protocol: str) -> list[dict[str, Any]]:
    q = variant_params(p, variant, protocol, out, p.seeds)
    folder = Path(q.metrics_dir) / protocol / q.methods[0]
    return [json.loads(f.read_text()) for f in sorted(folder.glob("*/seed*.json"))] if folder.is_dir() else []


def _b2n_stats(rows: list[dict[str, Any]], datasets: list[str]) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for d in datasets:
        rs = [r for r in rows if r["dataset"] == d]
        if rs:
            per[d] = {k: _spread([float(r[k]) for r in rs]) for k in ("base_acc", "novel_acc", "hm")}
    # the average over datasets, per seed, for the seeds that have every dataset
    seeds = sorted({r["seed"] for r in rows})
    avg_rows = []
    for s in seeds:
        rs = [r for r in rows if r["seed"] == s and r["dataset"] in datasets]
        if len({r["dataset"] for r in rs}) == len(datasets):
            b = statistics.fmean(r["base_acc"] for r in rs)
            n = statistics.fmean(r["novel_acc"] for r in rs)
            avg_rows.append({"base_acc": b, "novel_acc": n, "hm": hm(b, n)})
    avg = {k: _spread([r[k] for r in avg_rows]) for k in ("base_acc", "novel_acc", "hm")} if avg_rows else {}
    return {"datasets": per, "average": avg}


def _cross_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    out = {k: _spread([float(r[k]) for r in rows]) for k in ("source_acc", "xd_avg", "dg_avg")}
    for part in ("xd", "dg"):
        for t in rows[0][part]:
            out[f"{part}/{t}"] = _spread([float(r[part][t]) for r in rows if t in r[part]])
    return out


def _fmt(s: dict[str, float] | None) -> str:
    if not s or s["mean"] != s["mean"]:  # missing, or nan (no target of that kind)
        return "—"
    return f"{fmt_spread(s, 1, ci=True)} (n={s['n']})"


def grid_table(p: PromptLearnParams, out: str | Path, variants: list[str] | None = None) -> dict[str, Any]:
    """table.json / table.md / table.csv / table.png in `out` from the cells present (missing cells show as —)."""
    sets = benchmark_sets(p)
    table: dict[str, Any] = {"sets": sets, "seeds": list(p.seeds), "shots": p.shots, "epochs": p.epochs,
                             "variants": {}}
    for v in variants or list(VARIANTS):
        table["variants"][v] = {"base2new": _b2n_stats(_cells(p, out, v, "base2new"), sets["b2n"]),
                                "cross": _cross_stats(_cells(p, out, v, "cross"))}
    out = Path(out)
    atomic_write_json(out / "table.json", table)
    atomic_write_bytes(out / "table.md", _markdown(table).encode())
    atomic_write_bytes(out / "table.csv", _csv(table).encode())
    _picture(table, out / "table.png")
    return table


def _markdown(t: dict[str, Any]) -> str:
    lines = [f"Cells: mean ± std [± half-width of the 95 % t-interval] (n seeds); {t['shots']} shots, "
             f"{t['epochs']} epochs, seeds {t['seeds']}. Average: per seed, mean B and N over the "
             f"{len(t['sets']['b2n'])} base-to-novel sets and HM of those.", "",
             "| method | base (avg) | novel (avg) | HM (avg) | cross-dataset avg | DG avg |",
             "|---|---|---|---|---|---|"]
    for v, r in t["variants"].items():
        a, c = r["base2new"]["average"], r["cross"]
        lines.append(f"| {v} | {_fmt(a.get('base_acc'))} | {_fmt(a.get('novel_acc'))} | {_fmt(a.get('hm'))} | "
                     f"{_fmt(c.get('xd_avg'))} | {_fmt(c.get('dg_avg'))} |")
    for d in t["sets"]["b2n"]:
        lines += ["", f"**{d}** (base-to-novel)", "", "| method | base | novel | HM |", "|---|---|---|---|"]
        for v, r in t["variants"].items():
            s = r["base2new"]["datasets"].get(d, {})
            lines.append(f"| {v} | {_fmt(s.get('base_acc'))} | {_fmt(s.get('novel_acc'))} | {_fmt(s.get('hm'))} |")
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"  # one seed: std and ci95 undefined, an empty field (null)


def _csv(t: dict[str, Any]) -> str:
    rows = ["variant,protocol,dataset,metric,mean,std,ci95,n"]
    for v, r in t["variants"].items():
        for d, s in [*r["base2new"]["datasets"].items(), ("average", r["base2new"]["average"])]:
            for k, x in s.items():
                rows.append(f"{v},base2new,{d},{k},{x['mean']:.4f},{_num(x['std'])},{_num(x['ci95'])},{x['n']}")
        for k, x in r["cross"].items():
            d, metric = (k.split("/", 1)[1], "acc") if "/" in k else (t["sets"]["source"], k)
            rows.append(f"{v},cross,{d},{metric},{x['mean']:.4f},{_num(x['std'])},{_num(x['ci95'])},{x['n']}")
    return "\n".join(rows) + "\n"


def _picture(t: dict[str, Any], path: Path) -> None:
    """Grouped bars per variant: average base, novel, HM, cross-dataset and DG averages, with 95 % t-intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from campe.core.io import atomic_file

    names = list(t["variants"])
    keys = [("base2new", "base_acc", "base"), ("base2new", "novel_acc", "novel"), ("base2new", "hm", "HM"),
            ("cross", "xd_avg", "cross-dataset"), ("cross", "dg_avg", "DG")]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(names)), 4))
    width = 0.8 / len(keys)
    for i, (proto, k, label) in enumerate(keys):
        vals, errs = [], []
        for v in names:
            r = t["variants"][v][proto]
            s = (r["average"] if proto == "base2new" else r).get(k)
            vals.append(s["mean"] if s else 0.0)
            errs.append(s["ci95"] if s and s["ci95"] is not None else 0.0)  # one seed: no error bar
        ax.bar([j + (i - 2) * width for j in range(len(names))], vals, width, yerr=errs, label=label, capsize=2)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Prompt learning on the generated sets (mean over seeds, 95 % t-interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
