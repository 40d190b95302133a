"""The `tiny` config: a complete params.yaml (every stage section) sized for tests.

    from tests.tiny_config import tiny_params, write_tiny_params
    write_tiny_params("params.yaml")                  # paths relative to the working dir (what dvc.yaml expects)
    write_tiny_params(tmp / "params.yaml", root=tmp)  # paths under tmp (the Prefect flow tests)

Sizes: 24 train images x 2 captions (48 pairs) at 32 px, 3+3 four-frame videos; MiniLM (the packaged model) with
K=2 prompts (or a 2-layer local BERT, save_tiny_lm, when speed matters); campe.model's "tiny" tower sizes (embed_dim 64 = 2 x 32); 6 train steps of 16 pairs; evaluation on the
tiny generated test split; two few-shot sets (2 shots, 1 epoch) for prompt learning. Every section is the stage's defaults with these overrides, so an unknown key is still an
error and a new params field gets its default here too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


def save_tiny_lm(path: str | os.PathLike) -> str:
    """A 2-layer BERT (hidden 32, random weights) with the MiniLM tokenizer, saved as a local model folder: a
    text_encoder.model_path that is several times faster than MiniLM on CPU (what the method needs is there: a
    tokenizer, frozen layers to cache and a last layer to train)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from campe.text.model_folder import resolve_model_path
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"), local_files_only=True)
    torch.manual_seed(0)
    lm = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=128))
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_params(root: str | os.PathLike = "", text_model: str = "minilm") -> dict[str, dict[str, Any]]:
    """params.yaml content for the tiny pipeline; data paths under `root` ("" = relative, as dvc.yaml needs);
    text_model: text_encoder.model_path (the packaged MiniLM, or a folder from save_tiny_lm)."""
    def p(rel: str) -> str:
        return str(Path(root) / rel) if str(root) not in ("", ".") else rel

    gen = p("data/generated")
    tracking = f"sqlite:///{p('mlflow.db')}"  # sqlite:///<relative> or sqlite:////<absolute>
    return {
        "generate": dict(seed=7, image_size=32, train_images=24, val_images=4, test_images=8, train_captions=2,
                         test_captions=5, train_videos=3, test_videos=4, video_captions=3, video_frames=4,
                         video_fps=4, max_objects=3, jpeg_quality=90),
        "download": dict(url_list=f"{gen}/urls/train.parquet", output_dir=p("data/shards/train"),
                         stats_file=p("metrics/download_stats.json"), url_col="url", caption_col="caption",
                         extra_columns=["image_id", "aspects"], image_size=32, resize_mode="border",
                         encode_quality=90, processes_count=1, thread_count=4, number_sample_per_shard=32,
                         retries=0, timeout=10, distributor="multiprocessing", min_success_rate=0.9),
        "text_encoder": dict(model_path=str(text_model), pooling="multi_prompt", k=2,
                             template="the {apt} of the image means:",
                             negated_template="the {apt} of the image does NOT mean:", negation=True,
                             defo_tokens=4, max_length=48, trainable_layers=1, attn_implementation="auto",
                             dtype="float32", init_seed=0),
        "cache": dict(shards_dir=p("data/shards/train"), output_dir=p("data/cache/train"), dtype="float16",
                      batch_size=16, length_bucketing=True, limit=0, device="cpu", threads=0),
        "model": dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0, image_mean=0.5,
                      image_std=0.5, frames=4, video_pool="mean", embed_dim=64, text_tokenizer="minilm",
                      vocab_size=0, context_length=32, text_width=64, text_layers=2, text_heads=2,
                      text_mlp_ratio=4.0, init_logit_scale=2.659260036932778, init_logit_bias=-10.0,
                      max_logit_scale=100.0, init_seed=0),
        "loss": dict(kind="softmax", lambda_div=0.1, div_margin=0.0, lambda_neg=0.1, neg_all_images=False,
                     gather_with_grad=True),
        "train": dict(method="multi_prompt_div_neg", shards_dir=p("data/shards/train"),
                      cache_dir=p("data/cache/train"), out_dir=p("data/models/campe"),
                      metrics_file=p("metrics/train.json"), steps=6, epochs=1, batch_size=16, lr=0.001,
                      min_lr_ratio=0.1, warmup_steps=2, weight_decay=0.1, beta1=0.9, beta2=0.98, eps=1.0e-06,
                      grad_clip=1.0, seed=0, precision="fp32", device="cpu", num_workers=0, log_every=2,
                      ckpt_every=100, progress=False, tracking_uri=tracking, experiment="campe",
                      artifact_root=p("mlartifacts"), run_name=""),
        "evaluate": dict(checkpoint=p("data/models/campe"),
                         image_sets={"generated": f"{gen}/dataset_karpathy.json"},
                         video_sets={"generated_msrvtt": f"{gen}/msrvtt"}, zero_shot_root=gen,
                         metrics_dir=p("metrics/eval"), plots_dir=p("plots/eval"), batch_size=32, ks=[1, 5, 10],
                         zero_shot_ks=[1, 5], chunk=0, ties="pessimistic", aspect_weights=[],
                         karpathy_split="test", max_captions=5, on_missing="error", msrvtt_policy="1k-A",
                         msrvtt_max_captions=20, video_frames=4, examples=2),
        "flow": dict(deployment_name="campe-tiny", cron="0 3 * * *", timezone="UTC", generate=True,
                     generated_dir=gen),
        "fewshot_data": dict(seed=3, image_size=32, train_per_class=2, val_per_class=1, test_per_class=2,
                             datasets=["FinePolygons", "Counts"]),
        "pretrain_clip": dict(seed=0, pairs=48, image_size=32, patch_size=8, width=32, vision_layers=1, text_layers=1,
                              heads=2, embed_dim=32, context_length=32, vocab_size=200, epochs=1, batch_size=16,
                              lr=0.002, weight_decay=0.05, warmup_steps=1, threads=1, prompt="a photo of a {}."),
        # the defaults (campe/attriprompt/config.py) but for the sets above, 2 shots, 1 epoch, a small pool
        "prompt_learn": dict(clip_path=p("data/models/clip"), data_root=p("data/fewshot"), protocol="base2new",
                             datasets=["FinePolygons", "Counts"], source="FinePolygons", xd_targets=["Counts"],
                             dg_targets=[], methods=["zsclip", "coop", "attriprompt"], seeds=[1], shots=2,
                             out_dir=p("data/models/prompt_learning"), metrics_dir=p("metrics/prompt_learning"),
                             fewshot_dir=p("data/prompt_learning/split_fewshot"), epochs=1, batch_size=4,
                             augment=False, test_batch_size=50, clusters=2, kmeans_iters=2, pool_size=4,
                             pool_tokens=1, top_n=2, static_ctx=1, tracking_uri=tracking,
                             experiment="campe-prompt-learning", artifact_root=p("mlartifacts")),
    }


def write_tiny_params(path: str | os.PathLike, root: str | os.PathLike = "", text_model: str = "minilm") -> Path:
    """Write tiny_params(root, text_model) to `path` as YAML; returns the path."""
    path = Path(path)
    path.write_text(yaml.safe_dump(tiny_params(root, text_model), sort_keys=False))
    return path
