"""Compiled attribution functions: the gradient of one output unit per sample, at many points at once.

Integrated gradients and SmoothGrad need the gradient at many points around
each sample (a path, noisy copies). Each function here builds those points
inside the graph from a few small arguments, runs the model once on all of
them, and reduces the gradients there too, so only per-sample results leave
the graph. Every argument has a free leading axis (see
:func:`gradmagic.core.questions.compute.call_compiled`), so one trace serves any
batch, step count or sample count. The model's state is snapshotted and
restored inside each graph, as for the three gradient questions.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from gradmagic.core.questions import compute
from gradmagic.core.questions.cache_keys import Key
from gradmagic.core.questions.state import restore_in_graph, snapshot_in_graph, state_variables
from gradmagic.core.questions.targets import model_name
from gradmagic.core.questions.trace_errors import diagnose_trace_error, short_error
from gradmagic.core.questions.user_code import with_cause
from gradmagic.errors import ComputeError, GradmagicError


@dataclass
class Compiled:
    """A cached ``tf.function`` and its concrete functions per input signature."""

    fn: Callable
    concrete: dict = field(default_factory=dict)


def run(model: keras.Model, key: Key | None, compiled: Compiled, args: tuple, what: str, shape: tuple) -> Any:
    """Call a compiled function; any failure becomes one GradmagicError (and the cache entry is dropped)."""
    try:
        return compute.call_compiled(compiled.fn, compiled.concrete, args)
    except GradmagicError as exc:
        compute.forget(model, key)
        raise with_cause(exc)  # noqa: B904 - the cause is the user's error, re-attached
    except Exception as exc:
        compute.forget(model, key)
        raise diagnose_trace_error(exc, model, None) or ComputeError(
            f"Computing {what} of model '{model_name(model)}' on x of shape {shape} failed: "
            f"{short_error(exc).rstrip('.')}. Check that x is what the model takes; the model was left unchanged."
        ) from None


def flat_outputs(y_pred: Any) -> tf.Tensor:
    """The per-sample outputs flattened and joined: ``(batch, units)``, in the widest float dtype among them.

    Unit ``k`` here is unit ``k`` of ``input_gradients(..., output=k)``.
    """
    flat = [tf.reshape(t, (tf.shape(t)[0], -1)) for t in keras.tree.flatten(y_pred)]
    common = tf.float64 if any(t.dtype == tf.float64 for t in flat) else tf.float32
    return tf.concat([tf.cast(t, common) for t in flat], axis=1)


def _unit_gradients(model: keras.Model, points: tf.Tensor, units: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Output unit ``units[i]`` at ``points[i]`` and its gradient with respect to ``points[i]``, for every i.

    Samples do not interact in inference mode, so the gradient of the sum over
    the batch is every point's own gradient, from one backward pass.
    """
    with tf.GradientTape() as tape:
        tape.watch(points)
        with compute.layers_named(model):
            y_pred = model(points, training=False)
        values = tf.gather(flat_outputs(y_pred), units, axis=1, batch_dims=1)
    return values, tape.gradient(values, points)


def forward_function(model: keras.Model) -> Callable:
    """Compile ``x -> (batch, units)``: the flattened outputs (for the predicted class and f at the end points)."""
    model_ref = weakref.ref(model)

    @tf.function
    def forward(x: tf.Tensor) -> tf.Tensor:
        model = model_ref()
        guarded = state_variables(model)
        saved = snapshot_in_graph(guarded)
        with compute.layers_named(model):
            outputs = flat_outputs(model(x, training=False))
        restore_in_graph(guarded, saved)
        return outputs

    return forward


def _lifted(t: tf.Tensor, rank: int) -> tf.Tensor:
    """A ``(batch, k)`` tensor as ``(batch, k, 1, ..., 1)``, to broadcast against ``(batch, k, *sample)``.

    ``rank`` is x's rank (batch axis included): one trailing 1 per sample axis.
    """
    return tf.reshape(t, tf.concat([tf.shape(t), tf.ones([rank - 1], tf.int32)], 0))


def path_function(model: keras.Model, keep_gradients: bool) -> Callable:
    """Compile integrated gradients over one stretch of the path, for a batch of samples.

    ``(x, baseline, alphas, weights, units) -> (values (batch, k), attribution, [gradients])``:
    the points ``baseline + alpha * (x - baseline)`` for the ``k`` alphas, output
    unit ``units[i]`` at each, and ``(x - baseline) * sum_j weights[j] * grad_j``
    (this stretch's share of the integral). With ``keep_gradients``, the
    gradients at every point too, ``(batch, k, *sample)``.
    """
    model_ref = weakref.ref(model)

    @tf.function
    def integrated(x: tf.Tensor, baseline: tf.Tensor, alphas: tf.Tensor, weights: tf.Tensor, units: tf.Tensor) -> Any:
        model = model_ref()
        guarded = state_variables(model)
        saved = snapshot_in_graph(guarded)
        rank = x.shape.rank
        batch, steps = tf.shape(x)[0], tf.shape(alphas)[0]
        alpha = _lifted(tf.cast(alphas, x.dtype)[None, :], rank)
        delta = x - baseline
        points = baseline[:, None] + alpha * delta[:, None]  # (batch, k, *sample)
        flat = tf.reshape(points, tf.concat([[batch * steps], tf.shape(x)[1:]], 0))
        values, grads = _unit_gradients(model, flat, tf.repeat(units, steps))
        restore_in_graph(guarded, saved)
        if grads is None:  # the output does not depend on x: every attribution is 0
            grads = tf.zeros_like(flat)
        grads = tf.reshape(grads, tf.shape(points))
        weight = _lifted(tf.cast(weights, x.dtype)[None, :], rank)
        attribution = delta * tf.reduce_sum(weight * grads, axis=1)
        values = tf.reshape(values, [batch, steps])
        return (values, attribution, grads) if keep_gradients else (values, attribution)

    return integrated


def noise_function(model: keras.Model) -> Callable:
    """Compile SmoothGrad's sum of gradients over noisy copies, for a batch of samples.

    ``(x, noise, units) -> (values (batch, n), summed gradients (batch, *sample))``
    where ``noise`` holds ``n`` draws per sample, sample-major, as
    ``(batch * n, *sample)`` (so its leading axis stays free). Zero noise with
    ``n = 1`` gives the plain gradient.
    """
    model_ref = weakref.ref(model)

    @tf.function
    def smoothed(x: tf.Tensor, noise: tf.Tensor, units: tf.Tensor) -> Any:
        model = model_ref()
        guarded = state_variables(model)
        saved = snapshot_in_graph(guarded)
        batch = tf.shape(x)[0]
        draws = tf.shape(noise)[0] // batch
        per_sample = tf.reshape(noise, tf.concat([[batch, draws], tf.shape(x)[1:]], 0))
        points = tf.reshape(x[:, None] + per_sample, tf.shape(noise))
        values, grads = _unit_gradients(model, points, tf.repeat(units, draws))
        restore_in_graph(guarded, saved)
        if grads is None:
            grads = tf.zeros_like(points)
        summed = tf.reduce_sum(tf.reshape(grads, tf.shape(per_sample)), axis=1)
        return tf.reshape(values, [batch, draws]), summed

    return smoothed


def layer_function(model: keras.Model, layer: keras.Layer) -> Callable:
    """Compile Grad-CAM's ingredients: ``(x, units) -> (values, [layer outputs], [d unit / d layer output])``.

    The layer's outputs of every call are recorded (a shared layer runs more
    than once); the gradient is of output unit ``units[i]`` of sample i.
    """
    model_ref, layer_ref = weakref.ref(model), weakref.ref(layer)

    @tf.function
    def layer_grads(x: tf.Tensor, units: tf.Tensor) -> Any:
        model = model_ref()
        guarded = state_variables(model)
        saved = snapshot_in_graph(guarded)
        with tf.GradientTape() as tape:
            with compute.layers_named(model), compute.capture_calls(layer_ref(), tape) as calls:
                y_pred = model(x, training=False)
            values = tf.gather(flat_outputs(y_pred), units, axis=1, batch_dims=1)
        outputs = [keras.tree.flatten(call)[0] for call in calls]
        grads = tape.gradient(values, outputs)
        restore_in_graph(guarded, saved)
        grads = [tf.zeros_like(o) if g is None else g for o, g in zip(outputs, grads)]
        return values, outputs, grads

    return layer_grads
