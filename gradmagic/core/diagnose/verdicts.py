"""Gradient levels and their names: what autodiff passes back through an op, on every backend.

A path is as good as its worst op, and of several paths the best one counts:
levels are ordered so that ``min`` and ``max`` say exactly that. The levels are
defined beside the graph records the backends return
(:mod:`gradmagic.core.backends.flow`).
"""

from __future__ import annotations

from gradmagic.core.backends.flow import FLOWS, NONE, UNCHECKED, ZERO

__all__ = ["FLOWS", "NONE", "UNCHECKED", "VERDICTS", "ZERO"]

VERDICTS = {NONE: "no gradient", ZERO: "zero gradient", FLOWS: "flows"}
