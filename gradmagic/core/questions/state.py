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
import tensorflow as tf


def state_variables(model: keras.Model) -> list[keras.Variable]:
    """Variables a forward pass may write: the non-trainable ones (BN, seeds)."""
    return list(model.non_trainable_variables)


def snapshot_in_graph(variables: list[keras.Variable]) -> list[tf.Tensor]:
    """Read the variables' values inside a ``tf.function``.

    Automatic control dependencies order these reads before any later write of
    the same variable in the traced program, and the matching
    :func:`restore_in_graph` after it.
    """
    return [tf.identity(var.value) for var in variables]


def restore_in_graph(variables: list[keras.Variable], values: list[tf.Tensor]) -> None:
    """Write back values taken by :func:`snapshot_in_graph`."""
    for var, value in zip(variables, values):
        var.assign(value)


@contextlib.contextmanager
def preserved_eagerly(model: keras.Model) -> Iterator[None]:
    """Restore every variable of the model after an eager run, even one that raised.

    Variables that the run *created* (a compiled loss building its trackers on
    first use) are metrics; they are reset so they read as freshly created.
    """
    variables = list(model.variables) + list(getattr(model, "metrics_variables", []))
    before = {id(var): (var, var.numpy()) for var in variables}
    try:
        yield
    finally:
        for var, value in before.values():
            var.assign(value)
        for metric in getattr(model, "metrics", []):
            if any(id(var) not in before for var in metric.variables):
                metric.reset_state()


@contextlib.contextmanager
def unbuilt_on_failure(model: keras.Model) -> Iterator[None]:
    """Undo what a failed first call did to the model's Python objects, so it stays as it was.

    Building a model by calling it changes the layers themselves, not only
    variables: a Sequential model prepends an ``InputLayer`` fixed to the shape
    it saw, and a layer that built before a later one failed keeps weights of
    the wrong shape. Keras has no public way to un-build, so every layer
    reachable from the model keeps a shallow copy of its attributes (and of the
    lists, dicts and sets among them, which Keras changes in place, including
    its attribute tracker's) and gets them back if the call raises.
    """
    saved = [_object_state(obj) for obj in _layers_and_trackers(model)]
    try:
        yield
    except BaseException:
        for state in saved:
            _restore(*state)
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


def _layers_and_trackers(model: keras.Model) -> list:
    found: list = []
    seen: set[int] = set()
    stack: list = [model]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        tracker = vars(obj).get("_tracker")
        if tracker is not None and hasattr(tracker, "__dict__"):
            found.append(tracker)
        for value in vars(obj).values():
            items = (
                value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
            )
            stack.extend(v for v in items if isinstance(v, keras.Layer))
    return found


def _object_state(obj: object) -> tuple:
    attributes = dict(vars(obj))
    # By type, not isinstance: TensorFlow's tracking proxies pass isinstance checks for dict and list.
    contents = {name: _copy(v) for name, v in attributes.items() if issubclass(type(v), (list, dict, set))}
    # Sets inside a dict change in place too (the tracker's ids per store).
    inner = {
        name: {k: set(s) for k, s in v.items() if issubclass(type(s), set)}
        for name, v in attributes.items()
        if issubclass(type(v), dict)
    }
    return obj, attributes, contents, inner


def _copy(value: list | dict | set) -> list | dict | set:
    if isinstance(value, dict):
        return dict(value)
    return set(value) if isinstance(value, set) else list(value)


def _restore(obj: object, attributes: dict, contents: dict, inner: dict) -> None:
    state = vars(obj)
    state.clear()
    state.update(attributes)  # the very objects, so that references held elsewhere stay valid
    for name, saved in contents.items():
        value = attributes[name]
        # The base types' methods: Keras's tracked containers would track (and lock) on their own.
        if issubclass(type(value), dict):
            dict.clear(value)
            dict.update(value, saved)
        elif issubclass(type(value), set):
            set.clear(value)
            set.update(value, saved)
        else:
            list.__setitem__(value, slice(None), saved)
    for name, sets in inner.items():
        for key, ids in sets.items():
            set.clear(attributes[name][key])
            set.update(attributes[name][key], ids)
