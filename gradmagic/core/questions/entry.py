"""Entry checks every public gradient function shares: the model, x, y and sample weights.

The three questions, ``explain`` and ``check_gradients`` all start here, so a
bad argument reads the same whichever function was called.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from gradmagic.core.questions import state
from gradmagic.core.questions.inputs import ModelSpec, model_spec, prepare_inputs, prepare_targets
from gradmagic.core.questions.layer_calls import layers_named
from gradmagic.core.questions.model_keys import known_spec, remember_spec
from gradmagic.core.questions.state import preserved_eagerly, unbuilt_on_failure
from gradmagic.core.questions.targets import has_custom_compute_loss, model_name
from gradmagic.core.questions.trace_errors import short_error
from gradmagic.core.questions.user_code import with_cause
from gradmagic.errors import GradmagicError, InputError, ModelBuildError, quote_list


def check_model(model: Any) -> None:
    """Refuse anything but a Keras 3 model, with a message that says why."""
    if not isinstance(model, keras.Model):
        raise GradmagicError(
            f"Received: model of type {type(model).__name__}. Expected a Keras 3 model "
            f"(keras.Model, keras.Sequential or a subclass). Models from tf_keras / Keras 2 "
            f"are not supported: rebuild the model with `import keras` (Keras 3)."
        )


def shapes_text(x: Any) -> str:
    """The shape of x (or of each of its parts) for a message."""
    leaves = keras.tree.flatten(x)
    shapes = [tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf)) for leaf in leaves]
    return str(shapes[0]) if len(shapes) == 1 else str(shapes)


def spec_and_inputs(model: keras.Model, x: Any) -> tuple[ModelSpec, Any, int]:
    """Build the model from x if needed, then convert x against its declared inputs."""
    known = known_spec(model)
    if known is not None:
        prepared, batch = prepare_inputs(model, x, known)
        return known, prepared, batch
    if not model.built:
        raw, _ = prepare_inputs(model, x, ModelSpec(None, None, None, []))
        sample = keras.tree.map_structure(lambda t: t[:1], raw)
        try:
            with unbuilt_on_failure(model), preserved_eagerly(model), layers_named(model):
                model(sample, training=False)
        except GradmagicError as exc:
            raise with_cause(exc)  # noqa: B904 - the cause is the user's error, re-attached
        except Exception as exc:
            error = ModelBuildError(
                f"Received: x of shape {shapes_text(raw)} for model '{model_name(model)}', which is not built, and "
                f"building it by calling it on one sample of x failed: {short_error(exc).rstrip('.')}. Expected x "
                f"in the shape the model takes (the model was left unbuilt). Fix: give x in that shape, or build "
                f"the model first (an Input layer, model.build(shape), or one call on real data)."
            )
            raise error from (exc if own_call(model) else None)  # the user's own call: keep its traceback
    spec = model_spec(model)
    remember_spec(model, spec)
    prepared, batch = prepare_inputs(model, x, spec)
    return spec, prepared, batch


def prepare_loss_args(model: keras.Model, spec: ModelSpec, y: Any, sample_weight: Any, batch: int) -> tuple[Any, Any]:
    """Convert and check targets and optional sample weights for a batch of ``batch`` samples."""
    targets = prepare_targets(model, y, batch, spec)
    weights = None
    if isinstance(sample_weight, dict) and not isinstance(getattr(model, "output", None), dict):
        # Keras reads per-output weights of a list-output model by position: order them by output name.
        missing = [name for name in spec.output_names if name not in sample_weight]
        if missing or not spec.output_names:
            raise InputError(
                f"Received: sample_weight as a dict keyed by {quote_list(sorted(map(str, sample_weight)))}, but "
                f"model '{model_name(model)}' names its outputs {quote_list(spec.output_names)}. Expected one "
                f"entry per output name, or a list in output order, or one array for every output."
            )
        sample_weight = [sample_weight[name] for name in spec.output_names]
    if sample_weight is not None:
        weights = prepare_targets(model, sample_weight, batch, ModelSpec(None, None, None, []), "sample_weight")
        _check_weightshapes_text(model, spec, weights)
    return targets, weights


def _check_weightshapes_text(model: keras.Model, spec: ModelSpec, weights: Any) -> None:
    """Sample weights must broadcast against the per-sample loss: the output's shape without its last axis.

    A model with its own ``compute_loss`` may use them otherwise, so it is not checked.
    """
    outputs = spec.outputs or []
    leaves = keras.tree.flatten(weights)
    if not outputs or has_custom_compute_loss(model) or len(leaves) not in (1, len(outputs)):
        return
    pairs = [(leaves[0], out) for out in outputs] if len(leaves) == 1 else list(zip(leaves, outputs))
    for weight, out in pairs:
        per_sample, lead = tuple(weight.shape[1:]), tuple(out.shape[:-1])
        if per_sample and per_sample[-1] == 1:
            per_sample = per_sample[:-1]
        fits = len(per_sample) <= len(lead) and all(
            e is None or s == e for s, e in zip(per_sample, lead[: len(per_sample)])
        )
        if not fits:
            expected = ", ".join(["batch", *(str(d) for d in lead)])
            raise InputError(
                f"Received: sample_weight of shape {tuple(weight.shape)}, but the loss of output {out.name!r} "
                f"of model '{model_name(model)}' has one value per sample"
                + (f" and step, shape ({expected})" if lead else "")
                + ". Expected sample_weight of shape (batch,)"
                + (f" or ({expected})" if lead else "")
                + f". Fix: pass one weight per sample, e.g. np.ones({weight.shape[0]})."
            )


def own_call(model: keras.Model) -> bool:
    """True when the model's ``call`` is the user's code (a subclassed model), not Keras's."""
    return not type(model).call.__module__.startswith("keras.")


def leaves_no_trace(function: Callable) -> Callable:
    """Make a public function that fails leave an unbuilt model unbuilt (it may build it on the way)."""

    @functools.wraps(function)
    def guarded(model: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(model, keras.Model) or model.built:  # no guard needed: skip the context manager
            return function(model, *args, **kwargs)
        with state.rollback_on_failure(model):
            return function(model, *args, **kwargs)

    return guarded
