"""Cache keys for compiled questions that cannot alias: a stale trace is impossible, not unlikely.

A traced function bakes in whatever Python values it read while tracing: a
user loss's attributes, the numbers a closure or a module global holds, the
layers and weights the model had. So a compiled function may be reused only
when every object that changes the computation is

- the *same object*: keyed by ``id`` and held by a weak reference (a strong one
  where the object allows no weak reference) that is checked on every hit, so
  a recycled ``id`` of a dead object can never match; or
- *provably equal*: plain values (numbers, strings, NumPy arrays and
  containers of them) are keyed by their contents.

A user callable or object is keyed by identity *and* a snapshot of the plain
values its code reads when traced: its own attributes (``vars``), the
attributes of its user-defined class, its closure cells, its default
arguments and the module globals its code names, following nested user
functions and objects a few levels deep. Variables, tensors, modules, classes
and Keras layers are keyed by identity: a graph reads variables when it runs,
tensors cannot change. Keras's own loss classes are keyed by contents alone,
so ``keras.losses.Huber()`` written inline on every call is one question.

What a snapshot cannot cover makes the question uncacheable instead of
risky (:class:`Uncacheable`): arrays above 1 MB (in all, per value keyed), containers of more than 256
entries, objects without ``__dict__`` that are neither plain values nor
identity-keyed kinds, and chains deeper than the limit. Such a question is
traced on every call. The model's side (:mod:`gradmagic.core.questions.model_keys`)
adds the public settings of the model and its layers (and of layers a layer
holds). Not seen at all: state reached through the attributes of modules, a
layer's private attributes, changes inside a setting the snapshot refuses (it
is then keyed by identity), or layers held in a container by a layer that is
not a model; call :func:`gradmagic.clear_cache` after changing those.
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import keras
import numpy as np

from gradmagic.core.backends.tensors import is_tf_function, loaded_tensor_types

_MAX_ARRAY_BYTES = 1 << 20
_MAX_ITEMS = 256
_MAX_DEPTH = 5

#: Kinds keyed by identity: their contents are read at run time, cannot change, or are code. Tensors (and
#: ``tf.Variable``) of whichever frameworks are loaded join them in :func:`_identity_kinds`.
_IDENTITY_KINDS = (
    keras.Variable,
    types.ModuleType,
    type,
    types.BuiltinFunctionType,
    types.CodeType,
    keras.Layer,
    keras.Optimizer,
)


class Uncacheable(Exception):
    """A value the key cannot snapshot; the question is then traced afresh on every call."""


class Key:
    """A hashable key plus the objects whose ``id`` it holds.

    A key as built holds those objects strongly, for as long as one call
    needs it; :meth:`stored` turns them into weak references (strong ones for
    objects that take none) for a key kept in a cache, so that caching keeps
    nothing alive and a recycled ``id`` of a dead object never matches.

    Attributes:
        token: The hashable key.
    """

    __slots__ = ("__weakref__", "_dead", "_held", "_weak", "token")

    def __init__(self, token: Hashable, held: tuple = (), weak: bool = False) -> None:
        self.token, self._held, self._weak, self._dead = token, held, weak, False

    def stored(self) -> Key:
        """This key with its objects held weakly (where they allow it), to be kept in a cache."""
        if self._weak:
            return self
        key = Key(self.token, weak=True)
        # The weak references tell the key when an object dies (before its id can be reused), so that
        # alive() is one flag, not a look at every object on every cache hit.
        key._held = tuple(_reference(obj, key._died) for obj in self._held)
        return key

    def alive(self) -> bool:
        """True while every object keyed by identity still exists (so its ``id`` is still its own)."""
        return not self._dead

    def _died(self, _ref: weakref.ref) -> None:
        self._dead = True


def _reference(obj: Any, died: Callable[[weakref.ref], None]) -> Any:
    try:
        return weakref.ref(obj, died)
    except TypeError:  # e.g. a builtin method: held strongly, alive as long as the cache entry
        return _Strong(obj)


class _Strong:
    """Holds an object that takes no weak reference."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj


class KeyBuilder:
    """Collect the parts of one key and the objects its identities stand for."""

    def __init__(self) -> None:
        self._held: list[Any] = []
        self._array_bytes = 0  # of the arrays read by the value being keyed (see ``value``)

    def same(self, obj: Any) -> tuple:
        """Key ``obj`` by identity."""
        self._held.append(obj)
        return ("id", id(obj))

    def same_all(self, objects: list) -> tuple:
        """Key a sequence of objects by identity, in order (one token for all of them)."""
        self._held.extend(objects)
        return ("ids", *map(id, objects))

    def value(self, value: Any) -> Hashable:
        """Key a value by identity and/or contents, as the module docstring describes.

        Raises:
            Uncacheable: The value holds something that cannot be snapshotted.
        """
        self._array_bytes = 0
        return self._token(value, _MAX_DEPTH, set())

    def key(self, *parts: Hashable) -> Key:
        """The finished key of ``parts``, with the objects gathered so far."""
        return Key(parts, tuple(self._held))

    def _token(self, value: Any, depth: int, seen: set[int]) -> Hashable:
        if value is None or isinstance(value, (bool, int, str, bytes)):
            return (type(value).__name__, value)
        if isinstance(value, float):
            return ("float", value.hex())  # NaN keys equal to itself
        if isinstance(value, complex):
            return ("complex", value.real.hex(), value.imag.hex())
        if isinstance(value, np.generic):
            return ("np", value.dtype.str, value.tobytes())
        if isinstance(value, np.ndarray):
            # The limit counts every array one value reads: a function naming a dict of 200 half-megabyte
            # arrays would otherwise be hashed in full on every call.
            self._array_bytes += value.nbytes
            if value.dtype == object or self._array_bytes > _MAX_ARRAY_BYTES:
                whole = value.nbytes == self._array_bytes
                read = f"an array of {value.nbytes} bytes" if whole else f"arrays of {self._array_bytes} bytes in all"
                raise Uncacheable(f"{read}, dtype {value.dtype}")
            return ("ndarray", value.dtype.str, value.shape, value.tobytes())
        if isinstance(value, _identity_kinds()):
            return self.same(value)
        if depth <= 0:
            raise Uncacheable(f"{type(value).__name__} nested deeper than {_MAX_DEPTH} levels")
        if id(value) in seen:
            return ("cycle", self.same(value))
        seen = seen | {id(value)}
        return self._container(value, depth - 1, seen)

    def _container(self, value: Any, depth: int, seen: set[int]) -> Hashable:
        token = self._token
        if isinstance(value, (list, tuple, set, frozenset, dict)) and len(value) > _MAX_ITEMS:
            raise Uncacheable(f"a {type(value).__name__} of {len(value)} entries")
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, *(token(v, depth, seen) for v in value))
        if isinstance(value, dict):
            return ("dict", *((token(k, depth, seen), token(v, depth, seen)) for k, v in value.items()))
        if isinstance(value, (set, frozenset)):
            return ("set", frozenset(token(v, depth, seen) for v in value))
        if isinstance(value, types.FunctionType):
            return self._function(value, depth, seen)
        if isinstance(value, types.MethodType):
            return ("method", token(value.__self__, depth, seen), token(value.__func__, depth, seen))
        if isinstance(value, functools.partial):
            return ("partial", *(token(v, depth, seen) for v in (value.func, value.args, value.keywords)))
        if is_tf_function(value):
            # A tf.function: the wrapper itself holds locks and trace caches; what a trace reads is its code.
            return ("tf.function", self.same(value), token(value.python_function, depth, seen))
        state = getattr(value, "__dict__", None)
        if state is None:
            raise Uncacheable(f"an object of type {type(value).__name__} without __dict__")
        cls = type(value)
        builtin = is_library(cls.__module__)
        # Keras's own classes compute from their attributes alone; a user's class is also itself.
        who = () if builtin else (self.same(value), self._class(cls, depth, seen))
        return ("obj", self.same(cls), *who, token(dict(state), depth, seen))

    def _function(self, fn: types.FunctionType, depth: int, seen: set[int]) -> Hashable:
        """Identity, plus what the code reads at trace time: cells, defaults, named globals."""
        token, code = self._token, fn.__code__
        if is_library(getattr(fn, "__module__", None) or ""):
            return ("fn", self.same(fn), self.same(code))  # Keras's own losses: library code, not user state
        cells = tuple(token(_cell(c), depth, seen) for c in (fn.__closure__ or ()))
        defaults = token((fn.__defaults__, fn.__kwdefaults__), depth, seen)
        names, namespace = global_names(code), fn.__globals__
        read = tuple((n, token(namespace[n], depth, seen)) for n in names if n in namespace)
        return ("fn", self.same(fn), self.same(code), cells, defaults, read)

    def _class(self, cls: type, depth: int, seen: set[int]) -> Hashable:
        """The plain values and methods a user class defines (class constants are read as ``self.X``)."""
        parts = []
        for klass in cls.__mro__:
            if is_library(klass.__module__) or klass.__module__ in ("builtins", "abc"):
                continue
            for name, attr in vars(klass).items():
                if name.startswith("__") or isinstance(attr, (property, staticmethod, classmethod)):
                    continue
                parts.append((klass.__qualname__, name, self._token(attr, depth, seen)))
        return ("class", *parts)


def _identity_kinds() -> tuple[type, ...]:
    """:data:`_IDENTITY_KINDS` plus the tensor classes of the frameworks loaded now (a tensor cannot change)."""
    tensors = loaded_tensor_types()
    kinds = _KINDS_BY_TENSORS.get(tensors)
    if kinds is None:
        kinds = _KINDS_BY_TENSORS[tensors] = (*_IDENTITY_KINDS, *tensors)
    return kinds


# The loaded frameworks change only when one is imported: a handful of entries at most.
_KINDS_BY_TENSORS: dict[tuple[type, ...], tuple[type, ...]] = {}


def is_library(module: str) -> bool:
    """True for a module of Keras, a framework or NumPy (library code, not user state)."""
    return module.split(".", 1)[0] in _LIBRARY_PACKAGES


#: Packages whose functions and objects are library code: keyed by identity and their own attributes.
_LIBRARY_PACKAGES = frozenset({"keras", "tensorflow", "numpy", "jax", "jaxlib", "torch"})


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (a name assigned later)
        return ("<empty cell>",)


@functools.lru_cache(maxsize=512)  # code objects are immutable: their names never change
def global_names(code: types.CodeType) -> tuple[str, ...]:
    """Names a code object (and the lambdas and comprehensions inside it) uses: its globals and attributes."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(global_names(const))
    return tuple(sorted(set(names)))
