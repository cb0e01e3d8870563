"""Resolve what a gradient question points at: layers, weights and the loss.

Layers are addressed by the model's *own* list, ``model.layers``: a Functional
model lists its ``InputLayer`` objects first, a Sequential model does not, and
layers without weights keep their place so that indices never shift.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Hashable
from typing import Any

import keras

from gradmagic.core.arguments import is_int
from gradmagic.core.questions.cache_keys import KeyBuilder
from gradmagic.core.questions.loss_trackers import own_compile_loss
from gradmagic.core.questions.naming import output_names
from gradmagic.core.questions.slots import WeightSlot, weight_slots  # noqa: F401 - importable from here too
from gradmagic.core.questions.user_code import failed
from gradmagic.errors import (
    GradmagicError,
    LayerError,
    LossError,
    NoWeightsError,
    did_you_mean,
    quote_list,
)

#: A loss as gradmagic runs it inside the compiled function:
#: ``(model, x, y, y_pred, sample_weight, training) -> scalar``. The model is an
#: argument, not a closure, so cached functions do not keep models alive.
LossFn = Callable[[Any, Any, Any, Any, Any, bool], Any]


def model_name(model: keras.Model) -> str:
    """Return the model's name for messages."""
    return getattr(model, "name", type(model).__name__)


def resolve_layer(model: keras.Model, layer: int | str | keras.Layer) -> tuple[int, keras.Layer]:
    """Find a layer by index in ``model.layers``, by name, or as a layer object.

    Args:
        model: The model whose ``layers`` list is searched.
        layer: An index (negative counts from the end), a layer name, or a layer.

    Returns:
        ``(index, layer)`` with the non-negative index into ``model.layers``.

    Raises:
        LayerError: The index is out of range or no layer has that name.
    """
    layers = model.layers
    names = [lay.name for lay in layers]
    if is_int(layer):
        layer = int(layer)  # NumPy integers, e.g. from np.arange
    if isinstance(layer, keras.Variable):
        owners = [(i, lay.name) for i, lay in enumerate(layers) if any(w is layer for w in lay.weights)]
        fix = f"layer={owners[0][1]!r} (index {owners[0][0]})" if owners else "the layer that holds it"
        raise LayerError(
            f"Received: layer=<Variable {layer.path!r}>, a weight, not a layer. Expected an index into "
            f"model.layers, a layer name or a layer object of model '{model_name(model)}'. Fix: pass its "
            f"layer, {fix}; the result's rows are per weight."
        )
    if isinstance(layer, bool) or not isinstance(layer, (int, str, keras.Layer)):
        raise LayerError(
            f"Received: layer={layer!r} of type {type(layer).__name__}. Expected an "
            f"index into model.layers, a layer name or a layer object of model "
            f"'{model_name(model)}'. Fix: pass e.g. layer=0 or layer={names[0]!r}."
            if names
            else f"Received: layer={layer!r}. Model '{model_name(model)}' has no layers."
        )
    if isinstance(layer, keras.Layer):
        for index, candidate in enumerate(layers):
            if candidate is layer:
                return index, candidate
        raise LayerError(
            f"Received: layer=<{type(layer).__name__} '{layer.name}'>, which is not "
            f"in model.layers of model '{model_name(model)}'. Expected one of "
            f"{quote_list(names)}. Fix: pass a layer of this model, or its index."
        )
    if isinstance(layer, int):
        if -len(layers) <= layer < len(layers):
            index = layer % len(layers)
            return index, layers[index]
        raise LayerError(
            f"Received: layer={layer}. Expected an index in [0, {len(layers) - 1}] "
            f"(or a negative index from the end) or one of the names {quote_list(names)} "
            f"of model '{model_name(model)}'. Indices follow model.layers as it is: "
            f"a Functional model lists its InputLayer first, a Sequential model does not."
        )
    if layer in names:
        index = names.index(layer)
        return index, layers[index]
    hint = did_you_mean(layer, names)
    raise LayerError(
        f"Received: layer={layer!r}, but model '{model_name(model)}' has no layer of "
        f"that name.{hint} Expected one of {quote_list(names)} or an index in "
        f"[0, {len(layers) - 1}]."
    )


def layer_weights(model: keras.Model, layer: int | str | keras.Layer) -> tuple[int, keras.Layer, list]:
    """Return ``(index, layer, trainable_weights)`` of one layer, refusing empty ones.

    Raises:
        LayerError: The layer cannot be found.
        NoWeightsError: The layer has no trainable weights.
    """
    index, lay = resolve_layer(model, layer)
    weights = list(lay.trainable_weights)
    if not weights:
        with_weights = [f"{i} ({lay_.name})" for i, lay_ in enumerate(model.layers) if lay_.trainable_weights]
        reason = "its weights are frozen (trainable=False)" if lay.weights else "it has no weights"
        raise NoWeightsError(
            f"Received: layer={layer!r}, which is layer {index} '{lay.name}' "
            f"({type(lay).__name__}) of model '{model_name(model)}': {reason}, so "
            f"there is no dLoss/dW to compute. Layers with trainable weights: "
            f"{', '.join(with_weights) or 'none'}. For the gradient at this layer's "
            f"output use output_gradients(model, x, y, layer={index})."
        )
    return index, lay, weights


def has_custom_compute_loss(model: keras.Model) -> bool:
    """True when the model overrides ``compute_loss`` (its loss is then its own code)."""
    # keras.Model's own method is Keras's compiled-loss path; anything else is the user's (or a Keras subclass's).
    return getattr(type(model), "compute_loss", None) is not keras.Model.compute_loss


def _compute_loss_takes_training(model: keras.Model) -> bool:
    return "training" in inspect.signature(model.compute_loss).parameters


class FunctionLoss(keras.losses.Loss):
    """A plain ``f(y_true, y_pred)`` given Keras's reduction and sample weighting."""

    def __init__(self, fn: Callable[[Any, Any], Any], dtype: str | None = None) -> None:
        # The name becomes a TensorFlow name scope: "<lambda>" is not a valid one.
        name = re.sub(r"[^A-Za-z0-9_.]", "_", getattr(fn, "__name__", "loss")).strip("_") or "loss"
        super().__init__(name=name, dtype=dtype)
        self.function = fn

    def call(self, y_true: Any, y_pred: Any) -> Any:
        value = self.function(y_true, y_pred)
        if value is None:
            raise LossError(
                f"Received: loss={_callable_name(self.function)}, which returned None. Expected a tensor of "
                f"per-sample losses (or one scalar). Fix: end the function with `return ...`."
            )
        return value


def _callable_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def loss_name(loss: keras.losses.Loss) -> str:
    """How messages name a loss: the user's function, a Loss subclass, or a Keras loss."""
    if isinstance(loss, FunctionLoss):
        return f"the loss function {_callable_name(loss.function)!r}"
    return f"the loss {type(loss).__name__} {loss.name!r}"


def _shape_of(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return str(tuple(shape)) if shape is not None else type(value).__name__


def _as_loss_object(loss: Any, model: keras.Model) -> keras.losses.Loss:
    """Turn a loss name, function or object into a ``keras.losses.Loss``."""
    if isinstance(loss, keras.losses.Loss):
        return loss
    if isinstance(loss, type):
        raise LossError(
            f"Received: loss={loss.__name__}, a class, not a loss object. Expected an instance of a "
            f"keras.losses.Loss, a Keras loss name or a callable f(y_true, y_pred). Fix: call the class, "
            f"loss={loss.__name__}()."
        )
    if isinstance(loss, str):
        try:
            resolved = keras.losses.get(loss)
        except (ValueError, TypeError):
            resolved = None
        if resolved is None:
            known = sorted(
                n for n, obj in vars(keras.losses).items() if callable(obj) and n[0].islower() and n != "get"
            )
            hint = did_you_mean(loss, known)
            raise LossError(
                f"Received: loss={loss!r}, which is not a Keras loss.{hint} Expected a "
                f"Keras loss name such as 'mse', 'mae', 'binary_crossentropy', "
                f"'categorical_crossentropy', 'sparse_categorical_crossentropy', a "
                f"keras.losses.Loss object, or a callable f(y_true, y_pred)."
            ) from None
        loss = resolved
    if isinstance(loss, keras.losses.Loss):
        return loss
    if callable(loss):
        # In the model's variable dtype: float64 models keep float64 losses, and
        # mixed-precision models (float16 compute) still get float32 losses.
        return FunctionLoss(loss, dtype=getattr(model, "dtype", None))
    raise LossError(
        f"Received: loss={loss!r} of type {type(loss).__name__} for model "
        f"'{model_name(model)}'. Expected a Keras loss name (e.g. 'mse'), a "
        f"keras.losses.Loss object or a callable f(y_true, y_pred)."
    )


def check_loss_argument(model: keras.Model, loss: Any) -> None:
    """Refuse a bad ``loss=`` (an unknown name, a class, a non-callable) before anything runs.

    Raises:
        LossError: The loss cannot be used, or none is given and none is compiled.
    """
    if loss is None:
        _check_compiled_loss(model)
        return
    leaves = list(loss.values()) if isinstance(loss, dict) else loss if isinstance(loss, (list, tuple)) else [loss]
    for leaf in leaves:
        usable = isinstance(leaf, keras.losses.Loss) or (callable(leaf) and not isinstance(leaf, type))
        if not usable:
            _as_loss_object(leaf, model)  # resolves a name, or raises the message for what it is


def check_loss_structure(model: keras.Model, output_names: list[str], loss: Any) -> None:
    """Refuse one loss per output that does not match the model's outputs (once they are known).

    Raises:
        LossError: A dict of losses with unknown output names, or a list of the wrong length.
    """
    if not output_names or not isinstance(loss, (dict, list, tuple)):
        return
    if isinstance(loss, dict):
        unknown = [str(k) for k in loss if k not in output_names]
        if unknown:
            raise LossError(
                f"Received: loss as a dict keyed by {quote_list([str(k) for k in loss])}, but model "
                f"'{model_name(model)}' names its outputs {quote_list(output_names)}; unknown: "
                f"{quote_list(unknown)}.{did_you_mean(unknown[0], output_names)} Expected one loss per output name."
            )
    elif len(loss) != len(output_names):
        raise LossError(
            f"Received: loss as a list of {len(loss)} losses, but model '{model_name(model)}' has "
            f"{len(output_names)} output(s) {quote_list(output_names)}. Expected one loss for all outputs, or "
            f"one per output in that order."
        )


def _regularization_loss(model: keras.Model, dtype: Any) -> Any:
    """Sum the model's extra losses (regularizers, ``add_loss``) as Keras does in fit."""
    extra = [keras.ops.sum(keras.ops.cast(term, dtype)) for term in model.losses]
    return keras.ops.sum(keras.ops.stack(extra)) if extra else None


def _explicit_loss(model: keras.Model, loss: Any) -> LossFn:
    """Build a loss function from an explicit ``loss=`` argument.

    One loss is applied to every model output and the results summed (as
    ``compile(loss=...)`` does); a list or dict gives one loss per output.
    """
    if isinstance(loss, dict):
        per_output: Any = {key: _as_loss_object(value, model) for key, value in loss.items()}
    elif isinstance(loss, (list, tuple)):
        per_output = [_as_loss_object(value, model) for value in loss]
    else:
        per_output = _as_loss_object(loss, model)

    def run(model: keras.Model, x: Any, y: Any, y_pred: Any, sample_weight: Any, training: bool) -> Any:
        del x, training
        flat_pred = keras.tree.flatten(y_pred)
        names = output_keys(model, y_pred)
        if isinstance(per_output, keras.losses.Loss):
            flat_loss = [per_output] * len(flat_pred)
        else:
            flat_loss = _aligned(per_output, names, len(flat_pred))
        flat_true = _aligned(y, names, len(flat_pred))
        if not (len(flat_loss) == len(flat_true) == len(flat_pred)):
            raise LossError(
                f"Model '{model_name(model)}' has {len(flat_pred)} output(s) {quote_list(names)}, but "
                f"{len(flat_loss)} loss(es) and {len(flat_true)} target array(s) were given. Expected one "
                f"target per output (a list in output order or a dict keyed by output name) and either one "
                f"loss for all outputs or one per output."
            )
        flat_weight = (
            _aligned(sample_weight, names, len(flat_pred)) if isinstance(sample_weight, (list, tuple, dict)) else None
        )
        terms = []
        for i, (loss_obj, y_true, pred) in enumerate(zip(flat_loss, flat_true, flat_pred)):
            weight = flat_weight[i] if flat_weight is not None else sample_weight
            # At least float32: a float16 (mixed precision) loss overflows.
            dtype = "float64" if keras.backend.standardize_dtype(pred.dtype) == "float64" else "float32"
            try:
                value = loss_obj(y_true, pred, sample_weight=weight)
            except GradmagicError:
                raise
            except Exception as err:
                raise failed(
                    loss_name(loss_obj)[:1].upper() + loss_name(loss_obj)[1:],
                    err,
                    f"on y of shape {_shape_of(y_true)} and the output of shape {_shape_of(pred)}",
                ) from err
            terms.append(keras.ops.cast(value, dtype))
        total = terms[0] if len(terms) == 1 else keras.ops.sum(keras.ops.stack(terms))
        extra = _regularization_loss(model, total.dtype)
        return total if extra is None else total + extra

    return run


def output_keys(model: keras.Model, y_pred: Any = None) -> list[str]:
    """Names of the model's outputs in ``keras.tree.flatten`` order.

    A model whose outputs are a dict is addressed by its keys; otherwise by
    ``model.output_names`` (the output layers' names).
    """
    return output_names(model, y_pred if y_pred is not None else getattr(model, "output", None))


def _aligned(value: Any, names: list[str], count: int) -> list[Any]:
    """One entry per flat output: a dict is read by output name, a list in order, a leaf as one entry."""
    if isinstance(value, dict):
        missing = [n for n in names if n not in value]
        if missing or len(names) != count:
            raise LossError(
                f"Received a dict keyed by {quote_list(sorted(map(str, value)))}, but the model's outputs are "
                f"named {quote_list(names)}. Expected one entry per output name (or a list in output order)."
            )
        return [value[n] for n in names]
    if isinstance(value, (list, tuple)):  # a structure of targets (data is converted to arrays before)
        return list(value)
    return [value]


def _check_compiled_loss(model: keras.Model) -> None:
    """Refuse ``loss=None`` for a model with neither a compiled loss nor its own ``compute_loss``."""
    if not has_custom_compute_loss(model) and getattr(model, "loss", None) is None:
        raise LossError(
            f"Model '{model_name(model)}' has no compiled loss and no loss was given, "
            f"so there is no dLoss to differentiate. Fix: pass loss='mse' (or any Keras "
            f"loss name, keras.losses.Loss or callable f(y_true, y_pred)), or call "
            f"model.compile(loss=...) first. For d(output)/d(input), which needs no "
            f"loss, use input_gradients(model, x)."
        )


def resolve_loss(model: keras.Model, loss: Any = None, stateless: bool = False) -> LossFn:
    """Return the loss function a gradient question uses.

    Args:
        model: The model.
        loss: ``None`` for the model's compiled loss (through
            ``model.compute_loss``, so regularization and ``add_loss`` terms and a
            custom ``compute_loss`` are honoured), or a Keras loss name, a
            ``keras.losses.Loss``, a callable ``f(y_true, y_pred)``, or a list or
            dict of those (one per output). Explicit losses also add the model's
            regularization losses, as training would.
        stateless: The loss runs where variable writes are dropped anyway (a
            ``keras.StatelessScope`` on JAX or PyTorch), so the metric
            variables a compiled loss updates need no guard. Defaults to
            ``False``: restore them inside the ``tf.function``.

    Returns:
        A function ``(model, x, y, y_pred, sample_weight, training) -> scalar``.

    Raises:
        LossError: No loss given and the model has none compiled, or an unknown loss.
    """
    if loss is not None:
        return _explicit_loss(model, loss)
    _check_compiled_loss(model)
    takes_training = _compute_loss_takes_training(model)

    custom = has_custom_compute_loss(model)

    def run(model: keras.Model, x: Any, y: Any, y_pred: Any, sample_weight: Any, training: bool) -> Any:
        # A compiled loss updates per-output trackers when outputs are nested, and a
        # custom compute_loss may update anything of its own: restore those metrics.
        # A single-output compiled loss writes nothing, so it pays for no guard.
        # The model's compiled loss would add its per-output trackers to the model: use a copy.
        with own_compile_loss(model):
            writes = not stateless and (custom or keras.tree.is_nested(y_pred))
            guarded = list(model.metrics_variables) if writes else []
            if guarded:
                # Imported here: the in-graph snapshot is TensorFlow's, and this module serves every backend.
                from gradmagic.core.questions.state import restore_in_graph, snapshot_in_graph

                saved = snapshot_in_graph(guarded)
            try:
                if takes_training:
                    loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
                else:
                    loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
            except GradmagicError:
                raise
            except Exception as err:
                compiled = model.loss if isinstance(model.loss, str) else _callable_name(model.loss)
                who = "The model's own compute_loss" if custom else f"The compiled loss {compiled!r}"
                raise failed(f"{who} of model '{model_name(model)}'", err, "on y and the model's output") from err
            if loss is None:
                raise LossError(
                    f"Received: a compute_loss of model '{model_name(model)}' that returned None. Expected the "
                    f"scalar loss. Fix: return it from compute_loss, or pass loss=... explicitly."
                )
            if guarded:
                restore_in_graph(guarded, saved)
        return loss

    return run


def output_unit_loss(unit: int) -> LossFn:
    """A "loss" that is output unit ``unit`` of the flattened output, averaged over the batch.

    Its weight gradients are d(output)/dW, for models asked about without targets.
    """

    def run(model: keras.Model, x: Any, y: Any, y_pred: Any, sample_weight: Any, training: bool) -> Any:
        del model, x, y, sample_weight, training
        flat = [keras.ops.reshape(t, (keras.ops.shape(t)[0], -1)) for t in keras.tree.flatten(y_pred)]
        return keras.ops.mean(keras.ops.concatenate(flat, axis=1)[:, unit])

    return run


def loss_token(builder: KeyBuilder, loss: Any) -> Hashable:
    """The cache-key part of a ``loss=`` argument (see :mod:`gradmagic.core.questions.cache_keys`).

    A name is keyed with what it resolves to, so a custom loss registered again
    under the same name is a new question.

    Raises:
        Uncacheable: The loss holds values that cannot be snapshotted.
    """
    if isinstance(loss, str):
        try:
            resolved = keras.losses.get(loss)
        except (ValueError, TypeError):
            resolved = None  # unknown: refused with its own message when the question is built
        return ("name", loss, builder.value(resolved))
    if isinstance(loss, dict):
        return ("dict", *((k, loss_token(builder, v)) for k, v in loss.items()))
    if isinstance(loss, (list, tuple)):
        return (type(loss).__name__, *(loss_token(builder, v) for v in loss))
    return builder.value(loss)
