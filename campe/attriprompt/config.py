"""The `prompt_learn` params section: one flat, validated config for every method, dataset and protocol.

    from campe.core.config import from_dict
    p = from_dict(PromptLearnParams, yaml_section, "params.yaml:prompt_learn")

Every choice the AttriPrompt abstract leaves open is a switch here, defaulting to the reconstruction's
recommendation (../shared/notes/attriprompt.md §2-3). One budget (epochs, batch, lr) for every method.
"""
from __future__ import annotations

from dataclasses import dataclass, field

METHOD_NAMES = ("zsclip", "coop", "cocoop", "ivlp", "promptsrc", "attriprompt")
PROTOCOLS = ("base2new", "cross")
# the generated sets (campe.data.synth_fewshot.DATASETS; README "The embedded AttriPrompt benchmark"): base-to-novel
# sets, SynthNet first (the cross-dataset source), and SynthNet's shifted test sets for domain generalisation
B2N_SETS = ("SynthNet", "Textures", "Layouts", "Counts", "Scenes", "FinePolygons", "FineColours")
DG_SETS = ("SynthNetSketch", "SynthNetV2", "SynthNetA", "SynthNetR")

# CoOp's IMAGENET_TEMPLATES_SELECT plus its default "a photo of a {}." (the zero-shot ensemble and SR targets)
TEMPLATES = ["a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
             "a photo of the large {}.", "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


@dataclass
class PromptLearnParams:
    """params.yaml section `prompt_learn` (campe prompt-learn train|eval)."""
    clip_path: str = "data/models/clip"  # pretrain_clip's output, or any folder CLIPModel.from_pretrained loads
    data_root: str = "data/fewshot"  # fewshot_data's output; CoOp layout: <data_root>/<dir>/split_zhou_<Name>.json
    protocol: str = "base2new"  # base2new | cross (train a source on all classes; cross-dataset + DG targets)
    datasets: list[str] = field(default_factory=lambda: list(B2N_SETS))  # base2new: each one in turn
    source: str = "SynthNet"  # cross: the source dataset
    xd_targets: list[str] = field(default_factory=lambda: list(B2N_SETS[1:]))  # cross: other sets (all classes)
    dg_targets: list[str] = field(default_factory=lambda: list(DG_SETS))  # cross: the source's shifted test sets
    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    shots: int = 16  # per class per seed (val: min(shots, 4))
    out_dir: str = "data/models/prompt_learning"  # checkpoints: <out>/<protocol>/<method>/<dataset>/seed<k>/
    metrics_dir: str = "metrics/prompt_learning"  # <metrics>/<protocol>/<method>/<dataset>/seed<k>.json + summary
    fewshot_dir: str = "data/prompt_learning/split_fewshot"  # cached samples: <dir>/<Name>/shot_K-seed_S.json
    # optimisation (Dassl's: SGD, cosine, constant warm-up epochs)
    epochs: int = 10
    batch_size: int = 4
    lr: float = 0.0025
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    test_batch_size: int = 100
    augment: bool = True  # random resized crop (scale 0.5-1) + flip; false: image features computed once
    init_seed: int = 0  # added to the run's seed for the prompt init (the data order follows the seed)
    device: str = "cpu"  # cpu | cuda | auto
    # prompts of the baselines
    n_ctx: int = 4  # context tokens (CoOp/CoCoOp/IVLP/PromptSRC)
    ctx_init: str = "a photo of a"  # words initialising the first layer's context when their count is n_ctx
    depth: int = 0  # prompted text blocks for ivlp/promptsrc/attriprompt; 0 = every block
    templates: list[str] = field(default_factory=lambda: list(TEMPLATES))
    # PromptSRC-style self-regularisation (and AttriPrompt's SR)
    text_loss_weight: float = 25.0  # L1(prompted, frozen ensemble) text features
    kl_weight: float = 1.0  # promptsrc: KL of the logits against zero-shot CLIP's
    gpa: bool = True  # promptsrc: Gaussian prompt aggregation over epochs
    gpa_mean: float = 0.75  # fraction of the epochs (PromptSRC: 15 of 20)
    gpa_std: float = 0.05  # fraction of the epochs (PromptSRC: 1 of 20)
    # AttriPrompt: attribute retrieval
    retrieval: bool = True  # false: the ablation without AR (static deep prompts of the same length)
    clusters: int = 4  # k-means K per image and vision layer
    kmeans_iters: int = 5
    include_cls: bool = False  # cluster the CLS token with the patches
    aggregate: str = "weighted_mean"  # weighted_mean (by cluster size) | mean
    phi_shared: bool = True  # one query projection for every layer (false: one per layer)
    key_dim: int = 0  # query/key width; 0 = the text width
    pool_per_layer: bool = True  # one pool per prompted text block (false: one shared pool)
    pool_size: int = 10
    pool_tokens: int = 2  # T tokens per entry
    top_n: int = 2
    selection: str = "hard"  # hard (concatenate the top-N) | soft (softmax-weighted top-N, T tokens)
    soft_temperature: float = 0.1
    static_ctx: int = 2  # learnable tokens before the retrieved ones in every prompted block
    shared_passes: bool = True  # hard selection: one text pass per distinct composition, not per image
    lambda_key: float = 0.1  # key pull (L2P's pull_constraint_coeff)
    # AttriPrompt: dual-stream contrastive learning and self-regularisation
    dcl: str = "global_fine"  # global_fine (reading A) | prompted_static (reading B) | none
    lambda_fine: float = 1.0
    infer_fine: bool = False  # add the fine-grained logits at test time
    sr: bool = True  # L1 to the frozen template-ensemble text features (weight text_loss_weight)
    sr_kl: bool = False  # also the logit KL against zero-shot CLIP (weight kl_weight)
    # tracking
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "campe-prompt-learning"
    artifact_root: str = "mlartifacts"

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        bad = [m for m in self.methods if m not in METHOD_NAMES]
        if bad or not self.methods:
            raise ValueError(f"methods: unknown {bad or 'none given'}; choose from {', '.join(METHOD_NAMES)}")
        if self.protocol == "base2new" and not self.datasets:
            raise ValueError("datasets: give at least one dataset for the base2new protocol")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        for name in ("shots", "epochs", "batch_size", "test_batch_size", "n_ctx", "clusters", "kmeans_iters",
                     "pool_size", "pool_tokens", "top_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("depth", "static_ctx", "key_dim", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.top_n > self.pool_size:
            raise ValueError(f"top_n ({self.top_n}) must not exceed pool_size ({self.pool_size})")
        checks = {"aggregate": ("weighted_mean", "mean"), "selection": ("hard", "soft"),
                  "dcl": ("global_fine", "prompted_static", "none"), "device": ("cpu", "cuda", "auto")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.dcl == "prompted_static" and self.static_ctx == 0:
            raise ValueError("dcl: prompted_static contrasts the static-context stream too: set static_ctx >= 1")
        if self.lr <= 0 or self.soft_temperature <= 0 or self.gpa_std <= 0:
            raise ValueError("lr, soft_temperature and gpa_std must be > 0")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError("templates: each template needs one '{}' for the class name")

    def prompt_tokens(self) -> int:
        """Tokens AttriPrompt inserts in each prompted block: the static context plus the retrieved composition."""
        return self.static_ctx + (self.top_n * self.pool_tokens if self.selection == "hard" else self.pool_tokens)
