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


def chosen_units(units: tf.Tensor, at_x: tf.Tensor) -> tf.Tensor:
    """``units``, with -1 replaced by each sample's predicted class (argmax of its output at x)."""
    return tf.where(units < 0, tf.argmax(at_x, axis=1, output_type=tf.int32), units)


def _rows(t: tf.Tensor, units: tf.Tensor) -> tf.Tensor:
    return tf.gather(t, units, axis=1, batch_dims=1)


def forward_function(model: keras.Model) -> Callable:
    """Compile ``x -> (batch, units)``: the flattened outputs (to check ``output=`` where the model declares none)."""
    model_ref = weakref.ref(model)

    @tf.function(autograph=False)  # as in Keras's own train step; AutoGraph only adds tracing time
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


def _points_and_ends(model: keras.Model, points: tf.Tensor, ends: tf.Tensor, units: tf.Tensor, per_sample: Any) -> Any:
    """One model call on ``points`` (``per_sample`` per sample, sample-major) followed by ``ends``.

    ``ends`` starts with x itself (one row per sample), which fixes each
    sample's unit (``units``, or the predicted class for -1). Returns the unit
    at every point, its gradient with respect to the points (``None`` if the
    output does not depend on them), the units and the flat outputs at ``ends``.
    Samples do not interact in inference mode, so the gradient of the sum over
    the batch is every point's own gradient, from one backward pass; the end
    rows share the forward pass and take no gradient.
    """
    count = tf.shape(points)[0]
    with tf.GradientTape() as tape:
        tape.watch(points)
        with compute.layers_named(model):
            outputs = flat_outputs(model(tf.concat([points, ends], 0), training=False))
        at_points, at_ends = outputs[:count], outputs[count:]
        chosen = chosen_units(units, at_ends[: tf.shape(units)[0]])
        values = _rows(at_points, tf.repeat(chosen, per_sample))
    return values, tape.gradient(values, points), chosen, at_ends


def path_function(model: keras.Model, keep_gradients: bool) -> Callable:
    """Compile integrated gradients over one stretch of the path, for a batch of samples.

    ``(x, baseline, alphas, weights, units) -> (values (batch, k), attribution,
    units, f(x), f(baseline), connected, [gradients])``: the points ``baseline + alpha *
    (x - baseline)`` for the ``k`` alphas, output unit ``units[i]`` (-1: the
    predicted class) at each, and ``(x - baseline) * sum_j weights[j] * grad_j``
    (this stretch's share of the integral); ``connected`` is False when the
    graph has no gradient path from x to the output. x and the baseline run in the same
    batch, for f at both ends. With ``keep_gradients``, the gradients at every
    point too, ``(batch, k, *sample)``.
    """
    model_ref = weakref.ref(model)

    @tf.function(autograph=False)  # as in Keras's own train step; AutoGraph only adds tracing time
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
        values, grads, chosen, ends = _points_and_ends(model, flat, tf.concat([x, baseline], 0), units, steps)
        restore_in_graph(guarded, saved)
        connected = tf.constant(grads is not None)  # known when traced: the graph has a path from x or not
        if grads is None:  # no gradient path from x to the output: every attribution is 0
            grads = tf.zeros_like(flat)
        grads = tf.reshape(grads, tf.shape(points))
        weight = _lifted(tf.cast(weights, x.dtype)[None, :], rank)
        attribution = delta * tf.reduce_sum(weight * grads, axis=1)
        parts = (
            tf.reshape(values, [batch, steps]),
            attribution,
            chosen,
            _rows(ends[:batch], chosen),
            _rows(ends[batch:], chosen),
            connected,
        )
        return (*parts, grads) if keep_gradients else parts

    return integrated


def noise_function(model: keras.Model) -> Callable:
    """Compile SmoothGrad's sum of gradients over noisy copies, and the plain gradient, for a batch of samples.

    ``(x, noise, units) -> (values (batch, n), summed gradients, summed squared
    gradients, gradient at x, units, f(x), connected)`` where ``noise`` holds ``n`` draws per sample, sample-major,
    as ``(batch * n, *sample)`` (so its leading axis stays free). ``n = 0``
    gives the plain gradient alone.
    """
    model_ref = weakref.ref(model)

    @tf.function(autograph=False)  # as in Keras's own train step; AutoGraph only adds tracing time
    def smoothed(x: tf.Tensor, noise: tf.Tensor, units: tf.Tensor) -> Any:
        model = model_ref()
        guarded = state_variables(model)
        saved = snapshot_in_graph(guarded)
        batch = tf.shape(x)[0]
        draws = tf.shape(noise)[0] // batch
        per_sample = tf.reshape(noise, tf.concat([[batch, draws], tf.shape(x)[1:]], 0))
        points = tf.concat([tf.reshape(x[:, None] + per_sample, tf.shape(noise)), x], 0)
        with tf.GradientTape() as tape:
            tape.watch(points)
            with compute.layers_named(model):
                outputs = flat_outputs(model(points, training=False))
            count = batch * draws
            chosen = chosen_units(units, outputs[count:])
            values = _rows(outputs, tf.concat([tf.repeat(chosen, draws), chosen], 0))
        grads = tape.gradient(values, points)
        restore_in_graph(guarded, saved)
        connected = tf.constant(grads is not None)
        if grads is None:
            grads = tf.zeros_like(points)
        per_copy = tf.reshape(grads[:count], tf.shape(per_sample))
        summed, squares = tf.reduce_sum(per_copy, axis=1), tf.reduce_sum(tf.square(per_copy), axis=1)
        per_point = tf.reshape(values[:count], [batch, draws])
        return per_point, summed, squares, grads[count:], chosen, values[count:], connected

    return smoothed


def layer_function(model: keras.Model, layer: keras.Layer) -> Callable:
    """Compile Grad-CAM's ingredients: ``(x, units) -> (values, units, [outputs], [d unit / d output], [connected])``.

    The layer's outputs of every call are recorded (a shared layer runs more
    than once); the gradient is of output unit ``units[i]`` of sample i (-1: its predicted class), zeros
    where the graph has no gradient path from that call's output (``connected`` False).
    """
    model_ref, layer_ref = weakref.ref(model), weakref.ref(layer)

    @tf.function(autograph=False)  # as in Keras's own train step; AutoGraph only adds tracing time
    def layer_grads(x: tf.Tensor, units: tf.Tensor) -> Any:
        model = model_ref()
        guarded = state_variables(model)
        saved = snapshot_in_graph(guarded)
        with tf.GradientTape() as tape:
            with compute.layers_named(model), compute.capture_calls(layer_ref(), tape) as calls:
                y_pred = model(x, training=False)
            flat = flat_outputs(y_pred)
            chosen = chosen_units(units, flat)
            values = _rows(flat, chosen)
        outputs = [keras.tree.flatten(call)[0] for call in calls]
        grads = tape.gradient(values, outputs)
        restore_in_graph(guarded, saved)
        connected = [tf.constant(g is not None) for g in grads]  # known when traced
        grads = [tf.zeros_like(o) if g is None else g for o, g in zip(outputs, grads)]
        return values, chosen, outputs, grads, connected

    return layer_grads
