r"""The loss problem of a TensorFlow model: the loss and its autodiff gradients as traced ``tf.function``\s.

The comparison with central differences is framework-free, in
:mod:`~gradmagic.core.diagnose.differences` (re-exported here).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from gradmagic.core.diagnose.differences import (
    LossProblem,
    _weight_values,
    check_rows,
    count_rows,
)
from gradmagic.core.diagnose.tracing import OpRecorder, concrete_function
from gradmagic.core.questions.compute import dense_gradients, float_leaves

__all__ = ["LossProblem", "_weight_values", "check_rows", "count_rows", "loss_problem"]


def loss_problem(model: keras.Model, loss_fn: Any, x: Any, y: Any, sw: Any, training: bool) -> LossProblem:
    """Trace the loss and its gradients at x.

    A failed trace raises :class:`~gradmagic.core.diagnose.tracing.TracingFailed`.
    """
    recorder = OpRecorder(model.layers)
    variables = list(model.trainable_weights)

    @tf.function(autograph=False)  # as in Keras's own train step; AutoGraph only adds tracing time
    def loss_at(x: Any) -> Any:
        with recorder.recording():
            return loss_fn(model, x, y, model(x, training=training), sw, training)

    @tf.function(autograph=False)  # as in Keras's own train step; AutoGraph only adds tracing time
    def grads_at(x: Any) -> Any:
        sources = float_leaves(x)
        with tf.GradientTape() as tape:
            tape.watch(sources)
            loss = loss_fn(model, x, y, model(x, training=training), sw, training)
        grad_w, grad_x = dense_gradients(tape.gradient(loss, (variables, sources)))
        return loss, grad_w, grad_x

    x_tensors = keras.tree.map_structure(tf.convert_to_tensor, x)
    loss_concrete = concrete_function(loss_at, recorder, x_tensors)
    dtype = tf.as_dtype(loss_concrete.structured_outputs.dtype)
    traced: list = []

    def gradients(x: Any) -> Any:
        # Traced on first use: the model's own problem needs no gradients when its float64 copy is checked.
        if not traced:
            traced.append(grads_at.get_concrete_function(x_tensors))
        return traced[0](x)

    return LossProblem(
        model,
        lambda x: float(loss_concrete(x)),
        gradients,
        x_tensors,
        dtype,
        recorder,
        as_input=lambda value, like: tf.constant(value, dtype=like.dtype),
    )
