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
