"""Saliency: the gradient of one output unit with respect to the input, plain or SmoothGrad (Smilkov et al., 2017)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from gradmagic.core.arguments import check_seed, is_int
from gradmagic.core.questions import attribution_compute as ac
from gradmagic.core.questions.attribution_args import (
    check_batch_size,
    check_output,
    chunks,
    compiled,
    points_per_call,
    requested_units,
    single_input,
    what_is_explained,
)
from gradmagic.core.questions.attribution_results import Saliency
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
    batch_size = check_batch_size(batch_size)
    spec, x_arr, source = single_input(model, x)
    batch_size = points_per_call(batch_size, x_arr)
    output = check_output(model, spec, output)
    requested = requested_units(model, spec, output, x_arr)

    key, fn = compiled(model, "saliency", lambda: ac.noise_function(model))
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
        for rows, copies in chunks(len(x_arr), draws, batch_size):
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
        title=f"{kind}: d({what})/dx of model '{model_name(model)}'",
    )
    if source:
        result.notes.append(f"x: {source}")
    return result
