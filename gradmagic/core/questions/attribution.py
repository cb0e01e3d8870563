"""Attribution: integrated gradients, saliency (plain and SmoothGrad) and Grad-CAM.

Each function checks its arguments before anything runs, picks the output unit
per sample (the one asked for, or the predicted class), and computes every
point it needs (a path, noisy copies) in batched calls of one compiled, cached
function (see :mod:`gradmagic.core.questions.attribution_compute`). The model
runs in inference mode and is left exactly as it was.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradmagic.core.arguments import check_seed, is_int
from gradmagic.core.batches import first_batch
from gradmagic.core.questions import attribution_compute as ac
from gradmagic.core.questions import compute
from gradmagic.core.questions.attribution_results import GAP_TOLERANCE, GradCAM, IntegratedGradients, Saliency
from gradmagic.core.questions.baselines import make_baseline
from gradmagic.core.questions.entry import check_model, leaves_no_trace, spec_and_inputs
from gradmagic.core.questions.inputs import ModelSpec, nonfinite_warning
from gradmagic.core.questions.model_keys import question_key
from gradmagic.core.questions.targets import model_name, resolve_layer
from gradmagic.errors import GradmagicWarning, InputError

#: Quadrature rules for the path integral.
METHODS = ("trapezoid", "midpoint", "left", "right")

#: By default, a compiled call takes as many points (samples times path positions or noisy copies) as fit
#: in this many input values (4 MB of float32; a model's activations grow with its input), at most 256.
POINT_BUDGET = 1 << 20
MAX_POINTS = 256


# --- shared checks -------------------------------------------------------------------------------------------------


def _single_input(model: keras.Model, x: Any, float_only: bool = True) -> tuple[ModelSpec, np.ndarray, str | None]:
    """x as one NumPy array with a batch axis (the first batch of a dataset), checked against the model."""
    check_model(model)
    data = first_batch(x, takes_y=False)
    spec, x_in, _ = spec_and_inputs(model, data.x)
    leaves = keras.tree.flatten(x_in)
    if len(leaves) != 1:
        raise InputError(
            f"Received: x with {len(leaves)} inputs for model '{model_name(model)}'. Expected a model with a "
            f"single input: attribution maps are computed for one input array. Fix: wrap the model so that the "
            f"other inputs are fixed, e.g. keras.Model(image_input, model([image_input, fixed]))."
        )
    array = leaves[0].numpy() if isinstance(leaves[0], tf.Tensor) else np.asarray(leaves[0])
    if float_only and array.dtype.kind != "f":
        raise InputError(
            f"Received: x of dtype {array.dtype} for model '{model_name(model)}'. Expected float inputs: "
            f"integer inputs such as token ids are looked up, not computed with, so they have no gradient. "
            f"Fix: ask at a layer instead, gradcam(model, x, layer) or output_gradients(model, x, y, layer)."
        )
    nonfinite_warning(x=array)
    return spec, array, data.source


def _declared_units(spec: ModelSpec) -> int | None:
    """Output units per sample, flattened and joined, as the model declares them (None: not declared)."""
    if not spec.outputs or any(d is None for s in spec.outputs for d in s.shape):
        return None
    return int(sum(math.prod(s.shape) for s in spec.outputs))


def _check_output(model: keras.Model, spec: ModelSpec, output: Any, units: int | None = None) -> int | None:
    """Validate ``output=`` (an index into the flattened per-sample output, or None).

    Returns it non-negative where the number of units is known (``units``, or
    declared by the model), as given otherwise.
    """
    if output is None:
        if spec.outputs is not None and len(spec.outputs) > 1:
            raise InputError(
                f"Received: output=None for model '{model_name(model)}', which has {len(spec.outputs)} outputs "
                f"{spec.output_names}. Expected an int: with several outputs there is no single predicted "
                f"class. Fix: pass output=k, an index into the outputs flattened and joined in that order."
            )
        return None
    if not is_int(output):
        raise InputError(
            f"Received: output={output!r} of type {type(output).__name__}. Expected None (the predicted class, "
            f"or the only output unit) or an int index into the flattened per-sample output."
        )
    units = _declared_units(spec) if units is None else units
    if units is None:
        return int(output)
    if not -units <= output < units:
        raise InputError(
            f"Received: output={output}, but model '{model_name(model)}' has {units} output unit(s) per sample. "
            f"Expected an index in [0, {units - 1}] into the flattened per-sample output, or None for the "
            f"predicted class. Fix: e.g. output=0."
        )
    return int(output) % units


def _requested_units(model: keras.Model, spec: ModelSpec, output: int | None, x: np.ndarray) -> np.ndarray:
    """The unit per sample for the compiled functions: ``output``, or -1 for each sample's predicted class.

    A model that declares no outputs (subclassed) runs once on x first, so
    that ``output`` is checked against its real number of units.
    """
    if output is None:
        return np.full(len(x), -1, np.int32)
    if _declared_units(spec) is None:
        key, fn = _compiled(model, "attribution forward", lambda: ac.forward_function(model))
        units = int(ac.run(model, key, fn, (x,), "the output", x.shape).shape[1])
        output = _check_output(model, spec, output, units)
    return np.full(len(x), output, np.int32)


def _check_batch_size(batch_size: Any) -> int | None:
    if batch_size is None or (is_int(batch_size) and batch_size >= 1):
        return None if batch_size is None else int(batch_size)
    raise InputError(
        f"Received: batch_size={batch_size!r}. Expected an int >= 1, the number of points (samples times "
        f"path steps or noisy copies) per compiled call, or None to size it by x (at most {MAX_POINTS})."
    )


def _points_per_call(batch_size: int | None, x: np.ndarray) -> int:
    """``batch_size``, or by default as many points as :data:`POINT_BUDGET` input values hold."""
    if batch_size is not None:
        return batch_size
    return int(max(1, min(MAX_POINTS, POINT_BUDGET // max(1, math.prod(x.shape[1:])))))


def _compiled(model: keras.Model, kind: str, build: Any, *parts: Any) -> tuple[Any, ac.Compiled]:
    key = question_key(model, kind, *parts)
    return key, compute.cached(model, key, lambda: ac.Compiled(build()))


def _chunks(samples: int, points: int, batch_size: int) -> Iterator[tuple[slice, slice]]:
    """Split ``samples x points`` into calls of at most ``batch_size`` points (at least one each)."""
    per_sample = min(points, batch_size)
    together = max(1, batch_size // per_sample)
    for s in range(0, samples, together):
        for p in range(0, points, per_sample):
            yield slice(s, s + together), slice(p, p + per_sample)


def _what(spec: ModelSpec, output: int | None, units: np.ndarray) -> str:
    if output is not None:
        return f"output unit {int(units[0])}"
    return "the output" if _declared_units(spec) == 1 else "the predicted class"


# --- integrated gradients ------------------------------------------------------------------------------------------


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


def suggested_steps(steps: int, relative_gap: float, method: str) -> int:
    """A step count expected to bring the relative gap under 5%, rounded up to a multiple of 10.

    The trapezoid and midpoint rules' error falls as 1/steps**2 on a smooth
    path, the left and right rules' as 1/steps; a factor of 1.5 allows for
    kinks (ReLU) on the path.
    """
    ratio = relative_gap / GAP_TOLERANCE
    factor = ratio if method in ("left", "right") else math.sqrt(ratio)
    return int(min(100_000, math.ceil(steps * factor * 1.5 / 10) * 10))


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
        seed: Seed of the ``"uniform"`` baseline. Defaults to 0.
        batch_size: Points (samples times steps) per compiled call; a path
            longer than that is split. Defaults to ``None``: as many as hold
            2**20 input values, at most 256 (256 for 32x32x3 images, 37 for
            96x96x3). Lower it if the model runs out of memory.
        keep_path_gradients: Keep the gradient at every point of the path in
            ``path_gradients`` (``steps`` times x's size). Defaults to False.

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
            message names a step count to try.

    Example:
        >>> a = gradmagic.integrated_gradients(model, images, baseline="blur", steps=64)
        >>> a.array.shape == images.shape, a.relative_gap
    """
    method, steps = _check_path(method, steps)
    batch_size = _check_batch_size(batch_size)
    if not isinstance(keep_path_gradients, (bool, np.bool_)):
        raise InputError(f"Received: keep_path_gradients={keep_path_gradients!r}. Expected True or False.")
    spec, x_arr, source = _single_input(model, x)
    batch_size = _points_per_call(batch_size, x_arr)
    output = _check_output(model, spec, output)
    base, base_name = make_baseline(x_arr, baseline, seed)
    nonfinite_warning(baseline=base)
    requested = _requested_units(model, spec, output, x_arr)
    alphas, weights = path_rule(method, steps)

    key, fn = _compiled(
        model, "integrated gradients", lambda: ac.path_function(model, keep_path_gradients), bool(keep_path_gradients)
    )
    attribution = np.zeros_like(x_arr)
    values = np.zeros((len(x_arr), steps), np.float64)
    units = np.zeros(len(x_arr), np.int32)
    at_x, at_base = np.zeros(len(x_arr), np.float64), np.zeros(len(x_arr), np.float64)
    grads = np.zeros((len(x_arr), steps, *x_arr.shape[1:]), x_arr.dtype) if keep_path_gradients else None
    for samples, points in _chunks(len(x_arr), steps, batch_size):
        args = (
            x_arr[samples],
            base[samples],
            alphas[points].astype(x_arr.dtype),
            weights[points].astype(x_arr.dtype),
            requested[samples],
        )
        parts = [t.numpy() for t in ac.run(model, key, fn, args, "integrated gradients", x_arr.shape)]
        values[samples, points] = parts[0]
        attribution[samples] += parts[1]
        units[samples], at_x[samples], at_base[samples] = parts[2], parts[3], parts[4]
        if grads is not None:
            grads[samples, points] = parts[5]

    what = _what(spec, output, units)
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
        path_gradients=grads,
        title=(
            f"Integrated gradients of {what} of model '{model_name(model)}' "
            f"(baseline: {base_name}; {steps} steps, {method})"
        ),
    )
    if source:
        result.notes.append(f"x: {source}")
    _check_completeness(result, steps, method)
    return result


def _check_completeness(result: IntegratedGradients, steps: int, method: str) -> None:
    """Note, and warn about, samples whose attributions do not add up to f(x) - f(baseline)."""
    gaps = result.relative_gap
    bad = np.flatnonzero(~(gaps <= GAP_TOLERANCE))
    if bad.size == 0:
        return
    worst = int(bad[np.argmax(np.nan_to_num(gaps[bad], nan=np.inf))])
    change = float(result.value_at_x[worst]) - float(result.value_at_baseline[worst])
    scale = max(abs(float(result.value_at_x[worst])), abs(float(result.value_at_baseline[worst])))
    if not np.isfinite(gaps[worst]) or abs(change) <= 1e-6 * scale:  # f(x) = f(b) up to float rounding
        message = (
            f"the output barely changes from the baseline to x at sample {worst} (f(x) - f(baseline) = "
            f"{change:.3g}), so the attributions cannot be checked against it (completeness gap "
            f"{result.completeness_gap[worst]:.3g}). Fix: choose a baseline where the output differs from f(x)"
        )
    else:
        suggestion = suggested_steps(steps, float(gaps[worst]), method)
        message = (
            f"the attributions of {bad.size} sample(s) miss f(x) - f(baseline) by more than "
            f"{GAP_TOLERANCE:.0%} (worst: sample {worst}, {gaps[worst]:.1%} of {change:.4g}): the path integral "
            f"with {steps} steps is too coarse. Fix: try steps={suggestion}"
        )
    result.notes.append(message)
    warnings.warn(f"Integrated gradients: {message}.", GradmagicWarning, stacklevel=4)


# --- saliency ------------------------------------------------------------------------------------------------------


@leaves_no_trace
def saliency(
    model: keras.Model,
    x: Any,
    output: int | None = None,
    smooth: float = 0.0,
    samples: int = 25,
    seed: int = 0,
    batch_size: int | None = None,
) -> Saliency:
    """The gradient of one output unit with respect to x: plain, or SmoothGrad's mean over noisy copies.

    With ``smooth > 0`` this is SmoothGrad (Smilkov et al., 2017): the mean
    gradient over ``samples`` copies of each sample with Gaussian noise of
    standard deviation ``smooth * (max(x_i) - min(x_i))`` added, all of them
    in batched calls of one compiled, cached function.

    Args:
        model: A Keras 3 model with a single float input.
        x: Inputs with a batch axis (one sample may omit it), or a dataset or
            generator (its first batch).
        output: The output unit: an index into the flattened per-sample output.
            Defaults to ``None``: the predicted class at x per sample, or the
            only unit.
        smooth: The noise level, a fraction of each sample's value range;
            SmoothGrad's paper finds 0.1 to 0.2 works for images. Defaults to
            0.0: the plain gradient.
        samples: Noisy copies per sample when ``smooth > 0``. Defaults to 25.
        seed: Seed of the noise: sample i's copies come from NumPy's
            ``default_rng([seed, i])``, so they do not depend on the batch size.
            Defaults to 0.
        batch_size: Points (samples times copies) per compiled call. Defaults
            to ``None``: sized by x, as for :func:`integrated_gradients`.

    Returns:
        A :class:`Saliency`: ``.array`` shaped like x, ``.samples``,
        ``.noise_std`` per sample, ``to_dict()`` and a table.

    Raises:
        InputError: A bad ``output``, ``smooth``, ``samples``, ``seed`` or
            ``batch_size``, a model with several inputs, or non-float x.

    Example:
        >>> s = gradmagic.saliency(model, images, smooth=0.15, samples=32)
        >>> s.array.shape == images.shape
    """
    if isinstance(smooth, bool) or not isinstance(smooth, (int, float, np.integer, np.floating)) or not smooth >= 0:
        raise InputError(
            f"Received: smooth={smooth!r}. Expected a number >= 0: the SmoothGrad noise as a fraction of each "
            f"sample's value range (0 for the plain gradient). Fix: e.g. smooth=0.15."
        )
    smooth = float(smooth)
    if not is_int(samples) or samples < 1:
        raise InputError(f"Received: samples={samples!r}. Expected an int >= 1, the noisy copies per sample.")
    seed = check_seed(seed)
    batch_size = _check_batch_size(batch_size)
    spec, x_arr, source = _single_input(model, x)
    batch_size = _points_per_call(batch_size, x_arr)
    output = _check_output(model, spec, output)
    requested = _requested_units(model, spec, output, x_arr)

    key, fn = _compiled(model, "saliency", lambda: ac.noise_function(model))
    units = np.zeros(len(x_arr), np.int32)
    at_x = np.zeros(len(x_arr), np.float64)
    draws = int(samples) if smooth > 0 else 1
    values = np.zeros((len(x_arr), draws), np.float64)
    if smooth > 0:
        axes = tuple(range(1, x_arr.ndim))
        std = smooth * (np.max(x_arr, axis=axes) - np.min(x_arr, axis=axes)).astype(np.float64)
        noise = np.stack(
            [
                np.random.default_rng([seed, i]).standard_normal((draws, *x_arr.shape[1:])) * std[i]
                for i in range(len(x_arr))
            ]
        ).astype(x_arr.dtype)
        summed = np.zeros(x_arr.shape, np.float64)
        for rows, copies in _chunks(len(x_arr), draws, batch_size):
            flat = noise[rows, copies].reshape(-1, *x_arr.shape[1:])
            got = [
                t.numpy()
                for t in ac.run(model, key, fn, (x_arr[rows], flat, requested[rows]), "SmoothGrad", x_arr.shape)
            ]
            values[rows, copies], units[rows], at_x[rows] = got[0], got[3], got[4]
            summed[rows] += got[1]
        array = (summed / draws).astype(x_arr.dtype)
    else:  # no noisy copies: the gradient at x itself
        std = np.zeros(len(x_arr))
        array = np.zeros_like(x_arr)
        none = np.zeros((0, *x_arr.shape[1:]), x_arr.dtype)
        for start in range(0, len(x_arr), batch_size):
            rows = slice(start, start + batch_size)
            got = [
                t.numpy()
                for t in ac.run(model, key, fn, (x_arr[rows], none, requested[rows]), "the saliency map", x_arr.shape)
            ]
            array[rows], units[rows], at_x[rows] = got[2], got[3], got[4]
        values[:, 0] = at_x

    what = _what(spec, output, units)
    kind = f"SmoothGrad ({draws} noisy copies, noise {smooth:g} of the range)" if smooth > 0 else "Saliency"
    result = Saliency(
        array=array,
        output=units,
        value_at_x=at_x,
        samples=draws,
        smooth=smooth,
        noise_std=std,
        sample_outputs=values,
        seed=seed,
        title=f"{kind}: d({what})/dx of model '{model_name(model)}'",
    )
    if source:
        result.notes.append(f"x: {source}")
    return result


# --- Grad-CAM ------------------------------------------------------------------------------------------------------


def _check_spatial(model: keras.Model, index: int, layer: keras.Layer, rank: int | None) -> None:
    if rank is None or rank in (3, 4):
        return
    raise InputError(
        f"Received: layer={index} '{layer.name}' of model '{model_name(model)}', whose output has rank {rank} "
        f"(batch included). Expected a layer with a spatial output, (batch, height, width, channels) or "
        f"(batch, steps, channels), channels last: Grad-CAM weighs the channels of a feature map. Fix: pick a "
        f"convolution or pooling layer before the flattening, e.g. the last Conv2D (see model.summary())."
    )


def _declared_rank(layer: keras.Layer) -> int | None:
    """The rank of the layer's output as the model declares it, if it does (Functional, Sequential)."""
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # subclassed model, or a layer called more than once
        return None


@leaves_no_trace
def gradcam(model: keras.Model, x: Any, layer: int | str | keras.Layer, output: int | None = None) -> GradCAM:
    """Grad-CAM: which places of one layer's feature map raise one output unit.

    From the layer's output A (channels last) and the gradient of the output
    unit with respect to it, both taken in one compiled, cached call: each
    channel's weight is the gradient's mean over space, and the map is
    ``ReLU(sum_c weight_c * A[..., c])`` (Selvaraju et al., 2017).

    Args:
        model: A Keras 3 model.
        x: Inputs, as for :func:`integrated_gradients` (integer inputs are fine:
            the gradient is taken at the layer).
        layer: The layer, by index in ``model.layers``, by name or as the
            object; its output must be ``(batch, H', W', C)`` or ``(batch, T', C)``.
        output: The output unit. Defaults to ``None``: the predicted class.

    Returns:
        A :class:`GradCAM`: ``.array`` of the layer's spatial shape
        ``(batch, H', W')``, ``.array_at_input`` resized to x's (bilinear),
        ``.upsampled(shape)``, ``.weights``, ``to_dict()`` and a table.

    Raises:
        InputError: A layer without spatial output, a layer the forward pass
            does not call, a bad ``output``, or a model with several inputs.
        LayerError: An index out of range or an unknown name.

    Example:
        >>> g = gradmagic.gradcam(model, images, layer="conv2d_1")
        >>> g.array_at_input.shape == images.shape[:3]
    """
    check_model(model)
    resolve_layer(model, layer)  # its type and name, before anything runs
    spec, x_arr, source = _single_input(model, x, float_only=False)
    index, lay = resolve_layer(model, layer)  # again: building the model may have added an InputLayer
    if isinstance(lay, keras.layers.InputLayer):
        raise InputError(
            f"Received: layer={index} '{lay.name}', the input of model '{model_name(model)}'. Expected a layer "
            f"the model computes, with a spatial output (a convolution). Fix: for the gradient with respect to "
            f"the input itself use saliency(model, x)."
        )
    _check_spatial(model, index, lay, _declared_rank(lay))
    output = _check_output(model, spec, output)
    requested = _requested_units(model, spec, output, x_arr)

    key, fn = _compiled(model, "gradcam", lambda: ac.layer_function(model, lay), lambda b: b.same(lay))
    values, units, outputs, grads = ac.run(model, key, fn, (x_arr, requested), "Grad-CAM", x_arr.shape)
    if not outputs:
        compute.forget(model, key)
        raise InputError(
            f"Received: layer={index} '{lay.name}', which model '{model_name(model)}' did not call when it ran "
            f"on x, so it has no feature map. Fix: pick a layer the forward pass uses (see model.summary())."
        )
    activations, gradients = outputs[0].numpy(), grads[0].numpy()
    _check_spatial(model, index, lay, activations.ndim)
    spatial = tuple(range(1, activations.ndim - 1))
    weights = gradients.astype(np.float64).mean(axis=spatial)
    cam = np.maximum(np.einsum("b...c,bc->b...", activations.astype(np.float64), weights), 0.0)

    map_rank = activations.ndim - 2
    what = _what(spec, output, units.numpy())
    result = GradCAM(
        array=cam.astype(activations.dtype),
        weights=weights.astype(activations.dtype),
        activations=activations,
        gradients=gradients,
        output=units.numpy(),
        value_at_x=values.numpy(),
        layer_index=index,
        layer_name=lay.name,
        input_spatial_shape=tuple(x_arr.shape[1 : 1 + map_rank]) if x_arr.ndim > map_rank else (),
        title=f"Grad-CAM of {what} of model '{model_name(model)}' at layer {index} '{lay.name}'",
    )
    if len(outputs) > 1:
        result.notes.append(f"layer '{lay.name}' ran {len(outputs)} times; the map is of its first call")
    if source:
        result.notes.append(f"x: {source}")
    return result
