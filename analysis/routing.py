"""Run one (image, text) sample through a model and read per-layer routing from its outputs.

The router outputs travel in the model's output dataclass (`router_logits`, `router_indices`, `modality_mask`);
this module only reads them, so the CLI, the analyses and the Space see exactly what the model recorded.

The text goes in as it is (`raw`, the caption format) or as the user's turn of the processor's chat template
(`chat`, the `[INST]` format an instruction-tuned Stage 3 model was trained on); see `build_prompt`.
"""

from __future__ import annotations

import torch


def build_prompt(processor, text: str, prompt_format: str = "raw") -> str:
    """The model's text for a person's `text` (with its `<image>` marker): `raw` -> `text` as it is; `chat` -> `text`
    as the user's turn of the processor's chat template, ending where the answer starts (`... [/INST]`)."""
    if prompt_format == "raw":
        return text
    if prompt_format == "chat":
        if getattr(processor, "chat_template", None) is None:
            raise ValueError("prompt_format 'chat' needs a processor with a chat template; this one has none")
        return processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    raise ValueError(f"prompt_format must be 'raw' or 'chat', got {prompt_format!r}")


@torch.no_grad()
def route_sample(model, processor, image, text: str, prompt_format: str = "raw") -> dict:
    """Per-MoE-layer routing of one sample: for each layer, the tokens of each modality dispatched to each
    expert, the mean router probability of each expert, and the per-token choices.

    `prompt_format`: `raw` or `chat` (see `build_prompt`).

    Returns `{"tokens": [str], "is_image": [bool], "prompt_format": str, "layers": {layer_idx: {"choice": [int],
    "prob": [[float]], "counts": {"image": [n_e...], "text": [n_e...]}}}}`.
    """
    text = build_prompt(processor, text, prompt_format)
    inputs = processor(images=[image] if image is not None else None, text=[text], return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    out = model(**inputs, output_router_logits=True)
    is_image = out.modality_mask[0].cpu()  # (seq,)
    num_experts = model.config.num_experts
    layers = {}
    for layer_idx, logits, index in zip(model.config.moe_layers, out.router_logits, out.router_indices):
        choice = index[:, 0].cpu()  # (seq,) top-1 expert of each token (batch of one)
        probs = logits.float().softmax(-1).cpu()  # (seq, E)
        layers[layer_idx] = {
            "choice": choice.tolist(),
            "prob": probs.tolist(),
            "counts": {
                "image": torch.bincount(choice[is_image], minlength=num_experts).tolist(),
                "text": torch.bincount(choice[~is_image], minlength=num_experts).tolist(),
            },
        }
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    return {"tokens": tokens, "is_image": is_image.tolist(), "prompt_format": prompt_format, "layers": layers}


def format_routing(routing: dict) -> str:
    """A per-layer table a person can read: how many image / text tokens each expert took."""
    first = next(iter(routing["layers"].values()), None)
    if first is None:
        return "this model has no MoE layers (dense)"
    num_experts = len(first["counts"]["image"])
    header = "layer | " + " | ".join(f"image->e{e}" for e in range(num_experts))
    header += " | " + " | ".join(f"text->e{e}" for e in range(num_experts))
    lines = [header, "-" * len(header)]
    for layer_idx, layer in routing["layers"].items():
        cells = [f"{n:>10d}" for n in layer["counts"]["image"]] + [
            f"{n:>9d}" for n in layer["counts"]["text"]
        ]
        lines.append(f"{layer_idx:>5} | " + " | ".join(cells))
    return "\n".join(lines)
