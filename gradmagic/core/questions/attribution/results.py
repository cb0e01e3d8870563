"""Result objects of the attribution functions: arrays, what they were computed from, and their own checks.

Each result is a table with one row per sample (``to_dict()`` gives its
columns, ``repr`` and ``_repr_html_`` show it) plus the arrays themselves.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradmagic.core.arguments import is_int
from gradmagic.core.display import html_table, text_table
from gradmagic.core.questions.attribution.heatmap import as_maps, strip
from gradmagic.errors import GradmagicError

#: Relative completeness gap above which integrated gradients warns.
GAP_TOLERANCE = 0.05

#: Relative standard error of a SmoothGrad map above which the result notes it.
RELATIVE_ERROR_NOTE = 0.1


def _fmt(value: float) -> str:
    return f"{value:.4g}"


class _PerSample:
    """Shared behaviour: a per-sample table built from :meth:`to_dict`, as text and HTML."""

    title: str = ""
    notes: list[str]

    def to_dict(self) -> dict[str, list]:  # pragma: no cover - every result defines it
        raise NotImplementedError

    def _flagged(self) -> list[bool]:
        """Rows to highlight (a failed check)."""
        return [False] * len(next(iter(self.to_dict().values()), []))

    def _table(self) -> tuple[list[str], list[list[Any]]]:
        columns = self.to_dict()
        headers = list(columns)
        rows = [[_fmt(v) if isinstance(v, float) else v for v in row] for row in zip(*columns.values(), strict=True)]
        return headers, rows

    def __repr__(self) -> str:
        headers, rows = self._table()
        return "\n".join([text_table(self.title, headers, rows), *(f"Note: {n}" for n in self.notes)])

    def _repr_html_(self) -> str:
        headers, rows = self._table()
        styles = [
            ("gap", "background:#fff3cd;color:#7a5a00;font-weight:bold") if flag else ("ok", "")
            for flag in self._flagged()
        ]
        notes = "".join(f"<p><em>Note: {html.escape(n)}</em></p>" for n in self.notes)
        return html_table(self.title, headers, rows, styles) + notes + self._maps_html()

    def _maps_html(self) -> str:
        """Inline heat maps of the result's maps, where they are 2-D per sample."""
        return ""


@dataclass(repr=False)
class IntegratedGradients(_PerSample):
    """Integrated gradients (Sundararajan et al., 2017) of one output unit per sample, with their check.

    Attributes:
        array: The attributions, shaped like x: ``(x - baseline) * integral of
            the gradient along the straight path``, one map per sample.
        baseline: The baseline used, shaped like x.
        baseline_name: How it was made (``"zeros"``, ``"blur (...)"``, ...).
        output: The output unit differentiated, per sample (the predicted class
            when ``output=None`` was asked).
        path_alphas: The positions on the path where the gradient was taken
            (0 is the baseline, 1 is x).
        path_weights: The quadrature weight of each position (they sum to 1).
        path_outputs: The output unit at every position, ``(batch, steps)``.
        path_gradients: The gradient at every position, ``(batch, steps, *x.shape[1:])``,
            if asked for with ``keep_path_gradients=True``; else ``None``.
        x: The inputs explained.
        value_at_x, value_at_baseline: f(x) and f(baseline), per sample.
        method: The quadrature rule (``"trapezoid"``, ``"midpoint"``, ``"left"``, ``"right"``).
        notes: Anything the numbers need said beside them.
    """

    array: np.ndarray
    baseline: np.ndarray
    baseline_name: str
    output: np.ndarray
    path_alphas: np.ndarray
    path_weights: np.ndarray
    path_outputs: np.ndarray
    value_at_x: np.ndarray
    value_at_baseline: np.ndarray
    method: str
    x: np.ndarray | None = None
    path_gradients: np.ndarray | None = None
    title: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """The number of points on the path where the gradient was taken."""
        return len(self.path_alphas)

    @property
    def accumulated_alphas(self) -> np.ndarray:
        """Where on the path each entry of :meth:`accumulated` ends (trapezoid: the positions; else interval ends)."""
        if self.method == "trapezoid":
            return self.path_alphas
        return np.arange(1, self.steps + 1) / self.steps

    def accumulated(self) -> np.ndarray:
        """The attributions integrated from the baseline up to each position: ``(batch, steps, *x.shape[1:])``.

        Entry ``[:, k]`` is ``(x - baseline) * integral_0^a df/dx da`` with ``a =
        accumulated_alphas[k]``, by the same rule as :attr:`array` (which is entry
        ``[:, -1]``); the path's attribution as it builds up, for a slider over a.

        Raises:
            GradmagicError: The result was computed without ``keep_path_gradients=True``.
        """
        if self.path_gradients is None or self.x is None:
            raise GradmagicError(
                "Received: accumulated() on a result computed without the gradients along the path. Expected "
                "a result of integrated_gradients(..., keep_path_gradients=True). Fix: compute it again with "
                "keep_path_gradients=True (it keeps steps times x's size in memory)."
            )
        grads = self.path_gradients.astype(np.float64)
        if self.method == "trapezoid":
            pieces = (grads[:, 1:] + grads[:, :-1]) * (self.path_alphas[1] - self.path_alphas[0]) / 2
            integral = np.concatenate([np.zeros_like(grads[:, :1]), np.cumsum(pieces, axis=1)], axis=1)
        else:
            weights = self.path_weights.reshape(1, -1, *([1] * (grads.ndim - 2)))
            integral = np.cumsum(grads * weights, axis=1)
        delta = (self.x.astype(np.float64) - self.baseline)[:, None]
        return (delta * integral).astype(self.array.dtype)

    @functools.cached_property
    def attribution_sum(self) -> np.ndarray:
        """The sum of each sample's attributions (in float64)."""
        return self.array.reshape(len(self.array), -1).astype(np.float64).sum(axis=1)

    @property
    def completeness_gap(self) -> np.ndarray:
        """``sum(attributions) - (f(x) - f(baseline))`` per sample: 0 for the exact integral."""
        return self.attribution_sum - (self.value_at_x.astype(np.float64) - self.value_at_baseline.astype(np.float64))

    @property
    def relative_gap(self) -> np.ndarray:
        """``|completeness_gap| / |f(x) - f(baseline)|`` per sample (``inf`` where only the sum changes)."""
        change = np.abs(self.value_at_x.astype(np.float64) - self.value_at_baseline.astype(np.float64))
        gap = np.abs(self.completeness_gap)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap == 0, 0.0, gap / change)

    @property
    def complete(self) -> bool:
        """True when every sample's relative gap is within 5%."""
        return bool(np.all(self.relative_gap <= GAP_TOLERANCE))

    def to_dict(self) -> dict[str, list]:
        """One row per sample: output unit, f(x), f(baseline), the attribution sum and the gaps."""
        return {
            "sample": list(range(len(self.array))),
            "output": [int(u) for u in self.output],
            "f(x)": [float(v) for v in self.value_at_x],
            "f(baseline)": [float(v) for v in self.value_at_baseline],
            "sum(attr)": [float(v) for v in self.attribution_sum],
            "completeness_gap": [float(v) for v in self.completeness_gap],
            "relative_gap": [float(v) for v in self.relative_gap],
            "max_abs": [float(np.max(np.abs(a))) if a.size else 0.0 for a in self.array],
        }

    def _flagged(self) -> list[bool]:
        return [bool(g > GAP_TOLERANCE) for g in self.relative_gap]

    def _maps_html(self) -> str:
        return strip(as_maps(self.array), signed=True, label="Attributions (summed over channels)")


@dataclass(repr=False)
class Saliency(_PerSample):
    """The gradient of one output unit per sample with respect to x, plain or SmoothGrad.

    Attributes:
        array: The gradient map, shaped like x; for SmoothGrad the mean gradient
            over the noisy copies.
        output: The output unit differentiated, per sample.
        value_at_x: The output unit at x, per sample.
        samples: The number of noisy copies per sample (1 for the plain gradient).
        smooth: The noise level asked for (a fraction of each sample's value range).
        noise_std: The standard deviation of the Gaussian noise, per sample
            (``smooth * (max(x_i) - min(x_i))``; 0 for the plain gradient).
        sample_outputs: The output unit at every noisy copy, ``(batch, samples)``.
        seed: The seed of the noise.
        gradient_at_x: The plain gradient at x (the same as ``array`` without noise).
        standard_error: Per sample, the L2 norm of the standard error of the
            mean map over the copies (0 without noise, NaN for one copy).
    """

    array: np.ndarray
    output: np.ndarray
    value_at_x: np.ndarray
    samples: int
    smooth: float
    noise_std: np.ndarray
    sample_outputs: np.ndarray
    seed: int
    gradient_at_x: np.ndarray
    standard_error: np.ndarray
    title: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def relative_error(self) -> np.ndarray:
        """Per sample, ``standard_error`` over the map's L2 norm: how settled the SmoothGrad mean is."""
        norm = np.sqrt(np.square(self.array.reshape(len(self.array), -1).astype(np.float64)).sum(axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.standard_error == 0, 0.0, self.standard_error / norm)

    def to_dict(self) -> dict[str, list]:
        """One row per sample: output unit, f(x), the noise, the size of the map and its relative error."""
        flat = self.array.reshape(len(self.array), -1).astype(np.float64)
        return {
            "sample": list(range(len(self.array))),
            "output": [int(u) for u in self.output],
            "f(x)": [float(v) for v in self.value_at_x],
            "samples": [self.samples] * len(self.array),
            "noise_std": [float(v) for v in self.noise_std],
            "norm": [float(np.sqrt(np.dot(r, r))) for r in flat],
            "max_abs": [float(np.max(np.abs(r))) if r.size else 0.0 for r in flat],
            "relative_error": [float(v) for v in self.relative_error],
        }

    def _flagged(self) -> list[bool]:
        return [bool(e > RELATIVE_ERROR_NOTE) for e in self.relative_error]

    def _maps_html(self) -> str:
        return strip(as_maps(self.array), signed=True, label="Gradient (summed over channels)")


def _linear_resize(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``array`` resized along ``axis`` to ``size`` by linear interpolation between half-pixel centres.

    Output place i reads the input at ``(i + 0.5) * n / size - 0.5`` (``n`` the
    input size), clamped to the first and last input places.
    """
    n = array.shape[axis]
    source = np.clip((np.arange(size) + 0.5) * (n / size) - 0.5, 0.0, n - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, n - 1)
    shape = [1] * array.ndim
    shape[axis] = size
    frac = (source - low).reshape(shape)
    return np.take(array, low, axis=axis) * (1 - frac) + np.take(array, high, axis=axis) * frac


@dataclass(repr=False)
class GradCAM(_PerSample):
    """Grad-CAM (Selvaraju et al., 2017) at one layer: where in its feature map the output unit looks.

    Attributes:
        array: ``ReLU(sum_c weights[c] * activations[..., c])``, the layer's
            spatial shape per sample: ``(batch, H', W')`` for a 2-D map,
            ``(batch, T')`` for a 1-D one.
        weights: Per sample and channel, the mean over space of the output
            unit's gradient with respect to the layer's output, ``(batch, C)``.
        activations: The layer's output for x, ``(batch, *spatial, C)``.
        gradients: d(output unit)/d(layer output), same shape.
        output: The output unit differentiated, per sample.
        value_at_x: The output unit at x, per sample.
        layer_index, layer_name: The layer.
        input_spatial_shape: x's spatial size (height, width), for :attr:`array_at_input`.
    """

    array: np.ndarray
    weights: np.ndarray
    activations: np.ndarray
    gradients: np.ndarray
    output: np.ndarray
    value_at_x: np.ndarray
    layer_index: int
    layer_name: str
    input_spatial_shape: tuple[int, ...]
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def upsampled(self, shape: tuple[int, ...]) -> np.ndarray:
        """The map resized to ``shape`` (height, width; or length for a 1-D map) with bilinear interpolation.

        Bilinear with half-pixel centres and no antialiasing, as
        ``tf.image.resize(..., method="bilinear")`` does: the usual way to lay the
        map over the image. Computed in NumPy, one axis at a time.

        Raises:
            GradmagicError: ``shape`` is not one positive int per axis of the map.
        """
        spatial = self._check_shape(shape)
        resized = self.array.astype(np.float64)
        for axis, size in enumerate(spatial, start=1):
            resized = _linear_resize(resized, axis, size)
        return resized.astype(np.float32)

    def _check_shape(self, shape: Any) -> tuple[int, ...]:
        rank = self.array.ndim - 1
        try:
            spatial = tuple(shape)
        except TypeError:
            spatial = None
        if spatial is None or len(spatial) != rank or not all(is_int(s) and s >= 1 for s in spatial):
            names = "(height, width)" if rank == 2 else "(length,)"
            raise GradmagicError(
                f"Received: shape={shape!r} for a Grad-CAM map of shape {self.array.shape[1:]} per sample. "
                f"Expected {rank} positive int(s), {names}, the size to resize to. Fix: e.g. "
                f"upsampled(x.shape[1:{1 + rank}])."
            )
        return tuple(int(s) for s in spatial)

    @functools.cached_property
    def array_at_input(self) -> np.ndarray:
        """The map resized (bilinear) to x's spatial size: ``(batch, H, W)``."""
        return self.upsampled(self.input_spatial_shape)

    def to_dict(self) -> dict[str, list]:
        """One row per sample: output unit, f(x), and the size of the map."""
        flat = self.array.reshape(len(self.array), -1).astype(np.float64)
        return {
            "sample": list(range(len(self.array))),
            "output": [int(u) for u in self.output],
            "f(x)": [float(v) for v in self.value_at_x],
            "layer": [self.layer_name] * len(self.array),
            "map_max": [float(r.max()) if r.size else 0.0 for r in flat],
            "map_mean": [float(r.mean()) if r.size else 0.0 for r in flat],
            "positive": [float(np.mean(r > 0)) if r.size else 0.0 for r in flat],
        }

    def _maps_html(self) -> str:
        maps = self.array_at_input if self.array.ndim == 3 and len(self.input_spatial_shape) == 2 else self.array
        return strip(maps if maps.ndim == 3 else None, signed=False, label=f"Grad-CAM at layer '{self.layer_name}'")


@dataclass
class TokenGradients:
    """d(one output unit)/d(Embedding output) for a batch of token sequences.

    Attributes:
        embeddings: The Embedding layer's output, ``(batch, T, D)``.
        array: The gradient of the output unit with respect to it, same shape.
        values: The output unit, ``(batch,)``.
        layer_name: The Embedding layer differentiated at.
        output: The output unit (index into the flattened per-sample output).
        notes: Anything the numbers need said beside them (e.g. no gradient path from the Embedding).
    """

    embeddings: np.ndarray
    array: np.ndarray
    values: np.ndarray
    layer_name: str
    output: int
    notes: list[str] = field(default_factory=list)
