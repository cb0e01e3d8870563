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
        finite = [s.norm for s in stats if not math.isnan(s.norm)]
        if not stats:
            norm = None
        elif not finite:
            norm = math.nan
        else:
            norm = math.sqrt(sum(n * n for n in finite))
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
