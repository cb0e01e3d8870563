"""The op that made NaN/Inf first in a bad training step, by ``gm.explain``'s NaN/Inf-origin pass (every backend)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
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
    what the monitor saw. On TensorFlow the origin pass is an ordinary traced
    ``tf.function`` (never XLA), so it also works for a model compiled with
    ``jit_compile=True``; on JAX and PyTorch it is the per-op pass of their
    ``explain`` (the jaxpr's equations, the torch functions one eager run calls).
    The model's weights are as before afterwards, whatever happens.

    Args:
        model: The model being trained.
        batch: ``(x, y, sample_weight)`` of the step (the sample weights do not
            change where NaN/Inf is made and are not used).
        weights: Trainable weights from before the step, aligned with
            ``model.trainable_variables``.

    Returns:
        The origin, or None when the pass finds none or cannot run.
    """
    # The diagnosis is loaded only when a step went bad.
    if keras.backend.backend() == "tensorflow":
        from gradmagic.core.diagnose.explain import explain
    else:
        from gradmagic.core.diagnose.stateless_explain import explain

    x, y, _ = batch
    try:
        with _weights_set(model, weights):
            origins = explain(model, x, y, training=True, verbose=False).nonfinite
    except GradmagicError:
        return None
    forward = [o for o in origins if not o.backward]
    return (forward or list(origins) or [None])[0]


@contextlib.contextmanager
def _weights_set(model: keras.Model, weights: Sequence[np.ndarray]) -> Iterator[None]:
    """Run the block with ``model.trainable_variables`` at ``weights``.

    TensorFlow's traced functions read the variables themselves: they are
    assigned, and put back afterwards. On JAX and PyTorch the model is read in a
    ``keras.StatelessScope`` that maps each variable to its value, so nothing is
    written (on JAX, after the trainer's state is put back into the variables).
    """
    variables = list(model.trainable_variables)
    if keras.backend.backend() == "tensorflow":
        with values_restored(variables):
            for variable, value in zip(variables, weights, strict=True):
                variable.assign(value)
            yield
        return
    from gradmagic.core.monitor.stateless import recorder

    recorder().sync_variables(model)
    with keras.StatelessScope(state_mapping=list(zip(variables, weights, strict=True))):
        yield
