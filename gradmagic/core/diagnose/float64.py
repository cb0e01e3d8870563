"""A float64 copy of a model and of its loss, so that finite differences are not drowned in round-off.

The copy is ``keras.models.clone_model`` (Sequential and Functional models) or
``from_config`` (subclassed models), made while Keras's default dtype policy is
float64, so that layers a custom layer creates in its constructor, and nested
models, are float64 too; the weights are then copied. The user's model is never
touched, and the global policy is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from gradmagic.core.backends.keras_internals import lambda_output_shape
from gradmagic.core.questions.targets import FunctionLoss


@contextlib.contextmanager
def float64_default() -> Iterator[None]:
    """Make float64 Keras's default dtype policy and float type for the duration; restore both."""
    policy, floatx = keras.config.dtype_policy(), keras.config.floatx()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def _float64_layer(layer: Any) -> Any:
    """Rebuild one layer from its config under a float64 dtype policy."""
    if not isinstance(layer, keras.layers.Layer):
        # A raw op between layers (``inp + h``, a mask's ``NotEqual``) holds no state and no
        # dtype: the same operation serves the copy, computing in its inputs' float64.
        return layer
    if isinstance(layer, keras.layers.Lambda):
        # get_config stores a lambda as bytecode that safe mode refuses to load (and cannot serialize some
        # functions at all, e.g. keras.ops.custom_gradient's on PyTorch): reuse the function and arguments as given.
        return keras.layers.Lambda(
            layer.function, output_shape=lambda_output_shape(layer), mask=layer.mask, arguments=layer.arguments,
            name=layer.name,
            dtype="float64",
        )  # fmt: skip
    config = layer.get_config()
    try:
        return type(layer).from_config({**config, "dtype": "float64"})
    except TypeError:
        # A custom constructor without **kwargs: pass only its own arguments; the float64
        # default policy (see float64_default) gives the layer its dtype.
        own = {key: value for key, value in config.items() if key not in _BASE_CONFIG}
        return type(layer).from_config(own)


#: What ``keras.layers.Layer.get_config`` adds to every layer's config.
_BASE_CONFIG = ("name", "trainable", "dtype")


def _rebuilt(model: keras.Model, input_structure: Any) -> keras.Model:
    """An untrained float64 model of the same architecture (clone or ``from_config``)."""
    if input_structure is None:  # a subclassed model: its constructor arguments are its config
        try:
            config = model.get_config()
        except NotImplementedError:
            raise ValueError("the subclassed model has no get_config, so it cannot be rebuilt") from None
        return type(model).from_config({**config, "dtype": "float64"} if "dtype" in config else config)
    inputs = keras.tree.map_structure(
        lambda t: keras.Input(
            batch_shape=t.shape, dtype="float64" if "float" in str(t.dtype) else t.dtype, name=t.name
        ),
        input_structure,
    )
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=_float64_layer, recursive=True)


def float64_twin(model: keras.Model, input_structure: Any, sample: Any) -> keras.Model:
    """A float64 copy of the model with the same weights; raises whatever stops the copy.

    Call it inside :func:`float64_default`. ``sample`` (float64 inputs) builds
    the layers that Keras could not build symbolically, which also raises the
    real error of a layer that fails in float64.
    """
    twin = _rebuilt(model, input_structure)
    if len(twin.weights) != len(model.weights):
        twin(sample, training=False)
    if [tuple(v.shape) for v in twin.trainable_weights] != [tuple(v.shape) for v in model.trainable_weights]:
        raise ValueError("the copy's trainable weights do not line up with the model's")
    if [tuple(v.shape) for v in twin.weights] != [tuple(v.shape) for v in model.weights]:
        raise ValueError("the copy's weights do not line up with the model's")
    twin.set_weights([v.astype("float64") if v.dtype.kind == "f" else v for v in model.get_weights()])
    low = [v.path for v in twin.weights if v.dtype != "float64" and "float" in str(v.dtype)]
    if low:
        raise ValueError(f"weights {low[:3]} stayed in lower precision")
    # A layer that pins its own policy would cast its inputs back down: such a copy is not a float64 check.
    lower = [layer.name for layer in _all_layers(twin) if layer.compute_dtype != "float64"]
    if lower:
        raise ValueError(f"layers {lower[:3]} still compute in lower precision")
    return twin


def _all_layers(model: keras.Model) -> list[keras.Layer]:
    """Every layer, nested models' layers included (and the nested models themselves)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_all_layers(layer))
    return found


class WeightedLoss(keras.losses.Loss):
    """A loss times a constant: ``compile(loss_weights=...)`` for the copy's explicit loss."""

    def __init__(self, loss: keras.losses.Loss, weight: float) -> None:
        super().__init__(name=loss.name, dtype=loss.dtype)
        self.loss, self.weight = loss, float(weight)

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        return self.loss(y_true, y_pred, sample_weight=sample_weight) * self.weight

    def call(self, y_true: Any, y_pred: Any) -> Any:  # only __call__ is used; here for completeness
        return self.loss.call(y_true, y_pred) * self.weight


def float64_loss(spec: Any, weights: Any = None) -> Any:
    """The same loss spec with every loss computing in float64 where it can, times its ``loss_weights``.

    Args:
        spec: A compiled or explicit loss spec: a name, ``Loss``, callable, or a list/dict of them.
        weights: ``compile``'s ``loss_weights`` (a number, list or dict), or ``None``.
    """
    if isinstance(spec, dict):
        return {key: float64_loss(value, _weight_of(weights, key)) for key, value in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [float64_loss(value, _weight_of(weights, i)) for i, value in enumerate(spec)]
    if isinstance(spec, str):
        spec = keras.losses.get(spec)
    if isinstance(spec, keras.losses.Loss):
        with contextlib.suppress(Exception):  # a custom Loss without a dtype argument keeps its precision
            spec = type(spec).from_config({**spec.get_config(), "dtype": "float64"})
    elif callable(spec):
        spec = FunctionLoss(spec, dtype="float64")
    if weights is not None and not isinstance(weights, (list, tuple, dict)) and isinstance(spec, keras.losses.Loss):
        return spec if float(weights) == 1.0 else WeightedLoss(spec, weights)
    return spec


def _weight_of(weights: Any, key: Any) -> Any:
    if isinstance(weights, dict):
        return weights.get(key, 1.0)
    if isinstance(weights, (list, tuple)):
        return weights[key] if isinstance(key, int) and key < len(weights) else 1.0
    return weights


def loss_weights(model: keras.Model) -> Any:
    """``compile``'s ``loss_weights``, from the public compile config (``None`` if none)."""
    try:
        config = model.get_compile_config() or {}
    except Exception:  # a model that was never compiled
        return None
    return config.get("loss_weights")


def as_float64(structure: Any) -> Any:
    """Float arrays of a structure (inputs, targets, sample weights) as float64; anything else as it is."""
    return keras.tree.map_structure(
        lambda t: None if t is None else (np.asarray(t, "float64") if np.asarray(t).dtype.kind == "f" else t),
        structure,
    )
