"""The model-running half of the analyses: forward passes that turn a model and probe records into the arrays the
pure functions in this package take.

Every quantity is read from the model's outputs (`hidden_states`, `router_logits`, `router_indices`,
`modality_mask`, `loss`); one batched pass serves every requested layer. Records follow the Shapes/COCO schemas of
`trainer.data` (`image`, `caption`, `concept` / `compound`, `references`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .captioning import caption_prompt


def _batches(records: Sequence, batch_size: int, desc: str):
    for start in tqdm(range(0, len(records), batch_size), desc=desc, leave=False):
        yield records[start : start + batch_size]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def probe_states(model, processor, records: Sequence, batch_size: int = 16, desc: str = "probe") -> dict:
    """Per record, the hidden state mean-pooled over its image tokens (the image alone, `<image>`) and over its
    caption tokens (the caption alone; BOS and padding excluded wherever they sit), at every layer, in one pass per batch of images + captions.

    Returns `{"visual": (L+1, M, D), "textual": (L+1, M, D)}` float32 numpy, index 0 = the input embeddings and
    index i + 1 = the output of decoder layer i (the last one after the final norm, transformers' convention).
    """
    visual, textual = [], []
    device = _device(model)
    for batch in _batches(list(records), batch_size, desc):
        images = [r["image"].convert("RGB") for r in batch]
        texts = ["<image>"] * len(batch) + [r["caption"] for r in batch]
        inputs = processor(images=images, text=texts, return_tensors="pt").to(device)
        out = model(
            **inputs, output_hidden_states=True, logits_to_keep=1
        )  # no full-vocabulary logits: 4x faster
        hidden = torch.stack(out.hidden_states).float()  # (L+1, 2b, T, D)
        image_mask = inputs["input_ids"] == model.config.image_token_id  # (2b, T)
        text_mask = caption_token_mask(
            inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id, processor.tokenizer
        )
        b = len(batch)
        visual.append(_masked_mean(hidden[:, :b], image_mask[:b]).cpu())
        textual.append(_masked_mean(hidden[:, b:], text_mask[b:]).cpu())
    return {"visual": torch.cat(visual, 1).numpy(), "textual": torch.cat(textual, 1).numpy()}


def caption_token_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, tokenizer
) -> torch.Tensor:
    """(B, T) bool: the caption's own tokens, i.e. neither padding, nor image placeholders, nor BOS / EOS. BOS is
    found by its id, wherever it sits: with left padding it is mid-row, not in column 0."""
    specials = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None]
    return (
        attention_mask.bool()
        & (input_ids != image_token_id)
        & ~torch.isin(input_ids, torch.tensor(specials, dtype=input_ids.dtype, device=input_ids.device))
    )


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # hidden (L, B, T, D), mask (B, T) -> (L, B, D)
    weights = mask.float() / mask.sum(-1, keepdim=True).clamp_min(1)
    return torch.einsum("lbtd,bt->lbd", hidden, weights)


@torch.no_grad()
def routing_arrays(model, collator, records: Sequence, batch_size: int = 16) -> dict:
    """Router outputs over real (image + caption) sequences: per MoE layer the top-1 choice and the softmax
    probabilities of every non-padding token, and which tokens are image tokens.

    Returns `{"is_image": (T,) bool, "layers": {layer: {"choices": (T,), "probs": (T, E)}}}` (numpy).
    """
    device = _device(model)
    layers = {i: {"choices": [], "probs": []} for i in model.config.moe_layers}
    is_image = []
    for batch in _batches(list(records), batch_size, "routing"):
        inputs = {k: v.to(device) for k, v in collator(batch).items() if k != "labels"}
        out = model(**inputs, output_router_logits=True)
        valid = inputs["attention_mask"].reshape(-1).bool()
        is_image.append(out.modality_mask.reshape(-1)[valid].cpu())
        for layer, logits, index in zip(model.config.moe_layers, out.router_logits, out.router_indices):
            layers[layer]["choices"].append(index[valid, 0].cpu())
            layers[layer]["probs"].append(logits[valid].float().softmax(-1).cpu())
    return {
        "is_image": torch.cat(is_image).numpy(),
        "layers": {i: {k: torch.cat(v).numpy() for k, v in d.items()} for i, d in layers.items()},
    }


@torch.no_grad()
def mean_loss(model, collator, records: Sequence, batch_size: int = 16) -> float:
    """Token-weighted mean caption loss over `records` (labels from the collator: caption tokens only)."""
    device = _device(model)
    total, count = 0.0, 0
    for batch in _batches(list(records), batch_size, "loss"):
        inputs = {k: v.to(device) for k, v in collator(batch).items()}
        n = int((inputs["labels"][:, 1:] != -100).sum())
        total += float(model(**inputs).loss) * n
        count += n
    return total / max(count, 1)


def crossover_test(model, collator, records: Sequence, batch_size: int = 16) -> dict:
    """The paper's crossover test: mean loss with every token sent to the other expert vs normal routing, as a
    percentage increase, overall and one MoE layer at a time. Routing is restored afterwards."""
    normal = mean_loss(model, collator, records, batch_size)
    per_layer = {}
    try:
        model.set_invert_routing(True)
        inverted = mean_loss(model, collator, records, batch_size)
        for layer in model.config.moe_layers:
            model.set_invert_routing(True, layers=[layer])
            loss = mean_loss(model, collator, records, batch_size)
            per_layer[layer] = {"loss": loss, "increase_pct": 100.0 * (loss - normal) / normal}
    finally:
        model.set_invert_routing(False)
    return {
        "normal_loss": normal,
        "inverted_loss": inverted,
        "increase_pct": 100.0 * (inverted - normal) / normal,
        "per_layer": per_layer,
        "router_mode": model.config.router_mode,
        "n_samples": len(records),
    }


@torch.no_grad()
def expert_outputs(model, collator, records: Sequence, max_tokens: int = 2048, batch_size: int = 16) -> dict:
    """Both experts of every MoE layer applied to the same tokens (the inputs that layer's MoE block received),
    for the expert-function analysis (CKA). Computing every expert on every token is deliberate here: it is a
    measurement, not the forward path.

    Returns `{layer: (E, n, H)}` float32 numpy with n <= max_tokens real tokens.
    """
    device = _device(model)
    blocks = model.moe_blocks()
    captured = {i: [] for i in blocks}
    hooks = [
        block.register_forward_hook(lambda mod, args, out, i=i: captured[i].append(args[0].detach()))
        for i, block in blocks.items()
    ]
    try:
        n = 0
        for batch in _batches(list(records), batch_size, "experts"):
            inputs = {k: v.to(device) for k, v in collator(batch).items() if k != "labels"}
            valid = inputs["attention_mask"].bool()
            model(**inputs)
            for i in blocks:
                captured[i][-1] = captured[i][-1][valid]  # (tokens, H)
            n += int(valid.sum())
            if n >= max_tokens:
                break
    finally:
        for hook in hooks:
            hook.remove()
    result = {}
    for i, block in blocks.items():
        tokens = torch.cat(captured[i])[:max_tokens]  # (n, H)
        experts = block.experts
        outs = []
        for e in range(experts.num_experts):
            index = torch.full((tokens.shape[0], 1), e, dtype=torch.long, device=tokens.device)
            weights = torch.ones_like(index, dtype=tokens.dtype)
            outs.append(experts(tokens, index, weights).float().cpu())
        result[i] = torch.stack(outs).numpy()
    return result


def expert_weights(model) -> dict:
    """`{layer: {"gate_up_proj": (E, 2I, H), "down_proj": (E, H, I)}}` as float32 numpy."""
    return {
        i: {
            "gate_up_proj": block.experts.gate_up_proj.detach().float().cpu().numpy(),
            "down_proj": block.experts.down_proj.detach().float().cpu().numpy(),
        }
        for i, block in model.moe_blocks().items()
    }


@torch.no_grad()
def generate_captions(
    model,
    processor,
    records: Sequence,
    prompt: str | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    prompt_format: str = "raw",
    prompts: Sequence[str] | None = None,
) -> dict[str, str]:
    """Greedy captions for `records` (batched, left-padded so every prompt ends where generation starts).

    `prompt_format`: `raw` (the caption prompt `<image>\\n`, the default) or `chat` (the chat template asking to
    describe the image, the format Stage 3 trains on); see `analysis.captioning.caption_prompt`. `prompt`, when
    given, is used as it is instead (one `<image>` marker). `prompts`, when given, is one such prompt per record
    (e.g. a question each: `analysis.instruction`) and replaces both."""
    records = list(records)
    if prompts is None:
        prompt = caption_prompt(processor, prompt_format) if prompt is None else prompt
        prompts = [prompt] * len(records)
    elif len(prompts := list(prompts)) != len(records):
        raise ValueError(
            f"prompts has {len(prompts)} entries for {len(records)} records; give one per record"
        )
    device = _device(model)
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    captions = {}
    try:
        tokenizer.padding_side = "left"
        for batch in _batches(list(zip(records, prompts)), batch_size, "captions"):
            images = [r["image"].convert("RGB") for r, _ in batch]
            inputs = processor(images=images, text=[p for _, p in batch], return_tensors="pt").to(device)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            captions.update({str(r["id"]): t.strip() for (r, _), t in zip(batch, texts)})
    finally:
        tokenizer.padding_side = side
    return captions


def concept_labels(records: Sequence, key: str) -> tuple[list[str], np.ndarray]:
    """Sorted distinct values of `key` and each record's index into them."""
    names = sorted({str(r[key]) for r in records})
    lookup = {name: i for i, name in enumerate(names)}
    return names, np.array([lookup[str(r[key])] for r in records])
