"""The one door to the framework: the only modules that touch framework internals.

``tensorflow.py`` holds every use of a TensorFlow or Keras internal (a private
attribute, ``tensorflow.python``, a protobuf, a naming convention), each behind
one small function that says which public API is missing and what it falls back
to. The rest of the core calls those functions and never the internals.
"""

from __future__ import annotations

from gradmagic.errors import GradmagicError

#: The Keras backends gradmagic computes on.
SUPPORTED = ("tensorflow",)


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
            f"Expected {' or '.join(map(repr, SUPPORTED))}: gradmagic computes its gradients with TensorFlow. "
            f"Fix: set KERAS_BACKEND=tensorflow before Keras is first imported (in a notebook, restart the kernel)."
        )
    return name
