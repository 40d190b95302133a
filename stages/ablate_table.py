"""The ablation's table, CSV and pictures from its finished cells (`campe ablate` writes them after every cell;
`campe ablate --table-only` rewrites them): stages/ablate.py runs the cells, this module only reads their cell.json.

    from stages.ablate_table import write_tables
    rows = write_tables(ap)    # ap: stages.ablate.AblateParams; writes ap.table_md, ap.table_csv, ap.plot (+ aspects)

Rows: per (variant, dataset, metric) the mean, sample std (n - 1), 95 % t interval, n and seeds, and the paired
differences against `ablate.references` (campe.core.stats). The Markdown table leads with the paired differences of
the headline metrics, then one table per eval set, the schedule reached (`training`), the prompt diagnostics
(`text_fidelity`) and each cell's minutes (`cost`, from its cell.json timings); stages/ablate_aspects.py adds the
aspect tables and pictures.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any

from campe.core.io import atomic_write_bytes
from stages.ablate import FIDELITY_SET, AblateParams, finished_records, grid, variants_of

# Metrics shown in the Markdown table of a retrieval set (the CSV has every metric of the eval records).
TABLE_METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10",
                 "v2t_R@1", "v2t_R@5", "v2t_R@10", "t2v_R@1", "t2v_R@5", "t2v_R@10", "rsum")


def axis_bases(variants: list[str]) -> dict[str, str]:
    """{axis variant: the same method and loss at its default setting}, e.g. "multi_prompt-softmax-k=8" ->
    "multi_prompt-softmax": what an axis cell is paired against (DEFAULT)."""
    return {v: v.rsplit("-", 1)[0] for v in variants if "=" in v.rsplit("-", 1)[-1]}


DEFAULT = "default"  # the paired difference of an axis variant against its method at the default setting


def summarize(records: list[dict[str, Any]], variants: list[str], references: dict[str, str] | None = None,
              bases: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Per (variant, dataset, metric): mean, sample std (NaN for one seed), the 95 % t interval (ci_low, ci_high),
    n and the seeds; and for each reference {name: its variant}, the paired difference variant - reference over the
    seeds both have (d_<name>, d_<name>_low, d_<name>_high, d_<name>_n; campe.core.stats). bases ({axis variant:
    its default variant}, axis_bases): the paired difference against it as d_default* (NaN for the main grid)."""
    from campe.core.stats import mean_ci, paired_difference
    per: dict[tuple[str, str, str], dict[int, float]] = {}  # (variant, dataset, metric) -> {seed: value}
    for r in records:
        for ds, m in r["metrics"].items():
            for metric, v in m.items():
                per.setdefault((r["variant"], ds, metric), {})[r["seed"]] = float(v)
    rows = []
    for v in variants:
        recs = [r for r in records if r["variant"] == v]
        if not recs:
            continue
        for (var, ds, metric), by_seed in per.items():
            if var != v:
                continue
            seeds = sorted(by_seed)
            st = mean_ci([by_seed[x] for x in seeds])
            row = {"variant": v, "method": recs[0]["method"], "kind": recs[0]["kind"], "dataset": ds,
                   "metric": metric, "mean": st["mean"], "std": st["std"], "ci_low": st["low"],
                   "ci_high": st["high"], "n": st["n"], "seeds": seeds}
            pairs = {name: ref for name, ref in (references or {}).items()}
            if bases is not None:
                pairs[DEFAULT] = bases.get(v, v)
            for name, ref in pairs.items():
                d = None if ref == v else paired_difference(by_seed, per.get((ref, ds, metric), {}))
                row.update({f"d_{name}": d["mean"] if d else math.nan, f"d_{name}_low": d["low"] if d else math.nan,
                            f"d_{name}_high": d["high"] if d else math.nan, f"d_{name}_n": d["n"] if d else 0})
            rows.append(row)
    return rows


CSV_FIELDS = ("variant", "method", "kind", "dataset", "metric", "mean", "std", "ci_low", "ci_high", "n", "seeds")


def reference_variants(ap: AblateParams) -> dict[str, str]:
    """{reference method: its variant} for the paired differences (kinds[0])."""
    return {m: f"{m}-{ap.kinds[0]}" for m in ap.references}


def _num(x: Any) -> str:
    return "" if isinstance(x, float) and math.isnan(x) else repr(x)


def table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    extra = [k for k in (rows[0] if rows else {}) if k.startswith("d_")]
    w = csv.DictWriter(buf, fieldnames=[*CSV_FIELDS, *extra], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**{k: _num(v) for k, v in r.items()}, "variant": r["variant"], "method": r["method"],
                    "kind": r["kind"], "dataset": r["dataset"], "metric": r["metric"], "n": r["n"],
                    "seeds": " ".join(map(str, r["seeds"]))})
    return buf.getvalue()


def _cell_text(r: dict[str, Any] | None, digits: int = 2) -> str:
    if r is None:
        return "-"
    m, s = r["mean"], r["std"]
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _ci_text(mean: float, low: float, high: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:+.2f}" if math.isnan(low) else f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def _headline_rows(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(dataset, metric) pairs of the paired-difference table: each retrieval set's rsum, each zero-shot top-1."""
    seen = dict.fromkeys((r["dataset"], r["metric"]) for r in rows)
    return [(ds, m) for ds, m in seen if m == "rsum" or m.endswith("_top1")]


def paired_markdown(rows: list[dict[str, Any]], refs: dict[str, str]) -> list[str]:
    """The headline table: per headline metric and variant, mean ± std [95 % CI] and the paired differences."""
    lines = ["## Paired differences (headline)", "",
             "Mean ± std over seeds with its 95 % t interval; Δ = the paired difference against each reference "
             "(same seed: same initialisation and data order), mean [95 % t interval of the per-seed "
             "differences]. An interval that excludes 0 is a difference the seeds resolve. Δ vs default (axis "
             "rows): against the same method at its default setting, on the seeds both have.", ""]
    names = list(refs) + ([DEFAULT] if any(not math.isnan(r.get(f"d_{DEFAULT}", math.nan)) for r in rows) else [])
    lines += ["| set | metric | method | loss | mean ± std | 95 % CI | " + " | ".join(f"Δ vs {n}" for n in names)
              + " | n |", "|---|---|---|---|---:|---:|" + "---:|" * len(names) + "---:|"]
    for ds, metric in _headline_rows(rows):
        for r in (x for x in rows if x["dataset"] == ds and x["metric"] == metric):
            ci = "-" if math.isnan(r["ci_low"]) else f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
            deltas = [_ci_text(r[f"d_{n}"], r[f"d_{n}_low"], r[f"d_{n}_high"]) for n in names]
            lines.append(f"| {ds} | {metric} | {r['variant'].split('-', 1)[0]} | {r['variant'].split('-', 1)[1]} | "
                         f"{_cell_text(r)} | {ci} | " + " | ".join(deltas) + f" | {r['n']} |")
    return lines + [""]


def table_markdown(rows: list[dict[str, Any]], ap: AblateParams, cells_done: int, cells_total: int) -> str:
    """The paired-difference table, then one table per eval set (and the schedule reached, "training"; the aspect
    tables under each retrieval set): rows = variants, columns = metrics (mean ± std over seeds), n and seeds."""
    from stages.ablate_aspects import aspect_tables
    schedule = ('steps ' + str(ap.steps) if ap.steps else ('epochs ' + str(ap.epochs) if ap.epochs
                                                          else 'the train section schedule'))
    if ap.patience:
        schedule = f"early stopping (patience {ap.patience} val-loss evaluations), at most {schedule}"
    lines = [f"# Ablation `{ap.name}`", "",
             f"{cells_done} of {cells_total} cells finished. Every cell: same data, {schedule}"
             f", lr, batch; image tower {ap.image_tower or 'of the train section'}; seeds {ap.seeds} "
             f"(train.seed = model.init_seed = text_encoder.init_seed). "
             f"Values: mean ± sample std over seeds (n - 1), in % for recalls. "
             f"Generated by `campe ablate` (stages/ablate.py).", ""]
    refs = {n: v for n, v in reference_variants(ap).items() if any(r["variant"] == v for r in rows)}
    if refs and _headline_rows(rows):
        lines += paired_markdown(rows, refs)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for ds in datasets:
        sub = [r for r in rows if r["dataset"] == ds]
        names = list(dict.fromkeys(r["metric"] for r in sub))
        shown = [m for m in TABLE_METRICS if m in names] or [m for m in names if "rank" not in m]
        lines += [f"## {ds}", ""]
        if ds == COST_SET:
            total = sum(r["mean"] * r["n"] for r in sub if r["metric"] == "cell_min")
            lines += [f"Minutes per cell (each cell.json's timings, as run: the first cell of a text layout also "
                      f"builds its cache, and a cell run beside other work takes longer). Summed over the "
                      f"{cells_done} finished cells: {total:.0f} min.", ""]
        if ds == FIDELITY_SET:
            lines += ["Can the K prompts differ at all (campe/text/diagnostics.py, trained model, 64 fixed val "
                      "captions): mean pairwise cosine of the K pooled LM states (raw, and centred over the "
                      "captions), the APTs' relative movement ||apt - apt0|| / ||apt0|| and their pairwise cosine.",
                      ""]
        lines += ["| method | loss | " + " | ".join(shown) + " | n | seeds |",
                  "|---|---|" + "---:|" * len(shown) + "---:|---|"]
        for v in dict.fromkeys(r["variant"] for r in sub):
            by = {r["metric"]: r for r in sub if r["variant"] == v}
            any_r = next(iter(by.values()))
            n = max(r["n"] for r in by.values())
            seeds = max((r["seeds"] for r in by.values()), key=len)
            digits = 4 if ds == FIDELITY_SET else 2  # a cosine of 0.9999 vs 0.99 is the finding
            lines.append(f"| {any_r['method']} | {v.split('-', 1)[1]} | "
                         + " | ".join(_cell_text(by.get(m), digits) for m in shown)
                         + f" | {n} | {' '.join(map(str, seeds))} |")
        lines.append("")
        lines += aspect_tables(sub, ds)  # issue 15 §4: by aspect mix, re-weighting, specialisation (when measured)
    return "\n".join(lines)


def plot_panels(records: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, list[float]]]:
    """The picture's panels, {"<set> <metric>": {variant: [value of each finished seed]}}: a retrieval set's rsum
    (sum of its six recalls), a zero-shot set's top-1 accuracies."""
    datasets = list(dict.fromkeys(ds for r in records for ds in r["metrics"]))
    panels: dict[str, dict[str, list[float]]] = {}
    for ds in datasets:
        names = list(dict.fromkeys(m for r in records for m in r["metrics"].get(ds, {})))
        for metric in ["rsum"] if "rsum" in names else [m for m in names if m.endswith("_top1")]:
            by = {v: [r["metrics"][ds][metric] for r in records
                      if r["variant"] == v and metric in r["metrics"].get(ds, {})] for v in variants}
            panels[f"{ds} {metric}"] = {v: vals for v, vals in by.items() if vals}
    return panels


COST_SET = "cost"  # the table section of each cell's time (cell.json timings), in minutes


def with_cost(rec: dict[str, Any]) -> dict[str, Any]:
    """The cell's record with its time as a metrics section: cell_min (every timed part: the cache a first cell
    of a layout builds, the locked features, training, evaluation), train_min, eval_min."""
    t = rec.get("timings") or {}
    cost = {"cell_min": sum(t.values()) / 60, "train_min": t.get("train_s", 0.0) / 60,
            "eval_min": t.get("eval_s", 0.0) / 60}
    return {**rec, "metrics": {**rec["metrics"], COST_SET: cost}}


def write_tables(ap: AblateParams) -> list[dict[str, Any]]:
    records = [with_cost(r) for r in finished_records(ap)]
    variants = variants_of(ap)
    rows = summarize(records, variants, reference_variants(ap), axis_bases(variants))
    atomic_write_bytes(ap.table_csv, table_csv(rows).encode())
    atomic_write_bytes(ap.table_md, table_markdown(rows, ap, len(records), len(grid(ap))).encode())
    panels = plot_panels(records, variants_of(ap))
    if ap.plot and panels:
        from campe.plots import seed_spread_bars
        seed_spread_bars(panels, ap.plot, title=f"ablation {ap.name}: mean ± std over seeds, dots = seeds "
                                                f"({len(records)}/{len(grid(ap))} cells)")
    if ap.plot:
        from stages.ablate_aspects import write_aspect_plots
        write_aspect_plots(ap, records, rows)
    return rows
