"""The result of :func:`gradmagic.check_gradients`: a row per layer and input, the verdict, tables."""

from __future__ import annotations

import html
from dataclasses import dataclass, field, fields
from typing import Any

from gradmagic.core.display import html_table, text_notes, text_table

#: A row's status: within tolerance, over it, or at a point where the loss is not differentiable.
OK, FAIL, NOT_SMOOTH = "ok", "FAIL", "not smooth here"


@dataclass(frozen=True)
class CheckRow:
    """Autodiff against finite differences for one layer's weights or one input.

    Attributes:
        index: The layer's index in ``model.layers``; ``None`` for an input.
        name: The layer's name, or the input's.
        what: The weights checked (``"kernel, bias"``) or ``"input"``.
        size: Number of entries checked.
        directions: How many directions were compared.
        mode: ``"every entry"`` (unit vectors) or ``"random directions"``.
        max_abs_error: Largest ``|grad . v - (L(w + hv) - L(w - hv)) / 2h|`` at ``step``.
        rel_error: ``||a - f||`` over the directions (``a`` autodiff, ``f``
            finite differences), less a round-off allowance per difference
            (and, for a row that is not smooth here, less what the kink
            explains), divided by the larger of ``||a||``, ``||f||`` and a
            hundredth of the whole model's gradient seen through as many directions.
        passed: ``rel_error <= tol``, or a row that is not smooth here.
        status: ``"ok"``, ``"FAIL"``, or ``"not smooth here"``: the one-sided
            slopes differ at every step (ReLU at exactly 0, max-pool ties,
            Masking), so no derivative exists to check and the error is within
            what that explains.
        step: The step ``h`` the row was judged at: ``epsilon``, or ``10x`` /
            ``0.1x`` it when the row failed at ``epsilon`` and agreed better there.
    """

    index: int | None
    name: str
    what: str
    size: int
    directions: int
    mode: str
    max_abs_error: float
    rel_error: float
    passed: bool
    status: str = OK
    step: float = 0.0


_COLUMNS = tuple(f.name for f in fields(CheckRow))


@dataclass(eq=False)
class GradientCheck:
    """The result of :func:`check_gradients`.

    Attributes:
        model: The model's name.
        rows: One :class:`CheckRow` per layer with trainable weights, then one per float input.
        tol: The tolerance applied to ``rel_error``.
        dtype: ``"float64"`` (a float64 copy of the model) or ``"float32"``.
        epsilon: The finite-difference step ``h``.
        loss: The loss at (x, y), in ``dtype``.
        suspects: When the check fails, the layers (``"3 'name'"``) where the wrong
            gradient most likely enters: from the deepest failing layer up to the
            next layer whose weights check out, in model order.
        notes: Why the check fell back to float32, and other caveats.
    """

    model: str
    rows: list[CheckRow]
    tol: float
    dtype: str
    epsilon: float
    loss: float
    suspects: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every row is within the tolerance."""
        return all(row.passed for row in self.rows)

    @property
    def max_rel_error(self) -> float:
        """The largest relative error over all rows."""
        return max((row.rel_error for row in self.rows), default=0.0)

    @property
    def failed(self) -> list[CheckRow]:
        """The rows over the tolerance."""
        return [row for row in self.rows if not row.passed]

    @property
    def not_smooth(self) -> list[CheckRow]:
        """The rows at a point where the loss is not differentiable (not failures)."""
        return [row for row in self.rows if row.status == NOT_SMOOTH]

    def _advice(self) -> str:
        if self.passed or not self.suspects:
            return ""
        return (
            f"The wrong gradient enters at one of the layers {', '.join(self.suspects)}: backpropagation spoils "
            f"every row before the layer that computes it wrongly (look for custom gradients and non-smooth ops)."
        )

    def to_dict(self) -> dict[str, list]:
        """Columns of equal length, one per :class:`CheckRow` field."""
        return {name: [getattr(row, name) for row in self.rows] for name in _COLUMNS}

    def _title(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        if self.not_smooth:
            verdict += f", {len(self.not_smooth)} row(s) not smooth here"
        return (
            f"Gradient check of model '{self.model}': {verdict} (max relative error {self.max_rel_error:.3g}, "
            f"tol {self.tol:g}, {self.dtype}, h = {self.epsilon:g}, loss = {self.loss:.6g})"
        )

    def _cells(self, row: CheckRow) -> list[Any]:
        values = [getattr(row, name) for name in _COLUMNS]
        return [f"{v:.3g}" if isinstance(v, float) else ("ok" if v is True else FAIL if v is False else v)
                for v in values]  # fmt: skip

    def _footer(self) -> list[str]:
        return [self._advice()] * bool(self._advice()) + text_notes(self.notes)

    def __repr__(self) -> str:
        table = text_table(self._title(), _COLUMNS, [self._cells(r) for r in self.rows])
        return "\n".join([table, *self._footer()])

    def _repr_html_(self) -> str:
        states = ["ok" if r.status == OK else "failed" if not r.passed else "rough" for r in self.rows]
        table = html_table(self._title(), _COLUMNS, [self._cells(r) for r in self.rows], states)
        return table + "".join(f"<p>{html.escape(line)}</p>" for line in self._footer())
