"""The environment every test run sets before any third-party library is imported: no Hub or datasets downloads,
no Gradio analytics, no tokenizers thread pool. One source for `tests/conftest.py` and the warm mutation server
(`tests/mutation/warm_pytest.py`), which imports the libraries before any conftest runs: huggingface_hub reads the
offline switch into constants at import, so both must set the same values first.

Standard library only: the warm server may import this module, never one of the project's.
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply() -> None:
    """Set each variable not set already in `os.environ` (a user's explicit choice wins, as with `setdefault`)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
