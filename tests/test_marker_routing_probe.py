"""The completion marker of a training stage counts the records it trained on (a routing probe drawn from the training
split holds some out) and says what the routing probe was."""

from __future__ import annotations

import json

import pytest
from training_helpers import make_shapes, make_stage0, marker, quick_args, train

from configuration.contract import COMPLETION_MARKER


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Shapes data (24 instruct records) and a Stage 0 model passed off as a Stage 2 output (what Stage 3 starts
    from; what Stages 1-2 would have trained does not matter to the marker)."""
    root = tmp_path_factory.mktemp("marker")
    shapes = make_shapes(root / "shapes")
    stage2 = make_stage0(root / "stage0")
    (stage2 / COMPLETION_MARKER).write_text(json.dumps({**marker(stage2), "stage": "2"}))
    return root, shapes, stage2


def test_marker_counts_records_trained_on_and_names_the_probe(start):
    from datasets import load_from_disk

    root, shapes, stage2 = start
    n_instruct = len(load_from_disk(str(shapes))["instruct"])
    held = train(
        "3",
        root / "held",
        stage2,
        quick_args(shapes, steps=1, logging_steps=1, routing_probe_split="instruct", routing_probe_samples=4),
    )
    written = marker(held)
    assert written["train_split"] == "instruct" and written["n_train_records"] == n_instruct - 4
    assert written["routing_probe"] == {
        "split": "instruct",
        "n_samples": 4,
        "mode": "eval (no Gumbel noise, no dropout)",
    }

    none = train("3", root / "none", stage2, quick_args(shapes, steps=1, routing_probe_split="none"))
    written = marker(none)
    assert written["n_train_records"] == n_instruct and "routing_probe" not in written
