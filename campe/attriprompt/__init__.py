"""AttriPrompt (Zhan et al., ACM MM 2025, "Dynamic Prompt Composition Learning for CLIP"), reconstructed, and the
prompt-learning baselines it is compared with, on a frozen CLIP, with the few-shot protocol of CoOp/CoCoOp/PromptSRC.

    backbone.py  the frozen dual encoder interface + transformers' CLIPModel with deep text prompting
    kmeans.py    batched per-image k-means of patch tokens (deterministic, no gradient)
    pool.py      prompt pools, query projection, top-N retrieval (hard / soft) and the key pull term
    losses.py    loss terms (each returns a dict of named terms)
    methods.py   zero-shot CLIP, CoOp, CoCoOp, IVLP (text-only deep prompts), PromptSRC-style, AttriPrompt: one registry
    fewshot.py   CoOp-format splits, 16-shot sampling per seed, base/novel, HM and the averages of the field
    config.py    the flat, validated `prompt_learn` params section
    trainer.py   one trainer for every method: train, evaluate, checkpoints, metrics JSON, MLflow

Which parts are the paper's and which are reconstructed: ../shared/notes/attriprompt.md and the README. Nothing
else in campe imports this package.
"""
