"""Does the frozen vision tower see the concepts? Linear probes and CLIP zero-shot on images it never saw.

Everything downstream (the concept–modality matrix, grounding, the experts' specialisation) assumes the image tokens
carry the concepts the probes ask about — on Shapes, an object's shape and colour. This module measures it once, on
the pretrained tiny CLIP, and the report checks it first (`vision probe` invariant):

* **linear probes**: a logistic regression (scikit-learn) from the tokens the connector receives — the VLM's own
  feature path, `MoeVlmVisionTower` at `vision_feature_layer`, flattened — to the object's shape and to its colour,
  fitted on `n_fit` single-object images and scored on `n_test` others (the flattened features have 8,192
  dimensions on the tiny tower, so `n_fit` is 3,000: with 1,000 the same tower scored 0.86 instead of 0.91,
  docs/experiments.md); the same probe on the mean-pooled tokens is reported beside it;
* **zero-shot shape**: CLIP's own image embedding against the text embedding of each shape, averaged over the
  colours ("A red circle.", "An orange circle.", ...: the usual prompt ensemble, in the pretraining captions'
  wording), top-1.

The images are fresh renders from a random stream of their own (`moe-vlm-vision-probe/<seed>`), not drawn from any
Shapes split, so no probe image was trained on.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .data.shapes import COLOURS, SHAPES, concept_caption, random_scene, render_scene

ATTRIBUTES = ("shape", "colour")


def probe_scenes(n: int, seed: int, part: str, image_size: int):
    """`n` single-object scenes and their renders, from the stream `moe-vlm-vision-probe/<seed>/<part>`."""
    rng = random.Random(f"moe-vlm-vision-probe/{seed}/{part}")
    scenes = [random_scene(rng, 1) for _ in range(n)]
    return scenes, [render_scene(scene, image_size) for scene in scenes]


@torch.no_grad()
def _encode(tower, image_processor, images, batch_size: int = 128):
    """Connector-input tokens (images, tokens, channels) and pixel batches, in order."""
    features, pixels = [], []
    for start in range(0, len(images), batch_size):
        pv = image_processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]
        features.append(tower(pv).last_hidden_state.float())  # (batch, tokens, channels)
        pixels.append(pv)
    return torch.cat(features).numpy(), torch.cat(pixels)


def linear_probe(train_x: np.ndarray, train_y: list, test_x: np.ndarray, test_y: list) -> float:
    """Held-out accuracy of a standardised multinomial logistic regression (scikit-learn's)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(model.fit(train_x, train_y).score(test_x, test_y))


@torch.no_grad()
def zero_shot_shape(clip, text_tokenizer, pixel_values: torch.Tensor, labels: list[str]) -> float:
    """Top-1 accuracy of CLIP's zero-shot shape classification (prompt ensemble over the colours)."""
    classes = []
    for shape in SHAPES:
        prompts = text_tokenizer(
            [concept_caption([(colour, shape)]) for colour in COLOURS]
        )  # (colours, context)
        mean = clip.encode_text(prompts, normalize=True).mean(dim=0)
        classes.append(mean / mean.norm())
    classes = torch.stack(classes)  # (shapes, embed)
    images = torch.cat([clip.encode_image(pv, normalize=True) for pv in pixel_values.split(128)])
    predicted = (images @ classes.T).argmax(dim=1).tolist()  # (images,)
    return float(np.mean([SHAPES[p] == label for p, label in zip(predicted, labels)]))


def vision_probe(
    clip,
    tower,
    image_processor,
    text_tokenizer,
    image_size: int,
    seed: int = 0,
    n_fit: int = 3000,
    n_test: int = 1000,
) -> dict:
    """The probe's result: `shape_accuracy`, `colour_accuracy` (linear probes on `tower`'s connector-input tokens,
    flattened; `*_mean_pooled`: on their mean),
    `zero_shot_shape_accuracy` (CLIP), `chance_shape`, `chance_colour`, `n_fit`, `n_test`. `tower` must be a
    `MoeVlmVisionTower` sharing `clip.visual` (so the probe reads exactly what the VLM will)."""
    was_training = clip.training
    clip.eval()
    fit_scenes, fit_images = probe_scenes(n_fit, seed, "fit", image_size)
    test_scenes, test_images = probe_scenes(n_test, seed, "test", image_size)
    fit_tokens, _ = _encode(tower, image_processor, fit_images)  # (n_fit, tokens, channels)
    test_tokens, test_pixels = _encode(tower, image_processor, test_images)
    # flattened: (images, tokens * channels), what the connector sees as a whole
    fit_x, test_x = fit_tokens.reshape(n_fit, -1), test_tokens.reshape(n_test, -1)
    fit_mean, test_mean = fit_tokens.mean(axis=1), test_tokens.mean(axis=1)  # (images, channels)
    result = {}
    for attribute in ATTRIBUTES:
        fit_y = [getattr(s.objects[0], attribute) for s in fit_scenes]
        test_y = [getattr(s.objects[0], attribute) for s in test_scenes]
        result[f"{attribute}_accuracy"] = linear_probe(fit_x, fit_y, test_x, test_y)
        result[f"{attribute}_accuracy_mean_pooled"] = linear_probe(fit_mean, fit_y, test_mean, test_y)
    shapes = [s.objects[0].shape for s in test_scenes]
    result["zero_shot_shape_accuracy"] = zero_shot_shape(clip, text_tokenizer, test_pixels, shapes)
    result.update(
        chance_shape=1 / len(SHAPES), chance_colour=1 / len(COLOURS), n_fit=n_fit, n_test=n_test, seed=seed
    )
    clip.train(was_training)
    return result


__all__ = ["ATTRIBUTES", "linear_probe", "probe_scenes", "vision_probe", "zero_shot_shape"]
