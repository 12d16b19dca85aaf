"""The collator for every training stage: caption records (Stages 1–2) and conversations (Stage 3).

Caption records are built by hand: the caption is tokenised on its own and the special ids (BOS, EOS, the
image placeholders) are added around it. Conversations go through the processor's chat template (the one
source of the ``[INST]`` format: inference renders the same template) with
``processor.apply_chat_template(..., return_assistant_tokens_mask=True)``; the processor tokenises each text
piece on its own, so both formats give the same ids as piecewise encoding (tests/test_chat_template.py pins
them token for token), and the template's ``{% generation %}`` spans give the labels.

Formats (``<image>`` expands to ``processor.num_image_tokens`` × ``[IMG]``)::

    caption:  <s> <image> \\n {caption} </s>                labels on {caption} </s>
    no image: <s> {caption} </s>                          labels on {caption} </s>
    instruct: <s> [INST] {human} [/INST] {gpt} </s> [INST] {human} [/INST] {gpt} </s> ...
                                                          labels on every {gpt} </s>

The newline after the image is the byte token ``<0x0A>`` alone (sentencepiece would prefix "▁" to a
lone "\\n"); text after an ``<image>`` marker in a human turn drops its leading newline the same way.
Everything else is -100 in ``labels``: BOS, prompts, image placeholders and padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import DataError, check_text, logger
from .images import load_image
from .llava import GPT_ROLES, HUMAN_ROLES, check_conversation

IGNORE_INDEX = -100


@dataclass
class EncodedSample:
    """One record as ids: ``input_ids`` and ``labels`` of equal length, and its images (RGB PIL)."""

    record_id: str
    input_ids: list[int]
    labels: list[int]
    images: list
    pixel_values: torch.Tensor | None = None  # (n_images, 3, H, W) when the processor already made them


def _record_id(record: Mapping, index: int) -> str:
    rid = record.get("id")
    return str(rid) if rid is not None else f"#{index}"


class MoeVlmCollator:
    """Turn a list of records (caption or LLaVA-instruct schema, image optional) into a padded batch.

    Args:
        processor: a ``MoeVlmProcessor`` (uses ``tokenizer``, ``image_processor``, ``image_token_id``,
            ``num_image_tokens``, ``image_marker``).
        max_length: truncate longer samples to this many tokens; a cut that would fall inside or before
            the image placeholders raises :class:`DataError` instead.
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Returns from ``__call__``: ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``labels``
    (B, T) long, ``modality_mask`` (B, T) bool (True on image placeholders) and, when any record has an
    image, ``pixel_values`` (N_images, 3, H, W) float in record order.
    """

    def __init__(self, processor, max_length: int | None = None, pad_to_multiple_of: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        tok = self.tokenizer
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.image_token_id = int(processor.image_token_id)
        self.num_image_tokens = int(processor.num_image_tokens)
        self.image_marker = getattr(processor, "image_marker", "<image>")
        self.inst_id, self.inst_end_id = tok.convert_tokens_to_ids(["[INST]", "[/INST]"])
        self.special_ids = {self.bos_id, self.eos_id, self.inst_id, self.inst_end_id, self.image_token_id}
        self.special_tokens = tuple(t for t in tok.convert_ids_to_tokens(sorted(self.special_ids)) if t)
        newline = tok.convert_tokens_to_ids("<0x0A>")
        self.newline_ids = [newline] if newline not in (None, tok.unk_token_id) else self._encode("\n", None)

    # ---------------------------------------------------------------------------------------- encoding

    def _encode(self, text: str, record_id: str | None) -> list[int]:
        """Ids of a plain text piece; special tokens typed into the text are refused (they would forge
        image placeholders or turn boundaries)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        forged = self.special_ids.intersection(ids)
        if forged:
            names = self.tokenizer.convert_ids_to_tokens(sorted(forged))
            raise DataError(
                record_id, f"special token in text: {names} in {text!r}; remove it from the record"
            )
        return ids

    def _check_text(self, text: str, record_id: str) -> None:
        """Refuse special tokens typed into a turn (the tokenizer matches added tokens as exact substrings, so this
        is the id check of ``_encode`` without encoding the text twice)."""
        forged = sorted({t for t in self.special_tokens if t in text})
        if forged:
            raise DataError(
                record_id, f"special token in text: {forged} in {text!r}; remove it from the record"
            )

    def _image_ids(self) -> list[int]:
        return [self.image_token_id] * self.num_image_tokens

    def _messages(self, turns: Sequence[Mapping], rid: str) -> list[dict]:
        """LLaVA turns (``from``/``value``) as chat-template messages (``role``/``content``, markers kept)."""
        messages = []
        for turn in turns:
            self._check_text(turn["value"], rid)
            role = "user" if turn["from"] in HUMAN_ROLES else "assistant"
            messages.append({"role": role, "content": turn["value"].strip()})
        return messages

    def _caption(self, record: Mapping, rid: str, has_image: bool) -> tuple[list[int], list[int]]:
        caption = record.get("caption")
        if caption is not None:
            check_text(caption, rid, "'caption'")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(rid, "empty caption: the record has no caption text; fix or drop the record")
        if self.image_marker in caption:
            raise DataError(
                rid, f"image marker in caption: {self.image_marker!r} belongs in conversations, not captions"
            )
        prompt = [self.bos_id] + (self._image_ids() + self.newline_ids if has_image else [])
        answer = self._encode(caption.strip(), rid) + [self.eos_id]
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer

    def _conversation(self, record: Mapping, rid: str, images: list):
        """Ids, labels (the assistant tokens the template's generation spans cover: each answer and its EOS) and
        pixel values (N, 3, H, W) of a conversation, through the processor's chat template."""
        turns = record.get("conversations")
        check_conversation(turns, len(images), rid, self.image_marker)
        out = self.processor.apply_chat_template(
            self._messages(turns, rid),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors="pt",
            processor_kwargs={"images": images} if images else None,
        )
        ids = out["input_ids"][0]  # (T,)
        labels = torch.where(out["assistant_masks"][0].bool(), ids, IGNORE_INDEX)  # (T,)
        return ids.tolist(), labels.tolist(), out.get("pixel_values")

    def _images(self, record: Mapping, rid: str) -> list:
        image = record.get("image")
        if image is None:
            return []
        images = image if isinstance(image, (list, tuple)) else [image]
        return [load_image(im, rid) for im in images if im is not None]

    def encode(self, record: Mapping, index: int = 0) -> EncodedSample:
        """Ids and labels for one record (no padding, truncated to ``max_length``)."""
        rid = _record_id(record, index)
        images = self._images(record, rid)
        pixel_values = None
        if record.get("conversations") is not None:
            ids, labels, pixel_values = self._conversation(record, rid, images)
        elif "caption" in record:
            if len(images) > 1:
                raise DataError(
                    rid, f"image marker count mismatch: a caption record takes one image, got {len(images)}"
                )
            ids, labels = self._caption(record, rid, bool(images))
        else:
            raise DataError(rid, "unknown schema: a record needs 'caption' or 'conversations'")
        ids, labels = self._truncate(ids, labels, rid)
        return EncodedSample(rid, ids, labels, images, pixel_values)

    def _truncate(self, ids: list[int], labels: list[int], rid: str) -> tuple[list[int], list[int]]:
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, labels
        image_positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if image_positions and image_positions[-1] >= self.max_length:
            raise DataError(
                rid,
                f"truncation would cut the image: the sample has {len(ids)} tokens, its image placeholders end at "
                f"position {image_positions[-1]} and max_length is {self.max_length}; raise max_length",
            )
        if all(label == IGNORE_INDEX for label in labels[: self.max_length]):
            logger.warning(
                "record %s: after truncation to %d tokens no answer token is left", rid, self.max_length
            )
        return ids[: self.max_length], labels[: self.max_length]

    # ----------------------------------------------------------------------------------------- batching

    def _pixel_values(self, images: list) -> torch.Tensor:
        return self.processor.image_processor(images=images, return_tensors="pt")[
            "pixel_values"
        ]  # (N, 3, H, W)

    def _padded_length(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if not m else -(-longest // m) * m

    def __call__(self, records: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        samples = [self.encode(r, i) for i, r in enumerate(records)]
        batch, length = len(samples), self._padded_length(max(len(s.input_ids) for s in samples))
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)  # (B, T)
        for b, s in enumerate(samples):  # right padding
            n = len(s.input_ids)
            input_ids[b, :n] = torch.tensor(s.input_ids)
            labels[b, :n] = torch.tensor(s.labels)
            attention_mask[b, :n] = 1
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "modality_mask": input_ids == self.image_token_id,  # (B, T) bool
        }
        if any(s.images for s in samples):
            out["pixel_values"] = self._batch_pixel_values(samples)  # (N_images, 3, H, W)
        return out

    def _batch_pixel_values(self, samples: Sequence[EncodedSample]) -> torch.Tensor:
        """Every sample's images in record order; the pixel values the chat template call already made are
        reused, the rest (caption records) are processed in one call."""
        missing = [im for s in samples if s.pixel_values is None for im in s.images]
        fresh = iter(self._pixel_values(missing)) if missing else iter(())
        per_sample = [
            s.pixel_values if s.pixel_values is not None else torch.stack([next(fresh) for _ in s.images])
            for s in samples
            if s.images
        ]
        return torch.cat(per_sample)  # (N_images, 3, H, W)

    # --------------------------------------------------------------------------------------- generation

    def prompt_ids(self, record: Mapping, index: int = 0) -> tuple[list[int], list]:
        """The prompt the model continues at inference, in exactly the training format.

        Caption record: ``<s> <image> \\n`` (its caption, if any, is ignored). Instruct record: the
        conversation up to and including the last human turn, then ``[/INST]``, rendered by the chat
        template with ``add_generation_prompt``; a trailing answer is dropped. Returns (ids, RGB images).
        """
        rid = _record_id(record, index)
        images = self._images(record, rid)
        if record.get("conversations") is not None:
            turns = list(record["conversations"])
            if turns and turns[-1].get("from") in GPT_ROLES:
                turns = turns[:-1]
            check_conversation(turns, len(images), rid, self.image_marker, needs_answer=False)
            text = self.processor.apply_chat_template(self._messages(turns, rid), add_generation_prompt=True)
            ids = self.processor.encode(text)  # the rendered text starts with BOS: none is added
        else:
            ids = [self.bos_id] + (self._image_ids() + self.newline_ids if images else [])
        return ids, images

    def generation_batch(self, records: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """Left-padded prompts for ``generate`` (``input_ids``, ``attention_mask``, ``modality_mask``,
        ``pixel_values``)."""
        prompts = [self.prompt_ids(r, i) for i, r in enumerate(records)]
        batch, length = len(prompts), self._padded_length(max(len(ids) for ids, _ in prompts))
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)  # (B, T)
        for b, (ids, _) in enumerate(prompts):  # left padding: every prompt ends at the last column
            input_ids[b, length - len(ids) :] = torch.tensor(ids)
            attention_mask[b, length - len(ids) :] = 1
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "modality_mask": (input_ids == self.image_token_id) & attention_mask.bool(),  # (B, T)
        }
        images = [im for _, ims in prompts for im in ims]
        if images:
            out["pixel_values"] = self._pixel_values(images)  # (N_images, 3, H, W)
        return out


__all__ = ["IGNORE_INDEX", "EncodedSample", "MoeVlmCollator"]
