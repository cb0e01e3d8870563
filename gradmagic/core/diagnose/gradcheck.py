"""Finite-difference gradient check: autodiff against central differences, in float64 where possible.

The model is copied into float64 (``keras.models.clone_model``, or
``from_config`` for a subclassed model, with every layer rebuilt under a float64
dtype policy, the weights copied), so the differences are not drowned in
float32 round-off and the user's model is never touched. When a model cannot be
copied (a custom layer whose ``get_config`` cannot rebuild it, a layer
hard-coding float32, a custom ``compute_loss``) the check runs on the model
itself in float32 with a looser tolerance, restoring every weight it perturbs
bit for bit. The copy is made in :mod:`~gradmagic.core.diagnose.float64`, the
comparison in :mod:`~gradmagic.core.diagnose.finite_differences`, and the result is a
:class:`~gradmagic.core.diagnose.gradcheck_results.GradientCheck`.
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
from gradmagic.core.diagnose.arguments import refuse_array_loss
from gradmagic.core.diagnose.finite_differences import LossProblem, check_rows, count_rows, loss_problem
from gradmagic.core.diagnose.float64 import as_float64, float64_default, float64_loss, float64_twin, loss_weights
from gradmagic.core.diagnose.gradcheck_results import CheckRow, GradientCheck
from gradmagic.core.diagnose.gradcheck_settings import (
    EPS,
    FLOAT32_TOL,
    STEP,
    compute_eps,
    input_labels,
    suspects,
    validate,
)
from gradmagic.core.diagnose.progress import Progress
from gradmagic.core.diagnose.tracing import TracingFailed, layer_ancestors, tracing_error
from gradmagic.core.questions.entry import check_model, leaves_no_trace, prepare_loss_args, spec_and_inputs
from gradmagic.core.questions.state import preserved_eagerly
from gradmagic.core.questions.targets import check_loss_argument, check_loss_structure, model_name, resolve_loss
from gradmagic.core.questions.trace_errors import short_error

__all__ = ["CheckRow", "GradientCheck", "check_gradients"]

# --- the public function -----------------------------------------------------------------------------------------


def _twin_problem(
    model: keras.Model, spec: Any, loss: Any, x: Any, y: Any, sw: Any, training: bool, reference: float
) -> LossProblem:
    """The loss problem of a float64 copy of the model; raises whatever stops the copy or makes it disagree."""
    x64 = as_float64(x)
    with float64_default():  # layers built or traced here default to float64 too
        twin = float64_twin(model, spec.input_structure, x64)
        if loss is None and getattr(model, "loss", None) is None:
            raise ValueError("the model computes its own loss (compute_loss), which cannot be moved to float64")
        weights = loss_weights(model) if loss is None else None
        spec64 = float64_loss(loss if loss is not None else model.loss, weights)
        problem = loss_problem(twin, resolve_loss(twin, spec64), x64, as_float64(y), as_float64(sw), training)
    if problem.dtype != tf.float64:
        raise ValueError(f"the loss is computed in {problem.dtype.name}")
    value = problem.loss_at(problem.x)
    # The model's own loss carries its compute precision's round-off (float16 under mixed precision).
    rel_tol = min(0.1, max(1e-3, 100 * compute_eps(model)))
    if not math.isclose(value, reference, rel_tol=rel_tol, abs_tol=1e-5):
        raise ValueError(f"the copy's loss {value:.6g} differs from the model's {reference:.6g}")
    return problem


def _evaluation_model(
    model: keras.Model, spec: Any, loss: Any, x: Any, y: Any, sw: Any, training: bool
) -> tuple[LossProblem, str, list[str]]:
    """``(problem, dtype, notes)``: a float64 twin if it can be built and agrees with the model, else the model."""
    loss_fn = resolve_loss(model, loss)
    if compute_eps(model) <= EPS["float64"]:  # a float64 model is its own copy
        return loss_problem(model, loss_fn, x, y, sw, training), "float64", []
    try:
        # One eager pass gives the loss the copy must reproduce (cheaper than tracing the model).
        reference = float(loss_fn(model, x, y, model(x, training=training), sw, training))
        return _twin_problem(model, spec, loss, x, y, sw, training, reference), "float64", []
    except Exception as exc:  # whatever stops the copy, the model itself can still be checked
        own = loss_problem(model, loss_fn, x, y, sw, training)  # a tracing mistake surfaces here, by layer
        note = f"a float64 copy of the model was not possible ({short_error(exc)}), so the check ran in float32"
        return own, "float32", [note]


@leaves_no_trace
def check_gradients(
    model: keras.Model,
    x: Any,
    y: Any = None,
    loss: Any = None,
    tol: float = 1e-6,
    epsilon: float | None = None,
    max_directions: int = 4,
    seed: int = 0,
    training: bool = False,
    sample_weight: Any = None,
    verbose: bool = True,
) -> GradientCheck:
    """Check autodiff gradients against central finite differences.

    For each layer with trainable weights (all its weights as one vector) and
    for each float input, the autodiff directional derivative ``grad . v`` is
    compared with ``(L(w + h v) - L(w - h v)) / 2h`` along unit directions ``v``:
    every coordinate when the vector has at most ``max_directions`` entries,
    else ``max_directions`` random unit directions. The check runs on a float64
    copy of the model (weights copied, the loss computed in float64, compiled
    ``loss_weights`` applied); when no such copy can be built it runs on the
    model itself in float32 with the tolerance raised to 1e-2, and says why in
    ``notes``.

    A correct gradient is not failed for what finite differences cannot
    resolve: an error counts against the larger of its row's gradient and a
    hundredth of the whole model's (a BatchNormalization beta whose gradient is
    1e-8 of the others' is not judged on round-off), each difference is allowed
    its round-off, a failing row is measured again at ``10 h`` and ``h / 10``,
    and a row whose one-sided slopes keep differing as ``h`` shrinks (ReLU or
    ReLU6 at exactly 0, max-pool ties, an input at Masking's mask value) is
    reported as "not smooth here" - a point where the loss has no derivative
    to check - rather than as a failure. Such a row is not verified: a wrong
    derivative is caught where the loss is smooth (a factor, a sign, a missing
    term fail at every step, with one-sided slopes that agree), which on a
    network with kinks is usually another row or direction upstream.

    Piecewise-constant ops (``Round``, ``Floor``) pass: autodiff's zero agrees
    with the finite difference away from their jumps. ``tf.stop_gradient``
    fails the check: the finite difference sees the function, autodiff sees its
    gradient definition. Dropout in ``training=True`` is random, which no
    finite difference can follow.

    Cost: one backward pass, plus 2 forward passes per direction, i.e.
    ``2 * max_directions * (layers with weights + float inputs)`` forward passes
    whatever the size of the weights, plus 4 more per direction of a row that
    fails at ``h``, 6 that measure the loss's round-off, one eager pass of the
    model, and the traces of its float64 copy (loss, and loss with gradients).

    Args:
        model: A Keras 3 model. Sequential and Functional models (raw ops such
            as ``inp + h`` between layers, nested models and custom layers
            included) get a float64 copy by ``clone_model``, subclassed models
            one by ``from_config``.
        x: Inputs, as for :func:`gradmagic.weight_gradients`.
        y: Targets.
        loss: Defaults to ``None``: the compiled loss (with its
            ``loss_weights``). Otherwise as for :func:`gradmagic.weight_gradients`.
        tol: Largest relative error that passes. Defaults to 1e-6 (float64).
        epsilon: The step ``h``. Defaults to ``None``: 1e-5 in float64, 1e-3 in float32.
        max_directions: Directions per row. Defaults to 4: a wrong derivative
            (a factor, a sign, a missing term) shows along almost any direction,
            since its error and the gradient are projected alike; more
            directions cost 2 forward passes each per row and mostly re-measure
            the same relative error.
        seed: Seed of the random directions. Defaults to 0.
        training: Run layers in training mode. Defaults to ``False``.
        sample_weight: Optional per-sample weights of the loss. For the step a
            :class:`gradmagic.GradientMonitor` flagged: ``x, y, sw = monitor.bad_batch``
            then ``gradmagic.check_gradients(model, x, y, sample_weight=sw)``.
        verbose: Show a progress bar (``keras.utils.Progbar``) once the check
            has run for more than 2 seconds. Defaults to ``True``.

    Returns:
        A :class:`GradientCheck`: ``.passed``, ``.max_rel_error``, ``.rows``
        (one per layer with weights, then one per input), ``.failed``,
        ``.not_smooth``, ``.suspects``, ``to_dict()``, text and HTML tables.

    Raises:
        GradmagicError: A bad argument, x, y or loss, or a layer that cannot be traced.

    Example:
        >>> c = gradmagic.check_gradients(model, x, y)
        >>> c.passed, c.max_rel_error
    """
    check_model(model)
    refuse_array_loss(loss, "check_gradients")
    validate(tol, epsilon, max_directions)
    seed, training, verbose = check_seed(seed), check_flag("training", training), check_flag("verbose", verbose)
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
            eps = EPS["float64"] if dtype == "float64" else compute_eps(model)
            settings = {
                "epsilon": float(epsilon if epsilon is not None else STEP[dtype]),
                "tol": float(tol if dtype == "float64" else max(tol, FLOAT32_TOL)),
                "max_directions": int(max_directions),
                "dtype": dtype,
                "input_names": input_labels(x_in, spec),
                "rng": np.random.default_rng(int(seed)),
                "roundoff": 10 * eps,  # at least 10 eps |L| per loss value; more where measured so
                "noise_rng": np.random.default_rng(int(seed) + 1),  # its own stream: directions stay as seeded
                "progress": Progress(count_rows(model, problem), verbose, "row"),
            }
            value, rows = check_rows(model, problem, settings)
        except TracingFailed as failed:
            raise tracing_error(failed, model, "for the gradient check") from None
    settings["progress"].done()
    if dtype == "float32" and tol < FLOAT32_TOL:
        warnings.warn(f"check_gradients ran in float32: {notes[0]}; tol raised to {FLOAT32_TOL}.", stacklevel=2)
    found = suspects(model, rows, _ancestors(model, problem))
    return GradientCheck(model_name(model), rows, settings["tol"], dtype, settings["epsilon"], value, found, notes)


def _ancestors(model: keras.Model, problem: LossProblem) -> dict[int, set[int]] | None:
    """The layer graph of the evaluation model, if its layers line up with the model's."""
    if problem.recorder is None or [type(a) for a in problem.model.layers] != [type(b) for b in model.layers]:
        return None
    return layer_ancestors(problem.recorder)
