"""Configuration of MoeVlm: a Mistral decoder whose FFNs are 2-expert MoE layers, fed by an open_clip vision tower.

`MoeVlmConfig` extends `MistralConfig` (so a dense Mistral checkpoint's config is a valid starting point) with the
MoE fields of the paper (two experts, top-1 linear router, routing mode per training stage) and a vision
sub-config. It lives beside the modeling file because transformers' remote code copies only single-dot sibling
imports: a Hub repo must carry this file next to `modeling_moe_vlm.py`.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import MistralConfig, PreTrainedConfig

ROUTER_MODES = ("hard", "gumbel", "softmax", "modality_aware")
CONNECTOR_TYPES = ("linear", "mlp2x_gelu")
ROUTER_DROPOUT_PLACES = ("logits", "input")
# How the router computes its decision: its PyTorch code, or the same function compiled (`router_kernels.py`)
ROUTER_IMPLEMENTATIONS = ("eager", "fused_cpp")
# The token modalities (equal to `configuration.contract.MODALITIES`: remote code cannot import it; a test checks).
MODALITIES = ("image", "text")
# Each router loss's coefficient (a config field) -> the unweighted term the model returns (`router_losses`): the
# one list the config check, the weighted sum in the forward and the trainer's logging read.
ROUTER_LOSSES = {
    "router_aux_loss_coef": "load_balancing_loss",
    "router_z_loss_coef": "z_loss",
    "router_specialisation_loss_coef": "specialisation_loss",
    "router_modality_aux_loss_coef": "modality_balancing_loss",
    "router_entropy_loss_coef": "entropy_floor_loss",
}
# open_clip's ModifiedResNet: the stem divides the side by 4 and stages 2-4 by 2 each (32 in all); its Bottleneck
# blocks widen the stage's planes by 4.
RESNET_STRIDE = 32
RESNET_EXPANSION = 4
IMAGE_TEXT_TO_TEXT_AUTO_MAP = {"AutoModelForImageTextToText": "modeling_moe_vlm.MoeVlmForCausalLM"}


@strict
class MoeVlmVisionConfig(PreTrainedConfig):
    r"""The open_clip vision tower: a named model (`model_name`, optionally with a `pretrained` tag whose weights are
    copied in by `MoeVlmForCausalLM.from_mistral`) or an inline `vision_cfg` (open_clip `CLIPVisionCfg` fields) for
    tiny towers built offline. A named model's `vision_cfg` and `embed_dim` are resolved from open_clip's bundled
    model configs, so a saved config always carries the full architecture and loads without open_clip's registry.

    Args:
        model_name (`str`, *optional*): open_clip model name, e.g. `"ViT-L-14"`.
        pretrained (`str`, *optional*): open_clip pretrained tag, e.g. `"openai"` (only used when upcycling).
        embed_dim (`int`, *optional*): CLIP joint embedding size (the tower's output projection).
        vision_cfg (`dict`, *optional*): open_clip `CLIPVisionCfg` fields (`image_size`, `patch_size`, `width`, ...).
            `layers` as one number builds a ViT; as a list of blocks per stage, open_clip's `ModifiedResNet` (the
            conv tower of CLIP RN50; the embedded default uses one, since a ViT this small does not learn shape).
        quick_gelu (`bool`): OpenAI CLIP weights were trained with QuickGELU.
        image_mean / image_std (`list[float]`, *optional*): normalisation the processor applies (OpenAI CLIP's by
            default).
    """

    model_type = "moe_vlm_vision"
    base_config_key = "vision_config"

    model_name: str | None = None
    pretrained: str | None = None
    embed_dim: int | None = None
    vision_cfg: dict | None = None
    quick_gelu: bool = False
    image_mean: list[float] | None = None
    image_std: list[float] | None = None

    def __post_init__(self, **kwargs):
        if self.vision_cfg is None:
            if self.model_name is None:
                raise ValueError(
                    "MoeVlmVisionConfig needs either `model_name` (an open_clip model) or `vision_cfg`."
                )
            import open_clip  # only needed to resolve a named architecture

            resolved = open_clip.get_model_config(self.model_name)
            if resolved is None:
                raise ValueError(
                    f"open_clip has no model config named {self.model_name!r}; see open_clip.list_models()."
                )
            self.vision_cfg = dict(resolved["vision_cfg"])
            self.embed_dim = resolved["embed_dim"] if self.embed_dim is None else self.embed_dim
            self.quick_gelu = bool(resolved.get("quick_gelu", False)) or self.quick_gelu
        # OpenAI's CLIP weights were trained with QuickGELU; open_clip warns and degrades without it.
        self.quick_gelu = self.quick_gelu or self.pretrained == "openai"
        required = ("image_size", "width", "layers") + (() if self.is_resnet else ("patch_size",))
        for key in required:
            if key not in self.vision_cfg:
                raise ValueError(
                    f"vision_cfg must define {key!r} (open_clip CLIPVisionCfg field); got {self.vision_cfg}"
                )
        if self.embed_dim is None:
            self.embed_dim = self.vision_cfg["width"]
        if self.is_resnet and self.image_size % RESNET_STRIDE:
            raise ValueError(
                f"a ResNet tower (vision_cfg.layers={list(self.vision_cfg['layers'])}) needs image_size divisible "
                f"by {RESNET_STRIDE}, got {self.image_size}"
            )
        if not self.is_resnet and self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        # OpenAI CLIP normalisation (open_clip's OPENAI_DATASET_MEAN / STD), the default of every CLIP tower here.
        self.image_mean = self.image_mean or [0.48145466, 0.4578275, 0.40821073]
        self.image_std = self.image_std or [0.26862954, 0.26130258, 0.27577711]
        super().__post_init__(**kwargs)

    @property
    def image_size(self) -> int:
        size = self.vision_cfg["image_size"]
        return size[0] if isinstance(size, (list, tuple)) else size

    @property
    def is_resnet(self) -> bool:
        """open_clip builds a `ModifiedResNet` (the conv tower of CLIP RN50) when `vision_cfg.layers` is a list of
        blocks per stage, a `VisionTransformer` when it is one number."""
        return isinstance(self.vision_cfg["layers"], (list, tuple))

    @property
    def patch_size(self) -> int:
        """The ViT's patch side; a ResNet's tokens are one feature-map cell, `feature_stride(...)` pixels wide."""
        return self.vision_cfg["patch_size"] if not self.is_resnet else self.feature_stride(-1)

    @property
    def width(self) -> int:
        """Width of the transformer blocks (ViT) or of the stem (ResNet): open_clip's `vision_cfg.width`."""
        return self.vision_cfg["width"]

    @property
    def num_layers(self) -> int:
        """Blocks `vision_feature_layer` indexes: the ViT's transformer blocks, or the ResNet's stages (stem and
        `len(layers)` residual stages, as `ModifiedResNet.forward_intermediates` counts them)."""
        return len(self.vision_cfg["layers"]) + 1 if self.is_resnet else self.vision_cfg["layers"]

    @property
    def num_patches(self) -> int:
        """The ViT's patch count (CLS excluded)."""
        return (self.image_size // self.patch_size) ** 2

    def _stage(self, feature_layer: int) -> int:
        return feature_layer % self.num_layers

    def feature_stride(self, feature_layer: int) -> int:
        """Pixels per token side of block `feature_layer` (ResNet: the stem divides by 4, each later stage but
        the first by 2 more)."""
        if not self.is_resnet:
            return self.vision_cfg["patch_size"]
        return 4 * 2 ** max(self._stage(feature_layer) - 1, 0)

    def feature_width(self, feature_layer: int) -> int:
        """Channels of the tokens block `feature_layer` yields (what the connector receives). ResNet: the stem
        has `width` channels and residual stage i (1-based) `width * 2**(i-1) * 4` (Bottleneck expansion 4)."""
        if not self.is_resnet:
            return self.width
        stage = self._stage(feature_layer)
        return self.width if stage == 0 else self.width * 2 ** (stage - 1) * RESNET_EXPANSION

    def num_feature_tokens(self, feature_layer: int) -> int:
        """Tokens per image block `feature_layer` yields: ViT patches (CLS removed) or ResNet feature-map cells."""
        return (self.image_size // self.feature_stride(feature_layer)) ** 2


@strict
class MoeVlmConfig(MistralConfig):
    r"""Mistral + 2-expert MoE FFNs + open_clip vision tower + connector.

    MoE args:
        num_experts (`int`, defaults to 2): experts per MoE layer (the paper: expert 0 = vision, expert 1 = text).
        num_experts_per_tok (`int`, defaults to 1): top-k (the paper routes top-1).
        moe_layers (`list[int]`, *optional*): which decoder layers get an MoE FFN; default all. An empty list gives
            the dense VLM (the paper's dense control).
        router_mode (`str`): `hard` (image tokens to `modality_to_expert["image"]`, text to `["text"]`, router
            bypassed: Stage 2), `gumbel` (straight-through Gumbel-softmax top-1: Stage 3), `softmax` (plain top-k
            softmax, Mixtral/Switch style) or `modality_aware` (a learned embedding of each token's modality, projected
            to one term per expert, is added to the router's logits, then routed like `gumbel`). Switchable on a loaded model with `model.set_router_mode(...)`.
        gumbel_tau (`float`): Gumbel-softmax temperature.
        router_init_std (`float`, *optional*): std of the normal the router weight (and the `modality_aware`
            projection) is initialised from. `None` (the default) takes `initializer_range` (0.02), which is what
            every config saved before this field existed was initialised with, and is recorded resolved, so a saved
            config says the value used. The authors' code uses 0.05 (the paper preset sets it).
        router_dropout (`float`): dropout probability in the router during training (0: none; the authors: 0.1).
        router_dropout_on (`str`, defaults to `"logits"`): where that dropout acts: `"logits"` (the authors' code:
            on the router's logits, before the Gumbel sample or softmax) or `"input"` (on the hidden states the
            router reads, the placement used before this field existed; configs saved then all had dropout 0, so
            they route the same under either). Dropout changes the routing decision only: the recorded
            `router_logits` are the router's own, before dropout and noise.
        router_implementation (`str`, defaults to `"eager"`): how the router computes its decision: `"eager"` (its
            PyTorch code) or `"fused_cpp"` (the same function compiled as one autograd node, CPU only, built on
            first use; faster at the tiny size, equal up to float rounding: `router_kernels.py`). Like
            `experts_implementation`, a choice of kernel, not of model.
        modality_to_expert (`dict`): `{"image": 0, "text": 1}` by default (the vision expert is expert 0). Configs
            saved before the modality was called "image" everywhere (key `"vision"`) load unchanged.
        modality_embed_dim (`int`): size of the learned modality embedding of the `modality_aware` router.
        router_aux_loss_coef (`float`): Switch load-balancing loss coefficient (0: the paper uses none).
        router_z_loss_coef (`float`): router z-loss coefficient (0 by default).
        router_specialisation_loss_coef (`float`): coefficient of a loss penalising the router for leaving the
            Stage-2 expert roles (cross-entropy of the router towards `modality_to_expert`; the paper's future work).
        router_modality_aux_loss_coef (`float`): coefficient of the Switch load-balancing loss computed within each
            modality (image tokens, text tokens) and averaged: every modality spread over the experts.
        router_entropy_loss_coef (`float`): coefficient of a floor on each layer's routing entropy: the hinge
            max(0, router_entropy_floor * log E - H(mean router probability)), averaged over layers. It never reads
            the modality: it forbids a layer sending (nearly) every token to one expert, nothing else.
        router_entropy_floor (`float`, defaults to 0.5): that floor, as a fraction of log E (0.5 at two experts: no
            expert above about 89 % of a layer's tokens).
        router_bias_update_rate (`float`, defaults to 0): auxiliary-loss-free balancing (DeepSeek-V3): each router
            adds a per-expert bias (`expert_bias`, a buffer, not trained by the loss) to the logits its decision is
            taken from, and the trainer moves it by this rate after every optimizer step, up for experts that got
            fewer tokens than the mean, down for those that got more. 0: no bias (none is added or saved).
        output_router_logits (`bool`): return per-layer router logits and chosen experts.
    Vision args:
        vision_config (`MoeVlmVisionConfig` or dict): the open_clip tower; `None` gives a text-only model.
        vision_feature_layer (`int`, defaults to -2): block whose tokens feed the connector: a ViT's transformer
            block (patch tokens, CLS removed) or a ResNet's stage (0 = stem, then the residual stages; its feature
            map's cells, row by row).
        image_token_id (`int`, defaults to 10): the placeholder id (`[IMG]` in the Mistral v0.3 vocabulary).
        num_image_tokens (`int`, *optional*): placeholders per image; must equal the tower's patch count.
        connector_type (`str`): `linear` (the paper) or `mlp2x_gelu` (LLaVA-1.5 and the authors' code).
        freeze_vision_tower (`bool`, defaults to True): the paper keeps CLIP frozen in every stage.
    """

    model_type = "moe_vlm"
    sub_configs = {"vision_config": MoeVlmVisionConfig}
    # Mixtral's experts read `num_local_experts`; ours is called `num_experts` (the name).
    attribute_map = {"num_local_experts": "num_experts"}
    # Mistral's plan names `mlp.gate_proj`, which an MoE layer no longer has: use Mixtral's expert plan.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }

    num_experts: int = 2
    num_experts_per_tok: int = 1
    moe_layers: list[int] | None = None
    router_mode: str = "hard"
    gumbel_tau: float | int = 1.0
    router_init_std: float | int | None = None
    router_dropout: float | int = 0.0
    router_dropout_on: str = "logits"
    router_implementation: str = "eager"
    modality_to_expert: dict | None = None
    modality_embed_dim: int = 16
    router_aux_loss_coef: float | int = 0.0
    router_z_loss_coef: float | int = 0.0
    router_specialisation_loss_coef: float | int = 0.0
    router_modality_aux_loss_coef: float | int = 0.0
    router_entropy_loss_coef: float | int = 0.0
    router_entropy_floor: float | int = 0.5
    router_bias_update_rate: float | int = 0.0
    output_router_logits: bool = False

    vision_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -2
    image_token_id: int = 10
    num_image_tokens: int | None = None
    connector_type: str = "linear"
    freeze_vision_tower: bool = True

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict):
            self.vision_config = MoeVlmVisionConfig(**self.vision_config)
        if self.moe_layers is None:
            self.moe_layers = list(range(self.num_hidden_layers))
        self.moe_layers = sorted(int(i) for i in self.moe_layers)
        if self.modality_to_expert is None:
            self.modality_to_expert = {"image": 0, "text": 1}
        elif "vision" in self.modality_to_expert and "image" not in self.modality_to_expert:
            mapping = dict(self.modality_to_expert)  # a config saved with the earlier key name
            mapping["image"] = mapping.pop("vision")
            self.modality_to_expert = mapping
        if self.vision_config is not None and self.num_image_tokens is None:
            self.num_image_tokens = self.vision_config.num_feature_tokens(self.vision_feature_layer)
        super().__post_init__(**kwargs)
        if self.router_init_std is None:  # resolved here so the saved config records the std actually used
            self.router_init_std = self.initializer_range
        # A VLM is reached through AutoModelForImageTextToText (and `pipeline("image-text-to-text")`) as well as
        # AutoModelForCausalLM; `register_for_auto_class` records one Auto class per class, and save_pretrained adds
        # that one (and AutoConfig) to whatever `auto_map` the config holds, so the second entry starts here.
        self.auto_map = {**IMAGE_TEXT_TO_TEXT_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self.check_moe_vlm()

    def check_moe_vlm(self) -> None:
        """Raise a ValueError naming the field to fix when values are inconsistent."""
        for name in ("num_experts", "num_experts_per_tok", "image_token_id", "modality_embed_dim"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}"
            )
        self.check_router_mode(self.router_mode)
        bad_layers = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad_layers or len(set(self.moe_layers)) != len(self.moe_layers):
            raise ValueError(
                f"moe_layers must be distinct indices in [0, num_hidden_layers={self.num_hidden_layers}); got "
                f"{self.moe_layers}"
            )
        if set(self.modality_to_expert) != set(MODALITIES):
            raise ValueError(
                f"modality_to_expert must map exactly {MODALITIES} to experts, got {self.modality_to_expert}"
            )
        for modality, expert in self.modality_to_expert.items():
            if not 0 <= int(expert) < self.num_experts:
                raise ValueError(
                    f"modality_to_expert[{modality!r}]={expert} is not an expert index < {self.num_experts}"
                )
        if self.gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be > 0, got {self.gumbel_tau}")
        if not 0 <= self.router_dropout < 1:
            raise ValueError(f"router_dropout must be in [0, 1), got {self.router_dropout}")
        if self.router_dropout_on not in ROUTER_DROPOUT_PLACES:
            raise ValueError(
                f"router_dropout_on must be one of {ROUTER_DROPOUT_PLACES}, got {self.router_dropout_on!r}"
            )
        if self.router_implementation not in ROUTER_IMPLEMENTATIONS:
            raise ValueError(
                f"router_implementation must be one of {ROUTER_IMPLEMENTATIONS}, got {self.router_implementation!r}"
            )
        if self.router_init_std is not None and self.router_init_std < 0:
            raise ValueError(f"router_init_std must be >= 0, got {self.router_init_std}")
        for name in (*ROUTER_LOSSES, "router_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.router_entropy_floor <= 1:
            raise ValueError(
                f"router_entropy_floor is a fraction of log(num_experts): it must be in [0, 1], got "
                f"{self.router_entropy_floor}"
            )
        if self.connector_type not in CONNECTOR_TYPES:
            raise ValueError(f"connector_type must be one of {CONNECTOR_TYPES}, got {self.connector_type!r}")
        if not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(
                f"image_token_id {self.image_token_id} is outside the vocabulary (size {self.vocab_size})"
            )
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id {self.pad_token_id} is outside the vocabulary (size {self.vocab_size})"
            )
        if self.vision_config is not None:
            n_layers = self.vision_config.num_layers
            if not -n_layers <= self.vision_feature_layer < n_layers:
                raise ValueError(
                    f"vision_feature_layer {self.vision_feature_layer} is out of range for a {n_layers}-block vision tower"
                )
            n_tokens = self.vision_config.num_feature_tokens(self.vision_feature_layer)
            if self.num_image_tokens != n_tokens:
                stride = self.vision_config.feature_stride(self.vision_feature_layer)
                raise ValueError(
                    f"num_image_tokens={self.num_image_tokens} but the vision tower yields {n_tokens} tokens per "
                    f"image at vision_feature_layer={self.vision_feature_layer} ({self.vision_config.image_size}px "
                    f"/ {stride}px per token, squared); make them equal"
                )
            if self.num_image_tokens >= self.max_position_embeddings:
                raise ValueError(
                    f"num_image_tokens={self.num_image_tokens} leaves no room for text within "
                    f"max_position_embeddings={self.max_position_embeddings}"
                )

    @property
    def router_losses_weighted(self) -> bool:
        """Whether any router loss enters the training loss (a coefficient > 0)."""
        return any(getattr(self, name) for name in ROUTER_LOSSES)

    def check_router_mode(self, mode: str) -> None:
        if mode not in ROUTER_MODES:
            raise ValueError(f"router_mode must be one of {ROUTER_MODES}, got {mode!r}")
        if mode != "softmax" and self.num_experts_per_tok != 1:
            raise ValueError(
                f"router_mode {mode!r} routes top-1: set num_experts_per_tok=1 (got {self.num_experts_per_tok})"
            )


__all__ = [
    "MoeVlmConfig",
    "MoeVlmVisionConfig",
    "ROUTER_LOSSES",
    "ROUTER_MODES",
    "CONNECTOR_TYPES",
    "ROUTER_DROPOUT_PLACES",
    "ROUTER_IMPLEMENTATIONS",
]
