"""`campe serve`: the image index and its cache, scoring against the plain computation, bad input as one clear line,
and the page itself in a real headless browser (Debian's /usr/bin/chromium driven by Playwright) against a real
server process (one per module) with a tiny multi-prompt model trained here.

Every score the page shows is checked against sum_k w_k <v_k, t_k> computed in this file from the model's own
encode_image / encode_text (ties: scores within 1e-5 may come in either order).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from campe.embed import load_images
from campe.serve.index import (ImageIndex, ImageSourceError, NotACampeModel, QueryError, Searcher,
                               default_index_dir, list_images, load_model)

pytestmark = pytest.mark.usefixtures("one_thread")

BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
K = 4
TIE = 1e-5


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def trained(tiny_generated, tiny_lm, tmp_path_factory) -> Path:
    """A multi-prompt model (K=4 over a 2-layer BERT, tiny towers) trained 20 steps on the generated train split."""
    from campe.data.evaldata import load_karpathy
    from campe.train.loop import train
    from campe.train.run_config import resolve_run_config
    from campe.train.sources import MemoryPairs

    _, root = tiny_generated
    out = tmp_path_factory.mktemp("serve_model") / "campe"
    ds = load_karpathy(root / "dataset_karpathy.json", split="train")
    images = load_images(ds.image_paths, 32)[torch.tensor(ds.txt_to_img)]
    cfg = resolve_run_config({
        "model": dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, embed_dim=64, frames=4),
        "loss": {"lambda_div": 0.1, "lambda_neg": 0.1},
        "text_encoder": dict(model_path=tiny_lm, k=K, defo_tokens=4, max_length=48),
        "train": {"method": "multi_prompt_div_neg", "out_dir": str(out), "batch_size": 16, "steps": 20,
                  "warmup_steps": 2, "lr": 2e-3, "tracking_uri": "", "metrics_file": "", "progress": False}})
    train(cfg, source=MemoryPairs(images, ds.captions))
    return out


@pytest.fixture(scope="module")
def folder(tiny_generated, tmp_path_factory) -> Path:
    """The generated images (every split) and one file that is not an image."""
    _, root = tiny_generated
    d = tmp_path_factory.mktemp("serve_images") / "images"
    shutil.copytree(root / "images", d)
    (d / "notes.txt").write_text("not an image\n")
    return d


@pytest.fixture(scope="module")
def reference(trained, folder):
    """The plain computation: (model, {name: image embedding [D]}, caption -> text embedding [D])."""
    from campe.train.checkpoint import load_trained_model

    model, _ = load_trained_model(trained)
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")
    with torch.no_grad():
        img = model.encode_image(load_images(paths, 32))
    embs = {p.name: v for p, v in zip(paths, img)}

    def text(caption: str) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_text([caption])["text"][0]
    return model, embs, text


def ref_scores(reference, caption: str, weights) -> dict[str, float]:
    """{image name: sum_k w_k <v_k, t_k>}, written out per segment."""
    _, embs, text = reference
    t = text(caption)
    s = t.numel() // K
    return {n: sum(float(weights[k]) * float(v[k * s:(k + 1) * s] @ t[k * s:(k + 1) * s]) for k in range(K))
            for n, v in embs.items()}


def assert_ranking(names: list[str], scores: list[float], ref: dict[str, float]) -> None:
    """The hits are the reference's top len(names), best first, each with its reference score (ties aside)."""
    assert scores == pytest.approx([ref[n] for n in names], abs=TIE)
    assert all(a >= b - TIE for a, b in zip(scores, scores[1:])), scores
    best = sorted(ref.values(), reverse=True)
    cut = best[len(names) - 1]
    assert all(ref[n] >= cut - TIE for n in names)  # nothing better was left out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "CAMPE_NO_PROGRESS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def server(trained, folder, tmp_path_factory):
    """`campe serve` in a process of its own, with its defaults but --model/--images/--port (so: host 127.0.0.1)."""
    port = _free_port()
    work = tmp_path_factory.mktemp("serve_run")
    log = open(work / "serve.log", "w+")
    proc = subprocess.Popen([str(BIN / "campe"), "serve", "--model", str(trained), "--images", str(folder),
                             "--port", str(port)], cwd=work, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/api/info", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"campe serve did not come up (rc {proc.poll()}):\n{log.read()[-3000:]}")
                time.sleep(0.3)
        yield url, port, work / "serve.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium under Playwright (skipped where it is not installed; CI installs it: `make test`)."""
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing on CI: `make setup` installs Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is missing: `make setup` as root (or apt-get install chromium) installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the server, loaded; fails the test on any JavaScript error."""
    pg = browser.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server[0] + "/")
    pg.wait_for_selector("body[data-ready='1']", timeout=20_000)
    yield pg
    pg.close()
    assert not errors, errors


def _hits(pg) -> tuple[list[str], list[float]]:
    figs = pg.locator("figure.hit")
    names = [figs.nth(i).get_attribute("data-name") for i in range(figs.count())]
    return names, [float(figs.nth(i).get_attribute("data-score")) for i in range(figs.count())]


def _search(pg, caption: str) -> None:
    seq = int(pg.evaluate("document.body.dataset.seq || 0"))
    pg.fill("#query", caption)
    pg.press("#query", "Enter")
    pg.wait_for_function("s => Number(document.body.dataset.seq || 0) > s", arg=seq, timeout=20_000)


# ------------------------------------------------------------------------------------------------ the page

CAPTION = "a small red circle on a striped blue background"


def test_search_then_a_slider_reranks_live_then_a_hit_shows_its_per_apt_maps(page, reference):
    pg = page
    assert pg.locator("#weights input[type=range]").count() == K
    assert "notes.txt" in pg.inner_text("#skipped")  # the non-image file: named on the page, left out
    _search(pg, CAPTION)
    names, scores = _hits(pg)
    assert len(names) == 12 and pg.inner_text("#message") == ""
    assert_ranking(names, scores, ref_scores(reference, CAPTION, [1.0] * K))

    # Which aspect's slider, set to 0, changes the top hits (the plain computation says; it must change some).
    ones = ref_scores(reference, CAPTION, [1.0] * K)
    top = sorted(ones, key=ones.get, reverse=True)[:3]
    moved = None
    for j in range(K):
        w = [1.0] * K
        w[j] = 0.0
        ref = ref_scores(reference, CAPTION, w)
        order = sorted(ref, key=ref.get, reverse=True)
        if order[:3] != top and all(ref[a] - ref[b] > 1e-4 for a, b in zip(order[:4], order[1:4])):
            moved, expected = j, ref
            break
    assert moved is not None, "no single aspect changes the top 3 with a clear margin: retrain the tiny model"
    seq = int(pg.evaluate("document.body.dataset.seq"))
    pg.locator(f"#w{moved + 1}").press("Home")  # the keyboard moves the slider to 0: an `input` event, as a drag
    pg.wait_for_function("s => Number(document.body.dataset.seq) > s", arg=seq, timeout=20_000)
    new_names, new_scores = _hits(pg)
    assert new_names[:3] != names[:3]
    assert_ranking(new_names, new_scores, expected)

    pg.locator("figure.hit").first.click()
    pg.wait_for_selector("#maps-img", timeout=20_000)
    pg.wait_for_function("document.getElementById('maps-img').complete && "
                         "document.getElementById('maps-img').naturalWidth > 0", timeout=20_000)
    assert new_names[0] in pg.inner_text("#maps h2")
    assert "segment k of the caption" in pg.inner_text("#maps p")
    rows = pg.locator("#maps table tr")
    assert rows.count() == K + 1
    _, embs, text = reference
    t, v, s = text(CAPTION), embs[new_names[0]], 64 // K
    for k in range(K):
        cells = [rows.nth(k + 1).locator("td").nth(c).inner_text() for c in range(4)]
        assert cells[0] == f"APT-{k + 1}"
        assert float(cells[1]) == pytest.approx(float(v[k * s:(k + 1) * s] @ t[k * s:(k + 1) * s]), abs=1e-4)
        assert float(cells[2]) == (0.0 if k == moved else 1.0)


def test_bad_queries_get_a_message_on_the_page_never_a_traceback(page, server):
    import json
    import urllib.error

    pg = page
    _search(pg, "   ")
    assert "query is empty" in pg.inner_text("#message")
    assert pg.locator("figure.hit").count() == 0
    _search(pg, CAPTION)
    assert pg.locator("figure.hit").count() == 12 and pg.inner_text("#message") == ""
    # The page's number field refuses 0 itself; the server says why to anyone who asks anyway.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{server[0]}/api/search?q=a+circle&top_k=0", timeout=20)
    assert e.value.code == 400 and "expected a whole number of hits" in json.loads(e.value.read())["error"]
    pg.fill("#topk", "5")
    _search(pg, CAPTION)
    assert pg.locator("figure.hit").count() == 5 and pg.inner_text("#message") == ""
    for k in range(K):  # every weight at 0: no similarity left to rank by
        pg.locator(f"#w{k + 1}").press("Home")
    pg.wait_for_function("document.getElementById('message').textContent.includes('not all zero')", timeout=20_000)
    assert "Traceback" not in pg.content()


def test_the_server_binds_127_0_0_1_by_default(server):
    from campe.serve.app import add_arguments
    import argparse

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert ap.parse_args([]).host == "127.0.0.1"
    # The running server (started without --host): its listening socket in the kernel's table is loopback only.
    port = server[1]
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                listening.append((table, local.split(":")[0]))
    assert listening == [("/proc/net/tcp", "0100007F")], listening


# ------------------------------------------------------------------------------------------------ the library

def test_index_is_cached_beside_the_model_and_rebuilt_when_the_model_or_folder_changes(trained, folder, reference,
                                                                                          tmp_path, monkeypatch):
    trained = Path(shutil.copytree(trained, tmp_path / "models" / "campe"))  # no index beside it yet
    model = load_model(trained)
    paths = list_images(folder)
    first = ImageIndex.load_or_build(model, trained, paths, progress=False)
    assert not first.from_cache
    assert first.file.parent == default_index_dir(trained) == tmp_path / "models" / "campe.serve-index"
    assert [Path(p).name for p, _ in first.skipped] == ["notes.txt"] and "cannot identify" in first.skipped[0][1]
    assert len(first.paths) == len(paths) - 1
    _, embs, _ = reference
    assert torch.allclose(first.embeddings, torch.stack([embs[Path(p).name] for p in first.paths]), atol=1e-5)
    again = ImageIndex.load_or_build(model, trained, paths, progress=False)
    assert again.from_cache and again.key == first.key and torch.equal(again.embeddings, first.embeddings)
    assert again.paths == first.paths and again.skipped == first.skipped
    # From another working directory (paths given relative to it): the same index, the paths as given now.
    monkeypatch.chdir(folder.parent)
    rel = ImageIndex.load_or_build(model, trained, list_images(folder.name), progress=False)
    assert rel.from_cache and rel.key == first.key and rel.paths == [f"{folder.name}/{Path(p).name}" for p in
                                                                      first.paths]

    # A folder where the index cannot be written: served anyway, with a warning naming it and the fix.
    (tmp_path / "a_file").write_text("")
    with pytest.warns(UserWarning, match=r"cannot cache the image index in .*a_file/x .*pass --index-dir"):
        ro = ImageIndex.load_or_build(model, trained, paths, index_dir=tmp_path / "a_file" / "x", progress=False)
    assert torch.equal(ro.embeddings, first.embeddings)

    # A changed folder (one more image) is indexed anew.
    grown = tmp_path / "grown"
    shutil.copytree(folder, grown)
    shutil.copy(grown / "test_000000.jpg", grown / "zz_copy.jpg")
    g = ImageIndex.load_or_build(model, trained, list_images(grown), progress=False)
    assert not g.from_cache and len(g.paths) == len(first.paths) + 1 and g.key != first.key
    # A changed model (its image tower moved) is indexed anew, with its own embeddings.
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    state = torch.load(other / "model.pt", weights_only=True)
    state["model"]["visual.proj.weight"] += 0.05
    torch.save(state, other / "model.pt")
    o = ImageIndex.load_or_build(load_model(other), other, paths, progress=False)
    assert not o.from_cache and o.key != first.key and not torch.allclose(o.embeddings, first.embeddings)


def test_searcher_scores_are_the_reweighted_similarity_and_bad_queries_are_query_errors(trained, folder,
                                                                                          reference):
    model = load_model(trained)
    s = Searcher(model, ImageIndex.load_or_build(model, trained, list_images(folder), progress=False))
    assert s.k == K
    for w in ([1.0] * K, [2.0, 0.0, 0.5, 1.0]):
        hits = s.search(CAPTION, w, top_k=8)
        assert_ranking([Path(s.index.paths[h.i]).name for h in hits], [h.score for h in hits],
                       ref_scores(reference, CAPTION, w))
        for h in hits:
            assert h.score == pytest.approx(sum(a * b for a, b in zip(w, h.parts)), abs=1e-5)
    maps = s.maps(hits[0].i, CAPTION)
    assert maps.shape == (K, 4, 4)  # 32 px / patch 8
    # Map k at grid cell (r, c) is <segment k of patch r * 4 + c, segment k of the caption> (row-major patches).
    t = reference[2](CAPTION)
    with torch.no_grad():
        patches = model.encode_patches(load_images([s.index.paths[hits[0].i]], 32))[0]  # [P, D]
    for k in range(K):
        seg = slice(k * 16, (k + 1) * 16)
        for p in range(16):
            assert float(maps[k, p // 4, p % 4]) == pytest.approx(float(patches[p, seg] @ t[seg]), abs=1e-5)
    with pytest.raises(QueryError, match="query is empty"):
        s.search("  ")
    with pytest.raises(QueryError, match="not all zero"):
        s.search(CAPTION, [0.0] * K)
    with pytest.raises(QueryError, match="3 entries but k_segments=4"):
        s.search(CAPTION, [1.0] * 3)
    with pytest.raises(QueryError, match="no image 999"):
        s.maps(999, CAPTION)


def test_a_model_without_aspect_segments_ranks_by_the_cosine_and_has_no_sliders_or_maps(folder):
    from campe.model import build_model

    torch.manual_seed(0)
    model, _ = build_model("tiny")  # the vanilla text tower: no prompt segments
    paths = [p for p in list_images(folder) if p.endswith(".jpg")]
    with torch.no_grad():
        img = model.eval().encode_image(load_images(paths, 32))
        t = model.encode_text([CAPTION])["text"][0]
    s = Searcher(model, ImageIndex(paths, img, [], "no-key", folder / "unused.pt"))
    assert s.k is None
    hits = s.search(CAPTION, None, top_k=5)
    ref = {Path(p).name: float(v @ t) for p, v in zip(paths, img)}
    assert_ranking([Path(paths[h.i]).name for h in hits], [h.score for h in hits], ref)
    with pytest.raises(QueryError, match="no aspect segments: it takes no aspect weights"):
        s.search(CAPTION, [1.0, 1.0])
    with pytest.raises(QueryError, match="no aspect segments: there are no per-APT maps"):
        s.maps(0, CAPTION)


def test_bad_folders_and_models_are_one_clear_error(trained, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(ImageSourceError, match=r"no images in this folder \(it has the subfolders sub: pass one"):
        list_images(empty)
    with pytest.raises(ImageSourceError, match="no such folder or file"):
        list_images(tmp_path / "nowhere")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(ImageSourceError, match=r"none of its 1 files is an image campe can read \(first: a.jpg"):
        ImageIndex.load_or_build(load_model(trained), trained, list_images(junk), index_dir=tmp_path / "ix",
                                 progress=False)
    with pytest.raises(NotACampeModel, match=r"is not a campe model: it has no model.pt and train_config.json; give "
                                             r"the out_dir of a finished `campe train`"):
        load_model(junk)  # campe.load's message (serve opens the model with campe.load)
    import campe
    assert NotACampeModel is campe.NotACampeModel
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "model.pt").write_bytes(b"garbage")
    with pytest.raises(NotACampeModel, match="cannot be loaded as a campe model"):
        load_model(broken)


@pytest.mark.parametrize("case, message", [
    ("model", "is not a campe model: it has no model.pt and train_config.json"),
    ("images", "no images in this folder"),
    ("port", "pass --port another port"),
])
def test_bad_input_at_start_up_is_one_line_without_a_traceback(case, message, trained, folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1] if case == "port" else _free_port()
    model, images = (empty, folder) if case == "model" else (trained, empty)
    args = ["--model", str(model), "--images", str(images), "--port", str(port)]
    with busy:
        r = subprocess.run([str(BIN / "campe"), "serve", *args], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("campe serve: error: ")


def test_defaults_come_from_params_evaluate_section(tiny_generated, tmp_path):
    """No flags: the model and images of params.yaml's evaluate section (the generated test split)."""
    import argparse

    from campe.serve.app import _defaults, add_arguments
    from tests.tiny_config import write_tiny_params

    _, root = tiny_generated
    write_tiny_params(tmp_path / "params.yaml", root=tmp_path)
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    model, images, split = _defaults(ap.parse_args(["--params", str(tmp_path / "params.yaml")]))
    assert (model, images, split) == (str(tmp_path / "data/models/campe"),
                                      str(tmp_path / "data/generated/dataset_karpathy.json"), "test")
    # The generated set's test split, as a folder would list them.
    shown = list_images(root / "dataset_karpathy.json", split)
    assert sorted(Path(p).name for p in shown) == sorted(p.name for p in (root / "images").glob("test_*.jpg"))
    assert _defaults(ap.parse_args(["--params", str(tmp_path / "none.yaml")]))[:2] == (
        "data/models/campe", "data/generated/dataset_karpathy.json")
