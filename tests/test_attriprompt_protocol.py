"""AttriPrompt's few-shot protocol and its command: CoOp's sampling and base/novel rules on a constructed split,
HM and the averages by hand, clear errors for bad inputs, and `campe prompt-learn` end to end (real MLflow)."""
from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from campe import cli
from campe.attriprompt.backbone import load_backbone
from campe.attriprompt.fewshot import (Datum, dataset_average, fewshot, hm, read_split, seed_summary,
                                       subsample_classes)
from tests.attri_tiny import make_dataset, save_tiny_clip


def _write_split(root: Path, name: str, data) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / f"split_zhou_{name}.json"
    f.write_text(data if isinstance(data, str) else json.dumps(data))
    return f


def _constructed(root: Path) -> Path:
    """Labels 9, 2, 7, 0, 5 (not sorted, not contiguous), uneven counts: label 5 has only 3 train images."""
    rng = random.Random(0)
    train, val, test = [], [], []
    for label, count in ((9, 20), (2, 18), (7, 17), (0, 25), (5, 3)):
        train += [[f"c{label}/tr{i}.png", label, f"class{label}"] for i in range(count)]
        val += [[f"c{label}/va{i}.png", label, f"class{label}"] for i in range(6)]
        test += [[f"c{label}/te{i}.png", label, f"class{label}"] for i in range(2)]
    rng.shuffle(train)
    return _write_split(root, "Built", {"train": train, "val": val, "test": test})


def _dassl_fewshot(items: list, num_shots: int) -> list:
    """Dassl's DatasetBase.generate_fewshot_dataset(repeat=False) under the global `random`, as written there."""
    tracker = defaultdict(list)
    for item in items:
        tracker[item.label].append(item)
    out = []
    for label, group in tracker.items():
        out.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return out


def test_fewshot_sampling_matches_dassl_and_is_cached_per_seed(tmp_path):
    _constructed(tmp_path)
    s = read_split(tmp_path, "Built")
    for seed in (1, 2, 3):
        random.seed(seed)  # CoOp: set_random_seed(cfg.SEED), then the dataset samples train, then val
        want_train, want_val = _dassl_fewshot(s.train, 16), _dassl_fewshot(s.val, min(16, 4))
        train, val = fewshot(s, 16, seed, tmp_path / "cache")
        assert train == want_train and val == want_val
        assert fewshot(s, 16, seed, tmp_path / "cache") == (train, val)  # read back from the cache
    assert (tmp_path / "cache" / "Built" / "shot_16-seed_1.json").is_file()
    counts = {y: sum(d.label == y for d in train) for y in (9, 2, 7, 0, 5)}
    assert counts == {9: 16, 2: 16, 7: 16, 0: 16, 5: 3}
    assert fewshot(s, 16, 1, tmp_path / "cache")[0] != fewshot(s, 16, 2, tmp_path / "cache")[0]


def test_a_changed_split_file_is_sampled_again(tmp_path):
    f = _constructed(tmp_path)
    first = fewshot(read_split(tmp_path, "Built"), 4, 1, tmp_path / "cache")[0]
    data = json.loads(f.read_text())
    data["train"] = [x for x in data["train"] if x[1] != 9]
    f.write_text(json.dumps(data))
    second = fewshot(read_split(tmp_path, "Built"), 4, 1, tmp_path / "cache")[0]
    assert {d.label for d in first} == {9, 2, 7, 0, 5} and {d.label for d in second} == {2, 7, 0, 5}


def test_base_novel_split_by_sorted_label_with_relabelling(tmp_path):
    _constructed(tmp_path)
    s = read_split(tmp_path, "Built")
    # labels sorted 0, 2, 5, 7, 9 -> base ceil(5/2) = 3: 0, 2, 5 -> 0, 1, 2; novel 7, 9 -> 0, 1
    tr, te = subsample_classes(s.train, s.test, subsample="base")
    assert sorted({(d.classname, d.label) for d in te}) == [("class0", 0), ("class2", 1), ("class5", 2)]
    assert {d.label for d in tr} == {0, 1, 2} and len(tr) == 25 + 18 + 3
    _, te_new = subsample_classes(s.train, s.test, subsample="new")
    assert sorted({(d.classname, d.label) for d in te_new}) == [("class7", 0), ("class9", 1)]
    (everything,) = subsample_classes(s.test, subsample="all")
    assert sorted({(d.classname, d.label) for d in everything})[-1] == ("class9", 4)
    even = [Datum("x", y, f"c{y}") for y in range(4)]
    assert [d.label for d in subsample_classes(even, subsample="base")[0]] == [0, 1]


def test_hm_and_averages_against_a_hand_computed_case():
    assert hm(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert hm(0.0, 0.0) == 0.0
    a = [{"seed": 1, "base_acc": 80, "novel_acc": 60}, {"seed": 2, "base_acc": 82, "novel_acc": 64},
         {"seed": 3, "base_acc": 78, "novel_acc": 62}]
    b = [{"seed": 1, "base_acc": 50, "novel_acc": 70}, {"seed": 2, "base_acc": 54, "novel_acc": 70},
         {"seed": 3, "base_acc": 52, "novel_acc": 70}]
    sa, sb = seed_summary(a), seed_summary(b)
    assert sa["base_acc"]["mean"] == pytest.approx(80) and sa["base_acc"]["std"] == pytest.approx(2)
    assert sa["base_acc"]["ci95"] == pytest.approx(4.303 * 2 / math.sqrt(3))
    assert sa["hm"] == pytest.approx(2 * 80 * 62 / 142)  # HM of the seed means, not the mean of HMs
    avg = dataset_average({"A": sa, "B": sb})
    assert avg["base_acc"] == pytest.approx(66) and avg["novel_acc"] == pytest.approx(66)
    assert avg["hm"] == pytest.approx(66)
    # the field's published CLIP average (notes §4.2): HM from the mean B and N
    assert hm(69.34, 74.22) == pytest.approx(71.70, abs=0.01)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"not valid JSON"),
    ({"train": [], "val": []}, r"expected an object with lists 'train', 'val' and 'test'"),
    ({"train": [["a.png", "1", "cat"]], "val": [], "test": [["b.png", 1, "cat"]]},
     r"train\[0\] is .* each entry must be \[image path, integer label, class name\]"),
    ({"train": [["a.png", 1, "cat"]], "val": [], "test": [["b.png", 1, "dog"]]},
     r"label 1 is class 'cat' at train\[0\] but 'dog' at test\[0\]; each label needs one class name"),
    ({"train": [["a.png", 1, "cat"]], "val": [], "test": []}, r"test list is empty"),
])
def test_bad_split_files_name_the_file_and_the_fix(tmp_path, content, message):
    f = _write_split(tmp_path, "Bad", content)
    with pytest.raises(ValueError, match=message) as e:
        read_split(tmp_path, "Bad")
    assert str(f) in str(e.value)


def test_missing_split_file_and_train_only_targets(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"split_zhou_Nope.json: split file not found.*data_root"):
        read_split(tmp_path, "Nope")
    _write_split(tmp_path, "Shifted", {"train": [], "val": [], "test": [["a.png", 0, "cat"]]})
    s = read_split(tmp_path, "Shifted")  # a DG test set: loads, but cannot be trained on
    with pytest.raises(ValueError, match=r"train list is empty.*dg_targets"):
        fewshot(s, 4, 1, None)


def test_a_folder_that_is_not_a_clip_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config.json, so not a CLIP model folder.*clip_path"):
        load_backbone(tmp_path / "missing")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"bert: config.json has model_type 'bert', not 'clip'.*save_pretrained"):
        load_backbone(bert)
    clip = save_tiny_clip(tmp_path / "clip")
    (clip / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"clip: the CLIP weights do not load.*clip_path"):
        load_backbone(clip)


# ---------------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("pl")
    save_tiny_clip(root / "clip")
    make_dataset(root / "data", "Toy", n_classes=4, per_class=5, test_per_class=2)
    make_dataset(root / "data", "Other", n_classes=3, per_class=2, seed=1)
    shifted = make_dataset(root / "data", "ToyShift", n_classes=4, per_class=0, test_per_class=2, seed=2)
    assert json.loads((shifted / "split_zhou_ToyShift.json").read_text())["train"] == []
    return root


def _params(root: Path, **kw) -> Path:
    section = {"clip_path": str(root / "clip"), "data_root": str(root / "data"), "datasets": ["Toy"],
               "methods": ["zsclip", "coop", "attriprompt"], "seeds": [1, 2], "shots": 2, "epochs": 1,
               "batch_size": 4, "out_dir": str(root / "out"), "metrics_dir": str(root / "metrics"),
               "fewshot_dir": str(root / "fs"), "tracking_uri": "sqlite:///mlflow.db", "augment": False,
               "source": "Toy", "xd_targets": ["Other"], "dg_targets": ["ToyShift"], **kw}
    f = root / "params.yaml"
    f.write_text(yaml.safe_dump({"prompt_learn": section}))
    return f


def test_prompt_learn_train_eval_writes_metrics_and_mlflow_runs(project, capsys):
    from mlflow.tracking import MlflowClient

    params = _params(project)
    assert cli.main(["prompt-learn", "train", "--params", str(params)]) == 0
    metrics = project / "metrics" / "base2new"
    rows = {(m, s): json.loads((metrics / m / "Toy" / f"seed{s}.json").read_text())
            for m in ("zsclip", "coop", "attriprompt") for s in (1, 2)}
    for r in rows.values():
        assert r["n_base_classes"] == 2 and r["n_novel_classes"] == 2 and r["n_train"] == 4
        assert r["hm"] == pytest.approx(hm(r["base_acc"], r["novel_acc"]))
        assert 0 <= r["base_acc"] <= 100 and r["base_acc"] % 25 == 0  # 2 classes x 2 test images
    assert rows[("zsclip", 1)]["base_acc"] == rows[("zsclip", 2)]["base_acc"]  # nothing trained
    summary = json.loads((metrics / "summary.json").read_text())
    assert set(summary["methods"]) == {"zsclip", "coop", "attriprompt"}
    assert "| attriprompt | **average** |" in (metrics / "summary.md").read_text()
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("campe-prompt-learning")
    run = client.get_run(rows[("attriprompt", 1)]["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["method"] == "attriprompt"
    assert {"base_acc", "novel_acc", "hm", "train/loss", "train/ce_fine"} <= set(run.data.metrics)
    assert len(client.search_runs([exp.experiment_id])) == 6
    ckpt = project / "out" / "base2new" / "attriprompt" / "Toy" / "seed1" / "prompt_learner.pt"
    stamp = ckpt.stat().st_mtime_ns
    capsys.readouterr()
    # a second train keeps the finished cells; eval reloads the checkpoints and gets the same numbers
    assert cli.main(["prompt-learn", "train", "--params", str(params)]) == 0 and ckpt.stat().st_mtime_ns == stamp
    assert cli.main(["prompt-learn", "eval", "--params", str(params), "--methods", "attriprompt"]) == 0
    again = json.loads((metrics / "attriprompt" / "Toy" / "seed1.json").read_text())
    assert again["base_acc"] == rows[("attriprompt", 1)]["base_acc"]
    assert again["novel_acc"] == rows[("attriprompt", 1)]["novel_acc"]
    assert len(client.search_runs([exp.experiment_id])) == 6  # eval logs into the cell's run
    changed = _params(project, pool_size=5)  # a checkpoint of another config is refused, not half-loaded
    capsys.readouterr()
    assert cli.main(["prompt-learn", "eval", "--params", str(changed), "--methods", "attriprompt"]) == 1
    assert "prompt_learner.pt: trained under another prompt_learn config" in capsys.readouterr().err
    assert client.get_run(rows[("attriprompt", 1)]["mlflow_run_id"]).info.status == "FINISHED"
    _params(project)  # the module's other tests use the original section


def test_prompt_learn_cross_protocol_and_a_bad_dg_target(project, capsys):
    params = _params(project, protocol="cross", methods=["coop"], seeds=[1])
    assert cli.main(["prompt-learn", "train", "--params", str(params)]) == 0
    row = json.loads((project / "metrics" / "cross" / "coop" / "Toy" / "seed1.json").read_text())
    assert set(row["xd"]) == {"Other"} and set(row["dg"]) == {"ToyShift"} and row["n_classes"] == 4
    assert row["xd_avg"] == row["xd"]["Other"] and row["dg_avg"] == row["dg"]["ToyShift"]
    assert math.isfinite(row["source_acc"])
    bad = _params(project, protocol="cross", methods=["zsclip"], seeds=[1], dg_targets=["Other"])
    assert cli.main(["prompt-learn", "train", "--params", str(bad)]) == 1
    assert "split_zhou_Other.json: a domain-generalisation target must have the source" in capsys.readouterr().err


def test_grid_epochs_flag_sets_one_budget_for_every_cell(project, tmp_path):
    """`--epochs` overrides the section's budget for every variant's cells: one budget for all."""
    params = _params(project, seeds=[1])
    out = tmp_path / "grid"
    assert cli.main(["prompt-learn", "grid", "--params", str(params), "--out", str(out), "--epochs", "2",
                     "--variants", "coop,attriprompt"]) == 0
    cells = sorted(out.glob("*/metrics/base2new/*/Toy/seed1.json"))
    assert {c.parts[-6] for c in cells} == {"coop", "attriprompt"}  # <variant>/metrics/base2new/<method>/Toy
    assert all(json.loads(c.read_text())["final_train"]["epoch"] == 2 for c in cells)  # the section says 1
    _params(project)


def test_prompt_learn_params_are_validated(project, capsys):
    params = _params(project, methods=["coop", "maple"])
    assert cli.main(["prompt-learn", "train", "--params", str(params)]) == 1
    assert "prompt_learn: methods: unknown ['maple']" in capsys.readouterr().err
    params.write_text(yaml.safe_dump({"prompt_learn": {"top_nn": 3}}))
    assert cli.main(["prompt-learn", "train", "--params", str(params)]) == 1
    assert "unknown key 'top_nn' (did you mean 'top_n'?)" in capsys.readouterr().err
