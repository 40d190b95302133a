"""Pretrain the small frozen CLIP of the embedded AttriPrompt benchmark: a transformers `CLIPModel` from scratch.

    from campe.pretrain_clip import PretrainClipParams, pretrain_clip
    summary = pretrain_clip(PretrainClipParams(), fewshot_root="data/fewshot", out_dir="data/models/clip")
    # then, anywhere: CLIPModel.from_pretrained(out), AutoTokenizer.from_pretrained(out),
    #                 CLIPImageProcessor.from_pretrained(out)

No CLIP checkpoint can be had offline, so the pipeline makes one the way CLIP was made, at toy scale: a ViT image
tower and a causal text tower trained with campe's contrastive loss (campe.core.losses.ClipLoss, CLIP's symmetric
InfoNCE with a learnable temperature) on generated image-caption pairs (campe.data.synth_pretrain) that are disjoint
from every few-shot image by pixel hash. The tokenizer is a byte-pair encoding trained with `tokenizers` on the
captions: <bos> caption <eos>, padded with <pad>; eos_token_id is 3 (not 2: transformers' CLIP treats 2 as the legacy
"argmax id" convention), so `get_text_features` pools the first <eos>. The folder is written atomically (a temp
folder renamed into place): a killed run leaves the old folder or none, never a partial one. metrics.json in the
folder holds the training curve summary and the zero-shot accuracy on each few-shot set's test split.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from campe.core.io import atomic_dir, atomic_write_json
from campe.core.losses import ClipLoss
from campe.core.threads import torch_threads

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"  # ids 0, 1, 2, 3
MEAN, STD = 0.5, 0.5  # pixel normalisation ((x/255 - 0.5) / 0.5), saved in the image processor


@dataclass
class PretrainClipParams:
    """The small CLIP and its pretraining (params.yaml section `pretrain_clip`)."""

    seed: int = 0
    pairs: int = 12000  # generated images, each with ~8 captions (one drawn per epoch)
    image_size: int = 32
    patch_size: int = 8
    width: int = 96  # both towers
    vision_layers: int = 3
    text_layers: int = 2
    heads: int = 4
    embed_dim: int = 128
    context_length: int = 32
    vocab_size: int = 320  # BPE target; the captions' words need ~100
    epochs: int = 16
    batch_size: int = 64
    lr: float = 0.002
    weight_decay: float = 0.05
    warmup_steps: int = 20
    threads: int = 2  # torch intra-op threads (0: torch's default)
    prompt: str = "a photo of a {}."  # zero-shot class prompt

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        for name in ("pairs", "epochs", "batch_size", "vision_layers", "text_layers", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.batch_size > self.pairs:
            raise ValueError(f"batch_size {self.batch_size} is larger than pairs {self.pairs}")
        if "{}" not in self.prompt:
            raise ValueError(f"prompt must contain {{}} (the class name), got {self.prompt!r}")


# ------------------------------------------------------------------------------------------------------ tokenizer
def build_tokenizer(texts: list[str], vocab_size: int, context_length: int):
    """A BPE tokenizer trained on `texts`, as a transformers fast tokenizer: lower-cased, <bos> ... <eos>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK, BOS, EOS],
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[
        (BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   model_max_length=context_length)


def build_model(p: PretrainClipParams, vocab_size: int):
    """A CLIPModel sized by `p`; text eos/bos/pad ids match build_tokenizer's."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(p.seed)
    common = dict(hidden_size=p.width, intermediate_size=4 * p.width, num_attention_heads=p.heads)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, num_hidden_layers=p.text_layers, max_position_embeddings=p.context_length,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, **common),
        vision_config=dict(image_size=p.image_size, patch_size=p.patch_size, num_hidden_layers=p.vision_layers,
                           **common),
        projection_dim=p.embed_dim)
    return CLIPModel(cfg)


def image_processor(p: PretrainClipParams):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": p.image_size}, crop_size={"height": p.image_size,
                              "width": p.image_size}, image_mean=[MEAN] * 3, image_std=[STD] * 3)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W], normalised as the saved image processor does."""
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255.0  # a copy: decoded images are read-only
    return (x - MEAN) / STD


def text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B,L] ids -> [B,D] L2-normalised (transformers' own end-of-text pooling and projection)."""
    return F.normalize(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output,
                       dim=-1)


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] normalised pixels -> [B,D] L2-normalised."""
    return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)


# ------------------------------------------------------------------------------------------------------- training
def _lr_at(step: int, total: int, p: PretrainClipParams) -> float:
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    t = (step - p.warmup_steps) / max(1, total - p.warmup_steps)
    return p.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))  # cosine down to lr/10


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)  # <pad> = 0
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def train(model, images: np.ndarray, caption_ids: list[list[list[int]]], p: PretrainClipParams,
          progress: bool = False) -> list[float]:
    """Contrastive pretraining; each epoch draws one of each image's captions. Returns the loss per step."""
    from tqdm import tqdm

    n, B = len(images), p.batch_size
    per_epoch = n // B  # drop_last: every batch full
    total = p.epochs * per_epoch
    decay = [q for q in model.parameters() if q.ndim >= 2]
    rest = [q for q in model.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=p.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(p.seed)
    curve: list[float] = []
    model.train()
    with tqdm(total=total, desc="pretrain clip", unit="step", disable=not progress) as bar:
        for _ in range(p.epochs):
            order = torch.randperm(n, generator=gen).tolist()
            pick = torch.randint(0, 1 << 30, (n,), generator=gen).tolist()
            for b in range(per_epoch):
                idx = order[b * B:(b + 1) * B]
                ids, mask = _pad([caption_ids[i][pick[i] % len(caption_ids[i])] for i in idx])
                for g in opt.param_groups:
                    g["lr"] = _lr_at(len(curve), total, p)
                img = image_features(model, to_pixels(images[idx]))
                txt = text_features(model, ids, mask)
                scale = model.logit_scale.exp().clamp(max=100.0)
                loss = loss_fn(img, txt, scale)["contrastive_loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                curve.append(loss.item())
                bar.set_postfix(loss=f"{curve[-1]:.3f}")
                bar.update()
    model.eval()
    return curve


# ------------------------------------------------------------------------------------------------------ zero-shot
@torch.no_grad()
def zero_shot(model, tokenizer, folder: str | Path, prompt: str, batch: int = 512) -> dict[str, Any]:
    """Zero-shot top-1 (%) on a CoOp-format set's test split: all classes; base images among base classes and novel
    among novel (CoOp's sorted-label half split); HM; chance."""
    from PIL import Image

    folder = Path(folder)
    split = json.loads(next(folder.glob("split_zhou_*.json")).read_text())
    names: dict[int, str] = {}
    for _, label, name in split["train"] + split["val"] + split["test"]:
        names[int(label)] = name
    n_cls = max(names) + 1
    enc = tokenizer([prompt.format(names[i]) for i in range(n_cls)], padding=True, return_tensors="pt")
    txt = text_features(model, enc["input_ids"], enc["attention_mask"])
    rows = split["test"]
    labels = torch.tensor([int(r[1]) for r in rows])
    feats = []
    for s in range(0, len(rows), batch):
        arr = np.stack([np.asarray(Image.open(folder / "images" / r[0]).convert("RGB")) for r in rows[s:s + batch]])
        feats.append(image_features(model, to_pixels(arr)))
    sims = torch.cat(feats) @ txt.T  # [N, C]
    n_base = (n_cls + 1) // 2
    base, novel = labels < n_base, labels >= n_base

    def acc(mask: torch.Tensor, cols: slice) -> float:
        pred = sims[mask][:, cols].argmax(1) + (cols.start or 0)
        return round(100.0 * float((pred == labels[mask]).float().mean()), 2) if mask.any() else float("nan")

    b, nv = acc(base, slice(0, n_base)), acc(novel, slice(n_base, n_cls))
    return {"classes": n_cls, "test_images": len(rows), "accuracy": acc(labels >= 0, slice(0, n_cls)),
            "chance": round(100.0 / n_cls, 2), "base": b, "novel": nv,
            "hm": round(2 * b * nv / (b + nv), 2) if b + nv > 0 else 0.0}


# -------------------------------------------------------------------------------------------------- the whole run
def pretrain_clip(p: PretrainClipParams, fewshot_root: str | Path, out_dir: str | Path,
                  progress: bool = False) -> dict[str, Any]:
    """Generate the pairs (skipping few-shot images), train the tokenizer and the model, evaluate zero-shot on every
    set under `fewshot_root`, and write the three save_pretrained parts + metrics.json (no timings) into `out_dir` atomically. Returns the
    metrics with the timings ("seconds")."""
    p.validate()
    with torch_threads(p.threads):  # restored after: the stage also runs in-process in the flows
        return _pretrain_clip(p, fewshot_root, out_dir, progress)


def _pretrain_clip(p: PretrainClipParams, fewshot_root: str | Path, out_dir: str | Path,
                   progress: bool) -> dict[str, Any]:
    from campe.data.synth_fewshot import fewshot_pixel_hashes
    from campe.data.synth_pretrain import pretrain_pairs

    t0, c0 = time.perf_counter(), time.process_time()
    root = Path(fewshot_root)
    exclude = fewshot_pixel_hashes(root)
    images, captions, skipped = pretrain_pairs(p.seed, p.pairs, p.image_size, exclude, progress)
    t_data = time.perf_counter() - t0
    tokenizer = build_tokenizer([c for caps in captions for c in caps], p.vocab_size, p.context_length)
    longest = max(len(tokenizer(c)["input_ids"]) for caps in captions for c in caps)
    if longest > p.context_length:
        raise ValueError(f"a caption has {longest} tokens, more than context_length {p.context_length}: raise it")
    caption_ids = [[tokenizer(c)["input_ids"] for c in caps] for caps in captions]
    model = build_model(p, len(tokenizer))
    curve = train(model, images, caption_ids, p, progress)
    t_train, c_train = time.perf_counter() - t0 - t_data, time.process_time() - c0
    sets = sorted(d.parent for d in root.glob("*/split_zhou_*.json"))
    zs = {d.name: zero_shot(model, tokenizer, d, p.prompt) for d in sets}
    summary = {"params": dataclasses.asdict(p), "pairs": len(captions), "skipped_as_fewshot": skipped,
               "excluded_hashes": len(exclude), "vocab_size": len(tokenizer), "steps": len(curve),
               "loss_first": round(float(np.mean(curve[:10])), 4), "loss_last": round(float(np.mean(curve[-10:])), 4),
               "logit_scale": round(model.logit_scale.exp().item(), 3),
               "parameters": sum(q.numel() for q in model.parameters()), "zero_shot": zs,
               "seconds": {"data": round(t_data, 1), "train": round(t_train, 1),
                           "total": round(time.perf_counter() - t0, 1),
                           "cpu_until_trained": round(c_train, 1), "cpu_total": round(time.process_time() - c0, 1)}}
    # Timings are records of the run, not of the model: they go to the caller, not into the (DVC-hashed) folder.
    _save(model, tokenizer, image_processor(p), {k: v for k, v in summary.items() if k != "seconds"}, Path(out_dir))
    return summary


def _save(model, tokenizer, processor, summary: dict[str, Any], out: Path) -> None:
    with atomic_dir(out) as tmp:  # the caller holds the folder's lock
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / "metrics.json", summary)
