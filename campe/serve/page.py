"""The search page (one HTML document, no external assets: it works offline). Filled in by campe.serve.app."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>campe search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; }
  header p { margin: 0.2em 0; color: #555; font-size: 0.9em; }
  form { margin: 0.8em 0; }
  #query { width: 32em; font-size: 1em; padding: 0.3em; }
  #weights { display: flex; flex-wrap: wrap; gap: 0.4em 1.4em; margin: 0.6em 0; }
  #weights label { font-size: 0.9em; }
  .notice { background: #fff7e0; border: 1px solid #e0c060; padding: 0.4em 0.6em; margin: 0.5em 0; font-size: 0.9em; }
  #message { color: #b00020; font-weight: 600; min-height: 1.2em; }
  #results { display: flex; flex-wrap: wrap; gap: 0.8em; }
  figure.hit { margin: 0; padding: 0.3em; border: 2px solid #ddd; cursor: pointer; text-align: center; }
  figure.hit:hover, figure.hit.selected { border-color: #3182bd; }
  figure.hit img { width: 128px; height: 128px; image-rendering: pixelated; object-fit: contain; }
  figcaption { font-size: 0.8em; max-width: 132px; overflow-wrap: anywhere; }
  #maps img { max-width: 100%; image-rendering: pixelated; }
  #maps table { border-collapse: collapse; font-size: 0.85em; margin-top: 0.4em; }
  #maps td, #maps th { border: 1px solid #ccc; padding: 0.15em 0.5em; text-align: right; }
</style>
</head>
<body>
<header>
  <h1>campe search</h1>
  <p>model <code id="model"></code> &middot; <span id="count"></span> images from <code id="source"></code></p>
  <p id="about-weights"></p>
</header>
<div id="skipped" class="notice" hidden></div>
<form id="search-form">
  <input id="query" name="q" type="search" placeholder="type a caption, e.g. a red circle on a striped background"
         autocomplete="off" autofocus>
  <label>top <input id="topk" name="top_k" type="number" min="1" value="12" style="width: 4em"></label>
  <button id="search" type="submit">search</button>
</form>
<div id="weights"></div>
<div id="message" role="alert"></div>
<div id="results"></div>
<section id="maps" hidden></section>
<script>
"use strict";
let info = null, seq = 0, selected = null;
const $ = (id) => document.getElementById(id);

function weights() {
  return Array.from(document.querySelectorAll("#weights input")).map((s) => s.value).join(",");
}
function params(extra) {
  const p = new URLSearchParams({q: $("query").value, w: weights(), ...extra});
  return p.toString();
}
function say(msg) { $("message").textContent = msg || ""; }

async function getJSON(url) {
  let r;
  try { r = await fetch(url); } catch (e) { return {error: "the server does not answer (is campe serve running?)"}; }
  try { return await r.json(); } catch (e) { return {error: `the server answered ${r.status} without a result`}; }
}

async function search() {
  const mine = ++seq;
  const res = await getJSON("/api/search?" + params({top_k: $("topk").value}));
  if (mine !== seq) return;  // a newer query (a slider moved again) is on its way
  document.body.dataset.seq = mine;  // the answer to query `mine` is on the page (the tests wait for it)
  if (res.error || !res.hits) { say(res.error || "the server gave no hits"); $("results").replaceChildren(); return; }
  say("");
  const figs = res.hits.map((h, r) => {
    const f = document.createElement("figure");
    f.className = "hit";
    f.dataset.id = h.id; f.dataset.name = h.name; f.dataset.score = h.score;
    const img = document.createElement("img");
    img.src = `/image/${h.id}`; img.alt = h.name;
    const cap = document.createElement("figcaption");
    cap.textContent = `#${r + 1} ${h.name} · ${h.score.toFixed(4)}`;
    f.append(img, cap);
    f.addEventListener("click", () => showMaps(h, f));
    return f;
  });
  $("results").replaceChildren(...figs);
}

async function showMaps(hit, fig) {
  document.querySelectorAll("figure.hit.selected").forEach((f) => f.classList.remove("selected"));
  fig.classList.add("selected");
  const res = await getJSON(`/api/maps/${hit.id}?` + params({}));
  const box = $("maps");
  if (res.error || !res.png) { say(res.error || "the server gave no maps"); box.hidden = true; return; }
  say("");
  const h = document.createElement("h2");
  h.textContent = `per-APT maps: ${hit.name}`;
  const p = document.createElement("p");
  p.textContent = res.caption;
  const img = document.createElement("img");
  img.id = "maps-img"; img.alt = `per-APT maps of ${hit.name}`; img.src = res.png;
  const table = document.createElement("table");
  table.innerHTML = "<tr><th>aspect</th><th>&lt;v_k, t_k&gt;</th><th>weight</th><th>weighted</th></tr>";
  res.names.forEach((n, k) => {
    const tr = table.insertRow();
    [n, res.parts[k].toFixed(4), res.weights[k].toFixed(2), (res.parts[k] * res.weights[k]).toFixed(4)]
      .forEach((v) => { tr.insertCell().textContent = v; });
  });
  box.replaceChildren(h, p, img, table);
  box.hidden = false;
}

function sliders(k) {
  const box = $("weights");
  for (let i = 0; i < k; i++) {
    const label = document.createElement("label");
    const s = document.createElement("input");
    s.type = "range"; s.min = "0"; s.max = "2"; s.step = "0.1"; s.value = "1";
    s.id = `w${i + 1}`; s.setAttribute("aria-label", `weight of APT-${i + 1}`);
    const out = document.createElement("output");
    out.textContent = "1.0";
    s.addEventListener("input", () => {
      out.textContent = Number(s.value).toFixed(1);
      if ($("query").value.trim()) search();
    });
    label.append(`APT-${i + 1} `, s, " ", out);
    box.append(label);
  }
}

async function start() {
  info = await getJSON("/api/info");
  if (info.error) { say(info.error); return; }
  $("model").textContent = info.model;
  $("source").textContent = info.source;
  $("count").textContent = info.images;
  $("topk").value = info.top_k;
  $("about-weights").textContent = info.k
    ? `${info.k} aspect segments: each slider weights one segment's term in sum_k w_k <v_k, t_k> (all 1 = cosine).`
    : "This model's text tower has no aspect segments: plain cosine similarity, no sliders, no maps.";
  sliders(info.k || 0);
  if (info.skipped.length) {
    const box = $("skipped");
    box.textContent = `${info.skipped.length} file(s) left out, not images campe can read: ` +
      info.skipped.map((s) => `${s[0]} (${s[1]})`).join("; ");
    box.hidden = false;
  }
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  document.body.dataset.ready = "1";
}
start();
</script>
</body>
</html>
"""
