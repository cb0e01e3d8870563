"""Keras internals gradmagic relies on on every backend, each behind one small function.

Nothing here imports a framework: these functions touch private attributes of
Keras objects only (the compiled-loss object, a layer's instance dict, the
attribute tracker), the same on TensorFlow, JAX and PyTorch. Each docstring
names the public API that is missing and what the function falls back to.
``tests/test_backend_tensorflow.py`` runs them against the installed Keras (they
are also importable from :mod:`gradmagic.core.backends.tensorflow`), so a
Keras upgrade that moves one fails there first, by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras

# --- The gradient questions (core/questions) ---------------------------------

# Keras's compiled-loss object lives in this private model attribute.
_COMPILE_LOSS = "_compile_loss"


def compiled_loss(model: Any) -> Any | None:
    """The model's compiled-loss object, or ``None`` before ``compile`` (or if Keras moved it).

    Public API missing: ``model.compute_loss`` runs Keras's compiled-loss object
    (``CompileLoss``), but Keras offers no handle on it, and ``compile`` makes a
    new one each time (also when only ``loss_weights`` change). Falls back to
    ``None``: cache keys then see ``model.loss``, the optimizer and the
    ``loss_weights`` of the public ``get_compile_config()`` instead, and the
    model's own object computes the loss (its per-output trackers then count
    among the model's metric variables).
    """
    return getattr(model, _COMPILE_LOSS, None)


def fresh_compiled_loss(compiled: Any) -> Any | None:
    """An unbuilt compiled loss with the configuration of ``compiled`` (losses, weights, output names).

    Public API missing: ``CompileLoss`` is built from ``compile``'s arguments,
    which it keeps only in private attributes. Falls back to ``None`` (the
    caller then uses the model's own object).
    """
    try:
        return type(compiled)(
            compiled._user_loss,
            compiled._user_loss_weights,
            reduction=compiled.reduction,
            output_names=compiled.output_names,
        )
    except Exception:  # another Keras version: no copy
        return None


@contextlib.contextmanager
def compiled_loss_replaced(model: Any, replacement: Any) -> Iterator[None]:
    """Within the block, ``model.compute_loss`` runs ``replacement`` as the compiled loss.

    Public API missing: no way to run ``compute_loss`` with another compiled
    loss. ``object.__setattr__`` keeps Keras's attribute tracking from adopting
    ``replacement`` (its variables would join the model's). No fallback is
    needed: the attribute is restored whatever the block does.
    """
    original = getattr(model, _COMPILE_LOSS)
    object.__setattr__(model, _COMPILE_LOSS, replacement)
    try:
        yield
    finally:
        object.__setattr__(model, _COMPILE_LOSS, original)


@contextlib.contextmanager
def calls_replaced(replacements: Sequence[tuple[Any, Callable[[Callable], Callable]]]) -> Iterator[None]:
    """Give layers a wrapped ``call`` for the duration of a trace; restore them afterwards.

    Public API missing: Keras has no hook around one layer's ``call`` inside a
    model. ``Layer.__call__`` looks ``self.call`` up on the instance, so an
    instance attribute sees every call, in Sequential, Functional and subclassed
    models alike; ``object.__setattr__`` keeps Keras's attribute tracking out of
    it, and the attribute is removed afterwards. No fallback: if Keras stopped
    looking ``call`` up on the instance, the wrappers would not run (errors would
    no longer name their layer) and the canary test fails.

    Args:
        replacements: ``(layer, wrap)`` pairs; ``wrap(original_call)`` returns the
            function to use instead.
    """
    installed = []
    try:
        for layer, wrap in replacements:
            installed.append((layer, "call" in vars(layer), layer.call))
            object.__setattr__(layer, "call", wrap(layer.call))
        yield
    finally:
        for layer, had_own, original in reversed(installed):
            if had_own:
                object.__setattr__(layer, "call", original)
            else:
                object.__delattr__(layer, "call")


def instance_settings(layer: Any) -> dict[str, Any]:
    """The layer's own attributes as they are now (the live dict: read it, never write it).

    Public API missing: a layer's current settings (``rate``, ``activation``, a
    model's own hyperparameters, also those set after construction) have no
    public view; ``get_config`` is per class, slow and misses attributes set
    later. Keras keeps them as plain instance attributes. Falls back to an empty
    dict for an object without ``__dict__`` (nothing is then compared).
    """
    return getattr(layer, "__dict__", None) or {}


def attribute_layers(layer: Any) -> list[Any]:
    """The layers a layer holds directly as its attributes (a custom layer's sublayers).

    Public API missing: ``Model.layers`` lists a model's layers, but a plain
    ``Layer`` has no public list of the layers it owns. Falls back to none for
    an object without ``__dict__``.
    """
    return [v for v in instance_settings(layer).values() if isinstance(v, keras.layers.Layer)]


def python_state(model: Any) -> list[tuple]:
    """A shallow copy of the Python state of every layer reachable from ``model``, for :func:`restore_python_state`.

    Public API missing: Keras cannot un-build a model. Building a model by
    calling it changes the layers themselves (a Sequential model prepends an
    ``InputLayer``, a layer keeps weights of the shape it saw), so each reachable
    layer and its private attribute tracker (``_tracker``) keep a copy of their
    attributes, and of the lists, dicts and sets among them, which Keras changes
    in place. Falls back to copying the layers only if the tracker moves.
    """
    return [_object_state(obj) for obj in _layers_and_trackers(model)]


def restore_python_state(saved: list[tuple]) -> None:
    """Put back what :func:`python_state` copied, into the very same objects."""
    for state in saved:
        _restore(*state)


def _layers_and_trackers(model: Any) -> list:
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


# --- diagnosis ---------------------------------------------------------------


def lambda_output_shape(layer: Any) -> Any:
    """The ``output_shape`` argument a ``keras.layers.Lambda`` was built with: a shape, a function, or ``None``.

    ``Lambda.get_config`` serializes a shape function to a dict and Keras has no
    public accessor for the argument as given; Keras keeps it as ``_output_shape``.
    Falls back to ``None``: Keras then infers the shape by running the function
    on symbolic inputs, which is right for most functions.

    Args:
        layer: A ``keras.layers.Lambda``.
    """
    return getattr(layer, "_output_shape", None)


# Keras' table of the 64-bit dtypes its type promotion narrows to 32 bits (on JAX and PyTorch).
_NARROWED = ("keras.src.backend.common.dtypes", "BIT64_TO_BIT32_DTYPE")


@contextlib.contextmanager
def float64_promotion() -> Iterator[None]:
    """Within the block, Keras' type promotion keeps float64 (as it does on TensorFlow); restored afterwards.

    Public API missing: Keras 3 on JAX and PyTorch narrows float64 to float32
    in its type promotion, "to be aligned with JAX's default behavior"
    (``keras.backend.result_type("float64", "float64")`` is ``"float32"``
    there), so a float64 model's ``matmul`` (PyTorch) or ``tanh`` (JAX) computes
    in float32 and a finite-difference check drowns in its round-off. Keras
    reads the narrowing from a module-level dict on every call; the block maps
    float64 to itself. Falls back to doing nothing if the dict moved: callers
    check ``keras.backend.result_type`` and fall back to float32 themselves.
    """
    import importlib

    try:
        table = getattr(importlib.import_module(_NARROWED[0]), _NARROWED[1])
    except (ImportError, AttributeError):
        table = None
    if not isinstance(table, dict) or "float64" not in table:
        yield
        return
    saved = table["float64"]
    table["float64"] = "float64"
    try:
        yield
    finally:
        table["float64"] = saved


# --- The training monitor (core/monitor) ------------------------------------


def fit_token(model: Any) -> tuple[Any, Any]:
    """Objects that are new in every ``fit``: its ``History`` and that one's epoch list.

    Public API missing: Keras tells callbacks nothing that identifies the ``fit``
    being run. Its ``CallbackList`` sets ``model.history`` to that ``fit``'s
    ``History`` before any callback runs, and ``History.on_train_begin`` (which may
    run after the monitor's) gives it a new ``epoch`` list, so the pair, taken at
    the first step, identifies the current ``fit``.

    Falls back to ``(None, None)`` parts where Keras sets neither: every ``fit``
    then looks alike, and the monitor can no longer tell a ``fit`` without it from
    the one it attached to (a later ``fit`` without the monitor, after one that died
    before ``on_train_end``, would record into its buffer).

    Args:
        model: The model being fit.
    """
    history = getattr(model, "history", None)
    return history, getattr(history, "epoch", None)
