"""Saliency: the gradient of one output unit with respect to the input, plain or SmoothGrad (Smilkov et al., 2017)."""

from __future__ import annotations

import math
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
from gradmagic.core.questions.attribution.engine import engine
from gradmagic.core.questions.attribution.results import RELATIVE_ERROR_NOTE, Saliency
from gradmagic.core.questions.entry import leaves_no_trace
from gradmagic.core.questions.targets import model_name
from gradmagic.errors import InputError


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
        ``.noise_std`` per sample, its own check ``.relative_error`` (the
        standard error of the mean map over the copies, relative to its norm;
        a note suggests more copies above 10%), ``.gradient_at_x`` (the plain
        gradient, computed alongside), ``to_dict()`` and a table.

    Raises:
        InputError: A bad ``output``, ``smooth``, ``samples``, ``seed`` or
            ``batch_size``, a model with several inputs, or non-float x.

    Warns:
        GradmagicWarning: The output has no gradient path from x (the map is 0).
            The same on every backend: where JAX passes back zeros, the jaxpr tells a cut path from a zero gradient.

    Example:
        >>> s = gradmagic.saliency(model, images, smooth=0.15, samples=32)
        >>> s.array.shape == images.shape
    """
    is_number = not isinstance(smooth, bool) and isinstance(smooth, (int, float, np.integer, np.floating))
    if not is_number or not 0 <= smooth < math.inf:
        raise InputError(
            f"Received: smooth={smooth!r}. Expected a finite number >= 0: the SmoothGrad noise as a fraction of each "
            f"sample's value range (0 for the plain gradient). Fix: e.g. smooth=0.15."
        )
    smooth = float(smooth)
    if not is_int(samples) or samples < 1:
        raise InputError(f"Received: samples={samples!r}. Expected an int >= 1, the noisy copies per sample.")
    seed = check_seed(seed)
    batch_size = check_batch_size(batch_size)
    run = engine()
    spec, x_arr, source = single_input(model, x, engine=run)
    batch_size = points_per_call(batch_size, x_arr)
    output = check_output(model, spec, output)
    requested = requested_units(model, spec, output, x_arr, run)

    units = np.zeros(len(x_arr), np.int32)
    at_x = np.zeros(len(x_arr), np.float64)
    draws = int(samples) if smooth > 0 else 1
    values = np.zeros((len(x_arr), draws), np.float64)
    plain = np.zeros_like(x_arr)
    connected = True
    if smooth > 0:
        axes = tuple(range(1, x_arr.ndim))
        std = smooth * (np.max(x_arr, axis=axes) - np.min(x_arr, axis=axes)).astype(np.float64)
        noise = np.stack(
            [
                np.random.default_rng([seed, i]).standard_normal((draws, *x_arr.shape[1:])) * std[i]
                for i in range(len(x_arr))
            ]
        ).astype(x_arr.dtype)
        summed, squares = np.zeros(x_arr.shape, np.float64), np.zeros(x_arr.shape, np.float64)
        for rows, copies in chunks(len(x_arr), draws, batch_size):
            flat = noise[rows, copies].reshape(-1, *x_arr.shape[1:])
            got = run.noise(model, (x_arr[rows], flat, requested[rows]), "SmoothGrad", x_arr.shape)
            values[rows, copies], units[rows], at_x[rows], connected = got[0], got[4], got[5], bool(got[6])
            summed[rows] += got[1]
            squares[rows] += got[2]
            plain[rows] = got[3]
        array = (summed / draws).astype(x_arr.dtype)
        error = _standard_error(summed, squares, draws)
    else:  # no noisy copies: the gradient at x itself
        std = np.zeros(len(x_arr))
        none = np.zeros((0, *x_arr.shape[1:]), x_arr.dtype)
        for start in range(0, len(x_arr), batch_size):
            rows = slice(start, start + batch_size)
            got = run.noise(model, (x_arr[rows], none, requested[rows]), "the saliency map", x_arr.shape)
            plain[rows], units[rows], at_x[rows], connected = got[3], got[4], got[5], bool(got[6])
        array = plain
        error = np.zeros(len(x_arr))
        values[:, 0] = at_x

    what = what_is_explained(spec, output, units)
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
        gradient_at_x=plain,
        standard_error=error,
        title=f"{kind}: d({what})/dx of model '{model_name(model)}'",
    )
    if source:
        result.notes.append(f"x: {source}")
    if connected:
        _check_samples(result)
    else:
        warn_disconnected(result, kind, run.framework)
    return result


def _standard_error(summed: np.ndarray, squares: np.ndarray, draws: int) -> np.ndarray:
    """Per sample, the L2 norm of the standard error of the mean gradient map (NaN for a single copy)."""
    if draws < 2:
        return np.full(len(summed), np.nan)
    mean = summed / draws
    variance = np.maximum(squares / draws - mean**2, 0.0) * draws / (draws - 1)  # unbiased, per entry
    return np.sqrt(variance.reshape(len(summed), -1).sum(axis=1) / draws)


def _check_samples(result: Saliency) -> None:
    """Note samples whose SmoothGrad map is uncertain by more than 10% (of its norm), with a copy count to try."""
    relative = result.relative_error
    bad = np.flatnonzero(relative > RELATIVE_ERROR_NOTE)
    if bad.size:
        worst = float(np.max(relative[bad]))
        suggestion = int(math.ceil(result.samples * (worst / RELATIVE_ERROR_NOTE) ** 2 / 10) * 10)
        result.notes.append(
            f"the mean over {result.samples} noisy copies is uncertain by up to {worst:.0%} of the map's norm "
            f"(standard error; {bad.size} sample(s) above {RELATIVE_ERROR_NOTE:.0%}): for a steadier map try "
            f"samples={suggestion}"
        )
