"""The data of the vector and plane views: x as (n, n_features) for a model on one flat float vector."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradmagic.core import input_gradients, model_name, model_spec
from gradmagic.errors import InputError


def flat_features(model: Any, x: Any, data: np.ndarray | None) -> np.ndarray:
    """Check that the model takes one flat float vector; return x as (n, n_features).

    ``data`` is x as checked by :func:`explorer_args.check_x` (None for a structure).
    Only a flat x for a model that may take one reaches TensorFlow (which builds an
    unbuilt model and checks the number of features); anything else is refused first.
    """
    if data is not None and data.ndim <= 1:
        data = data.reshape(-1, 1)

    def flat(spec: Any) -> bool:
        inputs = spec.inputs
        return inputs is None or (len(inputs) == 1 and len(inputs[0].shape) == 1 and "float" in inputs[0].dtype)

    spec = model_spec(model)
    if data is not None and data.ndim == 2 and flat(spec):
        input_gradients(model, data[:1])  # builds an unbuilt model; a wrong feature count is the core's error
        spec = model_spec(model)
        if flat(spec):
            return data.astype(spec.inputs[0].dtype if spec.inputs else "float32")
    received = f"x of shape {data.shape}" if data is not None else f"x as a {type(x).__name__} of arrays"
    takes = (
        ", which takes " + ", ".join(f"(batch, {', '.join(str(d) for d in s.shape)}) {s.dtype}" for s in spec.inputs)
        if spec.inputs
        else ""
    )
    raise InputError(
        f"Received: {received} for model '{model_name(model)}'{takes}. Expected a model whose single input is a "
        f"flat float vector and x of shape (n, n_features): the explorer moves one input point with a slider per "
        f"feature. Fix: explore a model on flat features; for images (H, W, C), sequences (T, F) or token ids, "
        f"build the model on a keras.Input of that shape so the explorer opens its image or sequence view; for "
        f"several inputs use gradmagic.input_gradients(model, x)."
    )


def single_sample(model: Any, data: np.ndarray | None) -> np.ndarray | None:
    """Read a 1-D x as one sample without its batch axis when the model says so.

    A model that declares one flat input of ``len(x) > 1`` features takes such an x
    as one sample, as the core does; for any other model a 1-D x stays a column
    (n rows of one feature). Reads the model's declared inputs only: no TensorFlow call.
    """
    if data is None or data.ndim != 1 or data.size < 2:
        return data
    inputs = model_spec(model).inputs
    return data[None, :] if inputs and len(inputs) == 1 and inputs[0].shape == (data.size,) else data
