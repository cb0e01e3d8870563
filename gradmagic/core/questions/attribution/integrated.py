"""Integrated gradients (Sundararajan et al., 2017), with the check that says whether the path was fine enough.

The whole path runs in batched calls of one compiled, cached function (see
:mod:`gradmagic.core.questions.attribution.engine`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import keras
import numpy as np

from gradmagic.core.arguments import check_seed, is_int
from gradmagic.core.questions.attribution.arguments import (
    check_batch_size,
    check_output,
    chunks,
    points_per_call,
    requested_units,
    single_input,
    warn_disconnected,
    what_is_explained,
)
from gradmagic.core.questions.attribution.baselines import make_baseline
from gradmagic.core.questions.attribution.engine import engine
from gradmagic.core.questions.attribution.results import GAP_TOLERANCE, IntegratedGradients
from gradmagic.core.questions.entry import leaves_no_trace
from gradmagic.core.questions.inputs import nonfinite_warning
from gradmagic.core.questions.targets import model_name
from gradmagic.errors import GradmagicWarning, InputError

#: Quadrature rules for the path integral.
METHODS = ("trapezoid", "midpoint", "left", "right")


def path_rule(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions on the path (0 = baseline, 1 = x) and quadrature weights summing to 1.

    ``"trapezoid"``: ``steps`` points from 0 to 1, both ends included, halved
    weights at the ends. ``"midpoint"``, ``"left"``, ``"right"``: ``steps``
    equal intervals, the gradient at their middle, left or right end.
    """
    if method == "trapezoid":
        alphas = np.linspace(0.0, 1.0, steps)
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
        return alphas, weights
    offset = {"midpoint": 0.5, "left": 0.0, "right": 1.0}[method]
    return (np.arange(steps) + offset) / steps, np.full(steps, 1.0 / steps)


def _check_path(method: Any, steps: Any) -> tuple[str, int]:
    if method not in METHODS:
        raise InputError(
            f"Received: method={method!r}. Expected one of {', '.join(map(repr, METHODS))}; the default "
            f"'trapezoid' takes the gradient at both ends of the path too."
        )
    least = 2 if method == "trapezoid" else 1
    if not is_int(steps) or steps < least:
        raise InputError(
            f"Received: steps={steps!r}. Expected an int >= {least} for method={method!r}: the number of points "
            f"on the path where the gradient is taken. Fix: e.g. steps=50 (more steps, smaller completeness gap)."
        )
    return method, int(steps)


def suggested_steps(steps: int, relative_gap: float) -> int:
    """A step count expected to bring the relative gap under 5%, rounded up to a multiple of 10 (at most 100,000).

    On a smooth path the trapezoid and midpoint rules' error falls as
    1/steps**2, the left and right rules' as 1/steps; on a ReLU network a
    kink on the path, or a gradient at an end point unlike its neighbours
    (see ``method``), leaves every rule at 1/steps. The suggestion assumes the
    slower 1/steps, with a margin of 1.2.
    """
    return int(min(100_000, math.ceil(steps * relative_gap / GAP_TOLERANCE * 1.2 / 10) * 10))


@leaves_no_trace
def integrated_gradients(
    model: keras.Model,
    x: Any,
    output: int | None = None,
    baseline: Any = None,
    steps: int = 50,
    method: str = "trapezoid",
    seed: int = 0,
    batch_size: int | None = None,
    keep_path_gradients: bool = False,
) -> IntegratedGradients:
    """Integrated gradients: how much each input entry moved one output unit from the baseline to x.

    The attribution of entry j is ``(x_j - b_j) * integral_0^1 df/dx_j(b + a (x - b)) da``
    (Sundararajan et al., 2017), the integral taken with ``steps`` points on
    the straight path from the baseline b to x. The attributions add up to
    ``f(x) - f(b)`` when the integral is exact: the result checks that
    (``completeness_gap``) and warns, with a step count to try, when it is off
    by more than 5%. Every point of the path runs in batched calls of one
    compiled, cached function.

    Args:
        model: A Keras 3 model with a single float input.
        x: Inputs with a batch axis (one sample may omit it), or a dataset or
            generator (its first batch).
        output: The output unit to explain: an index into the flattened
            per-sample output. Defaults to ``None``: the predicted class
            (argmax of the output at x) per sample, or the only unit.
        baseline: Where the path starts. ``None`` or ``"zeros"`` (the default):
            all zeros. ``"blur"``: a Gaussian blur of each image (x of shape
            ``(batch, H, W, C)``; sigma = 0.1 * max(H, W) pixels, kernel cut at
            3 sigma, borders reflected, each channel blurred on its own).
            ``"uniform"``: uniform noise between each sample's smallest and
            largest value (``seed``). Or an array broadcastable to x's shape or
            to one sample's shape.
        steps: Points on the path where the gradient is taken. Defaults to 50.
        method: Quadrature rule: ``"trapezoid"`` (the default; both ends
            included, so ``path_outputs`` runs from f(baseline) to f(x)),
            ``"midpoint"``, ``"left"`` or ``"right"`` (the paper's Riemann sum).
            From a zeros baseline, a ReLU network's gradient at the baseline
            itself can be 0 (every unit at 0, where ReLU's derivative is taken
            as 0) although it is not just beside it: the trapezoid rule then
            misses its first half-step, 1 / (2 (steps - 1)) of the integral on
            a bias-free net; ``"midpoint"`` never evaluates the ends.
        seed: Seed of the ``"uniform"`` baseline. Defaults to 0.
        batch_size: Points (samples times steps) per compiled call; a path
            longer than that is split. Defaults to ``None``: as many as hold
            2**20 input values, at most 256 (256 for 32x32x3 images, 37 for
            96x96x3). Lower it if the model runs out of memory.
        keep_path_gradients: Keep the gradient at every point of the path in
            ``path_gradients`` (``steps`` times x's size), which
            ``accumulated()`` integrates up to every point. Defaults to False.

    Returns:
        An :class:`IntegratedGradients`: ``.array`` (shaped like x),
        ``.baseline``, ``.path_alphas``, ``.path_outputs``, ``.completeness_gap``
        and ``.relative_gap`` per sample, ``to_dict()`` and a table.

    Raises:
        InputError: A bad ``output``, ``baseline``, ``steps``, ``method``,
            ``seed`` or ``batch_size``, a model with several inputs, or
            non-float x; before anything runs.
        GradmagicError: The model fails on x (the model is left unchanged).

    Warns:
        GradmagicWarning: A sample's relative completeness gap is above 5%; the
            message names a step count to try. Or the output has no gradient
            path from x (every attribution is 0, whatever ``steps``; the same
            on every backend: where JAX passes back zeros, the jaxpr tells a cut path from a zero gradient).

    Example:
        >>> a = gradmagic.integrated_gradients(model, images, baseline="blur", steps=64)
        >>> a.array.shape == images.shape, a.relative_gap
    """
    method, steps = _check_path(method, steps)
    seed = check_seed(seed)  # whatever the baseline: a bad seed is a mistake even where it is not used
    batch_size = check_batch_size(batch_size)
    if not isinstance(keep_path_gradients, (bool, np.bool_)):
        raise InputError(f"Received: keep_path_gradients={keep_path_gradients!r}. Expected True or False.")
    run = engine()
    spec, x_arr, source = single_input(model, x, engine=run)
    batch_size = points_per_call(batch_size, x_arr)
    output = check_output(model, spec, output)
    base, base_name = make_baseline(x_arr, baseline, seed)
    nonfinite_warning(baseline=base)
    requested = requested_units(model, spec, output, x_arr, run)
    alphas, weights = path_rule(method, steps)

    attribution = np.zeros_like(x_arr)
    values = np.zeros((len(x_arr), steps), np.float64)
    units = np.zeros(len(x_arr), np.int32)
    at_x, at_base = np.zeros(len(x_arr), np.float64), np.zeros(len(x_arr), np.float64)
    grads = np.zeros((len(x_arr), steps, *x_arr.shape[1:]), x_arr.dtype) if keep_path_gradients else None
    connected = True
    for samples, points in chunks(len(x_arr), steps, batch_size):
        args = (
            x_arr[samples],
            base[samples],
            alphas[points].astype(x_arr.dtype),
            weights[points].astype(x_arr.dtype),
            requested[samples],
        )
        parts = run.path(model, bool(keep_path_gradients), args, x_arr.shape)
        values[samples, points] = parts[0]
        attribution[samples] += parts[1]
        units[samples], at_x[samples], at_base[samples], connected = parts[2], parts[3], parts[4], bool(parts[5])
        if grads is not None:
            grads[samples, points] = parts[6]

    what = what_is_explained(spec, output, units)
    result = IntegratedGradients(
        array=attribution,
        baseline=base,
        baseline_name=base_name,
        output=units,
        path_alphas=alphas,
        path_weights=weights,
        path_outputs=values,
        value_at_x=at_x,
        value_at_baseline=at_base,
        method=method,
        x=x_arr,
        path_gradients=grads,
        title=(
            f"Integrated gradients of {what} of model '{model_name(model)}' "
            f"(baseline: {base_name}; {steps} steps, {method})"
        ),
    )
    if source:
        result.notes.append(f"x: {source}")
    if connected:
        _check_completeness(result, steps)
    else:  # the gap is then f(x) - f(baseline) itself, and no step count changes it
        warn_disconnected(result, "Integrated gradients", run.framework)
    return result


def _check_completeness(result: IntegratedGradients, steps: int) -> None:
    """Note, and warn about, samples whose attributions do not add up to f(x) - f(baseline)."""
    gaps = result.relative_gap
    bad = np.flatnonzero(~(gaps <= GAP_TOLERANCE))
    if bad.size == 0:
        return
    worst = int(bad[np.argmax(np.nan_to_num(gaps[bad], nan=np.inf))])
    change = float(result.value_at_x[worst]) - float(result.value_at_baseline[worst])
    scale = max(abs(float(result.value_at_x[worst])), abs(float(result.value_at_baseline[worst])))
    if not np.isfinite(result.completeness_gap[worst]):
        message = (
            f"the attributions of sample {worst} are not finite (completeness gap "
            f"{result.completeness_gap[worst]:.3g}): the gradient is NaN or Inf somewhere on the path, e.g. "
            f"sqrt or log of the input at a zeros baseline. Fix: choose a baseline where the model's gradient is "
            f"finite (e.g. baseline='blur' or an array away from the singular point)"
        )
    elif not np.isfinite(gaps[worst]) or abs(change) <= 1e-6 * scale:  # f(x) = f(b) up to float rounding
        message = (
            f"the output barely changes from the baseline to x at sample {worst} (f(x) - f(baseline) = "
            f"{change:.3g}), so the attributions cannot be checked against it (completeness gap "
            f"{result.completeness_gap[worst]:.3g}). Fix: choose a baseline where the output differs from f(x)"
        )
    elif not np.any(result.array[worst]):
        message = (
            f"the attributions of sample {worst} are all 0 although f(x) - f(baseline) = {change:.4g}: no "
            f"gradient reaches x anywhere on the path (an op between them passes back zero, e.g. stop_gradient, "
            f"round or a cast to int), whatever the steps. Fix: explain a differentiable model, or ask at a layer "
            f"after that op (gradcam(model, x, layer))"
        )
    else:
        suggestion = suggested_steps(steps, float(gaps[worst]))
        message = (
            f"the attributions of {bad.size} sample(s) miss f(x) - f(baseline) by more than "
            f"{GAP_TOLERANCE:.0%} (worst: sample {worst}, {gaps[worst]:.1%} of {change:.4g}): the path integral "
            f"with {steps} steps is too coarse. Fix: try steps={suggestion}"
        )
    result.notes.append(message)
    warnings.warn(f"Integrated gradients: {message}.", GradmagicWarning, stacklevel=4)
