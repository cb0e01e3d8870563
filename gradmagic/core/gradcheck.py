"""Finite-difference gradient check: autodiff against central differences, in float64 where possible.

The model is copied into float64 (``keras.models.clone_model`` with every layer
rebuilt under a float64 dtype policy, the weights copied), so the differences
are not drowned in float32 round-off and the user's model is never touched.
When a model cannot be copied (a subclassed model, a custom layer without a
complete ``get_config``, a layer hard-coding float32) the check runs on the
model itself in float32 with a looser tolerance, restoring every weight it
perturbs bit for bit.
"""

from __future__ import annotations

import functools
import html
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.autodiff import (
    OpRecorder,
    TracingFailed,
    concrete_function,
    dense,
    html_table,
    text_table,
)
from gradmagic.core.gradients import check_model, prepare_loss_args, spec_and_inputs
from gradmagic.core.state import preserved_eagerly
from gradmagic.core.targets import model_name, resolve_loss, weight_slots
from gradmagic.core.trace_errors import diagnose_trace_error, short_error
from gradmagic.errors import ComputeError, InputError, brief

#: Step and tolerance floor per precision: central differences err by O(h^2) + O(eps / h).
_STEP = {"float64": 1e-5, "float32": 1e-3}
_FLOAT32_TOL = 1e-2


@dataclass(frozen=True)
class CheckRow:
    """Autodiff against finite differences for one layer's weights or one input.

    Attributes:
        index: The layer's index in ``model.layers``; ``None`` for an input.
        name: The layer's name, or the input's.
        what: The weights checked (``"kernel, bias"``) or ``"input"``.
        size: Number of entries checked.
        directions: How many directions were compared.
        mode: ``"every entry"`` (unit vectors) or ``"random directions"``.
        max_abs_error: Largest ``|grad . v - (L(w + hv) - L(w - hv)) / 2h|``.
        rel_error: ``||a - f|| / max(||a||, ||f||)`` over the directions (``a``
            autodiff, ``f`` finite differences); 0 when both are at round-off level.
        passed: ``rel_error <= tol``.
    """

    index: int | None
    name: str
    what: str
    size: int
    directions: int
    mode: str
    max_abs_error: float
    rel_error: float
    passed: bool


_COLUMNS = tuple(f.name for f in fields(CheckRow))


@dataclass(eq=False)
class GradientCheck:
    """The result of :func:`check_gradients`.

    Attributes:
        model: The model's name.
        rows: One :class:`CheckRow` per layer with trainable weights, then one per float input.
        tol: The tolerance applied to ``rel_error``.
        dtype: ``"float64"`` (a float64 copy of the model) or ``"float32"``.
        epsilon: The finite-difference step ``h``.
        loss: The loss at (x, y), in ``dtype``.
        suspects: When the check fails, the layers (``"3 'name'"``) where the wrong
            gradient most likely enters: from the deepest failing layer up to the
            next layer whose weights check out, in model order.
        notes: Why the check fell back to float32, and other caveats.
    """

    model: str
    rows: list[CheckRow]
    tol: float
    dtype: str
    epsilon: float
    loss: float
    suspects: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every row is within the tolerance."""
        return all(row.passed for row in self.rows)

    @property
    def max_rel_error(self) -> float:
        """The largest relative error over all rows."""
        return max((row.rel_error for row in self.rows), default=0.0)

    @property
    def failed(self) -> list[CheckRow]:
        """The rows over the tolerance."""
        return [row for row in self.rows if not row.passed]

    def _advice(self) -> str:
        if self.passed or not self.suspects:
            return ""
        return (
            f"The wrong gradient enters at one of the layers {', '.join(self.suspects)}: backpropagation spoils "
            f"every row before the layer that computes it wrongly (look for custom gradients and non-smooth ops)."
        )

    def to_dict(self) -> dict[str, list]:
        """Columns of equal length, one per :class:`CheckRow` field."""
        return {name: [getattr(row, name) for row in self.rows] for name in _COLUMNS}

    def _title(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (
            f"Gradient check of model '{self.model}': {verdict} (max relative error {self.max_rel_error:.3g}, "
            f"tol {self.tol:g}, {self.dtype}, h = {self.epsilon:g}, loss = {self.loss:.6g})"
        )

    def _cells(self, row: CheckRow) -> list[Any]:
        values = [getattr(row, name) for name in _COLUMNS]
        return [f"{v:.3g}" if isinstance(v, float) else ("ok" if v is True else "FAIL" if v is False else v)
                for v in values]  # fmt: skip

    def _footer(self) -> list[str]:
        return [self._advice()] * bool(self._advice()) + [f"Note: {n}" for n in self.notes]

    def __repr__(self) -> str:
        table = text_table(self._title(), _COLUMNS, [self._cells(r) for r in self.rows])
        return "\n".join([table, *self._footer()])

    def _repr_html_(self) -> str:
        bad = "background:#ffd6d6;color:#900;font-weight:bold"
        styles = [("ok", "") if r.passed else ("failed", bad) for r in self.rows]
        table = html_table(self._title(), _COLUMNS, [self._cells(r) for r in self.rows], styles)
        return table + "".join(f"<p>{html.escape(line)}</p>" for line in self._footer())


# --- a float64 twin of the model ---------------------------------------------------------------------------------


def _float64_layer(layer: keras.Layer) -> keras.Layer:
    """Rebuild one layer from its config under a float64 dtype policy."""
    if isinstance(layer, keras.layers.Lambda):
        # get_config stores a lambda as bytecode that safe mode refuses to load: reuse the function itself.
        config = layer.get_config()
        shape = config.get("output_shape")
        if isinstance(shape, dict):  # a serialized shape function; Lambda has no public accessor for it
            shape = getattr(layer, "_output_shape", None)
        return keras.layers.Lambda(
            layer.function, output_shape=shape, mask=layer.mask, arguments=layer.arguments, name=layer.name,
            dtype="float64",
        )  # fmt: skip
    return type(layer).from_config({**layer.get_config(), "dtype": "float64"})


def _float64_twin(model: keras.Model, input_structure: Any, sample: Any) -> keras.Model:
    """A float64 copy of the model with the same weights; raises whatever stops the copy.

    ``sample`` (float64 inputs) builds the layers that Keras could not build
    symbolically, which also raises the real error of a layer that fails in float64.
    """
    if input_structure is None:
        raise ValueError("the model declares no inputs (a subclassed model), so clone_model cannot copy it")
    inputs = keras.tree.map_structure(
        lambda t: keras.Input(
            batch_shape=t.shape, dtype="float64" if "float" in str(t.dtype) else t.dtype, name=t.name
        ),
        input_structure,
    )
    twin = keras.models.clone_model(model, input_tensors=inputs, clone_function=_float64_layer, recursive=True)
    if len(twin.weights) != len(model.weights):
        twin(sample, training=False)
    if [tuple(v.shape) for v in twin.trainable_weights] != [tuple(v.shape) for v in model.trainable_weights]:
        raise ValueError("the copy's trainable weights do not line up with the model's")
    values = model.get_weights()
    twin.set_weights([v.astype("float64") if v.dtype.kind == "f" else v for v in values])
    low = [v.path for v in twin.weights if v.dtype != "float64" and "float" in str(v.dtype)]
    if low:
        raise ValueError(f"weights {low[:3]} stayed in lower precision")
    return twin


class _Float64FunctionLoss(keras.losses.Loss):
    """A plain ``f(y_true, y_pred)`` computed in float64 (Keras losses compute in floatx by default)."""

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        super().__init__(name=getattr(fn, "__name__", "loss"), dtype="float64")
        self._fn = fn

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self._fn(y_true, y_pred)


def _float64_loss(spec: Any) -> Any:
    """The same loss spec with every loss computing in float64 where it can."""
    if isinstance(spec, dict):
        return {key: _float64_loss(value) for key, value in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [_float64_loss(value) for value in spec]
    if isinstance(spec, str):
        spec = keras.losses.get(spec)
    if isinstance(spec, keras.losses.Loss):
        try:
            return type(spec).from_config({**spec.get_config(), "dtype": "float64"})
        except Exception:  # a custom Loss without a dtype argument keeps its own precision
            return spec
    return _Float64FunctionLoss(spec) if callable(spec) else spec


def _as_float64(structure: Any) -> Any:
    return keras.tree.map_structure(
        lambda t: None if t is None else (np.asarray(t, "float64") if np.asarray(t).dtype.kind == "f" else t),
        structure,
    )


# --- finite differences ------------------------------------------------------------------------------------------


@dataclass
class _Problem:
    """The loss as functions of the weights and inputs of one evaluation model."""

    model: keras.Model
    loss_at: Callable[[Any], float]
    grads_at: Callable[[Any], tuple]
    x: Any
    dtype: tf.DType


def _float_leaves(x: Any) -> list:
    return [t for t in keras.tree.flatten(x) if t.dtype.is_floating]


def _flat(grad: Any, like: Any) -> np.ndarray:
    """A gradient as a float64 vector; a None gradient is zero (autodiff's claim)."""
    return np.zeros(int(np.prod(like.shape))) if grad is None else np.asarray(grad, "float64").ravel()


def _problem(model: keras.Model, loss_fn: Any, x: Any, y: Any, sw: Any, training: bool) -> _Problem:
    recorder = OpRecorder(model.layers)
    variables = list(model.trainable_weights)

    @tf.function
    def loss_at(x: Any) -> Any:
        with recorder.recording():
            return loss_fn(model, x, y, model(x, training=training), sw, training)

    @tf.function
    def grads_at(x: Any) -> Any:
        sources = _float_leaves(x)
        with tf.GradientTape() as tape:
            tape.watch(sources)
            loss = loss_fn(model, x, y, model(x, training=training), sw, training)
        grad_w, grad_x = dense(tape.gradient(loss, (variables, sources)))
        return loss, grad_w, grad_x

    x_tensors = keras.tree.map_structure(tf.convert_to_tensor, x)
    loss_concrete = concrete_function(loss_at, recorder, x_tensors)
    grads_concrete = grads_at.get_concrete_function(x_tensors)
    dtype = tf.as_dtype(loss_concrete.structured_outputs.dtype)
    return _Problem(model, lambda x: float(loss_concrete(x)), lambda x: grads_concrete(x), x_tensors, dtype)


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


def _weight_row(problem: _Problem, variables: list, h: float, dirs: np.ndarray) -> np.ndarray:
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


def _input_row(problem: _Problem, position: int, h: float, dirs: np.ndarray) -> np.ndarray:
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


def _rows(original: keras.Model, problem: _Problem, settings: dict) -> tuple[float, list[CheckRow]]:
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


def _evaluation_model(model: keras.Model, spec: Any, loss: Any, x: Any, y: Any, sw: Any, training: bool) -> tuple:
    """``(problem, dtype, notes)``: a float64 twin if it can be built and agrees with the model, else the model."""
    own = _problem(model, resolve_loss(model, loss), x, y, sw, training)  # tracing mistakes surface here
    if own.dtype == tf.float64:
        return own, "float64", []
    try:
        x64 = _as_float64(x)
        twin = _float64_twin(model, spec.input_structure, x64)
        loss_spec = loss if loss is not None else getattr(model, "loss", None)
        loss_fn = resolve_loss(twin, _float64_loss(loss_spec) if loss_spec is not None else None)
        problem = _problem(twin, loss_fn, x64, _as_float64(y), _as_float64(sw), training)
        value, reference = problem.loss_at(problem.x), own.loss_at(own.x)
        if not math.isclose(value, reference, rel_tol=1e-3, abs_tol=1e-5):
            raise ValueError(f"the copy's loss {value:.6g} differs from the model's {reference:.6g}")
        if problem.dtype != tf.float64:
            raise ValueError(f"the loss is computed in {problem.dtype.name}")
        return problem, "float64", []
    except Exception as exc:  # whatever stops the copy, the model itself can still be checked
        note = f"a float64 copy of the model was not possible ({short_error(exc)}), so the check ran in float32"
        return own, "float32", [note]


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
    spec, x_in, batch = spec_and_inputs(model, x)
    y_in, sw_in = prepare_loss_args(model, spec, y, sample_weight, batch)
    resolve_loss(model, loss)  # a missing or unknown loss is reported before anything runs
    with preserved_eagerly(model):  # the float32 fallback perturbs the model's own weights
        try:
            problem, dtype, notes = _evaluation_model(model, spec, loss, x_in, y_in, sw_in, training)
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
            value, rows = _rows(model, problem, settings)
        except TracingFailed as failed:
            raise diagnose_trace_error(failed.cause, model, failed.layer_index) or ComputeError(
                f"Tracing model '{model_name(model)}' for the gradient check failed: {brief(failed.cause)} The model "
                f"was left unchanged."
            ) from None
    if dtype == "float32" and tol < _FLOAT32_TOL:
        warnings.warn(f"check_gradients ran in float32: {notes[0]}; tol raised to {_FLOAT32_TOL}.", stacklevel=2)
    suspects = _suspects(model, rows)
    return GradientCheck(model_name(model), rows, settings["tol"], dtype, settings["epsilon"], value, suspects, notes)
