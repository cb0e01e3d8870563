"""The batch and the weights of the first step whose gradient is not finite, kept on the device.

With ``on_anomaly="stop"`` or ``"raise"`` the recording train step keeps, when a
step's gradient first holds NaN/Inf, that step's batch ``(x, y, sample_weight)``
and the trainable weights from *before* its update, in monitor-owned variables.
The copy runs in a ``tf.cond`` branch that is one call of a non-inlined function:
a step with finite gradients pays for the test and one skipped node, nothing is
copied (with ``stats="norm"`` the test runs inside the branch that measures every
statistic, which a step with finite gradients takes only when scheduled).
TensorFlow orders the branch (it reads the weights) before the optimizer's update
of the same weights, so the copy is of the pre-step values.

The monitor then runs the NaN/Inf-origin pass of ``gm.explain`` on that batch at
those weights, and hands the batch to the user as ``monitor.bad_batch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.backends import tensorflow as backend


class BadStepCapture:
    """Device copies of the first non-finite step's batch and pre-step weights.

    Args:
        variables: The model's trainable variables (their pre-step values are kept).
    """

    def __init__(self, variables: Sequence[Any]) -> None:
        self._variables = list(variables)
        with tf.init_scope():
            self.captured = tf.Variable(False, trainable=False, name="gradmagic_bad_step_captured")
            self.count = tf.Variable(tf.constant(-1, tf.int64), trainable=False, name="gradmagic_bad_step_count")
            self.weights = [
                tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="gradmagic_bad_step_weight")
                for v in self._variables
            ]
            self.which = tf.Variable(tf.constant(-1, tf.int64), trainable=False, name="gradmagic_bad_step_which")
        # One set of batch variables per batch signature traced (XLA cannot reshape a
        # variable, and a partial last batch is traced apart): which says which set holds it.
        self._batches: list[tuple[Any, list[tf.Variable]]] = []
        self._signatures: list[tuple] = []
        self.data: Any = None  # the step's batch, set while the train step is traced

    def record(self, finite: tf.Tensor, count: tf.Tensor) -> None:
        """Add the conditional copy (call while tracing, before the optimizer's update is built).

        Args:
            finite: Scalar bool: every gradient of this step is finite.
            count: The monitor's step count before this step.
        """
        flat = [t for t in keras.tree.flatten(self.data) if isinstance(t, tf.Tensor)]
        signature = tuple((tuple(t.shape.as_list()) if t.shape.rank is not None else None, t.dtype) for t in flat)
        if signature not in self._signatures:
            with tf.init_scope():
                variables = [_batch_variable(t) for t in flat]
            self._signatures.append(signature)
            self._batches.append((self.data, variables))
        which = self._signatures.index(signature)
        batch_vars, weights, model_vars = self._batches[which][1], self.weights, self._variables

        def copy(*values: tf.Tensor) -> tf.Tensor:
            for target, value in zip(batch_vars, values[:-1], strict=True):
                target.assign(value)
            for target, source in zip(weights, model_vars, strict=True):
                target.assign(source)
            self.count.assign(values[-1])
            self.which.assign(which)
            self.captured.assign(True)
            return tf.constant(True)

        if tf.executing_eagerly():  # run_eagerly=True: a plain Python test, no function to trace per step
            if not bool(finite) and not bool(self.captured.numpy()):
                copy(*flat, count)
            return
        specs = [tf.TensorSpec(t.shape, t.dtype) for t in flat] + [tf.TensorSpec([], tf.int64)]
        # Not inlined: a step that copies nothing skips one node, not one per weight.
        function = backend.not_inlined_function(copy, specs)
        take = tf.logical_and(tf.logical_not(finite), tf.logical_not(self.captured))
        tf.cond(take, lambda: function(*flat, count), lambda: tf.constant(False))

    def reset(self) -> None:
        """Forget a copy (a new fit looks for its own first bad step)."""
        self.captured.assign(False)
        self.count.assign(-1)

    def read(self) -> tuple[int, tuple[Any, Any, Any], list[np.ndarray]] | None:
        """``(count, (x, y, sample_weight), pre-step weights)`` of the captured step, or None."""
        if not bool(self.captured.numpy()):
            return None
        structure, variables = self._batches[int(self.which.numpy())]
        values = iter([v.numpy() for v in variables])
        data = keras.tree.map_structure(lambda t: next(values) if isinstance(t, tf.Tensor) else t, structure)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return int(self.count.numpy()), (x, y, sample_weight), [w.numpy() for w in self.weights]


def _batch_variable(tensor: tf.Tensor) -> tf.Variable:
    """A variable for one batch tensor: of its static shape, or of any shape where it has none."""
    if tensor.shape.is_fully_defined():
        return tf.Variable(tf.zeros(tensor.shape, tensor.dtype), trainable=False, name="gradmagic_bad_batch")
    return tf.Variable(
        tf.zeros([0] * (tensor.shape.rank or 1), tensor.dtype),
        shape=tf.TensorShape([None] * tensor.shape.rank) if tensor.shape.rank is not None else tf.TensorShape(None),
        trainable=False,
        name="gradmagic_bad_batch",
    )
