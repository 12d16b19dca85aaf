"""pytest plugin of the conformance subprocess (`-p conformance.plugin`): run only the calibrated tests.

`$MOE_VLM_CONFORMANCE_SELECT` names a file with one test name per line (a calibrated list); tests of the collected
classes whose name is not listed are deselected, so MoeVlm never spends time on tests that Mistral or Mixtral fail.
Without the variable (calibration) nothing is deselected. MoeVlm's `NOT_APPLICABLE` tests are deselected too.
"""

from __future__ import annotations

import os

from . import NOT_APPLICABLE
from .calibration import read_names

SELECT_ENV = "MOE_VLM_CONFORMANCE_SELECT"


def pytest_collection_modifyitems(config, items):
    path = os.environ.get(SELECT_ENV)
    if not path:
        return
    wanted = read_names(path)

    def selected(item) -> bool:
        moe_vlm = item.cls is not None and item.cls.__name__.startswith("MoeVlm")
        return item.name in wanted and not (moe_vlm and item.name in NOT_APPLICABLE)

    keep = [item for item in items if selected(item)]
    dropped = [item for item in items if not selected(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
