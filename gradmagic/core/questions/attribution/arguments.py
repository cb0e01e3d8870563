"""What the attribution functions share: the input, the output unit per sample, batching, the compiled-function cache.

Every check here runs before anything is computed, so a bad argument leaves
the model untouched and reads the same whichever function was called.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from gradmagic.core.arguments import is_int
from gradmagic.core.batches import first_batch
from gradmagic.core.questions.entry import check_model, spec_and_inputs
from gradmagic.core.questions.inputs import ModelSpec, declared_units, nonfinite_warning, output_in_range
from gradmagic.core.questions.targets import model_name
from gradmagic.errors import GradmagicWarning, InputError

#: By default, a compiled call takes as many points (samples times path positions or noisy copies) as fit
#: in this many input values (4 MB of float32; a model's activations grow with its input), at most 256.
POINT_BUDGET = 1 << 20
MAX_POINTS = 256


def single_input(
    model: keras.Model, x: Any, float_only: bool = True, engine: Any = None
) -> tuple[ModelSpec, np.ndarray, str | None]:
    """x as one NumPy array with a batch axis (the first batch of a dataset), checked against the model.

    ``engine`` (see :mod:`.engine`) refuses tensors of another framework in x first.
    """
    check_model(model)
    if engine is not None:
        engine.check_input(x)
    data = first_batch(x, takes_y=False)
    spec, x_in, _ = spec_and_inputs(model, data.x)
    leaves = keras.tree.flatten(x_in)
    if len(leaves) != 1:
        raise InputError(
            f"Received: x with {len(leaves)} inputs for model '{model_name(model)}'. Expected a model with a "
            f"single input: attribution maps are computed for one input array. Fix: wrap the model so that the "
            f"other inputs are fixed, e.g. keras.Model(image_input, model([image_input, fixed]))."
        )
    array = leaves[0] if isinstance(leaves[0], np.ndarray) else keras.ops.convert_to_numpy(leaves[0])
    if float_only and array.dtype.kind != "f":
        raise InputError(
            f"Received: x of dtype {array.dtype} for model '{model_name(model)}'. Expected float inputs: "
            f"integer inputs such as token ids are looked up, not computed with, so they have no gradient. "
            f"Fix: ask at a layer instead, gradcam(model, x, layer) or output_gradients(model, x, y, layer)."
        )
    nonfinite_warning(x=array)
    return spec, array, data.source


def check_output(model: keras.Model, spec: ModelSpec, output: Any, units: int | None = None) -> int | None:
    """Validate ``output=`` (an index into the flattened per-sample output, or None).

    Returns it non-negative where the number of units is known (``units``, or
    declared by the model), as given otherwise.
    """
    if output is None:
        if spec.outputs is not None and len(spec.outputs) > 1:
            raise InputError(
                f"Received: output=None for model '{model_name(model)}', which has {len(spec.outputs)} outputs "
                f"{spec.output_names}. Expected an int: with several outputs there is no single predicted "
                f"class. Fix: pass output=k, an index into the outputs flattened and joined in that order."
            )
        return None
    if not is_int(output):
        raise InputError(
            f"Received: output={output!r} of type {type(output).__name__}. Expected None (the predicted class, "
            f"or the only output unit) or an int index into the flattened per-sample output."
        )
    units = declared_units(spec) if units is None else units
    return output_in_range(model, output, units, "per-sample output", "the predicted class. Fix: e.g. output=0.")


def requested_units(model: keras.Model, spec: ModelSpec, output: int | None, x: np.ndarray, engine: Any) -> np.ndarray:
    """The unit per sample for the compiled functions: ``output``, or -1 for each sample's predicted class.

    A model that declares no outputs (subclassed) runs once on x first, so
    that ``output`` is checked against its real number of units.
    """
    if output is None:
        return np.full(len(x), -1, np.int32)
    if declared_units(spec) is None:
        output = check_output(model, spec, output, engine.units(model, x))
    return np.full(len(x), output, np.int32)


def check_batch_size(batch_size: Any) -> int | None:
    """Validate ``batch_size=`` (an int >= 1, or None for the default)."""
    if batch_size is None or (is_int(batch_size) and batch_size >= 1):
        return None if batch_size is None else int(batch_size)
    raise InputError(
        f"Received: batch_size={batch_size!r}. Expected an int >= 1, the number of points (samples times "
        f"path steps or noisy copies) per compiled call, or None to size it by x (at most {MAX_POINTS})."
    )


def points_per_call(batch_size: int | None, x: np.ndarray) -> int:
    """``batch_size``, or by default as many points as :data:`POINT_BUDGET` input values hold."""
    if batch_size is not None:
        return batch_size
    return int(max(1, min(MAX_POINTS, POINT_BUDGET // max(1, math.prod(x.shape[1:])))))


def chunks(samples: int, points: int, batch_size: int) -> Iterator[tuple[slice, slice]]:
    """Split ``samples x points`` into calls of at most ``batch_size`` points (at least one each)."""
    per_sample = min(points, batch_size)
    together = max(1, batch_size // per_sample)
    for s in range(0, samples, together):
        for p in range(0, points, per_sample):
            yield slice(s, s + together), slice(p, p + per_sample)


def warn_disconnected(result: Any, what: str, framework: str) -> None:
    """Note and warn that the output has no gradient path from x, so the map is all zeros by construction."""
    message = (
        f"{what}: the output has no gradient path from x ({framework} has no gradient for some op between "
        f"them, e.g. round, argmax, a cast to int, or float token ids into an Embedding), so the map is 0 "
        f"everywhere whatever the settings. Fix: explain a differentiable model, or ask at a layer after that "
        f"op (gradcam(model, x, layer))"
    )
    result.notes.append(message)
    warnings.warn(f"{message}.", GradmagicWarning, stacklevel=4)


def what_is_explained(spec: ModelSpec, output: int | None, units: np.ndarray) -> str:
    """The output unit a result explains, for its title."""
    if output is not None:
        return f"output unit {int(units[0])}"
    return "the output" if declared_units(spec) == 1 else "the predicted class"
