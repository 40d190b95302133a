"""Forward cost of K prompts: one masked pass vs K separate passes vs one batched pass of K copies.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/multiprompt_forward.py            # ~1-2 min on 2 CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/multiprompt_forward.py --ks 6 --lengths 16 --models minilm
    HF_HUB_OFFLINE=1 .venv/bin/python bench/multiprompt_forward.py --clock cpu   # on a busy shared machine

For each model, K and caption length (captions of length L +- 2 tokens, so a batch is padded), it times the LM
forward up to the K pooled hidden states (tokenization excluded for every method; the masked pass includes
building its 4-D mask):
  masked    one pass over caption + K prompts with the prompt-wise mask (campe.text.multiprompt)
  separate  K passes, pass i over caption + prompt_i (re-encodes the caption K times)
  copies    one pass over B*K rows, row (b, i) = caption_b + prompt_i
tok/s counts the caption + prompt tokens encoded (L + K*P per caption, the same for all three methods), so it is
proportional to captions/s. Models: the default MiniLM-L6 (encoder) and a small random Llama (decoder,
H=256, 4 layers). The last line is a JSON object with the headline figures (MiniLM, K=6, ~16-token captions).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer, LlamaConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from campe.text.model_folder import resolve_model_path  # noqa: E402
from campe.text.multiprompt import build_text_encoder  # noqa: E402

WORDS = ("a red blue green small large circle square triangle dog cat person walking sitting on the of near "
         "beside image photo with two three wooden table street bright dark old young man woman child running "
         "holding ball tree house car field sky water under behind striped shiny").split()


def make_captions(tok, n: int, target: int, seed: int) -> list[str]:
    """n captions of target +- 2 tokens (special tokens included)."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        want, words = max(4, target + rng.randint(-2, 2)), []
        while len(tok(" ".join(words))["input_ids"]) < want:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words))
    return out


def padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [N, S], 2-D mask [N, S], index of each row's last token [N]."""
    s = max(map(len, rows))
    ids = torch.full((len(rows), s), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), s), dtype=torch.long)
    for r, x in enumerate(rows):
        ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
    return ids, mask, torch.tensor([len(x) - 1 for x in rows])


CLOCK = time.perf_counter  # --clock cpu: time.thread_time with one torch thread


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds per call of each fn (the least disturbed run: other processes only ever add
    time); the methods take turns within each repeat, so a burst of machine load hits all of them alike."""
    ts: dict[str, list[float]] = {m: [] for m in fns}
    for m, f in fns.items():
        f()  # warm-up
    for _ in range(repeats):
        for m, f in fns.items():
            t = CLOCK()
            f()
            ts[m].append(CLOCK() - t)
    return {m: min(v) for m, v in ts.items()}


def bench_model(name: str, lm, tok, ks, lengths, batch: int, repeats: int) -> list[dict]:
    rows = []
    for k in ks:
        enc = build_text_encoder(model=lm, tokenizer=tok, k=k, embed_dim=k * 64)
        prompt = enc.prompt_ids[0]  # every prompt has the same tokens; only the (placeholder) APT differs
        for length in lengths:
            caps = make_captions(tok, batch, length, seed=length)
            layout = enc.layout(caps)
            cap_ids = [tok(c)["input_ids"] for c in caps]
            sep = padded([c + prompt for c in cap_ids], enc.pad_id)
            cop = padded([c + p for c in cap_ids for p in enc.prompt_ids], enc.pad_id)
            r = torch.arange(batch)[:, None]

            def masked():
                return enc.hidden(layout)[r, layout.pooled_positions]

            def separate():
                outs = []
                for _ in range(k):  # the K passes differ only in the APT, which costs nothing here
                    h = lm(input_ids=sep[0], attention_mask=sep[1]).last_hidden_state
                    outs.append(h[torch.arange(batch), sep[2]])
                return torch.stack(outs, 1)

            def copies():
                h = lm(input_ids=cop[0], attention_mask=cop[1]).last_hidden_state
                return h[torch.arange(batch * k), cop[2]].view(batch, k, -1)

            with torch.inference_mode():
                t = timed({"masked": masked, "separate": separate, "copies": copies}, repeats)
            tokens = int(layout.caption_lengths.sum()) + batch * k * len(prompt)
            rows.append({"model": name, "k": k, "caption_tokens": round(float(layout.caption_lengths.float().mean()), 1),
                         "seq_len": layout.input_ids.shape[1],
                         **{f"{m}_ms_per_caption": 1000 * v / batch for m, v in t.items()},
                         **{f"{m}_tok_s": tokens / v for m, v in t.items()},
                         "speedup_vs_separate": t["separate"] / t["masked"],
                         "speedup_vs_copies": t["copies"] / t["masked"]})
            x = rows[-1]
            print(f"{name:<11} {k:>2} {x['caption_tokens']:>5} {x['seq_len']:>4} "
                  f"{x['masked_ms_per_caption']:>8.2f} {x['separate_ms_per_caption']:>8.2f} "
                  f"{x['copies_ms_per_caption']:>8.2f} {x['masked_tok_s']:>9.0f} {x['separate_tok_s']:>9.0f} "
                  f"{x['copies_tok_s']:>9.0f} {x['speedup_vs_separate']:>7.2f}x {x['speedup_vs_copies']:>7.2f}x",
                  flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="1,2,4,6,8")
    ap.add_argument("--lengths", default="8,16,40", help="caption lengths in tokens (each +- 2)")
    ap.add_argument("--models", default="minilm,tiny-llama")
    ap.add_argument("--batch", type=int, default=8, help="captions per forward")
    ap.add_argument("--repeats", type=int, default=4, help="timed repeats (best of) after one warm-up")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: wall-clock with torch's default threads; cpu: CPU time of one torch thread "
                         "(compute only, for a machine shared with other jobs)")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        torch.set_num_threads(1)
        CLOCK = time.thread_time
    ks = [int(x) for x in args.ks.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    path = resolve_model_path("minilm")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    load0 = os.getloadavg()[0]  # timings on a shared machine are only as good as its quiet
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load0:.2f} on "
          f"{os.cpu_count()} CPUs; {args.clock} clock; batch {args.batch} captions, "
          f"best of {args.repeats}; ms = per caption, tok/s = caption+prompt tokens per second")
    print(f"{'model':<11} {'K':>2} {'L':>5} {'S':>4} {'masked':>8} {'separate':>8} {'copies':>8} "
          f"{'tok/s m':>9} {'tok/s s':>9} {'tok/s c':>9} {'vs sep':>8} {'vs copy':>8}")
    rows = []
    for name in args.models.split(","):
        if name == "minilm":
            lm = AutoModel.from_pretrained(path, local_files_only=True).eval()
        elif name == "tiny-llama":
            lm = AutoModel.from_config(LlamaConfig(
                hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=688, vocab_size=tok.vocab_size, max_position_embeddings=512)).eval()
        else:
            raise SystemExit(f"unknown model '{name}': use minilm and/or tiny-llama")
        rows += bench_model(name, lm, tok, ks, lengths, args.batch, args.repeats)

    def pick(model, k, length):
        c = [r for r in rows if r["model"] == model and r["k"] == k]
        return min(c, key=lambda r: abs(r["caption_tokens"] - length)) if c else None

    head = pick("minilm", 6, 16) or pick(rows[0]["model"], 6, 16) or rows[0]
    dec = pick("tiny-llama", 6, 16)
    print(f"\nK=6, ~16-token captions ({head['model']}): masked pass {head['speedup_vs_separate']:.2f}x faster than "
          f"K separate passes, {head['speedup_vs_copies']:.2f}x faster than one batched pass of K copies "
          f"(goal >= 2.2x vs separate)")
    summary = {"k6_speedup": round(head["speedup_vs_separate"], 3),
               "k6_ms_per_caption": round(head["masked_ms_per_caption"], 3),
               "k6_speedup_vs_copies": round(head["speedup_vs_copies"], 3),
               "model": head["model"], "k": head["k"], "caption_tokens": head["caption_tokens"]}
    if dec is not None:
        summary["k6_speedup_tiny_llama"] = round(dec["speedup_vs_separate"], 3)
    summary["clock"] = args.clock
    summary["load_avg_start_end"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
