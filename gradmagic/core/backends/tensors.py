"""Recognise the tensors of TensorFlow, JAX and PyTorch without importing any of them.

A framework that was never imported cannot have made a tensor, so each is
looked up in ``sys.modules`` only: these checks import nothing and cost one
``isinstance`` per value. The shared modules of the core (input conversion,
cache keys) use them to treat a ``tf.Tensor`` as before on TensorFlow while
never importing TensorFlow on JAX or PyTorch; the JAX and PyTorch backends use
them to refuse a tensor of another framework in ``x``.
"""

from __future__ import annotations

import sys
from typing import Any

from gradmagic.errors import InputError

# Keras backend name -> (the framework's display name, its top-level module, the tensor classes' paths).
_FRAMEWORKS = {
    "tensorflow": ("TensorFlow", "tensorflow", ("Tensor", "Variable")),
    "jax": ("JAX", "jax", ("Array",)),
    "torch": ("PyTorch", "torch", ("Tensor",)),
}


def _tensor_types(backend: str) -> tuple[type, ...]:
    _, module_name, names = _FRAMEWORKS[backend]
    module = sys.modules.get(module_name)
    if module is None:
        return ()
    return tuple(t for t in (getattr(module, n, None) for n in names) if isinstance(t, type))


def loaded_tensor_types() -> tuple[type, ...]:
    """The tensor (and ``tf.Variable``) classes of every framework imported so far."""
    return tuple(t for backend in _FRAMEWORKS for t in _tensor_types(backend))


def is_tf_tensor(value: Any) -> bool:
    """True for a ``tf.Tensor`` (eager or symbolic); False without importing TensorFlow when it is not loaded."""
    module = sys.modules.get("tensorflow")
    return module is not None and isinstance(value, module.Tensor)


def is_tf_function(value: Any) -> bool:
    """True for a ``tf.function`` (a ``PolymorphicFunction``); False when TensorFlow is not loaded."""
    module = sys.modules.get("tensorflow")
    kind = getattr(getattr(getattr(module, "types", None), "experimental", None), "PolymorphicFunction", None)
    return kind is not None and isinstance(value, kind)


def host_array(value: Any) -> Any:
    """A JAX array or a torch.Tensor as a NumPy array (on the host, detached); anything else as it is.

    Input conversion works on NumPy; a ``tf.Tensor`` is kept (the TensorFlow
    path converts it itself).
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(value, jax.Array):
        import numpy as np

        return np.asarray(value)
    return value


def foreign_framework(leaves: list[Any], expected: str) -> tuple[str, Any] | None:
    """The first leaf that is a tensor of a framework other than ``expected``, as ``(backend, leaf)``."""
    others = [(b, _tensor_types(b)) for b in _FRAMEWORKS if b != expected]
    others = [(b, types) for b, types in others if types]
    if not others:
        return None
    for leaf in leaves:
        for backend, types in others:
            if isinstance(leaf, types):
                return backend, leaf
    return None


def check_no_foreign(x: Any, expected: str, argument: str = "x") -> None:
    """Raise a clear error if ``x`` holds a tensor of a framework other than ``expected``.

    Args:
        x: The user's input: an array, or a list, tuple or dict of them.
        expected: The Keras backend in use ('tensorflow', 'jax' or 'torch').
        argument: The argument's name, for the message. Defaults to ``"x"``.

    Raises:
        InputError: A leaf of ``x`` is a tensor of another framework.
    """
    import keras

    _refuse(foreign_framework(keras.tree.flatten(x), expected), expected, argument)


def check_leaf_not_foreign(leaf: Any, expected: str, argument: str = "x") -> None:
    """``check_no_foreign`` for one array-like (no tree walk: the input conversion calls it per leaf).

    Raises:
        InputError: ``leaf`` is a tensor of a framework other than ``expected``.
    """
    if isinstance(leaf, (int, float, list, tuple)):
        return  # plain Python data: no framework's tensor
    _refuse(foreign_framework([leaf], expected), expected, argument)


def _refuse(found: tuple[str, Any] | None, expected: str, argument: str) -> None:
    """Raise the foreign-tensor error for ``found`` (nothing when None)."""
    if found is None:
        return
    backend, leaf = found
    name = _FRAMEWORKS[backend][0]
    kind = f"{type(leaf).__module__}.{type(leaf).__qualname__}"
    raise InputError(
        f"Received: {argument} holding a {name} tensor ({kind}, shape {tuple(getattr(leaf, 'shape', ()))}) "
        f"while Keras runs on the {expected!r} backend. Expected NumPy arrays or {_FRAMEWORKS[expected][0]} "
        f"tensors: a tensor of one framework cannot flow through another's autodiff. Fix: convert it to NumPy "
        f"first (np.asarray(...), or .numpy() / .detach().cpu().numpy()), or run with "
        f"KERAS_BACKEND={backend!r} if the model belongs there."
    )
