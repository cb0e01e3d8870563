"""The README's backend table says what the core resolves on each backend, so it cannot fall behind.

A row naming public core functions (``gm.NAME``) must show ✓ under JAX and PyTorch exactly when
``gradmagic.core`` implements every one of them there (``_STATELESS`` or ``_EVERY_BACKEND``), and
✓ under TensorFlow always. Front-end rows (magics, explorer views) are checked by running them, in
``tests/every_backend/test_frontends.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import gradmagic.core as core

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("TensorFlow", "JAX", "PyTorch")


def _table() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    header = "| what | " + " | ".join(COLUMNS) + " |"
    assert header in readme, f"README.md has no backend table headed {header!r}"
    lines = readme[readme.index(header) :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_every_core_function_row_matches_what_each_backend_implements():
    checked = set()
    for what, *cells in _table():
        # Only the names before any parenthesis: those in parentheses are front-ends over them.
        names = [n for n in re.findall(r"`gm\.(\w+)`", what.split("(")[0]) if n in core.__all__]
        if not names:
            continue
        stateless = [n in core._STATELESS or n in core._EVERY_BACKEND for n in names]
        assert all(stateless) or not any(stateless), (
            f"README row {what!r}: on JAX/PyTorch only {[n for n, s in zip(names, stateless) if s]} are "
            f"implemented; split the row"
        )
        expected = ["✓", "✓" if all(stateless) else "—", "✓" if all(stateless) else "—"]
        assert cells == expected, f"README row {what!r} says {cells}, the core says {expected}"
        checked.update(names)
    for name in ("weight_gradients", "input_gradients", "GradientMonitor", "explain", "check_gradients", "saliency"):
        assert name in checked, f"the README's backend table has no row for gm.{name}"
