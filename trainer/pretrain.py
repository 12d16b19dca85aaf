"""Pretraining of the embedded default's frozen parts (paper scale replaces this with Mistral-7B-v0.3 and ViT-L-14).

The paper keeps CLIP and the LLM frozen through Stages 1–2, so on the embedded default (no download) they must first
carry real signal:

* a tiny open_clip `CLIP` (the preset's vision tower + a small text tower, open_clip's own model, tokenizer and
  `ClipLoss`) trained contrastively on Shapes image–caption pairs (every reference caption of every image);
  reported: image→text and text→image retrieval accuracy on held-out validation pairs;
* the preset's dense `MistralForCausalLM` trained as a causal LM on Shapes text (the captions and the instruction
  conversations, with the real Mistral tokenizer, in exactly the format the VLM later sees, packed into blocks);
  reported: perplexity on held-out validation captions.

Output (`--out DIR`): `DIR/clip.safetensors` (for `moe-vlm init --vision FILE`), `DIR/mistral/` (for `--mistral`),
the run folders `DIR/clip_run`, `DIR/lm_run` (checkpoints, logs), `recipe.yaml` and the marker, written last.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import math
import random
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import MistralConfig, MistralForCausalLM, Trainer
from transformers.trainer_utils import get_last_checkpoint

from configuration import build_processor, load_preset
from modeling_moe_vlm import MoeVlmConfig
from modeling_moe_vlm.modeling_moe_vlm import MoeVlmVisionTower

from .data import IGNORE_INDEX, MoeVlmCollator
from .data.shapes import COLOURS, SHAPES, captions, concept_caption, random_scene, render_scene
from .recipes import PretrainArguments, Recipe, write_resolved_recipe
from .stage_data import load_split
from .stage_dirs import clear_marker, remove_checkpoints, write_marker
from .vision_probe import vision_probe

CLIP_FILE = "clip.safetensors"
MISTRAL_DIR = "mistral"
CLIP_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer (BPE shipped inside open_clip)


# ----- CLIP ---------------------------------------------------------------------------------------------------------
def build_clip(config: MoeVlmConfig, pretrain: PretrainArguments):
    """open_clip's `CLIP` whose `.visual` is exactly the preset's vision tower (same builder, same keys)."""
    import open_clip

    vision = config.vision_config
    text_cfg = {
        "context_length": pretrain.clip_context_length,
        "vocab_size": CLIP_VOCAB_SIZE,
        "width": pretrain.clip_text_width,
        "heads": pretrain.clip_text_heads,
        "layers": pretrain.clip_text_layers,
    }
    return open_clip.CLIP(vision.embed_dim, vision.vision_cfg, text_cfg, quick_gelu=vision.quick_gelu)


class CaptionPairs(Dataset):
    """Every (image, reference caption) pair of a caption split: item i is image i // k with its reference i % k."""

    def __init__(self, split):
        self.split = split
        self.references = split["references"]  # column access: no image is decoded
        self.offsets = [0]
        for refs in self.references:
            self.offsets.append(self.offsets[-1] + len(refs))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> dict:
        row = bisect.bisect_right(self.offsets, i) - 1
        return {"image": self.split[row]["image"], "caption": self.references[row][i - self.offsets[row]]}


class FreshCaptionPairs(Dataset):
    """`n` Shapes scenes rendered on demand, one caption each. Item i is drawn from its own random stream
    (`moe-vlm-clip-pretrain/<seed>/<i>`), so it is the same on every call (a resumed run sees the same data) and no
    image repeats within a run; read in order.

    Streaming fresh images lets the tiny conv tower learn some shape (on the 4,000 fixed training images it learnt
    colour only; DESIGN.md, "Turn-3 facts"), but with the world's captions it learns shape slowly: a caption names
    size, position and background too, and those alone tell most pairs of a batch apart, so the contrastive loss
    rarely needs the shape. `concept_grid` removes that shortcut: every block of `GRID_SIZE` consecutive items is the
    whole colour x shape grid (each colour once per row of shapes, both orders random per block), captioned by the
    concepts alone ("A red circle."), so within a batch no two captions are equal (no false negatives) and only
    shape tells apart the pairs that share a colour. `two_object_share` of the grid's scenes get a second, random
    object, named after the first ("A red circle and a blue star."). Measured: docs/experiments.md."""

    GRID_SIZE = len(COLOURS) * len(SHAPES)

    def __init__(
        self, n: int, seed: int, image_size: int, concept_grid: bool = False, two_object_share: float = 0.0
    ):
        self.n, self.seed, self.image_size = n, seed, image_size
        self.concept_grid, self.two_object_share = bool(concept_grid), float(two_object_share)

    def __len__(self) -> int:
        return self.n

    def grid_cell(self, i: int) -> tuple[str, str]:
        """The (colour, shape) of item i's cell in its block's grid."""
        block = random.Random(f"moe-vlm-clip-pretrain/{self.seed}/grid/{i // self.GRID_SIZE}")
        colours = block.sample(list(COLOURS), len(COLOURS))
        rows = [block.sample(list(SHAPES), len(SHAPES)) for _ in colours]
        row, column = divmod(i % self.GRID_SIZE, len(SHAPES))
        return colours[row], rows[row][column]

    def __getitem__(self, i: int) -> dict:
        rng = random.Random(f"moe-vlm-clip-pretrain/{self.seed}/{i}")
        if not self.concept_grid:
            scene = random_scene(rng)
            return {"image": render_scene(scene, self.image_size), "caption": captions(scene, rng, 1)[0]}
        colour, shape = self.grid_cell(i)
        if rng.random() < self.two_object_share:
            scene = random_scene(
                rng, 2, shapes=[shape, rng.choice(SHAPES)], colours=[colour, rng.choice(list(COLOURS))]
            )
        else:
            scene = random_scene(rng, 1, shapes=[shape], colours=[colour])
        caption = concept_caption([(o.colour, o.shape) for o in scene.objects])
        return {"image": render_scene(scene, self.image_size), "caption": caption}


class ClipCollator:
    """Pairs -> `pixel_values` (the VLM processor's own preprocessing) and open_clip token ids `text`."""

    def __init__(self, image_processor, context_length: int):
        import open_clip

        self.image_processor = image_processor
        self.text_tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)

    def __call__(self, records) -> dict[str, torch.Tensor]:
        images = [r["image"].convert("RGB") for r in records]
        return {
            "pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"],
            "text": self.text_tokenizer([r["caption"] for r in records]),  # (batch, context_length)
        }


class ClipPretrainer(Trainer):
    """Contrastive training with open_clip's `ClipLoss` (features gathered across processes, with gradients)."""

    loss_is_scaled_for_ga = False  # ClipLoss is a per-batch mean

    def __init__(self, *args, **kwargs):
        import open_clip

        super().__init__(*args, **kwargs)
        self.clip_loss = open_clip.ClipLoss(
            gather_with_grad=True, rank=self.args.process_index, world_size=self.args.world_size
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        image_features, text_features, logit_scale = model(inputs["pixel_values"], inputs["text"])
        loss = self.clip_loss(image_features, text_features, logit_scale)
        return (loss, (image_features, text_features)) if return_outputs else loss


@torch.no_grad()
def retrieval_accuracy(clip, collator: ClipCollator, split, batch_size: int = 128) -> dict:
    """Image→text and text→image top-1 / top-5 accuracy over held-out pairs (each image with its `caption`).

    A retrieved item counts as correct when it is the query's pair or carries the identical caption (two images
    both captioned "A red circle." cannot be told apart by the caption). `chance` is the expected top-1 accuracy of a
    random ranking under that rule.
    """
    clip.eval()
    captions = split["caption"]
    image_features, text_features = [], []
    for start in tqdm(range(0, len(split), batch_size), desc="retrieval eval", leave=False):
        batch = collator([split[i] for i in range(start, min(start + batch_size, len(split)))])
        image_features.append(clip.encode_image(batch["pixel_values"], normalize=True))
        text_features.append(clip.encode_text(batch["text"], normalize=True))
    similarity = torch.cat(image_features) @ torch.cat(text_features).T  # (images, texts)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([ids[c] for c in captions])  # equal captions share an id
    same = caption_id[:, None] == caption_id[None, :]  # (N, N)

    def top_k(scores: torch.Tensor, k: int) -> float:
        ranked = scores.topk(k, dim=1).indices  # (N, k)
        return float(same.gather(1, ranked).any(dim=1).float().mean())

    return {
        "image_to_text_top1": top_k(similarity, 1),
        "image_to_text_top5": top_k(similarity, 5),
        "text_to_image_top1": top_k(similarity.T, 1),
        "text_to_image_top5": top_k(similarity.T, 5),
        "chance_top1": float(same.float().mean()),
        "n_pairs": len(captions),
    }


def _vision_probe(clip, config: MoeVlmConfig, processor, clip_collator: ClipCollator, seed: int) -> dict:
    """`trainer.vision_probe` on the VLM's own feature path: a `MoeVlmVisionTower` sharing `clip.visual`."""
    tower = MoeVlmVisionTower(config)
    tower.visual = clip.visual
    return vision_probe(
        clip,
        tower,
        processor.image_processor,
        clip_collator.text_tokenizer,
        config.vision_config.image_size,
        seed,
    )


# ----- language model -----------------------------------------------------------------------------------------------
def text_records(captions_split, instruct_split) -> list[dict]:
    """Shapes text without images: every reference caption, and every conversation with its `<image>` marker
    removed, as records the `MoeVlmCollator` formats exactly as the VLM stages will."""
    records = [{"caption": c} for refs in captions_split["references"] for c in refs]
    for turns in instruct_split["conversations"]:
        records.append(
            {"conversations": [{**t, "value": t["value"].replace("<image>", "").strip()} for t in turns]}
        )
    return records


def packed_blocks(records: list[dict], collator: MoeVlmCollator, block_size: int) -> list[list[int]]:
    """Every text in the VLM's format, concatenated and cut into `block_size`-token blocks (causal-LM packing, as
    transformers' run_clm does): no padding, so every position the 32k-vocabulary head computes is trained on."""
    encoded = (collator.encode(record, i).input_ids for i, record in enumerate(records))
    stream = [token for ids in tqdm(encoded, total=len(records), desc="tokenising LM text") for token in ids]
    return [
        stream[start : start + block_size] for start in range(0, len(stream) - block_size + 1, block_size)
    ]


def packed_collator(blocks: list[list[int]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(blocks)  # (batch, block_size)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


@torch.no_grad()
def perplexity(model, collator: MoeVlmCollator, records: list[dict], batch_size: int = 64) -> float:
    """exp(mean negative log-likelihood per labelled token) — the caption and its `</s>` under the collator's
    labels, as the VLM is scored."""
    model.eval()
    nll, n_tokens = 0.0, 0
    for start in tqdm(range(0, len(records), batch_size), desc="perplexity eval", leave=False):
        batch = collator(records[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]  # (batch, seq - 1): the next token's label
        keep = targets != IGNORE_INDEX
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1][keep], targets[keep], reduction="sum"))
        n_tokens += int(keep.sum())
    return math.exp(nll / max(n_tokens, 1))


# ----- the run ------------------------------------------------------------------------------------------------------
def preset_config(preset: str) -> MoeVlmConfig:
    spec = load_preset(preset)
    return MoeVlmConfig(**{**spec["mistral_config"], **spec["moe_vlm"]})


def _sub_run(training, output_dir: Path, steps: int, learning_rate: float, batch_size: int):
    """The shared TrainingArguments with one part's output folder, steps, learning rate and batch size. A shallow
    copy, not `dataclasses.replace`: a new TrainingArguments would set up its device again, which resets
    accelerate's shared process state under a distributed launch."""
    args = copy.copy(training)
    args.output_dir = str(output_dir)
    args.max_steps = steps
    args.learning_rate = learning_rate
    args.per_device_train_batch_size = batch_size
    args.remove_unused_columns = False  # the collators read raw records
    return args


def _resume_point(training, output_dir: Path):
    return (
        get_last_checkpoint(str(output_dir))
        if training.resume_from_checkpoint and output_dir.is_dir()
        else None
    )


def run_pretraining(recipe: Recipe, callbacks=()) -> Path:
    stage_args, pretrain, training = recipe.stage, recipe.pretrain, recipe.training
    if stage_args.preset != "tiny":
        raise ValueError(
            "pretraining is for the embedded default only; at paper scale Stage 0 upcycles Mistral-7B-v0.3 with "
            "ViT-L-14: `moe-vlm train --stage 0 --preset paper --out DIR`"
        )
    out = Path(training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if training.process_index == 0:
        clear_marker(out)
    started = time.perf_counter()
    config = preset_config(stage_args.preset)
    processor = build_processor(config)
    image_size = config.vision_config.image_size
    with training.main_process_first(desc="Shapes"):
        train_split = load_split(stage_args, "train", image_size)
        validation = load_split(
            dataclasses.replace(stage_args, max_train_samples=pretrain.eval_samples), "validation", image_size
        )
        instruct = load_split(stage_args, "instruct", image_size)

    # CLIP: contrastive image-caption pretraining of the vision tower.
    torch.manual_seed(training.seed)
    clip = build_clip(config, pretrain)
    clip_collator = ClipCollator(processor.image_processor, pretrain.clip_context_length)
    measure = pretrain.evaluate  # False: train only (`moe-vlm bench`'s utilisation runs, smoke runs)
    clip_before = retrieval_accuracy(clip, clip_collator, validation) if measure else None
    clip_dir = out / "clip_run"
    t0 = time.perf_counter()
    clip_args = _sub_run(
        training, clip_dir, pretrain.clip_max_steps, pretrain.clip_learning_rate, pretrain.clip_batch_size
    )
    if pretrain.clip_fresh_images:
        n_pairs = pretrain.clip_max_steps * pretrain.clip_batch_size * training.world_size
        clip_data = FreshCaptionPairs(
            n_pairs, training.seed, image_size, pretrain.clip_concept_grid, pretrain.clip_two_object_share
        )
        clip_args.train_sampling_strategy = "sequential"  # keeps each concept grid together in a batch
    else:
        clip_data = CaptionPairs(train_split)
    clip_trainer = ClipPretrainer(
        model=clip,
        args=clip_args,
        train_dataset=clip_data,
        data_collator=clip_collator,
        callbacks=list(callbacks),
    )
    clip_result = clip_trainer.train(resume_from_checkpoint=_resume_point(training, clip_dir))
    clip_seconds = time.perf_counter() - t0
    clip_after = probe = None
    if measure:
        clip_after = retrieval_accuracy(clip, clip_collator, validation)
        probe = _vision_probe(clip, config, processor, clip_collator, training.seed)
        print(
            f"[pretrain] vision probe on fresh renders: shape {probe['shape_accuracy']:.3f}, colour "
            f"{probe['colour_accuracy']:.3f}, zero-shot shape {probe['zero_shot_shape_accuracy']:.3f}",
            flush=True,
        )

    # The dense Mistral: causal LM on Shapes text.
    torch.manual_seed(training.seed)
    lm = MistralForCausalLM(MistralConfig(**load_preset(stage_args.preset)["mistral_config"]))
    text_collator = MoeVlmCollator(processor)
    validation_texts = [{"caption": c} for c in validation["caption"]]
    ppl_before = perplexity(lm, text_collator, validation_texts) if measure else None
    lm_dir = out / "lm_run"
    t0 = time.perf_counter()
    lm_trainer = Trainer(
        model=lm,
        args=_sub_run(
            training, lm_dir, pretrain.lm_max_steps, pretrain.lm_learning_rate, pretrain.lm_batch_size
        ),
        train_dataset=packed_blocks(
            text_records(train_split, instruct), text_collator, pretrain.lm_block_size
        ),
        data_collator=packed_collator,
        callbacks=list(callbacks),
    )
    lm_result = lm_trainer.train(resume_from_checkpoint=_resume_point(training, lm_dir))
    lm_seconds = time.perf_counter() - t0
    ppl_after = perplexity(lm, text_collator, validation_texts) if measure else None

    if training.process_index == 0:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in clip.state_dict().items()}
        save_file(state, str(out / CLIP_FILE), metadata={"format": "pt"})
        if not stage_args.keep_checkpoints:
            remove_checkpoints(clip_dir)
            remove_checkpoints(lm_dir)
        lm.save_pretrained(out / MISTRAL_DIR)
        processor.tokenizer.save_pretrained(out / MISTRAL_DIR)
        write_resolved_recipe(recipe, out)
        write_marker(
            out,
            {
                "stage": "pretrain",
                "preset": stage_args.preset,
                "seconds": round(time.perf_counter() - started, 1),
                "clip": {
                    "steps": clip_trainer.state.global_step,
                    "train_loss": clip_result.training_loss,
                    "seconds": round(clip_seconds, 1),
                    "retrieval_before": clip_before,
                    "retrieval": clip_after,
                },
                "vision_probe": probe,
                "lm": {
                    "steps": lm_trainer.state.global_step,
                    "train_loss": lm_result.training_loss,
                    "seconds": round(lm_seconds, 1),
                    "validation_perplexity_before": ppl_before,
                    "validation_perplexity": ppl_after,
                    "n_validation_captions": len(validation_texts),
                },
            },
        )
    return out


__all__ = [
    "CLIP_FILE",
    "MISTRAL_DIR",
    "CaptionPairs",
    "ClipCollator",
    "FreshCaptionPairs",
    "ClipPretrainer",
    "build_clip",
    "packed_blocks",
    "packed_collator",
    "perplexity",
    "retrieval_accuracy",
    "run_pretraining",
    "text_records",
]
