"""Leave an unbuilt model unbuilt when a call fails: Keras objects only, no framework, so on every backend."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras

from gradmagic.core.backends.keras_internals import python_state, restore_python_state


@contextlib.contextmanager
def unbuilt_on_failure(model: keras.Model) -> Iterator[None]:
    """Undo what a failed first call did to the model's Python objects, so it stays as it was.

    Building a model by calling it changes the layers themselves, not only
    variables: a Sequential model prepends an ``InputLayer`` fixed to the shape
    it saw, and a layer that built before a later one failed keeps weights of
    the wrong shape. Keras has no public way to un-build, so every layer
    reachable from the model keeps a shallow copy of its Python state
    (:func:`~gradmagic.core.backends.keras_internals.python_state`) and gets it back
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
    :func:`gradmagic.core.questions.state.preserved_eagerly` and the graph-side snapshots). Anything but a Keras
    model passes through, so that the call can refuse it with its own message.
    """
    if isinstance(model, keras.Model) and not model.built:
        with unbuilt_on_failure(model):
            yield
    else:
        yield
