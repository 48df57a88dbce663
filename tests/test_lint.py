"""Pyflakes' errors (ruff's F rules) and syntax errors (E9) in every Python file of the repository: an undefined name
or a misspelt attribute in an error path that no test reaches is a crash waiting for a plant's bad day. Style is not
checked here (the code predates a style gate; see the README's development notes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ["gateway", "connectors", "mappings", "simulators", "erp_service", "tests", "bench"]


def test_no_undefined_names_unused_imports_or_syntax_errors():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F,E9",
                          "--output-format", "concise", *CODE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
