"""Autodiff against central finite differences, one row per layer's weights and per float input.

A :class:`LossProblem` holds the loss and its autodiff gradients as compiled
functions of one evaluation model (the float64 copy, or the model itself);
:func:`check_rows` compares them with ``(L(w + h v) - L(w - h v)) / 2h`` along
unit directions ``v``, restoring every weight it perturbs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.compute import dense_gradients, float_leaves
from gradmagic.core.gradcheck_results import CheckRow
from gradmagic.core.targets import model_name, weight_slots
from gradmagic.core.tracing import OpRecorder, concrete_function


@dataclass
class LossProblem:
    """The loss as functions of the weights and inputs of one evaluation model."""

    model: keras.Model
    loss_at: Callable[[Any], float]
    grads_at: Callable[[Any], tuple]
    x: Any
    dtype: tf.DType


def _flat(grad: Any, like: Any) -> np.ndarray:
    """A gradient as a float64 vector; a None gradient is zero (autodiff's claim)."""
    return np.zeros(int(np.prod(like.shape))) if grad is None else np.asarray(grad, "float64").ravel()


def loss_problem(model: keras.Model, loss_fn: Any, x: Any, y: Any, sw: Any, training: bool) -> LossProblem:
    """Trace the loss and its gradients at x; a failed trace raises :class:`~gradmagic.core.tracing.TracingFailed`."""
    recorder = OpRecorder(model.layers)
    variables = list(model.trainable_weights)

    @tf.function
    def loss_at(x: Any) -> Any:
        with recorder.recording():
            return loss_fn(model, x, y, model(x, training=training), sw, training)

    @tf.function
    def grads_at(x: Any) -> Any:
        sources = float_leaves(x)
        with tf.GradientTape() as tape:
            tape.watch(sources)
            loss = loss_fn(model, x, y, model(x, training=training), sw, training)
        grad_w, grad_x = dense_gradients(tape.gradient(loss, (variables, sources)))
        return loss, grad_w, grad_x

    x_tensors = keras.tree.map_structure(tf.convert_to_tensor, x)
    loss_concrete = concrete_function(loss_at, recorder, x_tensors)
    grads_concrete = grads_at.get_concrete_function(x_tensors)
    dtype = tf.as_dtype(loss_concrete.structured_outputs.dtype)
    return LossProblem(model, lambda x: float(loss_concrete(x)), lambda x: grads_concrete(x), x_tensors, dtype)


def _directions(size: int, max_directions: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    if size <= max_directions:
        return np.eye(size), "every entry"
    v = rng.standard_normal((max_directions, size))
    return v / np.linalg.norm(v, axis=1, keepdims=True), "random directions"


def _compare(autodiff: np.ndarray, numeric: np.ndarray, floor: float, tol: float) -> tuple[float, float, bool]:
    diff = autodiff - numeric
    scale = max(float(np.linalg.norm(autodiff)), float(np.linalg.norm(numeric)))
    rel = 0.0 if scale <= floor else float(np.linalg.norm(diff)) / scale
    return float(np.max(np.abs(diff), initial=0.0)), rel, rel <= tol


def _weight_row(problem: LossProblem, variables: list, h: float, dirs: np.ndarray) -> np.ndarray:
    """Central differences of the loss along each direction in the space of ``variables``."""
    saved = [v.numpy() for v in variables]
    sizes = [s.size for s in saved]

    def assign(step: np.ndarray) -> None:
        for var, value, part in zip(variables, saved, np.split(step, np.cumsum(sizes)[:-1]), strict=True):
            var.assign((value + part.reshape(value.shape)).astype(value.dtype))

    numeric = []
    try:
        for d in dirs:
            assign(h * d)
            plus = problem.loss_at(problem.x)
            assign(-h * d)
            numeric.append((plus - problem.loss_at(problem.x)) / (2 * h))
    finally:
        for var, value in zip(variables, saved, strict=True):
            var.assign(value)
    return np.asarray(numeric)


def _input_row(problem: LossProblem, position: int, h: float, dirs: np.ndarray) -> np.ndarray:
    leaves = keras.tree.flatten(problem.x)
    base = np.asarray(leaves[position])
    numeric = []
    for d in dirs:
        values = []
        for sign in (1.0, -1.0):
            shifted = list(leaves)
            shifted[position] = tf.constant(base + sign * h * d.reshape(base.shape), dtype=leaves[position].dtype)
            values.append(problem.loss_at(keras.tree.pack_sequence_as(problem.x, shifted)))
        numeric.append((values[0] - values[1]) / (2 * h))
    return np.asarray(numeric)


def _row(index: int | None, name: str, what: str, autodiff: np.ndarray, numeric: Callable, settings: dict) -> CheckRow:
    """Compare ``autodiff`` (a flat gradient) with ``numeric(directions)`` along the chosen directions."""
    dirs, mode = _directions(autodiff.size, settings["max_directions"], settings["rng"])
    errors = _compare(dirs @ autodiff, numeric(dirs), settings["floor"], settings["tol"])
    return CheckRow(index, name, what, autodiff.size, len(dirs), mode, *errors)


def check_rows(original: keras.Model, problem: LossProblem, settings: dict) -> tuple[float, list[CheckRow]]:
    """Compare autodiff with finite differences per layer, then per float input."""
    h = settings["epsilon"]
    loss, grad_w, grad_x = problem.grads_at(problem.x)
    loss = float(loss)
    # Below this, both sides are round-off: call them equal rather than divide noise by noise.
    settings["floor"] = 10 * float(np.finfo(settings["dtype"]).eps) * max(1.0, abs(loss)) / h
    variables = list(problem.model.trainable_weights)
    by_layer: dict[int, list[int]] = {}
    for i, slot in enumerate(weight_slots(original)):
        by_layer.setdefault(slot.layer_index, []).append(i)
    rows = []
    for index, members in sorted(by_layer.items()):
        chosen = [variables[i] for i in members]
        autodiff = np.concatenate([_flat(grad_w[i], variables[i]) for i in members])
        name = original.layers[index].name if index >= 0 else model_name(original)
        what = ", ".join(v.name for v in chosen)
        rows.append(_row(index, name, what, autodiff, functools.partial(_weight_row, problem, chosen, h), settings))
    leaves = keras.tree.flatten(problem.x)
    floats = [i for i, t in enumerate(leaves) if t.dtype.is_floating]
    for k, position in enumerate(floats):
        autodiff = _flat(grad_x[k], leaves[position])
        numeric = functools.partial(_input_row, problem, position, h)
        rows.append(_row(None, settings["input_names"][position], "input", autodiff, numeric, settings))
    return loss, rows
