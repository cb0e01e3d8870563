"""Matplotlib figures of gradient results (a front-end helper: no gradient math).

Figures are built on ``matplotlib.figure.Figure`` directly, not through pyplot,
so no backend shows them a second time, and matplotlib is imported only when a
figure is asked for. This module reads result objects (rows, labels and the
statistics the core computed) and nothing else of gradmagic.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any


def layer_norms(results: Sequence[Any]) -> list[tuple[str, float | None, bool]]:
    """Gradient norm per layer: ``(label, norm, has_nan_or_inf)``, in row order.

    A layer's norm is the L2 norm over the finite entries of all its tensors (the
    root of the sum of the squared norms the core computed per tensor). It is
    ``None`` when every tensor of the layer is disconnected and NaN when no entry
    is finite. Rows without a ``layer`` label (input Jacobians) are one bar each.
    """
    from gradmagic.core import combined_norm  # results exist, so the core is loaded already

    groups: dict[str, list[Any]] = {}
    for result in results:
        for row in result.rows:
            if "layer" in row.labels:
                label = f"{row.labels['index']} {row.labels['layer']}"
            else:
                label = " / ".join(str(v) for k, v in row.labels.items() if k not in ("shape", "path"))
            groups.setdefault(label, []).append(row)
    norms = []
    for label, rows in groups.items():
        stats = [row.stats for row in rows if row.stats is not None]
        norm = combined_norm([s.norm for s in stats]) if stats else None
        norms.append((label, norm, any(not s.finite for s in stats)))
    return norms


def _bar_note(norm: float | None) -> str:
    """What to write where a log-scale bar cannot be drawn ("" when it can)."""
    if norm is None:
        return "disconnected"
    if math.isnan(norm):
        return "all NaN/Inf"
    return "0" if norm == 0 else ""


def norm_figure(results: Sequence[Any]) -> Any:
    """Build a bar chart of the gradient norm per layer, on a log scale.

    Red bars have NaN/Inf entries (their height is the norm of the finite ones);
    layers without a bar say why: "disconnected", "all NaN/Inf" or "0".

    Args:
        results: Core results (``WeightGradients``, ``OutputGradients``,
            ``InputGradients``).

    Returns:
        A ``matplotlib.figure.Figure`` (not registered with pyplot, so no
        backend displays it a second time).
    """
    from matplotlib.figure import Figure

    norms = layer_norms(results)
    fig = Figure(figsize=(max(5.0, 0.7 * len(norms) + 2.0), 3.0), layout="constrained")
    ax = fig.subplots()
    positions = list(range(len(norms)))
    heights = [0.0 if _bar_note(norm) else norm for _, norm, _ in norms]
    colors = ["tab:red" if bad else "tab:blue" for _, _, bad in norms]
    ax.bar(positions, heights, color=colors)
    if any(h > 0 for h in heights):
        ax.set_yscale("log")
    for position, (_, norm, bad) in zip(positions, norms, strict=True):
        if note := _bar_note(norm):
            color = "tab:red" if bad else "0.4"
            ax.text(position, 0.02, note, transform=ax.get_xaxis_transform(), ha="center", rotation=90, color=color)
    ax.set_xticks(positions, [label for label, _, _ in norms], rotation=30, ha="right")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title("Gradient norm per layer" + (" (red: has NaN/Inf)" if "tab:red" in colors else ""))
    return fig


class NormChart:
    """A rendered :func:`norm_figure`: a PNG for notebooks, a short list for terminals."""

    def __init__(self, results: Sequence[Any]) -> None:
        self.norms = layer_norms(results)
        buffer = io.BytesIO()
        norm_figure(results).savefig(buffer, format="png", dpi=100)
        self.png = buffer.getvalue()

    def _repr_png_(self) -> bytes:
        return self.png

    def __repr__(self) -> str:
        lines = ["Gradient norm per layer:"]
        for label, norm, bad in self.norms:
            value = _bar_note(norm) or f"{norm:.4g}"
            lines.append(f"  {label}: {value}" + ("  <- NaN/Inf" if bad else ""))
        return "\n".join(lines)


class ExplorerFigure:
    """The explorer's three plots, built once and updated in place.

    Left: the model output along one feature (the current point marked, an
    optional reference curve dashed). Middle: d(output)/d(feature) along the same
    line. Right: the gradient norm per layer at the current point (log scale,
    NaN/Inf bars red, disconnected layers noted).

    Everything that moves is an *animated* artist and axis limits are sticky
    (they change only when the data leaves them), so most slider moves repaint
    just those artists over a cached background (blitting) instead of
    re-rendering axes, ticks and labels.

    Args:
        figure: The ``matplotlib.figure.Figure`` to draw into.
        layer_labels: One bar label per layer, in model order.
        norm_title: What the bars measure (dLoss/dW or d(output)/dW).
    """

    def __init__(self, figure: Any, layer_labels: Sequence[str], norm_title: str) -> None:
        from matplotlib.ticker import MaxNLocator, NullFormatter

        self.figure = figure
        self.ax_value, self.ax_grad, self.ax_norm = figure.subplots(1, 3)
        (self.value_line,) = self.ax_value.plot([], [], color="tab:blue")
        (self.value_ref,) = self.ax_value.plot([], [], "--", color="tab:orange")
        (self.value_point,) = self.ax_value.plot([], [], "o", color="tab:red", zorder=3)
        (self.grad_line,) = self.ax_grad.plot([], [], color="tab:blue")
        (self.grad_ref,) = self.ax_grad.plot([], [], "--", color="tab:orange")
        (self.grad_point,) = self.ax_grad.plot([], [], "o", color="tab:red", zorder=3)
        self.ax_grad.axhline(0.0, color="0.8", linewidth=0.8, zorder=0)
        positions = list(range(len(layer_labels)))
        self.bars = list(self.ax_norm.bar(positions, [1.0] * len(positions), color="tab:blue"))
        self.bar_notes = [
            self.ax_norm.text(p, 0.02, "", transform=self.ax_norm.get_xaxis_transform(), ha="center", rotation=90)
            for p in positions
        ]
        self.ax_norm.set_yscale("log")
        # Labelled minor ticks of a log axis are mathtext, the slowest text to draw.
        self.ax_norm.yaxis.set_minor_formatter(NullFormatter())
        for ax in (self.ax_value, self.ax_grad):
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.yaxis.set_major_locator(MaxNLocator(5))
        self.ax_norm.set_xticks(positions, list(layer_labels), rotation=30, ha="right", fontsize=8)
        # Fixed title positions: matplotlib would otherwise re-measure tick labels
        # to place them on every full draw.
        self.ax_norm.set_title(norm_title, fontsize=10, y=1.0)
        for ax in (self.ax_value, self.ax_grad, self.ax_norm):
            ax.tick_params(labelsize=8)
        figure.subplots_adjust(left=0.05, right=0.99, bottom=0.2, top=0.9, wspace=0.22)
        for artist in self.artists:
            artist.set_animated(True)
        self._titles: tuple = ()

    @property
    def artists(self) -> list[Any]:
        """The artists that change from one point to the next (drawn over the background)."""
        lines = [self.value_line, self.value_ref, self.value_point, self.grad_line, self.grad_ref, self.grad_point]
        return lines + self.bars + self.bar_notes

    def set_labels(self, feature: str, output: str, reference: bool = False) -> bool:
        """Name the plots after the feature and output unit; True if the titles changed."""
        titles = (feature, output, reference)
        if titles == self._titles:
            return False
        self._titles = titles
        dashed = " (dashed: reference)" if reference else ""
        self.ax_value.set_title(f"{output} along {feature}{dashed}", fontsize=10, y=1.0)
        self.ax_grad.set_title(f"d {output} / d {feature}{dashed}", fontsize=10, y=1.0)
        return True

    def update(self, view: Any) -> bool:
        """Move every artist to a new view; return True when axis limits changed.

        Args:
            view: An :class:`~gradmagic.widgets.explorer_view.ExplorerView`.

        Returns:
            Whether the background (axes, ticks) must be drawn again.
        """
        self.value_line.set_data(view.line, view.values)
        self.value_point.set_data([view.point_feature], [view.point_value])
        self.grad_line.set_data(view.line, view.grads)
        self.grad_point.set_data([view.point_feature], [view.point_grad])
        for artist, data in ((self.value_ref, view.reference_values), (self.grad_ref, view.reference_grads)):
            artist.set_data(view.line if data is not None else [], data if data is not None else [])
        changed = False
        for ax, series in (
            (self.ax_value, (view.values, view.reference_values)),
            (self.ax_grad, (view.grads, view.reference_grads)),
        ):
            changed |= _keep_limits(ax, view.line, [d for d in series if d is not None])
        return self._update_bars(view.layer_norms) or changed

    def _update_bars(self, norms: Sequence[tuple[str, float | None, bool]]) -> bool:
        heights = []
        for bar, note, (_, norm, bad) in zip(self.bars, self.bar_notes, norms):
            why = _bar_note(norm)
            height = float(norm) if not why else math.nan
            bar.set_height(height)
            bar.set_color("tab:red" if bad else "tab:blue")
            note.set_text(why)
            note.set_color("tab:red" if bad else "0.4")
            if not why:
                heights.append(height)
        if not heights:
            return False
        low, high = min(heights), max(heights)
        current_low, current_high = self.ax_norm.get_ylim()
        fits = current_low <= low and high <= current_high
        # Keep the scale unless the bars left it or shrank to a sliver of it.
        if fits and current_high / current_low <= 1e3 * max(high / low, 10.0):
            return False
        self.ax_norm.set_ylim(low / 3.0, high * 3.0)
        return True


def _keep_limits(ax: Any, xs: Any, series: Sequence[Any]) -> bool:
    """Set x limits to the line and y limits to the data, keeping them while the data fits."""
    import numpy as np

    changed = False
    x_limits = (float(xs[0]), float(xs[-1]))
    if ax.get_xlim() != x_limits:
        ax.set_xlim(*x_limits)
        changed = True
    values = np.concatenate([np.asarray(s, dtype=float).ravel() for s in series])
    values = values[np.isfinite(values)]
    if not values.size:
        return changed
    low, high = float(values.min()), float(values.max())
    span = (high - low) or 0.1 * max(abs(high), 1e-3)
    current_low, current_high = ax.get_ylim()
    fits = current_low <= low and high <= current_high
    if fits and (current_high - current_low) <= 3.0 * span:
        return changed
    ax.set_ylim(low - 0.1 * span, high + 0.1 * span)
    return True
