"""The API reference is generated from the docstrings and must be current; every public name has a docstring."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import natask

ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_is_up_to_date() -> None:
    check = subprocess.run([sys.executable, "docs/gen_api.py", "--check"], cwd=ROOT, capture_output=True)
    assert check.returncode == 0, "docs/API.md is stale: run `python docs/gen_api.py`"


def test_every_public_name_has_a_docstring() -> None:
    missing = [name for name in natask.__all__ if not inspect.getdoc(getattr(natask, name))]
    assert missing == []
