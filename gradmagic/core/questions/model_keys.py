"""What makes a model's compiled question stale, as cache keys (see :mod:`gradmagic.core.questions.cache_keys`).

A question's key holds, besides its own arguments, the model's compile state
(its loss, by contents and identity; its optimizer and compiled-loss objects),
its layers and which weights train, all by identity, and the public plain
settings of the model and its layers (a Dropout ``rate``, a model's own
``beta``), by value. The same identities say
when the declared inputs (:class:`~gradmagic.core.questions.inputs.ModelSpec`) must be
read again and when a compiled loss needs its one eager warm-up call.
"""

from __future__ import annotations

import functools
import types
import warnings
import weakref
from typing import Any

import keras
import numpy as np

from gradmagic.core.backends.tensorflow import compiled_loss, instance_settings
from gradmagic.core.questions.cache_keys import Key, KeyBuilder, Uncacheable, global_names
from gradmagic.core.questions.inputs import ModelSpec
from gradmagic.core.questions.targets import loss_token
from gradmagic.errors import GradmagicWarning

# model -> (layers Key, ModelSpec): what the model declares, re-read after add/pop.
_specs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> the compile Key its compiled loss was last built under.
_warmed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# layer -> (its attribute names, the public ones _settings compares).
_public: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def known_spec(model: keras.Model) -> ModelSpec | None:
    """The model's declared inputs and outputs as last read, if its layers are still the same and built."""
    known = _specs.get(model)
    if known is None or not model.built or not _same(known[0], _layers_key(model)):
        return None
    return known[1]


def remember_spec(model: keras.Model, spec: ModelSpec) -> None:
    """Keep ``spec`` for :func:`known_spec` until the model's layers change."""
    _specs[model] = (_layers_key(model).stored(), spec)


def mark_warm(model: keras.Model) -> None:
    """Record that the compiled loss was built under the model's current compile state."""
    key = _compile_key(model)
    _warmed[model] = None if key is None else key.stored()


def _layers_key(model: keras.Model) -> Key:
    """What a Sequential ``add``/``pop`` changes: the layers themselves (by identity)."""
    builder = KeyBuilder()
    return builder.key(*map(builder.same, model.layers))


def _same(known: Key, new: Key) -> bool:
    return known.token == new.token and known.alive()


def _model_token(model: keras.Model, builder: KeyBuilder) -> tuple:
    """What makes a traced question stale: the compiled loss, the layers, which weights train.

    Freezing a layer changes more than its gradients (BatchNormalization then
    runs in inference mode even with ``training=True``), so every question
    depends on it.
    """
    return (
        _compile_token(model, builder),
        tuple(map(builder.same, model.layers)),
        tuple(map(builder.same, model.trainable_weights)),
        _settings(model, builder, is_model=True),
        *(_settings(layer, builder, isinstance(layer, keras.Model)) for layer in _all_layers(model)),
    )


#: Values a layer's public setting may hold that a snapshot compares by contents without ever failing.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, np.generic)


def _settings(layer: keras.Layer, builder: KeyBuilder, is_model: bool) -> tuple:
    """A layer's public plain settings, which a trace bakes in: ``rate``, ``momentum``, a model's own ``beta``.

    A layer's ``call`` reads its ``rate`` or ``activation``, and a subclassed
    model's ``call`` or ``compute_loss`` its hyperparameters, as Python values:
    changed in place, the traced graph would still use the old ones. Private
    attributes are Keras's own bookkeeping. Functions count by identity
    (``layer.activation = ...``). A model counts only the attributes its own
    class's code names: Keras sets others (``predict_function``,
    ``stop_training``) on every ``fit`` or ``predict``, which change no question.
    """
    attrs = instance_settings(layer)
    parts = []
    for name in _public_names(layer, attrs, is_model):
        value = attrs[name]
        if value is None or type(value) in (bool, int, str):  # the common case, hashed as it is (with its type)
            parts.append((name, type(value).__name__, value))
        elif isinstance(value, _PLAIN):
            parts.append((name, builder.value(value)))
        elif isinstance(value, types.FunctionType):
            parts.append((name, builder.same(value)))
    return tuple(parts)


def _public_names(layer: keras.Layer, attrs: dict, is_model: bool) -> tuple[str, ...]:
    """The names :func:`_settings` compares, re-listed only when the layer's attribute names change.

    Filtering a Keras layer's ~60 attributes by name took most of a small
    model's per-call key; the tuple of names is a cheap, exact check that the
    list still holds (an attribute added or removed changes it).
    """
    names = tuple(attrs)
    known = _public.get(layer)
    if known is not None and known[0] == names:
        return known[1]
    read = _names_read(type(layer)) if is_model else None
    public = tuple(n for n in names if not n.startswith("_") and (read is None or n in read))
    _public[layer] = (names, public)
    return public


@functools.lru_cache(maxsize=256)  # a class's code does not change
def _names_read(cls: type) -> frozenset[str]:
    """The attribute names the methods of a user's model class (not Keras's) may read."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".", 1)[0] in ("keras", "tensorflow", "builtins", "abc"):
            continue
        for attr in vars(klass).values():
            code = getattr(attr, "__code__", None)
            if code is not None:
                names.update(global_names(code))
    return frozenset(names)


def _all_layers(model: keras.Model) -> list[keras.Layer]:
    """The model's layers and those of the models nested in it."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_all_layers(layer))
    return found


def question_key(model: keras.Model, *parts: Any) -> Key | None:
    """The cache key of a question: ``parts`` (callables of the builder) plus the model's state.

    ``None`` when a part cannot be snapshotted: the question is then traced afresh.
    """
    builder = KeyBuilder()
    try:
        values = [part(builder) if callable(part) else part for part in parts]
        return builder.key(*values, _model_token(model, builder))
    except Uncacheable as reason:
        warnings.warn(
            f"Received: a loss that reads {reason}, which gradmagic cannot compare between calls, so this "
            f"question is compiled afresh on every call (slow, but never stale). Fix: pass small values "
            f"(or a tf.Variable, which is read when the graph runs) to the loss instead.",
            GradmagicWarning,
            stacklevel=4,
        )
        return None


def _compile_key(model: keras.Model) -> Key | None:
    builder = KeyBuilder()
    try:
        return builder.key(_compile_token(model, builder))
    except Uncacheable:
        return None


def is_warm(model: keras.Model) -> bool:
    """True when the model's compiled loss was built (eagerly, once) under its current compile state."""
    known, now = _warmed.get(model), _compile_key(model)
    return known is not None and now is not None and _same(known, now)


def _compile_token(model: keras.Model, builder: KeyBuilder) -> tuple:
    """What changes when the model is re-compiled (the traced loss is then stale).

    ``compile`` builds a new compiled-loss object each time (also when only
    ``loss_weights`` change); Keras has no public handle on it (see
    :func:`~gradmagic.core.backends.tensorflow.compiled_loss`).

    Raises:
        Uncacheable: The compiled loss holds values that cannot be snapshotted.
    """
    optimizer, compiled = getattr(model, "optimizer", None), compiled_loss(model)
    return (
        loss_token(builder, getattr(model, "loss", None)),
        None if optimizer is None else builder.same(optimizer),
        None if compiled is None else builder.same(compiled),
    )
