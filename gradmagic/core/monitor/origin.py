"""The op that made NaN/Inf first in a bad training step, by ``gm.explain``'s NaN/Inf-origin pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from gradmagic.core.diagnose.origin import NonfiniteOrigin
from gradmagic.core.snapshots import values_restored
from gradmagic.errors import GradmagicError


def first_origin(
    model: keras.Model, batch: tuple[Any, Any, Any], weights: Sequence[np.ndarray]
) -> NonfiniteOrigin | None:
    """Run ``gm.explain`` on ``batch`` at ``weights`` (training mode) and return the first origin.

    The forward pass's first origin wins over the backward pass's: a division by
    zero in a layer's ``call`` is named as that op even when the gradient's NaN is
    what the monitor saw. The origin pass is an ordinary traced ``tf.function``
    (never XLA), so it also works for a model compiled with ``jit_compile=True``.
    The model's weights are put back afterwards, whatever happens.

    Args:
        model: The model being trained.
        batch: ``(x, y, sample_weight)`` of the step (the sample weights do not
            change where NaN/Inf is made and are not used).
        weights: Trainable weights from before the step, aligned with
            ``model.trainable_variables``.

    Returns:
        The origin, or None when the pass finds none or cannot run.
    """
    from gradmagic.core.diagnose.explain import explain  # the diagnosis, loaded only when a step went bad

    x, y, _ = batch
    variables = list(model.trainable_variables)
    with values_restored(variables):
        for variable, value in zip(variables, weights, strict=True):
            variable.assign(value)
        try:
            origins = explain(model, x, y, training=True).nonfinite
        except GradmagicError:
            return None
    forward = [o for o in origins if not o.backward]
    return (forward or list(origins) or [None])[0]
