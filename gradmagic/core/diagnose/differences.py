"""Autodiff against central finite differences, one row per layer's weights and per float input (any backend).

A :class:`LossProblem` holds the loss and its autodiff gradients as compiled
functions of one evaluation model (the float64 copy, or the model itself),
built per framework (TensorFlow: :mod:`~gradmagic.core.diagnose.finite_differences`;
JAX and PyTorch: :mod:`~gradmagic.core.diagnose.stateless_gradcheck`);
:func:`check_rows` compares them with ``(L(w + h v) - L(w - h v)) / 2h`` along
unit directions ``v``, restoring every weight it perturbs.

What tells a wrong derivative from a hard place to take one:

- scale: an error counts against the larger of its row's gradient and a
  hundredth of the whole model's, so a weight whose gradient is 1e-8 of the
  others' is not failed for round-off that is negligible for training;
- round-off: each difference is allowed the loss's own round-off over ``h``:
  measured on the float64 copy (a deep network's loss can be far from
  eps-exact), at least ``10 eps |L|`` (``eps`` of the lowest precision the
  model computes in);
- steps: a row that fails at ``h`` is measured again at ``10 h`` and ``h / 10``
  and judged at the step where autodiff agrees best (a step may straddle a
  ReLU kink that a smaller one avoids, or be too small for float32);
- kinks: where the one-sided slopes ``(L(w + hv) - L(w)) / h`` and
  ``(L(w) - L(w - hv)) / h`` keep differing as ``h`` shrinks, the loss is not
  differentiable along ``v`` at this point (ReLU at exactly 0, max-pool ties,
  Masking): such directions are not judged, and a row that fails only along
  them is reported as "not smooth here", not as a failure. A wrong derivative
  where the loss is smooth stays a failure: its error does not depend on the
  step, and the one-sided slopes agree.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from gradmagic.core.diagnose.gradcheck_results import FAIL, NOT_SMOOTH, OK, CheckRow
from gradmagic.core.questions.targets import model_name, weight_slots
from gradmagic.core.snapshots import values_restored

#: An error counts against max(row's gradient, _MODEL_SHARE * the whole model's gradient).
_MODEL_SHARE = 0.01
#: Extra steps (as multiples of h) tried on a row that fails at h.
_LADDER = (10.0, 0.1)


@dataclass
class LossProblem:
    """The loss as functions of the weights and inputs of one evaluation model (any backend).

    Attributes:
        model: The evaluation model (the float64 copy, or the model itself); its
            variables are perturbed by assignment and restored bit for bit.
        loss_at: The loss at inputs x, as a float, with the variables' current values.
        grads_at: ``(loss, gradients of the trainable weights, gradients of the float inputs)`` at x.
        x: The inputs, as the framework takes them.
        dtype: The loss's dtype (a framework dtype or its name).
        recorder: TensorFlow only: the loss's trace (which layer's ops are whose).
        as_input: Turns a NumPy array into an input leaf like a given one. Defaults
            to ``None``: the array itself.
        value: The loss at ``x`` with the variables as they were, if already computed.
    """

    model: keras.Model
    loss_at: Callable[[Any], float]
    grads_at: Callable[[Any], tuple]
    x: Any
    dtype: Any
    recorder: Any = None
    as_input: Callable[[np.ndarray, Any], Any] | None = None
    value: float | None = None


def is_float(value: Any) -> bool:
    """True for a floating-point tensor or array of any framework."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and "float" in keras.backend.standardize_dtype(dtype)


def float_positions(x: Any) -> list[int]:
    """Positions of the float leaves of a structure of inputs, in flatten order."""
    return [i for i, leaf in enumerate(keras.tree.flatten(x)) if is_float(leaf)]


def _flat(grad: Any, like: Any) -> np.ndarray:
    """A gradient as a float64 vector; a None gradient is zero (autodiff's claim)."""
    return np.zeros(int(np.prod(like.shape))) if grad is None else np.asarray(grad, "float64").ravel()


def _directions(size: int, max_directions: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    if size <= max_directions:
        return np.eye(size), "every entry"
    v = rng.standard_normal((max_directions, size))
    return v / np.linalg.norm(v, axis=1, keepdims=True), "random directions"


@dataclass
class _Differences:
    """Loss values at ``w ± h v`` for each direction ``v``, and what they give."""

    h: float
    plus: np.ndarray
    minus: np.ndarray
    base: float

    @property
    def central(self) -> np.ndarray:
        return (self.plus - self.minus) / (2 * self.h)

    @property
    def jump(self) -> np.ndarray:
        """``|forward slope - backward slope|``: about ``h |L''|`` where the loss is smooth."""
        return np.abs(self.plus - 2 * self.base + self.minus) / self.h


def _weight_values(problem: LossProblem, variables: list, h: float, dirs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Loss at ``w + h v`` and ``w - h v`` for each direction ``v`` in the space of ``variables``."""
    with values_restored(variables) as saved:
        sizes = [s.size for s in saved]

        def assign(step: np.ndarray) -> None:
            for var, value, part in zip(variables, saved, np.split(step, np.cumsum(sizes)[:-1]), strict=True):
                var.assign((value + part.reshape(value.shape)).astype(value.dtype))

        values = []
        for d in dirs:
            pair = []
            for sign in (1.0, -1.0):
                assign(sign * h * d)
                pair.append(problem.loss_at(problem.x))
            values.append(pair)
    return tuple(np.asarray(values).reshape(-1, 2).T)


def _input_values(problem: LossProblem, position: int, h: float, dirs: np.ndarray) -> tuple[np.ndarray, ...]:
    leaves = keras.tree.flatten(problem.x)
    base = np.asarray(leaves[position])
    values = []
    for d in dirs:
        pair = []
        for sign in (1.0, -1.0):
            shifted = list(leaves)
            value = (base + sign * h * d.reshape(base.shape)).astype(base.dtype)
            shifted[position] = value if problem.as_input is None else problem.as_input(value, leaves[position])
            pair.append(problem.loss_at(keras.tree.pack_sequence_as(problem.x, shifted)))
        values.append(pair)
    return tuple(np.asarray(values).reshape(-1, 2).T)


@dataclass
class _Judged:
    """One row's verdict at its best step."""

    status: str
    h: float
    max_abs_error: float
    rel_error: float


def _judge(autodiff: np.ndarray, diffs: list[_Differences], scale_floor: float, settings: dict) -> _Judged:
    """Compare the autodiff directional derivatives with the differences at each step; keep the best step."""
    best = None
    for d in diffs:
        error = autodiff - d.central
        scale = max(float(np.linalg.norm(autodiff)), float(np.linalg.norm(d.central)), scale_floor)
        beyond = np.maximum(np.abs(error) - settings["noise"] / d.h, 0.0)
        rel = 0.0 if scale == 0 else float(np.linalg.norm(beyond)) / scale
        judged = _Judged(OK if rel <= settings["tol"] else FAIL, d.h, float(np.max(np.abs(error), initial=0)), rel)
        if best is None or judged.rel_error < best.rel_error:
            best = judged
    if best.status == OK or len(diffs) < 3:
        return best
    # Still failing at every step: is the loss differentiable along these directions at all?
    steps = sorted(diffs, key=lambda d: d.h)
    small, at_h, large = steps[0], next(d for d in diffs if d.h == settings["epsilon"]), steps[-1]
    # Where the loss is smooth the jump shrinks in proportion to h (10x per step); a kink keeps it,
    # a jump in L itself makes it grow.
    kink = np.zeros(autodiff.shape, bool)
    noise = settings["noise"]  # the jump adds the round-off of three losses
    for finer, coarser in itertools.pairwise(steps):
        kink |= (finer.jump > 4 * noise / finer.h) & (finer.jump > 0.25 * coarser.jump)
    # Central differences converge like h^2 where it is smooth: from h to h/10 they move 1/100 of what
    # they moved from 10h to h. Much more means a kink lies between the steps.
    late, early = np.abs(at_h.central - small.central), np.abs(large.central - at_h.central)
    kink |= late > np.maximum(0.1 * early, 4 * noise / small.h)
    # Along a direction with a kink the loss has no derivative to compare with: at exactly 0, ReLU's
    # gradient is 0 by convention while the one-sided slopes see the unit switch on or stay off, and
    # several such units can pull the difference anywhere between them. Only smooth directions are judged.
    error = autodiff - at_h.central
    unexplained = np.where(kink, 0.0, np.abs(error))
    scale = max(float(np.linalg.norm(autodiff)), float(np.linalg.norm(at_h.central)), scale_floor)
    beyond = np.maximum(unexplained - noise / at_h.h, 0.0)
    rel = 0.0 if scale == 0 else float(np.linalg.norm(beyond)) / scale
    if kink.any() and rel <= settings["tol"]:
        return _Judged(NOT_SMOOTH, at_h.h, float(np.max(np.abs(error), initial=0)), rel)
    return best


def _row(
    index: int | None, name: str, what: str, autodiff: np.ndarray, values: Callable, model_norm: float, settings: dict
) -> CheckRow:
    """Compare ``autodiff`` (a flat gradient) with the loss differences ``values(h, directions)``."""
    dirs, mode = _directions(autodiff.size, settings["max_directions"], settings["rng"])
    along = dirs @ autodiff
    # The model's gradient seen through the same number of unit directions of this row's size.
    scale_floor = _MODEL_SHARE * model_norm * np.sqrt(len(dirs) / autodiff.size)
    h, base = settings["epsilon"], settings["loss"]
    diffs = [_Differences(h, *values(h, dirs), base)]
    judged = _judge(along, diffs, scale_floor, settings)
    if judged.status == FAIL:
        diffs += [_Differences(h * k, *values(h * k, dirs), base) for k in _LADDER]
        judged = _judge(along, diffs, scale_floor, settings)
    settings["progress"]()
    return CheckRow(
        index=index, name=name, what=what, size=autodiff.size, directions=len(dirs), mode=mode,
        max_abs_error=judged.max_abs_error, rel_error=judged.rel_error, passed=judged.status != FAIL,
        status=judged.status, step=judged.h,
    )  # fmt: skip


def _norm(arrays: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a))) for a in arrays)))


def _loss_noise(problem: LossProblem, variables: list, settings: dict) -> float:
    """How much one loss value is off from round-off alone, measured rather than assumed.

    A deep network's loss can be far from eps-exact (a LayerNorm over values
    with a large common offset cancels most digits). Along random directions
    over every weight, ``L(w + sv) + L(w - sv) - 2 L(w)`` is ``s^2 L''`` (below
    1e-17 for steps of 1e-9) plus round-off: no autodiff in it, so a wrong
    gradient cannot hide in the allowance. The largest of three is the
    allowance for one loss value. In float32 such a step is below the weights'
    resolution and moves nothing: the eps-based floor applies.
    """
    if not variables or settings["dtype"] != "float64":
        return 0.0
    size = sum(int(np.prod(v.shape)) for v in variables)
    moved = []
    for _ in range(3):
        v = settings["noise_rng"].standard_normal(size)
        (plus,), (minus,) = _weight_values(problem, variables, 1e-9, (v / np.linalg.norm(v))[None, :])
        moved.append(abs(plus + minus - 2 * settings["loss"]))
    return max(moved)


def count_rows(original: keras.Model, problem: LossProblem) -> int:
    """How many rows :func:`check_rows` will produce (for a progress bar)."""
    layers = {slot.layer_index for slot in weight_slots(original)}
    return len(layers) + len(float_positions(problem.x))


def check_rows(original: keras.Model, problem: LossProblem, settings: dict) -> tuple[float, list[CheckRow]]:
    """Compare autodiff with finite differences per layer, then per float input."""
    loss, grad_w, grad_x = problem.grads_at(problem.x)
    settings["loss"] = loss = float(loss)
    settings.setdefault("progress", lambda: None)
    variables = list(problem.model.trainable_weights)
    flat_w = [_flat(g, v) for g, v in zip(grad_w, variables, strict=True)]
    floor = settings["roundoff"] * max(1.0, abs(loss))
    settings["noise"] = max(floor, _loss_noise(problem, variables, settings))
    by_layer: dict[int, list[int]] = {}
    for i, slot in enumerate(weight_slots(original)):
        by_layer.setdefault(slot.layer_index, []).append(i)
    rows, weights_norm = [], _norm(flat_w)
    for index, members in sorted(by_layer.items()):
        chosen = [variables[i] for i in members]
        autodiff = np.concatenate([flat_w[i] for i in members])
        name = original.layers[index].name if index >= 0 else model_name(original)
        what = ", ".join(v.name for v in chosen)
        values = functools.partial(_weight_values, problem, chosen)
        rows.append(_row(index, name, what, autodiff, values, weights_norm, settings))
    leaves = keras.tree.flatten(problem.x)
    floats = float_positions(problem.x)
    flat_x = [_flat(grad_x[k], leaves[position]) for k, position in enumerate(floats)]
    inputs_norm = _norm(flat_x)
    for autodiff, position in zip(flat_x, floats, strict=True):
        values = functools.partial(_input_values, problem, position)
        rows.append(_row(None, settings["input_names"][position], "input", autodiff, values, inputs_norm, settings))
    return loss, rows
