"""`campe ablate`: the grid, caches shared by layout, the table = mean/std of the cells' metrics JSONs, resume.

A real tiny run: the tiny generated benchmark through the download stage, a 2-layer random BERT (local folder with
the MiniLM tokenizer), tiny towers, 3 steps per cell, MLflow in a temp SQLite store; 2 methods x 2 seeds.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image

from stages import ablate, ablate_table
from stages.ablate import AblateParams, Cell, grid, layout_key
from campe.core.config import ConfigError
from campe.train.run_config import resolve_run_config

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MODEL = dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, embed_dim=32, frames=4,
                  context_length=32, text_width=32, text_layers=1, text_heads=2)


@pytest.fixture(scope="module")
def base(tiny_generated, tiny_lm, tmp_path_factory) -> dict:
    """Stage sections of a tiny ablation (what params.yaml holds), on download-stage shards of the tiny set."""
    from stages.download import DownloadParams, run_stage as download_stage
    _, root = tiny_generated
    tmp = tmp_path_factory.mktemp("ablate")
    download_stage(DownloadParams(url_list=str(root / "urls" / "train.parquet"), output_dir=str(tmp / "shards"),
                                  stats_file=str(tmp / "stats.json"), extra_columns=["image_id"], image_size=32,
                                  processes_count=1, thread_count=4, number_sample_per_shard=30))
    return {"text_encoder": {"model_path": tiny_lm, "k": 2, "defo_tokens": 2, "max_length": 24,
                             "pooling": "multi_prompt", "negation": True},
            "model": dict(TINY_MODEL), "loss": {"lambda_div": 0.1, "lambda_neg": 0.1},
            "train": {"shards_dir": str(tmp / "shards"), "cache_dir": "unused: the ablation picks one per layout",
                      "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "progress": False, "log_every": 1,
                      "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "artifact_root": str(tmp / "art")},
            "cache": {"batch_size": 16, "threads": 1},
            "evaluate": {"image_sets": {"gen": str(root / "dataset_karpathy.json")},
                         "video_sets": {"gen_video": str(root / "msrvtt")}, "zero_shot_root": "",
                         "video_frames": 4, "examples": 1, "batch_size": 16}}


def _ap(tmp: Path, **kw) -> AblateParams:
    return AblateParams(**{"name": "t", "root": str(tmp / "abl"), "methods": ["vanilla", "multi_prompt_div_neg"],
                           "kinds": ["softmax"], "all_kinds_for": [], "seeds": [0, 1], "steps": 3,
                           "eval_sets": ["image", "video"], "experiment": "abl-test",
                           "table_md": str(tmp / "out" / "ablation.md"), "table_csv": str(tmp / "out" / "ablation.csv"),
                           "plot": str(tmp / "out" / "ablation.png"), **kw})


@pytest.fixture(scope="module")
def ran(base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ran")
    ap = _ap(tmp)
    lines: list[str] = []
    out = ablate.run_ablation(ap, base, "test", log=lines.append)
    return ap, out, lines


def test_grid_runs_every_method_with_the_first_kind_and_listed_methods_with_all_kinds():
    ap = AblateParams(methods=["vanilla", "multi_prompt", "multi_prompt_div_neg"], kinds=["softmax", "sigmoid"],
                      all_kinds_for=["multi_prompt_div_neg"], seeds=[3, 5, 7])
    cells = grid(ap)
    assert len(cells) == 4 * 3 and len(set(cells)) == len(cells)
    assert cells[:4] == [Cell("vanilla", "softmax", 3), Cell("multi_prompt", "softmax", 3),
                         Cell("multi_prompt_div_neg", "softmax", 3), Cell("multi_prompt_div_neg", "sigmoid", 3)]
    assert {c.seed for c in cells} == {3, 5, 7}
    with pytest.raises(ConfigError, match="all_kinds_for"):
        ablate.from_dict(AblateParams, {"methods": ["vanilla"], "all_kinds_for": ["defo"]}, "p:ablate")
    with pytest.raises(ConfigError, match="method 'clip'"):
        ablate.from_dict(AblateParams, {"methods": ["clip"]}, "p:ablate")


def test_cells_change_only_method_kind_seed_and_schedule_and_share_caches_by_layout(base, tmp_path):
    ap = _ap(tmp_path, methods=list(ablate.ALL_METHODS), kinds=["softmax", "sigmoid"],
             all_kinds_for=["multi_prompt_div_neg"], steps=7)
    cfgs = {c: resolve_run_config(ablate.cell_sections(ap, base, c)) for c in grid(ap)}
    ref = cfgs[Cell("multi_prompt", "softmax", 0)]
    for c, cfg in cfgs.items():
        assert (cfg.method, cfg.loss.kind, cfg.train.seed, cfg.model.init_seed) == (c.method, c.kind, c.seed, c.seed)
        # The same data, schedule and optimiser for every method (no per-method tuning).
        for f in ("shards_dir", "steps", "batch_size", "lr", "warmup_steps", "weight_decay", "min_lr_ratio"):
            assert getattr(cfg.train, f) == getattr(ref.train, f), f
        assert cfg.train.steps == 7 and cfg.train.out_dir.endswith(f"{c.variant}/seed{c.seed}")
    keys = {m: layout_key(cfgs[Cell(m, "softmax", 0)].text_encoder) for m in ablate.ALL_METHODS if m != "vanilla"}
    assert keys["multi_prompt"] == keys["multi_prompt_div"] != keys["multi_prompt_div_neg"]
    assert len(set(keys.values())) == 6  # mean, last_token, single_prompt, defo, multi_prompt, +neg
    # Seeds and the kind do not change the cached layout (one cache serves all seeds and both kinds).
    assert layout_key(cfgs[Cell("multi_prompt_div_neg", "sigmoid", 1)].text_encoder) == keys["multi_prompt_div_neg"]


def test_table_is_mean_and_std_of_the_cells_metrics_files_and_parses(ran):
    ap, out, lines = ran
    assert (out["cells"], out["ran"], out["skipped"]) == (4, 4, 0)
    assert sum("[" in s and "seed" in s and "rsum" in s for s in lines) == 4  # one progress line per cell
    # The reference: the evaluation stage's metrics JSONs of each cell, read directly.
    per = {}
    for c in grid(ap):
        for ds in ("gen", "gen_video"):
            rec = json.loads((ablate.cell_dir(ap, c) / "eval" / f"{ds}.json").read_text())
            per.setdefault((c.variant, ds), []).append(rec["metrics"])
    rows = list(csv.DictReader(io.StringIO(Path(ap.table_csv).read_text())))
    paired = {f"d_{ref}{end}" for ref in ("mean", "vanilla", "default") for end in ("", "_low", "_high", "_n")}
    assert rows and set(rows[0]) == set(ablate_table.CSV_FIELDS) | paired
    got = {(r["variant"], r["dataset"], r["metric"]): r for r in rows}
    # Paired difference against vanilla: per seed, method - vanilla, then mean and its t interval (n = 2)
    for metric in ("rsum", "i2t_R@1"):
        d = [a[metric] - b[metric] for a, b in zip(per[("multi_prompt_div_neg-softmax", "gen")],
                                                   per[("vanilla-softmax", "gen")])]
        r = got[("multi_prompt_div_neg-softmax", "gen", metric)]
        half = 12.706204736174698 * statistics.stdev(d) / math.sqrt(2)  # t(0.975, 1)
        assert float(r["d_vanilla"]) == pytest.approx(sum(d) / 2, abs=1e-9) and r["d_vanilla_n"] == "2"
        if half > 0:
            assert float(r["d_vanilla_high"]) == pytest.approx(sum(d) / 2 + half, rel=1e-9)
        assert got[("vanilla-softmax", "gen", metric)]["d_vanilla"] == ""  # no difference with itself
        assert r["d_mean"] == "" and r["d_mean_n"] == "0"  # `mean` is not in this grid
    # The schedule each cell reached is a row of the table too
    assert float(got[("vanilla-softmax", "training", "steps")]["mean"]) == 3.0
    # and each cell's time, from its cell.json timings (minutes), with the grid's sum in the Markdown
    minutes = {}
    for c in grid(ap):
        t = json.loads((ablate.cell_dir(ap, c) / ablate.CELL_FILE).read_text())["timings"]
        assert t["train_s"] > 0 and t["eval_s"] > 0
        minutes.setdefault(c.variant, []).append((sum(t.values()) / 60, t["train_s"] / 60))
    for variant, ms in minutes.items():
        assert float(got[(variant, "cost", "cell_min")]["mean"]) == pytest.approx(sum(m[0] for m in ms) / 2)
        assert float(got[(variant, "cost", "train_min")]["mean"]) == pytest.approx(sum(m[1] for m in ms) / 2)
    total = sum(m[0] for ms in minutes.values() for m in ms)
    assert f"Summed over the 4 finished cells: {total:.0f} min." in Path(ap.table_md).read_text()
    for (variant, ds), ms in per.items():
        for metric in ms[0]:
            vals = [m[metric] for m in ms]
            r = got[(variant, ds, metric)]
            assert float(r["mean"]) == pytest.approx(sum(vals) / 2, abs=1e-9)
            assert float(r["std"]) == pytest.approx(statistics.stdev(vals), abs=1e-9)
            assert (r["n"], r["seeds"]) == ("2", "0 1")
    assert {r["metric"] for r in rows if r["dataset"] == "gen"} >= {
        "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"}

    # The picture's panels hold every seed's value, as in the metrics files; the PNG is written.
    panels = ablate_table.plot_panels(ablate.finished_records(ap), ablate.variants_of(ap))
    assert set(panels) == {"gen rsum", "gen_video rsum"}
    for (variant, ds), ms in per.items():
        assert panels[f"{ds} rsum"][variant] == [m["rsum"] for m in ms]
    with Image.open(ap.plot) as im:
        assert im.size[0] > 200 and im.size[1] > 200

    # Markdown: a table per eval set, one row per variant, cells "mean ± std" equal to the CSV's.
    md = Path(ap.table_md).read_text()
    assert "4 of 4 cells finished" in md
    section = md.split("## gen\n", 1)[1].split("## ", 1)[0]
    table = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [h.strip() for h in table[0].strip("|").split("|")]
    assert header[:2] == ["method", "loss"] and header[-2:] == ["n", "seeds"] and "rsum" in header
    body = {tuple(x.strip() for x in ln.strip("|").split("|"))[0]: [x.strip() for x in ln.strip("|").split("|")]
            for ln in table[2:]}
    assert set(body) == {"vanilla", "multi_prompt_div_neg"}
    for method, cells in body.items():
        for name, text in zip(header[2:-2], cells[2:-2]):
            r = got[(f"{method}-softmax", "gen", name)]
            assert text == f"{float(r['mean']):.2f} ± {float(r['std']):.2f}"
        assert cells[-2:] == ["2", "0 1"]


def test_table_shows_each_prompt_cell_s_diagnostics_from_its_metrics_file(ran):
    """The text_fidelity section: the prompt diagnostics of every multi-prompt cell (its metrics.json, written by
    the train loop), mean ± std with 4 digits; vanilla has no prompts and no row."""
    ap, _, _ = ran
    vals = {}
    for c in grid(ap):
        m = json.loads((ablate.cell_dir(ap, c) / "metrics.json").read_text())
        assert ("prompt_state_cosine" in m) == (c.method != "vanilla")
        if c.method != "vanilla":
            vals.setdefault(c.variant, []).append(m)
    md = Path(ap.table_md).read_text()
    section = md.split(f"## {ablate.FIDELITY_SET}\n", 1)[1].split("## ", 1)[0]
    table = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [h.strip() for h in table[0].strip("|").split("|")]
    assert {"prompt_state_cosine", "prompt_state_cosine_centred", "apt_movement"} <= set(header)
    rows = {ln.strip("|").split("|")[0].strip(): [x.strip() for x in ln.strip("|").split("|")] for ln in table[2:]}
    assert set(rows) == {"multi_prompt_div_neg"}
    for name, text in zip(header[2:-2], rows["multi_prompt_div_neg"][2:-2]):
        xs = [m[name] for m in vals["multi_prompt_div_neg-softmax"]]
        assert text == f"{statistics.fmean(xs):.4f} ± {statistics.stdev(xs):.4f}"
def _md_table(md: str, title: str) -> tuple[list[str], dict[str, list[str]]]:
    section = md.split(title + "\n", 1)[1].split("\n#", 1)[0]
    table = [[x.strip() for x in ln.strip("|").split("|")] for ln in section.splitlines() if ln.startswith("|")]
    return table[0], {row[0]: row for row in table[2:]}


def test_aspect_tables_and_pictures_follow_the_cells_metrics(ran):
    from stages.ablate_aspects import aspect_plot_paths

    ap, _, _ = ran
    md = Path(ap.table_md).read_text()
    got = {(r["variant"], r["dataset"], r["metric"]): r for r in csv.DictReader(io.StringIO(Path(ap.table_csv)
                                                                                            .read_text()))}

    def text(variant: str, metric: str) -> str:
        r = got[(variant, "gen", metric)]
        return f"{float(r['mean']):.2f} ± {float(r['std']):.2f}"

    # t2i R@1 by the query caption's aspect mix: every method, every mix of the tiny test split
    header, body = _md_table(md, "### gen: text -> image R@1 by the query caption's aspect mix")
    mixes = header[2:]
    assert mixes and set(body) == {"vanilla", "multi_prompt_div_neg"}
    for method, cells in body.items():
        assert cells[2:] == [text(f"{method}-softmax", f"mix/{m}/t2i_R@1") for m in mixes]
    # the specialisation matrix and the re-weighting only where there are prompt segments (K = 2)
    header, body = _md_table(md, "### gen: specialisation of `multi_prompt_div_neg-softmax`, text -> image R@5 "
                                 "with segment k's similarity alone, by an aspect the query mentions")
    assert list(body) == ["APT-1", "APT-2", "all"] and "subject" in header
    a = header.index("subject")
    assert body["APT-2"][a] == text("multi_prompt_div_neg-softmax", "seg2/aspect/subject/t2i_R@5")
    assert body["all"][a] == text("multi_prompt_div_neg-softmax", "aspect/subject/t2i_R@5")
    assert "specialisation of `vanilla" not in md
    title = next(ln for ln in md.splitlines() if ln.startswith("### gen: aspect re-weighting, change of text -> "
                                                               "image R@1"))
    assert set(_md_table(md, title)[1]) == {"multi_prompt_div_neg"}
    for png in aspect_plot_paths(ap):
        with Image.open(png) as im:
            assert im.size[0] > 200 and im.size[1] > 200


def test_every_cell_is_an_mlflow_run_tagged_with_the_ablation(ran, base):
    from mlflow.tracking import MlflowClient
    ap, _, _ = ran
    client = MlflowClient(tracking_uri=base["train"]["tracking_uri"])
    exp = client.get_experiment_by_name("abl-test")
    runs = client.search_runs([exp.experiment_id], "tags.ablation = 't'")
    assert sorted(r.info.run_name for r in runs) == sorted(f"t/{c.variant}/seed{c.seed}" for c in grid(ap))
    assert all("eval/gen/i2t_R_at_1" in r.data.metrics for r in runs)


def test_resume_skips_finished_cells_and_redoes_only_an_unfinished_one(ran, base):
    ap, _, _ = ran
    cells = grid(ap)
    victim = ablate.cell_dir(ap, cells[-1])
    (victim / ablate.CELL_FILE).unlink()  # as if killed during its evaluation
    mtimes = {c: (ablate.cell_dir(ap, c) / "model.pt").stat().st_mtime_ns for c in cells}
    lines: list[str] = []
    out = ablate.run_ablation(ap, base, "test", log=lines.append)
    assert (out["ran"], out["skipped"]) == (1, 3)
    assert sum("skipped" in s for s in lines) == 3
    # Nothing retrained: the killed cell had its model, so only its evaluation ran again.
    assert all((ablate.cell_dir(ap, c) / "model.pt").stat().st_mtime_ns == mtimes[c] for c in cells)
    assert (victim / ablate.CELL_FILE).exists()
    # Other params for the same cells: refused, naming the cell, never mixed into the table.
    with pytest.raises(ConfigError, match=r"seed0.*other params"):
        ablate.run_ablation(_ap(Path(ap.root).parent, steps=4), base, "test", log=lines.append)


def test_cli_table_only_rewrites_the_table_from_finished_cells(ran, tmp_path):
    import yaml
    ap, _, _ = ran
    params = tmp_path / "params.yaml"
    # plot into tmp_path: the default (plots/ablation.png) is the checkout's tracked picture
    params.write_text(yaml.safe_dump({"ablate": {**{k: getattr(ap, k) for k in (
        "name", "root", "methods", "kinds", "all_kinds_for", "seeds", "steps", "eval_sets")},
        "plot": str(tmp_path / "ablation.png")}}))
    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    md, cs = tmp_path / "t.md", tmp_path / "t.csv"
    args = parser.parse_args(["--params", str(params), "--table-only", "--table-md", str(md), "--table-csv", str(cs)])
    assert ablate.run(args) == 0
    assert cs.read_text() == Path(ap.table_csv).read_text()
    # One seed only: std is empty in the CSV and the Markdown shows the bare mean.
    args = parser.parse_args(["--params", str(params), "--table-only", "--seeds", "1", "--table-md", str(md),
                              "--table-csv", str(cs)])
    assert ablate.run(args) == 0
    rows = list(csv.DictReader(cs.open()))
    assert rows and all(r["std"] == "" and r["n"] == "1" and r["seeds"] == "1" for r in rows)
    table = [ln for ln in md.read_text().splitlines() if ln.startswith("| vanilla")]
    assert table and "±" not in "".join(table) and not math.isnan(float(rows[0]["mean"]))


def test_confidence_interval_and_paired_difference_against_hand_computed_values():
    from campe.core.stats import mean_ci, paired_difference
    # x = 2, 4, 4, 5: mean 3.75, std sqrt(4.75 / 3) = 1.258306, t(0.975, 3) = 3.182446 -> half-width 2.002245
    st = mean_ci([2, 4, 4, 5])
    assert st["mean"] == pytest.approx(3.75) and st["std"] == pytest.approx(1.2583057, rel=1e-6)
    assert st["half"] == pytest.approx(2.002245, rel=1e-6) and st["low"] == pytest.approx(1.747755, rel=1e-6)
    # paired, seeds 0-2 in common (seed 7 only in the method): d = 1, 2, 1 -> mean 4/3, std sqrt(1/3),
    # t(0.975, 2) = 4.302653 -> half-width 4.302653 * sqrt(1/3) / sqrt(3) = 1.434218
    d = paired_difference({0: 10.0, 1: 12.0, 2: 11.0, 7: 50.0}, {0: 9.0, 1: 10.0, 2: 10.0})
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3 and d["mean"] == pytest.approx(4 / 3)
    assert d["half"] == pytest.approx(1.434218, rel=1e-5)
    assert (d["low"], d["high"]) == (pytest.approx(-0.100884, rel=1e-4), pytest.approx(2.767551, rel=1e-5))
    # the paired interval is narrower than the unpaired one when seeds move both methods alike
    assert d["half"] < mean_ci([10, 12, 11])["half"] + mean_ci([9, 10, 10])["half"]
    one = mean_ci([3.0])
    assert one["n"] == 1 and math.isnan(one["std"]) and math.isnan(one["half"])
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_axis_cells_are_paired_against_their_method_at_the_default_setting():
    """d_default: an axis variant minus its method's main variant, seed by seed (hand-computed); NaN elsewhere."""
    variants = ["mean-softmax", "multi_prompt-softmax", "multi_prompt-softmax-apt_placeholder=distinct"]
    assert ablate_table.axis_bases(variants) == {variants[2]: "multi_prompt-softmax"}
    vals = {"mean-softmax": [300.0, 310.0, 305.0], "multi_prompt-softmax": [290.0, 295.0, 280.0],
            variants[2]: [292.0, 299.0, 281.0]}
    records = [{"variant": v, "method": v.split("-")[0], "kind": "softmax", "seed": s,
                "metrics": {"gen": {"rsum": x}}} for v, xs in vals.items() for s, x in enumerate(xs)]
    rows = ablate_table.summarize(records, variants, {"mean": "mean-softmax"}, ablate_table.axis_bases(variants))
    got = {r["variant"]: r for r in rows}
    d = [2.0, 4.0, 1.0]  # distinct - shared per seed: mean 7/3, std sqrt(7/3), t(0.975, 2) = 4.302653
    r = got[variants[2]]
    assert r["d_default"] == pytest.approx(7 / 3) and r["d_default_n"] == 3
    assert r["d_default_high"] - r["d_default"] == pytest.approx(4.302653 * statistics.stdev(d) / math.sqrt(3),
                                                                 rel=1e-5)
    assert r["d_mean"] == pytest.approx((-8 - 11 - 24) / 3)  # the references still apply to axis rows
    assert math.isnan(got["multi_prompt-softmax"]["d_default"]) and got["mean-softmax"]["d_default_n"] == 0
    assert "Δ vs default" in "\n".join(ablate_table.paired_markdown(rows, {"mean": "mean-softmax"}))


def test_axes_add_cells_of_their_methods_and_cells_set_the_protocol(base, tmp_path):
    ap = _ap(tmp_path, methods=["vanilla", "mean", "multi_prompt"], seeds=[0, 1, 2, 3, 4],
             axes={"k": [1, 2, 4, 6, 8], "trainable_layers": [1, 2]}, axis_seeds=[0, 1, 2],
             image_tower="locked", patience=3, epochs=20, steps=0)
    ap.validate()
    cells = grid(ap)
    main = [c for c in cells if not c.axis]
    axis = [c for c in cells if c.axis]
    assert len(main) == 3 * 5 and len(axis) == 3 * (5 + 2)
    assert {c.variant for c in axis if c.seed == 0} == {f"multi_prompt-softmax-k={k}" for k in (1, 2, 4, 6, 8)} | {
        "multi_prompt-softmax-trainable_layers=1", "multi_prompt-softmax-trainable_layers=2"}
    s = ablate.cell_sections(ap, base, Cell("multi_prompt", "softmax", 2, "k", 8))
    assert s["text_encoder"]["k"] == 8 and s["text_encoder"]["init_seed"] == 2
    t = s["train"]
    assert (t["image_tower"], t["patience"], t["epochs"], t["seed"]) == ("locked", 3, 20, 2)
    cfg = resolve_run_config(s)
    assert cfg.text_encoder.n_prompts == 8 and cfg.train.image_tower == "locked"
    # every cell of one ablation shares one (content-addressed) feature cache
    assert len({ablate.cell_sections(ap, base, c)["train"]["image_features_dir"] for c in cells}) == 1
    for bad in ({"axes": {"pooling": ["mean"]}}, {"axis_methods": ["vanilla"]}, {"references": ["nope"]}):
        with pytest.raises(ValueError):
            _ap(tmp_path, **{"axes": {"k": [2]}, **bad}).validate()


def test_axis_methods_for_gives_one_axis_its_own_methods(base, tmp_path):
    """A control for one axis (mean at trainable_layers 2) without K cells for mean, whose K means nothing."""
    ap = _ap(tmp_path, methods=["mean", "multi_prompt"], seeds=[0, 1], axis_seeds=[0, 1, 2],
             axes={"k": [2, 8], "trainable_layers": [2]},
             axis_methods_for={"trainable_layers": ["multi_prompt", "mean", "single_prompt"]})
    ap.validate()
    axis = [c for c in grid(ap) if c.axis]
    assert sorted((c.variant, c.seed) for c in axis) == sorted(
        (v, s) for s in (0, 1, 2) for v in ("multi_prompt-softmax-k=2", "multi_prompt-softmax-k=8",
                                            "multi_prompt-softmax-trainable_layers=2",
                                            "mean-softmax-trainable_layers=2",
                                            "single_prompt-softmax-trainable_layers=2"))
    assert [c.seed for c in axis] == sorted(c.seed for c in axis)  # seed-major, as the main grid
    s = ablate.cell_sections(ap, base, Cell("mean", "softmax", 1, "trainable_layers", 2))
    assert s["text_encoder"]["trainable_layers"] == 2 and s["text_encoder"]["pooling"] == "mean"
    # its own cache layout (the frozen states stop one layer earlier), and paired against mean at the default
    cfgs = [resolve_run_config(ablate.cell_sections(ap, base, c)) for c in
            (Cell("mean", "softmax", 1), Cell("mean", "softmax", 1, "trainable_layers", 2))]
    assert ablate.layout_key(cfgs[0].text_encoder) != ablate.layout_key(cfgs[1].text_encoder)
    assert ablate_table.axis_bases(ablate.variants_of(ap))["mean-softmax-trainable_layers=2"] == "mean-softmax"
    # without it every axis applies to axis_methods, as before
    plain = _ap(tmp_path, methods=["mean"], seeds=[0], axes={"k": [2], "trainable_layers": [2]})
    assert {c.variant for c in grid(plain) if c.axis} == {"multi_prompt-softmax-k=2",
                                                          "multi_prompt-softmax-trainable_layers=2"}
    for bad in ({"axis_methods_for": {"apt_placeholder": ["mean"]}}, {"axis_methods_for": {"k": []}},
                {"axis_methods_for": {"k": ["vanilla"]}}, {"axis_methods_for": {"k": ["nope"]}}):
        with pytest.raises(ValueError, match="axis_methods"):
            _ap(tmp_path, **{"axes": {"k": [2]}, **bad}).validate()


def test_mean_lora_is_in_the_grid_and_its_cell_trains_online_without_a_cache(base, tmp_path):
    """LoRA changes every LM layer, so the ablation builds no text cache for mean_lora: its cell trains online."""
    from campe.core.config import read_yaml
    assert ablate.ALL_METHODS.index("mean_lora") == ablate.ALL_METHODS.index("mean") + 1
    listed = read_yaml(Path(__file__).resolve().parents[1] / "params.yaml")["ablate"]["methods"]
    assert listed.index("mean_lora") == listed.index("mean") + 1
    ap = _ap(tmp_path, methods=["mean_lora"], seeds=[0], steps=2, eval_sets=["image"])
    cell = grid(ap)[0]
    assert cell.variant == "mean_lora-softmax"
    s = ablate.cell_sections(ap, base, cell)
    assert s["train"]["cache_dir"] == "" and s["text_encoder"]["lora"] is True
    cfg = resolve_run_config(s)  # no warning about an ignored cache_dir: the cell states it trains online
    assert cfg.text_encoder.lora and cfg.text_encoder.pooling == "mean" and cfg.train.cache_dir == ""
    lines: list[str] = []
    out = ablate.run_ablation(ap, base, "test", log=lines.append)
    assert out["ran"] == 1
    rec = json.loads((ablate.cell_dir(ap, cell) / ablate.CELL_FILE).read_text())
    assert "cache_s" not in rec["timings"] and rec["steps"] == 2 and rec["metrics"]["gen"]["rsum"] >= 0
    assert not (Path(ap.root) / "caches").exists()
    assert "mean_lora" in Path(ap.table_md).read_text()


def _make_recipe_args(target: str) -> list[str]:
    """The arguments after `campe ablate` in the Makefile's recipe of `target` (continuation lines joined)."""
    import shlex
    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text().replace("\\\n", " ")
    recipe = text.split(f"\n{target}:", 1)[1].split("\n", 2)[1]
    return shlex.split(recipe.split("campe ablate", 1)[1])


@pytest.mark.parametrize("target, tower", [("ablate-scratch", "scratch"), ("ablate-cap30", "locked"),
                                           ("ablate-cap30-anneal10", "locked")])
def test_make_key_variant_grids_change_only_what_they_name_on_the_committed_section(target, tower):
    """The Makefile's `ablate-scratch`, `ablate-cap30` and `ablate-cap30-anneal10` commands, parsed by `campe
    ablate`'s own parser on the committed params.yaml: vanilla, mean and the full method, softmax only, no axis
    cells, 3 seeds, at most 30 epochs; scratch: the from-scratch image tower, the cap30 ones: the committed (locked)
    one, anneal10 also with the decay over 10 epochs; the committed early-stopping rule (patience) and everything
    else unchanged; its own name, table and picture."""
    import yaml
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    args = parser.parse_args(["--params", str(root / "params.yaml"), *_make_recipe_args(target)])
    ap, base_sections = ablate.params_from_args(args)
    ap.validate()
    committed = yaml.safe_load((root / "params.yaml").read_text())["ablate"]
    assert ap.image_tower == tower and (tower == "scratch") == (committed["image_tower"] != tower)
    assert ap.axes == {} != committed["axes"] and ap.epochs == 30 > committed["epochs"]
    # anneal10: the decay over 10 epochs in every cell (the cap-10 schedule, run on); the others: the committed one
    assert ap.schedule_epochs == (10 if target.endswith("anneal10") else committed["schedule_epochs"])
    if ap.schedule_epochs:
        s = ablate.cell_sections(ap, base_sections, grid(ap)[0])
        assert s["train"]["schedule_epochs"] == 10 and s["train"]["epochs"] == 30
    assert ap.name != committed["name"] and ap.table_csv != committed["table_csv"] and ap.plot != committed["plot"]
    assert ap.patience == committed["patience"] > 0 and ap.keep_in_memory == committed["keep_in_memory"]
    cells = grid(ap)
    assert {c.variant for c in cells} == {"vanilla-softmax", "mean-softmax", "multi_prompt_div_neg-softmax"}
    assert sorted({c.seed for c in cells}) == [0, 1, 2] and len(cells) == 9
    # Without the overrides the committed grid has sigmoid and axis cells: the flags are what removes them.
    full = grid(ablate.params_from_args(parser.parse_args(["--params", str(root / "params.yaml")]))[0])
    assert any(c.kind == "sigmoid" for c in full) and any(c.axis for c in full)
