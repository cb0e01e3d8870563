"""Grad-CAM (Selvaraju et al., 2017): where in one layer's feature map an output unit looks."""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np

from gradmagic.core.questions.attribution.arguments import (
    check_output,
    requested_units,
    single_input,
    what_is_explained,
)
from gradmagic.core.questions.attribution.engine import engine
from gradmagic.core.questions.attribution.results import GradCAM
from gradmagic.core.questions.entry import check_model, leaves_no_trace
from gradmagic.core.questions.targets import model_name, resolve_layer
from gradmagic.errors import GradmagicWarning, InputError


def _check_spatial(model: keras.Model, index: int, layer: keras.Layer, rank: int | None) -> None:
    if rank is None or rank in (3, 4):
        return
    raise InputError(
        f"Received: layer={index} '{layer.name}' of model '{model_name(model)}', whose output has rank {rank} "
        f"(batch included). Expected a layer with a spatial output, (batch, height, width, channels) or "
        f"(batch, steps, channels), channels last: Grad-CAM weighs the channels of a feature map. Fix: pick a "
        f"convolution or pooling layer before the flattening, e.g. the last Conv2D (see model.summary())."
    )


def _declared_rank(layer: keras.Layer) -> int | None:
    """The rank of the layer's output as the model declares it, if it does (Functional, Sequential)."""
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # subclassed model, or a layer called more than once
        return None


@leaves_no_trace
def gradcam(model: keras.Model, x: Any, layer: int | str | keras.Layer, output: int | None = None) -> GradCAM:
    """Grad-CAM: which places of one layer's feature map raise one output unit.

    From the layer's output A (channels last) and the gradient of the output
    unit with respect to it, both taken in one compiled, cached call: each
    channel's weight is the gradient's mean over space, and the map is
    ``ReLU(sum_c weight_c * A[..., c])`` (Selvaraju et al., 2017).

    Args:
        model: A Keras 3 model.
        x: Inputs, as for :func:`integrated_gradients` (integer inputs are fine:
            the gradient is taken at the layer).
        layer: The layer, by index in ``model.layers``, by name or as the
            object; its output must be ``(batch, H', W', C)`` or ``(batch, T', C)``.
        output: The output unit. Defaults to ``None``: the predicted class.
            The unit is the model's output as it is: after a final softmax
            that is the class probability, not the pre-softmax score the
            paper uses (a saturated probability gives a faint map; ask a
            model that ends in logits, or one without its softmax).

    Returns:
        A :class:`GradCAM`: ``.array`` of the layer's spatial shape
        ``(batch, H', W')``, ``.array_at_input`` resized to x's (bilinear),
        ``.upsampled(shape)``, ``.weights``, ``to_dict()`` and a table.

    Raises:
        InputError: A layer without spatial output, a layer the forward pass
            does not call, a bad ``output``, or a model with several inputs.
        LayerError: An index out of range or an unknown name.

    Warns:
        GradmagicWarning: The output has no gradient path from the layer (the map is 0).
            The same on every backend: where JAX passes back zeros, the jaxpr tells a cut path from a zero gradient.

    Example:
        >>> g = gradmagic.gradcam(model, images, layer="conv2d_1")
        >>> g.array_at_input.shape == images.shape[:3]
    """
    run = engine()
    check_model(model)
    resolve_layer(model, layer)  # its type and name, before anything runs
    spec, x_arr, source = single_input(model, x, float_only=False, engine=run)
    index, lay = resolve_layer(model, layer)  # again: building the model may have added an InputLayer
    if isinstance(lay, keras.layers.InputLayer):
        raise InputError(
            f"Received: layer={index} '{lay.name}', the input of model '{model_name(model)}'. Expected a layer "
            f"the model computes, with a spatial output (a convolution). Fix: for the gradient with respect to "
            f"the input itself use saliency(model, x)."
        )
    _check_spatial(model, index, lay, _declared_rank(lay))
    output = check_output(model, spec, output)
    requested = requested_units(model, spec, output, x_arr, run)

    values, units, outputs, grads, connected = run.layer(model, lay, x_arr, requested)
    if not outputs:
        raise InputError(
            f"Received: layer={index} '{lay.name}', which model '{model_name(model)}' did not call when it ran "
            f"on x, so it has no feature map. Fix: pick a layer the forward pass uses (see model.summary())."
        )
    activations, gradients = outputs[0], grads[0]
    _check_spatial(model, index, lay, activations.ndim)
    spatial = tuple(range(1, activations.ndim - 1))
    weights = gradients.astype(np.float64).mean(axis=spatial)
    cam = np.maximum(np.einsum("b...c,bc->b...", activations.astype(np.float64), weights), 0.0)

    map_rank = activations.ndim - 2
    what = what_is_explained(spec, output, units)
    result = GradCAM(
        array=cam.astype(activations.dtype),
        weights=weights.astype(activations.dtype),
        activations=activations,
        gradients=gradients,
        output=units,
        value_at_x=values,
        layer_index=index,
        layer_name=lay.name,
        input_spatial_shape=tuple(x_arr.shape[1 : 1 + map_rank]) if x_arr.ndim > map_rank else (),
        title=f"Grad-CAM of {what} of model '{model_name(model)}' at layer {index} '{lay.name}'",
    )
    if len(outputs) > 1:
        result.notes.append(f"layer '{lay.name}' ran {len(outputs)} times; the map is of its first call")
    if source:
        result.notes.append(f"x: {source}")
    if not bool(connected[0]):
        message = (
            f"the output has no gradient path from layer '{lay.name}' ({run.framework} has no gradient for some op "
            f"between them, e.g. round, argmax or a cast to int), so every channel weight and the map are 0. "
            f"Fix: pick a layer after that op, or explain a differentiable model"
        )
        result.notes.append(message)
        warnings.warn(f"Grad-CAM: {message}.", GradmagicWarning, stacklevel=3)
    return result
