"""The explorer's sequence view: which positions of a sequence the output's gradient rests on.

For a float sequence (T x F) the gradient is d(output unit)/d(input); for token
ids read by an Embedding it is taken at the Embedding's output (ids have no
derivative). Per position the view shows the gradient's L2 norm over the
features and gradient x input summed over them, with the position labels
(tokens) when given. Every number comes from the core, one batched call per
sample and output unit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import numpy as np

from gradmagic.core import input_gradients, token_gradients
from gradmagic.widgets.coalesce import Scheduler
from gradmagic.widgets.figure_view import FigureView
from gradmagic.widgets.view_panel import DEFAULT_CLOCK, ViewPanel, output_labels, readout_table


@dataclass
class SequenceView:
    """What the sequence view shows for one sample and output unit.

    Attributes:
        sample, unit: The sample of x and the output unit.
        value: The output unit at the sample.
        inputs: What is differentiated: the sample ``(T, F)``, or its embeddings ``(T, D)`` for tokens.
        gradient: d(output unit)/d(inputs), same shape.
        norms: The gradient's L2 norm per position, ``(T,)``.
        grad_x_input: Gradient x input summed over the features, per position ``(T,)``.
        tokens: Whether the gradient is taken at the Embedding's output.
    """

    sample: int
    unit: int
    value: float
    inputs: np.ndarray
    gradient: np.ndarray
    norms: np.ndarray
    grad_x_input: np.ndarray
    tokens: bool


def compute_sequence(model: Any, sample: np.ndarray, unit: int = 0, tokens: bool = False, index: int = 0,
                     training: bool = False) -> SequenceView:  # fmt: skip
    """Per-position gradient norms and gradient x input of one sample.

    Args:
        model: The Keras model.
        sample: One sample with a batch axis: ``(1, T, F)`` floats or ``(1, T)`` token ids.
        unit: The output unit (index into the flattened per-sample output).
        tokens: Differentiate at the Embedding's output (token ids).
        index: The sample's row in x (recorded in the view).
        training: Run the model in training mode (float sequences only).
    """
    if tokens:
        result = token_gradients(model, sample, output=unit)
        inputs, gradient, value = result.embeddings[0], result.array[0], float(result.values[0])
    else:
        jac = input_gradients(model, sample, output=unit, training=training)
        parts = jac.values if isinstance(jac.values, list) else [jac.values]
        flat = np.concatenate([np.reshape(p, (p.shape[0], -1)) for p in parts], axis=1)
        inputs, gradient, value = sample[0], np.asarray(jac.array)[0], float(flat[0, unit])
    inputs, gradient = inputs.reshape(len(inputs), -1), gradient.reshape(len(gradient), -1)
    norms = np.sqrt(np.sum(gradient.astype(np.float64) ** 2, axis=1))
    grad_x_input = np.sum(gradient.astype(np.float64) * inputs, axis=1)
    return SequenceView(index, unit, value, inputs, gradient, norms, grad_x_input, tokens)


class SequenceFigure:
    """Two bar charts over the positions: the gradient norm and gradient x input (red: negative)."""

    def __init__(self, figure: Any, length: int, what: str) -> None:
        self.figure = figure
        self.ax_norm, self.ax_gxi = figure.subplots(2, 1, sharex=True)
        positions = np.arange(length)
        self.norm_bars = list(self.ax_norm.bar(positions, np.zeros(length), color="tab:blue"))
        self.gxi_bars = list(self.ax_gxi.bar(positions, np.zeros(length), color="tab:blue"))
        self.ax_gxi.axhline(0.0, color="0.6", linewidth=0.8)
        self.ax_norm.set_title(f"|d output / d {what}| per position", fontsize=10)
        self.ax_gxi.set_title(f"gradient x {what}, summed per position", fontsize=10)
        for ax in (self.ax_norm, self.ax_gxi):
            ax.tick_params(labelsize=8)
            ax.set_xlim(-0.6, length - 0.4)
        figure.subplots_adjust(left=0.08, right=0.99, bottom=0.2, top=0.92, hspace=0.35)
        for artist in self.artists:
            artist.set_animated(True)
        self._labels: list[str] | None = None

    @property
    def artists(self) -> list[Any]:
        """The bars (drawn over the cached background)."""
        return self.norm_bars + self.gxi_bars

    def update(self, view: SequenceView, labels: list[str]) -> bool:
        """Set the bars; return True when the axes (limits, tick labels) changed."""
        for bar, height in zip(self.norm_bars, view.norms):
            bar.set_height(float(height))
        for bar, height in zip(self.gxi_bars, view.grad_x_input):
            bar.set_height(float(height))
            bar.set_color("tab:blue" if height >= 0 else "tab:red")
        changed = labels != self._labels
        if changed:
            self._labels = labels
            self.ax_gxi.set_xticks(np.arange(len(labels)), labels, rotation=60 if len(labels) > 12 else 0,
                                   fontsize=7 if len(labels) > 20 else 8)  # fmt: skip
        top = float(np.max(view.norms)) or 1.0
        low, high = self.ax_norm.get_ylim()
        if not (top <= high <= 3 * top):
            self.ax_norm.set_ylim(0.0, top * 1.1)
            changed = True
        reach = float(np.max(np.abs(view.grad_x_input))) or 1.0
        low, high = self.ax_gxi.get_ylim()
        if not (reach <= high <= 3 * reach) or low != -high:
            self.ax_gxi.set_ylim(-reach * 1.1, reach * 1.1)
            changed = True
        return changed


class SequenceExplorer(ViewPanel):
    """The sequence view; ``gradmagic.explore`` opens it for (T, F) float inputs and token ids.

    Attributes:
        view: The :class:`SequenceView` shown.
        sample_select, unit_select: The sample of x and the output unit.
        figure: The :class:`SequenceFigure`.
    """

    def __init__(
        self,
        model: Any,
        data: np.ndarray,
        tokens: bool,
        labels: list[list[str]] | None = None,
        training: bool = False,
        use_ipympl: bool | None = None,
        clock: Callable[[], float] = DEFAULT_CLOCK,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.model, self.data, self.tokens, self.training = model, data, tokens, training
        length = data.shape[1]
        self.labels = labels or [[str(i) for i in range(length)]] * len(data)
        self.units = output_labels(model)
        self.sample_select = widgets.BoundedIntText(
            value=0, min=0, max=len(data) - 1, description="sample", layout=widgets.Layout(width="160px")
        )
        self.unit_select = widgets.Dropdown(options=[(n, i) for i, n in enumerate(self.units)], value=0,
                                            description="output")  # fmt: skip
        self.sample_select.observe(lambda c: self.updates.submit(self._state()), names="value")
        self.unit_select.observe(lambda c: self.updates.submit(self._state()), names="value")
        first = self.compute(self._state())  # before any figure: a failure leaves nothing behind
        self.figure_view = FigureView(figsize=(max(6.4, min(14.0, 0.3 * length + 2)), 4.2), use_ipympl=use_ipympl)
        self.figure = SequenceFigure(self.figure_view.figure, length, "embedding" if tokens else "input")
        self.figure_view.animate(self.figure.artists)
        row = [self.sample_select] + ([self.unit_select] if len(self.units) > 1 else [])
        self._frame(widgets.HBox(row), self.figure_view.widget, clock, scheduler)
        self.view: SequenceView | None = None
        self.draw(first)

    def _state(self) -> tuple[int, int]:
        return (int(self.sample_select.value), int(self.unit_select.value))

    def compute(self, state: tuple[int, int]) -> SequenceView:
        """The numbers for a control state ``(sample, unit)``."""
        sample, unit = state
        return compute_sequence(self.model, self.data[sample : sample + 1], unit, self.tokens, sample, self.training)

    def draw(self, view: SequenceView) -> None:
        """Show ``view``: bars, tick labels (when the sample's labels differ) and the readout."""
        labels = self.labels[view.sample]
        self.figure_view.show(self.figure.update(view, labels))
        self.view = view
        order = np.argsort(-np.abs(view.grad_x_input))[:3]
        unit = self.units[view.unit]
        self.readout.value = readout_table([
            (f"{unit} at sample {view.sample}", f"{view.value:.6g}"),
            ("gradient taken at", "the Embedding's output" if view.tokens else "the input"),
            ("largest |gradient x input|", ", ".join(f"{labels[i]} ({view.grad_x_input[i]:.3g})" for i in order)),
            ("sum of gradient x input", f"{float(np.sum(view.grad_x_input)):.6g}"),
        ])  # fmt: skip
        self.error.value = ""
