"""A float64 copy of a model and of its loss, so that finite differences are not drowned in round-off.

The copy is ``keras.models.clone_model`` with every layer rebuilt under a
float64 dtype policy and the weights copied; the user's model is never touched.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from gradmagic.core.targets import FunctionLoss


def _float64_layer(layer: keras.Layer) -> keras.Layer:
    """Rebuild one layer from its config under a float64 dtype policy."""
    if isinstance(layer, keras.layers.Lambda):
        # get_config stores a lambda as bytecode that safe mode refuses to load: reuse the function itself.
        config = layer.get_config()
        shape = config.get("output_shape")
        if isinstance(shape, dict):  # a serialized shape function; Lambda has no public accessor for it
            shape = getattr(layer, "_output_shape", None)
        return keras.layers.Lambda(
            layer.function, output_shape=shape, mask=layer.mask, arguments=layer.arguments, name=layer.name,
            dtype="float64",
        )  # fmt: skip
    return type(layer).from_config({**layer.get_config(), "dtype": "float64"})


def float64_twin(model: keras.Model, input_structure: Any, sample: Any) -> keras.Model:
    """A float64 copy of the model with the same weights; raises whatever stops the copy.

    ``sample`` (float64 inputs) builds the layers that Keras could not build
    symbolically, which also raises the real error of a layer that fails in float64.
    """
    if input_structure is None:
        raise ValueError("the model declares no inputs (a subclassed model), so clone_model cannot copy it")
    inputs = keras.tree.map_structure(
        lambda t: keras.Input(
            batch_shape=t.shape, dtype="float64" if "float" in str(t.dtype) else t.dtype, name=t.name
        ),
        input_structure,
    )
    twin = keras.models.clone_model(model, input_tensors=inputs, clone_function=_float64_layer, recursive=True)
    if len(twin.weights) != len(model.weights):
        twin(sample, training=False)
    if [tuple(v.shape) for v in twin.trainable_weights] != [tuple(v.shape) for v in model.trainable_weights]:
        raise ValueError("the copy's trainable weights do not line up with the model's")
    values = model.get_weights()
    twin.set_weights([v.astype("float64") if v.dtype.kind == "f" else v for v in values])
    low = [v.path for v in twin.weights if v.dtype != "float64" and "float" in str(v.dtype)]
    if low:
        raise ValueError(f"weights {low[:3]} stayed in lower precision")
    # A nested model keeps its own policy through clone_model and would cast its
    # inputs back to float32: such a copy is not a float64 check.
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


def float64_loss(spec: Any) -> Any:
    """The same loss spec with every loss computing in float64 where it can."""
    if isinstance(spec, dict):
        return {key: float64_loss(value) for key, value in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [float64_loss(value) for value in spec]
    if isinstance(spec, str):
        spec = keras.losses.get(spec)
    if isinstance(spec, keras.losses.Loss):
        try:
            return type(spec).from_config({**spec.get_config(), "dtype": "float64"})
        except Exception:  # a custom Loss without a dtype argument keeps its own precision
            return spec
    return FunctionLoss(spec, dtype="float64") if callable(spec) else spec


def as_float64(structure: Any) -> Any:
    """Float arrays of a structure (inputs, targets, sample weights) as float64; anything else as it is."""
    return keras.tree.map_structure(
        lambda t: None if t is None else (np.asarray(t, "float64") if np.asarray(t).dtype.kind == "f" else t),
        structure,
    )
