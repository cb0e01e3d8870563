"""What kind of single input a model takes, read from its declared input: no framework call runs.

The explorer picks its view from :func:`input_kind`, on every Keras backend.
"""

from __future__ import annotations

import keras

from gradmagic.core.questions.inputs import model_spec

#: The kinds of single input the explorer has a view for.
KINDS = ("vector", "sequence", "tokens", "image", "undeclared")


def embedding_layer(model: keras.Model) -> keras.layers.Embedding | None:
    """The first ``keras.layers.Embedding`` among the model's layers (nested models included), or None."""
    for lay in model.layers:
        if isinstance(lay, keras.layers.Embedding):
            return lay
        if isinstance(lay, keras.Model) and (inner := embedding_layer(lay)) is not None:
            return inner
    return None


def input_kind(model: keras.Model) -> str | None:
    """Name the kind of the model's single declared input: ``"vector"``, ``"sequence"``, ``"tokens"`` or ``"image"``.

    Read from the model's declared input only (per sample: ``(F,)`` floats is a
    vector, ``(T,)`` read by an Embedding is tokens, ``(T, F)`` floats a
    sequence, ``(H, W, C)`` floats an image); no TensorFlow call runs.

    Args:
        model: A Keras model.

    Returns:
        The kind; ``"undeclared"`` for a model that declares no input (subclassed,
        or not built yet); None for several inputs or a shape no view serves.
    """
    spec = model_spec(model)
    if spec.inputs is None:
        return "undeclared"
    if len(spec.inputs) != 1:
        return None
    rank, is_float = len(spec.inputs[0].shape), "float" in spec.inputs[0].dtype
    if rank == 1 and embedding_layer(model) is not None:
        return "tokens"
    if not is_float:
        return None
    return {1: "vector", 2: "sequence", 3: "image"}.get(rank)
