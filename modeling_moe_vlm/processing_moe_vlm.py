"""MoeVlmProcessor: CLIP image preprocessing + the Mistral tokenizer, with `<image>` markers expanded into
`num_image_tokens` placeholder tokens (LLaVA-style), so its output feeds `model(**inputs)` and `model.generate`.

The image side is transformers' `CLIPImageProcessor` configured with the open_clip tower's resolution and
normalisation (resize shortest side, bicubic, centre crop, OpenAI mean/std: what open_clip's own transform does),
so the processor saves and loads with `AutoProcessor` like any other.

Text is tokenised the way the training collator (and mistral-common) builds sequences: the text is split at special
tokens and `<image>` markers, and each plain piece is encoded on its own (sentencepiece prefixes it with "▁"), so
`"<image>\nA red circle."` gives `<s> [IMG]… <0x0A> ▁A ▁red ▁circle .`, exactly the caption format Stages 1–2
train on. The chat template (`MOE_VLM_CHAT_TEMPLATE`, saved as `chat_template.jinja`) writes Stage 3's Mistral
`[INST] … [/INST]` conversations; `apply_chat_template` (incl. `return_assistant_tokens_mask`) works on it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

# The Mistral instruct format Stage 3 trains on (one source: the collator renders its conversations through it):
#     <s>[INST] {user} [/INST] {assistant}</s>[INST] {user} [/INST] {assistant}</s>...
# The spaces next to `[INST]` / `[/INST]` are separators: each text piece is encoded on its own (see
# `MoeVlmProcessor.encode`), so they become the "▁" sentencepiece puts before a piece's first word. A message's content
# is a string (which may hold `<image>` markers, as LLaVA records do) or a list of items: `{"type": "image"}` becomes
# the image marker, `{"type": "text", "text": ...}` its text, items joined by a newline. The generation prompt is
# empty: the answer starts right after `[/INST]`. `{% generation %}` marks the tokens an assistant mask (labels) covers.
MOE_VLM_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set marker = image_marker | default('<image>') %}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}"
    "{%- set content = message['content'] %}"
    "{%- else %}"
    "{%- set ns = namespace(parts=[]) %}"
    "{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{%- set ns.parts = ns.parts + [marker] %}"
    "{%- elif item['type'] == 'text' %}{%- set ns.parts = ns.parts + [item['text']] %}"
    "{%- else %}{{- raise_exception('content items must be of type image or text, not ' + item['type']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- set content = ns.parts | join('\n') %}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (content | trim) + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- generation %}{{- ' ' + (content | trim) + eos_token }}{%- endgeneration %}"
    "{%- else %}"
    "{{- raise_exception('roles must be user or assistant, not ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
)
# raw: the caption prompt "<image>\n" (Stages 1-2, dense control); chat: the template above (Stage 3)
PROMPT_FORMATS = ("raw", "chat")


class MoeVlmProcessor(ProcessorMixin):
    """`processor(images=[img], text=["<image>\\nA red circle."], return_tensors="pt")` gives `input_ids`,
    `attention_mask` and `pixel_values` (one image per `<image>` marker, in order of appearance).

    Args:
        image_processor: a `CLIPImageProcessor` (or compatible) producing `(images, 3, S, S)` pixel values.
        tokenizer: the Mistral v0.3 tokenizer (its `[IMG]` token, id 10, is the placeholder).
        num_image_tokens (`int`): placeholders per image (= the vision tower's patch count).
        image_token (`str`): the placeholder token.
        image_marker (`str`): what users write in text where an image goes.
        chat_template (`str`): the Jinja conversation template (default `MOE_VLM_CHAT_TEMPLATE`, the Mistral
            `[INST]` format Stage 3 trains on); saved as `chat_template.jinja` by `save_pretrained`.
        prompt_format (`str`): the format the model was trained to answer in, `"raw"` (caption prompts) or
            `"chat"` (instruction-tuned: prompts go through the chat template). Saved with the processor, so a model
            loaded from the Hub (the Space) knows it; the analyses read the stage's recipe first.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 64,
        image_token: str = "[IMG]",
        image_marker: str = "<image>",
        chat_template=None,
        prompt_format: str = "raw",
        **kwargs,
    ):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.image_marker = image_marker
        self.prompt_format = prompt_format
        # The format is this model family's, like the placeholder count: a processor saved before the template
        # existed (no chat_template.jinja) gets it too.
        chat_template = MOE_VLM_CHAT_TEMPLATE if chat_template is None else chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        ids = tokenizer.convert_tokens_to_ids([image_token])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"image_token {image_token!r} is not a single token of this tokenizer")
        self.image_token_id = ids[0]
        newline = tokenizer.convert_tokens_to_ids("<0x0A>")
        self._newline_ids = (
            [newline]
            if newline not in (None, tokenizer.unk_token_id)
            else tokenizer.encode("\n", add_special_tokens=False)
        )
        # Special tokens are matched as whole strings (as the tokenizer itself matches added tokens); longest first,
        # so a token that is a prefix of another never wins.
        specials = sorted(
            {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | {image_marker},
            key=len,
            reverse=True,
        )
        self._segment_re = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")

    def expand_image_markers(self, text: str) -> str:
        """Replace each `<image>` marker with `num_image_tokens` placeholder tokens."""
        return text.replace(self.image_marker, self.image_token * self.num_image_tokens)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """transformers' `ProcessorMixin.apply_chat_template`, with this processor's image marker given to the
        template (so `{"type": "image"}` items become the marker `__call__` expands)."""
        kwargs.setdefault("image_marker", self.image_marker)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def encode(
        self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False
    ) -> list[int] | tuple[list[int], list[tuple[int, int]]]:
        """Ids of one text, `<image>` markers expanded (images are not checked here; `__call__` does that).

        The text is split at special tokens (`<s>`, `</s>`, `[INST]`, `[/INST]`, ...) and image markers; each plain
        piece is encoded on its own, as the training collator and mistral-common do, rather than the whole string at
        once (the fast tokenizer would then drop the "▁" before text that follows a special token: `[IMG]\nA` gives
        `A`, not `▁A`). Conventions, each the training format's: one space next to a special token is a separator
        (dropped; the piece's own "▁" stands for it); a newline right after an image marker is the byte token
        `<0x0A>` alone; whitespace-only pieces are dropped. BOS is prepended when `add_special_tokens` unless the
        text already starts with it (a rendered chat template does).

        `return_offsets_mapping`: also return each id's (start, end) characters in `text` (image placeholders span
        their marker, BOS is (0, 0)), the offsets transformers' assistant-token masks need.
        """
        tok = self.tokenizer
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        if add_special_tokens and tok.bos_token_id is not None and not text.startswith(tok.bos_token or "\0"):
            ids.append(tok.bos_token_id)
            offsets.append((0, 0))
        pieces = self._segment_re.split(text)  # [plain, special, plain, special, ..., plain]
        start = 0
        for k, piece in enumerate(pieces):
            end = start + len(piece)
            if k % 2 == 1:  # a special token or an image marker
                if piece == self.image_marker:
                    ids += [self.image_token_id] * self.num_image_tokens
                    offsets += [(start, end)] * self.num_image_tokens
                else:
                    ids.append(tok.convert_tokens_to_ids(piece))
                    offsets.append((start, end))
                start = end
                continue
            lo, hi = start, end
            before = pieces[k - 1] if k > 0 else None
            after = pieces[k + 1] if k + 1 < len(pieces) else None
            if before == self.image_marker and text.startswith("\n", lo):
                ids += self._newline_ids
                offsets += [(lo, lo + 1)] * len(self._newline_ids)
                lo += 1
            elif before is not None and before != self.image_marker and text.startswith(" ", lo):
                lo += 1
            if after is not None and after != self.image_marker and hi > lo and text[hi - 1] == " ":
                hi -= 1
            if text[lo:hi].strip():
                if return_offsets_mapping:
                    encoded = tok(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True)
                    ids += encoded["input_ids"]
                    offsets += [(lo + a, lo + b) for a, b in encoded["offset_mapping"]]
                else:
                    ids += tok.encode(text[lo:hi], add_special_tokens=False)
            start = end
        return (ids, offsets) if return_offsets_mapping else ids

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        return_offsets_mapping: bool = False,
        **kwargs,
    ) -> BatchFeature:
        if text is None:
            raise ValueError(
                "MoeVlmProcessor needs `text` (use '<image>' where an image goes; an empty prompt is '')"
            )
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(
                f"text must be a string or a list of strings, got {[type(t).__name__ for t in texts]}"
            )
        flat_images = self._flatten_images(images)
        self._check_marker_counts(texts, flat_images)

        ids, offsets = [], []
        for i, sample in enumerate(texts):
            encoded = self.encode(sample, add_special_tokens, return_offsets_mapping)
            sample_ids, sample_offsets = encoded if return_offsets_mapping else (encoded, None)
            offsets.append(sample_offsets)
            if max_length is not None and len(sample_ids) > max_length:
                raise ValueError(
                    f"text {i} is {len(sample_ids)} tokens (images expanded to {self.num_image_tokens} each), longer "
                    f"than max_length={max_length}; shorten it"
                )
            ids.append(sample_ids)
        # padding_side applies to this call only (the tokenizer's own default stays as it is)
        data = dict(
            self.tokenizer.pad(
                {"input_ids": ids}, padding=padding, padding_side=padding_side, return_tensors=return_tensors
            )
        )
        if flat_images:
            pixel_values = self.image_processor(images=flat_images, return_tensors=return_tensors)[
                "pixel_values"
            ]
            data["pixel_values"] = pixel_values
        out = BatchFeature(data=data, tensor_type=return_tensors)
        # Offsets padded like the ids, with (0, 0) (what transformers' tokenizers pad them with), kept as lists of
        # (start, end) pairs: their reader, `ProcessorMixin.apply_chat_template`'s assistant mask, walks them pair by
        # pair in Python, which over a tensor costs an unbind per token (half of a Stage 3 batch's collation).
        if return_offsets_mapping:
            length = len(data["input_ids"][0])
            left = (padding_side or self.tokenizer.padding_side) == "left"
            out["offset_mapping"] = [
                [(0, 0)] * (length - len(o)) + o if left else o + [(0, 0)] * (length - len(o))
                for o in offsets
            ]
        return out

    # ----- validation --------------------------------------------------------------------------------------------
    @staticmethod
    def _flatten_images(images) -> list:
        """Accept one image, a list of images, or a list (per sample) of lists; return them flat, as RGB."""
        if images is None:
            return []
        if not isinstance(images, (list, tuple)):
            images = [images]
        flat = []
        for item in images:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        return [MoeVlmProcessor._as_rgb(img, i) for i, img in enumerate(flat)]

    @staticmethod
    def _as_rgb(image, index: int):
        """Convert grayscale/RGBA/CMYK/palette images to RGB; refuse what is not an image, clearly."""
        if isinstance(image, Image.Image):
            if image.width < 1 or image.height < 1:
                raise ValueError(f"image {index} is empty ({image.width}x{image.height})")
            return image if image.mode == "RGB" else image.convert("RGB")
        if isinstance(image, (np.ndarray, torch.Tensor)):
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
            if array.ndim == 2 or (
                array.ndim == 3 and (array.shape[-1] in (1, 3, 4) or array.shape[0] in (1, 3, 4))
            ):
                return image
            raise ValueError(
                f"image {index} has shape {array.shape}; expected (H, W), (H, W, C) or (C, H, W)"
            )
        raise ValueError(
            f"image {index} is a {type(image).__name__}, not an image; pass PIL images, numpy arrays or tensors"
        )

    def _check_marker_counts(self, texts: list[str], images: list) -> None:
        raw = [i for i, t in enumerate(texts) if self.image_token in t]
        if raw:
            raise ValueError(
                f"text {raw} already contains {self.image_token!r}; write {self.image_marker!r} where an image goes "
                "and let the processor expand it"
            )
        counts = [t.count(self.image_marker) for t in texts]
        if sum(counts) != len(images):
            raise ValueError(
                f"got {len(images)} image(s) but {sum(counts)} {self.image_marker!r} marker(s) (per text: {counts}); "
                "each image needs exactly one marker"
            )

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["MOE_VLM_CHAT_TEMPLATE", "PROMPT_FORMATS", "MoeVlmProcessor"]
