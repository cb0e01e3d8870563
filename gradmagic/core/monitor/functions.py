"""The model's own train function and a recording one, each traced once, swapped per ``fit``.

Keras builds ``model.train_function`` once and reuses its traced graph for every
``fit`` until ``compile()`` resets it. The monitor keeps that function (the
*plain* one) and builds a second, *recording* one (whose step also writes the
gradient statistics, see :mod:`gradmagic.core.monitor.capture`); ``fit`` with
the monitor runs the recording function, ``fit`` without it the plain one. Each
is traced the first time it runs and then reused, so repeated short fits pay no
retracing (and TensorFlow prints no retracing warning).
"""

from __future__ import annotations

import weakref
from typing import Any

import keras

from gradmagic.core.backends import tensorflow as backend
from gradmagic.core.monitor.bad_step import BadStepCapture
from gradmagic.core.monitor.capture import ApplyHook, StatsBuffer


class TrainFunctions:
    """A model's plain train function and its recording twin, for one monitor.

    Built in ``on_train_begin``, after Keras made (or kept) ``model.train_function``.
    ``optimizer.apply`` is wrapped only *during* each call of the recording function
    (try/finally), which is when TensorFlow may trace it: whatever happens in ``fit``
    - a stop, an exception in any callback, Ctrl-C - the optimizer is never left
    wrapped.

    Args:
        model: The model being fit.
        plain: Its train function as Keras made it (not yet recording).
        buffer: Where the recording function writes the statistics.
    """

    def __init__(self, model: keras.Model, plain: Any, buffer: StatsBuffer, keep_bad_step: bool = False) -> None:
        self._model = weakref.ref(model)
        self.plain = plain
        self.optimizer = model.optimizer
        self.buffer = buffer
        self.capture = BadStepCapture(model.trainable_variables) if keep_bad_step else None
        self.hook = ApplyHook(model.optimizer, buffer, self.capture)
        # make_train_function(force=True) is the public way to get a second,
        # independent function of the same step; the plain one is put back. Keras
        # hands it model.train_step as it is then: with a bad-step copy, a wrapper
        # that shows the copy each step's batch (an instance attribute, removed again).
        capture = self.capture
        if capture is not None:
            step = model.train_step

            def train_step(data: Any) -> Any:
                capture.data = data
                return step(data)

            object.__setattr__(model, "train_step", train_step)
        try:
            model.make_train_function(force=True)
        finally:
            if capture is not None:
                object.__delattr__(model, "train_step")
        self.recording = model.train_function
        model.train_function = plain
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
            and token[0] is backend.fit_token(model)[0]
            and model.train_function is self.guarded
        )

    def attach(self, model: keras.Model) -> None:
        """Make the current ``fit`` (and only it) run the recording function."""
        self._token = (backend.fit_token(model)[0], None)  # the epoch list is taken at the first step
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
            current = backend.fit_token(model)
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
