"""Compiled, cached gradient functions: one ``tf.function`` per question.

A question is (model, kind, layer, loss, training, ...). Its function is traced
once per per-sample input signature, with the batch axis left free (see
:func:`call_compiled`), so a repeated call - a slider move - re-runs a graph
instead of Python. Functions
reach the model through weak references: caching never keeps a model alive.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.backends.tensorflow import calls_replaced, flat_caller
from gradmagic.core.questions.cache_keys import Key
from gradmagic.core.questions.caches import WeakCache
from gradmagic.core.questions.layer_calls import layers_named
from gradmagic.core.questions.state import restore_in_graph, snapshot_in_graph, state_variables
from gradmagic.core.questions.targets import LossFn
from gradmagic.errors import GradmagicError

_MAX_FUNCTIONS_PER_MODEL = 32
#: Per-sample input shapes one question keeps traces of (a text model sees one per sequence length).
MAX_SIGNATURES = 8

# model -> question token -> (compiled function, its stored Key): weak per model, LRU-bounded per model.
_cache = WeakCache(size=_MAX_FUNCTIONS_PER_MODEL)


def cached(model: keras.Model, key: Key | None, build: Callable[[], Any]) -> Any:
    """Return the compiled function for ``key``, building it on first use (LRU per model).

    A stored function is reused only while every object its key holds by
    identity is still alive (see :mod:`gradmagic.core.questions.cache_keys`); ``key=None``
    (a question that cannot be keyed safely) builds a fresh function every time.
    """
    return _cache.keyed(model, key, build)


def forget(model: keras.Model, key: Key | None) -> None:
    """Drop one cached function (e.g. after its first call failed)."""
    _cache.forget(model, key)


def clear_cache(model: keras.Model | None = None) -> None:
    """Drop the compiled functions of one model, or of all models.

    Gradmagic sees a new loss, ``compile()``, frozen layers, added or removed
    layers, changed values inside a loss and changed public settings of
    the model and its layers (``layer.rate``, ``layer.activation``, a model's
    ``self.beta``) by itself. Call this after changing a model in place in a way
    it cannot see: replacing a layer's ``call``, a private attribute it
    reads, or the contents of an array above 1 MB.

    Args:
        model: The model whose functions to drop. Defaults to ``None``: every model.

    Raises:
        GradmagicError: ``model`` is neither ``None`` nor a Keras model.
    """
    if model is None:
        _cache.clear()
    elif isinstance(model, keras.Model):
        _cache.clear(model)
    else:
        raise GradmagicError(
            f"Received: model={model!r} of type {type(model).__name__}. Expected a Keras model, or None to "
            f"clear the compiled functions of every model. Fix: pass the model object itself "
            f"(gm.clear_cache(model)); a name does not identify a model."
        )


def call_question(
    model: keras.Model, key: Key | None, fn: Any, concrete: dict, args: tuple, exact_batch: bool = False
) -> Any:
    """:func:`call_compiled`, then drop the question once it has traced more than ``MAX_SIGNATURES`` input shapes.

    A ``tf.function`` keeps every trace it made (about 7 MB each for a small
    recurrent model), and each new per-sample shape (a sequence length) makes
    one (two with ``exact_batch``). Leaving the shape axes free would share one trace, but Keras layers may
    bake in a size they were built with (``TimeDistributed`` does), which would
    give silently wrong numbers; so the traces stay exact and the question is
    rebuilt from scratch instead, which bounds what it holds.
    """
    result = call_compiled(fn, concrete, args, exact_batch)
    if len(concrete) > MAX_SIGNATURES:
        forget(model, key)
    return result


def call_compiled(fn: Any, concrete: dict, args: tuple, exact_batch: bool = False) -> Any:
    """Call a ``tf.function`` through the concrete function for these arguments.

    ``tf.function``'s own dispatch matches the trace type of every argument on
    every call, which costs more than the whole graph of a small model. Here the
    signature is the per-sample shape and dtype of each leaf, looked up in a dict,
    and the batch axis is left free so one graph serves every batch size. Arrays
    are converted to tensors here because a concrete function's own conversion
    of NumPy arguments is several times slower.

    With ``exact_batch``, the first batch size seen for a signature gets a graph
    traced for exactly that shape, as a hand-written ``tf.function`` would: a
    free batch axis hides static shapes from TensorFlow's graph optimizer, which
    makes a recurrent layer's loop up to twice as slow. A second batch size then
    gets the free graph, which serves every other batch size: at most two traces
    per signature.

    Args:
        fn: The ``tf.function``.
        concrete: The question's dict of traces per signature, filled on demand.
        args: Arguments: arrays or tensors with a batch axis, lists/dicts of
            them, or ``None``.
        exact_batch: Trace the first batch size seen with its static shape.
    """
    leading: list = []
    tensors, signature = _as_tensors(args, leading)
    batch = tuple(leading) if exact_batch else None
    traces = concrete.get(signature)
    if traces is None:
        traces = concrete[signature] = _Traces(batch, _trace(fn, tensors, free=batch is None))
    if batch == traces.batch:
        return traces.exact(tensors)
    if traces.free is None:
        traces.free = _trace(fn, tensors, free=True)
    return traces.free(tensors)


@dataclass
class _Traces:
    """The graphs of one per-sample signature: for its first batch size, and for any batch size."""

    batch: tuple | None  # the leading dimension of every leaf ``exact`` was traced for; None: free
    exact: Callable[[Any], Any]
    free: Callable[[Any], Any] | None = None


def _trace(fn: Any, tensors: Any, free: bool) -> Callable[[Any], Any]:
    """Trace ``fn`` for ``tensors``' shapes (the batch axis left free if ``free``); return its flat caller."""
    specs = keras.tree.map_structure(
        lambda t: None if t is None else tf.TensorSpec((None, *t.shape[1:]) if free else t.shape, t.dtype), tensors
    )
    # The door's flat entry point skips re-binding the structured signature on every call.
    return flat_caller(fn.get_concrete_function(*specs), tensors)


def _as_tensors(value: Any, leading: list) -> tuple[Any, Hashable]:
    """Convert leaves to tensors and return them with their per-sample signature.

    The leading dimension of every leaf is appended to ``leading``, in flatten order.
    """
    if value is None:
        return None, None
    if isinstance(value, (list, tuple)):
        pairs = [_as_tensors(v, leading) for v in value]
        # The container type is part of the signature: a concrete function traced
        # for a list does not bind a tuple.
        return type(value)(p[0] for p in pairs), (type(value).__name__, *(p[1] for p in pairs))
    if isinstance(value, dict):
        # Sorted, as TensorFlow flattens a dict: the signature and ``leading`` do not depend on key order.
        pairs = {k: _as_tensors(value[k], leading) for k in sorted(value)}
        return {k: p[0] for k, p in pairs.items()}, tuple((k, p[1]) for k, p in pairs.items())
    if isinstance(value, np.ndarray):
        # tf.constant skips the conversion registry; NumPy's shape tuple is far cheaper than a TensorShape.
        leading.append(value.shape[:1])
        return tf.constant(value), (value.shape[1:], value.dtype.str)
    tensor = tf.convert_to_tensor(value)
    shape = tuple(tensor.shape)
    leading.append(shape[:1])
    return tensor, (shape[1:], tensor.dtype.as_numpy_dtype().dtype.str)


def dense_gradients(grads: Any) -> Any:
    """Gradients as dense tensors: a gather's (e.g. an Embedding's) gradient is IndexedSlices.

    Densifying also sums duplicate indices, which a norm or an array needs.
    """
    return keras.tree.map_structure(lambda g: tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g, grads)


def float_leaves(structure: Any) -> list[tf.Tensor]:
    """The float tensors of a structure, in flatten order."""
    return [t for t in keras.tree.flatten(structure) if isinstance(t, tf.Tensor) and t.dtype.is_floating]


@contextlib.contextmanager
def capture_calls(layer: keras.Layer, tape: tf.GradientTape) -> Iterator[list[Any]]:
    """Record (and watch) the outputs of every call of ``layer`` while tracing."""
    calls: list[Any] = []

    def wrap(original: Callable) -> Callable:
        def recording_call(*args: Any, **kwargs: Any) -> Any:
            outputs = original(*args, **kwargs)
            for tensor in float_leaves(outputs):
                tape.watch(tensor)
            calls.append(outputs)
            return outputs

        return recording_call

    with calls_replaced([(layer, wrap)]):
        yield calls


def weight_function(model: keras.Model, variables: list, loss_fn: LossFn, training: bool) -> Callable:
    """Compile ``(x, y, sample_weight) -> (loss, [dLoss/dW or None])``."""
    model_ref = weakref.ref(model)

    @tf.function(autograph=False)  # as in Keras's own train step; AutoGraph only adds tracing time
    def weight_grads(x: Any, y: Any, sample_weight: Any) -> tuple[Any, list]:
        model = model_ref()
        guarded = state_variables(model)
        saved = snapshot_in_graph(guarded)
        with tf.GradientTape() as tape:
            with layers_named(model):
                y_pred = model(x, training=training)
            loss = loss_fn(model, x, y, y_pred, sample_weight, training)
        grads = dense_gradients(tape.gradient(loss, variables))
        restore_in_graph(guarded, saved)
        return loss, grads

    return weight_grads


def output_function(
    model: keras.Model, layer: keras.Layer, input_position: int | None, loss_fn: LossFn, training: bool
) -> Callable:
    """Compile ``(x, y, sample_weight) -> (loss, [layer outputs], [dLoss/d output])``.

    Args:
        model: The model.
        layer: The layer whose output is differentiated.
        input_position: For an ``InputLayer``, its position among the model's flat
            inputs (its "output" is that input); ``None`` for any other layer.
        loss_fn: The loss, see :func:`gradmagic.core.questions.targets.resolve_loss`.
        training: Run the model in training mode.
    """
    model_ref, layer_ref = weakref.ref(model), weakref.ref(layer)

    @tf.function(autograph=False)  # as in Keras's own train step; AutoGraph only adds tracing time
    def output_grads(x: Any, y: Any, sample_weight: Any) -> tuple[Any, list, list]:
        model = model_ref()
        guarded = state_variables(model)
        saved = snapshot_in_graph(guarded)
        with tf.GradientTape() as tape:
            if input_position is not None:
                source = keras.tree.flatten(x)[input_position]
                tape.watch(source)
                calls = [source]
                with layers_named(model):
                    y_pred = model(x, training=training)
            else:
                with layers_named(model), capture_calls(layer_ref(), tape) as calls:
                    y_pred = model(x, training=training)
            loss = loss_fn(model, x, y, y_pred, sample_weight, training)
        outputs = [keras.tree.flatten(call) for call in calls]
        grads = dense_gradients(tape.gradient(loss, outputs))
        restore_in_graph(guarded, saved)
        return loss, outputs, grads

    return output_grads


def input_function(model: keras.Model, output: int | None, training: bool, vectorized: bool = True) -> Callable:
    """Compile ``x -> (flat outputs, [per output: [per input: Jacobian or None]])``.

    Per-sample Jacobians come from ``GradientTape.batch_jacobian`` (vectorised
    with ``pfor``, no Python loop over samples); a single output unit, and any
    output with one unit per sample, needs only one backward pass. Both assume
    what a per-sample Jacobian means: sample i's output depends on sample i's
    input only (true for ``training=False``; not for BatchNormalization in
    training mode, which mixes the batch).

    Args:
        model: The model.
        output: ``None`` for every output unit; ``k`` for unit ``k`` of the
            flattened, concatenated per-sample outputs.
        training: Run the model in training mode.
        vectorized: ``batch_jacobian`` with ``pfor`` (the default), or a loop
            over output units, for ops whose vectorised gradient TensorFlow lacks
            (grouped convolutions on CPU without oneDNN).
    """
    model_ref = weakref.ref(model)

    @tf.function(autograph=False)  # as in Keras's own train step; AutoGraph only adds tracing time
    def input_jacobians(x: Any) -> tuple[list, list[list]]:
        model = model_ref()
        guarded = state_variables(model)
        saved = snapshot_in_graph(guarded)
        sources = keras.tree.flatten(x)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(sources)
            with layers_named(model):
                y_pred = model(x, training=training)
            flat = [tf.reshape(t, (tf.shape(t)[0], -1)) for t in keras.tree.flatten(y_pred)]
            if output is not None:
                # Outputs may differ in dtype (mixed precision): join them in the widest.
                common = tf.float64 if any(t.dtype == tf.float64 for t in flat) else tf.float32
                joined = tf.concat([tf.cast(t, common) for t in flat], axis=1)
                targets = [tf.gather(joined, output, axis=1)]
        if output is not None:
            result = [tape.gradient(targets[0], sources)]
        else:
            result = [
                _jacobians(tape, out_2d, out, sources, vectorized)
                for out_2d, out in zip(flat, keras.tree.flatten(y_pred))
            ]
        del tape
        restore_in_graph(guarded, saved)
        return keras.tree.flatten(y_pred), result

    return input_jacobians


def _jacobians(
    tape: tf.GradientTape, out_2d: tf.Tensor, out: tf.Tensor, sources: list[tf.Tensor], vectorized: bool = True
) -> list:
    """Per-sample Jacobians of one output with respect to every input."""
    units = out_2d.shape[1]
    result = []
    if units == 1:
        # One unit per sample: d(sum over batch)/dx is exactly the per-sample gradient.
        grads = tape.gradient(out_2d, sources)
        for grad, src in zip(grads, sources):
            result.append(None if grad is None else tf.reshape(grad, _jacobian_shape(out, src)))
        return result
    for src in sources:
        jac = tape.batch_jacobian(out_2d, src, experimental_use_pfor=vectorized)
        result.append(None if jac is None else tf.reshape(jac, _jacobian_shape(out, src)))
    return result


def _jacobian_shape(out: tf.Tensor, src: tf.Tensor) -> tf.Tensor:
    """``(batch, *output_shape, *input_shape)`` of one per-sample Jacobian."""
    return tf.concat([tf.shape(src)[:1], tf.shape(out)[1:], tf.shape(src)[1:]], 0)
