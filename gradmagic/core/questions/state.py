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
from typing import Any

import keras

from gradmagic.core.backends.keras_internals import python_state, restore_python_state
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


@contextlib.contextmanager
def unbuilt_on_failure(model: keras.Model) -> Iterator[None]:
    """Undo what a failed first call did to the model's Python objects, so it stays as it was.

    Building a model by calling it changes the layers themselves, not only
    variables: a Sequential model prepends an ``InputLayer`` fixed to the shape
    it saw, and a layer that built before a later one failed keeps weights of
    the wrong shape. Keras has no public way to un-build, so every layer
    reachable from the model keeps a shallow copy of its Python state
    (:func:`~gradmagic.core.backends.tensorflow.python_state`) and gets it back
    if the call raises.
    """
    saved = python_state(model)
    try:
        yield
    except BaseException:
        restore_python_state(saved)
        raise


@contextlib.contextmanager
def rollback_on_failure(model: Any) -> Iterator[None]:
    """Around a whole public call: if it fails, an unbuilt model is left unbuilt (:func:`unbuilt_on_failure`).

    A built model needs no guard: a gradient computation never changes it (see
    :func:`preserved_eagerly` and the graph-side snapshots). Anything but a Keras
    model passes through, so that the call can refuse it with its own message.
    """
    if isinstance(model, keras.Model) and not model.built:
        with unbuilt_on_failure(model):
            yield
    else:
        yield
