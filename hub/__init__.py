"""Hub publishing of a finished stage: the model card (`card`), the training-time routing statistics (`stats`) and
the staging + one-commit upload behind `moe-vlm publish` (`publish`)."""
