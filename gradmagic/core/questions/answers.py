"""Shared by every backend's gradient questions: output indices, input positions and the results' shapes.

Plain Keras and NumPy: the TensorFlow questions (:mod:`~gradmagic.core.questions.gradients`)
and the JAX/PyTorch ones (:mod:`~gradmagic.core.questions.stateless`) check
``output=`` and assemble their :class:`InputGradients` here, so both read alike.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from gradmagic.core.arguments import is_int
from gradmagic.core.backends.keras_internals import attribute_layers
from gradmagic.core.questions.inputs import ModelSpec, declared_units, output_in_range
from gradmagic.core.questions.naming import output_labels
from gradmagic.core.questions.results import InputGradients, OutputGradients, rows_for
from gradmagic.core.questions.targets import model_name
from gradmagic.errors import InputError


def input_position(model: keras.Model, layer: keras.Layer) -> int | None:
    """Position of an InputLayer's tensor among the model's flat inputs, else None."""
    if not isinstance(layer, keras.layers.InputLayer):
        return None
    flat = keras.tree.flatten(model.input)
    for position, tensor in enumerate(flat):
        if tensor is layer.output:
            return position
    return None


def embedding_name(model: keras.Model) -> str:
    """Name of the entry of ``model.layers`` that holds the first Embedding, for the integer-input message.

    The Embedding may sit inside a custom layer (a token-and-position
    embedding): the layer to ask about is then that custom layer.
    """
    for lay in model.layers:
        if _holds_embedding(lay, depth=3):
            return lay.name
    called = [lay.name for lay in model.layers if not isinstance(lay, keras.layers.InputLayer)]
    return called[0] if called else "<the Embedding layer>"


def _holds_embedding(layer: Any, depth: int) -> bool:
    """True if ``layer`` is an Embedding or holds one among its attributes (a few levels down)."""
    if isinstance(layer, keras.layers.Embedding):
        return True
    if depth == 0 or not isinstance(layer, keras.layers.Layer):
        return False
    children = list(getattr(layer, "layers", None) or []) if isinstance(layer, keras.Model) else []
    children += attribute_layers(layer)
    return any(_holds_embedding(child, depth - 1) for child in children)


def check_output_index(model: keras.Model, spec: ModelSpec, output: Any) -> int:
    """Validate ``output=`` against the flattened per-sample output; return it non-negative."""
    if not is_int(output):
        raise InputError(f"Received: output={output!r}. Expected None (all output units) or an int index.")
    return output_in_range(model, output, declared_units(spec), "output", "the full Jacobian.")


def input_result(
    model: keras.Model, spec: ModelSpec, x_in: Any, names: list[str], per_output: list[list], output: int | None
) -> InputGradients:
    """The :class:`InputGradients` of per-sample Jacobians ``per_output[o][i]`` (output ``o``, input ``i``)."""
    out_names = output_labels(spec.output_names, len(per_output))
    if output is not None:
        out_names = [f"unit {output}"]
    labels, arrays = [], []
    for out_name, per_input in zip(out_names, per_output):
        for in_name, jac in zip(names, per_input):
            labels.append({"output": out_name, "input": in_name, "shape": None if jac is None else tuple(jac.shape)})
            arrays.append(jac)

    def shaped(per_input: list) -> Any:
        if len(per_input) == 1:
            return per_input[0]
        return dict(zip(sorted(x_in), per_input)) if isinstance(x_in, dict) else list(per_input)

    array = shaped(per_output[0]) if len(per_output) == 1 else [shaped(p) for p in per_output]
    what = "all output units" if output is None else f"output unit {output}"
    title = f"d(output)/d(input) of model '{model_name(model)}', {what}, per sample"
    return InputGradients(rows_for(labels, arrays), array, output, title)


def layer_not_called(model: keras.Model, index: int, name: str) -> InputError:
    """The error for an output question about a layer the forward pass never called."""
    return InputError(
        f"Layer {index} '{name}' of model '{model_name(model)}' was not called when the model ran on x, so its "
        f"output has no gradient. Pick a layer that the forward pass uses (see model.summary())."
    )


def output_result(
    model: keras.Model, index: int, name: str, loss: float, outputs: list, grads: list, to_numpy: Any
) -> OutputGradients:
    """The :class:`OutputGradients` of layer ``index`` from each call's ``outputs`` and ``grads`` (first call shown).

    ``to_numpy`` turns the backend's tensors into NumPy arrays.
    """
    first = [to_numpy(g) for g in grads[0]]
    values = [to_numpy(v) for v in outputs[0]]
    names = [f"output {i}" for i in range(len(first))] if len(first) > 1 else ["output"]
    labels = [{"index": index, "layer": name, "tensor": n, "shape": tuple(v.shape)} for n, v in zip(names, values)]
    title = f"dLoss/d(output of layer {index} '{name}') of model '{model_name(model)}' (loss = {loss:.6g})"
    array = values[0] if len(values) == 1 else values
    return OutputGradients(loss, rows_for(labels, first), array, index, name, len(outputs), title)


def jacobian_notes(gradients: InputGradients, names: list[str], per_output: list[list]) -> None:
    """Add the notes that say what a ``None`` or an all-zero Jacobian means (autodiff's answers, not failures)."""
    pairs = [(name, jac) for per_input in per_output for name, jac in zip(names, per_input)]
    cut = sorted({name for name, jac in pairs if jac is None})
    if cut:  # None is autodiff's answer, not a failure: say what it means and where to look
        gradients.notes.append(
            f"input(s) {', '.join(map(repr, cut))} reach no output through differentiable ops, so their "
            f"Jacobian is None (e.g. a cast to an integer dtype, or an input the outputs do not use); "
            f"gradmagic.explain(model, x) names the op that cuts the path"
        )
    flat = sorted({name for name, jac in pairs if jac is not None and jac.size and not np.any(jac)} - set(cut))
    if flat:
        gradients.notes.append(
            f"the Jacobian of input(s) {', '.join(map(repr, flat))} is exactly 0 at every sample: either the "
            f"outputs do not change with them here (e.g. inactive ReLUs) or an op such as a cast to an integer "
            f"dtype cuts the path; gradmagic.explain(model, x) tells which"
        )
