"""What the explorer shows for one input point: a plain function of the control values.

:func:`compute_view` asks the core for the numbers (the output and its input
derivative along one feature, the weight-gradient norms at the point) and calls
the user's reference curves; the panel in :mod:`~gradmagic.widgets.explorer`
only draws the :class:`ExplorerView` it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradmagic.core import input_gradients, weight_gradients
from gradmagic.plots import layer_norms
from gradmagic.widgets import explorer_args


@dataclass
class ExplorerView:
    """Everything the panel shows for one input point (all numbers from the core).

    Attributes:
        point: The input point, shape (n_features,).
        feature: Index of the feature the curves run along.
        unit: Index of the output unit shown.
        line: The feature's values along the curve.
        values: Output unit along the line.
        grads: d(output unit)/d(feature) along the line.
        point_feature, point_value, point_grad: The point's feature value, output
            and derivative.
        gradient: d(output unit)/d(input) at the point, all features.
        reference_values, reference_grads: The reference curves, or None.
        reference_point_grad: ``reference_grad`` at the point, or None.
        loss: The loss at the point (with targets), else the output unit's value.
        layer_norms: ``(label, norm, has_nan_or_inf)`` per layer with weights.
    """

    point: np.ndarray
    feature: int
    unit: int
    line: np.ndarray
    values: np.ndarray
    grads: np.ndarray
    point_feature: float
    point_value: float
    point_grad: float
    gradient: np.ndarray
    reference_values: np.ndarray | None
    reference_grads: np.ndarray | None
    loss: float
    layer_norms: list[tuple[str, float | None, bool]]
    reference_point_grad: float | None = None


def compute_view(
    model: Any,
    point: np.ndarray,
    feature: int,
    line: np.ndarray,
    unit: int = 0,
    target: Any = None,
    reference: Callable | None = None,
    reference_grad: Callable | None = None,
    training: bool = False,
) -> ExplorerView:
    """Compute what the explorer shows at ``point``: a plain function of the controls.

    Args:
        model: The Keras model (one flat float input).
        point: The input point, shape (n_features,).
        feature: The feature the curves run along.
        line: Values of that feature along the curves.
        unit: Output unit (index into the flattened per-sample output).
        target: The target for this point; with it the bars are dLoss/dW, without
            them d(output unit)/dW.
        reference: Optional ``f(points) -> values`` drawn dashed beside the model,
            called with an array (n, n_features).
        reference_grad: Optional ``g(points) -> d f/d feature``, called likewise;
            an (n, n_features) result is read at the feature's column.
        training: Run the model in training mode.

    Returns:
        An :class:`ExplorerView`.

    Raises:
        ComputeError: ``reference`` or ``reference_grad`` raised or returned
            something other than one finite value per point (chained).
    """
    points = np.repeat(point[None, :], len(line) + 1, axis=0)
    points[:-1, feature] = line
    # The references run first: a failing one then costs no gradient computation.
    ref_values = _reference(reference, "reference", points, feature)
    ref_grads = _reference(reference_grad, "reference_grad", points, feature)
    jac = input_gradients(model, points, output=unit, training=training)
    flat_values = _flat_unit(jac.values, unit)
    grads = np.asarray(jac.array)[:, feature]
    if target is not None:
        weights = weight_gradients(model, point[None, :], target, training=training)
    else:
        weights = weight_gradients(model, point[None, :], None, output=unit, training=training)
    return ExplorerView(
        point=point,
        feature=feature,
        unit=unit,
        line=line,
        values=flat_values[:-1],
        grads=grads[:-1],
        point_feature=float(point[feature]),
        point_value=float(flat_values[-1]),
        point_grad=float(grads[-1]),
        gradient=np.asarray(jac.array)[-1],
        reference_values=None if ref_values is None else ref_values[:-1],
        reference_grads=None if ref_grads is None else ref_grads[:-1],
        loss=float(weights.loss),
        layer_norms=layer_norms([weights]),
        reference_point_grad=None if ref_grads is None else float(ref_grads[-1]),
    )


def _flat_unit(values: Any, unit: int) -> np.ndarray:
    parts = values if isinstance(values, list) else [values]
    flat = np.concatenate([np.reshape(p, (p.shape[0], -1)) for p in parts], axis=1)
    return flat[:, unit]


def _reference(fn: Callable | None, name: str, points: np.ndarray, feature: int) -> np.ndarray | None:
    return None if fn is None else explorer_args.call_reference(fn, name, points, feature)
