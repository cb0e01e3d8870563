"""Canaries: every function of the TensorFlow door run against the installed TensorFlow and Keras.

An upgrade that moves or renames an internal gradmagic relies on fails here
first, with the function's name, rather than deep inside a gradient call.
"""

from __future__ import annotations

# --- The gradient questions (core/questions) ---------------------------------


# --- The training monitor (core/monitor) -------------------------------------


# --- The diagnosis (core/diagnose) -------------------------------------------
