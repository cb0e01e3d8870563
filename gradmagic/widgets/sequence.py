"""The explorer's sequence view: which positions of a sequence the output's gradient rests on.

For a float sequence (T x F) the gradient is d(output unit)/d(input); for token
ids read by an Embedding it is taken at the Embedding's output (ids have no
derivative). A slider moves the point along the straight path from zeros (zero
embeddings) to the sample. Per position in the sequence the view shows the
gradient's L2 norm over the features, gradient x input summed over them, and
the integrated gradients accumulated up to the slider's point, with the
position labels (tokens) when given. Every number comes from the core: the
whole path in batched calls, once per sample and output unit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import numpy as np

from gradmagic.core import integrated_gradients, token_integrated_gradients
from gradmagic.errors import GradmagicWarning
from gradmagic.widgets.coalesce import Scheduler
from gradmagic.widgets.figure_view import FigureView
from gradmagic.widgets.view_panel import (
    DEFAULT_CLOCK,
    Recent,
    ViewPanel,
    nonfinite_note,
    output_labels,
    path_slider,
    readout_table,
)


@dataclass
class SequencePath:
    """The straight path from zero (inputs or embeddings) to one sample, computed at once.

    Attributes:
        sample, unit: The sample of x and the output unit.
        alphas: The positions on the path (0: zeros, 1: the sample), ``(steps,)``.
        inputs: What is differentiated at a = 1: the sample ``(T, F)``, or its embeddings ``(T, D)``.
        gradients: d(output unit)/d(inputs) at every position, ``(steps, T, F)``.
        outputs: The output unit at every position, ``(steps,)``.
        accumulated: Integrated gradients up to every position, ``(steps, T, F)``.
        completeness_gap: ``sum(attribution) - (f(sample) - f(zeros))``.
        notes: What the core said about the numbers.
        tokens: Whether the path runs in embedding space.
    """

    sample: int
    unit: int
    alphas: np.ndarray
    inputs: np.ndarray
    gradients: np.ndarray
    outputs: np.ndarray
    accumulated: np.ndarray
    completeness_gap: float
    notes: list[str]
    tokens: bool


@dataclass
class SequenceView:
    """What the sequence view shows at one position on the path.

    Attributes:
        path: The :class:`SequencePath`.
        index: The position's index on the path (``alpha = path.alphas[index]``).
        value: The output unit there.
        gradient: d(output unit)/d(inputs) there, ``(T, F)``.
        norms: The gradient's L2 norm per position in the sequence, ``(T,)``.
        grad_x_input: Gradient x input (the input at a) summed over the features, per position ``(T,)``.
        integrated: The integrated gradients up to a, summed over the features, per position ``(T,)``.
    """

    path: SequencePath
    index: int
    value: float
    gradient: np.ndarray
    norms: np.ndarray
    grad_x_input: np.ndarray
    integrated: np.ndarray

    @property
    def alpha(self) -> float:
        return float(self.path.alphas[self.index])

    @property
    def sample(self) -> int:
        return self.path.sample

    @property
    def unit(self) -> int:
        return self.path.unit

    @property
    def tokens(self) -> bool:
        return self.path.tokens


def compute_path(
    model: Any, sample: np.ndarray, unit: int = 0, tokens: bool = False, steps: int = 32, index: int = 0
) -> SequencePath:
    """The whole path from zeros to one sample, in batched calls of the core.

    Args:
        model: The Keras model.
        sample: One sample with a batch axis: ``(1, T, F)`` floats or ``(1, T)`` token ids.
        unit: The output unit (index into the flattened per-sample output).
        tokens: The path runs in the Embedding's output space (token ids).
        steps: Points on the path.
        index: The sample's row in x (recorded in the path).
    """
    # The completeness check is shown in the readout, with its note, rather than warned about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradmagicWarning)
        if tokens:
            result = token_integrated_gradients(model, sample, output=unit, steps=steps)
        else:
            result = integrated_gradients(model, sample, output=unit, steps=steps, keep_path_gradients=True)
    inputs = np.asarray(result.x)[0]
    length = len(inputs)
    return SequencePath(
        sample=index,
        unit=unit,
        alphas=np.asarray(result.accumulated_alphas),
        inputs=inputs.reshape(length, -1),
        gradients=result.path_gradients[0].reshape(steps, length, -1),
        outputs=np.asarray(result.path_outputs)[0],
        accumulated=result.accumulated()[0].reshape(steps, length, -1),
        completeness_gap=float(result.completeness_gap[0]),
        notes=nonfinite_note(result.path_gradients[0], np.asarray(result.path_alphas)) + list(result.notes),
        tokens=tokens,
    )


def view_at(path: SequencePath, index: int) -> SequenceView:
    """What the view shows at position ``index`` of the path (no call of the model)."""
    gradient = path.gradients[index].astype(np.float64)
    point = path.alphas[index] * path.inputs.astype(np.float64)
    return SequenceView(
        path=path,
        index=index,
        value=float(path.outputs[index]),
        gradient=gradient,
        norms=np.sqrt(np.sum(gradient**2, axis=1)),
        grad_x_input=np.sum(gradient * point, axis=1),
        integrated=path.accumulated[index].astype(np.float64).sum(axis=1),
    )


class SequenceFigure:
    """Three bar charts over the positions: gradient norm, gradient x input, integrated gradients up to a."""

    def __init__(self, figure: Any, length: int, what: str) -> None:
        self.figure = figure
        self.ax_norm, self.ax_gxi, self.ax_ig = figure.subplots(3, 1, sharex=True)
        positions = np.arange(length)
        self.norm_bars = list(self.ax_norm.bar(positions, np.zeros(length), color="tab:blue"))
        self.gxi_bars = list(self.ax_gxi.bar(positions, np.zeros(length), color="tab:blue"))
        self.ig_bars = list(self.ax_ig.bar(positions, np.zeros(length), color="tab:blue"))
        self.ax_norm.set_title(f"|d output / d {what}| per position, at a", fontsize=9)
        self.ax_gxi.set_title(f"gradient x {what} at a, summed per position", fontsize=9)
        self.ax_ig.set_title("integrated gradients from 0 to a, per position", fontsize=9)
        for ax in (self.ax_norm, self.ax_gxi, self.ax_ig):
            ax.tick_params(labelsize=8)
            ax.set_xlim(-0.6, length - 0.4)
        for ax in (self.ax_gxi, self.ax_ig):
            ax.axhline(0.0, color="0.6", linewidth=0.8)
        figure.subplots_adjust(left=0.08, right=0.99, bottom=0.14, top=0.94, hspace=0.45)
        for artist in self.artists:
            artist.set_animated(True)
        self._labels: list[str] | None = None

    @property
    def artists(self) -> list[Any]:
        """The bars (drawn over the cached background)."""
        return self.norm_bars + self.gxi_bars + self.ig_bars

    def update(self, view: SequenceView, labels: list[str]) -> bool:
        """Set the bars; return True when the axes (limits, tick labels) changed."""
        for bar, height in zip(self.norm_bars, view.norms):
            bar.set_height(float(height))
        for bars, heights in ((self.gxi_bars, view.grad_x_input), (self.ig_bars, view.integrated)):
            for bar, height in zip(bars, heights):
                bar.set_height(float(height))
                bar.set_color("tab:blue" if height >= 0 else "tab:red")
        changed = labels != self._labels
        if changed:
            self._labels = labels
            self.ax_ig.set_xticks(
                np.arange(len(labels)),
                labels,
                rotation=60 if len(labels) > 12 else 0,
                fontsize=7 if len(labels) > 20 else 8,
            )
        changed |= _keep(self.ax_norm, _reach(view.norms), signed=False)
        changed |= _keep(self.ax_gxi, _reach(view.grad_x_input), signed=True)
        changed |= _keep(self.ax_ig, _reach(view.integrated), signed=True)
        return changed


def _reach(heights: np.ndarray) -> float:
    """The largest finite |height| (a NaN or Inf bar is left blank; matplotlib refuses such limits)."""
    return float(np.max(np.abs(heights[np.isfinite(heights)]), initial=0.0))


def _keep(ax: Any, reach: float, signed: bool) -> bool:
    """Keep the y limits while the bars fit and fill a third of them; else reset them (True)."""
    reach = reach or 1e-12
    low, high = ax.get_ylim()
    if reach <= high <= 3 * reach and (low == -high if signed else low == 0.0):
        return False
    ax.set_ylim(-1.1 * reach if signed else 0.0, 1.1 * reach)
    return True


class SequenceExplorer(ViewPanel):
    """The sequence view; ``gradmagic.explore`` opens it for (T, F) float inputs and token ids.

    The path from zeros (zero embeddings for tokens) to the sample is computed
    once per sample and output unit; the path slider then only picks from it.

    Attributes:
        view: The :class:`SequenceView` shown.
        alpha_slider: The position on the path (1: the sample itself).
        sample_select, unit_select: The sample of x and the output unit.
        figure: The :class:`SequenceFigure`.
    """

    def __init__(
        self,
        model: Any,
        data: np.ndarray,
        tokens: bool,
        labels: list[list[str]] | None = None,
        steps: int = 32,
        use_ipympl: bool | None = None,
        clock: Callable[[], float] = DEFAULT_CLOCK,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.model, self.data, self.tokens, self.steps = model, data, tokens, steps
        length = data.shape[1]
        self.labels = labels or [[str(i) for i in range(length)]] * len(data)
        self.units = output_labels(model)
        self._paths = Recent()
        self.alpha_slider = path_slider(steps)
        self.sample_select = widgets.BoundedIntText(
            value=0, min=0, max=len(data) - 1, description="sample", layout=widgets.Layout(width="160px")
        )
        self.unit_select = widgets.Dropdown(
            options=[(n, i) for i, n in enumerate(self.units)], value=0, description="output"
        )
        for control in (self.alpha_slider, self.sample_select, self.unit_select):
            control.observe(lambda c: self.updates.submit(self._state()), names="value")
        first = self.compute(self._state())  # before any figure: a failure leaves nothing behind
        self.figure_view = FigureView(figsize=(max(6.4, min(10.0, 0.3 * length + 2)), 5.0), use_ipympl=use_ipympl)
        self.figure = SequenceFigure(self.figure_view.figure, length, "embedding" if tokens else "input")
        self.figure_view.animate(self.figure.artists)
        row = [self.sample_select] + ([self.unit_select] if len(self.units) > 1 else [])
        self._frame(widgets.VBox([self.alpha_slider, widgets.HBox(row)]), self.figure_view.widget, clock, scheduler)
        self.view: SequenceView | None = None
        self.draw(first)

    def _state(self) -> tuple[int, int, float]:
        return (int(self.sample_select.value), int(self.unit_select.value), float(self.alpha_slider.value))

    def path(self, sample: int, unit: int) -> SequencePath:
        """The path of one sample and output unit, computed once (the whole path in batched calls)."""
        return self._paths.get(
            (sample, unit),
            lambda: compute_path(self.model, self.data[sample : sample + 1], unit, self.tokens, self.steps, sample),
        )

    def compute(self, state: tuple[int, int, float]) -> SequenceView:
        """The view for ``(sample, unit, alpha)``: a lookup once the path is known."""
        sample, unit, alpha = state
        path = self.path(sample, unit)
        return view_at(path, int(np.argmin(np.abs(path.alphas - alpha))))

    def draw(self, view: SequenceView) -> None:
        """Show ``view``: bars, tick labels (when the sample's labels differ) and the readout."""
        labels = self.labels[view.sample]
        self.figure_view.show(self.figure.update(view, labels))
        self.view = view
        order = np.argsort(-np.abs(view.grad_x_input))[:3]
        unit = self.units[view.unit]
        path = view.path
        self.readout.value = readout_table(
            [
                ("a", f"{view.alpha:.4g}"),
                (f"{unit} at a, sample {view.sample}", f"{view.value:.6g}"),
                ("gradient taken at", "the Embedding's output" if view.tokens else "the input"),
                ("largest |gradient x input|", ", ".join(f"{labels[i]} ({view.grad_x_input[i]:.3g})" for i in order)),
                ("f(0) + sum(integrated gradients up to a)", f"{path.outputs[0] + float(np.sum(view.integrated)):.6g}"),
                ("completeness gap at a = 1", f"{path.completeness_gap:.4g}"),
                *(("note", note) for note in path.notes),
            ]
        )
        self.error.value = ""
