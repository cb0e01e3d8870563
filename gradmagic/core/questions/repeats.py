"""A question asked again: proven the same in microseconds, answered by the function already compiled.

A slider or a training loop asks the same question over and over, with new
values of the same shapes. Checking every argument, converting the data and
building the cache key costs more than running a small compiled gradient, so
the last call of each kind is remembered per model (:class:`Repeat`). A new
call takes the short way only when it provably gets the same question and the
same prepared data as the full way would:

- the same ``layer`` (the same object, or an equal index or name), ``loss``
  (``None``; a name that resolves to the same Keras function; otherwise a
  freshly built key part equal to the stored one), ``training``, ``output``;
- ``x``, ``y`` and ``sample_weight`` each ``None`` as before, or a NumPy array
  of the same shape and dtype as before, which the full way passed on
  unconverted (so it would again);
- finite float data (otherwise the full way runs, and warns);
- the model in the same state (:func:`~gradmagic.core.questions.model_keys.unchanged`)
  and every object the question's stored key holds by identity still alive.

Anything else takes the full way, which remembers the call again. Both ways
share the compiled function and the code that builds the result. Where the
framework computes asynchronously (JAX), the short way starts the question
before proving the model's state and drops the result if the proof fails
(:func:`repeated`): the proof then costs no time of its own.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Hashable
from typing import Any

import keras
import numpy as np

from gradmagic.core.questions.cache_keys import Key, KeyBuilder, Uncacheable, is_library
from gradmagic.core.questions.model_keys import StateProof, state_proof, unchanged
from gradmagic.core.questions.targets import loss_token


def _array_spec(value: Any) -> Hashable:
    """``None``, ``(shape, dtype)`` of a NumPy array, or ``False`` (anything else: never repeated)."""
    if value is None:
        return None
    if type(value) is np.ndarray and value.dtype.kind in "biuf":
        return (value.shape, value.dtype)
    return False


def _finite(value: Any) -> bool:
    """True unless a float array holds NaN or Inf: a sum is finite only if every entry is (else: look closer)."""
    return value is None or value.dtype.kind != "f" or math.isfinite(value.sum())


def _loss_proof(loss: Any) -> tuple | None:
    """How to tell the same ``loss=`` argument again: by identity where that is enough, else by its key part."""
    if loss is None:
        return ("none",)
    if isinstance(loss, str):
        try:
            resolved = keras.losses.get(loss)
        except (ValueError, TypeError):
            return None
        if isinstance(resolved, types.FunctionType) and is_library(resolved.__module__ or ""):
            return ("name", loss, resolved, resolved.__code__)
    try:
        return ("token", loss_token(KeyBuilder(), loss))
    except Uncacheable:
        return None


def _same_loss(proof: tuple, loss: Any) -> bool:
    kind = proof[0]
    if kind == "none":
        return loss is None
    if kind == "name":
        if loss is not proof[1]:
            return False
        try:
            return keras.losses.get(loss) is proof[2] and proof[2].__code__ is proof[3]
        except (ValueError, TypeError):
            return False
    if loss is None or isinstance(loss, str):
        return False
    try:
        return loss_token(KeyBuilder(), loss) == proof[1]
    except Uncacheable:
        return False


def _layer_proof(layer: Any) -> Hashable:
    """An index or name as it is; a layer object by ``id`` (the question's key holds it weakly); else ``None``."""
    if layer is None or type(layer) in (int, str):
        return (type(layer), layer)
    if isinstance(layer, keras.Layer):
        return ("id", id(layer))
    return None  # e.g. a NumPy integer: a new object per call, whose id may be recycled


def _typed(arguments: tuple) -> tuple:
    return tuple((type(a), a) for a in arguments)


class Repeat:
    """What a call needs to be repeated cheaply, and the proof that it may be.

    Attributes:
        question: The compiled question (see :mod:`gradmagic.core.questions.stateless_functions`).
        key: The question's stored cache key (weak: ``alive()`` says its identities are still its own).
        extra: What the question's code keeps besides (e.g. the weight positions).
    """

    __slots__ = ("_arguments", "_layer", "_loss", "_proof", "_specs", "extra", "key", "question")

    def __init__(
        self,
        question: Any,
        key: Key,
        proof: StateProof,
        layer: Any,
        loss: tuple,
        arguments: tuple,
        specs: tuple,
        extra: Any,
    ) -> None:
        self.question, self.key, self._proof = question, key, proof
        self._layer, self._loss, self._arguments, self._specs = _layer_proof(layer), loss, _typed(arguments), specs
        self.extra = extra

    def same_call(self, layer: Any, arguments: tuple, data: tuple) -> bool:
        """True when the call's own arguments are those remembered (cheap: compared by type, value and shape)."""
        return (
            _typed(arguments) == self._arguments
            and _layer_proof(layer) == self._layer
            and tuple(map(_array_spec, data)) == self._specs
        )

    def same_state(self, model: keras.Model, loss: Any, data: tuple) -> bool:
        """True when, the call being the same (:meth:`same_call`), the full way would compile the same question."""
        return (
            all(map(_finite, data))
            and _same_loss(self._loss, loss)
            and self.key.alive()
            and unchanged(model, self._proof)
        )


def repeated(
    repeat: Repeat | None,
    model: keras.Model,
    layer: Any,
    loss: Any,
    arguments: tuple,
    data: tuple,
    start: Callable[[Repeat], Any],
    overlap: bool,
) -> Any:
    """``start(repeat)`` when the call provably repeats ``repeat``; ``None`` when it must take the full way.

    ``start`` runs the remembered question on ``data`` and returns what the
    caller needs to finish the answer (never ``None``). With ``overlap`` (a
    framework that computes while Python goes on, see the backends'
    ``asynchronous``), it is started as soon as the call's own arguments are
    the same, and the model's state is proven while the framework computes:
    the compiled functions only read the values passed in and write nothing,
    so a result the proof then refuses is simply dropped. Otherwise the proof
    comes first.

    Args:
        repeat: The last call of this kind (``None``: there is none).
        model, layer, loss: The call's model and its ``layer=`` and ``loss=`` arguments (``None`` where none).
        arguments: The call's other plain arguments, as given to :func:`remembered`.
        data: The data as given (compared with the remembered shapes and dtypes).
        start: Runs the remembered question (``repeat.question``) on ``data``.
        overlap: Start before the proof.
    """
    if repeat is None or not repeat.same_call(layer, arguments, data):
        return None
    if not overlap:
        return start(repeat) if repeat.same_state(model, loss, data) else None
    try:
        started = start(repeat)
    except Exception:  # the full way asks again, and reports what fails there
        started = None
    return started if repeat.same_state(model, loss, data) else None


def remembered(
    model: keras.Model,
    question: Any,
    key: Key | None,
    stored: Key | None,
    layer: Any,
    loss: Any,
    arguments: tuple,
    given: tuple,
    prepared: tuple,
    extra: Any = None,
) -> Repeat | None:
    """A :class:`Repeat` of a call that took the full way, or ``None`` when it cannot be repeated cheaply.

    Args:
        model: The model.
        question: The compiled question the call used.
        key: The key the call built (``None``: uncacheable, never repeated).
        stored: The key as the cache keeps it.
        layer, loss: The call's ``layer=`` and ``loss=`` arguments.
        arguments: The call's other plain arguments (``training``, ``output``...), compared with ``==``.
        given: The data as given (x, y, sample_weight).
        prepared: The data as prepared: repeated only when every part is the very object given.
        extra: Kept for the caller.
    """
    if key is None or stored is None or stored.token != key.token:
        return None
    specs = tuple(map(_array_spec, given))
    if False in specs or any(g is not p for g, p in zip(given, prepared)):
        return None
    if _layer_proof(layer) is None or not all(type(a) in (type(None), bool, int, str) for a in arguments):
        return None
    loss_proof = _loss_proof(loss)
    proof = state_proof(model)
    if loss_proof is None or proof is None:
        return None
    return Repeat(question, stored, proof, layer, loss_proof, arguments, specs, extra)
