"""Keep the model exactly as it was around every gradient computation.

A forward pass can change state: BatchNormalization updates its moving
statistics with ``training=True``, Dropout advances its seed generator, and a
multi-output compiled loss updates its loss trackers. Trainable weights and the
optimizer are never written by a gradient computation, so only the model's
non-trainable variables (guarded around the forward pass) and metric variables
(guarded around a compiled loss that updates trackers) need restoring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from gradmagic.core.questions.rollback import rollback_on_failure, unbuilt_on_failure  # noqa: F401  (callers import them from here)
from gradmagic.core.snapshots import values_restored


def state_variables(model: keras.Model) -> list[keras.Variable]:
    """Variables a forward pass may write: the non-trainable ones (BN, seeds)."""
    return list(model.non_trainable_variables)


def snapshot_in_graph(variables: list[keras.Variable]) -> list[Any]:
    """Read the variables' values inside a ``tf.function``.

    Automatic control dependencies order these reads before any later write of
    the same variable in the traced program, and the matching
    :func:`restore_in_graph` after it.
    """
    import tensorflow as tf  # only ever inside a tf.function: TensorFlow is loaded already

    return [tf.identity(var.value) for var in variables]


def restore_in_graph(variables: list[keras.Variable], values: list[Any]) -> None:
    """Write back values taken by :func:`snapshot_in_graph`."""
    for var, value in zip(variables, values):
        var.assign(value)


@contextlib.contextmanager
def preserved_eagerly(model: keras.Model, weights: bool = True) -> Iterator[None]:
    """Restore every variable of the model after an eager run, even one that raised.

    Variables that the run *created* (a compiled loss building its trackers on
    first use) are metrics; they are reset so they read as freshly created.

    Args:
        model: The model.
        weights: Also restore the model's own variables. ``False`` for a run
            that never calls the model (a compiled loss on given predictions):
            only its metric variables are then read and written back, which
            for a large model saves a host copy of every weight.
    """
    metrics_variables = list(getattr(model, "metrics_variables", []))
    variables = (list(model.variables) if weights else []) + metrics_variables
    known = {id(var) for var in variables}
    try:
        with values_restored(variables):
            yield
    finally:
        for metric in getattr(model, "metrics", []):
            if any(id(var) not in known for var in metric.variables):
                metric.reset_state()
