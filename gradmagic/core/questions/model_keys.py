"""What makes a model's compiled question stale, as cache keys (see :mod:`gradmagic.core.questions.cache_keys`).

A question's key holds, besides its own arguments, the model's compile state
(its loss, by contents and identity; its optimizer and compiled-loss objects),
its layers and which weights train, all by identity, and the public
settings of the model and its layers (a Dropout ``rate``, a regularizer's
factor, a model's own ``beta``), by value. The same identities say
when the declared inputs (:class:`~gradmagic.core.questions.inputs.ModelSpec`) must be
read again and when a compiled loss needs its one eager warm-up call.
"""

from __future__ import annotations

import functools
import operator
import types
import warnings
import weakref
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import keras
import numpy as np

from gradmagic.core.backends.keras_internals import compiled_loss, instance_settings
from gradmagic.core.questions.cache_keys import Key, KeyBuilder, Uncacheable, global_names, is_library
from gradmagic.core.questions.caches import WeakCache
from gradmagic.core.questions.inputs import ModelSpec
from gradmagic.core.questions.targets import loss_token
from gradmagic.errors import GradmagicWarning

# model -> (layers Key, ModelSpec): what the model declares, re-read after add/pop.
_specs = WeakCache()
# model -> the compile Key its compiled loss was last built under.
_warmed = WeakCache()
# layer -> how _settings reads it (a _Layout): which public values, keyed how.
_layouts = WeakCache()
# model class -> the attribute names its own methods may read (a class's code does not change).
_read_by_class = WeakCache()
# layer or model class -> the functions its own (not Keras's) class code defines.
_functions_by_class = WeakCache()


def known_spec(model: keras.Model) -> ModelSpec | None:
    """The model's declared inputs and outputs as last read, if its layers are still the same and built."""
    known = _specs.lookup(model)
    if known is None or not model.built or not _same(known[0], _layers_key(model)):
        return None
    return known[1]


def remember_spec(model: keras.Model, spec: ModelSpec) -> None:
    """Keep ``spec`` for :func:`known_spec` until the model's layers change."""
    _specs.store(model, (_layers_key(model).stored(), spec))


def mark_warm(model: keras.Model) -> None:
    """Record that the compiled loss was built under the model's current compile state."""
    key = _compile_key(model)
    _warmed.store(model, None if key is None else key.stored())


def _layers_key(model: keras.Model) -> Key:
    """What a Sequential ``add``/``pop`` changes: the layers themselves (by identity)."""
    builder = KeyBuilder()
    return builder.key(builder.same_all(model.layers))


def _same(known: Key, new: Key) -> bool:
    return known.token == new.token and known.alive()


def _model_token(model: keras.Model, builder: KeyBuilder) -> tuple:
    """What makes a traced question stale: the compiled loss, the layers, the variables and which of them train.

    Freezing a layer changes more than its gradients (BatchNormalization then
    runs in inference mode even with ``training=True``), so every question
    depends on it. A variable added later (to a layer not yet built, which
    Keras still lets take weights) is not in a function traced before: the
    non-trainable ones count as well as the trainable ones.
    """
    layers = model.layers
    return (
        _compile_token(model, builder),
        builder.same_all(layers),
        builder.same_all(model.trainable_variables),
        builder.same_all(model.non_trainable_variables),
        _settings(model, builder, is_model=True),
        *(_settings(layer, builder, isinstance(layer, keras.Model)) for layer in _all_layers(model, layers)),
    )


#: Values a layer's public setting may hold that a snapshot compares by contents without ever failing.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, np.generic)
#: Plain values hashed as they are (with their type's name): the common case.
_SIMPLE = (type(None), bool, int, str)


class _Layout(NamedTuple):
    """How :func:`_settings` reads one layer, valid while its attribute names and the types of its values stay.

    Which public values are compared and how depends only on their types, so
    one check of the names and one of the types (both C-level tuple
    comparisons) replace a type test per attribute on every call.
    """

    names: tuple[str, ...]  # every attribute name, in order (an attribute added or removed changes it)
    public: tuple[str, ...]  # the names compared
    read: Callable[[dict], tuple]  # the values of ``public``, as a tuple
    types: tuple[type, ...]  # the types of those values when the layout was made
    simple: Callable[[tuple], tuple]  # the None/bool/int/str values among them
    valued: tuple[int, ...]  # positions of the other plain values (float, NumPy scalars...): keyed by contents
    functions: Callable[[tuple], tuple]  # the functions among them: keyed by identity
    callables: tuple[int, ...]  # positions of other callables (a partial, a user's object): identity and contents
    others: tuple[int, ...]  # positions of other values (arrays, lists, a regularizer): keyed by contents
    layers: tuple[int, ...]  # positions of layers a plain layer holds (an activation layer): their own settings
    shape: tuple  # the names and types the parts stand for
    atoms: Callable[[dict], tuple]  # the plain values and functions (the parts keyed without looking inside)
    rest: Callable[[dict], tuple]  # every other public value (their types decide how the key reads them)
    rest_types: tuple[type, ...]  # the types of those values when the layout was made


def _settings(layer: keras.Layer, builder: KeyBuilder, is_model: bool, depth: int = 3) -> tuple:
    """A layer's public settings, which a trace bakes in: ``rate``, ``momentum``, a model's own ``beta``.

    A layer's ``call`` reads its ``rate`` or ``activation``, and a subclassed
    model's ``call`` or ``compute_loss`` its hyperparameters, as Python values:
    changed in place, the traced graph would still use the old ones. Private
    attributes are Keras's own bookkeeping. Functions count by identity
    (``layer.activation = ...``); other callables (a ``functools.partial``, a
    user's object with ``__call__``) and a user's function by identity and the values their code reads,
    so one changed in place is seen too. Other values (an array, a list, a
    regularizer whose factor the regularization loss bakes in) count by contents,
    and a layer held by a plain layer (an activation layer) by its own settings,
    ``depth`` levels down. A model counts only the attributes its own
    class's code names: Keras sets others (``predict_function``,
    ``stop_training``) on every ``fit`` or ``predict``, which change no question.
    """
    attrs = instance_settings(layer)
    layout = _layouts.lookup(layer)
    names = tuple(attrs)
    if layout is None or layout.names != names:
        layout = _new_layout(layer, attrs, names, is_model)
    values = layout.read(attrs)
    if tuple(map(type, values)) != layout.types:
        layout = _new_layout(layer, attrs, names, is_model)
        values = layout.read(attrs)
    functions = layout.functions(values)
    # Most layers hold only plain values and functions: the other groups are skipped when empty.
    return (
        layout.shape,
        layout.simple(values),
        tuple(builder.value(values[i]) for i in layout.valued) if layout.valued else (),
        builder.same_all(functions),
        # A user's function also by what its code reads (globals, closure); Keras's own by identity alone.
        tuple(_callable_token(builder, f) for f in functions if not is_library(f.__module__ or ""))
        if functions
        else (),
        tuple(_callable_token(builder, values[i]) for i in layout.callables) if layout.callables else (),
        tuple(_callable_token(builder, values[i]) for i in layout.others) if layout.others else (),
        tuple(_settings(values[i], builder, isinstance(values[i], keras.Model), depth - 1) for i in layout.layers)
        if layout.layers and depth > 0
        else (),
        _class_code_token(type(layer), builder),
    )


def _class_code_token(cls: type, builder: KeyBuilder) -> tuple:
    """What the code of a user's layer or model class reads besides ``self``: globals, closures, defaults.

    A custom layer's ``call`` that multiplies by a module-level ``FACTOR``
    bakes its value into a trace, as a user loss does; rebinding ``FACTOR``
    must give a new question. Keras's own classes read no user state: ``()``.
    """
    functions = _class_functions(cls)
    return tuple(_callable_token(builder, f) for f in functions) if functions else ()


def _class_functions(cls: type) -> tuple[types.FunctionType, ...]:
    """The functions a class's own code defines (methods, static and class methods, property getters), not Keras's."""
    known = _functions_by_class.lookup(cls)
    if known is not None:
        return known
    found: list[types.FunctionType] = []
    for klass in cls.__mro__:
        if is_library(klass.__module__ or "") or klass.__module__ in ("builtins", "abc"):
            continue
        for attr in vars(klass).values():
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            elif isinstance(attr, property):
                attr = attr.fget
            if isinstance(attr, types.FunctionType):
                found.append(attr)
    return _functions_by_class.store(cls, tuple(found))


def _new_layout(layer: keras.Layer, attrs: dict, names: tuple[str, ...], is_model: bool) -> _Layout:
    """Classify the layer's public values by type (see :class:`_Layout`) and remember it for the layer."""
    read_names = _names_read(type(layer)) if is_model else None
    public = tuple(n for n in names if not n.startswith("_") and (read_names is None or n in read_names))
    read = _getter(public)
    values = read(attrs)
    kinds = tuple(map(type, values))
    simple = tuple(i for i, v in enumerate(values) if type(v) in _SIMPLE)
    valued = tuple(i for i, v in enumerate(values) if type(v) not in _SIMPLE and isinstance(v, _PLAIN))
    functions = tuple(i for i, v in enumerate(values) if isinstance(v, types.FunctionType))
    callables = tuple(i for i, v in enumerate(values) if _is_other_callable(v))
    grouped = {*simple, *valued, *functions, *callables}
    # A model's layers are keyed as model.layers; a plain layer's sublayers only here.
    layers = () if is_model else tuple(i for i, v in enumerate(values) if isinstance(v, keras.Layer))
    others = tuple(
        i
        for i, v in enumerate(values)
        if i not in grouped and not isinstance(v, (*_RUN_TIME, keras.Layer)) and public[i] not in _BOOKKEEPING
    )
    shape = (
        tuple((public[i], kinds[i].__name__) for i in simple),
        tuple(public[i] for i in valued),
        tuple(public[i] for i in functions),
        tuple(public[i] for i in callables),
        tuple(public[i] for i in others),
        tuple(public[i] for i in layers),
    )
    plain = {*simple, *valued, *functions}
    rest = tuple(i for i in range(len(public)) if i not in plain)
    layout = _Layout(
        names,
        public,
        read,
        kinds,
        _getter(simple),
        valued,
        _getter(functions),
        callables,
        others,
        layers,
        shape,
        _getter(tuple(public[i] for i in sorted(plain))),
        _getter(tuple(public[i] for i in rest)),
        tuple(kinds[i] for i in rest),
    )
    _layouts.store(layer, layout)
    return layout


#: Values a trace reads when it runs (variables, a seed generator's state) or never (an initializer): not keyed.
_RUN_TIME = (keras.Variable, keras.initializers.Initializer, keras.random.SeedGenerator)

#: Public attributes Keras derives from a layer's class, never a setting (the ``call`` signature's names).
_BOOKKEEPING = frozenset({"call_signature_parameters"})

#: Packages whose callable objects on a layer (initializers, sub-layers) are not user settings of its ``call``.
_LIBRARIES = ("keras", "tensorflow", "jax", "jaxlib", "torch", "numpy", "builtins")


def _is_other_callable(value: Any) -> bool:
    """A callable setting other than a plain function: a partial, a bound method, a user's callable object."""
    if isinstance(value, (functools.partial, types.MethodType)):
        return True
    cls = type(value)
    return callable(value) and not isinstance(value, type) and cls.__module__.split(".", 1)[0] not in _LIBRARIES


def _callable_token(builder: KeyBuilder, value: Any) -> Any:
    """A callable setting by identity and what its code reads (see :meth:`KeyBuilder.value`).

    Where the snapshot is refused (a large array in a closure), identity is
    what is left: :func:`gradmagic.clear_cache` covers changes inside it.
    """
    try:
        return builder.value(value)
    except Uncacheable:
        return builder.same(value)


def _getter(keys: tuple) -> Callable[[Any], tuple]:
    """``operator.itemgetter`` that always returns a tuple (also for zero or one key)."""
    if not keys:
        return lambda _: ()
    if len(keys) == 1:
        key = keys[0]
        return lambda mapping: (mapping[key],)
    return operator.itemgetter(*keys)


def _names_read(cls: type) -> frozenset[str]:
    """The attribute names the methods of a user's model class (not Keras's) may read."""
    known = _read_by_class.lookup(cls)
    if known is not None:
        return known
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".", 1)[0] in ("keras", "tensorflow", "jax", "torch", "builtins", "abc"):
            continue
        for attr in vars(klass).values():
            code = getattr(attr, "__code__", None)
            if code is not None:
                names.update(global_names(code))
                names.update(_strings(code))  # getattr(self, "gain", 1.0) names "gain" only as a string
    return _read_by_class.store(cls, frozenset(names))


def _strings(code: types.CodeType) -> set[str]:
    """The string constants of a code object and of the code nested in it."""
    found = set()
    for const in code.co_consts:
        if isinstance(const, str):
            found.add(const)
        elif isinstance(const, types.CodeType):
            found |= _strings(const)
    return found


def _all_layers(model: keras.Model, layers: list[keras.Layer] | None = None) -> list[keras.Layer]:
    """The model's layers (``layers``, when already read) and those of the models nested in it."""
    found = []
    for layer in model.layers if layers is None else layers:
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
    known, now = _warmed.lookup(model), _compile_key(model)
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
        _loss_weights_token(model, builder) if compiled is None else builder.same(compiled),
    )


def _loss_weights_token(model: keras.Model, builder: KeyBuilder) -> Hashable:
    """Without Keras's compiled-loss object, the one thing ``compile`` changes besides the loss: ``loss_weights``.

    Read from the public compile configuration, by value, so that a Keras
    release which moves the compiled loss makes a re-compile with other weights
    (and the same optimizer object) a new question instead of a stale one.

    Raises:
        Uncacheable: Keras cannot serialize the compile configuration.
    """
    if not getattr(model, "compiled", False):
        return None
    try:
        config = model.get_compile_config() or {}
    except Exception as err:
        raise Uncacheable("a compile configuration Keras cannot serialize") from err
    return ("loss_weights", builder.value(config.get("loss_weights")))


# --- Proofs: the same key, checked in microseconds ------------------------------------------------
# A question asked again with the same model is the common case (a slider, a training loop). Building
# its key walks every public setting of every layer; a StateProof taken right after a key was built
# says, from identities alone, that building it again would give the same model part: the same
# layers and variables, trainable and not (by weak reference), the same compile objects, and per
# layer the same attribute names holding the very same objects. A layer whose settings hold values the key reads
# the contents of (a list, a user's function or callable, a regularizer, a layer it holds) has its
# settings token computed again and compared instead. Identities compared by ``id`` belong to
# objects that the question's stored Key holds weakly: callers check ``Key.alive()`` as well, so a
# recycled ``id`` cannot match.

#: Values compared by identity and held by a proof: immutable, so holding them keeps nothing else alive.
_ATOMS = (type(None), bool, int, float, complex, str, bytes, np.generic)


class StateProof:
    """Evidence that the model part of a question's key is unchanged (see :func:`state_proof`)."""

    __slots__ = ("compile", "layers", "non_trainable", "settings", "top", "trainable")

    def __init__(
        self, top: tuple, layers: tuple, trainable: tuple, non_trainable: tuple, compile: tuple, settings: tuple
    ) -> None:
        self.top, self.layers, self.compile, self.settings = top, layers, compile, settings
        self.trainable, self.non_trainable = trainable, non_trainable


def state_proof(model: keras.Model) -> StateProof | None:
    """A proof of the model's state now, taken right after :func:`question_key` built a key for it.

    ``None`` when the state cannot be proven cheaply (an unbuilt model, objects that take no weak reference).
    """
    try:
        top = model.layers
        layers = (model, *_all_layers(model, top))
        return StateProof(
            tuple(map(weakref.ref, top)),
            tuple(map(weakref.ref, layers)),
            tuple(map(weakref.ref, model.trainable_variables)),
            tuple(map(weakref.ref, model.non_trainable_variables)),
            _compile_proof(model),
            tuple(_settings_proof(layer, isinstance(layer, keras.Model)) for layer in layers),
        )
    except (TypeError, ValueError, Uncacheable):
        return None


def unchanged(model: keras.Model, proof: StateProof) -> bool:
    """True when :func:`question_key` would build the same model part as when ``proof`` was taken.

    The caller also checks that the question's stored Key is ``alive()``.
    """
    top = model.layers
    if len(top) != len(proof.top) or not all(map(_refers, proof.top, top)):
        return False
    layers = (model, *_all_layers(model, top))
    if len(layers) != len(proof.layers) or not all(map(_refers, proof.layers, layers)):
        return False
    for proven, variables in (
        (proof.trainable, model.trainable_variables),
        (proof.non_trainable, model.non_trainable_variables),
    ):
        if len(variables) != len(proven) or not all(map(_refers, proven, variables)):
            return False
    if not _compile_unchanged(model, proof.compile):
        return False
    for (layout, atoms, token), layer in zip(proof.settings, layers):
        attrs = instance_settings(layer)
        if tuple(attrs) != layout.names:
            return False
        if token is None:
            # The same plain objects (so of the same types), and the others of the same types: the same layout.
            if not all(map(operator.is_, layout.atoms(attrs), atoms)) or (
                tuple(map(type, layout.rest(attrs))) != layout.rest_types
            ):
                return False
        elif _settings(layer, KeyBuilder(), isinstance(layer, keras.Model)) != token:
            return False
    return True


def _refers(ref: weakref.ref, obj: Any) -> bool:
    return ref() is obj


def _settings_proof(layer: keras.Layer, is_model: bool) -> tuple:
    """How :func:`unchanged` checks one layer: ``(layout, atoms, None)`` or ``(layout, None, token)``.

    The first when every value the key reads of the layer is a plain value or
    one of Keras's own functions (``layout.atoms``): they are compared by
    identity, with the types of every public value (which decide what the key
    reads). Otherwise the settings token, computed again and compared.
    """
    token = _settings(layer, KeyBuilder(), is_model)  # also makes the layout current
    layout = _layouts.lookup(layer)
    attrs = instance_settings(layer)
    plain = (
        not (layout.callables or layout.others or (layout.layers and not is_model))
        and all(is_library(f.__module__ or "") for f in layout.functions(layout.read(attrs)))
        and not _class_functions(type(layer))  # a user's class: what its code reads is computed again
    )
    return (layout, layout.atoms(attrs), None) if plain else (layout, None, token)


def _compile_proof(model: keras.Model) -> tuple:
    """``(loss, what it resolves to, its code, optimizer id, compiled-loss id)``, or a token to compute again."""
    loss, compiled = getattr(model, "loss", None), compiled_loss(model)
    optimizer = getattr(model, "optimizer", None)
    resolved = keras.losses.get(loss) if isinstance(loss, str) else None
    simple = compiled is not None and (
        loss is None or (isinstance(resolved, types.FunctionType) and is_library(resolved.__module__ or ""))
    )
    if simple:
        code = None if resolved is None else resolved.__code__
        return ("ids", loss, resolved, code, id(optimizer), id(compiled))
    return ("token", _compile_token(model, KeyBuilder()))


def _compile_unchanged(model: keras.Model, proof: tuple) -> bool:
    if proof[0] == "token":
        try:
            return _compile_token(model, KeyBuilder()) == proof[1]
        except Uncacheable:
            return False
    _, loss, resolved, code, optimizer, compiled = proof
    if getattr(model, "loss", None) is not loss or id(getattr(model, "optimizer", None)) != optimizer:
        return False
    if id(compiled_loss(model)) != compiled:
        return False
    return resolved is None or (keras.losses.get(loss) is resolved and resolved.__code__ is code)
