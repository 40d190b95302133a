"""The search page's model, image index and scoring (what `campe serve` shows), on the evaluation code paths.

    from campe.serve.index import load_model, list_images, ImageIndex, Searcher
    model = load_model("data/models/campe")               # NotACampeModel naming the folder and the fix
    paths = list_images("data/generated/dataset_karpathy.json")   # its test split; or a folder of images
    index = ImageIndex.load_or_build(model, "data/models/campe", paths)   # embedded once, cached beside the model
    s = Searcher(model, index)
    hits = s.search("a red circle", weights=[1.0, 0.5], top_k=8)  # [Hit(i, score, parts [K])], best first
    maps = s.maps(hits[0].i, "a red circle")             # [K, g, g] per-APT maps of that image

Scores are the ones `campe evaluate` ranks by: image embeddings from campe.embed.Embedder (the training
preprocessing), the caption's text embedding, and with aspect weights w [K] the re-weighted similarity
sum_k w_k <v_k, t_k> over the K contiguous D/K segments (campe.core.retrieval.segment_similarity; all ones = the
plain cosine). The model comes from campe.load (campe/api.py), as in Python use: `load_model` wraps it.

The index file is `<model folder>.serve-index/<key>.pt` (atomic), key = sha256 of the model's files (model.pt,
train_config.json) and of every image file (its path and bytes): a changed model or folder is indexed anew.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from campe.api import CONFIG, NotACampeModel, find_checkpoint, load  # NotACampeModel: campe.NotACampeModel itself
from campe.core.retrieval import aspect_scale, segment_similarity
from campe.data.imageprep import ImageDecodeError
from campe.embed import Embedder, aspect_maps, load_images
from campe.train.checkpoint import FINAL

INDEX_FORMAT = 2
MODEL_FILES = (FINAL, CONFIG)


class ImageSourceError(ValueError):
    """The image folder (or annotation file) is missing or holds no image campe can read."""


class QueryError(ValueError):
    """A query the page cannot answer (empty caption, bad aspect weights, an unknown image)."""


# ---------------------------------------------------------------------------------------------------- inputs

def load_model(model_dir: str | Path) -> torch.nn.Module:
    """The trained model in eval mode (CPU), opened by campe.load (a `campe train` out_dir or an MLflow Model
    folder). Anything that is not a campe model is one NotACampeModel line."""
    try:
        return load(model_dir).model
    except NotACampeModel:
        raise  # campe.load's message names the folder and the fix
    except Exception as e:  # noqa: BLE001 - bad JSON, torch.load errors, a state that does not fit, a missing LM
        raise NotACampeModel(f"{model_dir}: cannot be loaded as a campe model ({type(e).__name__}: {e}); pass "
                             f"--model the out_dir of a finished `campe train` (e.g. data/models/campe; `make repro` "
                             f"makes it)") from None


def list_images(source: str | Path, split: str = "test") -> list[str]:
    """The image files to index: every non-hidden file directly in a folder (sorted; the ones that do not decode
    are left out when indexing, and reported), or the `split` images of a Karpathy-split JSON."""
    p = Path(source)
    fix = "pass --images a folder of images or a Karpathy-split JSON (e.g. data/generated/dataset_karpathy.json)"
    if not p.exists():
        raise ImageSourceError(f"{p}: no such folder or file; {fix}")
    if p.is_file():
        if p.suffix.lower() != ".json":
            raise ImageSourceError(f"{p}: a single file; {fix}")
        from campe.data.evaldata import load_karpathy

        paths = load_karpathy(p, split=split).image_paths
        if not paths:
            raise ImageSourceError(f"{p}: no images of split '{split}'; pass --split another split")
        return paths
    files = sorted(str(f) for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
        subs = sorted(f.name for f in p.iterdir() if f.is_dir() and not f.name.startswith("."))
        hint = f" (it has the subfolders {', '.join(subs[:5])}: pass one of them)" if subs else ""
        raise ImageSourceError(f"{p}: no images in this folder{hint}; {fix}")
    return files


def content_key(model_dir: str | Path, paths: Sequence[str]) -> str:
    """sha256 over the model's files (in its checkpoint folder: campe.api.find_checkpoint) and every image file's
    path and bytes (hex)."""
    h = hashlib.sha256(f"campe-serve-index {INDEX_FORMAT}\n".encode())
    folder = find_checkpoint(model_dir)
    for name in MODEL_FILES:
        h.update(name.encode() + b"\0" + hashlib.sha256((folder / name).read_bytes()).digest())
    for path in tqdm(paths, desc="hash images", unit="file", disable=len(paths) < 2000):
        h.update(str(Path(path).resolve()).encode() + b"\0" + hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest()


def default_index_dir(model_dir: str | Path) -> Path:
    """`<model folder>.serve-index`, beside the model (not inside: the model folder is a DVC output)."""
    d = Path(model_dir).resolve()
    return d.parent / f"{d.name}.serve-index"


# ---------------------------------------------------------------------------------------------------- index

@dataclasses.dataclass
class ImageIndex:
    paths: list[str]            # the indexed (decodable) images, in listing order
    embeddings: torch.Tensor    # [N, D] L2-normalised image embeddings
    skipped: list[tuple[str, str]]  # (path, reason) of the files that are not images campe can read
    key: str
    file: Path
    from_cache: bool = False

    @classmethod
    def load_or_build(cls, model: torch.nn.Module, model_dir: str | Path, paths: Sequence[str],
                      index_dir: str | Path | None = None, batch_size: int = 64, progress: bool = True) -> ImageIndex:
        """The index of `paths` from its cache file when the key matches, else embedded (progress bar) and saved."""
        from campe.core.io import atomic_file

        key = content_key(model_dir, paths)
        file = Path(index_dir or default_index_dir(model_dir)) / f"{key[:20]}.pt"
        if file.is_file():
            try:
                saved = torch.load(file, map_location="cpu", weights_only=True)
                if saved.get("key") == key and saved.get("format") == INDEX_FORMAT:
                    # Rows by position in the listing (the key covers it), so paths stay as given this time
                    # (relative to this working directory), not as given when the index was made.
                    return cls([str(paths[i]) for i in saved["kept"]], saved["embeddings"],
                               [(str(paths[i]), why) for i, why in saved["skipped"]], key, file, from_cache=True)
            except Exception:  # noqa: BLE001 - an unreadable cache file is rebuilt, never trusted
                pass
        skipped: list[tuple[int, str]] = []  # (position in paths, reason)
        emb = Embedder(model, text_batch=lambda captions: captions, batch_size=batch_size, progress=progress)
        try:
            embeddings = emb.images(list(paths), lambda i, path, why: skipped.append((i, _short(why))))
        except ImageDecodeError:
            first = f" (first: {Path(paths[skipped[0][0]]).name}: {skipped[0][1]})" if skipped else ""
            raise ImageSourceError(f"{Path(paths[0]).parent}: none of its {len(paths)} files is an image campe can "
                                   f"read{first}; pass --images a folder of images") from None
        bad = {i for i, _ in skipped}
        kept = [i for i in range(len(paths)) if i not in bad]
        try:
            with atomic_file(file) as f:
                torch.save({"format": INDEX_FORMAT, "key": key, "kept": kept, "embeddings": embeddings,
                            "skipped": [[i, why] for i, why in skipped]}, f)
        except OSError as e:  # a read-only model folder: serve anyway, index again next time
            warnings.warn(f"cannot cache the image index in {file.parent} ({e.strerror or e}); it is rebuilt at "
                          f"the next start (pass --index-dir a writable folder)", stacklevel=2)
        return cls([str(paths[i]) for i in kept], embeddings, [(str(paths[i]), why) for i, why in skipped], key, file)


def _short(reason: str) -> str:
    """PIL's reason without the file object's repr (the page names the file already)."""
    return re.sub(r" <_io\.\w+ name=.*?>", "", reason)


# ---------------------------------------------------------------------------------------------------- scoring

@dataclasses.dataclass
class Hit:
    i: int              # index into ImageIndex.paths
    score: float        # sum_k w_k <v_k, t_k> (the cosine with all weights 1)
    parts: list[float]  # the K unweighted segment terms <v_k, t_k> ([] for a model without segments)


class Searcher:
    """Scores a caption against an ImageIndex (thread-safe: the page's requests may come in parallel)."""

    def __init__(self, model: torch.nn.Module, index: ImageIndex, text_batch: Callable[[list[str]], Any] = list,
                 cache_size: int = 64):
        self.model, self.index = model, index
        self.emb = Embedder(model, text_batch=text_batch, progress=False)
        self._lock = threading.Lock()
        self._texts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        with self._lock, torch.no_grad():
            seg = model.encode_text(text_batch(["a probe caption"])).get("segments")
        self.k: int | None = None if seg is None else int(seg.shape[1])  # K aspect segments (None: no prompts)

    def text(self, caption: str) -> torch.Tensor:
        """[D] text embedding of one caption (the last few are kept: a slider move does not re-encode)."""
        caption = caption.strip()
        if not caption:
            raise QueryError("type a caption to search for (the query is empty)")
        with self._lock:
            if caption not in self._texts:
                self._texts[caption] = self.emb.texts([caption])[0][0]
                while len(self._texts) > self._cache_size:
                    self._texts.popitem(last=False)
            self._texts.move_to_end(caption)
            return self._texts[caption]

    def check_weights(self, weights: Sequence[float] | None) -> list[float] | None:
        if weights is None or self.k is None:
            if weights is not None and len(weights):
                raise QueryError("this model's text tower gives no aspect segments: it takes no aspect weights")
            return None
        try:
            aspect_scale(self.index.embeddings.shape[1], list(weights), self.k)  # the evaluation's checks
        except ValueError as e:
            raise QueryError(f"aspect weights {list(weights)}: {e}") from None
        return [float(w) for w in weights]

    def search(self, caption: str, weights: Sequence[float] | None = None, top_k: int = 12) -> list[Hit]:
        """The top_k images for `caption`, best first (ties: listing order)."""
        scores, parts = self._score(self.index.embeddings, caption, weights)
        order = torch.sort(scores, descending=True, stable=True).indices[:max(1, int(top_k))]
        return [Hit(int(i), float(scores[i]), [] if parts is None else parts[i].tolist()) for i in order]

    def hit(self, i: int, caption: str, weights: Sequence[float] | None = None) -> Hit:
        """Image i's score and terms for `caption` (as `search` gives them)."""
        self.image_path(i)
        scores, parts = self._score(self.index.embeddings[i:i + 1], caption, weights)
        return Hit(i, float(scores[0]), [] if parts is None else parts[0].tolist())

    def _score(self, img: torch.Tensor, caption: str, weights: Sequence[float] | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> scores [N] and the unweighted segment terms [N, K] (None without segments) of img [N, D]."""
        weights = self.check_weights(weights)
        t = self.text(caption)
        if self.k is None:
            return img @ t, None
        scores = segment_similarity(img, t[None], self.k, weights)[:, 0]
        return scores, (img.view(len(img), self.k, -1) * t.view(self.k, -1)).sum(-1)

    def maps(self, i: int, caption: str) -> torch.Tensor:
        """[K, g, g] per-APT maps of image i for `caption` (campe.embed.aspect_maps, as evaluation draws them)."""
        if self.k is None:
            raise QueryError("this model's text tower gives no aspect segments: there are no per-APT maps")
        path = self.image_path(i)
        t = self.text(caption)
        with self._lock:
            patches = self.emb.patches([path])
        return aspect_maps(patches, t[None], self.k)[0]

    def image_path(self, i: int) -> str:
        if not 0 <= i < len(self.index.paths):
            raise QueryError(f"no image {i} in the index (it has {len(self.index.paths)})")
        return self.index.paths[i]

    def image_uint8(self, i: int) -> torch.Tensor:
        """[H, W, 3] uint8: image i as the model sees it (the training preprocessing)."""
        return load_images([self.image_path(i)], self.emb.image_size)[0].permute(1, 2, 0)
