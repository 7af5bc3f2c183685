"""The dependency runs one way: ``training/`` imports qgate, the service never imports
``training/`` (issue 11). The retraining runs it as a child process instead."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import qgate

QGATE = Path(qgate.__file__).resolve().parent

_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import qgate
names = sorted(m.name for m in pkgutil.walk_packages(qgate.__path__, "qgate."))
for name in names:
    importlib.import_module(name)
print(json.dumps({
    "imported": names,
    "training": sorted(m for m in sys.modules if m == "training" or m.startswith("training.")),
}))
"""


def test_importing_every_qgate_module_imports_no_training_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.splitlines()[-1])
    assert "qgate.retrain.run" in found["imported"] and "qgate.score.worker" in found["imported"]
    assert found["training"] == []


def _imports_training(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(n == "training" or n.startswith("training.") for n in names):
            lines.append(node.lineno)
    return lines


def test_no_qgate_source_imports_training_even_inside_a_function() -> None:
    """Imports inside functions escape the test above; the source is read for them."""
    offenders = {
        str(path.relative_to(QGATE)): lines
        for path in sorted(QGATE.rglob("*.py"))
        if (lines := _imports_training(ast.parse(path.read_text(), str(path))))
    }
    assert offenders == {}
