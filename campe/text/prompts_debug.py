"""`campe prompts "<caption>"`: show how a caption is packed with its K prompts, and draw the attention mask.

    campe prompts "a red circle on a blue background"                 # MiniLM, K=6 -> prompt_mask.png
    campe prompts "a red circle" --k 3 --negation --tokens --out mask.png

Prints the spans (token indices, position ids, APT and pooled positions) and writes the prompt-wise attention
mask as a PNG: row = query token, column = key token, a coloured cell = "may attend", coloured by the key's span.
"""
from __future__ import annotations

import argparse

from campe.text.layout import PromptLayout
from campe.text.multiprompt import MultiPromptConfig, POOLINGS, build_text_encoder

# `campe --help` shows this line (campe.cli reads it with ast, without importing this module)
HELP = "show the multi-prompt token layout and attention mask of a caption"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = MultiPromptConfig()
    parser.add_argument("caption", help="the caption to lay out")
    parser.add_argument("--model-path", default=d.model_path, help="'minilm' (packaged default) or a local folder")
    parser.add_argument("--pooling", default=d.pooling, choices=POOLINGS)
    parser.add_argument("--k", type=int, default=d.k, help="number of prompts (multi_prompt)")
    parser.add_argument("--defo-tokens", type=int, default=d.defo_tokens, help="APT tokens for --pooling defo")
    parser.add_argument("--template", default=d.template)
    parser.add_argument("--negated-template", default=d.negated_template)
    parser.add_argument("--negation", action="store_true", help="append the negated prompts too")
    parser.add_argument("--max-length", type=int, default=d.max_length, help="caption tokens kept")
    parser.add_argument("--embed-dim", type=int, default=None,
                        help="D (default: a multiple of the prompt count near 384; only the heads' size)")
    parser.add_argument("--tokens", action="store_true", help="also print one line per token")
    parser.add_argument("--out", default="prompt_mask.png", help="where to write the mask picture")


def _span_names(enc, layout: PromptLayout) -> dict[int, str]:
    k = layout.n_prompts
    names = {0: "caption"}
    for i in range(1, len(enc.prompt_ids) + 1):
        names[i] = f"prompt {i}" if i <= k else f"negated {i - k}"
    return names


def _token_labels(enc, layout: PromptLayout) -> list[str]:
    ids = layout.input_ids[0].tolist()
    labels = enc.tokenizer.convert_ids_to_tokens(ids)
    k = layout.n_prompts
    for j, p in enumerate(layout.apt_positions[0].tolist()):
        labels[p] = f"[APT-{j + 1}]"
    if layout.neg_apt_positions is not None:
        for j, p in enumerate(layout.neg_apt_positions[0].tolist()):
            labels[p] = f"[APT-{j + 1}]"
    return labels[: int(layout.lengths[0])]


def describe(enc, layout: PromptLayout, tokens: bool = False) -> str:
    """The text report for the first row of `layout`."""
    seg, pos = layout.segment_ids[0].tolist(), layout.position_ids[0].tolist()
    labels = _token_labels(enc, layout)
    n = len(labels)
    names = _span_names(enc, layout)
    pooled = set(layout.pooled_positions[0].tolist())
    if layout.neg_pooled_positions is not None:
        pooled |= set(layout.neg_pooled_positions[0].tolist())
    apt = set(layout.apt_positions[0].tolist())
    if layout.neg_apt_positions is not None:
        apt |= set(layout.neg_apt_positions[0].tolist())
    cfg = enc.cfg
    kind = f"{enc.family}, {'causal' if enc.causal else 'bidirectional'}"
    lines = [f"model: {type(enc.lm).__name__} ({kind}; attention: {enc.lm.config._attn_implementation}), "
             f"pooling {cfg.pooling}, {layout.n_prompts} prompts" + (" + their negations" if cfg.negation else "")
             + f", {enc.num_layers} layers (trainable from layer {enc.start_layer}"
             + ((", where the APT vectors enter)" if enc.entry_layer == enc.start_layer else
                 f"; the APT vectors enter at layer {enc.entry_layer})") if layout.n_prompts else ")")
             + (f"; distinct APT placeholders {enc.placeholder_ids}" if enc.cfg.apt_placeholder == "distinct" else ""),
             f"sequence: {n} tokens (caption {int(layout.caption_lengths[0])}"
             + (", TRUNCATED to max_length" if bool(layout.truncated[0]) else "") + ")",
             "",
             f"{'span':<12} {'tokens':>9} {'positions':>10} {'APT':>5} {'pooled':>6}  text"]
    for s in sorted(set(x for x in seg[:n])):
        idx = [i for i in range(n) if seg[i] == s]
        a = [i for i in idx if i in apt]
        if cfg.pooling == "mean":
            pl = "mean" if s == 0 else "-"
        else:
            pl = ",".join(str(i) for i in idx if i in pooled) or "-"
        lines.append(f"{names[s]:<12} {f'{idx[0]}-{idx[-1]}':>9} {f'{pos[idx[0]]}-{pos[idx[-1]]}':>10} "
                     f"{(str(a[0]) if a else '-'):>5} {pl:>6}  {' '.join(labels[i] for i in idx)}")
    how = "causally" if enc.causal else "bidirectionally"
    lines += ["", f"mask: caption -> caption only; prompt i -> caption + prompt i ({how}); "
                  f"each prompt's positions restart at the caption's end"]
    if tokens:
        lines += ["", f"{'idx':>4} {'pos':>4} {'span':<12} token"]
        for i in range(n):
            mark = " <- APT" if i in apt else (" <- pooled" if i in pooled else "")
            lines.append(f"{i:>4} {pos[i]:>4} {names[seg[i]]:<12} {labels[i]}{mark}")
    return "\n".join(lines)


def render_mask(enc, layout: PromptLayout, path: str) -> None:
    """Draw row 0's mask: coloured = may attend (colour of the key's span), white = blocked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = int(layout.lengths[0])
    allowed = (enc.attention_mask(layout)[0, 0, :n, :n] == 0).cpu().numpy()
    seg = layout.segment_ids[0, :n].cpu().numpy()
    k = layout.n_prompts
    palette = [plt.get_cmap("tab10")(i)[:3] for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # no grey: that is the caption
    colour = {0: np.array([0.45, 0.45, 0.45])}
    for s in range(1, len(enc.prompt_ids) + 1):
        base = np.array(palette[(s - 1) % k % len(palette)])
        colour[s] = base if s <= k else 0.55 * base + 0.45  # negated prompt: lighter shade of its prompt
    img = np.ones((n, n, 3))
    for s, c in colour.items():
        img[allowed & (seg[None, :] == s)] = c

    labels = _token_labels(enc, layout)
    names = _span_names(enc, layout)
    size = min(14.0, max(7.0, 0.16 * n + 1.5))
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ax.imshow(img, interpolation="nearest")
    bounds = [i for i in range(1, n) if seg[i] != seg[i - 1]]
    for b in bounds:
        ax.axhline(b - 0.5, color="black", lw=0.6)
        ax.axvline(b - 0.5, color="black", lw=0.6)
    pooled = set(layout.pooled_positions[0].tolist())
    if layout.neg_pooled_positions is not None:
        pooled |= set(layout.neg_pooled_positions[0].tolist())
    fs = 7 if n <= 60 else 5
    if n <= 120:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=fs)
        ax.set_yticks(range(n), labels, fontsize=fs)
        for lab_set in (ax.get_xticklabels(), ax.get_yticklabels()):
            for i, lab in enumerate(lab_set):
                if labels[i].startswith("[APT-"):
                    lab.set_color("tab:red")
                if i in pooled:
                    lab.set_color("tab:blue")
                    lab.set_fontweight("bold")
    starts = [0] + bounds
    for st in starts:  # span names along the top
        ax.text(st - 0.5, -1.0, names[int(seg[st])], fontsize=fs + 1, rotation=45, ha="left", va="bottom")
    ax.set_xlabel("key (attended)      red = APT token, blue / dot = pooled token")
    ax.set_ylabel("query (attending)")
    for i in sorted(pooled):  # a dot on the pooled tokens' own cells
        ax.plot(i, i, marker="o", ms=4, mfc="white", mec="black", mew=0.8)
    neg = f" + {k} negated" if layout.neg_pooled_positions is not None else ""
    ax.set_title(f"prompt-wise attention mask ({'causal' if enc.causal else 'bidirectional'}, "
                 f"{k} prompts{neg})", pad=42)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    cfg = MultiPromptConfig(model_path=args.model_path, pooling=args.pooling, k=args.k, template=args.template,
                            negated_template=args.negated_template, negation=args.negation,
                            defo_tokens=args.defo_tokens, max_length=args.max_length)
    heads = cfg.n_heads
    embed_dim = args.embed_dim or heads * max(1, round(384 / heads))  # D only sizes the heads here
    enc = build_text_encoder(cfg, embed_dim=embed_dim)
    layout = enc.layout([args.caption])
    print(describe(enc, layout, tokens=args.tokens))
    render_mask(enc, layout, args.out)
    print(f"mask picture: {args.out}")
    return 0
