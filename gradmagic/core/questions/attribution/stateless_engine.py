"""The attribution engine on JAX and PyTorch: one output unit's gradient at many points, through ``stateless_call``.

See :mod:`gradmagic.core.questions.attribution.engine` for what an engine does;
the functions mirror :mod:`gradmagic.core.questions.attribution.compute` (the
TensorFlow ones), written in ``keras.ops`` and differentiated by the backend
module's ``attribution_value_and_grad`` (``jax.value_and_grad``;
``torch.autograd.grad`` on fresh leaves; ``None`` where no gradient path
exists, as on TensorFlow, found from the jaxpr or the autograd graph),
compiled by the backend object's ``compile`` (``jax.jit``; PyTorch runs
eagerly, see ``TorchBackend.compile``) and cached with the three gradient questions
(``gm.clear_cache`` drops them too). The model runs in ``model.stateless_call``
with its variables' values passed in: the returned non-trainable values are
dropped, so nothing is written back to the model, and on PyTorch the values are
detached from the parameters, so no ``.grad`` is left on one.

Samples do not interact in inference mode, so the gradient of the sum of the
chosen unit over the batch is each point's own gradient, from one backward
pass. A Grad-CAM layer's or an Embedding's output is differentiated through a
zero added to it inside the forward pass (as for ``output_gradients``): its
shape is read once per input signature.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from gradmagic.core.backends import stateless_backend
from gradmagic.core.backends.keras_internals import calls_replaced
from gradmagic.core.questions import stateless_functions as functions
from gradmagic.core.questions.layer_calls import layers_named
from gradmagic.core.questions.model_keys import question_key
from gradmagic.core.questions.stateless import _run as run_question
from gradmagic.errors import InputError


def _differentiated(backend: Any, fn: Callable) -> Callable:
    """``fn(first, *rest) -> (value, aux)`` as ``((value, aux), gradients w.r.t. first)``, ``None`` without a path.

    The backend module's ``attribution_value_and_grad``: autodiff that tells a
    missing gradient path (``None``, as TensorFlow's tape says) from a zero gradient.
    """
    return importlib.import_module(f"gradmagic.core.backends.{backend.name}").attribution_value_and_grad(fn)


def _flat_outputs(y_pred: Any) -> Any:
    """The per-sample outputs flattened and joined, ``(batch, units)``, in the widest float dtype among them."""
    flat = [ops.reshape(t, (t.shape[0], -1)) for t in keras.tree.flatten(y_pred)]
    common = "float64" if any(keras.backend.standardize_dtype(t.dtype) == "float64" for t in flat) else "float32"
    return ops.concatenate([ops.cast(t, common) for t in flat], axis=1)


def _chosen(units: Any, at_x: Any) -> Any:
    """``units``, with -1 replaced by each sample's predicted class (argmax of its output at x)."""
    return ops.where(units < 0, ops.cast(ops.argmax(at_x, axis=1), "int32"), units)


def _rows(t: Any, units: Any) -> Any:
    """``t[i, units[i]]`` for every row i."""
    return ops.take_along_axis(t, ops.expand_dims(ops.cast(units, "int32"), 1), axis=1)[:, 0]


def _is_float(shape_and_dtype: tuple) -> bool:
    return "float" in keras.backend.standardize_dtype(shape_and_dtype[1])


def _outputs(model: keras.Model, trainable: list, non_trainable: list, x: Any) -> Any:
    """The model's flat outputs at x with the variables' values given (inference mode; updates dropped)."""
    with layers_named(model):
        y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=False)
    return _flat_outputs(y_pred)


def _forward_function(backend: Any, model: keras.Model, traces: list[int]) -> Callable:
    """Compile ``(trainable, non_trainable, x) -> (batch, units)`` (to count a model's units)."""
    model_ref = weakref.ref(model)

    def forward(trainable: list, non_trainable: list, x: Any) -> Any:
        traces[0] += 1
        return _outputs(model_ref(), trainable, non_trainable, x)

    return backend.compile(forward)


def _path_function(backend: Any, model: keras.Model, keep: bool, traces: list[int]) -> Callable:
    """Compile integrated gradients over one stretch of the path (see ``compute.path_function``).

    ``(trainable, non_trainable, x, baseline, alphas, weights, units) -> (values
    (batch, k), attribution, units, f(x), f(baseline), connected[, gradients])``.
    """
    model_ref = weakref.ref(model)

    def unit_sum(points: Any, trainable: list, non_trainable: list, ends: Any, units: Any, per_sample: int) -> Any:
        outputs = _outputs(model_ref(), trainable, non_trainable, ops.concatenate([points, ends], 0))
        count = points.shape[0]
        chosen = _chosen(units, outputs[count : count + units.shape[0]])  # ends start with x itself
        values = _rows(outputs[:count], ops.repeat(chosen, per_sample, axis=0))
        return ops.sum(values), (values, chosen, outputs[count:])

    differentiated = _differentiated(backend, unit_sum)

    def integrated(
        trainable: list, non_trainable: list, x: Any, baseline: Any, alphas: Any, weights: Any, units: Any
    ) -> tuple:
        traces[0] += 1
        batch, steps = x.shape[0], alphas.shape[0]
        lift = (1, steps) + (1,) * (len(x.shape) - 1)  # (k,) against (batch, k, *sample)
        delta = x - baseline
        points = ops.expand_dims(baseline, 1) + ops.reshape(alphas, lift) * ops.expand_dims(delta, 1)
        flat = ops.reshape(points, (batch * steps, *x.shape[1:]))
        ends = ops.concatenate([x, baseline], 0)
        (_, (values, chosen, at_ends)), grads = differentiated(flat, trainable, non_trainable, ends, units, steps)
        connected = grads is not None  # None: no gradient path from the points to the unit
        grads = ops.zeros_like(points) if grads is None else ops.reshape(grads, points.shape)
        attribution = delta * ops.sum(ops.reshape(weights, lift) * grads, axis=1)
        parts = (
            ops.reshape(values, (batch, steps)),
            attribution,
            chosen,
            _rows(at_ends[:batch], chosen),
            _rows(at_ends[batch:], chosen),
            connected,
        )
        return (*parts, grads) if keep else parts

    return backend.compile(integrated)


def _noise_function(backend: Any, model: keras.Model, traces: list[int]) -> Callable:
    """Compile SmoothGrad's sums over noisy copies and the plain gradient (see ``compute.noise_function``).

    ``(trainable, non_trainable, x, noise, units) -> (values (batch, n), summed
    gradients, summed squared gradients, gradient at x, units, f(x), connected)``.
    """
    model_ref = weakref.ref(model)

    def unit_sum(points: Any, trainable: list, non_trainable: list, units: Any, draws: int) -> Any:
        outputs = _outputs(model_ref(), trainable, non_trainable, points)
        count = units.shape[0] * draws
        chosen = _chosen(units, outputs[count:])  # the last rows are x itself
        values = _rows(outputs, ops.concatenate([ops.repeat(chosen, draws, axis=0), chosen], 0))
        return ops.sum(values), (values, chosen)

    differentiated = _differentiated(backend, unit_sum)

    def smoothed(trainable: list, non_trainable: list, x: Any, noise: Any, units: Any) -> tuple:
        traces[0] += 1
        batch = x.shape[0]
        draws = noise.shape[0] // batch
        per_sample = ops.reshape(noise, (batch, draws, *x.shape[1:]))
        noisy = ops.reshape(ops.expand_dims(x, 1) + per_sample, noise.shape)
        points = ops.concatenate([noisy, x], 0)
        (_, (values, chosen)), grads = differentiated(points, trainable, non_trainable, units, draws)
        connected = grads is not None
        if grads is None:
            grads = ops.zeros_like(points)
        count = batch * draws
        per_copy = ops.reshape(grads[:count], per_sample.shape)
        summed, squares = ops.sum(per_copy, axis=1), ops.sum(ops.square(per_copy), axis=1)
        per_point = ops.reshape(values[:count], (batch, draws))
        return per_point, summed, squares, grads[count:], chosen, values[count:], connected

    return backend.compile(smoothed)


def _perturbed(calls: list, perturb: list | None, leaf: Any) -> Any:
    """``leaf`` plus the zero perturbation of this call (if any), recorded as this call's output."""
    extra = perturb[len(calls)] if perturb is not None and len(calls) < len(perturb) else None
    if extra is not None:
        leaf = leaf + extra
    calls.append(leaf)
    return leaf


def _per_signature(backend: Any, run: Callable, traces: list[int]) -> Callable:
    """Make ``(trainable, non_trainable, *args) -> compiled function, or None if no call was recorded``.

    ``run(perturb, trainable, non_trainable, *args)`` returns ``(scalar, (values,
    units, calls))``; the compiled function returns ``(values, units, calls,
    gradients w.r.t. each call's output, connected per call)``.
    """
    differentiated = _differentiated(backend, run)

    def for_signature(trainable: list, non_trainable: list, *args: Any) -> Callable | None:
        shapes = backend.shapes(lambda *a: run(None, *a)[1][2], trainable, non_trainable, *args)
        if not shapes:
            return None

        def layer_grads(trainable: list, non_trainable: list, *args: Any) -> tuple:
            traces[0] += 1
            zeros = [backend.zeros(*s) if _is_float(s) else None for s in shapes]
            (_, (values, units, calls)), grads = differentiated(zeros, trainable, non_trainable, *args)
            connected = [g is not None for g in grads]
            grads = [ops.zeros_like(c) if g is None else g for c, g in zip(calls, grads)]
            return values, units, calls, grads, connected

        return backend.compile(layer_grads)

    return for_signature


def _layer_function(backend: Any, model: keras.Model, layer: keras.Layer, traces: list[int]) -> Callable:
    """Grad-CAM's ingredients (see ``compute.layer_function``), one compiled function per input signature.

    The first float tensor each call of the layer returns is recorded (a shared
    layer runs more than once), with the gradient of unit ``units[i]`` of
    sample i (-1: its predicted class) with respect to it.
    """
    model_ref, layer_ref = weakref.ref(model), weakref.ref(layer)

    def run(perturb: list | None, trainable: list, non_trainable: list, x: Any, units: Any) -> Any:
        calls: list[Any] = []

        def wrap(original: Callable) -> Callable:
            def recorded_call(*args: Any, **kwargs: Any) -> Any:
                outputs = original(*args, **kwargs)
                leaves = keras.tree.flatten(outputs)
                leaves[0] = _perturbed(calls, perturb, leaves[0])
                return keras.tree.pack_sequence_as(outputs, leaves)

            return recorded_call

        model = model_ref()
        with layers_named(model), calls_replaced([(layer_ref(), wrap)]):
            y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        flat = _flat_outputs(y_pred)
        chosen = _chosen(units, flat)
        values = _rows(flat, chosen)
        return ops.sum(values), (values, chosen, calls)

    return _per_signature(backend, run, traces)


def _token_function(backend: Any, model: keras.Model, layer: keras.Layer, output: int, traces: list[int]) -> Callable:
    """d(output unit)/d(Embedding output), the output scaled per sample; one compiled function per signature."""
    model_ref, layer_ref = weakref.ref(model), weakref.ref(layer)

    def run(perturb: list | None, trainable: list, non_trainable: list, x: Any, scale: Any) -> Any:
        calls: list[Any] = []

        def wrap(original: Callable) -> Callable:
            # The Embedding's own call, its output scaled per sample (1: unchanged; a point on the path from
            # zero embeddings otherwise); Layer.__call__ still computes the mask around it.
            def scaled_call(*args: Any, **kwargs: Any) -> Any:
                out = original(*args, **kwargs)
                out = out * ops.reshape(ops.cast(scale, out.dtype), (-1,) + (1,) * (len(out.shape) - 1))
                return _perturbed(calls, perturb, out)

            return scaled_call

        model = model_ref()
        with layers_named(model), calls_replaced([(layer_ref(), wrap)]):
            y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        unit = _flat_outputs(y_pred)[:, output]
        return ops.sum(unit), (unit, None, calls[:1])

    return _per_signature(backend, run, traces)


def _signature(*args: Any) -> tuple:
    return tuple((tuple(a.shape), str(a.dtype)) for a in args)


class StatelessEngine:
    """Runs the attribution functions' gradients on JAX or PyTorch (the backend object of the Keras in use)."""

    @property
    def framework(self) -> str:
        return stateless_backend().framework

    def check_input(self, x: Any) -> None:
        stateless_backend().check_input(x, "x")

    def _question(self, model: keras.Model, key: Any, build: Callable) -> functions.Question:
        def make() -> functions.Question:
            question = functions.Question(None, model=model)
            question.fn = build(stateless_backend(), question.traces)
            return question

        return functions.cached(model, key, make)

    def _call(self, model: keras.Model, key: Any, question: functions.Question, args: tuple, what: str) -> list:
        backend = stateless_backend()
        args = backend.tensors(args)

        def call() -> Any:
            return question.fn(*question.variable_values(backend), *args)

        parts = run_question(model, key, call, what, args[0], False)
        return _numpy(backend, parts)

    def units(self, model: keras.Model, x: np.ndarray) -> int:
        key = question_key(model, "attribution forward")
        question = self._question(model, key, lambda b, t: _forward_function(b, model, t))
        return int(self._call(model, key, question, (x,), "the output").shape[1])

    def path(self, model: keras.Model, keep: bool, args: tuple, shape: tuple) -> list[Any]:
        key = question_key(model, "integrated gradients", bool(keep))
        question = self._question(model, key, lambda b, t: _path_function(b, model, bool(keep), t))
        return self._call(model, key, question, args, "integrated gradients")

    def noise(self, model: keras.Model, args: tuple, what: str, shape: tuple) -> list[Any]:
        key = question_key(model, "saliency")
        question = self._question(model, key, lambda b, t: _noise_function(b, model, t))
        return self._call(model, key, question, args, what)

    def _per_signature(self, model: keras.Model, key: Any, question: functions.Question, args: tuple, what: str) -> Any:
        """Run a question compiled per input signature; None (and the cache entry dropped) if no call was recorded."""
        backend = stateless_backend()
        args = backend.tensors(args)
        signature = _signature(*args)

        def call() -> Any:
            values = question.variable_values(backend)
            if signature not in question.per_signature:
                question.per_signature[signature] = question.fn(*values, *args)
            compiled = question.per_signature[signature]
            return None if compiled is None else compiled(*values, *args)

        parts = run_question(model, key, call, what, args[0], False)
        if parts is None:
            functions.forget(model, key)
            return None
        return _numpy(backend, parts)

    def layer(self, model: keras.Model, layer: keras.Layer, x: np.ndarray, units: np.ndarray) -> tuple:
        key = question_key(model, "gradcam", lambda b: b.same(layer))
        question = self._question(model, key, lambda b, t: _layer_function(b, model, layer, t))
        parts = self._per_signature(model, key, question, (x, units), "Grad-CAM")
        if parts is None:
            return None, None, [], [], []
        values, chosen, calls, grads, connected = parts
        return values, chosen, calls, grads, [bool(c) for c in connected]

    def tokens(self, model: keras.Model, layer: keras.Layer, output: int, x: Any, scale: np.ndarray) -> tuple:
        key = question_key(model, "tokens", lambda b: b.same(layer), output)
        question = self._question(model, key, lambda b, t: _token_function(b, model, layer, output, t))
        what = f"d(output {output})/d(output of '{layer.name}')"
        parts = self._per_signature(model, key, question, (x, scale), what)
        if parts is None:
            raise InputError(
                f"Received: model '{model.name}', whose Embedding '{layer.name}' was not called when it ran on x, so "
                f"its output has no gradient. Expected a model that reads its token ids through that Embedding. "
                f"Fix: explain the model that calls it (e.g. the inner model)."
            )
        values, _, calls, grads, connected = parts
        return calls[0], grads[0], values, bool(connected[0])


def _numpy(backend: Any, parts: Any) -> Any:
    """Every tensor in ``parts`` (nested lists and tuples) as NumPy; Python values as they are."""
    if isinstance(parts, (list, tuple)):
        return [_numpy(backend, p) for p in parts]
    if parts is None or isinstance(parts, (bool, int, float)):
        return parts
    return backend.to_numpy(parts)


ENGINE = StatelessEngine()
