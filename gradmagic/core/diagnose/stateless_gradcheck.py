"""Finite-difference gradient check on JAX and PyTorch: the framework's autodiff against central differences.

The same check as on TensorFlow (:mod:`~gradmagic.core.diagnose.gradcheck`),
on a float64 copy of the model (:mod:`~gradmagic.core.diagnose.float64`) whose
loss and gradients are the framework's own, compiled over the copy's variable
values (``jax.jit`` / eager PyTorch). On JAX, float64 needs JAX's x64 mode: the
whole check runs in ``jax.enable_x64(True)``, a context that restores the
user's setting when it ends (see ``float64_scope`` in
:mod:`gradmagic.core.backends.jax`). When no float64 copy can be built the
model itself is checked in float32 with a looser tolerance, every weight it
perturbs restored bit for bit. The comparison is
:mod:`~gradmagic.core.diagnose.differences`, shared by every backend.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from gradmagic.core.arguments import check_flag, check_seed
from gradmagic.core.backends import stateless_backend
from gradmagic.core.backends.keras_internals import float64_promotion
from gradmagic.core.batches import first_batch
from gradmagic.core.diagnose.arguments import refuse_array_loss
from gradmagic.core.diagnose.differences import LossProblem, check_rows, count_rows, is_float
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
from gradmagic.core.diagnose.stateless_explain import diagnosis_backend, keeps_random_state
from gradmagic.core.questions.entry import check_model, leaves_no_trace, prepare_loss_args, spec_and_inputs
from gradmagic.core.questions.targets import check_loss_argument, check_loss_structure, model_name, resolve_loss
from gradmagic.core.questions.trace_errors import short_error
from gradmagic.errors import ComputeError

__all__ = ["CheckRow", "GradientCheck", "check_gradients"]


@contextlib.contextmanager
def _float64(backend: Any) -> Iterator[None]:
    """The framework in float64 (JAX's x64 mode) and Keras' default float type float64; both restored after.

    Keras ops compute in ``floatx`` where it differs from their inputs' dtype,
    and Keras on JAX and PyTorch narrows float64 to float32 in its type
    promotion (see ``float64_promotion``): the copy runs where none of that applies.
    """
    with backend.float64_scope(), float64_default(), float64_promotion():
        yield


@contextlib.contextmanager
def _values_in_scope(model: keras.Model, trainable: list, non_trainable: list) -> Iterator[None]:
    """Run the block with the model's variables read from the given values; writes stay in the scope, dropped."""
    mapping = [*zip(model.trainable_variables, trainable), *zip(model.non_trainable_variables, non_trainable)]
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
        yield


def _tensors(structure: Any) -> Any:
    return keras.tree.map_structure(lambda t: None if t is None else keras.ops.convert_to_tensor(t), structure)


def stateless_problem(model: keras.Model, loss_fn: Any, x: Any, y: Any, sw: Any, training: bool) -> LossProblem:
    """The loss and its gradients at x as compiled functions of the model's current variable values.

    Each call reads the variables' values afresh, so a weight perturbed by
    assignment (and restored afterwards) is seen; the model runs in a
    ``keras.StatelessScope``, so nothing it writes (BatchNormalization
    statistics, a loss's trackers) reaches its variables.
    """
    base = stateless_backend()
    x, y, sw = _tensors(x), _tensors(y), _tensors(sw)
    structure = x

    def loss_of(trainable: list, non_trainable: list, leaves: list) -> Any:
        inputs = keras.tree.pack_sequence_as(structure, leaves)
        with _values_in_scope(model, trainable, non_trainable):
            return loss_fn(model, inputs, y, model(inputs, training=training), sw, training)

    floats = [i for i, leaf in enumerate(keras.tree.flatten(x)) if is_float(leaf)]

    def loss_of_floats(trainable: list, chosen: list, others: list, non_trainable: list) -> Any:
        leaves, picked = list(others), iter(chosen)
        leaves = [next(picked) if i in floats else leaf for i, leaf in enumerate(leaves)]
        return loss_of(trainable, non_trainable, leaves)

    value = base.compile(loss_of)
    gradient = base.compile(base.value_and_grad(loss_of_floats, argnums=(0, 1)))

    def loss_at(x: Any) -> float:
        leaves = keras.tree.flatten(x)
        trainable, non_trainable = base.values(model.trainable_variables), base.values(model.non_trainable_variables)
        return float(base.to_numpy(value(trainable, non_trainable, leaves)))

    def grads_at(x: Any) -> tuple:
        leaves = keras.tree.flatten(x)
        chosen = [leaves[i] for i in floats]
        trainable, non_trainable = base.values(model.trainable_variables), base.values(model.non_trainable_variables)
        loss, (grad_w, grad_x) = gradient(trainable, chosen, leaves, non_trainable)
        to_numpy = base.to_numpy
        return float(to_numpy(loss)), [to_numpy(g) for g in grad_w], [to_numpy(g) for g in grad_x]

    # One eager loss: its dtype tells whether the copy really computes in float64.
    values = base.values(model.trainable_variables), base.values(model.non_trainable_variables)
    first = loss_of(*values, keras.tree.flatten(x))
    dtype = keras.backend.standardize_dtype(first.dtype)
    return LossProblem(model, loss_at, grads_at, x, dtype, as_input=_like, value=float(base.to_numpy(first)))


def _like(value: np.ndarray, like: Any) -> Any:
    return keras.ops.convert_to_tensor(value, dtype=keras.backend.standardize_dtype(like.dtype))


def _twin_problem(
    model: keras.Model, spec: Any, loss: Any, x: Any, y: Any, sw: Any, training: bool, reference: float
) -> LossProblem:
    """The loss problem of a float64 copy of the model; raises whatever stops the copy or makes it disagree."""
    if keras.backend.result_type("float64", "float64") != "float64":
        raise ValueError("Keras on this backend computes float64 ops in float32 (its type promotion narrows them)")
    x64 = as_float64(x)
    with float64_default():  # layers built here default to float64 too
        twin = float64_twin(model, spec.input_structure, x64)
        if loss is None and getattr(model, "loss", None) is None:
            raise ValueError("the model computes its own loss (compute_loss), which cannot be moved to float64")
        weights = loss_weights(model) if loss is None else None
        spec64 = float64_loss(loss if loss is not None else model.loss, weights)
        problem = stateless_problem(
            twin, resolve_loss(twin, spec64, stateless=True), x64, as_float64(y), as_float64(sw), training
        )
    if problem.dtype != "float64":
        raise ValueError(f"the loss is computed in {problem.dtype}")
    value = problem.value
    # The model's own loss carries its compute precision's round-off (float16 under mixed precision).
    rel_tol = min(0.1, max(1e-3, 100 * compute_eps(model)))
    if not math.isclose(value, reference, rel_tol=rel_tol, abs_tol=1e-5):
        raise ValueError(f"the copy's loss {value:.6g} differs from the model's {reference:.6g}")
    return problem


def _evaluation_model(
    model: keras.Model, spec: Any, loss: Any, x: Any, y: Any, sw: Any, training: bool, backend: Any
) -> tuple[LossProblem, str, list[str]]:
    """``(problem, dtype, notes)``: a float64 twin if it can be built and agrees with the model, else the model."""
    loss_fn = resolve_loss(model, loss, stateless=True)
    own = stateless_problem(model, loss_fn, x, y, sw, training)  # a mistake in the model surfaces here
    if compute_eps(model) <= EPS["float64"]:  # a float64 model is its own copy
        return own, "float64", []
    reference = own.value  # eager: compiling the model's own loss is only needed if it is checked itself
    try:
        with _float64(backend):
            problem = _twin_problem(model, spec, loss, x, y, sw, training, reference)
        return problem, "float64", []
    except Exception as exc:  # whatever stops the copy, the model itself can still be checked
        note = f"a float64 copy of the model was not possible ({short_error(exc)}), so the check ran in float32"
        return own, "float32", [note]


@keeps_random_state
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
    """Check the framework's autodiff gradients against central finite differences (JAX, PyTorch).

    The same check, arguments and result as on TensorFlow: per layer with
    trainable weights and per float input, ``grad . v`` against
    ``(L(w + h v) - L(w - h v)) / 2h`` along unit directions, on a float64 copy
    of the model (its loss and gradients computed by ``jax.value_and_grad``
    under JAX's x64 mode, restored afterwards, or by ``torch.autograd``), or on
    the model itself in float32 (tolerance 1e-2) when no copy can be built.
    Rows where the loss has a kink (ReLU at 0, max-pool ties) are reported as
    "not smooth here", not as failures. The model is left unchanged: the copy
    is perturbed, or, in float32, the model's own weights, restored bit for bit.

    Args:
        model: A Keras 3 model.
        x: Inputs, as for :func:`gradmagic.weight_gradients`.
        y: Targets.
        loss: Defaults to ``None``: the compiled loss (with its ``loss_weights``).
        tol: Largest relative error that passes. Defaults to 1e-6 (float64).
        epsilon: The step ``h``. Defaults to ``None``: 1e-5 in float64, 1e-3 in float32.
        max_directions: Directions per row. Defaults to 4.
        seed: Seed of the random directions. Defaults to 0.
        training: Run layers in training mode. Defaults to ``False``.
        sample_weight: Optional per-sample weights of the loss.
        verbose: Show a progress bar once the check has run for more than 2 seconds. Defaults to ``True``.

    Returns:
        A :class:`GradientCheck`: ``.passed``, ``.max_rel_error``, ``.rows``,
        ``.failed``, ``.not_smooth``, ``.suspects``, ``to_dict()``, tables.

    Raises:
        GradmagicError: A bad argument, x, y or loss, or a model that fails on x.

    Example:
        >>> c = gradmagic.check_gradients(model, x, y)
        >>> c.passed, c.max_rel_error
    """
    check_model(model)
    backend = diagnosis_backend()
    refuse_array_loss(loss, "check_gradients")
    validate(tol, epsilon, max_directions)
    seed, training, verbose = check_seed(seed), check_flag("training", training), check_flag("verbose", verbose)
    check_loss_argument(model, loss)
    data = first_batch(x, y, sample_weight)
    stateless_backend().check_input(data.x)
    spec, x_in, batch = spec_and_inputs(model, data.x)
    check_loss_structure(model, spec.output_names, loss)
    y_in, sw_in = prepare_loss_args(model, spec, data.y, data.sample_weight, batch)
    resolve_loss(model, loss, stateless=True)  # a missing or unknown loss is reported before anything runs
    try:
        problem, dtype, notes = _evaluation_model(model, spec, loss, x_in, y_in, sw_in, training, backend)
    except Exception as exc:
        raise ComputeError(
            f"Received: x of shape {[tuple(np.shape(t)) for t in keras.tree.flatten(x_in)]} for model "
            f"'{model_name(model)}', on which computing the loss for the gradient check failed: "
            f"{short_error(exc)}. Expected a model and loss that run on x. Fix that layer or the loss. The model "
            f"was left unchanged."
        ) from None
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
    scope = _float64(backend) if dtype == "float64" else contextlib.nullcontext()
    with scope:  # the copy runs in float64 throughout (PyTorch runs its Python, and so Keras' settings, per call)
        value, rows = check_rows(model, problem, settings)
    settings["progress"].done()
    if dtype == "float32" and tol < FLOAT32_TOL:
        warnings.warn(f"check_gradients ran in float32: {notes[0]}; tol raised to {FLOAT32_TOL}.", stacklevel=2)
    found = suspects(model, rows, None)
    return GradientCheck(model_name(model), rows, settings["tol"], dtype, settings["epsilon"], value, found, notes)
