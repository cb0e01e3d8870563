"""The one door to each framework: the only modules that touch framework internals.

``tensorflow.py`` holds every use of a TensorFlow or Keras internal (a private
attribute, ``tensorflow.python``, a protobuf, a naming convention), each behind
one small function that says which public API is missing and what it falls back
to; ``jax.py`` and ``torch.py`` do the same for JAX and PyTorch. The rest of the
core calls those functions and never the internals. Which one is used follows
Keras: ``keras.backend.backend()``, chosen by ``KERAS_BACKEND`` or
``~/.keras/keras.json`` before Keras is first imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradmagic.errors import GradmagicError

#: The Keras backends gradmagic computes on.
SUPPORTED = ("tensorflow", "jax", "torch")


def check_backend(name: str | None = None) -> str:
    """Refuse a Keras backend gradmagic cannot compute on, with the fix.

    Args:
        name: The backend's name. Defaults to ``None``: the one Keras runs on
            (``keras.backend.backend()``, chosen by ``KERAS_BACKEND`` or
            ``~/.keras/keras.json``).

    Returns:
        The backend's name.

    Raises:
        GradmagicError: The backend is not one gradmagic supports.
    """
    if name is None:
        import keras

        name = keras.backend.backend()
    if name not in SUPPORTED:
        raise GradmagicError(
            f"Received: Keras running on the {name!r} backend (set by KERAS_BACKEND or ~/.keras/keras.json). "
            f"Expected one of {', '.join(map(repr, SUPPORTED))}: gradmagic computes gradients with that "
            f"framework's own autodiff, and {name!r} has none gradmagic can use. Fix: set KERAS_BACKEND to one "
            f"of them before Keras is first imported (in a notebook, restart the kernel)."
        )
    return name


def not_on_backend(name: str) -> Callable[..., Any]:
    """A stand-in for a public name not yet implemented on the Keras backend in use: raises when called."""
    backend = check_backend()

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise GradmagicError(
            f"Received: a call of gradmagic.{name} with Keras on the {backend!r} backend. Expected the "
            f"'tensorflow' backend: {name} is not implemented on {backend!r} yet (the README's backend table "
            f"says what works where). Fix: run this part with KERAS_BACKEND=tensorflow (a model saved as "
            f".keras loads on any backend)."
        )

    unavailable.__name__ = name
    unavailable.__qualname__ = name
    return unavailable


def stateless_backend() -> Any:
    """The backend object of the JAX or PyTorch Keras in use (``jax.BACKEND`` or ``torch.BACKEND``).

    Both have the same methods (compile, value-and-gradient, batched Jacobian,
    to-NumPy, the foreign-tensor check), so the stateless questions are written
    once for both.

    Raises:
        GradmagicError: Keras runs on a backend without such an object
            (TensorFlow has its own implementation; others are unsupported).
    """
    import importlib

    name = check_backend()
    if name not in ("jax", "torch"):
        raise GradmagicError(
            f"Received: Keras running on the {name!r} backend. Expected 'jax' or 'torch': this code path is "
            f"their stateless implementation. Fix: call the public gradmagic function, which picks the "
            f"implementation of the backend in use."
        )
    return importlib.import_module(f"gradmagic.core.backends.{name}").BACKEND
