"""The tiny CLIP's pretraining pairs (`trainer.pretrain.FreshCaptionPairs`): the concept grid's contract."""

from __future__ import annotations

import re

import pytest

from trainer.data.shapes import COLOURS, SHAPES, concept_caption
from trainer.pretrain import FreshCaptionPairs

GRID = len(COLOURS) * len(SHAPES)


def test_concept_captions_name_colour_and_shape_with_the_right_article():
    assert concept_caption([("red", "circle")]) == "A red circle."
    assert concept_caption([("orange", "star"), ("blue", "cross")]) == "An orange star and a blue cross."


@pytest.mark.parametrize("block", [0, 3])
def test_every_block_of_the_grid_holds_each_colour_shape_pair_once(block):
    pairs = FreshCaptionPairs(4 * GRID, seed=0, image_size=32, concept_grid=True)
    cells = [pairs.grid_cell(i) for i in range(block * GRID, (block + 1) * GRID)]
    assert sorted(cells) == sorted((c, s) for c in COLOURS for s in SHAPES)
    items = [pairs[i] for i in range(block * GRID, (block + 1) * GRID)]
    # in-batch negatives never share a caption: the contrastive loss has no false negatives
    assert len({item["caption"] for item in items}) == GRID
    for (colour, shape), item in zip(cells, items):
        assert item["caption"] == concept_caption([(colour, shape)])


def test_blocks_are_shuffled_differently_and_items_are_reproducible():
    pairs = FreshCaptionPairs(2 * GRID, seed=0, image_size=32, concept_grid=True)
    assert [pairs.grid_cell(i) for i in range(GRID)] != [pairs.grid_cell(i) for i in range(GRID, 2 * GRID)]
    again = FreshCaptionPairs(2 * GRID, seed=0, image_size=32, concept_grid=True)
    assert pairs[5]["caption"] == again[5]["caption"]
    assert pairs[5]["image"].tobytes() == again[5]["image"].tobytes()  # a resumed run sees the same pair
    other_seed = FreshCaptionPairs(2 * GRID, seed=1, image_size=32, concept_grid=True)
    assert [other_seed.grid_cell(i) for i in range(GRID)] != [pairs.grid_cell(i) for i in range(GRID)]


def test_two_object_scenes_keep_the_cell_as_their_first_object():
    pairs = FreshCaptionPairs(GRID, seed=0, image_size=32, concept_grid=True, two_object_share=1.0)
    for i in range(0, GRID, 7):
        colour, shape = pairs.grid_cell(i)
        caption = pairs[i]["caption"]
        assert caption.startswith(concept_caption([(colour, shape)])[:-1] + " and ")
        assert len(re.findall("|".join(SHAPES), caption)) == 2


def test_without_the_grid_pairs_carry_the_worlds_captions():
    pairs = FreshCaptionPairs(8, seed=0, image_size=32)
    captions = [pairs[i]["caption"] for i in range(8)]
    # the world's templates name size, position or background as well: not the concept captions
    assert not all(re.fullmatch(r"An? \w+ \w+\.", c) for c in captions)
