"""A model's plain train function and its recording twin, swapped per ``fit`` (every backend).

The monitor never changes how Keras trains: it keeps ``model.train_function``
as Keras made it (the *plain* one) and a *recording* one made by the backend's
recorder (see :mod:`gradmagic.core.monitor.functions` for TensorFlow and
:mod:`gradmagic.core.monitor.stateless` for JAX and PyTorch). During a ``fit``
with the monitor, ``model.train_function`` is a small guard that runs the
recording function with the optimizer hook in place (try/finally), and only in
the ``fit`` that attached it: whatever happens in ``fit`` - a stop, an exception
in any callback, Ctrl-C - the optimizer is never left wrapped, and a later
``fit`` without the monitor runs the plain function again.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import keras

from gradmagic.core.backends.keras_internals import fit_token


class Hook(Protocol):
    """What the guard puts in place around each call of the recording function."""

    def install(self) -> None: ...

    def remove(self) -> None: ...


class GuardedFunctions:
    """The plain and the recording train function of one model, for one monitor.

    Args:
        model: The model being fit.
        plain: Its train function as Keras made it (not recording).
        recording: The recording twin (same arguments and results).
        hook: Installed around each call of ``recording``, removed after it.
    """

    def __init__(self, model: keras.Model, plain: Any, recording: Any, hook: Hook) -> None:
        self._model = weakref.ref(model)
        self.plain = plain
        self.recording = recording
        self.optimizer = model.optimizer
        self.hook = hook
        self._token: tuple[Any, Any] | None = None
        self.guarded = self._guard()

    def serves(self, model: keras.Model, plain: Any) -> bool:
        """Whether these functions still belong to ``model`` as compiled now."""
        return self._model() is model and plain is self.plain and model.optimizer is self.optimizer

    def attached_in_this_fit(self, model: keras.Model) -> bool:
        """Whether ``model``'s current ``fit`` attached these functions and has run no step yet.

        True only between ``attach`` and the first step of the same ``fit`` (the
        epoch list is taken at the first step), so a ``fit`` that died earlier
        (an exception, Ctrl-C) never counts.
        """
        token = self._token
        return (
            token is not None
            and token[1] is None
            and token[0] is fit_token(model)[0]
            and model.train_function is self.guarded
        )

    def attach(self, model: keras.Model) -> None:
        """Make the current ``fit`` (and only it) run the recording function."""
        self._token = (fit_token(model)[0], None)  # the epoch list is taken at the first step
        model.train_function = self.guarded

    def detach(self) -> None:
        """Give the model its plain function back (idempotent)."""
        self._token = None
        self.hook.remove()
        model = self._model()
        if model is not None and model.train_function is self.guarded:
            model.train_function = self.plain

    def _guard(self) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            model = self._model()
            current = fit_token(model)
            token = self._token
            if token is not None and token[1] is None and current[0] is token[0]:
                token = self._token = current
            if token is None or current[0] is not token[0] or current[1] is not token[1]:
                # A later fit without this monitor (the one that attached died before
                # on_train_end): run, and from now on keep, the plain function.
                model.train_function = self.plain
                return self.plain(*args, **kwargs)
            self.hook.install()
            try:
                return self.recording(*args, **kwargs)
            finally:
                self.hook.remove()

        guarded.gradmagic_functions = self  # type: ignore[attr-defined]
        return guarded


def plain_function(model: keras.Model) -> Any:
    """``model.train_function`` without any monitor's recording wrapper around it."""
    function = model.train_function
    owner = getattr(function, "gradmagic_functions", None)
    return owner.plain if owner is not None else function
