"""`campe serve`: a local search page over an image folder with a trained model.

    campe serve                                   # model and images from params.yaml (evaluate.checkpoint, the
                                                  # first evaluate.image_sets entry's test split): the generated set
    campe serve --model data/models/campe --images ~/photos --port 8000
    # then open http://127.0.0.1:8000/ : type a caption, move the aspect sliders, click a hit for its per-APT maps

The folder is embedded once (progress bar) and cached beside the model (campe.serve.index); the page asks the
server for each ranking, so every number it shows is computed by the library (campe.serve.index.Searcher). Bound to
127.0.0.1 unless --host says otherwise: the page serves the files of the folder to whoever can reach it.

    from campe.serve.app import make_app          # the FastAPI app, for tests or another ASGI server
    app = make_app(searcher, model="data/models/campe", source="data/generated/dataset_karpathy.json")
"""
from __future__ import annotations

import argparse
import base64
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

HELP = "a local search page: type a caption, re-weight the aspects with sliders, see a hit's per-APT maps"

DEFAULT_MODEL = "data/models/campe"
DEFAULT_IMAGES = "data/generated/dataset_karpathy.json"


def _weights(w: str) -> list[float] | None:
    from campe.serve.index import QueryError

    if not w.strip():
        return None
    try:
        return [float(x) for x in w.split(",")]
    except ValueError:
        raise QueryError(f"aspect weights {w!r}: expected numbers separated by commas") from None


def _top_k(value: str, default: int) -> int:
    from campe.serve.index import QueryError

    try:
        k = int(value) if value.strip() else default
    except ValueError:
        k = 0
    if k < 1:
        raise QueryError(f"top {value!r}: expected a whole number of hits, 1 or more")
    return k


def _maps_png(searcher, i: int, caption: str) -> str:
    """The per-APT maps of image i as a PNG data URL (campe.plots.aspect_maps_grid, as evaluation draws them)."""
    from campe.plots import aspect_maps_grid

    maps = searcher.maps(i, caption)  # [K, g, g]
    names = [f"APT-{k + 1}" for k in range(len(maps))]
    with tempfile.TemporaryDirectory(prefix="campe-serve-") as tmp:
        out = Path(tmp) / "maps.png"
        aspect_maps_grid(searcher.image_uint8(i)[None].numpy(), maps[None].numpy(), names, out)
        return "data:image/png;base64," + base64.b64encode(out.read_bytes()).decode()


def make_app(searcher, model: str, source: str, top_k: int = 12):
    """The FastAPI app: the page (/), /api/info, /api/search, /api/maps/{i}, /image/{i}. A bad query is a JSON
    {"error": message} (status 400) that the page shows; an unexpected failure is one line, never a traceback."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    from campe.serve.index import QueryError
    from campe.serve.page import PAGE

    app = FastAPI(title="campe search", docs_url=None, redoc_url=None, openapi_url=None)
    index, default_k = searcher.index, top_k

    def answer(fn: Callable[[], Any]):
        try:
            return fn()
        except QueryError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except Exception as e:  # noqa: BLE001 - the page shows one line; the console gets the same line
            print(f"campe serve: {type(e).__name__}: {e}", file=sys.stderr)
            return JSONResponse({"error": f"the server failed: {type(e).__name__}: {e}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/info")
    def info() -> dict:
        return {"model": model, "source": source, "images": len(index.paths), "k": searcher.k, "top_k": top_k,
                "skipped": [[Path(p).name, why] for p, why in index.skipped], "index_file": str(index.file)}

    @app.get("/api/search")
    def search(q: str = "", w: str = "", top_k: str = ""):
        def run() -> dict:
            hits = searcher.search(q, _weights(w), _top_k(top_k, default_k))
            return {"hits": [{"id": h.i, "name": Path(index.paths[h.i]).name, "score": h.score, "parts": h.parts}
                             for h in hits]}
        return answer(run)

    @app.get("/api/maps/{i}")
    def maps(i: int, q: str = "", w: str = ""):
        def run() -> dict:
            weights = searcher.check_weights(_weights(w)) or [1.0] * (searcher.k or 0)
            hit = searcher.hit(i, q, weights)
            png = _maps_png(searcher, i, q)
            return {"png": png, "names": [f"APT-{k + 1}" for k in range(searcher.k)], "parts": hit.parts,
                    "weights": weights,
                    "caption": f"Map k: the similarity of each image patch's segment k with segment k of the caption "
                               f"\u201c{q.strip()}\u201d (APT-k's part of the text embedding), each map scaled to its "
                               f"own min..max (blue low, red high). The table gives the image's terms <v_k, t_k>."}
        return answer(run)

    @app.get("/image/{i}")
    def image(i: int):
        return answer(lambda: FileResponse(searcher.image_path(i)))

    return app


# ------------------------------------------------------------------------------------------------ command

def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help=f"a `campe train` out_dir (default: evaluate.checkpoint of --params, else "
                                    f"{DEFAULT_MODEL})")
    ap.add_argument("--images", help="a folder of images, or a Karpathy-split JSON (its --split images); default: "
                                     f"the first evaluate.image_sets entry of --params, else {DEFAULT_IMAGES}")
    ap.add_argument("--split", help="the split of a Karpathy-split JSON (default: evaluate.karpathy_split, else test)")
    ap.add_argument("--params", default="params.yaml", help="where the defaults come from (if the file exists)")
    ap.add_argument("--index-dir", help="where the image index is cached (default: <model folder>.serve-index)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--top-k", type=int, default=12, help="hits shown (the page can change it)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per batch when indexing")


def _defaults(args: argparse.Namespace) -> tuple[str, str, str]:
    """(model, images, split) from the flags, else params' evaluate section, else the generated set's paths."""
    ev: dict[str, Any] = {}
    if os.path.exists(args.params):
        from campe.core.config import read_yaml

        ev = read_yaml(args.params).get("evaluate") or {}
    sets = ev.get("image_sets") or {}
    images = args.images or (next(iter(sets.values())) if sets else DEFAULT_IMAGES)
    return args.model or ev.get("checkpoint") or DEFAULT_MODEL, images, args.split or ev.get("karpathy_split", "test")


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); pass --port another port") from None


def run(args: argparse.Namespace) -> int:
    from campe.serve.index import ImageIndex, Searcher, list_images, load_model

    model_dir, images, split = _defaults(args)
    _check_port(args.host, args.port)
    paths = list_images(images, split)  # before the model: a wrong folder is said at once
    model = load_model(model_dir)
    print(f"campe serve: indexing {len(paths)} files of {images} with {model_dir}", file=sys.stderr)
    index = ImageIndex.load_or_build(model, model_dir, paths, args.index_dir, batch_size=args.batch_size,
                                     progress=os.environ.get("CAMPE_NO_PROGRESS") != "1")
    print(f"campe serve: {len(index.paths)} images indexed ({'from the cache ' if index.from_cache else ''}"
          f"{index.file})", file=sys.stderr)
    for path, why in index.skipped:
        print(f"campe serve: left out {path}: not an image campe can read ({why})", file=sys.stderr)
    searcher = Searcher(model, index)
    app = make_app(searcher, model=str(model_dir), source=str(images), top_k=args.top_k)
    import uvicorn

    print(f"campe serve: open http://{args.host}:{args.port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
