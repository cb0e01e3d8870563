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

from typing import Any

import keras

from gradmagic.core.monitor.bad_step import BadStepCapture
from gradmagic.core.monitor.capture import ApplyHook, StatsBuffer
from gradmagic.core.monitor.guard import GuardedFunctions, plain_function  # noqa: F401 - importable from here


class TrainFunctions(GuardedFunctions):
    """A model's plain train function and its recording twin, for one monitor (TensorFlow).

    Built in ``on_train_begin``, after Keras made (or kept) ``model.train_function``.
    ``optimizer.apply`` is wrapped only *during* each call of the recording function
    (try/finally, see :class:`~gradmagic.core.monitor.guard.GuardedFunctions`), which
    is when TensorFlow may trace it.

    Args:
        model: The model being fit.
        plain: Its train function as Keras made it (not yet recording).
        buffer: Where the recording function writes the statistics.
        keep_bad_step: Keep the first non-finite step's batch and weights. Defaults to False.
    """

    def __init__(self, model: keras.Model, plain: Any, buffer: StatsBuffer, keep_bad_step: bool = False) -> None:
        self.buffer = buffer
        self.capture = BadStepCapture(model.trainable_variables) if keep_bad_step else None
        hook = ApplyHook(model.optimizer, buffer, self.capture)
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
        recording = model.train_function
        model.train_function = plain
        super().__init__(model, plain, recording, hook)
