"""`analysis`'s lazy export map: equal to the modules' own `__all__`, and `import analysis` stays light."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import analysis


def test_export_map_equals_every_module_all():
    for module, names in analysis._EXPORTS.items():
        declared = importlib.import_module(f"analysis.{module}").__all__
        assert sorted(names) == sorted(declared), (
            f"analysis._EXPORTS[{module!r}] differs from analysis.{module}.__all__"
        )
    union = {
        name for module in analysis._EXPORTS for name in importlib.import_module(f"analysis.{module}").__all__
    }
    assert sorted(union) == analysis.__all__
    for name in analysis.__all__:  # every name resolves, from the module that declares it
        assert getattr(analysis, name) is getattr(
            importlib.import_module(f"analysis.{analysis._WHERE[name]}"), name
        )


def test_import_analysis_imports_no_analysis_module():
    code = "import sys, json, analysis; print(json.dumps(sorted(m for m in sys.modules if m.startswith('analysis.'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
