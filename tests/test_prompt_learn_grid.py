"""campe prompt-learn grid's table: seed-wise dataset averages, then mean, std and the 95 % t-interval over seeds."""
from __future__ import annotations

import json
import math

import pytest

from campe.attriprompt.config import PromptLearnParams
from campe.attriprompt.fewshot import hm
from campe.attriprompt.grid import VARIANTS, grid_table, variant_params
from campe.attriprompt.trainer import metrics_path


def test_grid_table_averages_per_seed_then_spreads_over_seeds(tmp_path):
    p = PromptLearnParams(data_root=str(tmp_path / "no_manifest"), datasets=["A", "B"], source="A",
                          xd_targets=["B"], dg_targets=[], seeds=[1, 2])
    cells = {("A", 1): (60, 40), ("B", 1): (80, 20), ("A", 2): (70, 30), ("B", 2): (90, 50)}
    for (d, s), (b, n) in cells.items():
        q = variant_params(p, "attriprompt-SR", "base2new", tmp_path, [s])
        assert q.methods == ["attriprompt"] and q.sr is False and q.retrieval and q.dcl == "global_fine"
        path = metrics_path(q, "attriprompt", d, s)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"dataset": d, "seed": s, "base_acc": b, "novel_acc": n, "hm": hm(b, n)}))
    t = grid_table(p, tmp_path, ["attriprompt-SR", "coop"])
    avg = t["variants"]["attriprompt-SR"]["base2new"]["average"]
    # by hand: seed 1 B=70 N=30, seed 2 B=80 N=40; HM per seed of those means
    hms = [2 * 70 * 30 / 100, 2 * 80 * 40 / 120]
    assert avg["base_acc"]["mean"] == pytest.approx(75) and avg["base_acc"]["std"] == pytest.approx(math.sqrt(50))
    assert avg["base_acc"]["ci95"] == pytest.approx(12.706 * math.sqrt(50) / math.sqrt(2), rel=1e-3)
    assert avg["hm"]["mean"] == pytest.approx(sum(hms) / 2) and avg["hm"]["n"] == 2
    assert t["variants"]["attriprompt-SR"]["base2new"]["datasets"]["B"]["novel_acc"]["mean"] == pytest.approx(35)
    assert t["variants"]["coop"]["base2new"]["average"] == {}  # no cells yet: shown as missing, not as zero
    md = (tmp_path / "table.md").read_text()
    assert "| attriprompt-SR | 75.0 ± 7.1" in md and "| coop | — |" in md
    csv = (tmp_path / "table.csv").read_text().splitlines()
    assert "attriprompt-SR,base2new,average,base_acc,75.0000,7.0711" in "\n".join(csv)
    assert (tmp_path / "table.png").stat().st_size > 0
    assert set(VARIANTS) >= {"zsclip", "coop", "cocoop", "ivlp", "promptsrc", "attriprompt", "attriprompt-AR",
                             "attriprompt-DCL"}



def _write_cells(p: PromptLearnParams, seeds: list[int]) -> None:
    for d, s in [(d, s) for d in p.datasets for s in seeds]:
        path = metrics_path(p, "coop", d, s)
        path.parent.mkdir(parents=True, exist_ok=True)
        b, n = 60 + 10 * s, 40 + 5 * s
        path.write_text(json.dumps({"dataset": d, "seed": s, "base_acc": b, "novel_acc": n, "hm": hm(b, n)}))


@pytest.mark.parametrize("seeds", [[1], [1, 2]])
def test_one_seed_has_no_spread_null_in_json_na_in_summary_md(tmp_path, seeds):
    """With one seed the std and the 95 % interval are undefined: null in summary.json and report.json's averages,
    "n/a" in summary.md, never 0.0; summary.md shows the interval the JSON has, in its own columns."""
    from campe.attriprompt.report import method_averages
    from campe.attriprompt.trainer import summarise

    p = PromptLearnParams(data_root=str(tmp_path / "no_manifest"), datasets=["A", "B"], methods=["coop"],
                          seeds=seeds, metrics_dir=str(tmp_path / "metrics"), out_dir=str(tmp_path / "out"))
    _write_cells(p, seeds)
    summarise(p)
    saved = json.loads((tmp_path / "metrics" / "base2new" / "summary.json").read_text())
    base = saved["methods"]["coop"]["datasets"]["A"]["base_acc"]
    md = (tmp_path / "metrics" / "base2new" / "summary.md").read_text()
    assert "| HM | base 95% CI | novel 95% CI | HM 95% CI | seeds |" in md
    avg = method_averages(p)["coop"]["hm"]  # what report.json holds
    if seeds == [1]:
        assert base == {"mean": 70.0, "std": None, "n": 1, "ci95": None}
        assert avg["std"] is None and avg["ci95"] is None and '"std": null' in json.dumps(avg)
        assert f"| coop | A | 70.00 ± n/a | 45.00 ± n/a | {hm(70, 45):.2f} | n/a | n/a | n/a | 1 |" in md
    else:  # B = 70, 80; N = 45, 50 over the seeds
        assert base["std"] == pytest.approx(math.sqrt(50)) and base["ci95"] == pytest.approx(12.706 * 5, rel=1e-3)
        a = saved["methods"]["coop"]["datasets"]["A"]
        assert (f"| coop | A | 75.00 ± 7.07 | 47.50 ± 3.54 | {hm(75, 47.5):.2f} | ±63.53 | "
                f"±{a['novel_acc']['ci95']:.2f} | ±{a['hm_per_seed']['ci95']:.2f} | 2 |") in md
        assert avg["std"] > 0 and avg["ci95"] > 0


def test_grid_table_with_one_seed_writes_empty_csv_fields_and_na(tmp_path):
    p = PromptLearnParams(data_root=str(tmp_path / "no_manifest"), datasets=["A"], source="A", xd_targets=[],
                          dg_targets=[], seeds=[1])
    q = variant_params(p, "coop", "base2new", tmp_path, [1])
    path = metrics_path(q, "coop", "A", 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": "A", "seed": 1, "base_acc": 70, "novel_acc": 45, "hm": hm(70, 45)}))
    t = grid_table(p, tmp_path, ["coop"])
    assert t["variants"]["coop"]["base2new"]["average"]["base_acc"] == {"mean": 70.0, "std": None, "n": 1,
                                                                          "ci95": None}
    assert json.loads((tmp_path / "table.json").read_text())["variants"]["coop"]["base2new"]["average"][
        "base_acc"]["std"] is None
    assert "| coop | 70.0 ± n/a (n=1) |" in (tmp_path / "table.md").read_text()
    assert "coop,base2new,average,base_acc,70.0000,,,1" in (tmp_path / "table.csv").read_text().splitlines()
    assert (tmp_path / "table.png").stat().st_size > 0
