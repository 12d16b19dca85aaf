"""MoeVlm: a Mistral decoder whose FFNs are 2-expert MoE layers behind a top-1 linear router, fed by a frozen
open_clip vision tower through a connector (LLaVA-style placeholder merge).

The paper (Ticinovic & Han, "Expert Collapse and Compositional Failure in Simple Multimodal MoE") trains it in
stages that differ only in what trains and how tokens are routed, so routing is a runtime switch:
`hard` sends image tokens to the vision expert and text tokens to the text expert (Stage 2), `gumbel` routes with a
straight-through Gumbel-softmax (Stage 3), `softmax` is Mixtral/Switch-style and `modality_aware` adds a learned
per-modality term to the router's logits (the review's proposal; in effect a learned bias per modality and expert).

Built as a subclass of transformers' Mistral: the base model's forward, cache handling, masks and kwargs are
Mistral's own (`MoeVlmModel.forward` only merges image features and derives the modality mask, then calls it), so an
API change upstream (such as 5.24's `past_key_values` -> `cache`) is inherited rather than missed.

Built on transformers' own MoE machinery: the experts are stacked like Mixtral's, so `experts_implementation`
("eager" | "grouped_mm" | "batched_mm" | GPU kernels) picks the dispatch kernel; per-layer router logits and chosen
experts are recorded by `OutputRecorder` hooks into the output dataclass (no module-level state).
"""

import contextlib
import itertools
import math
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, GenerationConfig, MistralForCausalLM, MistralModel
from transformers import initialization as init
from transformers.integrations import use_experts_implementation
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPooling,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralDecoderLayer,
    MistralPreTrainedModel,
    MistralRMSNorm,
    MistralRotaryEmbedding,
)
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder

from .configuration_moe_vlm import ROUTER_LOSSES, MoeVlmConfig, MoeVlmVisionConfig

# Imported for its side effect: it registers experts_implementation="sorted_top1" in transformers' ExpertsInterface.
from .experts_kernels import KERNEL_NAME  # noqa: F401
from .router_kernels import FUSED as FUSED_ROUTER
from .router_kernels import fused_route


@dataclass
class MoeVlmModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    router_logits (`tuple[torch.FloatTensor]`): one `(batch * seq, num_experts)` tensor per MoE layer (in
        `config.moe_layers` order), the router's raw logits, recorded with `output_router_logits=True`.
    router_indices (`tuple[torch.LongTensor]`): one `(batch * seq, num_experts_per_tok)` tensor per MoE layer, the
        expert(s) each token was dispatched to (after any inversion).
    modality_mask (`torch.BoolTensor`): `(batch, seq)`, True at image-placeholder positions: the modality the
        routers saw. Returned with the router outputs (a bool tensor among float outputs would break transformers'
        tuple/dict output equivalence everywhere else).
    """

    router_indices: tuple[torch.LongTensor, ...] | None = None
    modality_mask: torch.BoolTensor | None = None


@dataclass
class MoeVlmCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    Adds to `MoeCausalLMOutputWithPast` (whose `aux_loss` holds the weighted sum of the router losses):
    router_indices (`tuple[torch.LongTensor]`): per MoE layer, the chosen expert(s) of every token.
    modality_mask (`torch.BoolTensor`): `(batch, seq)`, True at image-placeholder positions (with the router outputs).
    load_balancing_loss / z_loss / specialisation_loss / modality_balancing_loss / entropy_floor_loss
        (`torch.FloatTensor`): the unweighted router losses (`configuration_moe_vlm.ROUTER_LOSSES`), present
        when router outputs were requested together with `labels`, or a coefficient is > 0.

    During training with `labels`, logits are only computed where labels need them and `logits` is `None`.
    """

    router_indices: tuple[torch.LongTensor, ...] | None = None
    modality_mask: torch.BoolTensor | None = None
    load_balancing_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    specialisation_loss: torch.FloatTensor | None = None
    modality_balancing_loss: torch.FloatTensor | None = None
    entropy_floor_loss: torch.FloatTensor | None = None


class MoeVlmRMSNorm(MistralRMSNorm):
    pass


class MoeVlmRouter(nn.Module):
    """Linear router. Returns `(logits, top_k_weights, top_k_index)` as Mixtral's does, so recorders pick logits
    (index 0) and chosen experts (index 2) and the experts take weights and indices unchanged.

    The weight a token's expert output is multiplied by carries the router's gradient: in `gumbel` mode it is the
    straight-through gate (value 1, gradient of the soft sample); a constant 1 would leave the router untrained.

    Dropout (`config.router_dropout`, training only) acts where `config.router_dropout_on` says: on the logits the
    decision is taken from (the authors' code) or on the router's input. Like the Gumbel noise it perturbs the
    decision only: the returned logits are the router's own (no dropout, no noise), so routing statistics, the
    router losses and the noise-free argmax all read what the router itself says. Read from the config at each
    call, so a stage can change it on a loaded model (as it does `gumbel_tau`).
    """

    def __init__(self, config: MoeVlmConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # modality_aware: logits += W_m e_m, a learned embedding of the token's modality (0 text, 1 image), projected
        # to one logit per expert: the router's input is unchanged, so this is a learned per-modality bias.
        self.modality_embedding = nn.Embedding(2, config.modality_embed_dim)
        self.modality_proj = nn.Linear(config.modality_embed_dim, config.num_experts, bias=False)
        # Auxiliary-loss-free balancing (`config.router_bias_update_rate`): a per-expert bias on the logits the decision
        # is taken from, moved by the trainer from the observed load, never by the loss. Saved only where it is used.
        self.register_buffer(
            "expert_bias", torch.zeros(config.num_experts), persistent=bool(config.router_bias_update_rate)
        )
        # Crossover test switch: send every token to the other expert ((index + 1) mod E). Not saved.
        self.invert = False

    def use_expert_bias(self, enabled: bool) -> None:
        """Save `expert_bias` with the weights (enabled) or not; the forward adds it while the config's rate is > 0."""
        if enabled:
            self._non_persistent_buffers_set.discard("expert_bias")
        else:
            self._non_persistent_buffers_set.add("expert_bias")

    def forward(self, hidden_states: torch.Tensor, is_image: torch.Tensor):
        # hidden_states: (tokens, hidden); is_image: (tokens,) bool
        if self.config.router_implementation == FUSED_ROUTER and hidden_states.device.type == "cpu":
            logits, weights, index = fused_route(self, hidden_states, is_image)  # the same function, compiled
        else:
            logits, weights, index = self._route(hidden_states, is_image)
        if self.invert:
            index = (index + 1) % self.num_experts
        return logits, weights, index

    def _route(self, hidden_states: torch.Tensor, is_image: torch.Tensor):
        """The eager router (`router_implementation="eager"`, the default): (logits, weights, index)."""
        mode = self.config.router_mode
        p = self.config.router_dropout if self.training and mode != "hard" else 0.0
        on_input = p > 0 and self.config.router_dropout_on == "input"
        logits = F.linear(hidden_states, self.weight)  # (tokens, E): the router's own logits, returned
        if mode == "modality_aware":
            modality_term = self.modality_proj(self.modality_embedding(is_image.long()))  # (tokens, E)
            logits = logits + modality_term
        decide = logits  # what the decision is taken from: the logits, perturbed by dropout in training
        if on_input:
            decide = F.linear(F.dropout(hidden_states, p), self.weight)
            decide = decide + modality_term if mode == "modality_aware" else decide
        elif p > 0:
            decide = F.dropout(logits, p)
        if self.config.router_bias_update_rate:
            decide = decide + self.expert_bias  # (tokens, E): the decision only, as DeepSeek-V3's bias
        if mode == "hard":
            vision, text = self.config.modality_to_expert["image"], self.config.modality_to_expert["text"]
            index = torch.where(is_image, vision, text).unsqueeze(-1)  # (tokens, 1)
            weights = torch.ones_like(index, dtype=hidden_states.dtype)
        elif mode == "softmax":
            probs = decide.float().softmax(dim=-1)
            weights, index = probs.topk(self.config.num_experts_per_tok, dim=-1)
            if self.config.num_experts_per_tok > 1:  # Mixtral renormalises top-k; top-1 keeps p (Switch) so
                weights = weights / weights.sum(dim=-1, keepdim=True)  # the router still gets a gradient
        else:  # gumbel, modality_aware: straight-through Gumbel-softmax top-1; argmax without noise in eval
            if self.training:
                gates = F.gumbel_softmax(decide.float(), tau=self.config.gumbel_tau, hard=True)  # (tokens, E)
            else:
                gates = F.one_hot(decide.argmax(dim=-1), self.num_experts).float()
            index = gates.argmax(dim=-1, keepdim=True)
            weights = gates.gather(-1, index)  # value 1, gradient through the soft sample
        return logits, weights.to(hidden_states.dtype), index


# transformers decides whether `experts_implementation=` may be set by finding this decorator in the model's source
# (`PreTrainedModel._can_set_experts_implementation`). `MixtralExperts.forward` already dispatches, so with the eager
# kernel the dispatch runs twice (one extra call); every other kernel is called directly.
@use_experts_implementation
class MoeVlmExperts(MixtralExperts):
    """`num_experts` SwiGLU experts shaped like Mistral's MLP, stacked as Mixtral's: `gate_up_proj` (E, 2I, H) and
    `down_proj` (E, H, I). Each token runs only through its chosen expert: `config._experts_implementation` picks
    the kernel (grouped_mm sorts tokens per expert; eager loops over experts, never tokens)."""


class MoeVlmSparseMoeBlock(nn.Module):
    """Router + experts. The modality mask travels in so `hard` and `modality_aware` routing can read it."""

    def __init__(self, config: MoeVlmConfig):
        super().__init__()
        self.gate = MoeVlmRouter(config)
        self.experts = MoeVlmExperts(config)

    def forward(self, hidden_states: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)  # (batch * seq, hidden)
        if modality_mask is None:
            is_image = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
        else:
            is_image = modality_mask.reshape(-1)
        _, weights, index = self.gate(flat, is_image)
        out = self.experts(flat, index, weights)  # (batch * seq, hidden)
        return out.reshape(batch, seq, hidden)


class MoeVlmDecoderLayer(MistralDecoderLayer):
    """Mistral's decoder layer; its MLP is an MoE block when the layer is listed in `config.moe_layers`.

    A dense layer runs Mistral's own forward. An MoE layer repeats its four lines because Mistral calls
    `self.mlp(hidden_states)` with no room for the modality mask the router reads (transformers' own modality-routed
    MoE, Ernie 4.5 VL MoE, does the same). Cache, positions and attention kwargs are never named here: they travel in
    `**kwargs` to Mistral's attention, so a rename upstream passes through unchanged.
    """

    def __init__(self, config: MoeVlmConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.is_moe = layer_idx in config.moe_layers
        if self.is_moe:
            self.mlp = MoeVlmSparseMoeBlock(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        modality_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        if not self.is_moe:
            return super().forward(hidden_states, **kwargs)
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual + hidden_states  # (batch, seq, hidden)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states), modality_mask)
        return residual + hidden_states


class MoeVlmVisionTower(nn.Module):
    """open_clip vision tower (frozen in every stage of the paper): a ViT, whose patch tokens (CLS removed) of block
    `vision_feature_layer` (penultimate by default, as LLaVA) feed the connector, or a `ModifiedResNet`, whose
    stage-`vision_feature_layer` feature map feeds it cell by cell (row-major), as a grid of tokens."""

    def __init__(self, config: MoeVlmConfig):
        super().__init__()
        vision: MoeVlmVisionConfig = config.vision_config
        # open_clip's own builder of CLIP.visual: the same module (and state-dict keys) as a CLIP model's tower,
        # so pretrained CLIP weights load as `visual.*`. It is private (open_clip 3.3 has no public builder of the
        # tower alone); tests/test_model.py names the break if a release renames it.
        self.visual = open_clip.model._build_vision_tower(
            vision.embed_dim, vision.vision_cfg, vision.quick_gelu
        )
        self.feature_layer = config.vision_feature_layer
        self.is_resnet = vision.is_resnet
        self.frozen = config.freeze_vision_tower

    def train(self, mode: bool = True):
        """A frozen tower stays in eval mode: `requires_grad_(False)` stops its weights, but in training mode a
        ResNet's BatchNorm would still move its running statistics (and a ViT's dropout would still fire), so the
        "frozen" features would drift during every stage."""
        return super().train(mode and not self.frozen)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> BaseModelOutput:
        """(images, 3, S, S) -> `last_hidden_state` (images, tokens, channels): the tokens of block
        `vision_feature_layer`. With `output_hidden_states`, every block runs and `hidden_states` holds, for a ViT,
        the block inputs and outputs, CLS included, as transformers' vision towers return them (embeddings + one per
        block), for a ResNet each stage's feature map as (images, cells, channels); with `output_attentions`, a
        ViT's `attentions` holds each block's (images, heads, tokens, tokens) weights (a ResNet has none)."""
        if self.is_resnet:
            return self._resnet_forward(pixel_values, output_hidden_states)
        hidden, attentions = [], []
        handles = self._record(hidden, attentions, output_hidden_states, output_attentions)
        try:
            out = self.visual.forward_intermediates(
                pixel_values,
                indices=[self.feature_layer],
                stop_early=not (output_hidden_states or output_attentions),
                intermediates_only=True,
                output_fmt="NLC",
            )
        finally:
            for handle in handles:
                handle.remove()
        return BaseModelOutput(
            last_hidden_state=out["image_intermediates"][0],
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def _resnet_forward(self, pixel_values: torch.Tensor, output_hidden_states: bool) -> BaseModelOutput:
        # ModifiedResNet.forward_intermediates returns NCHW maps only; the stages are indexed stem, layer1..layer4.
        out = self.visual.forward_intermediates(
            pixel_values,
            indices=None if output_hidden_states else [self.feature_layer],
            stop_early=not output_hidden_states,
            intermediates_only=True,
        )
        maps = [m.flatten(2).transpose(1, 2) for m in out["image_intermediates"]]  # (images, H*W, C) each
        chosen = maps[self.feature_layer % len(maps)] if output_hidden_states else maps[0]
        return BaseModelOutput(
            last_hidden_state=chosen, hidden_states=tuple(maps) if output_hidden_states else None
        )

    def _record(self, hidden: list, attentions: list, want_hidden: bool, want_attentions: bool) -> list:
        """Hooks on open_clip's blocks, for this call only: open_clip returns neither the embedding output nor
        attention weights (its blocks call `nn.MultiheadAttention` with `need_weights=False`), so they are read at
        the blocks, the weights by re-running each attention with `need_weights=True` (only when asked)."""
        transformer = getattr(self.visual, "transformer", None)
        if transformer is None or not (want_hidden or want_attentions):
            return []
        batch_first = getattr(transformer, "batch_first", True)

        def as_nld(x: torch.Tensor) -> torch.Tensor:
            return x if batch_first else x.transpose(0, 1)

        def weights(module, args, kwargs, output):
            kwargs = {**kwargs, "need_weights": True, "average_attn_weights": False}
            attentions.append(module.forward(*args, **kwargs)[1])  # (images, heads, tokens, tokens)

        blocks = transformer.resblocks
        handles = []
        if want_hidden:
            handles.append(
                blocks[0].register_forward_pre_hook(lambda m, args: hidden.append(as_nld(args[0])))
            )
            handles += [b.register_forward_hook(lambda m, a, out: hidden.append(as_nld(out))) for b in blocks]
        if want_attentions:
            handles += [b.attn.register_forward_hook(weights, with_kwargs=True) for b in blocks]
        return handles


class MoeVlmConnector(nn.Module):
    """Projects vision patch tokens into the LLM's embedding space: `linear` (the paper) or `mlp2x_gelu`
    (LLaVA-1.5, the authors' code)."""

    def __init__(self, config: MoeVlmConfig):
        super().__init__()
        in_dim = config.vision_config.feature_width(config.vision_feature_layer)
        self.linear_1 = nn.Linear(in_dim, config.hidden_size)
        if config.connector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)
        else:
            self.act = self.linear_2 = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(features)  # (images, patches, hidden)
        if self.linear_2 is not None:
            hidden = self.linear_2(self.act(hidden))
        return hidden


# Module types whose parameters `PreTrainedModel._init_weights` initialises itself.
_INITIALISED_BY_BASE = (
    nn.Linear,
    nn.Conv2d,
    nn.Embedding,
    nn.MultiheadAttention,
    nn.LayerNorm,
    nn.BatchNorm2d,
)


class MoeVlmPreTrainedModel(MistralPreTrainedModel):
    config: MoeVlmConfig
    config_class = MoeVlmConfig
    _no_split_modules = ["MoeVlmDecoderLayer"]
    _can_compile_fullgraph = False  # data-dependent dispatch
    # transformers 5.24 caches "can set experts implementation" on the class it first checks: once a plain
    # MistralModel was built in the process, its cached False is inherited here. Our experts support it.
    _can_set_experts_implementation_cached_value = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(MoeVlmRouter, index=0),
        "router_indices": OutputRecorder(MoeVlmRouter, index=2),
        "hidden_states": MoeVlmDecoderLayer,
        "attentions": MistralAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module):
        """Every weight, so a model materialised from the meta device (empty or partial state dict,
        `low_cpu_mem_usage`) is fully initialised. `transformers.initialization` functions skip tensors that were
        loaded, which in-place `.normal_()` would overwrite."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoeVlmExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, MoeVlmRouter):
            # The router has its own std (the authors': 0.05); None in a config resolves to initializer_range.
            router_std = self.config.router_init_std
            router_std = std if router_std is None else router_std
            init.normal_(module.weight, mean=0.0, std=router_std)
            init.normal_(module.modality_proj.weight, mean=0.0, std=router_std)
            init.normal_(module.modality_embedding.weight, mean=0.0, std=1.0)
            init.zeros_(module.expert_bias)
        elif type(module).__module__.startswith("open_clip") and not isinstance(module, _INITIALISED_BY_BASE):
            # open_clip's bare parameters (the ViT's class and positional embeddings and projection, the ResNet's
            # attention-pool embedding), unknown to the base class, at open_clip's own scale (width ** -0.5). Handled
            # on the module that owns them: transformers skips a module without direct parameters of its own.
            for param in module.parameters(recurse=False):
                init.normal_(param, mean=0.0, std=param.shape[-1] ** -0.5)

    def freeze_vision_tower(self) -> None:
        """The paper keeps CLIP frozen in every stage: no gradient, and not listed as trainable."""
        tower = getattr(self.base_model, "vision_tower", None)
        if tower is not None and self.config.freeze_vision_tower:
            tower.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' `from_pretrained`, unchanged in what it takes and returns (`output_loading_info=True` gives
        `(model, info)`), then the vision tower re-frozen: loading rebuilds every parameter with
        `requires_grad=True`."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_vision_tower()
        return loaded


class MoeVlmModel(MoeVlmPreTrainedModel, MistralModel):
    """Embeddings + vision tower + connector + decoder layers. Image features replace the `image_token_id`
    placeholders (count-checked, `masked_scatter`, as LLaVA); the same placeholder mask is the modality mask that
    hard routing reads."""

    def __init__(self, config: MoeVlmConfig):
        MoeVlmPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MoeVlmDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MoeVlmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MistralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        if config.vision_config is not None:
            self.vision_tower = MoeVlmVisionTower(config)
            self.connector = MoeVlmConnector(config)
        else:
            self.vision_tower = self.connector = None
        self.post_init()
        self.freeze_vision_tower()

    def _vision_side_trains(self) -> bool:
        """Whether a training forward must run the vision side even without images: some connector or tower
        parameter trains."""
        if not (self.training and torch.is_grad_enabled()) or self.vision_tower is None:
            return False
        vision = itertools.chain(self.connector.parameters(), self.vision_tower.parameters())
        return any(p.requires_grad for p in vision)

    def _vision_side_in_graph(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """A zero that depends on every trainable vision-side parameter: one blank image through the tower and the
        connector, times 0. A batch without images would otherwise leave them out of the graph, and under data
        parallelism a rank whose batch holds no image then skips their gradient collective while the others enter it
        (FSDP2 reduce-scatters the root's gradients in different sizes: gloo aborts with "Received data size doesn't
        match expected size", NCCL hangs; pytorch#158719). Their gradient here is exactly 0."""
        size = self.config.vision_config.image_size
        blank = torch.zeros(1, 3, size, size, device=inputs_embeds.device)
        features = self.get_image_features(blank, output_hidden_states=False, output_attentions=False)
        return 0.0 * features.pooler_output.to(inputs_embeds.dtype).sum()

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """(images, 3, S, S) -> transformers' image-features output (as LLaVA's): `pooler_output` (images,
        num_image_tokens, hidden) the connector's output, which replaces the placeholders; `last_hidden_state`
        (images, patches, width) the vision tower's patch tokens it was computed from; `hidden_states` / `attentions`
        of the tower with `output_hidden_states` / `output_attentions` (argument or config)."""
        if self.vision_tower is None:
            raise ValueError(
                "pixel_values were given but this model has no vision tower (config.vision_config=None)"
            )
        size = self.config.vision_config.image_size
        if (
            pixel_values.ndim != 4
            or pixel_values.shape[1] != 3
            or tuple(pixel_values.shape[2:]) != (size, size)
        ):
            raise ValueError(
                f"pixel_values must be (images, 3, {size}, {size}) for this vision tower, got {tuple(pixel_values.shape)};"
                " preprocess images with MoeVlmProcessor"
            )
        pixel_values = pixel_values.to(self.connector.linear_1.weight.dtype)
        flags = {
            name: bool(kwargs.get(name) if kwargs.get(name) is not None else getattr(self.config, name))
            for name in ("output_hidden_states", "output_attentions")
        }
        with torch.no_grad() if self.config.freeze_vision_tower else contextlib.nullcontext():
            tower = self.vision_tower(pixel_values, **flags)
        return BaseModelOutputWithPooling(
            last_hidden_state=tower.last_hidden_state,
            pooler_output=self.connector(tower.last_hidden_state),
            hidden_states=tower.hidden_states,
            attentions=tower.attentions,
        )

    @staticmethod
    def check_placeholders(modality_mask: torch.Tensor, image_features: torch.Tensor) -> None:
        n_tokens, n_features = int(modality_mask.sum()), image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image placeholders do not match: {n_tokens} placeholder tokens but "
                f"{image_features.shape[0]} image(s) x {image_features.shape[1]} tokens = {n_features}. Each image "
                "needs exactly one `<image>` marker (expanded by MoeVlmProcessor)."
            )

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        modality_mask: torch.BoolTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeVlmModelOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(images, 3, S, S)`): one per `<image>` marker, in order.
        modality_mask (`torch.BoolTensor` of shape `(batch, seq)`): True at image tokens; derived from
            `input_ids == config.image_token_id` when omitted.

        `cache` and everything else (positions, `use_cache`, `output_*` flags) go to Mistral's own forward unchanged,
        which also records the router outputs (`_can_record_outputs`). `past_key_values` is the deprecated name of
        `cache`, as on Mistral.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (batch, seq, hidden)
        if modality_mask is None:
            if input_ids is not None:
                modality_mask = input_ids == self.config.image_token_id
            else:
                modality_mask = torch.zeros(
                    inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device
                )
        modality_mask = modality_mask.to(device=inputs_embeds.device, dtype=torch.bool)  # (batch, seq)

        if pixel_values is not None:
            # only the connector's output: never the tower's hidden states or attentions, whatever the config says
            features = self.get_image_features(
                pixel_values, output_hidden_states=False, output_attentions=False
            )
            image_features = features.pooler_output.to(inputs_embeds.dtype)
            self.check_placeholders(modality_mask, image_features)
            mask = modality_mask.unsqueeze(-1).expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)
        elif self._is_prefill(cache) and bool(modality_mask.any()):  # no per-token host sync
            raise ValueError(
                f"input has {int(modality_mask.sum())} image placeholder tokens but no pixel_values; pass the images"
            )
        elif self._vision_side_trains():
            inputs_embeds = inputs_embeds + self._vision_side_in_graph(inputs_embeds)

        outputs = super().forward(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            modality_mask=modality_mask,
            return_dict=True,
            **kwargs,
        )
        router_logits = outputs.get("router_logits")
        return MoeVlmModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits,
            router_indices=outputs.get("router_indices"),
            modality_mask=modality_mask if router_logits is not None else None,
        )

    @staticmethod
    def _is_prefill(cache) -> bool:
        return cache is None or cache.get_seq_length() == 0


def _switch_balance(dispatched: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e over the rows `weight` selects (Switch eq. 4-6): dispatched (rows, E) counts, probs (rows, E)
    router probabilities, weight (rows,) 0/1. Zero where no row is selected."""
    n = weight.sum().clamp_min(1.0)
    share = (dispatched * weight[:, None]).sum(0) / n  # (E,) f_e
    mean_prob = (probs * weight[:, None]).sum(0) / n  # (E,) P_e
    return dispatched.shape[-1] * (share * mean_prob).sum()


def router_losses(
    router_logits: tuple[torch.Tensor, ...],
    router_indices: tuple[torch.Tensor, ...],
    modality_mask: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: MoeVlmConfig,
) -> dict[str, torch.Tensor]:
    """The unweighted router losses, from one log-softmax per layer (`ROUTER_LOSSES` names them and their
    coefficients).

    load balance = E * sum_e f_e * P_e (Switch eq. 4-6) with f_e the share of tokens dispatched to e (the actual
    dispatch, so Gumbel noise counts) and P_e the mean router probability, both pooled over layers as
    transformers' `load_balancing_loss_func` does (equal to it when dispatch is the top-k of the probabilities).
    modality balance = the same term within image tokens and within text tokens (pooled over layers), averaged over
    the modalities present. z-loss = mean logsumexp(logits)^2 (ST-MoE). specialisation = cross-entropy of the router
    towards `modality_to_expert` (the paper's future work: penalise leaving the Stage-2 roles). entropy floor =
    max(0, router_entropy_floor * log E - H(P_l)) with P_l layer l's mean router probability, averaged over layers:
    it reads no modality. Padding is excluded; z, specialisation and the entropy floor are means over layers.
    """
    num_experts = config.num_experts
    valid = (
        torch.ones_like(modality_mask)
        if attention_mask is None
        else attention_mask[:, -modality_mask.shape[1] :]
    )
    valid = valid.reshape(-1).float()  # (tokens,)
    n_valid = valid.sum().clamp_min(1.0)
    is_image = modality_mask.reshape(-1)
    target = torch.where(is_image, config.modality_to_expert["image"], config.modality_to_expert["text"])
    floor = config.router_entropy_floor * math.log(num_experts)
    dispatched_all, probs_all, z, spec, entropy_gap = [], [], [], [], []
    for logits, index in zip(router_logits, router_indices):
        log_probs = logits.float().log_softmax(dim=-1)  # the single softmax: (tokens, E)
        probs = log_probs.exp()
        dispatched_all.append(F.one_hot(index, num_experts).sum(dim=1).float())  # (tokens, E)
        probs_all.append(probs)
        logsumexp = logits.float()[:, 0] - log_probs[:, 0]  # log Z = logit - log p, for any column
        z.append((logsumexp.square() * valid).sum() / n_valid)
        spec.append(-(log_probs.gather(-1, target[:, None]).squeeze(-1) * valid).sum() / n_valid)
        mean_prob = (probs * valid[:, None]).sum(0) / n_valid  # (E,)
        entropy = -(mean_prob * mean_prob.clamp_min(1e-12).log()).sum()
        entropy_gap.append(F.relu(floor - entropy))
    dispatched, probs = (
        torch.cat(dispatched_all),
        torch.cat(probs_all),
    )  # (layers * tokens, E): pooled over layers
    rows = valid.repeat(len(router_logits))  # (layers * tokens,)
    image_rows = is_image.float().repeat(len(router_logits)) * rows
    per_modality = [_switch_balance(dispatched, probs, w) for w in (image_rows, rows - image_rows) if w.any()]
    return {
        "load_balancing_loss": _switch_balance(dispatched, probs, rows),
        "z_loss": torch.stack(z).mean(),
        "specialisation_loss": torch.stack(spec).mean(),
        "modality_balancing_loss": torch.stack(per_modality).mean() if per_modality else rows.sum() * 0,
        "entropy_floor_loss": torch.stack(entropy_gap).mean(),
    }


class MoeVlmForCausalLM(MoeVlmPreTrainedModel, MistralForCausalLM):
    """The VLM with a language-modelling head. `from_mistral` upcycles a dense Mistral (Stage 0);
    `set_router_mode` / `set_invert_routing` switch routing on a loaded model without reloading weights."""

    def __init__(self, config: MoeVlmConfig):
        MoeVlmPreTrainedModel.__init__(self, config)
        self.model = MoeVlmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # Generated tokens are text: never sample the image placeholder.
        if self.generation_config is None:
            self.generation_config = GenerationConfig.from_model_config(config)
        self.generation_config.suppress_tokens = [config.image_token_id]

    # ----- routing switches -------------------------------------------------------------------------------------
    def moe_blocks(self) -> dict[int, MoeVlmSparseMoeBlock]:
        """MoE blocks keyed by decoder-layer index."""
        return {i: layer.mlp for i, layer in enumerate(self.model.layers) if layer.is_moe}

    def set_router_mode(self, mode: str) -> None:
        """Switch routing (`hard` | `gumbel` | `softmax` | `modality_aware`) in place; weights are untouched."""
        self.config.check_router_mode(mode)
        self.config.router_mode = mode

    def set_router_bias_update_rate(self, rate: float) -> None:
        """Turn auxiliary-loss-free balancing on (`rate` > 0: every router adds its `expert_bias` to the logits it
        decides from, and saves it) or off (0: no bias added or saved). The trainer moves the bias
        (`trainer.bias_balancing`); a bias already learned is kept, whatever the rate."""
        self.config.router_bias_update_rate = rate
        for block in self.moe_blocks().values():
            block.gate.use_expert_bias(bool(rate))

    def set_invert_routing(self, invert: bool = True, layers: list[int] | None = None) -> None:
        """Send each token to the other expert in `layers` (default: every MoE layer) — the crossover test.
        Layers not listed are reset to normal routing."""
        blocks = self.moe_blocks()
        chosen = set(blocks) if layers is None else set(layers)
        unknown = chosen - set(blocks)
        if unknown:
            raise ValueError(f"layers {sorted(unknown)} are not MoE layers; MoE layers are {sorted(blocks)}")
        for i, block in blocks.items():
            block.gate.invert = bool(invert) and i in chosen

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]):
        """`MoeVlmModel.get_image_features`, reachable from the head model as on LLaVA."""
        return self.model.get_image_features(pixel_values, **kwargs)

    # ----- generation -------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, *args, **kwargs):
        """Mistral's, plus the modality mask cut to the tokens this step feeds (all of them without a cache, the new
        ones with it); pixel values are kept at prefill only, by transformers' own rule for multimodal inputs."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        mask = inputs.get("modality_mask")
        fed = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        if mask is not None and fed is not None:
            inputs["modality_mask"] = mask[:, -fed.shape[1] :]
        return inputs

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs, *args, num_new_tokens: int = 1, **kwargs
    ):
        """An explicit modality mask grows with the sequence like the attention mask: generated tokens are text."""
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, *args, num_new_tokens=num_new_tokens, **kwargs
        )
        mask = model_kwargs.get("modality_mask")
        if mask is not None:
            new = mask.new_zeros(mask.shape[0], num_new_tokens)  # (batch, new), False
            model_kwargs["modality_mask"] = torch.cat([mask, new], dim=-1)
        return model_kwargs

    def _needs_router_outputs(self, requested: bool) -> bool:
        return bool(self.config.moe_layers) and (requested or self.config.router_losses_weighted)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        modality_mask: torch.BoolTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeVlmCausalLMOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(images, 3, S, S)`): one per `<image>` marker, in order.
        modality_mask (`torch.BoolTensor` of shape `(batch, seq)`): True at image tokens; derived from
            `input_ids == config.image_token_id` when omitted.
        output_router_logits (`bool`): return per-MoE-layer router logits and chosen experts (default:
            `config.output_router_logits`).
        shift_labels (`torch.LongTensor`, in kwargs): pre-shifted targets (sequence/context parallelism), used
            instead of shifting `labels`, as transformers' causal-LM loss does.

        `cache`, positions and `use_cache` go to the base model unchanged (`past_key_values` is the deprecated name
        of `cache`, as on Mistral).
        """
        requested = self.config.output_router_logits if output_router_logits is None else output_router_logits
        need_router = self._needs_router_outputs(requested)
        outputs: MoeVlmModelOutputWithPast = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            modality_mask=modality_mask,
            output_router_logits=need_router,
            output_router_indices=need_router,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (batch, seq, hidden)
        loss = logits = None
        if labels is not None and self.training:
            # Logits only where labels need them: with a 32k vocabulary the LM head dominates a small model.
            shift_labels = kwargs.pop("shift_labels", None)
            if shift_labels is None:  # (batch, seq): the label of the next token
                shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
            keep = shift_labels != -100
            selected = self.lm_head(hidden_states[keep])  # (labelled tokens, vocab)
            loss = self.loss_function(
                logits=selected[None], labels=None, shift_labels=shift_labels[keep][None],
                vocab_size=self.config.vocab_size, **kwargs,
            )  # fmt: skip
        else:
            logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
            if labels is not None:
                loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)

        terms, aux_loss = {}, None
        cfg = self.config
        weighted = cfg.router_losses_weighted
        if outputs.router_logits and (labels is not None or weighted):  # not on every generation step
            terms = router_losses(
                outputs.router_logits, outputs.router_indices, outputs.modality_mask, attention_mask, cfg
            )
            aux_loss = sum(getattr(cfg, coef) * terms[term] for coef, term in ROUTER_LOSSES.items())
            if loss is not None and weighted:
                loss = loss + aux_loss.to(loss.device)

        return MoeVlmCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if requested else None,
            router_indices=outputs.router_indices if requested else None,
            modality_mask=outputs.modality_mask if requested else None,
            **terms,
        )

    # ----- upcycling (Stage 0) ----------------------------------------------------------------------------------
    @classmethod
    def from_mistral(
        cls,
        mistral,
        *,
        vision=None,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        **config_overrides,
    ) -> "MoeVlmForCausalLM":
        """Upcycle a dense Mistral into the MoE VLM (the paper's Stage 0; the authors' `create_moe_model`).

        Attention, norms, embeddings and head are copied; every expert of an MoE layer is a copy of that layer's
        dense MLP (experts identical at initialisation, as in the paper); routers and the connector are freshly
        initialised from `seed`. `mistral` is a `MistralForCausalLM`, a local path or a Hub id. `vision` is an
        open_clip `CLIP` model, its `.visual` tower or that tower's state dict, whose weights are copied in, or
        `"NAME:TAG"` (e.g. `"ViT-L-14:openai"`, downloaded by open_clip), or None (tower randomly initialised from
        `config_overrides["vision_config"]`). `config_overrides` set any `MoeVlmConfig` field.
        """
        if isinstance(mistral, str):
            mistral = MistralForCausalLM.from_pretrained(mistral, dtype=dtype or torch.float32)
        dense_cfg = mistral.config.to_dict()
        for key in (
            "model_type",
            "architectures",
            "auto_map",
            "transformers_version",
            "dtype",
            "torch_dtype",
        ):
            dense_cfg.pop(key, None)
        vision_state = None
        if isinstance(vision, str):
            name, _, tag = vision.partition(":")
            vision_state = open_clip.create_model(name, pretrained=tag or None).visual.state_dict()
            config_overrides["vision_config"] = {"model_name": name, "pretrained": tag or None}
        elif isinstance(vision, dict):
            vision_state = vision
        elif vision is not None:
            vision_state = getattr(vision, "visual", vision).state_dict()
        config = MoeVlmConfig(**{**dense_cfg, **config_overrides})

        torch.manual_seed(seed)
        model = cls(config)
        if dtype is not None:
            model = model.to(dtype)
        dense_state = mistral.state_dict()
        target = model.state_dict()
        moe_layers = set(config.moe_layers)
        with torch.no_grad():
            for key, value in dense_state.items():
                if key in target and target[key].shape == value.shape:
                    target[key].copy_(value)
            for i in moe_layers:
                prefix = f"model.layers.{i}.mlp."
                gate_up = torch.cat(
                    [dense_state[prefix + "gate_proj.weight"], dense_state[prefix + "up_proj.weight"]]
                )
                experts = model.model.layers[i].mlp.experts
                experts.gate_up_proj.copy_(gate_up.unsqueeze(0).expand_as(experts.gate_up_proj))
                experts.down_proj.copy_(
                    dense_state[prefix + "down_proj.weight"].unsqueeze(0).expand_as(experts.down_proj)
                )
            if vision_state is not None:
                missing, unexpected = model.model.vision_tower.visual.load_state_dict(
                    vision_state, strict=False
                )
                if missing or unexpected:
                    raise ValueError(
                        f"the given vision tower does not match vision_config: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}"
                    )
        model.freeze_vision_tower()
        return model


__all__ = [
    "MoeVlmCausalLMOutputWithPast",
    "MoeVlmConnector",
    "MoeVlmDecoderLayer",
    "MoeVlmExperts",
    "MoeVlmForCausalLM",
    "MoeVlmModel",
    "MoeVlmModelOutputWithPast",
    "MoeVlmPreTrainedModel",
    "MoeVlmRouter",
    "MoeVlmSparseMoeBlock",
    "MoeVlmVisionTower",
    "router_losses",
]
