"""The real Mistral v0.3 tokenizer, from the copy the mistral-common package ships (nothing is downloaded),
and the processor built around it."""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, CLIPImageProcessor, LlamaTokenizer

from modeling_moe_vlm import MoeVlmConfig, MoeVlmProcessor
from modeling_moe_vlm.processing_moe_vlm import MOE_VLM_CHAT_TEMPLATE

from .contract import cache_root

SENTENCEPIECE_FILE = "mistral_instruct_tokenizer_240323.model.v3"


@functools.lru_cache(maxsize=1)
def _converted_tokenizer_dir() -> str:
    """Convert the sentencepiece model once (about 4 s) and keep the fast `tokenizer.json` (loads in 0.5 s)."""
    import mistral_common

    target = cache_root() / "mistral-v0.3-tokenizer"
    if (target / "tokenizer.json").is_file():
        return str(target)
    source = Path(mistral_common.__file__).parent / "data" / SENTENCEPIECE_FILE
    if not source.is_file():
        raise FileNotFoundError(
            f"mistral-common does not ship {SENTENCEPIECE_FILE}; reinstall mistral-common"
        )
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(source, Path(tmp) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        tokenizer.save_pretrained(staging)
        if not target.exists():
            staging.rename(target)  # atomic: a half-written folder is never seen as a cached tokenizer
        else:
            shutil.rmtree(staging)
    return str(target)


def mistral_tokenizer(path: str | None = None):
    """The Mistral v0.3 tokenizer (32,768 tokens, `[INST]`=3, `[/INST]`=4, `[IMG]`=10), `<unk>` as padding.
    `path` loads another tokenizer folder or Hub id instead."""
    tokenizer = AutoTokenizer.from_pretrained(path or _converted_tokenizer_dir())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def build_processor(config: MoeVlmConfig, tokenizer=None, prompt_format: str = "raw") -> MoeVlmProcessor:
    """A processor matching `config`'s vision tower (resolution, normalisation) and placeholder count, carrying the
    Mistral `[INST]` chat template Stage 3 trains on (saved as `chat_template.jinja`). `prompt_format`: what the
    model answers in (`"raw"` caption prompts; `"chat"` once instruction-tuned), saved with the processor."""
    if config.vision_config is None:
        raise ValueError("this config has no vision_config; a text-only model needs only the tokenizer")
    vision = config.vision_config
    size = vision.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,  # bicubic, as open_clip
        image_mean=list(vision.image_mean),
        image_std=list(vision.image_std),
        do_convert_rgb=True,
    )
    return MoeVlmProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or mistral_tokenizer(),
        num_image_tokens=config.num_image_tokens,
        chat_template=MOE_VLM_CHAT_TEMPLATE,
        prompt_format=prompt_format,
    )
