"""Which view the explorer opens, and the checks of the arguments only the plane, sequence and image views take.

Every check reads the model's declared input and the data; none runs the
model. A refusal is one :class:`~gradmagic.errors.GradmagicError` paragraph:
what was received, what was expected, how to fix it.
"""

from __future__ import annotations

import collections.abc
from typing import Any

import numpy as np

from gradmagic.core import input_kind, is_int, model_name, model_spec
from gradmagic.errors import GradmagicError, InputError, quote_list
from gradmagic.widgets.explorer_args import describe

#: The views ``view=`` may name.
VIEWS = ("vector", "plane", "sequence", "image")

#: Most points on the image view's path: each one is a forward and backward pass of the model.
MAX_STEPS = 512

_SERVED = (
    "a flat float vector (batch, F), a float sequence (batch, T, F), token ids (batch, T) read by an Embedding, "
    "or an image (batch, H, W, C)"
)


def _takes(model: Any) -> str:
    inputs = model_spec(model).inputs or []
    return ", ".join(f"(batch, {', '.join(str(d) for d in s.shape)}) {s.dtype}".replace(", )", ")") for s in inputs)


def choose_view(model: Any, view: Any) -> str:
    """The view for ``model``: ``view`` if given and possible, else the one its declared input calls for.

    Models that declare no input (subclassed, unbuilt) and anything that is not
    a Keras model go to the vector view, which checks them as it always has.

    Raises:
        GradmagicError: ``view`` is not one of :data:`VIEWS`, does not fit the
            model's input, or the model's input has no view.
    """
    import keras

    if view is not None and view not in VIEWS:
        raise GradmagicError(
            f"Received: view={describe(view)}. Expected None (chosen from the model's input) or one of "
            f"{quote_list(VIEWS)}. Fix: leave it out, or e.g. view='plane' for two features at once."
        )
    if not isinstance(model, keras.Model):
        return "vector"
    kind = input_kind(model)
    if kind is None:
        raise InputError(
            f"Received: model '{model_name(model)}', which takes {_takes(model)}. Expected a model whose single "
            f"input is {_SERVED}: the explorer has a view for each. Fix: use gradmagic.input_gradients(model, x) "
            f"for d(output)/d(input) of other inputs, or explore a sub-model with one such input."
        )
    natural = {"vector": "vector", "undeclared": "vector", "sequence": "sequence", "tokens": "sequence"}.get(kind, kind)
    if view is None or view == natural or (view == "plane" and natural == "vector"):
        return view or natural
    raise InputError(
        f"Received: view={view!r} for model '{model_name(model)}', which takes {_takes(model) or 'an undeclared input'}"
        f". Expected a view that fits that input: {natural!r}"
        + (" or 'plane'" if natural == "vector" else "")
        + f". Fix: leave view out (the explorer picks {natural!r})."
    )


def check_samples(model: Any, x: Any, kind: str) -> np.ndarray:
    """Return x as an array with a batch axis that fits the model's declared input.

    Args:
        model: A model with one declared input.
        x: Samples with a batch axis, or one sample without it.
        kind: ``"sequence"`` or ``"image"`` (what the message calls a sample).

    Raises:
        InputError: x is not a finite numeric array of the declared shape.
    """
    spec = model_spec(model).inputs[0]
    example = {"sequence": "x_test[:20]", "image": "images[:8]"}[kind]
    try:
        data = None if isinstance(x, (str, bytes, dict, set, frozenset)) or x is None else np.asarray(x)
    except (TypeError, ValueError):
        data = None
    if data is not None and data.ndim == len(spec.shape):
        data = data[None]  # one sample without its batch axis
    fits = (
        data is not None
        and data.dtype.kind in "biuf"
        and data.ndim == len(spec.shape) + 1
        and len(data) > 0
        and all(d is None or d == n for d, n in zip(spec.shape, data.shape[1:]))
    )
    if not fits:
        received = f"x of shape {data.shape} and dtype {data.dtype}" if data is not None else f"x={describe(x)}"
        raise InputError(
            f"Received: {received} for model '{model_name(model)}', which takes {_takes(model)}. Expected "
            f"{kind}s with a batch axis in that shape (or one {kind} without it). Fix: pass e.g. "
            f"gm.explore(model, {example})."
        )
    if not np.all(np.isfinite(data)):
        raise InputError(
            f"Received: x with {int(np.sum(~np.isfinite(data)))} NaN or Inf value(s). Expected finite {kind}s. "
            f"Fix: drop those samples, e.g. x[np.isfinite(x).reshape(len(x), -1).all(axis=1)]."
        )
    dtype = spec.dtype if "float" in spec.dtype else data.dtype
    return data.astype(dtype)


def check_labels(labels: Any, rows: int, length: int) -> list[list[str]] | None:
    """Return the position labels of the sequence view, one list per sample, or None.

    ``labels`` is one string per position (the same for every sample) or one
    such list per sample (e.g. each sample's tokens).

    Raises:
        InputError: Not strings, or not one per position (and per sample).
    """
    if labels is None:
        return None

    def strings(value: Any) -> list[str] | None:
        if isinstance(value, (str, bytes)) or not isinstance(value, (collections.abc.Sequence, np.ndarray)):
            return None
        names = [str(n) if isinstance(n, np.str_) else n for n in value]
        return names if len(names) == length and all(isinstance(n, str) for n in names) else None

    flat = strings(labels)
    if flat is not None:
        return [flat] * rows
    per_sample = (
        [strings(row) for row in labels]
        if isinstance(labels, (collections.abc.Sequence, np.ndarray)) and not isinstance(labels, (str, bytes))
        else None
    )
    if per_sample is None or len(per_sample) != rows or any(row is None for row in per_sample):
        raise InputError(
            f"Received: labels={describe(labels)}. Expected one string per position ({length}), or one such list "
            f"per sample ({rows}), or None. Fix: e.g. labels=['the', 'cat', ...] with {length} entries."
        )
    return per_sample


def check_steps(steps: Any) -> int:
    """Refuse a path length that is not an int from 2 to :data:`MAX_STEPS`."""
    if not is_int(steps) or not 2 <= steps <= MAX_STEPS:
        raise GradmagicError(
            f"Received: steps={describe(steps)}. Expected an int from 2 to {MAX_STEPS}: the points on the path "
            f"from the baseline to the image where the gradient is taken. Fix: leave the default (32) or e.g. "
            f"steps=16."
        )
    return int(steps)


#: The views each view-specific option of ``explore`` belongs to.
VIEW_OPTIONS = {
    "labels": ("sequence",),
    "steps": ("sequence", "image"),
    "baseline": ("image",),
    "gradcam_layer": ("image",),
}


def check_view_options(view: str, given: dict[str, bool]) -> None:
    """Refuse an option given for a view that does not use it (rather than ignore it).

    Args:
        view: The view that opens.
        given: Option name -> whether the caller set it.
    """
    for name, is_set in given.items():
        if is_set and view not in VIEW_OPTIONS[name]:
            views = " and ".join(f"{v!r}" for v in VIEW_OPTIONS[name])
            raise GradmagicError(
                f"Received: {name}=... for the {view!r} view. Expected {name} only with the {views} view"
                f"{'s' if len(VIEW_OPTIONS[name]) > 1 else ''}, which use it. Fix: drop {name}=, or check that the "
                f"model's input is what you meant (the explorer picked {view!r} from it)."
            )
