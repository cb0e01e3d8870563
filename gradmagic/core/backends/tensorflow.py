"""TensorFlow and Keras internals that gradmagic relies on, each behind one small function.

Each function's docstring names the public API that is missing and what the
function falls back to. Internals that only some features need are imported
inside ``try`` (in the function that uses them), so a TensorFlow or Keras
release that moves one weakens that feature with a clear message but never
breaks ``import gradmagic``. ``tests/test_backend_tensorflow.py`` runs every
function here against the installed versions, so an upgrade fails there first,
by name.
"""

from __future__ import annotations

# --- The gradient questions (core/questions) ---------------------------------


# --- The training monitor (core/monitor) -------------------------------------


# --- The diagnosis (core/diagnose) -------------------------------------------
