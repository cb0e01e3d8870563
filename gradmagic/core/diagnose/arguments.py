"""Checks of the arguments the diagnosis functions share, on every backend (no framework imported)."""

from __future__ import annotations

from typing import Any

from gradmagic.errors import InputError


def refuse_array_loss(loss: Any, function: str) -> None:
    """Refuse an array where the loss goes: sample weights passed by position (``*monitor.bad_batch``).

    Args:
        loss: The ``loss`` argument.
        function: The public function's name, for the fix.

    Raises:
        InputError: ``loss`` is an array or tensor.
    """
    # Any framework's array, tensor or variable has a shape and a dtype; a loss (name, Loss, function) has not.
    if hasattr(loss, "shape") and hasattr(loss, "dtype") and not callable(loss):
        raise InputError(
            f"Received: loss=<{loss.dtype} array of shape {tuple(loss.shape)}>, where the loss goes (the third "
            f"argument after the model). An array there is usually sample weights, e.g. from "
            f"`*monitor.bad_batch`, which is (x, y, sample_weight). Expected a loss: a name, a keras Loss or a "
            f"function, or None for the compiled loss. Fix: pass the weights by name: "
            f"`x, y, sw = monitor.bad_batch` then `gm.{function}(model, x, y, sample_weight=sw)`."
        )
