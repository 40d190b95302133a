"""Tiny AttriPrompt fixtures built in code: a random CLIP folder with an offline WordPiece tokenizer and a
CoOp-format dataset of generated images.

    from tests.attri_tiny import save_tiny_clip, make_dataset
    save_tiny_clip(tmp / "clip", legacy_eos=False)   # CLIPModel folder: config, weights, tokenizer, processor
    make_dataset(tmp / "data", "Shapes", n_classes=6, per_class=8)  # tmp/data/Shapes/{split_zhou_Shapes.json, images/}
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "purple": (150, 40, 170), "orange": (240, 140, 20), "grey": (128, 128, 128), "pink": (240, 120, 180)}
WORDS = ("a photo of the an itap bad origami large small in video game art image picture this is " +
         " ".join(COLOURS) + " square circle stripe dot shape thing . , x").split()


def save_tiny_clip(path: str | Path, legacy_eos: bool = False, layers: int = 3, width: int = 32,
                   image_size: int = 32, patch: int = 8, seed: int = 0) -> Path:
    """A random CLIPModel (text and vision `layers` blocks of `width`) saved with a WordPiece tokenizer whose
    [SEP] is the last id (so both pooling rules find it: legacy argmax with eos_token_id 2, or its id)."""
    import torch
    from transformers import BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[MASK]", *WORDS, "[SEP]"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=32)
    tok.save_pretrained(path)
    sep = vocab.index("[SEP]")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=vocab.index("[CLS]"), pad_token_id=0, eos_token_id=2 if legacy_eos else sep),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=patch),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def class_names(n: int) -> list[str]:
    cols, shapes = list(COLOURS), ["square", "circle", "stripe", "dot"]
    return [f"{cols[i % len(cols)]} {shapes[(i // len(cols)) % len(shapes)]}" for i in range(n)]


def make_dataset(root: str | Path, name: str, n_classes: int = 6, per_class: int = 8, test_per_class: int = 3,
                 size: int = 40, seed: int = 0) -> Path:
    """root/<name>/split_zhou_<name>.json + root/<name>/images/<class>/<i>.png; class i is a colour (and shape):
    labels 0..n-1 in order. Returns root/<name>."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    names = class_names(n_classes)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(names):
        colour = np.array(COLOURS[cname.split()[0]])
        for part, count in (("train", per_class), ("val", 2 if per_class else 0), ("test", test_per_class)):
            for i in range(count):
                rel = f"{cname.replace(' ', '_')}/{part}_{i}.png"
                img = np.clip(rng.normal(0, 25, (size, size, 3)) + colour, 0, 255).astype(np.uint8)
                if "stripe" in cname:
                    img[::4] = 255
                (folder / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(folder / "images" / rel)
                split[part].append([rel, label, cname])
    (folder / f"split_zhou_{name}.json").write_text(json.dumps(split))
    return folder
