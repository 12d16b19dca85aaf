"""TRL's `SFTTrainer` with this model, the way Stage 3 would call it (our collator, TRL's dataset preparation off):
no router auxiliary loss enters the loss, as in the paper. TRL 1.16 reads `router_aux_loss_coef` from the model
config when `SFTConfig.router_aux_loss_coef` is unset and then sets `output_router_logits` to match; our config's
coefficient is 0, so this pins that TRL keeps the aux loss off for our model unless a user asks for it."""

from __future__ import annotations

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from trainer.data import MoeVlmCollator


def test_sft_trainer_adds_no_router_aux_loss_to_our_model(tiny_model, processor, red_image, tmp_path):
    records = [{"image": red_image, "caption": f"A red circle number {i}."} for i in range(4)]
    collator = MoeVlmCollator(processor)
    args = SFTConfig(
        output_dir=str(tmp_path),
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        use_cpu=True,
        report_to="none",
        max_steps=1,
    )
    trainer = SFTTrainer(
        model=tiny_model,
        args=args,
        train_dataset=Dataset.from_list(records),
        data_collator=collator,
        processing_class=processor,
    )
    assert trainer.aux_loss_enabled is False and trainer.router_aux_loss_coef == 0.0
    assert tiny_model.config.output_router_logits is False
    batch = collator(records)
    tiny_model.eval()  # no dropout, no Gumbel noise: the two forwards route alike
    with torch.no_grad():
        own = tiny_model(**batch).loss
        trl_loss = trainer.compute_loss(tiny_model, dict(batch))
    # TRL's loss (its fused log-prob path) is the model's own causal-LM loss on the answer tokens, nothing added.
    torch.testing.assert_close(trl_loss, own, atol=1e-5, rtol=1e-5)
