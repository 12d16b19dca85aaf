"""MoeVlmProcessor: CLIP image preprocessing + the Mistral tokenizer, with `<image>` markers expanded into
`num_image_tokens` placeholder tokens (LLaVA-style), so its output feeds `model(**inputs)` and `model.generate`.

The image side is transformers' `CLIPImageProcessor` configured with the open_clip tower's resolution and
normalisation (resize shortest side, bicubic, centre crop, OpenAI mean/std: what open_clip's own transform does),
so the processor saves and loads with `AutoProcessor` like any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin


class MoeVlmProcessor(ProcessorMixin):
    """`processor(images=[img], text=["<image>\\nA red circle."], return_tensors="pt")` gives `input_ids`,
    `attention_mask` and `pixel_values` (one image per `<image>` marker, in order of appearance).

    Args:
        image_processor: a `CLIPImageProcessor` (or compatible) producing `(images, 3, S, S)` pixel values.
        tokenizer: the Mistral v0.3 tokenizer (its `[IMG]` token, id 10, is the placeholder).
        num_image_tokens (`int`): placeholders per image (= the vision tower's patch count).
        image_token (`str`): the placeholder token.
        image_marker (`str`): what users write in text where an image goes.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 64,
        image_token: str = "[IMG]",
        image_marker: str = "<image>",
        chat_template=None,
        **kwargs,
    ):
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.image_marker = image_marker
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        ids = tokenizer.convert_tokens_to_ids([image_token])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"image_token {image_token!r} is not a single token of this tokenizer")
        self.image_token_id = ids[0]

    def expand_image_markers(self, text: str) -> str:
        """Replace each `<image>` marker with `num_image_tokens` placeholder tokens."""
        return text.replace(self.image_marker, self.image_token * self.num_image_tokens)

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        max_length: int | None = None,
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

        ids = []
        for i, sample in enumerate(texts):
            sample_ids = self.tokenizer.encode(self.expand_image_markers(sample), add_special_tokens=False)
            if add_special_tokens and self.tokenizer.bos_token_id is not None:
                sample_ids = [self.tokenizer.bos_token_id] + sample_ids
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
        return BatchFeature(data=data, tensor_type=return_tensors)

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


__all__ = ["MoeVlmProcessor"]
