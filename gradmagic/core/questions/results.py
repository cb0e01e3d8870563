"""Result objects: gradient arrays plus per-tensor statistics and their tables.

Statistics are computed on first use, not per call, so a result that is only
read for its arrays (a slider, a benchmark) costs nothing extra. Statistics
describe the *finite* entries; NaN and Inf entries are counted separately, so a
single NaN does not hide the size of everything else.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradmagic.core.arguments import is_int
from gradmagic.core.display import html_notes, html_table, text_notes, text_table
from gradmagic.errors import LayerError

#: Label columns kept in ``to_dict()`` but left out of the displayed tables.
HIDDEN_LABELS = frozenset({"path"})

STAT_COLUMNS = ("norm", "max_abs", "mean", "std", "min", "max", "nan", "inf", "zero_fraction")


@dataclass(frozen=True)
class GradientStats:
    """Summary of one gradient tensor.

    Attributes:
        size: Number of entries.
        norm: L2 norm of the finite entries.
        mean, std, min, max: Of the finite entries.
        max_abs: Largest absolute finite entry.
        nan: Number of NaN entries.
        inf: Number of +/-Inf entries.
        zero_fraction: Fraction of entries exactly 0.
    """

    size: int
    norm: float
    max_abs: float
    mean: float
    std: float
    min: float
    max: float
    nan: int
    inf: int
    zero_fraction: float

    @classmethod
    def of(cls, array: np.ndarray) -> GradientStats:
        """Compute the statistics of an array (in float64, over finite entries)."""
        values = np.asarray(array, dtype=np.float64).ravel()
        finite_mask = np.isfinite(values)
        nan = int(np.isnan(values).sum())
        inf = int(values.size - nan - finite_mask.sum())
        finite = values if nan + inf == 0 else values[finite_mask]
        zero_fraction = float(np.mean(values == 0.0)) if values.size else 0.0
        if finite.size == 0:
            nothing = math.nan
            return cls(int(values.size), nothing, nothing, nothing, nothing, nothing, nothing, nan, inf, zero_fraction)
        return cls(
            size=int(values.size),
            norm=float(np.sqrt(np.dot(finite, finite))),
            max_abs=float(np.max(np.abs(finite))),
            mean=float(np.mean(finite)),
            std=float(np.std(finite)),
            min=float(np.min(finite)),
            max=float(np.max(finite)),
            nan=nan,
            inf=inf,
            zero_fraction=zero_fraction,
        )

    @property
    def finite(self) -> bool:
        """True when no entry is NaN or Inf."""
        return self.nan == 0 and self.inf == 0


@dataclass
class GradientRow:
    """One gradient tensor in a result table, with what it is the gradient of.

    Attributes:
        labels: Ordered description columns (layer, weight, shape, ...).
        array: The gradient, or ``None`` when disconnected (no path from the
            differentiated quantity).
    """

    labels: dict[str, Any]
    array: np.ndarray | None

    @functools.cached_property
    def stats(self) -> GradientStats | None:
        """Statistics of the array, ``None`` when disconnected."""
        return None if self.array is None else GradientStats.of(self.array)

    @property
    def disconnected(self) -> bool:
        """True when there is no gradient path (the gradient is ``None``)."""
        return self.array is None


@dataclass(eq=False)
class GradientTable:
    """Shared behaviour of every result: rows, statistics, text and HTML tables."""

    rows: list[GradientRow]
    title: str = field(default="", repr=False)
    #: ``None`` when x was given as data; else where x (and y) came from, e.g.
    #: ``"x, y: the first batch of a tf.data.Dataset"``.
    source: str | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[GradientRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def stats(self) -> list[GradientStats | None]:
        """Statistics per row (``None`` for a disconnected row)."""
        return [row.stats for row in self.rows]

    @property
    def disconnected(self) -> list[str]:
        """Descriptions of the rows that have no gradient path."""
        return [" / ".join(str(v) for v in row.labels.values()) for row in self.rows if row.disconnected]

    def to_dict(self) -> dict[str, list]:
        """Columns of equal length: the labels, every statistic and ``disconnected``.

        A disconnected row has ``None`` statistics. ``pandas.DataFrame(r.to_dict())``
        gives the table as a frame.
        """
        label_names = list(self.rows[0].labels) if self.rows else []
        columns: dict[str, list] = {name: [row.labels[name] for row in self.rows] for name in label_names}
        for stat in STAT_COLUMNS:
            columns[stat] = [None if row.stats is None else getattr(row.stats, stat) for row in self.rows]
        columns["disconnected"] = [row.disconnected for row in self.rows]
        return columns

    def _cells(self, row: GradientRow) -> list[str]:
        cells = [_label_text(v) for k, v in row.labels.items() if k not in HIDDEN_LABELS]
        if row.stats is None:
            return cells + ["disconnected"] + [""] * (len(STAT_COLUMNS) - 1)
        st = row.stats
        numbers = [st.norm, st.max_abs, st.mean, st.std, st.min, st.max]
        return cells + [f"{v:.4g}" for v in numbers] + [str(st.nan), str(st.inf), f"{st.zero_fraction:.0%}"]

    def _headers(self) -> list[str]:
        labels = [k for k in self.rows[0].labels if k not in HIDDEN_LABELS] if self.rows else []
        return [*labels, "norm", "max |g|", "mean", "std", "min", "max", "NaN", "Inf", "zeros"]

    def __repr__(self) -> str:
        heading = "\n".join(line for line in (self.title, f"({self.source})" if self.source else "") if line)
        flags = ["  <- NaN/Inf" if row.stats is not None and not row.stats.finite else "" for row in self.rows]
        return text_table(heading, self._headers(), [self._cells(row) for row in self.rows], flags)

    def _repr_html_(self) -> str:
        states = ["disconnected" if row.disconnected else "nonfinite" if not row.stats.finite else "ok"
                  for row in self.rows]  # fmt: skip
        heading = self.title + (f" ({self.source})" if self.source else "")
        return html_table(heading, self._headers(), [self._cells(row) for row in self.rows], states)


def _label_text(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(str(d) for d in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


class WeightGradients(GradientTable):
    """dLoss/dW for trainable weights, grouped by layer.

    Attributes:
        loss: The loss at (x, y).
        layer_count: ``len(model.layers)``, so that ``r[-1]`` means the last layer
            as ``model.layers[-1]`` does (None when unknown).
    """

    def __init__(self, loss: float, rows: list[GradientRow], title: str = "", layer_count: int | None = None) -> None:
        super().__init__(rows, title)
        self.loss = loss
        self.layer_count = layer_count

    def arrays(self) -> list[np.ndarray | None]:
        """The gradients, aligned with the weights asked for; ``None`` if disconnected."""
        return [row.array for row in self.rows]

    @property
    def paths(self) -> list[str]:
        """The unique ``variable.path`` of each weight, aligned with :meth:`arrays`."""
        return [row.labels["path"] for row in self.rows]

    def __getitem__(self, key: int | str) -> WeightGradients:
        """The part of one layer, by ``model.layers`` index (negative counts from the end) or by name.

        Weights a model holds itself, outside its layers (index -1 in the table),
        are found by the model's name.
        """
        index = key
        if is_int(key) and key < 0:
            # model.layers[-k] for 1 <= k <= len(model.layers); -1 is never the model's own weights.
            index = int(key) + self.layer_count if self.layer_count and -self.layer_count <= key else None
        if isinstance(key, str):
            rows = [r for r in self.rows if r.labels["layer"] == key]
        else:
            rows = [r for r in self.rows if index is not None and r.labels["index"] == index]
        if not rows:
            known = sorted({(r.labels["index"], r.labels["layer"]) for r in self.rows})
            listed = [f"{i} {n!r}" if i >= 0 else f"{n!r} (the model's own weights, by name)" for i, n in known]
            raise LayerError(
                f"Received: {key!r}, but this result has no weights of that layer. Expected "
                f"a layer index or name among: {', '.join(listed) or 'none'}."
            )
        return WeightGradients(self.loss, rows, f"{self.title} [{key!r}]", self.layer_count)


class OutputGradients(GradientTable):
    """dLoss/d(output of one layer).

    Attributes:
        loss: The loss at (x, y).
        array: The gradient, shaped like the layer's output for x (a list when the
            layer returns several tensors); ``None`` when disconnected.
        output: The layer's output value(s) for x.
        layer_index, layer_name: The layer.
        calls: How many times the layer ran in one forward pass (a shared layer
            runs more than once; ``array`` is for the first call).
    """

    def __init__(
        self,
        loss: float,
        rows: list[GradientRow],
        output: Any,
        layer_index: int,
        layer_name: str,
        calls: int,
        title: str = "",
    ) -> None:
        super().__init__(rows, title)
        self.loss = loss
        self.output = output
        self.layer_index = layer_index
        self.layer_name = layer_name
        self.calls = calls
        arrays = [row.array for row in rows]
        self.array = arrays[0] if len(arrays) == 1 else arrays


class InputGradients(GradientTable):
    """d(model output)/d(input): one Jacobian per sample.

    Attributes:
        array: ``output=None``: ``(batch, *output_shape, *input_shape)``;
            ``output=k``: ``(batch, *input_shape)``. A model with several inputs
            gives a list (or a dict, if x was a dict) with one per input; a model
            with several outputs and ``output=None`` gives a list with one such
            entry per output. ``None`` where an input does not reach an output.
        output: The output unit asked for, or ``None`` for all.
        values: The model's output at x (a list for several outputs): f(x)
            beside f'(x).
        notes: How it was computed when not the usual way (e.g. one output
            unit at a time, where the vectorised Jacobian is not supported),
            and what a ``None`` Jacobian means; shown under the table.
    """

    def __init__(self, rows: list[GradientRow], array: Any, output: int | None, title: str = "") -> None:
        super().__init__(rows, title)
        self.array = array
        self.output = output
        self.values: Any = None
        self.notes: list[str] = []

    def __repr__(self) -> str:
        return "\n".join([super().__repr__(), *text_notes(self.notes)])

    def _repr_html_(self) -> str:
        return super()._repr_html_() + html_notes(self.notes)


def rows_for(labels: Sequence[dict[str, Any]], arrays: Sequence[np.ndarray | None]) -> list[GradientRow]:
    """Pair label dicts with arrays into rows."""
    return [GradientRow(dict(lab), arr) for lab, arr in zip(labels, arrays)]
