"""Training: the data (`trainer.data`), one `transformers.Trainer` subclass per stage of the paper's protocol
(`trainer.stages`), the routing statistics callback, pretraining of the embedded default, and `moe-vlm train`.

Nothing is imported here: `moe-vlm --help` imports `trainer.cli` and must stay fast.
"""
