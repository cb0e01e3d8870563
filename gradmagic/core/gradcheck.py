"""Finite-difference gradient check: autodiff against central differences, in float64 where possible.

The model is copied into float64 (``keras.models.clone_model`` with every layer
rebuilt under a float64 dtype policy, the weights copied), so the differences
are not drowned in float32 round-off and the user's model is never touched.
When a model cannot be copied (a subclassed model, a custom layer without a
complete ``get_config``, a layer hard-coding float32) the check runs on the
model itself in float32 with a looser tolerance, restoring every weight it
perturbs bit for bit. The copy is made in :mod:`~gradmagic.core.float64`, the
comparison in :mod:`~gradmagic.core.finite_differences`, and the result is a
:class:`~gradmagic.core.gradcheck_results.GradientCheck`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.arguments import check_flag, check_seed
from gradmagic.core.batches import first_batch
from gradmagic.core.finite_differences import LossProblem, check_rows, loss_problem
from gradmagic.core.float64 import as_float64, float64_loss, float64_twin
from gradmagic.core.gradcheck_results import CheckRow, GradientCheck
from gradmagic.core.gradients import check_model, leaves_no_trace, prepare_loss_args, spec_and_inputs
from gradmagic.core.state import preserved_eagerly
from gradmagic.core.targets import check_loss_argument, check_loss_structure, model_name, resolve_loss
from gradmagic.core.trace_errors import short_error
from gradmagic.core.tracing import TracingFailed, tracing_error
from gradmagic.errors import InputError

__all__ = ["CheckRow", "GradientCheck", "check_gradients"]

#: Step and tolerance floor per precision: central differences err by O(h^2) + O(eps / h).
_STEP = {"float64": 1e-5, "float32": 1e-3}
_FLOAT32_TOL = 1e-2


def _suspects(model: keras.Model, rows: list[CheckRow]) -> list[str]:
    """Layers from the deepest failing row up to (not including) the next passing one, in model order."""
    failed = [-1 if r.index is None else r.index for r in rows if not r.passed]
    if not failed:
        return []
    deepest = max(failed)
    later = [r.index for r in rows if r.passed and r.index is not None and r.index > deepest]
    stop = min(later) if later else len(model.layers)
    chosen = range(max(deepest, 0), stop)
    return [f"{i} '{model.layers[i].name}'" for i in chosen if not isinstance(model.layers[i], keras.layers.InputLayer)]


def _input_labels(x: Any, spec: Any) -> list[str]:
    leaves = keras.tree.flatten(x)
    if len(leaves) == 1:
        return ["x"]
    if isinstance(x, dict):
        return [f"x[{key!r}]" for key in sorted(x)]
    return (
        [s.name for s in spec.inputs]
        if spec.inputs and len(spec.inputs) == len(leaves)
        else [f"x[{i}]" for i in range(len(leaves))]
    )


# --- the public function -----------------------------------------------------------------------------------------


def _validate(tol: float, epsilon: float | None, max_directions: int) -> None:
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise InputError(f"Received: tol={tol!r}. Expected a positive float, e.g. tol=1e-6.")
    if epsilon is not None and (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0):
        raise InputError(f"Received: epsilon={epsilon!r}. Expected None (automatic) or a positive step, e.g. 1e-5.")
    if isinstance(max_directions, bool) or not isinstance(max_directions, (int, np.integer)) or max_directions < 1:
        raise InputError(f"Received: max_directions={max_directions!r}. Expected a positive int, e.g. 16.")


def _evaluation_model(
    model: keras.Model, spec: Any, loss: Any, x: Any, y: Any, sw: Any, training: bool
) -> tuple[LossProblem, str, list[str]]:
    """``(problem, dtype, notes)``: a float64 twin if it can be built and agrees with the model, else the model."""
    own = loss_problem(model, resolve_loss(model, loss), x, y, sw, training)  # tracing mistakes surface here
    if own.dtype == tf.float64:
        return own, "float64", []
    try:
        x64 = as_float64(x)
        twin = float64_twin(model, spec.input_structure, x64)
        loss_spec = loss if loss is not None else getattr(model, "loss", None)
        loss_fn = resolve_loss(twin, float64_loss(loss_spec) if loss_spec is not None else None)
        problem = loss_problem(twin, loss_fn, x64, as_float64(y), as_float64(sw), training)
        value, reference = problem.loss_at(problem.x), own.loss_at(own.x)
        if not math.isclose(value, reference, rel_tol=1e-3, abs_tol=1e-5):
            raise ValueError(f"the copy's loss {value:.6g} differs from the model's {reference:.6g}")
        if problem.dtype != tf.float64:
            raise ValueError(f"the loss is computed in {problem.dtype.name}")
        return problem, "float64", []
    except Exception as exc:  # whatever stops the copy, the model itself can still be checked
        note = f"a float64 copy of the model was not possible ({short_error(exc)}), so the check ran in float32"
        return own, "float32", [note]


@leaves_no_trace
def check_gradients(
    model: keras.Model,
    x: Any,
    y: Any,
    loss: Any = None,
    tol: float = 1e-6,
    epsilon: float | None = None,
    max_directions: int = 16,
    seed: int = 0,
    training: bool = False,
    sample_weight: Any = None,
) -> GradientCheck:
    """Check autodiff gradients against central finite differences.

    For each layer with trainable weights (all its weights as one vector) and
    for each float input, the autodiff directional derivative ``grad . v`` is
    compared with ``(L(w + h v) - L(w - h v)) / 2h`` along unit directions ``v``:
    every coordinate when the vector has at most ``max_directions`` entries,
    else ``max_directions`` random unit directions. The check runs on a float64
    copy of the model (weights copied, the loss computed in float64); when no
    such copy can be built it runs on the model itself in float32 with the
    tolerance raised to 1e-2, and says so in ``notes``.

    Cost: one forward and backward pass, plus 2 forward passes per direction,
    i.e. at most ``2 * max_directions * (layers with weights + float inputs)``
    forward passes, whatever the size of the weights.

    Non-smooth points (ReLU at exactly 0, ``Round``) and ops that hide part of
    the function from autodiff (``tf.stop_gradient``) make the check fail by
    design: the finite difference sees the function, autodiff sees its gradient
    definition. Dropout in ``training=True`` is random, which no finite
    difference can follow.

    Args:
        model: A Keras 3 model; Sequential and Functional models get a float64 copy.
        x: Inputs, as for :func:`gradmagic.weight_gradients`.
        y: Targets.
        loss: Defaults to ``None``: the compiled loss (its terms summed, without
            ``loss_weights``, on the float64 copy). Otherwise as for
            :func:`gradmagic.weight_gradients`.
        tol: Largest relative error that passes. Defaults to 1e-6 (float64).
        epsilon: The step ``h``. Defaults to ``None``: 1e-5 in float64, 1e-3 in float32.
        max_directions: Directions per row. Defaults to 16.
        seed: Seed of the random directions. Defaults to 0.
        training: Run layers in training mode. Defaults to ``False``.
        sample_weight: Optional per-sample weights of the loss.

    Returns:
        A :class:`GradientCheck`: ``.passed``, ``.max_rel_error``, ``.rows``
        (one per layer with weights, then one per input), ``.failed``,
        ``.suspects``, ``to_dict()``, text and HTML tables.

    Raises:
        GradmagicError: A bad argument, x, y or loss, or a layer that cannot be traced.

    Example:
        >>> c = gradmagic.check_gradients(model, x, y)
        >>> c.passed, c.max_rel_error
    """
    check_model(model)
    _validate(tol, epsilon, max_directions)
    seed, training = check_seed(seed), check_flag("training", training)
    check_loss_argument(model, loss)
    data = first_batch(x, y, sample_weight)
    spec, x_in, batch = spec_and_inputs(model, data.x)
    check_loss_structure(model, spec.output_names, loss)
    y_in, sw_in = prepare_loss_args(model, spec, data.y, data.sample_weight, batch)
    resolve_loss(model, loss)  # a missing or unknown loss is reported before anything runs
    with preserved_eagerly(model):  # the float32 fallback perturbs the model's own weights
        try:
            problem, dtype, notes = _evaluation_model(model, spec, loss, x_in, y_in, sw_in, training)
            if data.source:
                notes.append(data.source)
            if training:
                notes.append("training=True: random layers (Dropout) make finite differences meaningless")
            settings = {
                "epsilon": float(epsilon if epsilon is not None else _STEP[dtype]),
                "tol": float(tol if dtype == "float64" else max(tol, _FLOAT32_TOL)),
                "max_directions": int(max_directions),
                "dtype": dtype,
                "input_names": _input_labels(x_in, spec),
            }
            settings["rng"] = np.random.default_rng(seed)
            value, rows = check_rows(model, problem, settings)
        except TracingFailed as failed:
            raise tracing_error(failed, model, "for the gradient check") from None
    if dtype == "float32" and tol < _FLOAT32_TOL:
        warnings.warn(f"check_gradients ran in float32: {notes[0]}; tol raised to {_FLOAT32_TOL}.", stacklevel=2)
    suspects = _suspects(model, rows)
    return GradientCheck(model_name(model), rows, settings["tol"], dtype, settings["epsilon"], value, suspects, notes)
