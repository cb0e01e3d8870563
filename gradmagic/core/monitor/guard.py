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

The monitor holds the plain function and the guard only weakly; the model
holds whichever it runs. Once ``compile()`` drops them, nothing of the old
compilation stays alive: on JAX, Keras jits the bound ``model.train_step``, and
a live old jit of it would hand the new one its stale trace (the old loss).
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
        self._plain = weakref.ref(plain)
        self.recording = recording
        self.optimizer = model.optimizer
        self.hook = hook
        self._token: tuple[Any, Any] | None = None
        self._guarded: Any = lambda: None

    @property
    def plain(self) -> Any:
        """The model's plain train function, or None once nothing else holds it (after ``compile()``)."""
        return self._plain()

    @property
    def guarded(self) -> Any:
        """The guard, or None when the model no longer holds it."""
        return self._guarded()

    def serves(self, model: keras.Model, plain: Any) -> bool:
        """Whether these functions still belong to ``model`` as compiled now."""
        alive = plain is not None and plain is self.plain  # None once compile() dropped the old one
        return self._model() is model and alive and model.optimizer is self.optimizer

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
        guarded = self.guarded
        if guarded is None:
            guarded = self._guard(self.plain)
            self._guarded = weakref.ref(guarded)
        model.train_function = guarded

    def detach(self) -> None:
        """Give the model its plain function back (idempotent)."""
        self._token = None
        self.hook.remove()
        model = self._model()
        guarded = self.guarded
        if model is not None and guarded is not None and model.train_function is guarded:
            model.train_function = guarded.plain

    def _guard(self, plain: Any) -> Any:
        # The guard holds the plain function strongly (the monitor only weakly): the model holds the guard.
        def guarded(*args: Any, **kwargs: Any) -> Any:
            model = self._model()
            current = fit_token(model)
            token = self._token
            if token is not None and token[1] is None and current[0] is token[0]:
                token = self._token = current
            if token is None or current[0] is not token[0] or current[1] is not token[1]:
                # A later fit without this monitor (the one that attached died before
                # on_train_end): run, and from now on keep, the plain function.
                model.train_function = plain
                return plain(*args, **kwargs)
            self.hook.install()
            try:
                return self.recording(*args, **kwargs)
            finally:
                self.hook.remove()

        guarded.gradmagic_functions = self  # type: ignore[attr-defined]
        guarded.plain = plain  # type: ignore[attr-defined]
        return guarded


def plain_function(model: keras.Model) -> Any:
    """``model.train_function`` without any monitor's recording wrapper around it."""
    function = model.train_function
    return getattr(function, "plain", function) if hasattr(function, "gradmagic_functions") else function
