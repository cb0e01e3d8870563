"""Find a tensor of another framework inside a user's ``x``, without importing any framework.

Shared by the JAX and PyTorch backends. A framework that was never imported
cannot have made a tensor, so each is looked up in ``sys.modules`` only: the
check imports nothing and costs one ``isinstance`` per leaf.
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
        expected: The Keras backend in use ('jax' or 'torch').
        argument: The argument's name, for the message. Defaults to ``"x"``.

    Raises:
        InputError: A leaf of ``x`` is a tensor of another framework.
    """
    import keras

    found = foreign_framework(keras.tree.flatten(x), expected)
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
