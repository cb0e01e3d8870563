"""The three gradient questions: dLoss/dW, dLoss/d(layer output), d(output)/d(input).

Each public function checks and converts its arguments, finds (or compiles) the
cached function for the question, runs it and wraps the NumPy results. Every
failure reaches the user as a :class:`~gradmagic.errors.GradmagicError` naming
the model and the inputs; the model is left exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from gradmagic.core.arguments import check_flag
from gradmagic.core.batches import first_batch
from gradmagic.core.questions import compute
from gradmagic.core.questions.answers import check_output_index as _check_output_index
from gradmagic.core.questions.answers import embedding_name as _embedding_name
from gradmagic.core.questions.answers import input_position as _input_position
from gradmagic.core.questions.answers import input_result as _input_result
from gradmagic.core.questions.answers import jacobian_notes, layer_not_called, output_result
from gradmagic.core.questions.cache_keys import Key
from gradmagic.core.questions.entry import (
    check_model,
    leaves_no_trace,
    own_call,
    prepare_loss_args,
    shapes_text,
    spec_and_inputs,
)
from gradmagic.core.questions.inputs import nonfinite_warning
from gradmagic.core.questions.model_keys import is_warm, mark_warm, question_key
from gradmagic.core.questions.naming import input_labels
from gradmagic.core.questions.results import InputGradients, OutputGradients, WeightGradients, rows_for
from gradmagic.core.questions.state import preserved_eagerly
from gradmagic.core.questions.targets import (
    check_loss_argument,
    check_loss_structure,
    has_custom_compute_loss,
    layer_weights,
    loss_token,
    model_name,
    output_unit_loss,
    resolve_layer,
    resolve_loss,
    weight_slots,
)
from gradmagic.core.questions.trace_errors import diagnose_trace_error, short_error
from gradmagic.core.questions.user_code import failed, with_cause
from gradmagic.errors import ComputeError, GradmagicError, InputError


@dataclass
class _Question:
    """A compiled gradient function plus what its outputs mean."""

    fn: Callable
    labels: list[dict[str, Any]] = field(default_factory=list)
    layer_index: int = -1
    layer_name: str = ""
    compiled_loss: bool = False
    concrete: dict = field(default_factory=dict)
    note: str = ""
    warm: bool = False  # the compiled loss was built under this question's compile state
    # Trace the first batch size with its static shape (see compute.call_compiled): the loss questions,
    # whose steady call a hand-written tape is measured against. Jacobians keep one free-batch graph.
    exact_batch: bool = False


def _run(model: keras.Model, key: Key | None, question: _Question, args: tuple, what: str, x: Any) -> Any:
    """Run a compiled question; turn any failure into one clear GradmagicError."""
    try:
        if question.compiled_loss and not question.warm:
            if not is_warm(model):
                _build_compiled_loss(model, question, args)
            # The question's key holds the compile state (the compiled-loss object by identity), so once
            # warm under it, it stays warm: later calls skip re-keying the compile state.
            question.warm = key is not None
        return compute.call_question(model, key, question.fn, question.concrete, args, question.exact_batch)
    except GradmagicError as exc:
        compute.forget(model, key)
        raise with_cause(exc)  # noqa: B904 - the cause is the user's error, re-attached
    except Exception as exc:
        compute.forget(model, key)
        diagnosed = diagnose_trace_error(exc, model, None)
        if diagnosed is None and own_call(model) and not isinstance(exc, tf.errors.OpError):
            who = f"The call of model '{model_name(model)}' ({type(model).__name__}.call)"
            raise failed(who, exc, f"on x of shape {shapes_text(x)}") from exc
        raise diagnosed or ComputeError(
            f"Computing {what} of model '{model_name(model)}' on x of shape {shapes_text(x)} "
            f"failed: {short_error(exc).rstrip('.')}. Check that x (and y) are what the model takes; the model "
            f"was left unchanged."
        ) from None


def _build_compiled_loss(model: keras.Model, question: _Question, args: tuple) -> None:
    """Let a compiled loss build itself once, eagerly on one sample, with all state restored.

    Keras builds a compiled loss (and its per-output trackers) on first use;
    doing that here keeps variable creation out of the traced function. Zeros
    shaped like the model's declared outputs stand in for its predictions, so
    no eager forward and backward pass is paid (for a recurrent model that is
    most of a first call); a model that declares no outputs, or computes its
    own loss, runs the question once on one sample instead. A failure here is
    left for the traced run to report, where it reads as it would in ``fit``.
    """
    one = keras.tree.map_structure(lambda t: None if t is None else tf.convert_to_tensor(t[:1]), args)
    try:
        with preserved_eagerly(model, weights=False):  # the loss alone never writes the model's own variables
            x, y, sample_weight = one
            resolve_loss(model)(model, x, y, _zero_outputs(model), sample_weight, False)
    except Exception:
        # The traced run right after reports any failure, as fit would.
        with preserved_eagerly(model), contextlib.suppress(Exception):
            question.fn.python_function(*one)
    mark_warm(model)


def _zero_outputs(model: keras.Model) -> Any:
    """One sample of zeros shaped like the model's declared outputs (raises if it declares none)."""
    if has_custom_compute_loss(model):
        raise TypeError("a custom compute_loss may need real predictions")
    return keras.tree.map_structure(lambda t: tf.zeros((1, *t.shape[1:]), t.dtype), model.output)


def _numpy(value: Any) -> Any:
    return None if value is None else value.numpy()


@leaves_no_trace
def weight_gradients(
    model: keras.Model,
    x: Any,
    y: Any = None,
    layer: int | str | keras.Layer | None = None,
    loss: Any = None,
    training: bool = False,
    sample_weight: Any = None,
    output: int | None = None,
) -> WeightGradients:
    """Compute dLoss/dW for the model's trainable weights at (x, y).

    Args:
        model: A Keras 3 model (Sequential, Functional or subclassed).
        x: Inputs: an array, nested lists, a tf.Tensor, or a list/dict of those
            for several inputs. A single sample may omit the batch axis. Or a
            ``tf.data.Dataset``, a ``keras.utils.PyDataset`` or a generator of
            batches: its first batch is used, read as ``fit`` reads it
            (``(x, y)`` or ``(x, y, sample_weight)``), and ``result.source``
            says so. Drawing from a generator advances it by one batch.
        y: Targets, one per sample (a list/dict for several outputs). ``None``
            when x is a dataset or generator: the targets come from it.
        layer: Restrict to one layer, by its index in ``model.layers`` (layers
            without weights count; a Functional model's InputLayer is index 0),
            by name, or as the layer object. Defaults to ``None``: every weight.
        loss: Defaults to ``None``: the compiled loss through
            ``model.compute_loss``. Otherwise a Keras loss name, a
            ``keras.losses.Loss``, a callable ``f(y_true, y_pred)``, or one per
            output. Regularization losses are included either way.
        training: Run layers in training mode (Dropout, BatchNormalization batch
            statistics). Defaults to ``False``. State is restored either way.
        sample_weight: Optional per-sample weights of the loss.
        output: Instead of a loss, differentiate output unit ``output`` of the
            flattened per-sample output (its mean over the batch): d(output)/dW.
            ``y`` and ``loss`` are then not used and ``.loss`` holds that mean.
            Defaults to ``None``: the loss.

    Returns:
        A :class:`WeightGradients`: ``.loss``, ``.arrays()`` aligned with
        ``model.trainable_weights`` (or the layer's), ``r[i]`` / ``r["name"]`` for
        one layer's part, statistics per weight, HTML and text tables.

    Raises:
        GradmagicError: A bad layer, loss, flag, x or y, with what was expected,
            raised before anything runs; a ``UserCodeError`` naming the loss or
            layer whose own code raised, with that error chained as its cause.
            The model is left as it was (an unbuilt model stays unbuilt).

    Warns:
        GradmagicWarning: x, y or sample_weight hold NaN or Inf (the results
            are still computed from them).

    Example:
        >>> r = gradmagic.weight_gradients(model, x, y, layer="dense_1")
        >>> r.loss, [g.shape for g in r.arrays()]
    """
    check_model(model)
    training = check_flag("training", training)
    if output is None:
        check_loss_argument(model, loss)
    if layer is not None:
        resolve_layer(model, layer)  # its type and name, before anything runs
    data = first_batch(x, y, sample_weight, takes_y=output is None)
    spec, x_in, batch = spec_and_inputs(model, data.x)
    if output is None:
        check_loss_structure(model, spec.output_names, loss)
        y_in, sw_in = prepare_loss_args(model, spec, data.y, data.sample_weight, batch)
    else:
        _check_output_index(model, spec, output)
        y_in, sw_in = None, None
    chosen_layer = None if layer is None else layer_weights(model, layer)[1]
    nonfinite_warning(x=x_in, y=y_in, sample_weight=sw_in)
    key = question_key(
        model,
        "weights",
        lambda b: None if chosen_layer is None else b.same(chosen_layer),
        (lambda b: loss_token(b, loss)) if output is None else ("output unit", int(output)),
        training,
        sw_in is None,
    )

    def build() -> _Question:
        loss_fn = resolve_loss(model, loss) if output is None else output_unit_loss(int(output))
        slots = weight_slots(model)
        if chosen_layer is None:
            variables = list(model.trainable_weights)
            chosen = slots
        else:
            variables = list(chosen_layer.trainable_weights)
            paths = {v.path for v in variables}
            chosen = [s for s in slots if s.path in paths]
        labels = [
            {"index": s.layer_index, "layer": s.layer_name, "weight": s.name, "shape": s.shape, "path": s.path}
            for s in chosen
        ]
        fn = compute.weight_function(model, variables, loss_fn, training)
        return _Question(fn, labels, compiled_loss=loss is None and output is None, exact_batch=True)

    question = compute.cached(model, key, build)
    loss_value, grads = _run(model, key, question, (x_in, y_in, sw_in), "dLoss/dW", x_in)
    if output is None:
        title = f"dLoss/dW of model '{model_name(model)}' (loss = {float(loss_value):.6g})"
    else:
        title = f"d(output unit {output})/dW of model '{model_name(model)}' (mean output = {float(loss_value):.6g})"
    rows = rows_for(question.labels, [_numpy(g) for g in grads])
    result = WeightGradients(float(loss_value), rows, title, layer_count=len(model.layers))
    result.source = data.source
    return result


@leaves_no_trace
def output_gradients(
    model: keras.Model,
    x: Any,
    y: Any,
    layer: int | str | keras.Layer,
    loss: Any = None,
    training: bool = False,
    sample_weight: Any = None,
) -> OutputGradients:
    """Compute dLoss/d(output of one layer) at (x, y).

    Args:
        model: A Keras 3 model (Sequential, Functional or subclassed).
        x: Inputs, as for :func:`weight_gradients` (a dataset or generator too).
        y: Targets, as for :func:`weight_gradients`.
        layer: The layer, by index in ``model.layers``, by name or as the object.
            For a Functional model's ``InputLayer`` this is dLoss/d(input).
        loss: As for :func:`weight_gradients`. Defaults to the compiled loss.
        training: Run layers in training mode. Defaults to ``False``.
        sample_weight: Optional per-sample weights of the loss.

    Returns:
        An :class:`OutputGradients`: ``.loss``, ``.array`` shaped like the
        layer's output for x (``None`` if the loss does not depend on it),
        ``.output`` (the layer's output itself) and statistics.

    Raises:
        GradmagicError: A bad layer, loss, x or y, or a layer the forward pass
            never calls.

    Example:
        >>> o = gradmagic.output_gradients(model, x, y, layer=2)
        >>> o.array.shape == o.output.shape
    """
    check_model(model)
    training = check_flag("training", training)
    check_loss_argument(model, loss)
    resolve_layer(model, layer)  # its type and name, before anything runs
    data = first_batch(x, y, sample_weight)
    spec, x_in, batch = spec_and_inputs(model, data.x)
    check_loss_structure(model, spec.output_names, loss)
    y_in, sw_in = prepare_loss_args(model, spec, data.y, data.sample_weight, batch)
    index, lay = resolve_layer(model, layer)  # again: building the model may have added an InputLayer
    nonfinite_warning(x=x_in, y=y_in, sample_weight=sw_in)
    key = question_key(model, "output", lambda b: b.same(lay), lambda b: loss_token(b, loss), training, sw_in is None)

    def build() -> _Question:
        loss_fn = resolve_loss(model, loss)
        position = _input_position(model, lay)
        fn = compute.output_function(model, lay, position, loss_fn, training)
        return _Question(fn, layer_index=index, layer_name=lay.name, compiled_loss=loss is None, exact_batch=True)

    question = compute.cached(model, key, build)
    loss_value, outputs, grads = _run(model, key, question, (x_in, y_in, sw_in), "dLoss/d(layer output)", x_in)
    if not outputs:
        compute.forget(model, key)
        raise layer_not_called(model, question.layer_index, question.layer_name)
    result = output_result(model, question.layer_index, question.layer_name, float(loss_value), outputs, grads, _numpy)
    result.source = data.source
    return result


@leaves_no_trace
def input_gradients(
    model: keras.Model,
    x: Any,
    output: int | None = None,
    training: bool = False,
) -> InputGradients:
    """Compute d(model output)/d(input): the Jacobian of every sample, vectorised.

    Args:
        model: A Keras 3 model (Sequential, Functional or subclassed).
        x: Inputs, as for :func:`weight_gradients`; float inputs only. From a
            dataset or generator, the x of its first batch.
        output: Defaults to ``None``: every output unit. ``k`` selects unit ``k``
            of the flattened per-sample output (outputs concatenated in
            ``keras.tree.flatten`` order for a model with several outputs).
        training: Run layers in training mode. Defaults to ``False``. The
            per-sample Jacobian assumes samples do not interact, which
            BatchNormalization in training mode breaks.

    Returns:
        An :class:`InputGradients` whose ``.array`` is ``(batch, *output_shape,
        *input_shape)`` for ``output=None`` and ``(batch, *input_shape)`` for
        ``output=k``; a list (or dict) with one per input for several inputs, and
        a list with one entry per output for several outputs and ``output=None``.

    Raises:
        GradmagicError: Non-float inputs, a bad ``output`` index, or x that does
            not fit the model.

    Example:
        >>> j = gradmagic.input_gradients(model, [[0.5]])
        >>> j.array[0, 0, 0]   # dy/dx at x = 0.5
    """
    check_model(model)
    training = check_flag("training", training)
    data = first_batch(x, takes_y=False)
    spec, x_in, _ = spec_and_inputs(model, data.x)
    leaves = keras.tree.flatten(x_in)
    names = input_labels(None if spec.inputs is None else [s.name for s in spec.inputs], x_in)
    for name, leaf in zip(names, leaves):
        if not tf.as_dtype(leaf.dtype).is_floating:
            raise InputError(
                f"Received: input {name!r} of dtype {tf.as_dtype(leaf.dtype).name} for model "
                f"'{model_name(model)}'. d(output)/d(input) exists only for float inputs: "
                f"integer inputs such as token ids into an Embedding are looked up, not "
                f"computed with, so they have no derivative. Fix: ask for the gradient at the "
                f"embedding's output instead, output_gradients(model, x, y, "
                f"layer={_embedding_name(model)!r}), or weight_gradients for the embedding matrix."
            )
    if output is not None:
        output = _check_output_index(model, spec, output)
    nonfinite_warning(x=x_in)
    key = question_key(model, "input", output, training)
    question = compute.cached(model, key, lambda: _Question(compute.input_function(model, output, training)))
    try:
        outputs, result = _run(model, key, question, (x_in,), "d(output)/d(input)", x_in)
    except ComputeError as failed:
        if output is not None:
            raise
        question, (outputs, result) = _unvectorized(model, key, x_in, training, failed)
    per_output = [[_numpy(j) for j in per_input] for per_input in result]
    values = [o.numpy() for o in outputs]
    gradients = _input_result(model, spec, x_in, names, per_output, output)
    gradients.values = values[0] if len(values) == 1 else values
    gradients.source = data.source
    if question.note:
        gradients.notes.append(question.note)
        gradients.title += f" ({question.note})"
    jacobian_notes(gradients, names, per_output)
    return gradients


def _unvectorized(model: keras.Model, key: Hashable, x: Any, training: bool, failed: ComputeError) -> tuple:
    """Jacobians one output unit at a time, where the vectorised Jacobian failed; cached under ``key``.

    ``pfor`` rewrites the backward pass for a whole batch of output units at
    once, which some kernels refuse (grouped convolutions on CPU); one gradient
    per unit needs only the ops a single backward pass uses.
    """
    reason = str(failed).split(" failed: ", 1)[-1].split(". Check that x", 1)[0]
    note = f"computed one output unit at a time: the vectorised Jacobian failed ({reason[:160]})"
    question = compute.cached(
        model, key, lambda: _Question(compute.input_function(model, None, training, vectorized=False), note=note)
    )
    return question, _run(model, key, question, (x,), "d(output)/d(input)", x)
