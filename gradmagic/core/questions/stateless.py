"""The three gradient questions on JAX and PyTorch: dLoss/dW, dLoss/d(layer output), d(output)/d(input).

The same signatures, checks, messages and result objects as the TensorFlow
implementation (:mod:`gradmagic.core.questions.gradients`), which the public
names resolve to on that backend. Here the model's variables are passed by
value to functions compiled with the framework (see
:mod:`gradmagic.core.questions.stateless_functions`), so the model is never
written: no variable assigned on JAX, no ``.grad`` left on a parameter and
no BatchNormalization statistic moved on PyTorch, also with ``training=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from typing import Any

import keras

from gradmagic.core.arguments import check_flag
from gradmagic.core.backends import stateless_backend
from gradmagic.core.batches import first_batch
from gradmagic.core.questions import stateless_functions as functions
from gradmagic.core.questions.answers import (
    check_output_index,
    embedding_name,
    input_position,
    input_result,
    jacobian_notes,
    layer_not_called,
    output_result,
)
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
from gradmagic.core.questions.repeats import remembered, repeated
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


def clear_cache(model: keras.Model | None = None) -> None:
    """Drop the compiled functions of one model, or of all models.

    Gradmagic sees a new loss, ``compile()``, frozen layers, added or removed
    layers, changed values inside a loss and changed public settings of the
    model and its layers by itself. Call this after changing a model in place
    in a way it cannot see: replacing a layer's ``call``, a private attribute
    it reads, or the contents of an array above 1 MB.

    Args:
        model: The model whose functions to drop. Defaults to ``None``: every model.

    Raises:
        GradmagicError: ``model`` is neither ``None`` nor a Keras model.
    """
    if model is not None and not isinstance(model, keras.Model):
        raise GradmagicError(
            f"Received: model={model!r} of type {type(model).__name__}. Expected a Keras model, or None to "
            f"clear the compiled functions of every model. Fix: pass the model object itself "
            f"(gm.clear_cache(model)); a name does not identify a model."
        )
    functions.clear(model)


def _run(model: keras.Model, key: Key | None, call: Any, what: str, x: Any, training: bool) -> Any:
    """Run a question (``call()``); turn any failure into one clear GradmagicError, leaving the model as it was.

    In training mode (where layers draw random numbers) the framework's global
    random state is restored afterwards (see the backends' ``random_state_kept``).
    """
    try:
        with stateless_backend().random_state_kept() if training else contextlib.nullcontext():
            return call()
    except GradmagicError as exc:
        functions.forget(model, key)
        raise with_cause(exc)  # noqa: B904 - the cause is the user's error, re-attached
    except Exception as exc:
        functions.forget(model, key)
        diagnosed = diagnose_trace_error(exc, model, None)
        if diagnosed is None and own_call(model):
            who = f"The call of model '{model_name(model)}' ({type(model).__name__}.call)"
            raise failed(who, exc, f"on x of shape {shapes_text(x)}") from exc
        raise diagnosed or ComputeError(
            f"Computing {what} of model '{model_name(model)}' on x of shape {shapes_text(x)} "
            f"failed: {short_error(exc).rstrip('.')}. Check that x (and y) are what the model takes; the model "
            f"was left unchanged."
        ) from None


def _warm_compiled_loss(model: keras.Model, key: Key | None, question: functions.Question, args: tuple) -> None:
    """Let a compiled loss build itself once, eagerly, outside any trace (it creates tracker variables).

    A variable cannot be created inside a stateless scope or a ``jax.jit``
    trace. Zeros shaped like the model's declared outputs stand in for its
    predictions; a model that declares no outputs or computes its own loss is
    left to the traced run, which reports any failure as ``fit`` would.
    """
    if not question.compiled_loss or question.warm:
        return
    if not is_warm(model) and not has_custom_compute_loss(model):
        try:
            x, y, sample_weight = keras.tree.map_structure(lambda t: None if t is None else t[:1], args)
            zeros = keras.tree.map_structure(lambda t: keras.ops.zeros((1, *t.shape[1:]), t.dtype), model.output)
            with preserved_eagerly(model, weights=False):
                resolve_loss(model, stateless=True)(model, x, y, zeros, sample_weight, False)
        except Exception:
            pass
        mark_warm(model)
    question.warm = key is not None


def _check_input(backend: Any, model: keras.Model, **parts: Any) -> None:
    for argument, value in parts.items():
        if value is not None:
            backend.check_input(value, argument)


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
    """Compute dLoss/dW for the model's trainable weights at (x, y), on JAX or PyTorch.

    The arguments, result and errors are those of the TensorFlow
    implementation (see ``gradmagic.weight_gradients``); a weight the loss does
    not reach gives ``None``, as there. The same question asked again with data
    of the same shapes and an unchanged model skips the checks and the cache
    key (see :mod:`gradmagic.core.questions.repeats`).

    Args:
        model: A Keras 3 model (Sequential, Functional or subclassed).
        x: Inputs, as arrays (NumPy or the backend's own tensors), or a dataset or generator of batches.
        y: Targets, one per sample.
        layer: Restrict to one layer (index in ``model.layers``, name or object). Defaults to ``None``.
        loss: Defaults to ``None``: the compiled loss. Or a Keras loss name, object or callable.
        training: Run layers in training mode. Defaults to ``False``. The model is left unchanged either way.
        sample_weight: Optional per-sample weights of the loss.
        output: Instead of a loss, the mean over the batch of output unit ``output``. Defaults to ``None``.

    Returns:
        A :class:`WeightGradients`.

    Raises:
        GradmagicError: A bad layer, loss, flag, x or y, or a tensor of another framework in x.

    Example:
        >>> r = gradmagic.weight_gradients(model, x, y, layer="dense_1")
    """
    backend = stateless_backend()
    check_model(model)
    given = (x, y, sample_weight)
    answer = repeated(
        functions.last_call(model, "weights"),
        model,
        layer,
        loss,
        (training, output),
        given,
        lambda r: _weight_launch(model, backend, r.question, r.key, r.extra, given, training, output),
        _overlaps(backend),
    )
    if answer is not None:
        return answer()
    training = check_flag("training", training)
    _check_input(backend, model, x=x, y=y, sample_weight=sample_weight)
    if output is None:
        check_loss_argument(model, loss)
    if layer is not None:
        resolve_layer(model, layer)
    data = first_batch(x, y, sample_weight, takes_y=output is None)
    spec, x_in, batch = spec_and_inputs(model, data.x)
    if output is None:
        check_loss_structure(model, spec.output_names, loss)
        y_in, sw_in = prepare_loss_args(model, spec, data.y, data.sample_weight, batch)
    else:
        check_output_index(model, spec, output)
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
    wanted = None if chosen_layer is None else {id(v) for v in chosen_layer.trainable_weights}
    positions = [i for i, v in enumerate(model.trainable_weights) if wanted is None or id(v) in wanted]

    def build() -> functions.Question:
        loss_fn = resolve_loss(model, loss, stateless=True) if output is None else output_unit_loss(int(output))
        slots = weight_slots(model)
        labels = [
            {"index": s.layer_index, "layer": s.layer_name, "weight": s.name, "shape": s.shape, "path": s.path}
            for s in (slots[i] for i in positions)
        ]
        question = functions.Question(None, labels, compiled_loss=loss is None and output is None, model=model)
        question.fn = functions.weight_function(backend, model, positions, loss_fn, training, question.traces)
        return question

    question = functions.cached(model, key, build)
    prepared = (x_in, y_in, sw_in)
    # Taken before the call: it proves the state the key was built from.
    repeat = remembered(
        model,
        question,
        key,
        functions.stored_key(model, key),
        layer,
        loss,
        (training, output),
        given,
        prepared,
        positions,
    )
    result = _weight_launch(model, backend, question, key, positions, prepared, training, output)()
    result.source = data.source
    functions.remember_call(model, "weights", repeat if data.source is None else None)
    return result


def _overlaps(backend: Any) -> bool:
    """True when a repeated question may start before it is proven a repeat (see :func:`.repeats.repeated`).

    JAX dispatches compiled calls asynchronously; PyTorch computes eagerly (no ``asynchronous``).
    """
    return getattr(backend, "asynchronous", False)


def _weight_launch(
    model: keras.Model,
    backend: Any,
    question: functions.Question,
    key: Key | None,
    positions: list[int],
    data: tuple,
    training: bool,
    output: int | None,
) -> Callable[[], WeightGradients]:
    """Start a weight question on prepared data; the function returned waits for it and builds the result.

    Both ways of :func:`weight_gradients` use it.
    """
    args = backend.tensors(data)

    def call() -> Any:
        _warm_compiled_loss(model, key, question, args)
        trainable, non_trainable = question.variable_values(backend)
        chosen, others = functions.split(trainable, positions)
        return functions.launched(question.fn, chosen, others, non_trainable, *args)

    fetch = _run(model, key, call, "dLoss/dW", data[0], training)

    def answer() -> WeightGradients:
        loss_value, grads = _run(model, key, fetch, "dLoss/dW", data[0], training)
        if output is None:
            title = f"dLoss/dW of model '{model_name(model)}' (loss = {loss_value:.6g})"
        else:
            title = f"d(output unit {output})/dW of model '{model_name(model)}' (mean output = {loss_value:.6g})"
        return WeightGradients(loss_value, rows_for(question.labels, grads), title, layer_count=len(model.layers))

    return answer


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
    """Compute dLoss/d(output of one layer) at (x, y), on JAX or PyTorch.

    The arguments, result and errors are those of the TensorFlow
    implementation (see ``gradmagic.output_gradients``). Asked again like
    :func:`weight_gradients`, it takes the same short way.

    Args:
        model: A Keras 3 model.
        x: Inputs, as for :func:`weight_gradients`.
        y: Targets.
        layer: The layer, by index in ``model.layers``, by name or as the object.
        loss: As for :func:`weight_gradients`. Defaults to the compiled loss.
        training: Run layers in training mode. Defaults to ``False``.
        sample_weight: Optional per-sample weights of the loss.

    Returns:
        An :class:`OutputGradients`.

    Raises:
        GradmagicError: A bad layer, loss, x or y, or a layer the forward pass never calls.

    Example:
        >>> o = gradmagic.output_gradients(model, x, y, layer=2)
    """
    backend = stateless_backend()
    check_model(model)
    given = (x, y, sample_weight)
    answer = repeated(
        functions.last_call(model, "output"),
        model,
        layer,
        loss,
        (training,),
        given,
        lambda r: _output_launch(model, backend, r.question, r.key, r.extra, given, training),
        _overlaps(backend),
    )
    if answer is not None:
        return answer()
    training = check_flag("training", training)
    _check_input(backend, model, x=x, y=y, sample_weight=sample_weight)
    check_loss_argument(model, loss)
    resolve_layer(model, layer)
    data = first_batch(x, y, sample_weight)
    spec, x_in, batch = spec_and_inputs(model, data.x)
    check_loss_structure(model, spec.output_names, loss)
    y_in, sw_in = prepare_loss_args(model, spec, data.y, data.sample_weight, batch)
    index, lay = resolve_layer(model, layer)  # again: building the model may have added an InputLayer
    nonfinite_warning(x=x_in, y=y_in, sample_weight=sw_in)
    key = question_key(model, "output", lambda b: b.same(lay), lambda b: loss_token(b, loss), training, sw_in is None)

    def build() -> functions.Question:
        loss_fn = resolve_loss(model, loss, stateless=True)
        question = functions.Question(
            None, layer_index=index, layer_name=lay.name, compiled_loss=loss is None, model=model
        )
        position = input_position(model, lay)
        question.fn = functions.output_function(backend, model, lay, position, loss_fn, training, question.traces)
        return question

    question = functions.cached(model, key, build)
    prepared = (x_in, y_in, sw_in)
    signature = _signature(backend.tensors(prepared))
    stored = functions.stored_key(model, key)
    repeat = remembered(model, question, key, stored, layer, loss, (training,), given, prepared, signature)
    result = _output_launch(model, backend, question, key, signature, prepared, training)()
    result.source = data.source
    functions.remember_call(model, "output", repeat if data.source is None else None)
    return result


def _output_launch(
    model: keras.Model,
    backend: Any,
    question: functions.Question,
    key: Key | None,
    signature: Hashable,
    data: tuple,
    training: bool,
) -> Callable[[], OutputGradients]:
    """Start an output question on prepared data (of input ``signature``); the function returned builds the result.

    Both ways of :func:`output_gradients` use it.
    """
    args = backend.tensors(data)

    def call() -> Any:
        _warm_compiled_loss(model, key, question, args)
        values = question.variable_values(backend)
        compiled = question.per_signature.get(signature)
        if compiled is None:
            compiled = question.per_signature[signature] = question.fn(*values, *args)
        return compiled(*values, *args)

    loss_value, outputs, grads = _run(model, key, call, "dLoss/d(layer output)", data[0], training)

    def answer() -> OutputGradients:
        if not outputs:
            functions.forget(model, key)
            raise layer_not_called(model, question.layer_index, question.layer_name)
        loss = float(backend.to_numpy(loss_value))
        return output_result(model, question.layer_index, question.layer_name, loss, outputs, grads, backend.to_numpy)

    return answer


def _signature(args: Any) -> Hashable:
    """The shapes and dtypes of every leaf (``None`` kept), as a dict key."""
    return tuple(None if leaf is None else (tuple(leaf.shape), str(leaf.dtype)) for leaf in keras.tree.flatten(args))


@leaves_no_trace
def input_gradients(
    model: keras.Model,
    x: Any,
    output: int | None = None,
    training: bool = False,
) -> InputGradients:
    """Compute d(model output)/d(input), the Jacobian of every sample, vectorised, on JAX or PyTorch.

    The arguments, result and errors are those of the TensorFlow
    implementation (see ``gradmagic.input_gradients``). Asked again like
    :func:`weight_gradients` (a slider moving the points), it takes the same short way.

    Args:
        model: A Keras 3 model.
        x: Inputs, as for :func:`weight_gradients`; float inputs only.
        output: Defaults to ``None``: every output unit. ``k`` selects unit ``k`` of the flattened output.
        training: Run layers in training mode. Defaults to ``False``.

    Returns:
        An :class:`InputGradients`.

    Raises:
        GradmagicError: Non-float inputs, a bad ``output`` index, or x that does not fit the model.

    Example:
        >>> j = gradmagic.input_gradients(model, [[0.5]])
    """
    backend = stateless_backend()
    check_model(model)
    answer = repeated(
        functions.last_call(model, "input"),
        model,
        None,
        None,
        (output, training),
        (x,),
        lambda r: _input_launch(model, backend, r.question, r.key, r.extra, x, training),
        _overlaps(backend),
    )
    if answer is not None:
        return answer()
    given = output
    training = check_flag("training", training)
    _check_input(backend, model, x=x)
    data = first_batch(x, takes_y=False)
    spec, x_in, _ = spec_and_inputs(model, data.x)
    leaves = keras.tree.flatten(x_in)
    names = input_labels(None if spec.inputs is None else [s.name for s in spec.inputs], x_in)
    for name, leaf in zip(names, leaves):
        dtype = keras.backend.standardize_dtype(leaf.dtype)
        if "float" not in dtype:
            raise InputError(
                f"Received: input {name!r} of dtype {dtype} for model "
                f"'{model_name(model)}'. d(output)/d(input) exists only for float inputs: "
                f"integer inputs such as token ids into an Embedding are looked up, not "
                f"computed with, so they have no derivative. Fix: ask for the gradient at the "
                f"embedding's output instead, output_gradients(model, x, y, "
                f"layer={embedding_name(model)!r}), or weight_gradients for the embedding matrix."
            )
    if output is not None:
        output = check_output_index(model, spec, output)
    nonfinite_warning(x=x_in)
    key = question_key(model, "input", output, training)

    def build() -> functions.Question:
        question = functions.Question(None, model=model)
        question.fn = functions.input_function(backend, model, output, training, question.traces)
        return question

    question = functions.cached(model, key, build)
    stored = functions.stored_key(model, key)
    extra = (spec, names, output)
    repeat = remembered(model, question, key, stored, None, None, (given, training), (x,), (x_in,), extra)
    gradients = _input_launch(model, backend, question, key, extra, x_in, training)()
    gradients.source = data.source
    functions.remember_call(model, "input", repeat if data.source is None else None)
    return gradients


def _input_launch(
    model: keras.Model,
    backend: Any,
    question: functions.Question,
    key: Key | None,
    extra: tuple,
    x: Any,
    training: bool,
) -> Callable[[], InputGradients]:
    """Start an input question on prepared ``x``; the function returned builds the result.

    Both ways of :func:`input_gradients` use it. ``extra`` is what the full
    way read: the model's declared inputs, the inputs' names and the checked ``output``.
    """
    spec, names, output = extra
    x_args = backend.tensors(x)

    def call() -> Any:
        values = question.variable_values(backend)
        return question.fn(*values, x_args)

    outputs, result = _run(model, key, call, "d(output)/d(input)", x, training)

    def answer() -> InputGradients:
        per_output = [[backend.to_numpy(j) for j in per_input] for per_input in result]
        values = [backend.to_numpy(o) for o in outputs]
        gradients = input_result(model, spec, x, names, per_output, output)
        gradients.values = values[0] if len(values) == 1 else values
        jacobian_notes(gradients, names, per_output)
        return gradients

    return answer
