"""What the training monitor recorded: a columnar history, its summary and print lines.

The history is stored as NumPy blocks, one per read of the device buffer, and
turned into columns only when asked, so that recording costs no Python per
weight per step.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradmagic.core.display import html_table, text_table
from gradmagic.core.monitor.columns import column, column_index
from gradmagic.core.norms import combined_norm
from gradmagic.core.questions.slots import WeightSlot

#: Columns of ``GradientMonitor.to_dict()``, in order.
HISTORY_COLUMNS = (
    "step",
    "epoch",
    "batch",
    "layer",
    "layer_index",
    "weight",
    "norm",
    "max_abs",
    "mean",
    "nan",
    "inf",
    "skipped",
    "full",
)


@dataclass
class _Block:
    steps: np.ndarray  # [n] global optimizer step of each row
    epochs: np.ndarray  # [n]
    batches: np.ndarray  # [n]
    stats: np.ndarray  # [n, weights, BUFFER_COLUMNS]


class MonitorHistory:
    """Per-step, per-weight gradient statistics recorded during ``fit``.

    Args:
        slots: The monitored weights (layer, path), in buffer column order.
    """

    def __init__(self, slots: Sequence[WeightSlot]) -> None:
        self.slots = list(slots)
        self._blocks: list[_Block] = []

    def append(self, steps: np.ndarray, epochs: np.ndarray, batches: np.ndarray, stats: np.ndarray) -> None:
        """Add rows read from the device (one block per read)."""
        if len(steps):
            self._blocks.append(_Block(steps, epochs, batches, stats))

    def __len__(self) -> int:
        return sum(len(b.steps) for b in self._blocks)

    @property
    def steps(self) -> np.ndarray:
        """The recorded optimizer steps, in order."""
        return np.concatenate([b.steps for b in self._blocks]) if self._blocks else np.zeros(0, np.int64)

    def stat(self, column: str) -> np.ndarray:
        """One statistic as a ``[steps, weights]`` array (``column`` in ``BUFFER_COLUMNS``)."""
        k = column_index(column)
        if not self._blocks:
            return np.zeros((0, len(self.slots)))
        return np.concatenate([b.stats[:, :, k] for b in self._blocks]).astype(np.float64)

    def layer_norms(self) -> tuple[list[str], np.ndarray]:
        """Norm of each layer's whole gradient per step: ``(layer names, [steps, layers])``."""
        names = list(dict.fromkeys(s.layer_name for s in self.slots))
        norms = self.stat("norm")
        out = np.zeros((norms.shape[0], len(names)))
        for j, name in enumerate(names):
            columns = [i for i, slot in enumerate(self.slots) if slot.layer_name == name]
            out[:, j] = combined_norm(norms[:, columns], axis=1, skip_nan=False)
        return names, out

    def to_dict(self) -> dict[str, list]:
        """Equal-length columns, one row per (step, weight); see ``HISTORY_COLUMNS``."""
        n_w = len(self.slots)
        steps = self.steps
        columns: dict[str, list] = {
            "step": np.repeat(steps, n_w).tolist(),
            "epoch": np.repeat(np.concatenate([b.epochs for b in self._blocks]) if self._blocks else [], n_w).tolist(),
            "batch": np.repeat(np.concatenate([b.batches for b in self._blocks]) if self._blocks else [], n_w).tolist(),
            "layer": [s.layer_name for s in self.slots] * len(steps),
            "layer_index": [s.layer_index for s in self.slots] * len(steps),
            "weight": [s.path for s in self.slots] * len(steps),
        }
        for name in ("norm", "max_abs", "mean"):
            columns[name] = self.stat(name).ravel().tolist()
        for name in ("nan", "inf"):
            columns[name] = self.stat(name).ravel().astype(np.int64).tolist()
        columns["skipped"] = (self.stat("skipped").ravel() > 0).tolist()
        # True where max_abs and mean were measured (stats="norm" measures them every full_every steps).
        columns["full"] = (self.stat("full").ravel() > 0).tolist()
        for name in ("norm", "max_abs", "mean"):
            # A weight without a gradient this step (None) has no statistics.
            missing = self.stat("missing").ravel() > 0
            columns[name] = [None if m else v for v, m in zip(columns[name], missing, strict=False)]
        return columns

    def records(self) -> list[dict[str, Any]]:
        """The history as one dict per (step, weight)."""
        columns = self.to_dict()
        return [dict(zip(columns, values, strict=False)) for values in zip(*columns.values(), strict=False)]


def layer_lines(epoch: int, batch: int, step: int, slots: Sequence[WeightSlot], stats: np.ndarray) -> list[str]:
    """One compact line per layer for one step: name, gradient norm, max |g|, NaN/Inf.

    A layer's norm is the L2 norm over all of its weights together.
    """
    width = max(len(s.layer_name) for s in slots)
    lines: list[str] = []
    for name in dict.fromkeys(s.layer_name for s in slots):
        rows = [i for i, s in enumerate(slots) if s.layer_name == name]
        layer = stats[rows]
        norm, max_abs = _combine(column(layer, "norm"), column(layer, "max_abs"))
        bad = int(column(layer, "nan").sum() + column(layer, "inf").sum())
        flag = f"  NaN/Inf x{bad}" if bad else ""
        skip = "  (step skipped)" if column(layer, "skipped")[0] > 0 else ""
        head = f"epoch {epoch + 1} batch {batch + 1:>4} | {name:<{width}}"
        peak = f"{max_abs:.3e}" if column(layer, "full")[0] > 0 else "-"  # "-": not measured at this step
        lines.append(f"{head}  norm {norm:.3e}  max|g| {peak}{flag}{skip}")
    return lines


def _combine(norms: np.ndarray, max_abs: np.ndarray) -> tuple[float, float]:
    """A layer's norm and max |g| from its weights' (NaN where a weight has no finite entry)."""
    if np.all(np.isnan(norms)):
        return float("nan"), float("nan")
    return combined_norm(norms), float(np.nanmax(max_abs))


def _measured_max(values: np.ndarray, measured: np.ndarray) -> float:
    """The largest finite value of the steps where it was measured (NaN if none)."""
    values = values[measured]
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size else float("nan")


class MonitorSummary:
    """Per-layer summary of a monitored run, shown as text or as an HTML table.

    Attributes:
        rows: One dict per layer: layer, steps, last norm, median norm, max norm,
            max |g|, NaN/Inf steps, skipped steps.
        anomalies: The anomalies found (:class:`~gradmagic.core.monitor.anomaly.Anomaly`).
    """

    def __init__(self, history: MonitorHistory, anomalies: Sequence[Any]) -> None:
        self.anomalies = list(anomalies)
        names, norms = history.layer_norms()
        max_abs = history.stat("max_abs")
        bad = history.stat("nan") + history.stat("inf")
        skipped = history.stat("skipped")
        full = history.stat("full")
        self.rows = []
        for j, name in enumerate(names):
            cols = [i for i, s in enumerate(history.slots) if s.layer_name == name]
            layer = norms[:, j]
            finite = layer[np.isfinite(layer)] if len(layer) else layer
            self.rows.append(
                {
                    "layer": name,
                    "steps": len(layer),
                    "last norm": float(layer[-1]) if len(layer) else float("nan"),
                    "median norm": float(np.median(finite)) if len(finite) else float("nan"),
                    "max norm": float(finite.max()) if len(finite) else float("nan"),
                    "max |g|": _measured_max(max_abs[:, cols], full[:, cols[0]] > 0),
                    "NaN/Inf steps": int((bad[:, cols].sum(axis=1) > 0).sum()),
                    "skipped steps": int((skipped[:, cols[0]] > 0).sum()) if len(layer) else 0,
                }
            )

    def _cells(self, row: dict[str, Any]) -> list[str]:
        return [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]

    def _headers(self) -> list[str]:
        return list(self.rows[0]) if self.rows else ["layer"]

    def __repr__(self) -> str:
        lines = [text_table("GradientMonitor summary", self._headers(), [self._cells(r) for r in self.rows])]
        lines += [f"anomaly: {a.message}" for a in self.anomalies[:10]]
        if len(self.anomalies) > 10:
            lines.append(f"... and {len(self.anomalies) - 10} more anomalies")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        states = ["nonfinite" if row["NaN/Inf steps"] else "ok" for row in self.rows]
        table = html_table("GradientMonitor summary", self._headers(), [self._cells(r) for r in self.rows], states)
        notes = "".join(f"<li>{html.escape(a.message)}</li>" for a in self.anomalies[:10])
        return table + (f"<ul>{notes}</ul>" if notes else "")
