"""Keras internals of ``fit`` that are the same on every backend (no framework import).

Kept with the other framework doors: each function says which public API is
missing and what it falls back to.
"""

from __future__ import annotations

from typing import Any


def fit_token(model: Any) -> tuple[Any, Any]:
    """Objects that are new in every ``fit``: its ``History`` and that one's epoch list.

    Public API missing: Keras tells callbacks nothing that identifies the ``fit``
    being run. Its ``CallbackList`` sets ``model.history`` to that ``fit``'s
    ``History`` before any callback runs, and ``History.on_train_begin`` (which may
    run after the monitor's) gives it a new ``epoch`` list, so the pair, taken at
    the first step, identifies the current ``fit``.

    Falls back to ``(None, None)`` parts where Keras sets neither: every ``fit``
    then looks alike, and the monitor can no longer tell a ``fit`` without it from
    the one it attached to (a later ``fit`` without the monitor, after one that died
    before ``on_train_end``, would record into its buffer).

    Args:
        model: The model being fit.
    """
    history = getattr(model, "history", None)
    return history, getattr(history, "epoch", None)
