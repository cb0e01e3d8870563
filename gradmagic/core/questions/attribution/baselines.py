"""Baselines for integrated gradients: the point the straight path starts from.

A baseline is "the input with the information removed": black (zeros), a
blurred copy (edges and texture removed, colours and layout kept), uniform noise
over the sample's value range, or any array the user gives. The choice changes
the attributions, so the result keeps the baseline it used.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from gradmagic.core.arguments import check_seed
from gradmagic.errors import InputError

#: Names accepted for ``baseline=``; ``None`` means ``"zeros"``.
BASELINE_NAMES = ("zeros", "blur", "uniform")

#: Standard deviation of the blur, as a fraction of the image's larger side (see :func:`blurred`).
BLUR_SIGMA_FRACTION = 0.1


def make_baseline(x: np.ndarray, baseline: Any, seed: Any = 0) -> tuple[np.ndarray, str]:
    """The baseline for x (same shape and dtype) and a short description of it.

    Args:
        x: The inputs, with a batch axis.
        baseline: ``None`` or ``"zeros"``, ``"blur"``, ``"uniform"``, or an array
            (or number) broadcastable to x's shape, or to one sample's shape.
        seed: Seed of the ``"uniform"`` noise.

    Raises:
        InputError: An unknown name, an array that does not broadcast to x, a
            blur of an input that is not an image, or a bad seed.
    """
    if baseline is None or (isinstance(baseline, str) and baseline == "zeros"):
        return np.zeros_like(x), "zeros"
    if isinstance(baseline, str):
        if baseline == "blur":
            sigma = _blur_sigma(x)
            return blurred(x, sigma), f"blur (Gaussian, sigma={sigma:.3g} px)"
        if baseline == "uniform":
            seed = check_seed(seed)
            return uniform_noise(x, seed), f"uniform noise over each sample's range (seed={seed})"
        raise InputError(
            f"Received: baseline={baseline!r}. Expected one of {', '.join(map(repr, BASELINE_NAMES))}, "
            f"None (zeros) or an array broadcastable to x's shape {x.shape}."
        )
    try:
        array = baseline if isinstance(baseline, np.ndarray) else keras.ops.convert_to_numpy(baseline)
        numeric = array.dtype.kind in "biuf"
    except Exception:
        numeric = False
    if not numeric:
        raise InputError(
            f"Received: baseline of type {type(baseline).__name__}. Expected one of "
            f"{', '.join(map(repr, BASELINE_NAMES))}, None (zeros) or a numeric array broadcastable to x's "
            f"shape {x.shape}."
        )
    try:
        return np.ascontiguousarray(np.broadcast_to(array, x.shape).astype(x.dtype)), f"array of shape {array.shape}"
    except ValueError:
        raise InputError(
            f"Received: baseline of shape {array.shape}, which does not broadcast to x's shape {x.shape}. "
            f"Expected an array of shape {x.shape}, or {x.shape[1:]} for one baseline shared by every sample "
            f"(or anything NumPy broadcasts to those). Fix: give the baseline x's shape, or use baseline='zeros'."
        ) from None


def _blur_sigma(x: np.ndarray) -> float:
    if x.ndim != 4:
        raise InputError(
            f"Received: baseline='blur' for x of shape {x.shape}. Expected images, x of shape (batch, height, "
            f"width, channels): the blur runs over height and width. Fix: use baseline='zeros' or 'uniform', "
            f"or pass a baseline array of x's shape."
        )
    return BLUR_SIGMA_FRACTION * max(x.shape[1], x.shape[2])


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian kernel, cut at 3 sigma: ``2 * ceil(3 sigma) + 1`` taps."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    return kernel / kernel.sum()


def blurred(x: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of images ``(batch, height, width, channels)``, each channel on its own.

    The kernel is separable (rows, then columns), cut at 3 sigma and normalised;
    the borders are reflected (``SYMMETRIC`` padding), so a flat image stays flat.
    Kernels wider than the image are cut to the image.
    """
    kernel = gaussian_kernel(sigma)
    image = np.asarray(x, np.float64)
    for axis in (1, 2):
        size = image.shape[axis]
        radius = min(len(kernel) // 2, size - 1)
        if radius == 0:
            continue
        taps = kernel[len(kernel) // 2 - radius : len(kernel) // 2 + radius + 1]
        taps = taps / taps.sum()
        padding = [(0, 0)] * 4
        padding[axis] = (radius, radius)
        padded = np.pad(image, padding, mode="symmetric")  # the edge value repeated: a flat image stays flat
        # The convolution as a sum of shifted copies, one per tap (the kernel is symmetric).
        image = sum(tap * np.take(padded, range(i, i + size), axis=axis) for i, tap in enumerate(taps))
    return image.astype(x.dtype)


def uniform_noise(x: np.ndarray, seed: int) -> np.ndarray:
    """Uniform noise between each sample's smallest and largest value (NumPy's generator, so reproducible)."""
    rng = np.random.default_rng(seed)
    axes = tuple(range(1, x.ndim))
    low = np.min(x, axis=axes, keepdims=True).astype(np.float64)
    high = np.max(x, axis=axes, keepdims=True).astype(np.float64)
    return (low + (high - low) * rng.random(x.shape)).astype(x.dtype)
